"""What every policy-step backend promises beyond matching the reference's values (test_native_step.py,
test_triton_step.py): the row table equals LCMScheduler.step's, each input's gradient on its own, the input
refusals of policy_step and of the public Triton entry point, the stored next state handed back as it is, and
the C++ op's double-precision sums and thread count. Seeded; the Triton cases run under TRITON_INTERPRET=1 on
a CPU (tests/conftest.py). Each test fails under a mutant of the code that its old neighbours let pass."""

import pytest
import torch
from diffusers import LCMScheduler

from rlcm_fast import _native
from rlcm_fast.policy_step import PREDICTION_TYPES, policy_step, row_scalars_for_schedule


def _backends():
    try:
        import triton  # noqa: F401
    except ImportError:
        return ("native", "reference")
    return ("native", "triton", "reference")


def _fused_backends():
    return [b for b in _backends() if b != "reference"]


def _scheduler(prediction_type="epsilon"):
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             prediction_type=prediction_type)
    scheduler.set_timesteps(8, original_inference_steps=50)
    return scheduler


def _rows(batch, seed):
    scheduler = _scheduler()
    t = scheduler.timesteps
    pick = torch.randint(0, len(t) - 1, (batch,), generator=torch.Generator().manual_seed(seed))
    return row_scalars_for_schedule(scheduler, t[pick], t[pick + 1])


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_the_row_table_and_reference_step_equal_lcm_scheduler_step(prediction_type):
    """Every backend is tested against policy_step_reference with the same ROW_SCALARS table, so a table
    whose columns are wrong (c_skip and c_out swapped, say) passed them all: check it against diffusers'
    LCMScheduler.step, denoised and next state (its noise replayed from the same generator)."""
    scheduler = _scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    model_output, x = (torch.randn(1, 4, 6, 6, generator=g, dtype=torch.float64) for _ in range(2))
    for k in range(len(scheduler.timesteps) - 1):
        t, t_next = scheduler.timesteps[k], scheduler.timesteps[k + 1]
        out = scheduler.step(model_output, t, x, generator=torch.Generator().manual_seed(k), return_dict=True)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        table = row_scalars_for_schedule(scheduler, t.reshape(1), t_next.reshape(1))
        denoised, x_next, _ = policy_step(model_output, x, table, prediction_type, noise=noise, backend="reference")
        torch.testing.assert_close(denoised, out.denoised, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_next, out.prev_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ("sampling", "training"))
