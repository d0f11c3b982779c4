"""Mutation-testing round 45b (benchmarks/training_memory.py, benchmarks/bench_step.py): hand-written mutants of those
scripts were run against their tests (test_training_memory, the scripts' rows of test_benchmark_cli, test_run_all and
test_check_claims); each test here kills one that survived (named in its docstring). All are CPU-only, seeded and
fast: training_memory's Trainer and traces are stubbed, and bench_step's CUDA parts (triton's timers, the fused
kernel, torch.compile, its CUDA inputs) are replaced by CPU stand-ins around the plain-PyTorch step."""

import contextlib
import json
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlcm_fast.policy_step import policy_step_reference

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_step  # noqa: E402
import training_memory  # noqa: E402

GIB = 2**30


# -- training_memory: the accounting of a stubbed run -------------------------------------------------------------

def frozen(module: torch.nn.Module) -> torch.nn.Module:
    return module.requires_grad_(False)


def stubbed_memory_run(monkeypatch, tmp_path, *argv, saved=lambda n: 1000 * n * n):
    """training_memory.main with the Trainer and the three traces stubbed: a frozen bf16 UNet (with one trainable
    LoRA-like weight), VAE and text encoder; `saved(n)` bytes kept for n rows, and fixed casts and peaks."""
    unet = frozen(torch.nn.Linear(64, 32, bias=False, dtype=torch.bfloat16))
    unet.lora = torch.nn.Linear(32, 3, bias=False)  # trainable: neither a frozen weight nor counted there
    unet.register_buffer("table", torch.zeros(10, dtype=torch.float64))
    pipe = SimpleNamespace(unet=unet, vae=frozen(torch.nn.Linear(16, 8)), text_encoder=frozen(torch.nn.Embedding(5, 4)))
    trainer = SimpleNamespace(pipe=pipe, params=[unet.lora.weight, torch.zeros(7, requires_grad=True)])
    monkeypatch.setattr(training_memory, "Trainer", lambda cfg, run_dir: trainer)
    monkeypatch.setattr(training_memory, "saved_for_backward_bytes", lambda trainer, n: (saved(n), 3 * GIB))
    monkeypatch.setattr(training_memory, "sampling_peak_bytes", lambda trainer, b: (b * GIB, GIB // 2))
    monkeypatch.setattr(training_memory, "decode_peak_bytes", lambda trainer, b: (b * GIB // 4, GIB // 8))
    assert training_memory.main(["--model", "tiny", "--resolution", "32", *argv, "--out-dir", str(tmp_path)]) == 0
    return json.loads((tmp_path / "training_memory.json").read_text())


def test_memory_figures_are_bytes_over_two_to_the_thirty(monkeypatch, tmp_path):
    """Mutant: `GIB = 2**30` -> `2**20`. Every figure is a ratio of the same unit, so the traced run's tests (which
    compare figures with each other) passed while each "_gib" was 1024 times too large: a user sizing
    train_rows_per_call against a GPU's memory would have read 80 GiB cards as far too small."""
    result = stubbed_memory_run(monkeypatch, tmp_path, "--rows", "1,2", "--sampling-batches", "3",
                                saved=lambda n: n * GIB)
    assert [(row["saved_for_backward_gib"], row["forward_casts_gib"]) for row in result["rows"]] == [(1, 3), (2, 3)]
    assert [(row["loop_peak_gib"], row["loop_casts_gib"], row["decode_peak_gib"], row["decode_casts_gib"])
            for row in result["sampling"]] == [(3, 0.5, 0.75, 0.125)]


def test_the_frozen_weights_and_the_lora_with_adam_are_counted_in_full(monkeypatch, tmp_path):
    """Mutant: the LoRA's bytes `* 4 * 4` (float32 weights, gradients and AdamW's two moments) -> `* 4 * 3`: a
    quarter of the optimizer's memory missing from a figure a user adds to the per-row one to fit a GPU. The
    frozen weights' sum (UNet with its buffers, VAE, text encoder; not the trainable weight) is checked too."""
    result = stubbed_memory_run(monkeypatch, tmp_path, "--rows", "1,2")
    lora_numel = 32 * 3 + 7
    assert result["lora_and_adam_gib"] * GIB == lora_numel * 16
    unet, vae, text = 64 * 32 * 2 + 10 * 8, (16 * 8 + 8) * 4, 5 * 4 * 4  # bf16 + float64 buffer, fp32, fp32
    assert result["weights_gib"] * GIB == unet + vae + text


def test_saved_per_row_is_the_slope_from_the_first_to_the_last_row_count(monkeypatch, tmp_path):
    """Mutants: the slope's denominator `last - first` -> `last`, and its last point `measured[-1]` ->
    `measured[1]`: with activations that grow linearly the traced tests could not tell, but the figure is the
    documented slope between the first and the last row counts asked for (here saved = 1000 n^2 bytes)."""
    result = stubbed_memory_run(monkeypatch, tmp_path, "--rows", "2,3,6")
    assert result["saved_gib_per_row"] * GIB == pytest.approx((36000 - 4000) / (6 - 2))


def test_one_row_count_writes_its_figures_without_a_slope(monkeypatch, tmp_path, capsys):
    """Mutant: `len(measured) > 1` -> `>= 1`: `--rows 7` (one row count, which the parser allows) divided by zero
    for a slope, a ZeroDivisionError traceback after the whole trace, and no JSON written."""
    result = stubbed_memory_run(monkeypatch, tmp_path, "--rows", "7")
    assert [row["rows"] for row in result["rows"]] == [7] and "saved_gib_per_row" not in result
    assert "GiB per row" not in capsys.readouterr().out


def test_rows_are_reported_in_the_order_asked_with_the_lora_targets(monkeypatch, tmp_path):
    """Mutants: the rows measured in sorted order (the slope then ran the other way from the one the user's
    first-to-last order asks for) and the lora_targets list cut to its first name (the JSON then says a run
    traced one LoRA target where the trainer wraps all of them)."""
    result = stubbed_memory_run(monkeypatch, tmp_path, "--rows", "4,1")
    assert [row["rows"] for row in result["rows"]] == [4, 1]
    assert result["saved_gib_per_row"] * GIB == pytest.approx((1000 - 16000) / (1 - 4))
    from rlcm_fast.config import resolve_config

    assert result["lora_targets"] == list(resolve_config(overrides={"model": "tiny"}).lora_targets)
    assert len(result["lora_targets"]) > 1


class TracedSampler:
    """A sampler of 2 trained steps at 16 px (4x2x2 latents) whose log-prob passes each row's state through a
    trainable (3, 16) LoRA-like weight, then a frozen (5, 3) Parameter, and adds the state cast to float64."""

    trained_steps, resolution = 2, 16

    def prompt_embeddings(self, prompts):
        return torch.zeros(1, 3, 4)

    def action_log_probs(self, unet, states, sample_idx, step_idx, embeds):
        self.states_shape = tuple(states.shape)
        x = states[sample_idx, step_idx].flatten(1)  # 64 bytes a row, saved (the LoRA's gradient needs it)
        h = x @ unet.lora.t()  # needs grad: the next product saves the frozen weight's transposed view
        return (h @ unet.frozen.t()).sum(1) + x.to(torch.float64).sum(1)  # the cast writes 128 bytes a row


def test_saved_bytes_are_the_activations_alone_and_casts_are_counted():
    """Mutants: the storage's owner taken as the saved tensor itself rather than its `_base` (the transposed view
    of a frozen weight, which the docstring says is not counted, was counted as saved for backward: a constant the
    traced tests' per-row slope could not see); the states made with `trained_steps` rather than the trainer's
    `trained_steps + 1` per trajectory (the layout action_log_probs indexes, k and k + 1). Its casts are checked
    too."""
    unet = torch.nn.Module()
    unet.lora = torch.nn.Parameter(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)))
    unet.frozen = torch.nn.Parameter(torch.ones(5, 3), requires_grad=False)
    sampler = TracedSampler()
    pipe = SimpleNamespace(vae_scale_factor=8, unet=SimpleNamespace(config=SimpleNamespace(in_channels=4)))
    trainer = SimpleNamespace(sampler=sampler, prompt_set=["a cat"], pipe=pipe, device=torch.device("cpu"),
                              autocast=contextlib.nullcontext, train_unet=unet)
    for rows in (1, 3):
        assert training_memory.saved_for_backward_bytes(trainer, rows) == (64 * rows, 128 * rows)
        assert sampler.states_shape == (rows, 3, 4, 2, 2)


def test_the_decode_is_traced_for_the_batch_asked():
    """Mutant: the decode's latents made for one image instead of `batch`: decode_peak_gib then reported a one-image
    decode as the sampling batch's (the traced test's batch of 4 saw only a constant, never its size)."""
    shapes = []

    def decode(latents):
        shapes.append(tuple(latents.shape))
        return (latents * 2).to(torch.float64)  # 64 bytes of float32 an image alive with 128 of float64

    pipe = SimpleNamespace(vae_scale_factor=8, unet=SimpleNamespace(config=SimpleNamespace(in_channels=4)))
    trainer = SimpleNamespace(pipe=pipe, sampler=SimpleNamespace(resolution=16, decode=decode),
                              device=torch.device("cpu"), autocast=contextlib.nullcontext)
    assert training_memory.decode_peak_bytes(trainer, 3) == (3 * (64 + 128), 3 * 128)
    assert shapes == [(3, 4, 2, 2)]


def test_a_resolution_the_config_refuses_is_one_line_naming_it(capsys):
    """Mutant: resolve_config's ConfigError re-raised rather than given to parser.error: --resolution 33 (an integer
    >= 1, so the parser lets it through) was a traceback, not argparse's one line naming the value and the rule."""
    with pytest.raises(SystemExit) as exit_info:
        training_memory.main(["--model", "tiny", "--resolution", "33"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("error: resolution=33 is invalid: it must be a multiple of 8, at least 8"), last


# -- training_memory: PeakLiveStorage -------------------------------------------------------------------------------

def test_peak_live_storage_counts_every_output_of_an_op_that_returns_several():
    """Mutant: `pytree.tree_leaves(out)` -> `[out]`: an op returning a tuple (max with its indices, a norm with its
    mean and rstd) had none of its outputs counted, so the peak missed them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(1024, 256)  # made before the mode: not counted
        with training_memory.PeakLiveStorage() as peak:
            values, indices = x.max(dim=0)  # 1 KiB of float32 values and 2 KiB of int64 indices
    assert peak.peak == 256 * 4 + 256 * 8


# -- bench_step: what a step moves and how it is called -------------------------------------------------------------

def cpu_inputs(batch: int, dtype: torch.dtype):
    """bench_step.make_inputs on the CPU: the same tensors, the same valid per-row scalars, seeded by the batch."""
    generator = torch.Generator().manual_seed(batch)
    shape = (batch, *bench_step.LATENT_SHAPE)
    model_output, x, noise = (torch.randn(shape, generator=generator).to(dtype) for _ in range(3))
    alpha_t, alpha_next, c_skip, c_out = torch.rand(4, batch, generator=generator, dtype=torch.float64)
    alpha_t, alpha_next = 0.1 + 0.8 * alpha_t, 0.1 + 0.8 * alpha_next
    sigma_t, sigma_next = (1 - alpha_t**2).sqrt(), (1 - alpha_next**2).sqrt()
    scalars = torch.stack([alpha_t, sigma_t, c_skip, c_out, alpha_next, sigma_next], dim=1).contiguous()
    next_state = policy_step_reference(model_output, x, scalars, "epsilon", noise=noise)[1]
    return model_output, x, noise, next_state, scalars, torch.randn(batch, generator=generator)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bytes_moved_is_every_input_read_once_and_every_output_written_once(dtype):
    """Mutants: sampling's `5 * latent` -> 4, training's `4 * latent` -> 3, the backward's `2 * per_row` -> 1, the
    float64 scalars counted as 4 bytes, a latent counted in fp32 whatever the dtype: each a wrong GB/s and a wrong
    fraction of copy bandwidth, the figure check_claims judges. Counted here from the step's own tensors."""
    model_output, x, noise, next_state, scalars, grad_logp = cpu_inputs(2, dtype)
    nbytes = lambda *tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    denoised, x_next, logp = policy_step_reference(model_output, x, scalars, "epsilon", noise=noise)
    sampling = nbytes(model_output, x, noise, scalars, denoised, x_next, logp)
    training = nbytes(model_output, x, next_state, scalars, denoised, logp)
    backward = training + nbytes(model_output, x, next_state, scalars, grad_logp, model_output)
    for step_pass, expected in zip(bench_step.PASSES, (sampling, training, backward)):
        assert bench_step.bytes_moved(step_pass, 2, dtype) == expected, step_pass


def test_each_pass_calls_the_step_the_way_its_name_says():
    """Mutants: forward_training and the backward's forward given `noise` (the sampling path) instead of the stored
    `next_state`, and the backward's gradient taken of logp.sum() instead of with grad_logp: the training rows then
    timed what sampling does, or a gradient the PPO loss never asks for."""
    inputs = cpu_inputs(2, torch.float32)
    model_output, x, noise, next_state, scalars, grad_logp = inputs
    calls = []

    def recording_step(*args, **kwargs):
        calls.append(sorted(kwargs))
        return policy_step_reference(*args, **kwargs)

    for step_pass in bench_step.PASSES:
        bench_step.step_call(recording_step, step_pass, inputs)()
    assert calls == [["noise"], ["next_state"], ["next_state"]]
    (grad,) = bench_step.step_call(policy_step_reference, "forward_backward", inputs)()
    leaf = model_output.detach().requires_grad_()
    logp = policy_step_reference(leaf, x, scalars, "epsilon", next_state=next_state)[2]
    (expected,) = torch.autograd.grad((logp * grad_logp).sum(), leaf)
    torch.testing.assert_close(grad, expected)


# -- bench_step: the CUDA graph's timing and its failure ------------------------------------------------------------

def test_graph_time_is_in_microseconds():
    """Mutant: do_bench_cudagraph's milliseconds `* 1e3` -> `* 1e6`: graph_time_us 1000 times too large, and the
    claims judged on graph time (fused step faster than eager) read nonsense."""
    assert bench_step.graph_time_us(lambda: None, lambda fn, rep, return_mode: 0.025) == pytest.approx(25.0)


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: operation not permitted when stream is capturing"),
                                   ValueError("x" * 300)])
def test_a_capture_that_fails_is_reported_in_200_characters_after_a_synchronisation(monkeypatch, error):
    """Mutants: `except Exception` -> `except RuntimeError` (any other error from a capture ended the whole run
    instead of being reported in its row), the synchronisation after a failed capture dropped (the next
    measurement then started with the failed capture's work still queued), the text cut to 100 characters."""
    synchronised = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: synchronised.append(True))

    def failing_capture(fn, rep, return_mode):
        raise error

    text = bench_step.graph_time_us(lambda: None, failing_capture)
    assert text == f"capture failed: {type(error).__name__}: {error}"[:200] and len(text) <= 200
    assert synchronised == [True]


def test_copy_bandwidth_counts_the_read_and_the_write(monkeypatch):
    """Mutant: `2 * source.numel() * ...` -> without the 2: a copy reads 1 GiB and writes 1 GiB, and halving the
    ceiling doubled every row's fraction_of_copy_bandwidth. The 1 GiB buffers are made on the CPU, left untouched."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, device=None, **kwargs: real_empty(*args, **kwargs))
    timed = []

    def do_bench(fn, warmup, rep, return_mode):
        timed.append(fn)
        return 2.0  # ms

    assert bench_step.copy_bandwidth_gbps(do_bench) == pytest.approx(2 * 2**30 / 2e-3 / 1e9)
    assert len(timed) == 1


# -- bench_step: main's report, with CUDA's parts stubbed -----------------------------------------------------------

def stubbed_step_run(monkeypatch, tmp_path, batches="2,1", stop_after=None):
    """bench_step.main as on a GPU, on the CPU: do_bench takes 10 us a call (and raises KeyboardInterrupt after
    `stop_after` calls), a graph replay 4 us (the fused variant's capture fails), copies 500 GB/s, the "fused
    kernel" is the reference step with its log-prob off by 0 to 0.5 across the rows, torch.compile is the function
    itself."""
    import rlcm_fast.kernels.policy_step as kernels

    timed = []

    def do_bench(fn, warmup, rep, return_mode):
        if stop_after is not None and len(timed) == stop_after:
            raise KeyboardInterrupt
        timed.append(fn())
        return 0.010

    def do_bench_cudagraph(fn, rep, return_mode):
        if getattr(fn, "fused", False):
            raise RuntimeError("not capturable")
        return 0.004

    def fused(*args, **kwargs):
        denoised, x_next, logp = policy_step_reference(*args, **kwargs)
        return denoised, x_next, logp + torch.linspace(0, 0.5, len(logp))

    def step_call(step_fn, step_pass, inputs):
        fn = real_step_call(step_fn, step_pass, inputs)
        fn.fused = step_fn is fused
        return fn

    real_step_call = bench_step.step_call
    monkeypatch.setitem(sys.modules, "triton.testing",
                        types.SimpleNamespace(do_bench=do_bench, do_bench_cudagraph=do_bench_cudagraph))
    monkeypatch.setattr(kernels, "fused_policy_step", fused)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic: fn)
    monkeypatch.setattr(bench_step, "environment", lambda: {"device": "Stub GPU"})
    monkeypatch.setattr(bench_step, "make_inputs", lambda reference, batch, dtype: cpu_inputs(batch, dtype))
    monkeypatch.setattr(bench_step, "copy_bandwidth_gbps", lambda do_bench: 500.0)
    monkeypatch.setattr(bench_step, "back_to_back_us", lambda fn: 30.0)
    monkeypatch.setattr(bench_step, "step_call", step_call)
    recompile_limit = torch._dynamo.config.recompile_limit  # main sets it; monkeypatch's undo would delete it
    try:
        return bench_step.main(["--batches", batches, "--out-dir", str(tmp_path)])
    finally:
        torch._dynamo.config.recompile_limit = recompile_limit


def test_the_report_has_every_variant_dtype_batch_and_pass_in_the_documented_order(monkeypatch, tmp_path):
    """Mutants: torch.compile's variant dropped, fp32 measured before bf16 (a run cut short then lacks the bf16
    rows the claims read), the batches sorted rather than measured in the order given, and the final write
    left "complete": false (check_claims then calls every claim partial)."""
    assert stubbed_step_run(monkeypatch, tmp_path) == 0
    report = json.loads((tmp_path / "bench_step.json").read_text())
    assert report["complete"] is True and report["copy_bandwidth_gbps"] == 500.0
    expected = [(variant, dtype, batch, step_pass) for names in (("eager", "triton"), ("compile",))
                for dtype in ("bf16", "fp32") for batch in (2, 1) for step_pass in bench_step.PASSES
                for variant in names]
    assert [(r["variant"], r["dtype"], r["batch"], r["step_pass"]) for r in report["results"]] == expected


def test_each_rows_figures_follow_from_its_times_and_bytes(monkeypatch, tmp_path):
    """Mutants: do_bench's milliseconds `* 1e3` -> `* 1e6`, GB/s from `us * 1e-3`, the fraction of copy bandwidth
    inverted, every pass given sampling's bytes, graph GB/s from the do_bench time, a failed capture's graph GB/s
    0.0 instead of None (a figure where nothing was measured), the log-prob difference a mean instead of the max,
    and the eager reference's log-prob taken on the sampling path."""
    assert stubbed_step_run(monkeypatch, tmp_path, batches="2") == 0
    rows = json.loads((tmp_path / "bench_step.json").read_text())["results"]
    for row in rows:
        moved = bench_step.bytes_moved(row["step_pass"], 2, bench_step.DTYPES[row["dtype"]])
        assert (row["time_us"], row["back_to_back_us"], row["bytes"]) == (pytest.approx(10.0), 30.0, moved)
        assert row["gbps"] == pytest.approx(moved / 10e-6 / 1e9)
        assert row["fraction_of_copy_bandwidth"] == pytest.approx(row["gbps"] / 500.0)
        if row["variant"] == "triton":
            assert row["graph_time_us"] == "capture failed: RuntimeError: not capturable" and row["graph_gbps"] is None
            assert row["max_abs_logp_diff_vs_eager"] == pytest.approx(0.5)
        else:
            assert row["graph_time_us"] == pytest.approx(4.0) and row["graph_gbps"] == pytest.approx(moved / 4e-6 / 1e9)
            assert row["max_abs_logp_diff_vs_eager"] == 0.0
    assert len({row["bytes"] for row in rows if row["dtype"] == "bf16"}) == 3


def test_a_run_cut_short_keeps_the_groups_it_measured(monkeypatch, tmp_path):
    """Mutant: the write after each (dtype, batch) group dropped: a run stopped by its time limit (here a
    KeyboardInterrupt in the second group's timing) left no JSON at all, not the rows it had measured."""
    with pytest.raises(KeyboardInterrupt):
        stubbed_step_run(monkeypatch, tmp_path, batches="2,1", stop_after=len(bench_step.PASSES) * 2 + 1)
    report = json.loads((tmp_path / "bench_step.json").read_text())
    assert report["complete"] is False
    assert {(r["dtype"], r["batch"]) for r in report["results"]} == {("bf16", 2)} and len(report["results"]) == 6


def test_the_default_batches_are_those_the_help_names(capsys):
    """Mutant: BATCH_SIZES without 512: the size where the fraction of copy bandwidth means something (and the
    claims read it) silently not measured by a default run, though --help says "default 512,16,8,2"."""
    with pytest.raises(SystemExit):
        bench_step.parse_args(["--help"])
    named = re.search(r"\(default\s+([\d,]+)\)", capsys.readouterr().out).group(1)
    assert bench_step.parse_args([]).batches == tuple(int(part) for part in named.split(","))


def test_training_memorys_defaults_are_those_its_help_names():
    """Mutants: --resolution's default 768 -> 512, --rows' (1, 7, 14) -> (1, 7): a default run traced another
    resolution, or fewer row counts, than --help (and the module's docstring) promise."""
    parser, args = training_memory.parse_args([])
    text = " ".join(parser.format_help().split())
    for option, value in (("resolution", args.resolution), ("rows", ",".join(map(str, args.rows))),
                          ("sampling_batches", ",".join(map(str, args.sampling_batches)))):
        assert re.search(rf"\(default {value}[);]", text), option
