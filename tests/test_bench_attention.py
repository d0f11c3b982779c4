"""benchmarks/bench_attention.py: the model's own attention shapes, and per-call sums of per-shape times."""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_attention  # noqa: E402

from rlcm_fast.architectures import SD15_LCM  # noqa: E402


def test_sd15_lcm_attention_shapes_at_768_px():
    shapes = bench_attention.attention_shapes(SD15_LCM, 768)
    # (heads, query tokens, key tokens, head width): 5 self- and 5 cross-attention layers at each of the
    # three attention resolutions (2 down + 3 up), 1 + 1 in the mid block; the VAE's single-head mid block.
    assert dict(shapes["unet"]) == {
        (8, 9216, 9216, 40): 5, (8, 9216, 77, 40): 5, (8, 2304, 2304, 80): 5, (8, 2304, 77, 80): 5,
        (8, 576, 576, 160): 5, (8, 576, 77, 160): 5, (8, 144, 144, 160): 1, (8, 144, 77, 160): 1}
    assert dict(shapes["vae_decode"]) == {(1, 9216, 9216, 512): 1}


def test_cpu_run_writes_per_shape_times_and_their_per_call_sums(tmp_path):
    assert bench_attention.main(["--device", "cpu", "--batches", "2", "--train-rows", "1",
                                 "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_attention.json").read_text())
    assert result["complete"] and result["model"] == "tiny" and result["git_commit"] and "cudnn_version" in result
    assert [(g["model_part"], g["batch"], g["pass"]) for g in result["groups"]] == [
        ("unet", 1, "forward_backward"), ("unet", 2, "forward"), ("vae_decode", 2, "forward")]
    unet_layers = {tuple(layer["shape"]): layer["count"] for layer in result["layers_per_call"]["unet"]}
    totals_first = result["groups"][0]["ms_per_call"]["default"]
    for group in result["groups"]:
        rows = group["rows"]
        assert [r["batch"] for r in rows] == [group["batch"]] * len(rows)
        for row in rows:
            assert row["no_kernel"] == ["cudnn"]  # no cuDNN on a CPU: said, not timed
            assert set(row["ms"]) == {"flash", "math"} and min(row["ms"].values()) > 0
            assert row["default_choice"] == row["cudnn_first_choice"] == "flash"
            heads, q, k, width = row["heads"], row["query_tokens"], row["key_tokens"], row["head_width"]
            factor = 3 if group["pass"] == "forward_backward" else 1
            assert row["gflop"] == pytest.approx(4 * group["batch"] * heads * q * k * width * factor / 1e9)
        totals = group["ms_per_call"]
        expected = sum(n * r["ms"]["flash"] for n, r in zip(group["layer_counts"], rows))
        assert totals["default"] == pytest.approx(expected) and totals["flash"] == pytest.approx(expected)
        assert totals["fastest"] <= min(totals["flash"], totals["math"]) + 1e-9
        assert totals["cudnn"] is None and totals["efficient"] is None  # no kernel for some shape
    assert [layer["count"] for layer in result["layers_per_call"]["unet"]] == result["groups"][0]["layer_counts"]
    assert sum(unet_layers.values()) == 8  # the tiny UNet: 4 transformer blocks, self + cross each
    import run_all  # its README table: one line per group, the per-call sums in it

    table = [line for line in run_all.attention_section(result) if line.startswith("| unet") or line.startswith("| vae")]
    assert len(table) == 3 and table[0].startswith(f"| unet | 1 | forward_backward | {totals_first:.3g} |")


def test_bad_sizes_are_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_attention.main(["--batches", "8,x"])
    assert exit_info.value.code == 2
    assert "argument --batches: '8,x' is not a comma-separated list of integers >= 1" in (
        capsys.readouterr().err.strip().splitlines()[-1])


def test_bench_sampler_runs_only_rlcm_fasts_rows_on_the_chosen_attention(monkeypatch):
    """--fast-attention cudnn: rlcm-fast's call is built and run on the cuDNN-first processors, diffusers' on
    the pipeline's own, which are the same objects again afterwards (new ones would recompile its UNet)."""
    import bench_sampler

    from rlcm_fast.attention import CudnnFirstAttnProcessor
    from rlcm_fast.models import load_pipeline

    pipe = load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    originals = [dict(model.attn_processors) for model in (pipe.unet, pipe.vae)]
    seen = {}
    variant_call = bench_sampler.variant_call

    def recording(name, pipe, *args):
        seen[name] = {type(p) for model in (pipe.unet, pipe.vae) for p in model.attn_processors.values()}
        return variant_call(name, pipe, *args)

    monkeypatch.setattr(bench_sampler, "variant_call", recording)
    for name in (bench_sampler.FAST, bench_sampler.EAGER):
        bench_sampler.time_variant(name, pipe, pipe.unet, 2, 1, 32, torch.device("cpu"), 1, "cudnn")
        assert [dict(model.attn_processors) for model in (pipe.unet, pipe.vae)] == originals
    assert seen[bench_sampler.FAST] == {CudnnFirstAttnProcessor}
    assert CudnnFirstAttnProcessor not in seen[bench_sampler.EAGER]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
@pytest.mark.parametrize("module_name", ["bench_attention", "bench_sampler"])
def test_cuda_asked_for_without_cuda_is_refused_in_one_line(module_name, tmp_path, capsys):
    """It was torch's traceback ("Torch not compiled with CUDA enabled") once the run had started."""
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module_name).main(["--device", "cuda", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--device cuda: no CUDA device here" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--horizons", "0"], "argument --horizons: '0' is not a comma-separated list of integers from 1 to 50"),
    (["--horizons", "4,60"], "argument --horizons: '4,60' is not a comma-separated list of integers from 1 to 50"),
    (["--batches", "1,x"], "argument --batches: '1,x' is not a comma-separated list of integers >= 1"),
    (["--repeats", "0"], "argument --repeats: '0' is not an integer >= 1"),
])
def test_bench_sampler_refuses_bad_sizes_in_one_line(argv, message, tmp_path, capsys):
    """They were a ZeroDivisionError, a ValueError and a StatisticsError after the pipeline had loaded."""
    import bench_sampler

    with pytest.raises(SystemExit) as exit_info:
        bench_sampler.main(["--device", "cpu", *argv, "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
