"""Mutation-testing round 50c (benchmarks/bench_unet.py, benchmarks/bench_attention.py): a third set of hand-written
mutants of the modules of rounds 45a and 45c, run against their tests (test_bench_unet, test_bench_attention, the
bench_unet and bench_attention cases of test_benchmark_cli and test_run_all, test_mutants_round45a and 45c); each
test here kills one or more that survived (named in its docstring). All are CPU-only, seeded and fast: bench_unet's
calls are built on the tiny pipeline with a stand-in trainer, its measurement loop runs on stubbed calls and timer,
and bench_attention's GPU branches (its model and dtype, triton's timer, SDPA's choice) are played with stubs."""

import contextlib
import json
import sys
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_attention  # noqa: E402
import bench_unet  # noqa: E402

from rlcm_fast.architectures import SD15_LCM  # noqa: E402
from rlcm_fast.config import resolve_config  # noqa: E402


class Stop(Exception):
    """Raised by a stub to end a run once what the test looks at is decided."""


@pytest.fixture(scope="module")
def tiny_pipe():
    from rlcm_fast.models import load_pipeline

    torch.manual_seed(0)
    pipe = load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- bench_unet: the switches and the calls ---------------------------------------------------------------------

def test_the_default_switches_turn_cudnn_benchmark_back_off(tiny_pipe):
    """Mutant: apply_variant only ever setting torch.backends.cudnn.benchmark to True, never back to False: after
    the cudnn_benchmark variant, every later default and channels_last row (and the next call's FLOP count, and the
    caller's process after the run) kept timing cuDNN's algorithms, so the speedup that decides cudnn_benchmark
    was measured against itself."""
    trainer, before = SimpleNamespace(pipe=tiny_pipe), torch.backends.cudnn.benchmark
    try:
        bench_unet.apply_variant(trainer, bench_unet.VARIANTS["cudnn_benchmark"])
        assert torch.backends.cudnn.benchmark is True
        bench_unet.apply_variant(trainer, bench_unet.VARIANTS["default"])
        assert torch.backends.cudnn.benchmark is False
    finally:
        bench_unet.apply_variant(trainer, {})
        torch.backends.cudnn.benchmark = before


def stand_in_trainer(pipe, resolution):
    """What bench_unet.Calls reads of a Trainer, on the tiny pipeline at `resolution`."""
    cfg = resolve_config(overrides={"device": "cpu", "model": "tiny", "grid_every": 0, "resolution": resolution})
    return SimpleNamespace(cfg=cfg, device=torch.device("cpu"), pipe=pipe, unet=pipe.unet, prompt_set=["a cat"],
                           autocast=contextlib.nullcontext)