@pytest.mark.parametrize("backend", _fused_backends())
def test_fused_backends_give_x_its_gradient_when_model_output_needs_none(backend, mode):
    """Every other test asks for model_output's gradient; a backend that read need_x from model_output's
    needs_input_grad flag gave x no gradient when only x requires one."""
    g = torch.Generator().manual_seed(20)
    mo, x, given, w_d, w_next = (torch.randn(2, 4, 5, 6, generator=g) for _ in range(5))
    w_logp = torch.randn(2, generator=g)
    scalars = _rows(2, seed=21)
    grads = {}
    for name, dtype in ((backend, torch.float32), ("reference", torch.float64)):
        leaf = x.to(dtype).requires_grad_(True)
        step = {"noise" if mode == "sampling" else "next_state": given.to(dtype)}
        denoised, sampled, logp = policy_step(mo.to(dtype), leaf, scalars, "epsilon", **step, backend=name)
        objective = (denoised * w_d.to(dtype)).sum() + (logp * w_logp.to(dtype)).sum()
        if mode == "sampling":
            objective = objective + (sampled * w_next.to(dtype)).sum()
        (grads[name],) = torch.autograd.grad(objective, leaf)
    exact = grads["reference"]
    torch.testing.assert_close(grads[backend].double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


@pytest.mark.parametrize("backend", _fused_backends())
def test_fused_backends_refuse_scalars_that_require_grad(backend):
    """The fused steps have no gradient for the row table: a table that requires grad must be refused, not
    given a silent None gradient."""
    x = torch.zeros(2, 4, 3, 3)
    scalars = _rows(2, seed=22).requires_grad_(True)
    with pytest.raises(NotImplementedError, match="no gradient with respect to"):
        policy_step(x, x, scalars, "epsilon", noise=x, backend=backend)


def test_the_triton_entry_point_itself_refuses_bad_shapes_and_scalars_with_grad():
    """fused_policy_step is public API: its own checks, not only policy_step's, must hold."""
    kernels = pytest.importorskip("rlcm_fast.kernels.policy_step")
    x = torch.zeros(2, 4, 3, 3)
    scalars = _rows(2, seed=23)
    with pytest.raises(ValueError, match="must have the same shape"):
        kernels.fused_policy_step(x, x, scalars, "epsilon", noise=x[:, :2].contiguous())
    with pytest.raises(ValueError, match="must have the same shape"):
        kernels.fused_policy_step(x, x, scalars, "epsilon", next_state=x[:, :, :2].contiguous())
    with pytest.raises(NotImplementedError, match="not implemented"):
        kernels.fused_policy_step(x, x, scalars.clone().requires_grad_(True), "epsilon", noise=x)
    for name, dtype in (("x", torch.float64), ("noise/next_state", torch.int64), ("model_output", torch.float64)):
        args = {"model_output": x, "x": x, "noise/next_state": x, name: x.to(dtype)}
        with pytest.raises(ValueError, match=f"{name} is {dtype}; the Triton policy step takes torch.float32, "
                                             "torch.bfloat16, torch.float16"):
            kernels.fused_policy_step(args["model_output"], args["x"], scalars, "epsilon",
                                      noise=args["noise/next_state"])


@pytest.mark.parametrize("backend", _backends())
def test_a_row_table_with_the_wrong_column_count_is_a_one_line_error(backend):
    x = torch.zeros(3, 4, 5, 5)
    rows = _rows(3, seed=24)
    for table in (rows[:, :5], torch.cat([rows, rows[:, :1]], dim=1)):
        with pytest.raises(ValueError, match=r"scalars must have shape \(3, 6\)"):
            policy_step(x, x, table, "epsilon", noise=x, backend=backend)


@pytest.mark.parametrize("name", ("model_output", "noise"))
@pytest.mark.parametrize("backend", _backends())
def test_integer_model_output_or_noise_is_a_one_line_error(backend, name):
    x = torch.zeros(3, 4, 5, 5)
    args = {"model_output": x, "noise": x, name: torch.zeros(3, 4, 5, 5, dtype=torch.int64)}
    with pytest.raises(ValueError, match="must be a floating tensor of x's shape"):
        policy_step(args["model_output"], x, _rows(3, seed=25), "epsilon", noise=args["noise"], backend=backend)


@pytest.mark.parametrize("backend", _backends())
def test_a_one_dimensional_x_is_a_one_line_error_on_every_backend(backend):
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"x must be a floating tensor of shape \(B, \.\.\.\)"):
        policy_step(x, x, _rows(3, seed=26), "epsilon", noise=x, backend=backend)


@pytest.mark.parametrize("backend", _backends())
def test_training_returns_the_given_next_state_itself_on_every_backend(backend):
    g = torch.Generator().manual_seed(27)
    mo, x, stored = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    _, next_state, _ = policy_step(mo, x, _rows(2, seed=28), "epsilon", next_state=stored, backend=backend)
    assert next_state is stored


def test_the_cpp_op_uses_torch_s_thread_count_beyond_one():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _native._thread_count(0) == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not _native.native_available(), reason="rlcm_fast._C is not built")
def test_the_cpp_log_prob_sums_squares_in_double():
    """csrc/ sums the squared residuals in double (module docstring). Residuals of 4096 (square 2^24) opening
    each accumulator lane, then 1s: a float accumulator rounds every 2^24 + 1 back to 2^24 and loses them all."""
    n = 8192
    residual = torch.ones(1, n)
    residual[0, :8] = 4096.0
    zeros = torch.zeros(1, n)
    # sample prediction, c_out = 1, c_skip = 0, alpha_next = sigma_next = 1: D = model_output = 0, mean = 0.
    scalars = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    _, _, logp = _native.policy_step_forward_cpu(zeros, zeros, scalars, "sample", next_state=residual)
    exact = -(residual.double() ** 2).mean() / 2 - 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))
    torch.testing.assert_close(logp.double(), exact.reshape(1), rtol=0, atol=2e-3)


