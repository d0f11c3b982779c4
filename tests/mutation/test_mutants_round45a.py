"""Mutation-testing round 45a (benchmarks/bench_unet.py, benchmarks/bench_attention.py): hand-written mutants of
those modules were run against their tests (test_bench_unet, test_bench_attention, test_benchmark_cli, test_run_all,
test_mutants_round44f); each test here kills one or more that survived (named in its docstring). All are CPU-only,
seeded and fast: bench_unet's GPU run is played with a stand-in trainer and made-up timings (no model loads), the
timers are fed made-up clocks, and bench_attention's measured shapes are a few small ones."""

import json
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_attention  # noqa: E402
import bench_unet  # noqa: E402


def clock(monkeypatch, module, durations: list[float], events: list[str] | None = None) -> None:
    """`module`'s time.perf_counter as a made-up clock: each pair of reads (start, end) is `durations` apart."""
    reads = []
    for i, duration in enumerate(durations):
        reads += [10.0 * i, 10.0 * i + duration]
    reads = iter(reads)

    def perf_counter():
        if events is not None:
            events.append("clock")
        return next(reads)

    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=perf_counter, strftime=lambda *a: "",
                                                        gmtime=lambda: None))


# -- bench_unet: its command line ------------------------------------------------------------------------------

def test_bench_unet_defaults_are_the_documented_repeats_and_calls():
    """Mutants: --repeats' default 5 -> 3 and training:7 dropped from the default calls: the usage line and the
    docstring promise 5 timed calls and R = 2 and 7 training rows (7 is train_rows_per_call's row count, the one
    that decides that setting); a plain run silently measured less."""
    _, args = bench_unet.parse_args([])
    assert args.repeats == 5
    assert args.calls == [("training", 2), ("training", 7), ("sampling", 20), ("sampling", 4), ("decode", 4)]


# -- bench_unet: a GPU run, played on the CPU with a stand-in trainer and made-up timings ------------------------

# ms of each (call, variant, mode); the variants' speedups over the default eager row follow from them.
TIMES = {("default", "eager"): 10.0, ("default", "graph"): 5.0, ("channels_last", "eager"): 8.0,
         ("channels_last", "graph"): 4.0, ("cudnn_benchmark", "eager"): 12.5, ("cudnn_benchmark", "graph"): 5.0}


class StandInGpu:
    """bench_unet's GPU run with nothing measured: the trainer, its calls, FLOP counts and timings stood in for.
    `failures` maps (kind, variant, mode) to an exception the timing raises, or to a warning's text it warns."""

    def __init__(self, monkeypatch, tmp_path, failures=None):
        self.applied, self.repeats, self.released = [], [], 0
        self.variant = "default"
        self.failures = failures or {}
        self.out = tmp_path / "out"
        trainer = SimpleNamespace(device=torch.device("cpu"), cfg=SimpleNamespace(model="sd15-lcm", resolution=768),
                                  accelerator=SimpleNamespace(mixed_precision="bf16"))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(bench_unet, "Trainer", lambda cfg, run_dir: trainer)
        monkeypatch.setattr(bench_unet, "resolve_config", lambda overrides: overrides)
        monkeypatch.setattr(bench_unet, "environment", lambda: {"git_commit": "abc"})
        monkeypatch.setattr(bench_unet, "Calls", lambda trainer: self)
        monkeypatch.setattr(bench_unet, "apply_variant", self.apply_variant)
        monkeypatch.setattr(bench_unet, "counted_tflop", lambda call: 0.25 * call.batch)
        monkeypatch.setattr(bench_unet, "timed_ms", self.timed_ms)
        monkeypatch.setattr(bench_unet, "release_memory", lambda device: setattr(self, "released", self.released + 1))

    def apply_variant(self, trainer, switches):
        self.variant = next(name for name, named in bench_unet.VARIANTS.items() if named == switches)
        self.applied.append(self.variant)

    def make(self, kind, batch, graphed):
        return SimpleNamespace(kind=kind, batch=batch, mode="graph" if graphed else "eager")

    def timed_ms(self, call, repeats, device):
        self.repeats.append(repeats)
        failure = self.failures.get((call.kind, self.variant, call.mode))
        if isinstance(failure, BaseException):
            raise failure
        if failure is not None:
            warnings.warn(failure)
        return TIMES[self.variant, call.mode] * call.batch

    def run(self, *argv) -> dict:
        assert bench_unet.main(["--device", "cuda", "--out-dir", str(self.out), *argv]) == 0
        return json.loads((self.out / "bench_unet.json").read_text())


