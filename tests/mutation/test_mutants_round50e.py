"""Mutation-testing round 50e (benchmarks/training_memory.py, benchmarks/bench_step.py), a second round over them
after 45b: hand-written mutants of those scripts were run against their tests (test_training_memory, the scripts'
rows of test_benchmark_cli, test_run_all and test_check_claims, test_mutants_round45b); each test here kills one
that survived (named in its docstring). All are CPU-only, seeded and fast: training_memory's Trainer is a stub
around a tiny traced sampler, and bench_step's CUDA parts are replaced by CPU stand-ins around the plain-PyTorch
step."""

import contextlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlcm_fast.policy_step import policy_step_reference

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_step  # noqa: E402
import training_memory  # noqa: E402
from test_mutants_round45b import cpu_inputs  # noqa: E402 - bench_step.make_inputs on the CPU


# -- training_memory: what a training forward saves --------------------------------------------------------------

class SlicingSampler:
    """A sampler of 2 trained steps at 16 px (4x2x2 latents) whose log-prob multiplies a slice of an activation by
    a trainable (4, 1) weight: the product saves the slice, a view that keeps the whole activation alive."""

    trained_steps, resolution = 2, 16

    def prompt_embeddings(self, prompts):
        return torch.zeros(1, 3, 4)

    def action_log_probs(self, unet, states, sample_idx, step_idx, embeds):
        x = states[sample_idx, step_idx].flatten(1) * 2  # (rows, 16) float32: 64 bytes a row
        return (x[:, :4] @ unet.lora).sum(1)  # saves x[:, :4]: 16 bytes a row of view, 64 of storage


def slicing_trainer():
    unet = torch.nn.Module()
    unet.lora = torch.nn.Parameter(torch.randn(4, 1, generator=torch.Generator().manual_seed(0)))
    pipe = SimpleNamespace(vae_scale_factor=8, unet=SimpleNamespace(config=SimpleNamespace(in_channels=4)))
    return SimpleNamespace(sampler=SlicingSampler(), prompt_set=["a cat"], pipe=pipe, device=torch.device("cpu"),
                           autocast=contextlib.nullcontext, train_unet=unet)


def test_a_saved_view_counts_the_whole_storage_it_keeps_alive():
    """Mutant: a saved tensor counted by its own bytes (numel * element_size) rather than its storage's. Autograd
    keeping a slice keeps the whole activation in memory, so the figure a user sizes train_rows_per_call with
    would have been too small (here a quarter) wherever the UNet saves a view (a chunk, a split head)."""
    trainer = slicing_trainer()
    for rows in (1, 3):
        saved, casts = training_memory.saved_for_backward_bytes(trainer, rows)
        assert (saved, casts) == (64 * rows, 0)


# -- training_memory: the sampling loop and the decode ------------------------------------------------------------

class GradSampler:
    """A sampler at 16 px whose loop and decode multiply a fresh activation (64 bytes an image) by a trainable
    weight and scale the product: without gradient the fresh activation is freed at once (peak 128 bytes an image),
    with it autograd keeps it for a backward (192). It records how it was asked to sample."""

    resolution = 16

    def __init__(self):
        self.weight = torch.nn.Parameter(torch.ones(4, 1, 1))
        self.calls = []

    def prompt_embeddings(self, prompts):
        return torch.zeros(len(prompts), 3, 4)

    def sample(self, unet, prompts, decode=True):
        self.calls.append((len(prompts), decode))
        return (torch.randn(len(prompts), 4, 2, 2) * self.weight) * 3

    def decode(self, latents):
        return ((latents * 2) * self.weight) * 3


def grad_trainer():
    pipe = SimpleNamespace(vae_scale_factor=8, unet=SimpleNamespace(config=SimpleNamespace(in_channels=4)))
    return SimpleNamespace(sampler=GradSampler(), prompt_set=["a cat"], pipe=pipe, device=torch.device("cpu"),
                           autocast=contextlib.nullcontext, unet=torch.nn.Identity())


