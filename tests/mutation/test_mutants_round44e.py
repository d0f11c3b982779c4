"""Mutation-testing round 44e (rlcm_fast/_native.py, the Python side of kernels/policy_step.py): hand-written mutants
of the C++ op's wrapper (its checks and the arguments it passes) and of the Triton step's launch configuration,
autograd wrapper and entry point were run against their tests (test_native_step, test_triton_step,
test_policy_step, test_policy_step_contract); each test here kills one that survived (named in its docstring).
All are CPU-only, seeded and fast: the Triton kernels run in Triton's interpreter (tests/conftest.py) on small
tensors, and the arguments handed to the C++ module are recorded by a stand-in for it."""

import os
from types import SimpleNamespace

import pytest
import torch

from rlcm_fast import _native
from rlcm_fast.policy_step import policy_step_reference

needs_native = pytest.mark.skipif(not _native.native_available(), reason="rlcm_fast._C is not built")


def random_rows(rows: int, seed: int) -> torch.Tensor:
    """A valid (rows, 6) float64 ROW_SCALARS table, each row its own action."""
    g = torch.Generator().manual_seed(seed)
    alphas = torch.rand(2, rows, generator=g, dtype=torch.float64) * 0.8 + 0.1
    c_skip, c_out = torch.rand(2, rows, generator=g, dtype=torch.float64) * 0.8 + 0.2
    alpha_t, alpha_next = alphas[0].sqrt(), alphas[1].sqrt()
    return torch.stack([alpha_t, (1 - alpha_t**2).sqrt(), c_skip, c_out, alpha_next, (1 - alpha_next**2).sqrt()], 1)


def randn(count, shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(count)]


def strided_rows(scalars: torch.Tensor) -> torch.Tensor:
    """The same table as a non-contiguous view: every other column of a (B, 12) table."""
    wide = torch.zeros(scalars.shape[0], 12, dtype=torch.float64)
    wide[:, ::2] = scalars
    view = wide[:, ::2]
    assert not view.is_contiguous() and torch.equal(view, scalars)
    return view


# -- _native: checks ---------------------------------------------------------------------------------------------

@needs_native
def test_a_non_tensor_state_is_a_one_line_error_naming_its_type():
    """Mutant: the isinstance check in _check_cpu_tensor dropped: a list for x (or a numpy array) failed with
    "AttributeError: 'list' object has no attribute 'device'" instead of naming what x must be."""
    model_output, x, noise = randn(3, (2, 3, 4), seed=1)
    with pytest.raises(ValueError, match="^x must be a torch.Tensor, got list$"):
        _native.policy_step_forward_cpu(model_output, x.tolist(), random_rows(2, 2), "epsilon", noise=noise)
    with pytest.raises(ValueError, match="^noise must be a torch.Tensor, got list$"):
        _native.policy_step_forward_cpu(model_output, x, random_rows(2, 2), "epsilon", noise=noise.tolist())


@needs_native
def test_a_state_with_no_elements_per_row_is_refused():
    """Mutant: the `size == 0` check of x's row dims dropped: (2, 0, 3) went to the C++ op with n = 0, whose mean
    log-prob over no elements is 0/0, handed back as a NaN log-prob instead of an error."""
    empty_rows = torch.zeros(2, 0, 3)
    with pytest.raises(ValueError, match=r"at least one element per row, got \(2, 0, 3\)"):
        _native.policy_step_forward_cpu(empty_rows, empty_rows, random_rows(2, 3), "sample", noise=empty_rows)


@needs_native
def test_a_shape_mismatch_names_both_shapes():
    """Mutant: the message's x shape taken from the bad tensor: 'noise has shape (2, 2, 4) but x has shape
    (2, 2, 4)', which names no mismatch at all."""
    model_output, x, noise = randn(3, (2, 3, 4), seed=4)
    with pytest.raises(ValueError, match=r"^noise has shape \(2, 2, 4\) but x has shape \(2, 3, 4\); they must match$"):
        _native.policy_step_forward_cpu(model_output, x, random_rows(2, 5), "epsilon", noise=noise[:, :2])


@needs_native
@pytest.mark.parametrize("bad", [torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.bool),
                                 torch.ones(2, 1), torch.ones(1, 2)], ids=["int64", "bool", "2x1", "1x2"])