def test_the_sampler_runs_at_the_configured_resolution_and_horizon_without_the_final_step(tiny_pipe):
    """Mutants: the sampler's resolution not passed (the pipeline's own, unet.sample_size * vae_scale_factor: for
    sd15-lcm 512 px where the benchmark says it times 768 px, so every sampling, training and decode row measured
    latents of 64x64 rather than 96x96) and train_final_step=True (the loop records a log-prob the trainer's
    default config does not). The tiny pipeline's own size is 32 px; the config asks 64."""
    trainer = stand_in_trainer(tiny_pipe, 64)
    assert tiny_pipe.unet.config.sample_size * tiny_pipe.vae_scale_factor != 64
    sampler = bench_unet.Calls(trainer).sampler(graphed=False)
    assert sampler.resolution == 64 and sampler.horizon == bench_unet.SAMPLING_HORIZON
    assert sampler.trained_steps == bench_unet.SAMPLING_HORIZON - 1
    seen = []
    decode = bench_unet.LCMSampler.decode
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_unet.LCMSampler, "decode", lambda self, denoised: seen.append(denoised.shape)
                      or decode(self, denoised))
        bench_unet.Calls(trainer).make("decode", 2, graphed=False)()
    assert seen == [(2, tiny_pipe.unet.config.in_channels, 64 // tiny_pipe.vae_scale_factor,
                     64 // tiny_pipe.vae_scale_factor)]


# -- bench_unet: the measurement loop, on stubbed calls and timer ------------------------------------------------

def stubbed_measure(monkeypatch, tmp_path, timed_ms, calls, gpu=False):
    """bench_unet.measure with the default variant on a stand-in trainer whose calls are (kind, batch, graphed)
    and whose timings are `timed_ms(call)`; the written JSON."""
    trainer = SimpleNamespace(device=torch.device("cpu"), cfg=SimpleNamespace(model="tiny", resolution=32),
                              accelerator=SimpleNamespace(mixed_precision="no"))
    monkeypatch.setattr(bench_unet, "Trainer", lambda cfg, run_dir: trainer)
    monkeypatch.setattr(bench_unet, "resolve_config", lambda overrides: overrides)
    monkeypatch.setattr(bench_unet, "environment", lambda: {"git_commit": "abc"})
    monkeypatch.setattr(bench_unet, "Calls", lambda trainer: SimpleNamespace(
        make=lambda kind, batch, graphed: (kind, batch, graphed)))
    monkeypatch.setattr(bench_unet, "apply_variant", lambda trainer, switches: None)
    monkeypatch.setattr(bench_unet, "counted_tflop", lambda call: 1.0)
    monkeypatch.setattr(bench_unet, "timed_ms", lambda call, repeats, device: timed_ms(call))
    monkeypatch.setattr(bench_unet, "release_memory", lambda device: None)
    args = SimpleNamespace(repeats=1, out_dir=tmp_path)
    assert bench_unet.measure(args, ["default"], calls, gpu, tmp_path / "run") == 0
    return json.loads((tmp_path / "bench_unet.json").read_text())


def test_the_recorded_sampling_horizon_is_the_one_each_unet_call_time_is_divided_by(monkeypatch, tmp_path):
    """Mutant: the result's "sampling_horizon" written as 1 while ms_per_unet_call divides by 2: a reader of the
    JSON (or of a later run at another horizon) could not tell how many UNet calls a sampling row's ms holds."""
    result = stubbed_measure(monkeypatch, tmp_path, lambda call: 8.0, [("sampling", 3)])
    row, = result["rows"]
    assert result["sampling_horizon"] == bench_unet.SAMPLING_HORIZON
    assert row["ms_per_unet_call"] * result["sampling_horizon"] == pytest.approx(row["ms"])


def test_a_rows_error_is_cut_at_300_characters_and_names_the_first_fallback(monkeypatch, tmp_path):
    """Mutants: the row's error cut at 3000 characters rather than 300 (an out-of-memory's allocator report, pages
    long, pasted into the JSON and the README's table) and, of two fallback warnings in one row, the last named
    rather than the first (the capture's failure that caused the "without CUDA graphs" that followed it)."""
    long_text = "CUDA out of memory. Tried to allocate " + "x" * 400
    first = "training calls of (2, 4, 96, 96) could not be captured as CUDA graphs (x); they run without them"
    then = "capture failed; sampling goes on without CUDA graphs"

    def timed(call):
        if call[0] == "decode":
            raise RuntimeError(long_text)
        warnings.warn(first)
        warnings.warn(then)
        return 1.0

    rows = stubbed_measure(monkeypatch, tmp_path, timed, [("decode", 1), ("sampling", 1)])["rows"]
    assert [r["error"] for r in rows] == [f"RuntimeError: {long_text[:300]}...", f"RuntimeError: {first}"]


# -- bench_attention: its command line ---------------------------------------------------------------------------

def test_no_sampling_batch_is_refused_in_one_line(capsys):
    """Mutant: --batches taking '' as none, as --train-rows does: `--batches ''` then ran no sampling group (with
    the default training rows, only them) and wrote a result without the sampling figures, instead of saying the
    value is bad."""
    with pytest.raises(SystemExit) as exit_info:
        bench_attention.parse_args(["--batches", ""])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "argument --batches: '' is not a comma-separated list of integers >= 1")


# -- bench_attention: a GPU run's model and dtype, and its timer -----------------------------------------------

def test_a_gpu_run_records_sd15_lcms_shapes_at_768_px_and_times_them_in_bf16(monkeypatch, tmp_path):
    """Mutants: the GPU's resolution 768 -> 512 and its dtype bf16 -> float16: the shapes timed were not the ones
    the trainer runs (9216 tokens at 768 px) and the kernels not the ones its bf16 autocast runs, while the
    docstring and JSON say sd15-lcm at 768 px, bf16. The shapes and the timing are stubbed; what they are asked
    for is recorded."""
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_attention, "environment", lambda: {"git_commit": "abc"})
    monkeypatch.setattr(bench_attention, "attention_shapes", lambda spec, resolution: seen.append(
        (spec, resolution)) or {"unet": Counter({(1, 4, 4, 8): 1}), "vae_decode": Counter({(1, 4, 4, 8): 1})})

    def time_shape(batch, shape, backward, device, dtype, backends):
        seen.append((device.type, dtype))
        raise Stop
    monkeypatch.setattr(bench_attention, "time_shape", time_shape)
    with pytest.raises(Stop):
        bench_attention.main(["--out-dir", str(tmp_path)])
    assert seen == [(SD15_LCM, 768), ("cuda", torch.bfloat16)]


