"""Mutation-testing round 50f (benchmarks/bench_sampler.py, benchmarks/unet_profile.py, a second round after 46b):
hand-written mutants of those modules were run against their tests (test_bench_sampler, test_unet_profile, the
sampler and profile parts of test_benchmark_cli and test_bench_attention, rounds 44h and 46b); each test here kills
one that survived (named in its docstring). All are CPU-only, seeded and fast: bench_sampler's pipeline and timing
are stubbed where a run is made (the FLOP counts are checked on the tiny pipeline against the pipeline's own call),
and unet_profile's clock is a fake."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_sampler  # noqa: E402
import unet_profile  # noqa: E402

EAGER, FAST, COMPILED, NO_GRAPH = (bench_sampler.EAGER, bench_sampler.FAST, bench_sampler.COMPILED_DIFFUSERS,
                                   bench_sampler.FAST_WITHOUT_GRAPH)
SECONDS = {EAGER: 4.0, FAST: 1.0, COMPILED: 2.0, NO_GRAPH: 1.6}  # per image per UNet step (stubbed)


# -- bench_sampler: a whole run, its pipeline and timing stubbed ----------------------------------------------------

@pytest.fixture
def gpu_run(monkeypatch, tmp_path):
    """bench_sampler.main as it runs where CUDA is available (stubbed: no GPU here); gives (JSON, record, stdout)."""
    seen = SimpleNamespace(loaded=[], compiled=[])

    def load(model, device, dtype):
        seen.loaded.append((model, device.type, dtype))
        return SimpleNamespace(unet="eager UNet", set_progress_bar_config=lambda **kwargs: None)

    def compile_(unet, **kwargs):
        seen.compiled.append((unet, kwargs))
        return "compiled UNet"

    def time_variant(name, pipe, unet, horizon, batch, resolution, device, repeats, fast_attention="sdpa"):
        return SECONDS[name] * horizon * batch, torch.zeros(batch, 3, 2, 2)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_sampler, "environment", lambda: {})
    monkeypatch.setattr(bench_sampler, "load_pipeline", load)
    monkeypatch.setattr(bench_sampler, "diffusers_images",
                        lambda pipe, horizon, batch, resolution, device: torch.zeros(batch, 3, 2, 2))
    monkeypatch.setattr(bench_sampler, "unet_call_flops", lambda pipe, batch, res: 10**12 * batch)
    monkeypatch.setattr(bench_sampler, "decode_flops", lambda pipe, batch, res: 0)
    monkeypatch.setattr(bench_sampler, "time_variant", time_variant)
    monkeypatch.setattr(bench_sampler, "release_memory", lambda device: None)
    monkeypatch.setattr(bench_sampler, "check_attention_backend", lambda backend, device: None)
    monkeypatch.setattr(bench_sampler, "matmul_rate", lambda device: {"flops_per_s": 100e12})
    monkeypatch.setattr(torch, "compile", compile_)

    def run(capsys, *argv):
        assert bench_sampler.main([*argv, "--out-dir", str(tmp_path)]) == 0
        return json.loads((tmp_path / "bench_sampler.json").read_text()), seen, capsys.readouterr().out
    return run


def test_with_cuda_and_no_flags_the_run_is_the_documented_gpu_one(gpu_run, capsys):
    """Mutants: --device's default None -> "cpu", and `args.device or (cuda if available)` -> `or "cpu"` (a plain
    run on the GPU machine timed the tiny model on the CPU, and check_claims found no GPU rows); the GPU's default
    horizons (4, 8) -> (2, 4) and batches (1, 8) -> (1, 4) (the claims read H=4,8 at batch 1 and 8)."""
    result, seen, _ = gpu_run(capsys)
    assert seen.loaded == [("sd15-lcm", "cuda", torch.bfloat16)]
    groups = [(h, b) for h in (4, 8) for b in (1, 8)]
    assert [(r["variant"], r["horizon"], r["batch"]) for r in result["rows"][:8]] == [
        (name, h, b) for h, b in groups for name in (EAGER, FAST)]
    assert {(r["horizon"], r["batch"]) for r in result["rows"]} == set(groups)


def test_diffusers_compiled_rows_use_the_documented_torch_compile_recipe(gpu_run, capsys):
    """Mutants: torch.compile's mode "reduce-overhead" -> "default", and fullgraph=True dropped: the "diffusers +
    torch.compile" baseline was not diffusers' documented recipe, so the speedup against it claimed too much."""
    _, seen, _ = gpu_run(capsys, "--horizons", "4", "--batches", "1")
    assert seen.compiled == [("eager UNet", {"mode": "reduce-overhead", "fullgraph": True})]