def test_grad_logp_must_be_a_floating_vector_of_the_rows(bad):
    """Mutants: the is_floating_point check dropped (an integer or bool 'gradient' silently upcast) and the shape
    compared by numel (a (B, 1) or (1, B) tensor, a broadcasting slip upstream, flattened and accepted)."""
    model_output, x, next_state = randn(3, (2, 3, 4), seed=6)
    with pytest.raises(ValueError, match=r"^grad_logp must be a floating tensor of shape \(2,\), got dtype "):
        _native.policy_step_backward_cpu(model_output, x, next_state, random_rows(2, 7), "epsilon", bad)


@needs_native
@pytest.mark.parametrize("value", [True, 2.0, "2"], ids=repr)
def test_num_threads_must_be_a_plain_int(value):
    """Mutants: the bool check dropped (num_threads=True ran on one thread as if 1 had been given) and the int
    check dropped (2.0 or "2" reached the C++ binding, which fails with pybind11's own type error)."""
    model_output, x, noise = randn(3, (2, 3, 4), seed=8)
    with pytest.raises(ValueError, match=rf"^num_threads must be an int >= 0 .*, got {value!r}$"):
        _native.policy_step_forward_cpu(model_output, x, random_rows(2, 9), "epsilon", noise=noise, num_threads=value)


def test_a_missing_extension_says_why_it_did_not_import(monkeypatch):
    """Mutant: the import error dropped from the message: 'rlcm_fast._C is not available' with no reason, though
    the reason (a missing symbol, a build for another Python) is what the user needs to fix it."""
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_IMPORT_ERROR", ImportError("undefined symbol: omp_get_num_threads"))
    model_output, x, noise = randn(3, (2, 3, 4), seed=10)
    with pytest.raises(RuntimeError, match=r"rlcm_fast._C is not available .*: undefined symbol: omp_get_num_threads$"):
        _native.policy_step_forward_cpu(model_output, x, random_rows(2, 11), "epsilon", noise=noise)


# -- _native: what reaches the C++ module --------------------------------------------------------------------------

def recording_native(monkeypatch) -> list[tuple]:
    """A stand-in for rlcm_fast._C that records each call's arguments (name, *args) and writes nothing."""
    calls = []

    def recorder(name):
        return lambda *args: calls.append((name, *args))

    names = [f"policy_step_{way}_{kind}" for way in ("forward", "backward") for kind in ("float32", "float64")]
    monkeypatch.setattr(_native, "_C", SimpleNamespace(**{name: recorder(name) for name in names}))
    return calls


@pytest.mark.parametrize("given", [None, 0])
def test_the_default_thread_count_is_torch_s(monkeypatch, given):
    """Mutants: `num_threads or torch.get_num_threads()` -> `or 1`, and forward's default 0 -> 1: the C++ op then
    ran on one thread whatever torch.set_num_threads (and the machine's CPU limits) allowed, several times slower
    on the 4x96x96 latents of training."""
    calls = recording_native(monkeypatch)
    model_output, x, noise = randn(3, (2, 3, 4), seed=12)
    option = {} if given is None else {"num_threads": given}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _native.policy_step_forward_cpu(model_output, x, random_rows(2, 13), "epsilon", noise=noise, **option)
        _native.policy_step_backward_cpu(model_output, x, noise, random_rows(2, 13), "epsilon", torch.ones(2),
                                         **option)
    finally:
        torch.set_num_threads(before)
    assert [call[0] for call in calls] == ["policy_step_forward_float32", "policy_step_backward_float32"]
    assert [call[-1] for call in calls] == [2, 2]


# -- _native: results ----------------------------------------------------------------------------------------------

@needs_native
def test_a_non_contiguous_row_table_gives_the_contiguous_result():
    """Mutant: `.contiguous()` dropped from _row_scalars: a strided view of the table (a column slice of a wider
    table) was read by the C++ op as if packed, so rows used other rows' (or other columns') scalars."""
    model_output, x, noise = randn(3, (3, 4, 5), seed=14, dtype=torch.float64)
    scalars = random_rows(3, 15)
    packed = _native.policy_step_forward_cpu(model_output, x, scalars, "epsilon", noise=noise)
    strided = _native.policy_step_forward_cpu(model_output, x, strided_rows(scalars), "epsilon", noise=noise)
    for a, b in zip(strided, packed):
        assert torch.equal(a, b)
    grads = _native.policy_step_backward_cpu(model_output, x, packed[1], scalars, "epsilon", torch.ones(3))
    strided_grads = _native.policy_step_backward_cpu(model_output, x, packed[1], strided_rows(scalars), "epsilon",
                                                     torch.ones(3))
    assert torch.equal(strided_grads[0], grads[0])