def test_a_gpu_run_times_each_variant_eager_and_graphed_with_its_speedup_over_the_default_eager_row(
        tmp_path, monkeypatch):
    """Mutants: the GPU's variants cut to the CPU's (cudnn_benchmark refused on a GPU), the graph mode dropped,
    each variant timed under the default switches, the baseline forgotten after the default eager row (every
    other row's speedup None) and the speedup inverted (ms / baseline: a faster variant shown as slower), the
    per-UNet-call time multiplied and also given to calls of one UNet call, and the FLOPs counted at batch 1 (the
    TFLOP/s of a batch of B understated B times): the figures that decide channels_last and cudnn_benchmark."""
    gpu = StandInGpu(monkeypatch, tmp_path)
    result = gpu.run("--variants", "default,channels_last,cudnn_benchmark", "--calls", "sampling:2,decode:1")
    rows = result["rows"]
    assert [(r["call"], r["batch"], r["variant"], r["mode"]) for r in rows] == [
        (kind, batch, variant, mode) for kind, batch in (("sampling", 2), ("decode", 1))
        for variant in ("default", "channels_last", "cudnn_benchmark") for mode in ("eager", "graph")]
    for row in rows:
        ms = TIMES[row["variant"], row["mode"]] * row["batch"]
        assert row["ms"] == ms and row["tflop"] == 0.25 * row["batch"]
        assert row["speedup_vs_default_eager"] == pytest.approx(TIMES["default", "eager"] * row["batch"] / ms)
        assert row.get("ms_per_unet_call") == (ms / bench_unet.SAMPLING_HORIZON if row["call"] == "sampling"
                                               else None)
    assert [r["speedup_vs_default_eager"] for r in rows[:6]] == pytest.approx([1.0, 2.0, 1.25, 2.5, 0.8, 2.0])
    assert result["complete"] and list(result["variants"]) == ["default", "channels_last", "cudnn_benchmark"]


def test_a_gpu_run_counts_flops_under_the_default_switches_and_leaves_them_at_their_defaults(tmp_path, monkeypatch):
    """Mutants: the default switches not set again before a call's FLOPs are counted (they were counted under the
    last variant of the call before) and not set back at the end (a caller's models, and the process-wide
    torch.backends.cudnn.benchmark, left in the last variant)."""
    gpu = StandInGpu(monkeypatch, tmp_path)
    gpu.run("--variants", "default,channels_last", "--calls", "decode:1,sampling:2")
    assert gpu.applied == ["default", "default", "channels_last", "default", "default", "channels_last", "default"]


def test_a_gpu_run_records_its_repeats_and_bf16_autocast_and_passes_the_repeats_to_each_timing(tmp_path, monkeypatch):
    """Mutants: the result's "repeats" and the repeats each timing gets fixed at 5 (--repeats ignored, its JSON
    saying what was not run) and the precision's " autocast" dropped (bf16 autocast read as bf16 weights)."""
    gpu = StandInGpu(monkeypatch, tmp_path)
    result = gpu.run("--variants", "default", "--calls", "decode:1", "--repeats", "2")
    assert result["repeats"] == 2 and gpu.repeats == [2, 2]
    assert result["precision"] == "bf16 autocast" and result["model"] == "sd15-lcm" and result["resolution"] == 768


def test_a_failed_or_fallen_back_row_is_recorded_with_its_whole_error_and_the_run_goes_on(tmp_path, monkeypatch,
                                                                                        capsys):
    """Mutants: the "without CUDA graphs" fallback not looked for, or found and not raised (the sampler's eager
    time recorded as a graph's), `except RuntimeError` narrowed (an out-of-memory ended the run), the error cut
    at 30 characters rather than 300 (the allocation size lost), an error row left out of the JSON and its line
    not printed: a row's failure is its result, said where the user looks."""
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.25 GiB. GPU 0 has a total capacity of 79.1 GiB")
    fallback = "capture failed (operation not permitted when stream is capturing); sampling goes on without CUDA graphs"
    uncaptured = "training calls of (2, 4, 96, 96) could not be captured as CUDA graphs (x); they run without them"
    gpu = StandInGpu(monkeypatch, tmp_path, failures={("sampling", "default", "graph"): fallback,
                                                      ("sampling", "channels_last", "eager"): oom,
                                                      ("training", "default", "graph"): uncaptured})
    rows = gpu.run("--variants", "default,channels_last", "--calls", "sampling:2,training:1")["rows"]
    errors = [(r["call"], r["variant"], r["mode"], r.get("error")) for r in rows if "ms" not in r]
    assert errors == [("sampling", "default", "graph", f"RuntimeError: {fallback}"),
                      ("sampling", "channels_last", "eager", f"RuntimeError: {oom}"),
                      ("training", "default", "graph", f"RuntimeError: {uncaptured}")]
    assert len(rows) == 8 and all("error" not in r for r in rows if "ms" in r)
    assert gpu.released == 8  # each row's memory given back, a failed one's too
    assert f"sampling 2 channels_last eager: RuntimeError: {oom}" in capsys.readouterr().out.splitlines()


