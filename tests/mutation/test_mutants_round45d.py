"""Mutation-testing round 45d (csrc/policy_step.cpp): hand-written mutants of the C++ policy step (its argument
checks and their messages, the chunk layout, the log-prob's scalars) were run against the tests of the C++ op
(test_native_step, test_policy_step, test_policy_step_contract, test_mutants_round44e); each test here kills one
that survived (named in its docstring). The checks of rlcm_fast._C itself are called with raw addresses, as
rlcm_fast._native calls them, since the wrapper never lets such arguments through. All are CPU-only, seeded and
fast, and skip where rlcm_fast._C is not built."""

import math
import os
import threading

import pytest
import torch

from rlcm_fast import _native
from rlcm_fast.policy_step import policy_step_reference
from test_mutants_round44e import random_rows

pytestmark = pytest.mark.skipif(not _native.native_available(), reason="rlcm_fast._C is not built")

SUFFIX = {torch.float32: "float32", torch.float64: "float64"}


def raw_buffers(rows: int, row_size: int, dtype=torch.float32, seed: int = 0) -> dict:
    """Valid contiguous buffers for a raw _C call (at least one row, so no address is 0), kept alive by the dict."""
    g = torch.Generator().manual_seed(seed)
    size = (max(rows, 1), max(row_size, 1))
    state = {name: torch.randn(size, generator=g, dtype=torch.float64).to(dtype)
             for name in ("model_output", "x", "noise", "next_state", "denoised", "grad_denoised", "grad_next",
                          "grad_model_output", "grad_x")}
    state["logp"] = torch.empty(size[0], dtype=dtype)
    state["scalars"] = random_rows(size[0], seed + 1)
    state["grad_logp"] = torch.ones(size[0], dtype=torch.float64)
    return state


FORWARD_POINTERS = ("model_output", "x", "noise", "next_state", "scalars", "denoised", "logp")
BACKWARD_POINTERS = ("model_output", "x", "next_state", "scalars", "grad_logp", "grad_denoised", "grad_next",
                     "grad_model_output", "grad_x")


def raw_forward(buffers: dict, rows: int, row_size: int, prediction_type: int = 0, num_threads: int = 1,
                dtype=torch.float32, **addresses):
    """_C's forward on `buffers`' addresses; `addresses` overrides some (0: null)."""
    pointers = {name: buffers[name].data_ptr() for name in FORWARD_POINTERS} | addresses
    forward = getattr(_native._C, f"policy_step_forward_{SUFFIX[dtype]}")
    return forward(*(pointers[name] for name in FORWARD_POINTERS), rows, row_size, prediction_type, num_threads)


def raw_backward(buffers: dict, rows: int, row_size: int, prediction_type: int = 0, num_threads: int = 1,
                 dtype=torch.float32, **addresses):
    pointers = {name: buffers[name].data_ptr() for name in BACKWARD_POINTERS} | addresses
    backward = getattr(_native._C, f"policy_step_backward_{SUFFIX[dtype]}")
    return backward(*(pointers[name] for name in BACKWARD_POINTERS), rows, row_size, prediction_type, num_threads)


# -- the extension's own argument checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("call", [raw_forward, raw_backward], ids=["forward", "backward"])
@pytest.mark.parametrize("rows, row_size, message", [
    (-1, 4, r"^rows must be >= 0, got -1$"),
    (2, 0, r"^row_size must be > 0, got 0$"),
    (2, -3, r"^row_size must be > 0, got -3$"),
])
def test_a_negative_row_count_or_an_empty_row_is_refused_with_its_value(call, rows, row_size, message):
    """Mutants: the `rows < 0` check dropped (-1 rows became a vector of 2^64 - 1 chunk sums, std::length_error,
    or a loop over no items that returned nothing written), its message's count off by one ('got 0' for -1 rows),
    and `row_size <= 0` -> `< 0` (rows of no elements: a mean over 0 elements, a NaN log-prob, instead of an
    error). The extension is public (_native only wraps it) and its docstrings promise these checks."""
    with pytest.raises(ValueError, match=message):
        call(raw_buffers(2, 4), rows, row_size)


@pytest.mark.parametrize("call", [raw_forward, raw_backward], ids=["forward", "backward"])
def test_a_negative_thread_count_is_refused_and_the_message_says_what_0_means(call):
    """Mutants: `num_threads < 0` -> `< -1` (-1 ran on all cores as if it were 0, where the caller's value is
    plainly wrong) and the message's '(0 = all cores)' dropped (the one fact a caller needs to ask for the
    default)."""
    with pytest.raises(ValueError, match=r"^num_threads must be >= 0 \(0 = all cores\), got -1$"):
        call(raw_buffers(2, 4), 2, 4, num_threads=-1)


