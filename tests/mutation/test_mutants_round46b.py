"""Mutation-testing round 46b (benchmarks/bench_sampler.py, benchmarks/unet_profile.py): hand-written mutants of
those modules were run against their tests (test_bench_sampler, test_unet_profile, test_bench_attention and the
bench_sampler parts of test_benchmark_cli and test_run_all); each test here kills one that survived (named in its
docstring). All are CPU-only, seeded and fast: bench_sampler's pipeline, its timing and its FLOP counts are
stubbed, so every figure in its rows is known exactly; unet_profile's trainer is a stand-in and its clock a fake."""

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
# Seconds per image per UNet step of each variant (stubbed), and the offset of its images from the reference.
SECONDS = {EAGER: 4.0, FAST: 1.0, COMPILED: 2.0, NO_GRAPH: 1.6}
OFFSET = {EAGER: 0.0, FAST: -0.25, COMPILED: 0.125, NO_GRAPH: 0.0625}
UNET_TFLOP, DECODE_TFLOP, PEAK_TFLOPS = 1.0, 0.5, 100.0  # per image


class GPUWork:
    """A clock whose time passes as a device's does: work queued by a call is done when synchronised."""

    def __init__(self):
        self.now, self.pending, self.calls = 10.0, 0.0, 0

    def perf_counter(self):
        return self.now

    def synchronize(self, device=None):
        self.now, self.pending = self.now + self.pending, 0.0

    def queue(self, seconds):
        self.calls += 1
        self.pending += seconds


# -- bench_sampler: the stubbed run --------------------------------------------------------------------------------

@pytest.fixture
def stubbed_sampler(monkeypatch, tmp_path):
    """bench_sampler.main with the pipeline, its timing, FLOP counts and (for --device cuda) the GPU's parts
    stubbed; returns a function running it that gives (JSON, record of the calls)."""
    seen = SimpleNamespace(loaded=[], timed=[], references=[], flops=[], written=[], released=0)
    pipe = SimpleNamespace(unet="eager UNet", set_progress_bar_config=lambda **kwargs: None)

    def load(model, device, dtype):
        seen.loaded.append((model, device.type, dtype))
        return pipe

    def references(pipe, horizon, batch, resolution, device):
        seen.references.append((horizon, batch))
        return torch.zeros(batch, 3, 2, 2)

    def unet_flops(pipe, batch, resolution):
        seen.flops.append(batch)
        return int(UNET_TFLOP * 1e12) * batch

    def time_variant(name, pipe, unet, horizon, batch, resolution, device, repeats, fast_attention="sdpa"):
        seen.timed.append(dict(name=name, unet=unet, horizon=horizon, batch=batch, resolution=resolution,
                               repeats=repeats, fast_attention=fast_attention))
        return SECONDS[name] * horizon * batch, torch.full((batch, 3, 2, 2), OFFSET[name])

    write_result = bench_sampler.write_result

    def write(name, result, out_dir=None, complete=True):
        seen.written.append((len(result["rows"]), complete))
        return write_result(name, result, out_dir, complete)

    def release(device):
        seen.released += 1

    monkeypatch.setattr(bench_sampler, "load_pipeline", load)
    monkeypatch.setattr(bench_sampler, "diffusers_images", references)
    monkeypatch.setattr(bench_sampler, "unet_call_flops", unet_flops)
    monkeypatch.setattr(bench_sampler, "decode_flops", lambda pipe, batch, res: int(DECODE_TFLOP * 1e12) * batch)
    monkeypatch.setattr(bench_sampler, "time_variant", time_variant)
    monkeypatch.setattr(bench_sampler, "write_result", write)
    monkeypatch.setattr(bench_sampler, "release_memory", release)
    # the GPU's parts, for --device cuda on this CPU-only machine
    monkeypatch.setattr(bench_sampler, "refuse_missing_cuda", lambda parser, device: None)
    monkeypatch.setattr(bench_sampler, "check_attention_backend", lambda backend, device: None)
    monkeypatch.setattr(bench_sampler, "matmul_rate", lambda device: {"flops_per_s": PEAK_TFLOPS * 1e12})
    monkeypatch.setattr(torch, "compile", lambda unet, **kwargs: "compiled UNet")

    def run(*argv):
        assert bench_sampler.main([*argv, "--out-dir", str(tmp_path)]) == 0
        return json.loads((tmp_path / "bench_sampler.json").read_text()), seen
    return run