def test_a_gpu_run_cut_short_keeps_the_rows_it_measured_marked_partial(tmp_path, monkeypatch):
    """Mutants: the JSON not written after each row, or written as complete: a run stopped by check_claims' time
    limit (here a Ctrl-C in the third row) lost every row it had, or passed for a whole run."""
    gpu = StandInGpu(monkeypatch, tmp_path, failures={("decode", "channels_last", "eager"): KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        gpu.run("--variants", "default,channels_last", "--calls", "decode:1")
    result = json.loads((gpu.out / "bench_unet.json").read_text())
    assert result["complete"] is False
    assert [(r["variant"], r["mode"], r["ms"]) for r in result["rows"]] == [("default", "eager", 10.0),
                                                                         ("default", "graph", 5.0)]


def test_a_fallen_back_graph_row_is_an_error_even_when_the_user_ignores_warnings(tmp_path, monkeypatch):
    """Mutant: the "always" filter dropped inside the row's catch_warnings: under `python -W ignore` (or
    PYTHONWARNINGS=ignore) the capture's fallback warning was never seen, and the eager time it ran at was
    recorded as the CUDA graph's."""
    fallback = "capture failed; sampling goes on without CUDA graphs"
    gpu = StandInGpu(monkeypatch, tmp_path, failures={("decode", "default", "graph"): fallback})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = gpu.run("--variants", "default", "--calls", "decode:1")["rows"]
    assert [(r["mode"], r.get("ms"), r.get("error")) for r in rows] == [("eager", 10.0, None),
                                                                      ("graph", None, f"RuntimeError: {fallback}")]


def test_the_default_switches_put_sdpas_own_attention_processors_back():
    """Mutant: apply_variant's default attention backend "cudnn" for "sdpa": after the cudnn_attention variant, the
    default and channels_last rows (and the FLOP counts) kept running cuDNN-first attention."""
    from rlcm_fast.attention import CudnnFirstAttnProcessor
    from rlcm_fast.models import load_pipeline

    pipe = load_pipeline("tiny")
    trainer = SimpleNamespace(pipe=pipe)

    def processors():
        return {type(p) for model in (pipe.unet, pipe.vae) for p in model.attn_processors.values()}

    bench_unet.apply_variant(trainer, bench_unet.VARIANTS["cudnn_attention"])
    assert processors() == {CudnnFirstAttnProcessor}
    bench_unet.apply_variant(trainer, bench_unet.VARIANTS["default"])
    assert CudnnFirstAttnProcessor not in processors()


def test_a_variant_named_before_default_still_gets_its_speedup_over_default(tmp_path, monkeypatch):
    """Found while checking the baseline mutant: `--variants channels_last,default` measured both, but the
    channels_last rows ran before the default eager row existed, so their speedup was None (the README's
    "vs default eager" column empty) although the run had the default's time."""
    gpu = StandInGpu(monkeypatch, tmp_path)
    rows = gpu.run("--variants", "channels_last,default", "--calls", "decode:1")["rows"]
    speedups = {(r["variant"], r["mode"]): r["speedup_vs_default_eager"] for r in rows}
    assert speedups[("channels_last", "eager")] == pytest.approx(1.25)


# -- bench_unet: its timer, FLOP count and thread --------------------------------------------------------------

def test_timed_ms_is_the_median_in_ms_of_the_synchronised_calls_after_two_warm_ups(monkeypatch):
    """Mutants: one warm-up call (the first timed call then searched cuDNN's algorithms or captured the graph),
    the mean for the median (one slow call moved the figure), seconds * 1e6 (ms off by 1000) and the synchronize
    after the call dropped (a GPU's queued work not timed)."""
    events = []
    clock(monkeypatch, bench_unet, [0.001, 0.003, 0.010], events)
    monkeypatch.setattr(bench_unet, "synchronize", lambda device: events.append("sync"))
    ms = bench_unet.timed_ms(lambda: events.append("call"), 3, torch.device("cpu"))
    assert ms == pytest.approx(3.0)
    assert events == ["call", "call"] + ["sync", "clock", "call", "sync", "clock"] * 3


def test_counted_tflop_is_in_tflop():
    """Mutant: the FLOP count divided by 1e9 (GFLOP shown as TFLOP, the TFLOP/s column 1000 times too high)."""
    a, b = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)), torch.randn(32, 16)
    assert bench_unet.counted_tflop(lambda: a @ b) == pytest.approx(2 * 64 * 32 * 16 / 1e12)