@pytest.mark.parametrize("call", [raw_forward, raw_backward], ids=["forward", "backward"])
@pytest.mark.parametrize("code", [-1, 3])
def test_a_prediction_code_out_of_range_is_refused(call, code):
    """Mutants: `prediction_type > 2` -> `> 3` and the `< 0` half dropped: code 3 or -1 passed the check, matched
    no case of the dispatch switch and returned with nothing written (denoised, logp and the gradients left as
    torch.empty's garbage) instead of an error."""
    with pytest.raises(ValueError, match=rf"^prediction_type must be 0 \(epsilon\), 1 \(v_prediction\) or 2 "
                                         rf"\(sample\), got {code}$"):
        call(raw_buffers(2, 4), 2, 4, prediction_type=code)


@pytest.mark.parametrize("call, pointers", [(raw_forward, FORWARD_POINTERS), (raw_backward, BACKWARD_POINTERS)],
                         ids=["forward", "backward"])
def test_an_empty_batch_reads_and_writes_nothing(call, pointers):
    """Mutants: the `rows == 0` early return dropped from forward or backward: an empty batch (the last minibatch
    of a filtered prompt list, whose empty tensors may have address 0) then failed the null-pointer checks."""
    assert call(raw_buffers(2, 4), 0, 4, **{name: 0 for name in pointers}) is None


@pytest.mark.parametrize("mode", ["sampling", "training"])
@pytest.mark.parametrize("name", ["model_output", "x", "next_state", "scalars", "denoised", "logp"])
def test_forward_names_the_null_pointer(name, mode):
    """Mutants: the null check `address == 0` -> `== 1`, and logp left out of the checked pointers: a null buffer
    (an address slip by a caller of the raw interface) was written or read through, a segfault that takes the
    Python process down, instead of a one-line ValueError naming the buffer."""
    buffers = raw_buffers(2, 4)
    noise = {} if mode == "sampling" else {"noise": 0}
    with pytest.raises(ValueError, match=rf"^{name} must not be a null pointer$"):
        raw_forward(buffers, 2, 4, **noise, **{name: 0})


@pytest.mark.parametrize("name", ["model_output", "x", "next_state", "scalars"])
def test_backward_names_the_null_pointer_it_would_read(name):
    """Mutants: the scalars check dropped from backward (every row's gains read through address 0) and the null
    checks disabled: the log-prob term reads model_output, x and next_state, so with grad_logp given each must be
    a real buffer, and a null one is named in a one-line error rather than dereferenced."""
    with pytest.raises(ValueError, match=rf"^{name} must not be a null pointer$"):
        raw_backward(raw_buffers(2, 4), 2, 4, **{name: 0})


def test_backward_with_no_output_buffer_is_refused():
    """Mutant: the check that grad_model_output and grad_x are not both null dropped: the x-only loop then wrote
    every gradient through address 0 (a segfault) instead of refusing a call that asks for nothing."""
    with pytest.raises(ValueError, match="^grad_model_output and grad_x must not both be null pointers$"):
        raw_backward(raw_buffers(2, 4), 2, 4, grad_model_output=0, grad_x=0)


def test_sampling_backward_reads_no_input_state():
    """The other side of the null checks: without grad_logp (sampling mode) model_output, x and next_state are not
    read, so they may be 0, and the gradient is the pathwise one, gain * (grad_denoised + alpha_next grad_next)."""
    buffers = raw_buffers(2, 4, dtype=torch.float64)
    raw_backward(buffers, 2, 4, prediction_type=2, dtype=torch.float64, model_output=0, x=0, next_state=0,
                 grad_logp=0)
    c_skip, c_out, alpha_next = (buffers["scalars"][:, i:i + 1] for i in (2, 3, 4))
    pathwise = buffers["grad_denoised"] + alpha_next * buffers["grad_next"]
    torch.testing.assert_close(buffers["grad_model_output"], c_out * pathwise, rtol=1e-15, atol=0)
    torch.testing.assert_close(buffers["grad_x"], c_skip * pathwise, rtol=1e-15, atol=0)