def test_each_row_is_printed_in_images_per_second_with_its_mfu_and_the_file_written_is_named(gpu_run, capsys,
                                                                                                 tmp_path):
    """Mutants: the console's img/s printed as seconds per image, its MFU left out, and the closing "wrote PATH"
    line dropped: what a user running the benchmark by hand reads (the JSON is not opened)."""
    result, _, out = gpu_run(capsys, "--horizons", "4", "--batches", "2")
    lines = out.splitlines()
    fast = next(line for line in lines if f" {FAST} " in line)
    seconds = SECONDS[FAST] * 4 * 2  # 8 s for 2 images
    assert fast.split()[:2] == ["H=4", "B=2"] and f"{2 / seconds:8.2f} img/s" in fast
    assert fast.endswith(f"MFU {result['rows'][1]['mfu']:.1%}")
    assert lines[-1] == f"wrote {tmp_path / 'bench_sampler.json'}"


# -- bench_sampler: what is counted and timed ------------------------------------------------------------------------

def test_the_counted_flops_are_those_of_the_pipelines_own_unet_call_and_decode():
    """Mutants: one UNet call's FLOPs counted for one prompt's embeddings, over half the latent side, or with the
    guidance embedding of one image; the decode's FLOPs counted for one latent: MFU (FLOPs over time over the
    matmul rate) claimed for work the timed call did not do. The reference is diffusers' pipeline itself: its
    FLOPs at H=2 less at H=1 are one UNet call, and at H=1 less that and the text encoder are the decode."""
    from torch.utils.flop_counter import FlopCounterMode

    from rlcm_fast.models import load_pipeline

    pipe = load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    batch, resolution = 2, 32

    def counted(fn):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    def pipeline(horizon):
        return counted(lambda: pipe([bench_sampler.PROMPT] * batch, num_inference_steps=horizon,
                                    guidance_scale=bench_sampler.GUIDANCE, height=resolution, width=resolution,
                                    output_type="pt", generator=torch.Generator().manual_seed(0)))

    text = counted(lambda: pipe.encode_prompt([bench_sampler.PROMPT] * batch, torch.device("cpu"), 1, False))
    one_step, two_steps = pipeline(1), pipeline(2)
    unet = bench_sampler.unet_call_flops(pipe, batch, resolution)
    assert unet == two_steps - one_step > 0
    assert bench_sampler.decode_flops(pipe, batch, resolution) == one_step - unet - text > 0


def test_diffusers_compiled_variant_is_timed_on_the_pipeline_not_on_rlcm_fast(monkeypatch):
    """Mutant: `name in (EAGER, COMPILED_DIFFUSERS)` -> `name == EAGER`: the "diffusers + torch.compile" rows timed
    rlcm-fast's sampler, so the claim "rlcm-fast faster than diffusers + torch.compile" compared it with itself."""
    made, called = [], []
    monkeypatch.setattr(bench_sampler, "FastLCMSampler", lambda *args, **kwargs: made.append(args))

    def pipe(prompts, **kwargs):
        called.append(len(prompts))
        return SimpleNamespace(images=torch.zeros(1))

    bench_sampler.variant_call(COMPILED, pipe, 3, 2, 32, torch.device("cpu"))()
    assert called == [2] and made == []


