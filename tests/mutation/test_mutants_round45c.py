"""Mutation-testing round 45c (benchmarks/bench_unet.py, benchmarks/bench_attention.py), a second round over the
modules of round 45a by another helper with its own mutants: those that survived the modules' tests and round 45a's
file are killed here (each named in its test's docstring). All are CPU-only, seeded and fast: bench_unet's
measurement loop runs as on a GPU (eager and graph modes) on a stubbed trainer, stubbed calls and a stubbed timer,
so every recorded figure is known exactly; its calls and bench_attention's shapes are built for real on the tiny
model."""

import json
import sys
import threading
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_attention  # noqa: E402
import bench_unet  # noqa: E402

from rlcm_fast.architectures import SD15_LCM, TINY  # noqa: E402
from rlcm_fast.config import resolve_config  # noqa: E402
from rlcm_fast.trainer import Trainer  # noqa: E402


class Clock:
    """A perf_counter that moves only when a stubbed call says time passed; each reading is logged."""

    def __init__(self, log):
        self.now, self.log = 100.0, log

    def __call__(self):
        self.log.append("clock")
        return self.now


class Stop(Exception):
    """Raised by a stub to end a run once what the test looks at is decided."""


# -- the command lines' defaults and messages -------------------------------------------------------------------


def test_a_bad_call_is_refused_with_the_rule_for_its_batch(capsys):
    """Mutant: the --calls error without "batch a positive integer": `--calls decode:0` was refused without
    saying what is wrong with it."""
    with pytest.raises(SystemExit) as exit_info:
        bench_unet.parse_args(["--calls", "decode:0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "--calls 'decode:0' is invalid: expected kind:batch pairs, comma-separated, kind one of training, sampling, "
        "decode, batch a positive integer")


@pytest.mark.parametrize("module", [bench_unet, bench_attention])
def test_with_no_device_named_a_run_takes_cuda_where_it_is_and_the_cpu_elsewhere(monkeypatch, tmp_path, module):
    """Mutant (both scripts): the default device swapped, `cpu` where CUDA is and `cuda` where it is not. A plain
    `python benchmarks/bench_unet.py` on a GPU machine then measured the CPU smoke test, and on a CPU machine
    was refused. The measurement itself is stubbed; what it is asked to measure is recorded."""
    seen = []
    if module is bench_unet:
        monkeypatch.setattr(bench_unet, "measure", lambda args, variants, calls, gpu, run_dir: seen.append(
            (args.device, gpu, variants)) or 0)
    else:
        def shapes(spec, resolution):
            seen.append(spec)
            raise Stop  # before any timing: the device is already chosen
        monkeypatch.setattr(bench_attention, "attention_shapes", shapes)
    for available in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        try:
            assert module.main(["--out-dir", str(tmp_path)]) == 0
        except Stop:
            pass
    if module is bench_unet:
        assert seen == [("cpu", False, list(bench_unet.CPU_VARIANTS)), ("cuda", True, list(bench_unet.VARIANTS))]
    else:
        assert seen == [TINY, SD15_LCM]


# -- bench_unet: a measurement on its own thread, timed ---------------------------------------------------------

def test_the_measurement_thread_is_a_daemon_and_hands_back_a_ctrl_c():
    """Mutants: the thread not a daemon (Ctrl-C, check_claims' stop, waited for the measurement to end, and an
    interpreter exit waited too), and `except BaseException` -> `except Exception` (a KeyboardInterrupt raised in
    the measurement died with its thread and came back here as a KeyError on the missing value)."""
    assert bench_unet.on_own_thread(lambda: threading.current_thread().daemon) is True
    assert bench_unet.on_own_thread(lambda: threading.current_thread() is threading.main_thread()) is False

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        bench_unet.on_own_thread(interrupted)


# -- bench_unet: the calls, built on the tiny trainer -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_trainer(tmp_path_factory):
    torch.manual_seed(0)
    return Trainer(resolve_config(overrides={"device": "cpu", "grid_every": 0}), tmp_path_factory.mktemp("run"))


def test_a_training_call_keeps_its_gradients_allocated_and_runs_the_backward(tiny_trainer):
    """Mutants: the gradients not allocated when the call is made, zero_grad(set_to_none=True) (both make the
    timed call allocate gradients, as the trainer, which keeps them allocated, does not) and the backward dropped
    (a training row timed as a forward only)."""
    params = tiny_trainer.params
    for p in params:
        p.grad = None
    training = bench_unet.Calls(tiny_trainer).make("training", 2, graphed=False)
    grads = [p.grad for p in params]
    assert all(g is not None and not g.any() for g in grads)
    backwards = []
    handle = params[0].register_hook(lambda grad: backwards.append(grad.abs().sum().item()))
    try:
        training()
    finally:
        handle.remove()
    assert len(backwards) == 1
    assert all(p.grad is g and not g.any() for p, g in zip(params, grads))


# -- bench_unet: the measurement loop as on a GPU, every part stubbed ------------------------------------------

# Eager ms of (call, variant); a graph replay takes half. None: the call fails (RuntimeError) in that mode.
TIMES = {("training", "default"): 10.0, ("training", "channels_last"): 8.0,
         ("sampling", "default"): 20.0, ("sampling", "channels_last"): 16.0}
LONG_ERROR = "CUDA out of memory.\nTried to allocate " + "x" * 400


class FakeCalls:
    """bench_unet.Calls: each call made records what it was made as, and under which switches."""

    def __init__(self, state):
        self.state = state

    def __call__(self, trainer):
        return self

    def make(self, kind, batch, graphed):
        return SimpleNamespace(kind=kind, batch=batch, graphed=graphed, switches=self.state["switches"])


@pytest.fixture
def stubbed_gpu_run(monkeypatch, tmp_path):
    """bench_unet.measure with gpu=True on a stubbed trainer: every row's ms is TIMES' (halved for a graph
    replay); training with channels_last falls back from its graph (the CUDA graph warning), sampling's default
    fails eagerly with a long two-line RuntimeError and sampling with channels_last falls back from its graph
    (the sampler's warning)."""
    state = {"switches": None, "applied": [], "timed": [], "counted": [], "released": 0, "partial": [],
             "configs": []}
    trainer = SimpleNamespace(device=torch.device("cpu"), cfg=SimpleNamespace(model="sd15-lcm", resolution=768),
                              accelerator=SimpleNamespace(mixed_precision="bf16"))

    def apply_variant(trainer, switches):
        state["switches"] = switches
        state["applied"].append(switches)

    def timed_ms(call, repeats, device):
        path = tmp_path / "bench_unet.json"
        state["partial"].append(json.loads(path.read_text()) if path.exists() else None)
        variant = next(name for name, switches in bench_unet.VARIANTS.items() if switches is call.switches)
        state["timed"].append((call.kind, call.batch, variant, call.graphed, repeats))
        if call.graphed and variant == "channels_last":
            warnings.warn("the call could not be captured" if call.kind == "training"
                          else "capture failed; sampling goes on without CUDA graphs")
        if (call.kind, variant, call.graphed) == ("sampling", "default", False):
            raise RuntimeError(LONG_ERROR)
        return TIMES[call.kind, variant] / (2 if call.graphed else 1)

    def counted_tflop(call):
        state["counted"].append((call.kind, call.graphed))
        return 0.5 * call.batch

    def release_memory(device):
        state["released"] += 1

    monkeypatch.setattr(bench_unet, "Trainer", lambda cfg, run_dir: trainer)
    monkeypatch.setattr(bench_unet, "resolve_config", lambda overrides: state["configs"].append(overrides))
    monkeypatch.setattr(bench_unet, "Calls", FakeCalls(state))
    monkeypatch.setattr(bench_unet, "apply_variant", apply_variant)
    monkeypatch.setattr(bench_unet, "timed_ms", timed_ms)
    monkeypatch.setattr(bench_unet, "counted_tflop", counted_tflop)
    monkeypatch.setattr(bench_unet, "release_memory", release_memory)
    monkeypatch.setattr(bench_unet, "environment", lambda: {"device": "stub"})

    def run():
        args = SimpleNamespace(repeats=3, out_dir=tmp_path)
        assert bench_unet.measure(args, ["default", "channels_last"], [("training", 2), ("sampling", 4)], True,
                                  tmp_path / "run") == 0
        return json.loads((tmp_path / "bench_unet.json").read_text()), state
    return run


def test_each_call_is_timed_eager_then_graphed_under_each_variant_in_turn(stubbed_gpu_run):
    """Mutants: graph before eager, the eager rows built graphed (`graphed=gpu`), the FLOPs counted on a graphed
    call (a replay runs no ATen op to count), the variant's switches not applied before its rows, the repeats
    recorded as 5 whatever --repeats said, the models not put back to the default at the end, and bf16 recorded
    as "bf16" rather than "bf16 autocast"."""
    result, state = stubbed_gpu_run()
    assert result["complete"] and result["precision"] == "bf16 autocast" and result["repeats"] == 3
    assert result["model"] == "sd15-lcm" and result["resolution"] == 768
    assert state["configs"] == [{**bench_unet.GPU_CONFIG, "grid_every": 0}]
    assert [(r["call"], r["batch"], r["variant"], r["mode"]) for r in result["rows"]] == [
        (call, batch, variant, mode) for call, batch in (("training", 2), ("sampling", 4))
        for variant in ("default", "channels_last") for mode in ("eager", "graph")]
    assert state["timed"] == [(call, batch, variant, mode == "graph", 3) for call, batch, variant, mode in (
        (r["call"], r["batch"], r["variant"], r["mode"]) for r in result["rows"])]
    assert state["counted"] == [("training", False), ("sampling", False)]
    assert state["applied"][-1] == {}
    assert [r["tflop"] for r in result["rows"]] == [1.0] * 4 + [2.0] * 4


def test_a_rows_ms_speedup_and_rate_against_the_default_eager_row_of_its_call(stubbed_gpu_run):
    """Mutants: the speedup inverted (ms / baseline), a call with no default eager time given the default graph's
    as its baseline, or a speedup of 1.0 rather than none, and ms_per_unet_call written on rows that make one
    UNet call (training)."""
    result, _ = stubbed_gpu_run()
    rows = {(r["call"], r["variant"], r["mode"]): r for r in result["rows"]}
    assert rows["training", "default", "eager"]["speedup_vs_default_eager"] == 1.0
    assert rows["training", "default", "graph"]["speedup_vs_default_eager"] == pytest.approx(2.0)
    assert rows["training", "channels_last", "eager"]["speedup_vs_default_eager"] == pytest.approx(10 / 8)
    assert rows["training", "default", "graph"]["tflops_per_s"] == pytest.approx(1.0 / 5e-3)
    assert all("ms_per_unet_call" not in r for (call, *_), r in rows.items() if call == "training")
    # Sampling's default eager row failed: no row of that call has a speedup to give.
    assert rows["sampling", "default", "graph"]["ms"] == 10.0
    assert rows["sampling", "default", "graph"]["speedup_vs_default_eager"] is None
    assert rows["sampling", "channels_last", "eager"]["speedup_vs_default_eager"] is None
    assert rows["sampling", "default", "graph"]["ms_per_unet_call"] == pytest.approx(10.0 / 2)


# -- bench_attention: the shapes, the timer and one shape's row ------------------------------------------------


def test_a_backward_row_times_the_backward_and_clears_the_gradients_of_q_k_v(monkeypatch):
    """Mutants: the backward dropped from a forward_backward row's call (timed as a forward), and the inputs not
    passed as the gradients do_bench clears between calls (each call then accumulated into the last's). The
    timer is stubbed: it runs the call once and looks at what it was given."""
    seen = []

    def median_ms(fn, device, grads):
        fn()
        seen.append((len(grads), [g.grad is not None for g in grads]))
        return 2.0
    monkeypatch.setattr(bench_attention, "median_ms", median_ms)
    row = bench_attention.time_shape(1, (2, 4, 6, 8), True, torch.device("cpu"), torch.float32, ["flash", "math"])
    assert set(row["ms"]) == {"flash", "math"} and seen == [(3, [True] * 3)] * 2
    assert row["tflops"]["flash"] == pytest.approx(4 * 2 * 4 * 6 * 8 * 3 / 2e-3 / 1e12)
    bench_attention.time_shape(1, (2, 4, 6, 8), False, torch.device("cpu"), torch.float32, ["flash"])
    assert seen[-1] == (0, [])


# -- bench_attention: per-call sums, and a run on stubbed shapes -----------------------------------------------


def test_a_run_writes_each_group_as_it_goes_with_its_layer_counts_in_shape_order(monkeypatch, tmp_path):
    """Mutants: the partial write after each group dropped, release_memory after each group dropped, the layer
    counts sorted (out of step with the rows, so each shape's time was weighed by another's count) and the
    backends recorded as the GPU's. The shapes are stubbed: two small ones, the first in two layers."""
    shapes = {"unet": Counter({(2, 4, 4, 8): 2, (2, 4, 3, 8): 1}), "vae_decode": Counter({(1, 4, 4, 8): 1})}
    monkeypatch.setattr(bench_attention, "attention_shapes", lambda spec, resolution: shapes)
    writes, released = [], []
    write_result = bench_attention.write_result

    def recording(name, result, out_dir=None, complete=True):
        writes.append((len(result["groups"]), complete))
        return write_result(name, result, out_dir, complete)
    monkeypatch.setattr(bench_attention, "write_result", recording)
    monkeypatch.setattr(bench_attention, "release_memory", lambda device: released.append(device))
    assert bench_attention.main(["--device", "cpu", "--batches", "1", "--train-rows", "1",
                                 "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_attention.json").read_text())
    assert writes == [(1, False), (2, False), (3, False), (3, True)] and len(released) == 3
    assert result["backends"] == ["flash", "math", "cudnn"]
    for group in result["groups"][:2]:
        assert [(r["heads"], r["query_tokens"], r["key_tokens"]) for r in group["rows"]] == [(2, 4, 4), (2, 4, 3)]
        assert group["layer_counts"] == [2, 1]
        flash = [r["ms"]["flash"] for r in group["rows"]]
        assert group["ms_per_call"]["flash"] == pytest.approx(2 * flash[0] + flash[1])