def test_a_measurement_that_is_interrupted_on_its_thread_is_interrupted_here():
    """Mutant: `except BaseException` narrowed to Exception in on_own_thread: a KeyboardInterrupt or SystemExit in
    the measurement ended only its thread (a traceback printed) and the caller got a KeyError for its value."""
    with pytest.raises(KeyboardInterrupt):
        bench_unet.on_own_thread(lambda: (_ for _ in ()).throw(KeyboardInterrupt()))


# -- bench_attention: its command line and shapes --------------------------------------------------------------

def test_bench_attention_defaults_are_the_documented_batches_and_train_rows_and_none_may_be_given():
    """Mutants: --batches' default 8 -> 4, --train-rows' default 2,7 -> 2 (the docstring's sampling batch 8 and
    training calls of 2 and 7 rows), and --train-rows '' refused though its help says "'' for none"."""
    _, args = bench_attention.parse_args([])
    assert args.batches == (8,) and args.train_rows == (2, 7)
    assert bench_attention.parse_args(["--train-rows", ""])[1].train_rows == ()


def test_recording_the_shapes_puts_torchs_attention_back_even_when_the_model_fails():
    """Mutants: F.scaled_dot_product_attention not put back, or put back only when the forward succeeds: every
    later attention call in the process (the timings, or a caller's model) went through the recorder."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    from rlcm_fast.architectures import TINY

    bench_attention.attention_shapes(TINY, 32)
    assert torch.nn.functional.scaled_dot_product_attention is sdpa
    broken = SimpleNamespace(unet=TINY.unet, vae={**TINY.vae, "latent_channels": 3})  # decodes no UNet latents
    with pytest.raises(RuntimeError, match="channel"):
        bench_attention.attention_shapes(broken, 32)
    assert torch.nn.functional.scaled_dot_product_attention is sdpa


# -- bench_attention: timing a shape ---------------------------------------------------------------------------

def test_median_ms_on_a_cpu_is_the_median_in_ms_of_five_calls_after_a_warm_up(monkeypatch):
    """Mutants: the warm-up call dropped, one timed call for five, the fastest call for the median and ms * 1000:
    the per-shape figure every per-call sum adds up."""
    calls = []
    clock(monkeypatch, bench_attention, [0.004, 0.001, 0.002, 0.010, 0.003])
    assert bench_attention.median_ms(lambda: calls.append(1), torch.device("cpu"), []) == pytest.approx(3.0)
    assert len(calls) == 6


def test_a_shape_times_the_backend_sdpa_picks_with_the_keys_it_has_and_its_backward(monkeypatch):
    """Mutants: the backend SDPA picks not timed when it is not in the list (on a GPU: math, for a shape no fused
    kernel takes, left out of the default's sum), the keys made as long as the queries (a cross-attention timed
    as self-attention), the backward not run for forward_backward, and TFLOP/s off by 1000 (flops / ms, or
    / 1e9)."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        seen.append((query, tuple(key.shape)))
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    monkeypatch.setattr(bench_attention, "median_ms", lambda fn, device, grads: (fn(), 4.0)[1])
    row = bench_attention.time_shape(2, (2, 16, 7, 8), True, torch.device("cpu"), torch.float32, ["math"])
    assert row["default_choice"] == "flash" and set(row["ms"]) == {"math", "flash"}
    assert {shape for _, shape in seen} == {(2, 2, 7, 8)}
    assert all(query.grad is not None for query, _ in seen)
    assert row["tflops"]["math"] == pytest.approx(row["gflop"] / 4.0)  # GFLOP per ms is TFLOP/s