@needs_native
def test_a_strided_float64_grad_logp_gives_the_contiguous_result():
    """Mutant: `.contiguous()` dropped from _row_gradient: a float64 grad_logp view with stride 2 (already the
    kernel's dtype, so `.to` copies nothing) was read as packed: row 1 got row 2's gradient weight."""
    model_output, x, next_state = randn(3, (3, 4, 5), seed=16, dtype=torch.float64)
    scalars = random_rows(3, 17)
    grad_logp = torch.tensor([1.0, 0.0, -2.0, 0.0, 3.0, 0.0], dtype=torch.float64)[::2]
    assert not grad_logp.is_contiguous()
    strided = _native.policy_step_backward_cpu(model_output, x, next_state, scalars, "v_prediction", grad_logp,
                                               need_x=True)
    packed = _native.policy_step_backward_cpu(model_output, x, next_state, scalars, "v_prediction",
                                              grad_logp.contiguous(), need_x=True)
    for a, b in zip(strided, packed):
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_the_backward_of_non_contiguous_inputs_gives_the_contiguous_result(dtype):
    """Mutants: the gradients allocated with x's own (permuted) strides, which the C++ op fills as if packed, and x
    passed by its raw data_ptr() instead of a contiguous copy, and the contiguous copies not kept alive until the
    kernel ran (freed, their memory reused by the next copy): gradients of a channels-last or transposed batch
    were scrambled across elements or computed from the wrong input."""
    model_output, x, next_state, grad_d = (t.transpose(1, 3) for t in randn(4, (3, 5, 4, 2), seed=20, dtype=dtype))
    assert not x.is_contiguous()
    scalars = random_rows(3, 21)
    grad_logp = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    strided = _native.policy_step_backward_cpu(model_output, x, next_state, scalars, "epsilon", grad_logp,
                                               grad_denoised=grad_d, need_x=True)
    packed = _native.policy_step_backward_cpu(
        *(t.contiguous() for t in (model_output, x, next_state)), scalars, "epsilon", grad_logp,
        grad_denoised=grad_d.contiguous(), need_x=True)
    for a, b in zip(strided, packed):
        assert torch.equal(a, b)


# -- kernels/policy_step.py: launch configuration ------------------------------------------------------------------

@pytest.fixture
def kernels():
    return pytest.importorskip("rlcm_fast.kernels.policy_step")