def test_the_sampling_loop_is_traced_without_gradient_and_without_its_decode():
    """Mutants: the sampling loop traced without torch.no_grad() (the peak then held what a backward would need,
    which the trainer's sampling never keeps), and traced with decode=True (the loop's peak then included a VAE
    decode, which the docstring reports apart, one sampling batch at a time): loop_peak_gib too large either way
    for a user choosing sample_batches_per_call."""
    trainer = grad_trainer()
    for batch in (1, 3):
        assert training_memory.sampling_peak_bytes(trainer, batch) == (128 * batch, 0)
    assert trainer.sampler.calls == [(1, False), (3, False)]


def test_the_decode_is_traced_without_gradient():
    """Mutant: the decode traced without torch.no_grad(): decode_peak_gib then counted activations autograd keeps
    for a backward that a sampling decode never runs (here 192 bytes an image instead of 128)."""
    assert training_memory.decode_peak_bytes(grad_trainer(), 3) == (3 * 128, 0)


# -- training_memory: main's choices, with the Trainer and the traces stubbed ---------------------------------------

def stubbed_memory_run(monkeypatch, tmp_path, *argv, overrides=None):
    """training_memory.main with a stub Trainer (a frozen linear UNet with one trainable weight) and the three
    traces stubbed (each records the size it was asked to trace); `overrides` are added to the run's config."""
    unet = torch.nn.Linear(8, 4).requires_grad_(False)
    pipe = SimpleNamespace(unet=unet, vae=torch.nn.Identity(), text_encoder=torch.nn.Identity())
    trainer = SimpleNamespace(pipe=pipe, params=[torch.zeros(3, requires_grad=True)])
    traced, extra = [], overrides
    real_resolve_config = training_memory.resolve_config
    monkeypatch.setattr(training_memory, "resolve_config",
                        lambda overrides: real_resolve_config(overrides={**overrides, **(extra or {})}))
    monkeypatch.setattr(training_memory, "Trainer", lambda cfg, run_dir: trainer)
    monkeypatch.setattr(training_memory, "saved_for_backward_bytes", lambda trainer, n: (1000 * n, 0))
    monkeypatch.setattr(training_memory, "sampling_peak_bytes", lambda trainer, b: traced.append(("loop", b)) or (b, 0))
    monkeypatch.setattr(training_memory, "decode_peak_bytes", lambda trainer, b: traced.append(("decode", b)) or (b, 0))
    assert training_memory.main(["--model", "tiny", "--resolution", "32", *argv, "--out-dir", str(tmp_path)]) == 0
    return json.loads((tmp_path / "training_memory.json").read_text()), traced


def test_the_decode_is_traced_for_the_smallest_sampling_batch_whatever_the_order(monkeypatch, tmp_path):
    """Mutant: `decode_batch = min(sampling_batches)` -> the first one asked. The default (4,20,40) starts with
    the smallest, so the traced test could not tell; with `--sampling-batches 20,4` the decode (one sampling batch
    at a time, the smallest the docstring says) was traced and reported for 20 latents."""
    result, traced = stubbed_memory_run(monkeypatch, tmp_path, "--rows", "1", "--sampling-batches", "20,4")
    assert [row["decode_batch"] for row in result["sampling"]] == [4, 4]
    assert [row["trajectories"] for row in result["sampling"]] == [20, 4]
    assert traced == [("decode", 4), ("loop", 20), ("loop", 4)]


def test_the_json_names_the_lora_rank_traced(monkeypatch, tmp_path):
    """Mutant: "lora_rank" written from cfg.lora_alpha. The tiny preset has rank 8 and alpha 8.0, so the traced
    tests could not tell; a run whose rank and alpha differ would have recorded the wrong rank next to its
    LoRA-and-AdamW memory figure."""
    result, _ = stubbed_memory_run(monkeypatch, tmp_path, "--rows", "1", "--sampling-batches", "4",
                                   overrides={"lora_rank": 4, "lora_alpha": 16.0})
    assert result["lora_rank"] == 4