def test_a_gpu_variant_is_warmed_up_three_times_before_it_is_timed(monkeypatch):
    """Mutant: the GPU's 3 warm-up calls -> 1: reduce-overhead's CUDA graph is recorded on a later call than the
    first, so its capture was timed as a call of the variant."""
    warmups = []
    monkeypatch.setattr(bench_sampler, "variant_call", lambda name, pipe, *args: lambda: torch.ones(1))
    monkeypatch.setattr(bench_sampler, "seconds_per_call",
                        lambda fn, device, warmup, repeats: warmups.append((device.type, warmup, repeats)) or 0.5)
    pipe = SimpleNamespace(unet="eager UNet")
    for device in ("cuda", "cpu"):
        bench_sampler.time_variant(EAGER, pipe, "compiled UNet", 2, 1, 32, torch.device(device), 4)
    assert warmups == [("cuda", 3, 4), ("cpu", 1, 4)]


# -- unet_profile ----------------------------------------------------------------------------------------------------

class GPUWork:
    """A clock whose time passes as a device's does: work queued is done when synchronised."""

    def __init__(self):
        self.now, self.pending = 10.0, 0.0

    def perf_counter(self):
        return self.now

    def synchronize(self, device=None):
        self.now, self.pending = self.now + self.pending, 0.0

    def queue(self, seconds):
        self.pending += seconds


def test_work_queued_before_a_profiled_call_is_not_timed_as_the_calls(monkeypatch):
    """Mutant: the synchronize before the unprofiled call's clock starts dropped: the GPU work still queued by the
    row's epochs was timed as the sampling call's, lowering its busy fraction (a GPU-bound call read host-bound)."""
    clock = GPUWork()
    monkeypatch.setattr(unet_profile, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(unet_profile, "synchronize", clock.synchronize)
    durations = iter([3.0, 5.0])
    clock.queue(7.0)  # the last epoch's kernels, not yet done
    summary = unet_profile.timed_profile(lambda: clock.queue(next(durations)), torch.device("cpu"))
    assert summary["wall_ms"] == pytest.approx(3000.0) and summary["profiled_wall_ms"] == pytest.approx(5000.0)


def test_a_cpu_call_is_summarised_as_a_cpu_one():
    """Mutant: timed_profile's `on_device=device.type == "cuda"` -> True: every CPU profile carried the note "no GPU
    activity recorded (is CUPTI available?)", sending a reader to look for a fault where there is none."""
    x = torch.ones(8, 8)
    summary = unet_profile.timed_profile(lambda: x @ x, torch.device("cpu"))
    assert "note" not in summary and "kernels" not in summary
    assert "aten::mm" in [op["name"] for op in summary["ops"]]


def event(key, device, self_device_us=0.0, self_cpu_us=0.0, count=1):
    kind = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
    return SimpleNamespace(key=key, device_type=kind, self_device_time_total=self_device_us,
                           self_cpu_time_total=self_cpu_us, count=count, is_user_annotation=False)


def test_every_synchronize_wait_is_a_wait_not_host_work():
    """Mutant: waits told by the key "cudaDeviceSynchronize" alone: a cudaStreamSynchronize (a .item() or a copy
    to the host) was counted as host work and ranked first among the ops, hiding the ops that cost time."""
    averages = [event("aten::mm", False, self_cpu_us=100), event("cudaStreamSynchronize", False, self_cpu_us=4000),
                event("cudaDeviceSynchronize", False, self_cpu_us=1000)]
    summary = unet_profile.summarise(averages, wall_s=0.01, profiled_s=0.01, on_device=False)
    assert summary["sync_wait_ms"] == pytest.approx(5.0) and summary["host_ms"] == pytest.approx(0.1)
    assert [op["name"] for op in summary["ops"]] == ["aten::mm"]


def test_each_profiled_call_is_its_own_console_line():
    """Mutant: format_profile's lines joined by "; " rather than newlines: the sampling and training calls ran
    together on one console line, the training call's figures read as the sampling call's."""
    summary = unet_profile.summarise([event("aten::add", False, self_cpu_us=2000)], 0.004, 0.005, on_device=False)
    said = unet_profile.format_profile("fast", {"sampling_call": summary, "training_call": summary})
    assert said.split("\n") == [f"fast {call}: 4.0 ms (5.0 profiled); most host_ms: aten::add 2.0"
                                for call in ("sampling_call", "training_call")]