def expected_launch(rows: int, n: int, sms: int) -> tuple[int, int]:
    """The documented rule, written out independently: the largest power-of-two chunk of 512..4096 elements (or
    the row's own next power of two when smaller) that still gives 2 programs per SM, else the smallest allowed;
    256 elements per warp, 1..8 warps."""
    first = 1 << (n - 1).bit_length()
    candidates = [first] if first <= 512 else [b for b in (4096, 2048, 1024, 512) if b <= first]
    fitting = [b for b in candidates if rows * -(-n // b) >= 2 * sms]
    block = fitting[0] if fitting else candidates[-1]
    return block, min(8, max(1, block // 256))


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("rows", [1, 2, 8, 64])
@pytest.mark.parametrize("n", [140, 512, 513, 4620, 36864, 100_000])
def test_the_launch_config_is_the_largest_chunk_that_fills_the_device(kernels, monkeypatch, sms, rows, n):
    """Mutants: the first chunk floored at 512 for short rows, `block > _MIN_BLOCK` -> `>=` (256-element chunks,
    half a vector per thread), `< target` -> `<=` (chunks halved once too often), 1 program per SM instead of 2,
    and at most 4 warps: each leaves the kernels correct but the sampler's step slower on an H100 (132 SMs),
    which no interpreter run shows."""
    monkeypatch.setattr(kernels, "_multiprocessor_count", lambda device: sms)
    assert kernels._launch_config(rows, n, torch.device("cuda")) == expected_launch(rows, n, sms)


def test_the_interpreter_counts_as_one_multiprocessor(kernels):
    """Mutant: CPU tensors given 2 'SMs': under TRITON_INTERPRET=1 programs run one after another, so a one-row
    step of 4620 elements was cut into 2048-element chunks (3 programs) instead of two of 4096."""
    assert kernels._launch_config(1, 4620, torch.device("cpu")) == expected_launch(1, 4620, 1) == (4096, 8)


# -- kernels/policy_step.py: the step and its gradients (Triton's interpreter on CPU tensors) ------------------------

def reference_grads(model_output, x, scalars, prediction_type, step, weights, wrt):
    """Autograd through the float64 reference of sum(w * output) over (logp, D, x_next), for the inputs in `wrt`."""
    leaves = {"model_output": model_output.double().requires_grad_(True), "x": x.double().requires_grad_(True)}
    outputs = policy_step_reference(leaves["model_output"], leaves["x"], scalars, prediction_type,
                                    compute_dtype=torch.float64, **{k: v.double() for k, v in step.items()})
    objective = sum((w * out).sum() for w, out in zip(weights, (outputs[2], outputs[0], outputs[1])) if w is not None)
    return torch.autograd.grad(objective, [leaves[name] for name in wrt])


def assert_close_to(grad, expected):
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need Triton's interpreter")
@pytest.mark.parametrize("wrt", ["model_output", "x"])
def test_a_gradient_for_one_input_alone_is_that_input_s(kernels, wrt):
    """Mutants: needs_input_grad[0] and [1] swapped, and WRITE_GRAD_X always on: with only x requiring grad (an
    SDEdit-style start whose model output is detached) x got model_output's gradient or none, and with only
    model_output requiring grad the kernel wrote x's gradient through the placeholder pointer (a crash). Both were
    caught before only incidentally, by an error inside test_triton_step's pathwise-zero test."""
    model_output, x, next_state = randn(3, (2, 4, 5, 7), seed=30)
    scalars = random_rows(2, 31)
    inputs = {"model_output": model_output.clone(), "x": x.clone()}
    inputs[wrt].requires_grad_(True)
    kept = scalars.clone()
    denoised, _, logp = kernels.fused_policy_step(inputs["model_output"], inputs["x"], scalars, "epsilon",
                                                  next_state=next_state)
    weights = [torch.tensor([0.5, -2.0]), torch.randn(x.shape, generator=torch.Generator().manual_seed(32)), None]
    ((logp * weights[0]).sum() + (denoised * weights[1]).sum()).backward()
    (expected,) = reference_grads(model_output, x, scalars, "epsilon", {"next_state": next_state}, weights, [wrt])
    assert_close_to(inputs[wrt].grad, expected)
    other = "x" if wrt == "model_output" else "model_output"
    assert inputs[other].grad is None and torch.equal(scalars, kept)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need Triton's interpreter")
@pytest.mark.parametrize("mode", ["sampling", "training"])
def test_gradients_of_plain_sums_are_the_reference_s(kernels, mode):
    """Mutants: `.contiguous()` dropped from grad_logp and from _rows: `logp.sum()` and `denoised.sum()` hand the
    backward expanded (stride-0) gradients, the commonest objective there is; the kernel read rows 1.. of logp's
    gradient past its one stored element, and the (B, n) view of D's gradient failed."""
    model_output, x, given = randn(3, (3, 4, 5, 7), seed=33)
    scalars = random_rows(3, 34)
    step = {"noise" if mode == "sampling" else "next_state": given}
    leaves = [model_output.clone().requires_grad_(True), x.clone().requires_grad_(True)]
    denoised, sampled, logp = kernels.fused_policy_step(*leaves, scalars, "v_prediction", **step)
    objective = logp.sum() + denoised.sum() + (sampled.sum() if mode == "sampling" else 0)
    objective.backward()
    ones = [torch.ones(3), torch.ones(x.shape), torch.ones(x.shape) if mode == "sampling" else None]
    expected = reference_grads(model_output, x, scalars, "v_prediction", step, ones, ["model_output", "x"])
    for leaf, grad in zip(leaves, expected):
        assert_close_to(leaf.grad, grad)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need Triton's interpreter")
def test_non_contiguous_inputs_and_row_table_give_the_reference_s_values(kernels):
    """Mutants: `.contiguous()` dropped from _rows (a transposed or channels-last batch failed in `.view`) and
    from the row table (a strided float64 table, which `.to(float64)` leaves as it is, was read as packed: rows
    got other columns' scalars)."""
    model_output, x, noise = (t.transpose(1, 3) for t in randn(3, (2, 7, 5, 4), seed=35))
    scalars = strided_rows(random_rows(2, 36))
    denoised, sampled, logp = kernels.fused_policy_step(model_output, x, scalars, "epsilon", noise=noise)
    ref_denoised, ref_sampled, _ = policy_step_reference(model_output, x, scalars, "epsilon", noise=noise,
                                                         compute_dtype=torch.float64)
    torch.testing.assert_close(denoised, ref_denoised.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sampled, ref_sampled.float(), rtol=1e-5, atol=1e-5)
    ref_logp = policy_step_reference(model_output, x, scalars, "epsilon", next_state=sampled,
                                     compute_dtype=torch.float64)[2]
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need Triton's interpreter")
def test_a_row_of_three_chunks_sums_all_three(kernels):
    """Mutant: BLOCK_CHUNKS = num_chunks instead of its next power of two: a row of 3 chunks (here 9000 elements
    in 4096-element chunks) made tl.arange(0, 3) in the reducing kernel, which Triton refuses."""
    model_output, x, noise = randn(3, (1, 9000), seed=37)
    scalars = random_rows(1, 38)
    assert -(-9000 // kernels._launch_config(1, 9000, x.device)[0]) == 3
    _, sampled, logp = kernels.fused_policy_step(model_output, x, scalars, "sample", noise=noise)
    ref_logp = policy_step_reference(model_output, x, scalars, "sample", next_state=sampled,
                                     compute_dtype=torch.float64)[2]
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need Triton's interpreter")
def test_sampling_keeps_no_input_alive_for_the_backward(kernels):
    """Mutant: sampling mode saving model_output, x and the noise like training: the sampler's graph (a step per
    timestep) then held three latents per step for a gradient that only needs the scalars."""
    model_output, x, noise = randn(3, (2, 3, 4), seed=39)
    scalars = random_rows(2, 40)
    denoised, _, _ = kernels.fused_policy_step(model_output.requires_grad_(True), x, scalars, "epsilon", noise=noise)
    saved = denoised.grad_fn.saved_tensors
    assert [t is None for t in saved] == [True, True, False, True] and torch.equal(saved[2], scalars)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need Triton's interpreter")
def test_the_triton_entry_point_refuses_noise_or_next_state_that_requires_grad(kernels):
    """Mutant: fused_policy_step's requires_grad check reduced to the scalars: a noise (or stored action) that
    requires grad was taken and silently given no gradient, where the reference would give one."""
    x = torch.zeros(2, 3, 4)
    for step in ({"noise": x.clone().requires_grad_(True)}, {"next_state": x.clone().requires_grad_(True)}):
        with pytest.raises(NotImplementedError, match="gradients w.r.t. the noise, next_state or scalars are not"):
            kernels.fused_policy_step(x, x, random_rows(2, 41), "epsilon", **step)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need Triton's interpreter")
@pytest.mark.parametrize("mode", ["sampling", "training"])
def test_the_triton_entry_point_takes_an_empty_batch(kernels, mode):
    """Mutant: the empty-batch branch dropped: a (0, ...) batch (the last minibatch of a filtered prompt list)
    launched an empty grid on empty row views instead of returning empty results. Caught through policy_step
    already; this is the public entry point's own contract."""
    empty = torch.zeros(0, 4, 3)
    step = {"noise" if mode == "sampling" else "next_state": empty}
    denoised, sampled, logp = kernels.fused_policy_step(empty, empty, torch.zeros(0, 6, dtype=torch.float64),
                                                        "sample", **step)
    assert denoised.shape == sampled.shape == (0, 4, 3) and logp.shape == (0,) and logp.dtype == torch.float32


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need Triton's interpreter")
def test_the_triton_entry_point_refuses_rows_of_no_elements_like_the_cpp_op(kernels):
    """Found by the mutant dropping _native's `size == 0` check: the C++ op's wrapper refuses a (2, 0, 3) batch
    with a one-line error, but the Triton entry point (the CUDA path of policy_step) failed with a bare
    `ZeroDivisionError: integer division or modulo by zero` from its launch configuration."""
    empty_rows = torch.zeros(2, 0, 3)
    with pytest.raises(ValueError, match=r"^x must have shape \(B, \.\.\.\) with at least one element per row, "
                                         r"got \(2, 0, 3\)$"):
        kernels.fused_policy_step(empty_rows, empty_rows, random_rows(2, 42), "sample", noise=empty_rows)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_policy_step_refuses_rows_of_no_elements_on_every_backend(backend):
    """Found beside the Triton entry point's bug: policy_step let a (2, 0, 3) batch through to its backends, where
    the reference returned NaN log-probs (a mean over no elements) instead of an error."""
    from rlcm_fast.policy_step import policy_step

    empty_rows = torch.zeros(2, 0, 3)
    with pytest.raises(ValueError, match=r"^x must have shape \(B, \.\.\.\) with at least one element per row, "
                                         r"got \(2, 0, 3\)$"):
        policy_step(empty_rows, empty_rows, random_rows(2, 42), "sample", noise=empty_rows, backend=backend)