def expected_row(name, horizon, batch, gpu):
    seconds = SECONDS[name] * horizon * batch
    tflop = UNET_TFLOP * batch * horizon + DECODE_TFLOP * batch
    row = {"variant": name, "horizon": horizon, "batch": batch, "seconds_per_call": pytest.approx(seconds),
           "images_per_second": pytest.approx(batch / seconds), "tflop_per_call": pytest.approx(tflop),
           "max_abs_pixel_diff_vs_diffusers_eager": pytest.approx(abs(OFFSET[name])),
           "speedup_vs_diffusers_eager": pytest.approx(SECONDS[EAGER] / SECONDS[name])}
    if gpu:
        row["mfu"] = pytest.approx(tflop / seconds / PEAK_TFLOPS)
    return row


def test_a_cpu_run_writes_eager_and_rlcm_fast_rows_h_major_with_their_figures(stubbed_sampler):
    """Mutants: the row's figures (`horizon` UNet calls -> horizon - 1 in its FLOPs, the decode's FLOPs dropped,
    TFLOP in 1e9, images/s as seconds/batch, the speedup as a slowdown, the pixel difference without abs(): an
    image darker than diffusers' read as equal), batch-major rows (check_claims reads them H-major under a time
    limit), the CPU defaults (tiny at 32 px, H 2,4, batches 1,8, fp32, 10 repeats, sdpa) changed, and
    "prompt_encoded_every_call" or the CPU's skipped entry dropped: what a reader of the JSON takes as measured."""
    result, seen = stubbed_sampler("--device", "cpu")
    order = [(name, h, b) for h in (2, 4) for b in (1, 8) for name in (EAGER, FAST)]
    assert result["rows"] == [expected_row(name, h, b, gpu=False) for name, h, b in order]
    assert seen.loaded == [("tiny", "cpu", torch.float32)]
    assert {(t["resolution"], t["repeats"], t["fast_attention"], t["unet"]) for t in seen.timed} == {
        (32, 10, "sdpa", "eager UNet")}
    assert (result["model"], result["resolution"], result["dtype"]) == ("tiny", 32, "float32")
    assert result["prompt_encoded_every_call"] is True and result["fast_attention_backend"] == "sdpa"
    assert [entry["row"] for entry in result["skipped"]] == ["diffusers+compile, rlcm-fast compiled"]
    assert "mfu" not in json.dumps(result["rows"]) and "matmul_rate" not in result


def test_a_gpu_run_orders_its_passes_for_check_claims_and_marks_only_the_last_write_complete(stubbed_sampler):
    """Mutants: the passes merged (diffusers + torch.compile timed in the first pass: a run cut short by
    check_claims' time limit lost batch 8's speedup), the compiled UNet given to other variants, every variant's
    speedup over the compiled row rather than eager, MFU in the wrong unit, "complete" true on a partial write
    or false on the last (check_claims calls a finished run partial, or a cut one whole), each group's reference
    images and FLOPs counted again in every pass, and the memory of a pass's group not released."""
    result, seen = stubbed_sampler("--device", "cuda", "--horizons", "4,8", "--batches", "1,2", "--repeats", "3",
                                   "--fast-attention", "cudnn")
    groups = [(h, b) for h in (4, 8) for b in (1, 2)]
    order = ([(name, h, b) for h, b in groups for name in (EAGER, FAST)] + [(COMPILED, h, b) for h, b in groups]
             + [(NO_GRAPH, h, b) for h, b in groups])
    assert result["rows"] == [expected_row(name, h, b, gpu=True) for name, h, b in order]
    assert [t["unet"] for t in seen.timed] == ["compiled UNet" if t["name"] == COMPILED else "eager UNet"
                                               for t in seen.timed]
    assert {(t["repeats"], t["fast_attention"]) for t in seen.timed} == {(3, "cudnn")}
    assert result["fast_attention_backend"] == "cudnn" and result["skipped"] == []
    assert (result["model"], result["resolution"], result["dtype"]) == ("sd15-lcm", 768, "bfloat16")
    assert seen.written == [(n, False) for n in range(1, len(order) + 1)] + [(len(order), True)]
    assert result["complete"] is True
    assert seen.references == groups and seen.flops == [b for h, b in groups]  # once per group, not per pass
    assert seen.released == 3 * len(groups)  # after each group of each pass