# -- the chunk layout ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("row_size", [8193, 2 * 8192 + 1])
def test_a_row_one_element_past_a_whole_chunk_is_computed_to_its_last_element(dtype, row_size):
    """Mutant: the chunk count `(row_size + kChunkElements - 1) / kChunkElements` -> `- 2`: a row of k * 8192 + 1
    elements lost its last chunk (one element), left as torch.empty's garbage in denoised, the next state and both
    gradients and missing from the log-prob's sum. The tested rows were 140, 9600 and 36864 elements long."""
    g = torch.Generator().manual_seed(40)
    model_output, x, noise, grad_d = (torch.randn(2, row_size, generator=g, dtype=torch.float64).to(dtype)
                                      for _ in range(4))
    scalars = random_rows(2, 41)
    denoised, next_state, logp = _native.policy_step_forward_cpu(model_output, x, scalars, "epsilon", noise=noise)
    ref = policy_step_reference(model_output, x, scalars, "epsilon", noise=noise, compute_dtype=dtype)
    assert torch.equal(denoised, ref[0]) and torch.equal(next_state, ref[1])
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(logp, ref[2], rtol=tolerance, atol=tolerance)
    grad_logp = torch.tensor([0.5, -2.0], dtype=torch.float64)
    grads = _native.policy_step_backward_cpu(model_output, x, next_state, scalars, "epsilon", grad_logp,
                                             grad_denoised=grad_d, need_x=True)
    leaves = [model_output.double().requires_grad_(True), x.double().requires_grad_(True)]
    d64, _, logp64 = policy_step_reference(*leaves, scalars, "epsilon", next_state=next_state.double(),
                                           compute_dtype=torch.float64)
    expected = torch.autograd.grad((logp64 * grad_logp).sum() + (d64 * grad_d.double()).sum(), leaves)
    for grad, exact in zip(grads, expected):
        torch.testing.assert_close(grad.double(), exact, rtol=tolerance, atol=tolerance * exact.abs().max().item())


# -- the log-prob's scalars ------------------------------------------------------------------------------------------

LOG_SQRT_2PI = 0.91893853320467274178  # the nearest double to 0.5 * log(2 pi), as csrc/ writes it


def test_float32_log_probs_are_the_double_formula_rounded_once():
    """Mutants: policy_std returning the row's float64 sigma_next instead of it rounded to float32 (the std of the
    Gaussian the reference and the sampled next state use), and each squared residual rounded to float32 before
    the double sum. Both move a float32 log-prob by up to an ulp or two, under the 1e-5 tolerance of the other
    tests; the contract (csrc/policy_step.cpp's header) is float32 residuals, squares summed in double, std =
    float32(sigma_next), and one rounding to float32 at the end. With a small std the squared term dominates."""
    rows, n = 64, 8
    g = torch.Generator().manual_seed(5)
    model_output, x, next_state = (torch.randn(rows, n, generator=g) for _ in range(3))
    scalars = torch.empty(rows, 6, dtype=torch.float64)
    scalars[:, 0] = torch.rand(rows, generator=g, dtype=torch.float64) * 0.8 + 0.1
    scalars[:, 1] = (1 - scalars[:, 0] ** 2).sqrt()
    scalars[:, 2:5] = torch.rand(rows, 3, generator=g, dtype=torch.float64) * 0.8 + 0.1
    scalars[:, 5] = 1e-3 * (1 + torch.rand(rows, generator=g, dtype=torch.float64))
    _, _, logp = _native.policy_step_forward_cpu(model_output, x, scalars, "epsilon", next_state=next_state)
    denoised = policy_step_reference(model_output, x, scalars, "epsilon", next_state=next_state)[0]
    residual = next_state - scalars[:, 4:5].float() * denoised  # in float32, as the reference forms it
    expected = []
    for row in range(rows):
        std = float(scalars[row, 5].float())
        mean_square = math.fsum(value * value for value in residual[row].double().tolist()) / n
        expected.append(-mean_square / (2 * std * std) - math.log(std) - LOG_SQRT_2PI)
    assert torch.equal(logp, torch.tensor(expected, dtype=torch.float64).float())


@pytest.mark.parametrize("std", [1.0, 2.0, 0.25])
def test_an_exact_hit_has_the_gaussian_s_peak_log_density_to_the_last_bit(std):
    """Mutant: log(sqrt(2 pi)) written with 14 digits (0.91893853320467): every float64 log-prob 2.7e-15 off,
    far under the 1e-12 tolerance of the other tests but a wrong constant. Sample prediction with c_out = 1,
    c_skip = 0 and alpha_next = 1 makes the mean the model output itself, so next_state = model_output is an
    exact hit: logp = -log(std) - log(sqrt(2 pi)), computed exactly as written."""
    g = torch.Generator().manual_seed(50)
    model_output, x = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    scalars = torch.tensor([[0.6, 0.8, 0.0, 1.0, 1.0, std]] * 2, dtype=torch.float64)
    _, _, logp = _native.policy_step_forward_cpu(model_output, x, scalars, "sample", next_state=model_output.clone())
    assert abs(LOG_SQRT_2PI - 0.5 * math.log(2 * math.pi)) <= math.ulp(LOG_SQRT_2PI)  # the libm value, 1 ulp off
    assert logp.tolist() == [-math.log(std) - LOG_SQRT_2PI] * 2