@pytest.mark.skipif(not _native.native_available(), reason="rlcm_fast._C is not built")
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_the_cpp_backward_gives_each_gradient_alone_as_it_gives_both(dtype, prediction_type):
    """The C++ backward has three loops (both gradients, model_output only, x only): they must agree."""
    g = torch.Generator().manual_seed(29)
    mo, x, next_state, grad_d = (torch.randn(3, 4, 7, 5, generator=g).to(dtype) for _ in range(4))
    grad_logp = torch.randn(3, generator=g).to(dtype)
    scalars = _rows(3, seed=30)
    call = lambda **need: _native.policy_step_backward_cpu(mo, x, next_state, scalars, prediction_type, grad_logp,
                                                            grad_denoised=grad_d, **need)
    both = call(need_model_output=True, need_x=True)
    only_model_output = call(need_model_output=True, need_x=False)
    only_x = call(need_model_output=False, need_x=True)
    assert only_model_output[1] is None and only_x[0] is None
    assert torch.equal(only_model_output[0], both[0])
    assert torch.equal(only_x[1], both[1])


@pytest.mark.parametrize("mode", ("noise", "next_state"))
@pytest.mark.parametrize("name", ("model_output", "x", "given"))
@pytest.mark.parametrize("backend", _backends())
def test_tensors_on_two_devices_are_a_one_line_error_on_every_backend(backend, name, mode):
    """A tensor on another device (here the meta device beside the CPU; on a GPU machine, another GPU) is refused
    before any backend runs: torch's ops failed deep inside, and a Triton launch would read another GPU's memory."""
    x = torch.zeros(2, 4, 3, 3)
    args = {"model_output": x, "x": x, "given": x, name: torch.zeros(2, 4, 3, 3, device="meta")}
    devices = ", ".join("meta" if key == name else "cpu" for key in ("model_output", "x", "given"))
    with pytest.raises(ValueError, match=rf"^model_output, x and noise/next_state must be on one device, got "
                                         rf"{devices}$"):
        policy_step(args["model_output"], args["x"], _rows(2, seed=27), "epsilon", backend=backend,
                    **{mode: args["given"]})


def test_the_triton_entry_point_itself_refuses_tensors_on_two_devices():
    kernels = pytest.importorskip("rlcm_fast.kernels.policy_step")
    x = torch.zeros(2, 4, 3, 3)
    with pytest.raises(ValueError, match="must be on one device, got cpu, cpu, meta"):
        kernels.fused_policy_step(x, x, _rows(2, seed=28), "epsilon", next_state=x.to("meta"))


def test_the_launch_guard_is_the_tensors_gpu_and_nothing_on_the_cpu():
    """Triton launches on the thread's current CUDA device, not the tensors' (a new thread's is device 0, as on
    the reward's worker thread): on_tensors_device makes the tensors' GPU current, and is nothing on the CPU."""
    kernels = pytest.importorskip("rlcm_fast.kernels.policy_step")
    guard = kernels.on_tensors_device(torch.zeros(1))
    with guard:  # nothing to switch on the CPU (the interpreter's tensors)
        pass
    assert not isinstance(guard, torch.cuda.device)

    class OnSecondGpu:  # a CUDA tensor without CUDA: only its device is read
        device = torch.device("cuda", 1)

    guard = kernels.on_tensors_device(OnSecondGpu())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@pytest.mark.parametrize("mode", ("sampling", "training"))
def test_the_fused_step_launches_forward_and_backward_under_its_tensors_device_guard(monkeypatch, mode):
    """Each launch (the forward's, and the backward's, which a user may also call from another thread) happens
    inside on_tensors_device for the step's tensors: a guard that records the kernels it saw launched."""
    kernels = pytest.importorskip("rlcm_fast.kernels.policy_step")
    guarded, launches = [], []

    class Recording:
        def __init__(self, tensor):
            self.tensor = tensor

        def __enter__(self):
            guarded.append(self.tensor.device)
            launches.append("enter")

        def __exit__(self, *exc):
            launches.append("exit")

    for name in ("_forward", "_backward"):
        original = getattr(kernels, name)

        def recorded(*args, _original=original, _name=name):
            launches.append(_name)
            return _original(*args)

        monkeypatch.setattr(kernels, name, recorded)
    monkeypatch.setattr(kernels, "on_tensors_device", Recording)
    generator = torch.Generator().manual_seed(29)
    model_output = torch.randn(2, 4, 3, 3, generator=generator, requires_grad=True)
    x = torch.randn(2, 4, 3, 3, generator=generator)
    given = torch.randn(2, 4, 3, 3, generator=generator)
    outputs = kernels.fused_policy_step(model_output, x, _rows(2, seed=29), "epsilon",
                                        **({"noise": given} if mode == "sampling" else {"next_state": given}))
    outputs[-1].sum().backward()
    assert launches == ["enter", "_forward", "exit", "enter", "_backward", "exit"]
    assert guarded == [x.device, x.device]