def test_the_cudnn_first_choice_is_asked_with_cudnn_first(monkeypatch):
    """Mutants: chosen() ignoring its priority, and time_shape's cuDNN-first choice asked without it: the
    "cudnn first" column then repeated the default's. A CPU's SDPA ignores the priority, so its dispatcher is
    stood in for by one that picks the first backend of the priority order in force, as a GPU's does."""
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda query, key, value: torch._C._get_sdp_priority_order()[0])
    monkeypatch.setattr(bench_attention, "median_ms", lambda fn, device, grads: (fn(), 1.0)[1])
    row = bench_attention.time_shape(1, (1, 8, 8, 4), False, torch.device("cpu"), torch.float32, ["flash"])
    assert (row["default_choice"], row["cudnn_first_choice"]) == ("flash", "cudnn")
    assert row["no_kernel"] == ["cudnn"]  # asked for, as SDPA would pick it: no kernel on a CPU


def test_the_cudnn_first_sum_follows_the_cudnn_first_choice():
    """Mutant: the cuDNN-first total summed the default choice's times. On a CPU both choices are flash, so the
    CPU run cannot see it; on a GPU it is the figure that says what attention_backend: cudnn buys."""
    rows = [{"default_choice": "flash", "cudnn_first_choice": "cudnn", "ms": {"flash": 2.0, "cudnn": 1.5}},
            {"default_choice": "efficient", "cudnn_first_choice": "efficient", "ms": {"efficient": 3.0, "cudnn": 4.0}}]
    totals = bench_attention.call_totals(rows, [2, 1])
    assert totals["default"] == 7.0 and totals["cudnn_first"] == 6.0 and totals["fastest"] == 6.0


# -- bench_attention: a run ------------------------------------------------------------------------------------

def stand_in_attention(monkeypatch, interrupt_at=None):
    """bench_attention's run on two made-up shapes: time_shape returns a row of its arguments (a KeyboardInterrupt
    at call number `interrupt_at`)."""
    shapes = {"unet": bench_attention.Counter({(2, 16, 16, 8): 2}), "vae_decode": bench_attention.Counter(
        {(1, 16, 16, 8): 1})}
    monkeypatch.setattr(bench_attention, "attention_shapes", lambda spec, resolution: shapes)
    monkeypatch.setattr(bench_attention, "environment", lambda: {"git_commit": "abc"})
    calls = []

    def time_shape(batch, shape, backward, device, dtype, backends):
        calls.append(batch)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return {"batch": batch, "default_choice": "flash", "cudnn_first_choice": "flash", "ms": {"flash": 1.0}}

    monkeypatch.setattr(bench_attention, "time_shape", time_shape)


def test_a_cpu_run_records_its_dtype_without_torchs_prefix(tmp_path, monkeypatch):
    """Mutant: "torch.float32" for "float32" (the README's and claims.md's headings say "tiny at 32 px,
    torch.float32", unlike every other benchmark's)."""
    stand_in_attention(monkeypatch)
    assert bench_attention.main(["--device", "cpu", "--batches", "1", "--train-rows", "", "--out-dir",
                                 str(tmp_path)]) == 0
    assert json.loads((tmp_path / "bench_attention.json").read_text())["dtype"] == "float32"


def test_a_run_cut_short_keeps_the_groups_it_measured_marked_partial(tmp_path, monkeypatch):
    """Mutants: the JSON not written after each group, or written as complete: a run stopped in its second group
    lost the first, or passed for a whole run."""
    stand_in_attention(monkeypatch, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        bench_attention.main(["--device", "cpu", "--batches", "1", "--train-rows", "3", "--out-dir", str(tmp_path)])
    result = json.loads((tmp_path / "bench_attention.json").read_text())
    assert result["complete"] is False
    assert [(g["model_part"], g["batch"], g["pass"]) for g in result["groups"]] == [("unet", 3, "forward_backward")]


def test_call_totals_of_a_shape_no_backend_ran_are_none_not_a_traceback():
    """Not a mutant: a shape whose every backend failed (out of memory, say) has no times, and min() over them was a
    ValueError traceback after the whole measurement; the totals that need that shape are None instead."""
    rows = [{"default_choice": "flash", "cudnn_first_choice": "cudnn", "ms": {"flash": 1.0, "cudnn": 2.0}},
            {"default_choice": "flash", "cudnn_first_choice": "cudnn", "ms": {}}]
    totals = bench_attention.call_totals(rows, [1, 3])
    assert totals["fastest"] is None and totals["default"] is None and totals["cudnn_first"] is None
    assert bench_attention.call_totals(rows[:1], [2])["fastest"] == 2.0