def test_zero_trajectories_per_sampling_call_is_refused_in_one_line(capsys):
    """Mutant: --sampling-batches' minimum 1 -> 0: `--sampling-batches 0,4` was accepted and the decode traced for
    zero latents (its figure 0 GiB), instead of argparse's one line naming the value and the rule."""
    with pytest.raises(SystemExit) as exit_info:
        training_memory.parse_args(["--sampling-batches", "0,4"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("argument --sampling-batches: '0,4' is not a comma-separated list of trajectories per "
                         "call >= 1"), last


# -- bench_step ---------------------------------------------------------------------------------------------------


def test_the_backward_pass_leaves_the_shared_inputs_without_autograd():
    """Mutant: forward_backward's leaf made with `model_output.requires_grad_()` instead of a detached copy: the
    (dtype, batch) group's shared model_output became an autograd leaf, so every later call on it (the eager
    reference's log-prob, the other variants' forward passes) recorded a graph, timing autograd's bookkeeping
    that a sampling or training forward without gradient never pays."""
    inputs = cpu_inputs(2, torch.float32)
    (grad,) = bench_step.step_call(policy_step_reference, "forward_backward", inputs)()
    assert grad.shape == inputs[0].shape and not inputs[0].requires_grad
    for step_pass in ("forward_sampling", "forward_training"):
        outputs = bench_step.step_call(policy_step_reference, step_pass, inputs)()
        assert all(tensor.grad_fn is None for tensor in outputs), step_pass


class Compiled(Exception):
    pass


def test_torch_compile_gets_one_static_specialisation_per_batch_dtype_and_pass(monkeypatch):
    """Mutants: the recompile limit 64 -> 8, and torch.compile's `dynamic=False` -> None. The default run needs
    one specialisation per (batch, dtype, pass): 24 of them; past the limit dynamo silently runs the eager
    function, and with dynamic=None a second batch size recompiles with symbolic shapes, so "compile" rows would
    have timed something else than the static compile of each size the docstring describes."""
    seen = {}

    def compile_stub(fn, dynamic):
        seen.update(limit=torch._dynamo.config.recompile_limit, dynamic=dynamic)
        raise Compiled

    monkeypatch.setitem(sys.modules, "triton.testing", SimpleNamespace(do_bench=None, do_bench_cudagraph=None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "compile", compile_stub)
    with torch._dynamo.config.patch(recompile_limit=8), pytest.raises(Compiled):
        bench_step.main([])
    assert seen["dynamic"] is False
    assert seen["limit"] >= len(bench_step.BATCH_SIZES) * len(bench_step.DTYPES) * len(bench_step.PASSES)


def test_the_printed_table_gives_the_copy_bandwidth_and_each_rows_percentage(monkeypatch, tmp_path, capsys):
    """Mutants: the first line (the device's copy bandwidth, the ceiling every row is judged against) dropped, and
    the table's copy% column printed as a fraction (0.8 for 80 %): what a user watching a GPU run reads."""
    import rlcm_fast.kernels.policy_step as kernels

    monkeypatch.setitem(sys.modules, "triton.testing", SimpleNamespace(
        do_bench=lambda fn, warmup, rep, return_mode: (fn(), 0.010)[1],
        do_bench_cudagraph=lambda fn, rep, return_mode: 0.004))
    monkeypatch.setattr(kernels, "fused_policy_step", policy_step_reference)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic: fn)
    monkeypatch.setattr(bench_step, "environment", lambda: {"device": "Stub GPU"})
    monkeypatch.setattr(bench_step, "make_inputs", lambda reference, batch, dtype: cpu_inputs(batch, dtype))
    monkeypatch.setattr(bench_step, "copy_bandwidth_gbps", lambda do_bench: 500.0)
    monkeypatch.setattr(bench_step, "back_to_back_us", lambda fn: 30.0)
    with torch._dynamo.config.patch(recompile_limit=8):
        assert bench_step.main(["--batches", "1", "--out-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Stub GPU: device-to-device copy 500 GB/s"
    report = json.loads((tmp_path / "bench_step.json").read_text())
    printed = [line.split() for line in lines[2:-1]]
    assert len(printed) == len(report["results"]) == 18
    for row, words in zip(report["results"], printed):
        assert words[:4] == [row["step_pass"], row["dtype"], "1", row["variant"]]
        assert words[6] == f"{100 * row['fraction_of_copy_bandwidth']:.1f}%"


def test_an_interrupt_during_a_graph_capture_stops_the_run(monkeypatch):
    """Mutant: `except Exception` -> `except BaseException`: a Ctrl-C (or run_all's time limit delivered as a
    KeyboardInterrupt) that arrived during a CUDA-graph capture was written into the row as "capture failed" and
    the run went on measuring, instead of stopping with the rows measured so far."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    def interrupted(fn, rep, return_mode):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bench_step.graph_time_us(lambda: None, interrupted)