def test_a_gpu_shape_time_is_triton_do_benchs_median_with_the_inputs_grads_cleared(monkeypatch):
    """Mutant: do_bench's return_mode "median" -> "min": each shape's GPU time the fastest of its runs, not the
    median the docstring (and the CPU's timer) give, flattering every backend unevenly. triton is stood in for."""
    calls = []

    def do_bench(fn, **kwargs):
        calls.append(kwargs)
        return 1.5
    monkeypatch.setitem(sys.modules, "triton", SimpleNamespace())
    monkeypatch.setitem(sys.modules, "triton.testing", SimpleNamespace(do_bench=do_bench))
    grads = [torch.zeros(1)]
    assert bench_attention.median_ms(lambda: None, torch.device("cuda"), grads) == 1.5
    assert calls == [{"warmup": 25, "rep": 100, "grad_to_none": grads, "return_mode": "median"}]


# -- bench_attention: a shape's row -----------------------------------------------------------------------------

def test_a_shape_sdpa_sends_to_math_times_math_once_when_it_is_not_in_the_list(monkeypatch):
    """Mutants: math left out of the backends SDPA picks that are timed though not in the list (on a GPU a shape no
    fused kernel takes runs on math: its default and cuDNN-first sums were None, the shape's real cost unknown), and
    a backend both choices pick timed twice (math on a GPU materialises the whole attention matrix: twice the
    slowest timing of the run). SDPA's dispatcher is stood in for by one that picks math."""
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda query, key, value: int(SDPBackend.MATH))
    timed = []

    def median_ms(fn, device, grads):
        fn()
        timed.append(fn)
        return 2.0
    monkeypatch.setattr(bench_attention, "median_ms", median_ms)
    row = bench_attention.time_shape(1, (1, 8, 8, 4), False, torch.device("cpu"), torch.float32, ["flash"])
    assert (row["default_choice"], row["cudnn_first_choice"]) == ("math", "math")
    assert row["ms"] == {"flash": 2.0, "math": 2.0} and len(timed) == 2
    totals = bench_attention.call_totals([row], [3])
    assert totals["default"] == totals["cudnn_first"] == 6.0


def test_a_bug_in_a_timed_call_is_raised_not_reported_as_no_kernel(monkeypatch):
    """Mutant: `except RuntimeError` widened to Exception around a backend's timing: a TypeError (a broken call,
    a wrong argument) was recorded as "this backend has no kernel for the shape" and the run went on, its
    per-call sums silently missing that backend."""
    def broken(query, key, value, *args, **kwargs):
        raise TypeError("scaled_dot_product_attention() got an unexpected keyword argument")
    monkeypatch.setattr(bench_attention, "median_ms", lambda fn, device, grads: (fn(), 1.0)[1])
    monkeypatch.setattr(bench_attention.F, "scaled_dot_product_attention", broken)
    with pytest.raises(TypeError, match="unexpected keyword"):
        bench_attention.time_shape(1, (1, 8, 8, 4), False, torch.device("cpu"), torch.float32, ["flash"])