def test_the_float32_log_prob_gradient_factor_is_formed_in_double_and_rounded_once():
    """Mutant: the backward's per-row factor alpha_next * grad_logp / (std^2 n) formed from alpha_next already
    rounded to float32: the factor, and with it the gradient of many rows, moves by an ulp, under the 1e-5
    tolerance of the autograd comparisons. csrc/policy_step.cpp promises the per-row factors formed in double and
    rounded once to T, and the residual recomputed in T as in the forward pass; sample prediction makes the model
    output's gain c_out, so each gradient element is float32(c_out) * (float32(factor) * residual) exactly."""
    rows, n = 64, 8
    g = torch.Generator().manual_seed(60)
    model_output, x, next_state = (torch.randn(rows, n, generator=g) for _ in range(3))
    scalars = random_rows(rows, 61)
    grad_logp = torch.randn(rows, generator=g, dtype=torch.float64)
    grad, _ = _native.policy_step_backward_cpu(model_output, x, next_state, scalars, "sample", grad_logp)
    denoised = policy_step_reference(model_output, x, scalars, "sample", next_state=next_state)[0]
    residual = next_state - scalars[:, 4:5].float() * denoised
    factor = []
    for row in range(rows):
        alpha_next, std = scalars[row, 4].item(), float(scalars[row, 5].float())
        factor.append(alpha_next * grad_logp[row].item() / (std * std * n))
    factor = torch.tensor(factor, dtype=torch.float64).float().reshape(rows, 1)
    assert torch.equal(grad, scalars[:, 3:4].float() * (factor * residual))


# -- the thread count ------------------------------------------------------------------------------------------------

def threads_started_and_ended_during(calls: int, run) -> set:
    """The threads of this process that appeared while `run` was called `calls` times and were gone after: the
    helpers the C++ op starts and joins (it releases the GIL, so the watcher lists the threads beside it). Threads
    alive before or after (torch's pools, other tests' threads) and the watcher itself are left out."""
    run()  # warm-up: whatever torch starts once is in the baseline
    before, seen, done, watcher = set(os.listdir("/proc/self/task")), set(), threading.Event(), []

    def watch():
        watcher.append(str(threading.get_native_id()))
        while not done.is_set():
            seen.update(os.listdir("/proc/self/task"))

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        for _ in range(calls):
            run()
    finally:
        done.set()
        thread.join()
    return seen - before - set(os.listdir("/proc/self/task")) - set(watcher)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through /proc")
@pytest.mark.parametrize("shape, num_threads", [((8, 4, 96, 96), 1), ((7, 8192), 4)], ids=["one-thread", "small"])
def test_one_thread_or_a_small_input_runs_on_the_calling_thread_alone(shape, num_threads):
    """Mutants: `requested > 0 ? requested : all cores` -> `> 1` (num_threads=1, a caller keeping the op off the
    other cores, ran on every core) and the 65536-elements-per-thread floor dropped (a 57344-element step split
    over 4 threads, each start costing more than its share of the work; _native's docstring promises small
    inputs run on the calling thread). Values are the same either way, so only the thread count shows it."""
    g = torch.Generator().manual_seed(90)
    model_output, x, noise = (torch.randn(shape, generator=g) for _ in range(3))
    scalars = random_rows(shape[0], 91)
    run = lambda: _native.policy_step_forward_cpu(model_output, x, scalars, "epsilon", noise=noise,
                                                  num_threads=num_threads)
    assert threads_started_and_ended_during(60, run) == set()


# -- found by the round ----------------------------------------------------------------------------------------------

def test_a_thread_count_past_a_c_int_is_taken_like_any_other_large_count():
    """Found beside the num_threads mutants (`< 0` -> `< -1`, requested 1 taken as 0): _native's check accepts any
    int >= 0 and the C++ op caps threads by its work anyway, but a count past 2**31 - 1 reached the binding's C
    int and failed with pybind11's 'incompatible function arguments' TypeError, listing every raw buffer address,
    instead of running (or a one-line error)."""
    g = torch.Generator().manual_seed(70)
    model_output, x, noise = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    scalars = random_rows(2, 71)
    one = _native.policy_step_forward_cpu(model_output, x, scalars, "epsilon", noise=noise, num_threads=1)
    many = _native.policy_step_forward_cpu(model_output, x, scalars, "epsilon", noise=noise, num_threads=2**31)
    for a, b in zip(many, one):
        assert torch.equal(a, b)