def test_horizons_and_batches_asked_for_are_the_ones_measured(stubbed_sampler):
    """Mutant: `args.batches or batches` -> the default batches: --batches 3 measured batches 1 and 8."""
    result, _ = stubbed_sampler("--device", "cpu", "--horizons", "3", "--batches", "3")
    assert [(r["variant"], r["horizon"], r["batch"]) for r in result["rows"]] == [(EAGER, 3, 3), (FAST, 3, 3)]


def test_the_default_fast_attention_is_the_pipelines_own():
    """Mutants: --fast-attention's default "sdpa" -> "cudnn" (every plain run's rlcm-fast rows on another
    attention than diffusers' rows, its claims marked not the default), and --repeats' documented 10 -> 5."""
    _, args = bench_sampler.parse_args([])
    assert (args.fast_attention, args.repeats) == ("sdpa", 10)
    assert "[--repeats 10]" in bench_sampler.__doc__


def test_cudnn_attention_on_a_cpu_is_refused_in_one_line(tmp_path, capsys):
    """Mutant: check_attention_backend's ValueError not turned into parser.error: a traceback, not one line."""
    with pytest.raises(SystemExit) as exit_info:
        bench_sampler.main(["--device", "cpu", "--fast-attention", "cudnn", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "attention_backend=cudnn needs a CUDA device, not cpu" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())


# -- bench_sampler: timing one variant -----------------------------------------------------------------------------

def test_a_call_is_timed_after_its_warm_ups_until_its_work_is_done_and_the_median_kept(monkeypatch):
    """Mutants: the warm-up calls skipped (the compile and capture timed), the median -> mean (one slow call moves
    it), the timed calls but the last dropped, and no synchronize between a call and the clock read (a GPU's queued
    work not timed: the call looked almost free)."""
    clock = GPUWork()
    monkeypatch.setattr(bench_sampler, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(bench_sampler, "synchronize", clock.synchronize)
    durations = iter([100.0, 100.0, 2.0, 5.0, 1.0])  # two warm-ups (compiles), then three timed calls
    seconds = bench_sampler.seconds_per_call(lambda: clock.queue(next(durations)), torch.device("cpu"), warmup=2,
                                             repeats=3)
    assert seconds == pytest.approx(2.0) and clock.calls == 5


def test_the_rows_without_a_graph_run_on_the_chosen_attention_and_the_pipeline_gets_its_unet_back(monkeypatch):
    """Mutants: --fast-attention applied to rlcm-fast's graphed rows only (its no-graph rows, the same sampler,
    on the pipeline's default), and the pipeline's eager UNet not put back after a compiled variant was timed
    (every later variant, and the next group's reference images, ran the compiled UNet); the CPU's one warm-up
    call -> none."""
    class Model:  # a UNet or VAE as time_variant sees it: its attention processors
        def __init__(self):
            self.attn_processors, self.restored = {"attn": "default"}, []

        def set_attn_processor(self, processors):
            self.restored.append(processors)

    eager = Model()
    pipe = SimpleNamespace(unet=eager, vae=Model())
    switched, warmups = [], []
    monkeypatch.setattr(bench_sampler, "set_attention_backend", lambda pipe, backend: switched.append(backend))
    monkeypatch.setattr(bench_sampler, "variant_call", lambda name, pipe, *args: lambda: torch.ones(1))
    monkeypatch.setattr(bench_sampler, "seconds_per_call",
                        lambda fn, device, warmup, repeats: warmups.append(warmup) or 0.5)
    for name in (NO_GRAPH, EAGER):
        seconds, images = bench_sampler.time_variant(name, pipe, "compiled UNet", 2, 1, 32, torch.device("cpu"), 1,
                                                     "cudnn")
        assert seconds == 0.5 and pipe.unet is eager
    assert eager.restored == pipe.vae.restored == [{"attn": "default"}]  # once: the no-graph row's switch undone
    assert switched == ["cudnn"] and warmups == [1, 1]


# -- bench_sampler: what each variant calls ------------------------------------------------------------------------

def test_both_variants_draw_the_same_images_so_their_pixel_difference_means_something(monkeypatch):
    """Mutants: rlcm-fast's seed 0 -> 1 or its guidance changed, diffusers' guidance changed: the pixel
    difference against diffusers' eager images (the bf16-tolerance claim) compared different images. And the
    no-graph row given a CUDA graph too (what the graph buys, unmeasured)."""
    made, calls = [], []

    class Sampler:
        def __init__(self, pipe, batch, horizon, guidance, compile, cuda_graph):
            made.append(dict(batch=batch, horizon=horizon, guidance=guidance, compile=compile, cuda_graph=cuda_graph))

        def clear_prompt_cache(self):
            pass

        def __call__(self, prompts, generator):
            calls.append(("rlcm-fast", len(prompts), generator.initial_seed(), made[-1]["guidance"]))
            return SimpleNamespace(images=torch.zeros(1))

    def pipe(prompts, num_inference_steps, guidance_scale, height, width, output_type, generator):
        calls.append(("diffusers", len(prompts), generator.initial_seed(), guidance_scale))
        assert (num_inference_steps, height, width, output_type) == (3, 32, 32, "pt")
        return SimpleNamespace(images=torch.zeros(1))

    monkeypatch.setattr(bench_sampler, "FastLCMSampler", Sampler)
    for name in (EAGER, FAST):
        bench_sampler.variant_call(name, pipe, 3, 2, 32, torch.device("cpu"))()
    assert calls[0][1:] == calls[1][1:] and calls[0][0] != calls[1][0]
    made.clear()
    for name in (FAST, NO_GRAPH):
        bench_sampler.variant_call(name, pipe, 3, 2, 32, torch.device("cuda"))
    assert [(m["compile"], m["cuda_graph"]) for m in made] == [(True, True), (True, False)]


# -- unet_profile: the summary -------------------------------------------------------------------------------------

def event(key, device, self_device_us=0.0, self_cpu_us=0.0, count=1):
    kind = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
    return SimpleNamespace(key=key, device_type=kind, self_device_time_total=self_device_us,
                           self_cpu_time_total=self_cpu_us, count=count, is_user_annotation=False)


def test_a_memset_is_a_copy_not_a_kernel():
    """Mutant: copies told by "Memcpy" alone: a Memset counted as a kernel, in kernel_ms, the busy fraction and
    the kernels table."""
    averages = [event("aten::zero_", False, self_device_us=200, self_cpu_us=10),
                event("Memset (Device)", True, self_device_us=200), event("fill_kernel", True, self_device_us=800)]
    summary = unet_profile.summarise(averages, wall_s=0.002, profiled_s=0.003, on_device=True)
    assert summary["copy_ms"] == pytest.approx(0.2) and summary["kernel_ms"] == pytest.approx(0.8)
    assert [row["name"] for row in summary["kernels"]] == ["fill_kernel"]


def test_a_call_timed_at_zero_has_no_busy_fraction_rather_than_a_zero_division():
    """Mutant: the `if summary["wall_ms"]` guard dropped: a ZeroDivisionError lost the row's whole profile."""
    averages = [event("aten::mm", False, self_device_us=500, self_cpu_us=10), event("gemm", True, self_device_us=500)]
    summary = unet_profile.summarise(averages, wall_s=0.0, profiled_s=0.001, on_device=True)
    assert summary["device_busy_fraction"] is None and summary["kernel_ms"] == pytest.approx(0.5)


def test_a_cpu_profile_carries_no_missing_cupti_note():
    """Mutant: the note's `on_device` test dropped: every CPU profile said "no GPU activity recorded (is CUPTI
    available?)", sending a reader to look for a fault where there is none."""
    summary = unet_profile.summarise([event("aten::add", False, self_cpu_us=30)], 0.001, 0.001, on_device=False)
    assert "note" not in summary
    assert "[" not in unet_profile.format_profile("fast", {"sampling_call": summary})


def test_a_call_is_timed_whole_unprofiled_then_profiled(monkeypatch):
    """Mutants: the wall time and the profiled time swapped (the profiler's overhead read as the call's own, the
    busy fraction computed against it), the unprofiled run not made, and its end not synchronised (a GPU's queued
    kernels outside the wall time, the busy fraction above 1)."""
    clock = GPUWork()
    monkeypatch.setattr(unet_profile, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(unet_profile, "synchronize", clock.synchronize)
    durations = iter([3.0, 5.0])  # unprofiled, then profiled
    summary = unet_profile.timed_profile(lambda: clock.queue(next(durations)), torch.device("cpu"))
    assert (summary["wall_ms"], summary["profiled_wall_ms"]) == (pytest.approx(3000.0), pytest.approx(5000.0))
    assert clock.calls == 2


def test_a_gpu_call_is_profiled_with_cuda_activity(monkeypatch):
    """Mutant: ProfilerActivity.CUDA dropped: a GPU's profile had no kernel events, and said CUPTI was missing."""
    asked = []

    class Profile:
        def __init__(self, activities):
            asked.append(activities)

        def __enter__(self):
            return SimpleNamespace(key_averages=lambda: [])

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(unet_profile, "profile", Profile)
    monkeypatch.setattr(unet_profile, "synchronize", lambda device: None)
    unet_profile.timed_profile(lambda: None, torch.device("cuda"))
    unet_profile.timed_profile(lambda: None, torch.device("cpu"))
    cpu, cuda = unet_profile.ProfilerActivity.CPU, unet_profile.ProfilerActivity.CUDA
    assert asked == [[cpu, cuda], [cpu]]


# -- unet_profile: the row's calls ---------------------------------------------------------------------------------

def stand_in_trainer(**overrides):
    """A trainer as profile_row uses it: a real config and minibatch plan, a sampler and UNet that record."""
    from rlcm_fast.call_sizes import resolve_call_sizes
    from rlcm_fast.config import resolve_config

    cfg = resolve_call_sizes(resolve_config(overrides={"device": "cpu", "horizon": 5, **overrides}), "cpu", 4)
    weight = torch.nn.Parameter(torch.ones(()))
    unet = torch.nn.Linear(1, 1)
    seen = SimpleNamespace(calls=[], autocast=0)

    class Sampler:
        horizon, trained_steps = 5, 4

        def sample(self, sample_unet, prompts, generator, decode):
            seen.calls.append(("sample", len(prompts), decode, unet.training))
            return SimpleNamespace(denoised=torch.zeros(len(prompts), 1), states=torch.zeros(len(prompts), 5, 1))

        def decode(self, latents):
            seen.calls.append(("decode", len(latents)))

        def prompt_embeddings(self, prompts):
            return torch.arange(len(prompts), dtype=torch.float32)[:, None]

        def action_log_probs(self, train_unet, states, sample_idx, step_idx, embeds):
            seen.calls.append(("train", sample_idx.tolist(), step_idx.tolist(), unet.training))
            return (weight * embeds[:, 0] + states[sample_idx, step_idx, 0],)

    class Autocast:
        def __enter__(self):
            seen.autocast += 1

        def __exit__(self, *exc):
            return False

    def zero_grad(set_to_none):
        weight.grad = None

    trainer = SimpleNamespace(cfg=cfg, sampler=Sampler(), device=torch.device("cpu"), unet=unet, sample_unet=unet,
                              train_unet=unet, prompt_set=["a", "b", "c"], autocast=Autocast,
                              optimizer=SimpleNamespace(zero_grad=zero_grad))
    unet.train()  # as a previous update left it
    return trainer, seen, weight


def test_the_profiled_calls_run_in_the_trainers_modes_under_its_autocast():
    """Mutants: the UNet not put in eval mode for sampling, or back in train mode for training (dropout and
    norms as the trainer would not run them), the autocast dropped from the training call (fp32 timed where
    the trainer runs bf16), and `unet_calls` taken from the trained steps rather than the horizon."""
    trainer, seen, weight = stand_in_trainer(sample_batch_size=2, train_batch_size=2, batches_per_epoch=2)
    profiled = unet_profile.profile_row(trainer)
    sampling = [call for call in seen.calls if call[0] == "sample"]
    training = [call for call in seen.calls if call[0] == "train"]
    assert sampling == [("sample", 2, False, False)] * 2 and all(call[-1] for call in training) and len(training) == 2
    assert seen.autocast == 4  # both runs of both calls
    assert profiled["sampling_call"]["unet_calls"] == 5 and weight.grad is None


def test_the_training_calls_rows_index_the_trajectories_just_drawn():
    """Mutant: the plan's sample indices (over the whole epoch's samples) not taken modulo the prompts of the
    one sampling call profiled: an epoch of 4 batches of 2 indexed past the 2 trajectories drawn."""
    trainer, seen, _ = stand_in_trainer(sample_batch_size=2, train_batch_size=2, batches_per_epoch=4,
                                        gradient_accumulation_steps=2, train_rows_per_call=16)
    sample_idx, step_idx = unet_profile.first_training_call(trainer)
    assert sample_idx.max() >= 2  # the plan's rows reach past the first sampling call's
    unet_profile.profile_row(trainer)
    training = [call for call in seen.calls if call[0] == "train"]
    assert training[0][1] == (sample_idx % 2).tolist() and training[0][2] == step_idx.tolist()
