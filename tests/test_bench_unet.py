"""benchmarks/bench_unet.py on the CPU: the variants set (and unset) their switches on the trainer's models,
and a run writes one timed row per (call, variant) with its FLOPs and speedup."""

import json
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_unet  # noqa: E402

from rlcm_fast.config import resolve_config  # noqa: E402
from rlcm_fast.norm_precision import HalfPrecisionGroupNorm, HalfPrecisionLayerNorm  # noqa: E402
from rlcm_fast.trainer import Trainer  # noqa: E402


def convolution_weights(trainer):
    return [p for model in (trainer.unet, trainer.pipe.vae) for p in model.parameters()
            if p.ndim == 4 and p.shape[1] > 1 and p.shape[2:] != (1, 1)]


def test_variants_set_and_unset_their_switches_in_place(tmp_path):
    trainer = Trainer(resolve_config(overrides={"device": "cpu", "grid_every": 0}), tmp_path / "run")
    weights = convolution_weights(trainer)
    bench_unet.apply_variant(trainer, bench_unet.VARIANTS["channels_last"])
    assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in weights)
    bench_unet.apply_variant(trainer, bench_unet.VARIANTS["default"])
    assert all(p.is_contiguous() for p in weights)
    assert convolution_weights(trainer) == weights  # the same Parameters (the optimizer holds them)
    assert torch.backends.cudnn.benchmark is False
    norms = [m for model in (trainer.unet, trainer.pipe.vae) for m in model.modules()
             if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    bench_unet.apply_variant(trainer, bench_unet.VARIANTS["half_precision_norms"])
    assert norms and all(type(m) in (HalfPrecisionGroupNorm, HalfPrecisionLayerNorm) for m in norms)
    bench_unet.apply_variant(trainer, bench_unet.VARIANTS["default"])
    assert all(type(m) in (torch.nn.GroupNorm, torch.nn.LayerNorm) for m in norms)


def test_each_variant_and_mode_is_timed_on_a_thread_of_its_own(tmp_path, monkeypatch):
    """cuDNN's plans are cached per thread (thread_local in PyTorch), whatever torch.backends.cudnn.benchmark
    says: timed on the thread that ran the default variant (or the FLOP count) first, cudnn_benchmark reused
    their heuristic plans. Here a thread-local mark stands for that cache: each timing must find it unset."""
    cache, timed_ms, fresh = threading.local(), bench_unet.timed_ms, []

    def recording(call, repeats, device):
        fresh.append(not getattr(cache, "used", False))
        cache.used = True
        return timed_ms(call, repeats, device)

    cache.used = True  # the main thread's, where the FLOPs are counted
    monkeypatch.setattr(bench_unet, "timed_ms", recording)
    assert bench_unet.main(["--device", "cpu", "--repeats", "1", "--calls", "decode:1,sampling:1",
                            "--out-dir", str(tmp_path)]) == 0
    assert fresh == [True] * 4  # 2 calls x 2 variants


def test_a_measurement_on_its_own_thread_returns_its_value_or_raises_its_error_here():
    assert bench_unet.on_own_thread(lambda: 5) == 5
    with pytest.raises(RuntimeError, match="out of memory"):  # a row's failure, which measure() records
        bench_unet.on_own_thread(lambda: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")))


def test_cpu_run_writes_a_row_per_call_and_variant(tmp_path):
    assert bench_unet.main(["--device", "cpu", "--repeats", "1", "--calls", "training:2,sampling:3,decode:1",
                            "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_unet.json").read_text())
    assert result["complete"] and result["model"] == "tiny" and list(result["variants"]) == ["default", "channels_last"]
    rows = result["rows"]
    assert [(r["call"], r["batch"], r["variant"], r["mode"]) for r in rows] == [
        (call, batch, variant, "eager") for call, batch in (("training", 2), ("sampling", 3), ("decode", 1))
        for variant in ("default", "channels_last")]
    for row in rows:
        assert "error" not in row and row["ms"] > 0 and row["tflop"] > 0
        assert row["tflops_per_s"] == pytest.approx(row["tflop"] / (row["ms"] * 1e-3))
    assert [r["speedup_vs_default_eager"] for r in rows[::2]] == [1.0, 1.0, 1.0]
    sampling = rows[2]
    assert sampling["ms_per_unet_call"] == pytest.approx(sampling["ms"] / bench_unet.SAMPLING_HORIZON)
    # A training row counts a forward and its backward: more than twice a sampling row's UNet call per row.
    assert rows[0]["tflop"] / 2 > 2 * sampling["tflop"] / (3 * bench_unet.SAMPLING_HORIZON)


@pytest.mark.parametrize("args, message", [
    (["--variants", "cudnn_attention"], "--variants ['cudnn_attention'] unknown on a CPU; allowed: default, channels_last"),
    (["--calls", "training:0"], "--calls 'training:0' is invalid"),
    (["--calls", "inference:2"], "--calls 'inference:2' is invalid"),
    (["--repeats", "0"], "argument --repeats: '0' is not an integer >= 1"),
])
def test_bad_arguments_are_refused_in_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        bench_unet.main(["--device", "cpu", "--out-dir", str(tmp_path), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bench_unet.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_asked_for_without_cuda_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_unet.main(["--device", "cuda", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--device cuda: no CUDA device here" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_run_leaves_no_run_directory_behind(tmp_path, monkeypatch):
    """Each run left a bench_unet-* folder (the trainer's run directory) in the system's temp folder."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert bench_unet.main(["--device", "cpu", "--repeats", "1", "--calls", "decode:1", "--variants", "default",
                            "--out-dir", str(tmp_path / "out")]) == 0
    assert list(temp.glob("bench_unet-*")) == []
