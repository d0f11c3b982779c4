"""The policy step's dispatch and its C++ path through autograd, against the float64 reference."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler

from rlcm_fast.policy_step import (PREDICTION_TYPES, consistency_output, policy_step, policy_step_reference,
                                   row_scalars_for_schedule, select_backend)


def mixed_rows(batch, seed=0):
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    scheduler.set_timesteps(8, original_inference_steps=50)
    t = scheduler.timesteps
    pick = torch.randint(0, len(t) - 1, (batch,), generator=torch.Generator().manual_seed(seed))
    return row_scalars_for_schedule(scheduler, t[pick], t[pick + 1])


def independent_logp(x_next, mean, std):
    """The action's log-density (README, "The algorithm"), per element in float64, without the package's code."""
    n = mean[0].numel()
    out = []
    for b in range(mean.shape[0]):
        s = float(std[b])
        terms = -((x_next[b].double() - mean[b].double()) ** 2) / (2 * s * s) - math.log(s) - 0.5 * math.log(2 * math.pi)
        out.append(terms.sum().item() / n)
    return torch.tensor(out, dtype=torch.float64)


def test_a_negative_next_timestep_takes_the_scheduler_s_final_alpha_as_lcm_scheduler_step_does():
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # final alpha 1
    table = row_scalars_for_schedule(scheduler, torch.tensor([19, 19]), torch.tensor([0, -1]))
    a_next = torch.tensor([float(scheduler.alphas_cumprod[0]), 1.0], dtype=torch.float64)
    torch.testing.assert_close(table[:, 4], a_next.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(table[:, 5], (1 - a_next).sqrt(), rtol=1e-12, atol=0)


def test_cpu_float_tensors_dispatch_to_the_native_op():
    assert select_backend(torch.zeros(2, 3)) == "native"
    assert select_backend(torch.zeros(2, 3, dtype=torch.bfloat16)) == "reference"


def test_float64_accelerator_tensors_skip_the_float32_triton_kernel(monkeypatch):
    from rlcm_fast import policy_step as module

    monkeypatch.setattr(module, "_triton_ready", lambda tensor: True)  # as for CUDA tensors with Triton
    assert select_backend(torch.zeros(2, 3, device="meta", dtype=torch.bfloat16)) == "triton"
    assert select_backend(torch.zeros(2, 3, device="meta", dtype=torch.float64)) == "reference"


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_log_prob_equals_an_independent_float64_formula(prediction_type):
    g = torch.Generator().manual_seed(1)
    mo, x, z = (torch.randn(3, 4, 5, 6, generator=g) for _ in range(3))
    scalars = mixed_rows(3)
    denoised, x_next, logp = policy_step(mo, x, scalars, prediction_type, noise=z)
    mean = scalars[:, 4].reshape(3, 1, 1, 1) * denoised.double()
    torch.testing.assert_close(logp.double(), independent_logp(x_next, mean, scalars[:, 5]), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_the_last_steps_d_alone_is_computed_in_float64_as_the_steps_d_is(prediction_type, backend):
    """consistency_output (the last UNet call's D, which the image is decoded from) computed float64 latents in
    float32, about 1e-7 off the D every earlier step of the same float64 trajectory gives."""
    g = torch.Generator().manual_seed(2)
    mo, x, z = (torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    scalars = mixed_rows(3, seed=2)
    stepped, _, _ = policy_step(mo, x, scalars, prediction_type, noise=z, backend=backend)
    alone = consistency_output(mo, x, scalars, prediction_type)
    assert alone.dtype == torch.float64
    torch.testing.assert_close(alone, stepped, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_native_autograd_matches_reference_gradients(prediction_type):
    g = torch.Generator().manual_seed(2)
    mo, x, x_next = (torch.randn(3, 4, 7, 5, generator=g, dtype=torch.float64) for _ in range(3))
    scalars = mixed_rows(3, seed=3)
    weights_d = torch.randn(3, 4, 7, 5, generator=g, dtype=torch.float64)
    weights_logp = torch.randn(3, generator=g, dtype=torch.float64)
    grads = {}
    for backend in ("native", "reference"):
        leaf = mo.clone().requires_grad_(True)
        denoised, _, logp = policy_step(leaf, x, scalars, prediction_type, next_state=x_next, backend=backend)
        ((denoised * weights_d).sum() + (logp * weights_logp).sum()).backward()
        grads[backend] = (denoised.detach(), logp.detach(), leaf.grad)
    for native, reference in zip(grads["native"], grads["reference"]):
        torch.testing.assert_close(native, reference, atol=1e-10, rtol=1e-10)


def test_sampling_log_prob_is_reproduced_exactly_in_training_mode():
    g = torch.Generator().manual_seed(4)
    mo, x, z = (torch.randn(2, 4, 9, 9, generator=g) for _ in range(3))
    scalars = mixed_rows(2, seed=5)
    _, x_next, logp_sample = policy_step(mo, x, scalars, "epsilon", noise=z)
    _, _, logp_train = policy_step(mo, x, scalars, "epsilon", next_state=x_next)
    assert torch.equal(logp_sample, logp_train)
    _, _, logp_ref = policy_step_reference(mo, x, scalars, "epsilon", next_state=x_next)
    torch.testing.assert_close(logp_sample, logp_ref, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_reference_s_sampling_log_prob_is_of_the_next_state_as_stored_in_half_precision(dtype):
    """A half-precision state is rounded when stored; the sampling log-prob must be of that rounded state, or
    training's recomputation from it would differ (a ratio != 1 with unchanged weights)."""
    g = torch.Generator().manual_seed(6)
    mo, x, z = (torch.randn(3, 4, 8, 8, generator=g).to(dtype) for _ in range(3))
    scalars = mixed_rows(3, seed=7)
    _, x_next, logp_sample = policy_step_reference(mo, x, scalars, "epsilon", noise=z)
    assert x_next.dtype == dtype
    _, _, logp_train = policy_step_reference(mo, x, scalars, "epsilon", next_state=x_next)
    assert torch.equal(logp_sample, logp_train)


def test_bad_arguments_are_clear_errors():
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="exactly one of noise"):
        policy_step(x, x, mixed_rows(1), "epsilon")
    with pytest.raises(ValueError, match="prediction_type 'eps' is not supported; allowed: epsilon"):
        policy_step(x, x, mixed_rows(1), "eps", noise=x)


def test_mixed_dtypes_go_to_the_reference_not_a_backend_that_refuses_or_rounds_them(monkeypatch):
    from rlcm_fast import policy_step as module

    f32, f64 = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)
    assert select_backend(f32, f64) == "reference" and select_backend(f64, f64, f32) == "reference"
    assert select_backend(f64, f64, f64) == "native"
    g = torch.Generator().manual_seed(6)
    mo, x, z = (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    _, _, logp = policy_step(mo.float(), x, mixed_rows(2), "epsilon", noise=z.float())  # the C++ op refused this
    assert logp.dtype == torch.float64
    monkeypatch.setattr(module, "_triton_ready", lambda tensor: True)  # as for CUDA tensors with Triton
    meta = torch.zeros(2, 3, device="meta")
    assert select_backend(meta, meta.double()) == "reference"  # float64 x keeps float64 arithmetic
    assert select_backend(meta.bfloat16(), meta, meta) == "triton"


def _backends():
    try:
        import triton  # noqa: F401  (under TRITON_INTERPRET=1 on a CPU: tests/conftest.py)
    except ImportError:
        return ("native", "reference")
    return ("native", "triton", "reference")


@pytest.mark.parametrize("mode", ("sampling", "training"))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("backend", _backends())
def test_every_backend_gives_autograd_s_gradients_for_model_output_and_x(backend, prediction_type, mode):
    """Training: the stored action's score; sampling: the pathwise gradient through x_next (logp's is zero).
    The C++ op used to give x no gradient, and in sampling mode the score instead of the pathwise one."""
    g = torch.Generator().manual_seed(7)
    mo, x, given, w_denoised, w_next = (torch.randn(3, 4, 5, 6, generator=g) for _ in range(5))
    w_logp = torch.randn(3, generator=g)
    scalars = mixed_rows(3, seed=8)
    grads = {}
    for name, dtype in ((backend, torch.float32), ("exact", torch.float64)):
        leaves = [mo.to(dtype).requires_grad_(True), x.to(dtype).requires_grad_(True)]
        step = {"noise" if mode == "sampling" else "next_state": given.to(dtype)}
        denoised, sampled, logp = policy_step(*leaves, scalars, prediction_type, **step,
                                              backend=backend if name != "exact" else "reference")
        objective = (denoised * w_denoised.to(dtype)).sum() + (logp * w_logp.to(dtype)).sum()
        if mode == "sampling":
            objective = objective + (sampled * w_next.to(dtype)).sum()
        grads[name] = torch.autograd.grad(objective, leaves)
    for ours, exact in zip(grads[backend], grads["exact"]):
        torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "reference"])
def test_fused_backends_refuse_a_second_derivative_instead_of_giving_zeros(backend):
    g = torch.Generator().manual_seed(9)
    mo, x, x_next = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    leaf = mo.clone().requires_grad_(True)
    _, _, logp = policy_step(leaf, x, mixed_rows(2), "epsilon", next_state=x_next, backend=backend)
    with pytest.raises(RuntimeError, match=r"no second derivative \(create_graph=True\); use .*backend='reference'"):
        torch.autograd.grad(logp.sum(), leaf, create_graph=True)


@pytest.mark.parametrize("backend", _backends())
def test_inputs_every_backend_would_fail_on_or_broadcast_are_one_line_errors(backend):
    x = torch.zeros(3, 4, 5, 5)
    rows = mixed_rows(3)
    cases = [
        ((x, x, rows[:1]), {"noise": x}, r"scalars must have shape \(3, 6\) \(the ROW_SCALARS table of x's rows\), got \(1, 6\)"),
        ((x, x, rows), {"noise": x[0]}, r"noise/next_state must be a floating tensor of x's shape \(3, 4, 5, 5\)"),
        ((x[..., :4], x, rows), {"next_state": x}, r"model_output must be a floating tensor of x's shape"),
        ((x.long(), x.long(), rows), {"noise": x}, r"x must be a floating tensor of shape \(B, \.\.\.\), got torch.int64"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            policy_step(*args, "epsilon", **kwargs, backend=backend)
    with pytest.raises(TypeError, match="noise/next_state must be a torch.Tensor, got list"):
        policy_step(x, x, rows, "epsilon", noise=[0.0], backend="auto")  # checked before the backend is chosen
    if backend != "reference":
        with pytest.raises(NotImplementedError, match=f"the {backend} policy step has no gradient with respect to"):
            policy_step(x, x, rows, "epsilon", noise=x.clone().requires_grad_(True), backend=backend)


@pytest.mark.parametrize("backend", _backends())
def test_an_empty_batch_gives_empty_results(backend):
    empty = torch.zeros(0, 4, 3, 3)
    for step in ({"noise": empty}, {"next_state": empty}):
        denoised, _, logp = policy_step(empty, empty, torch.zeros(0, 6, dtype=torch.float64), "sample", **step,
                                        backend=backend)
        assert denoised.shape == (0, 4, 3, 3) and logp.shape == (0,)


def test_triton_on_cpu_tensors_without_the_interpreter_is_a_clear_error(monkeypatch):
    kernels = pytest.importorskip("rlcm_fast.kernels.policy_step")
    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match=r"runs on CUDA tensors \(or on the CPU under TRITON_INTERPRET=1\), got device cpu"):
        policy_step(x, x, mixed_rows(1), "epsilon", noise=x, backend="triton")


def test_the_cpp_op_uses_torch_s_thread_count():
    from rlcm_fast._native import _thread_count

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _thread_count(0) == 1 and _thread_count(3) == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ("sampling", "training"))
def test_triton_runs_a_batch_beyond_the_grid_limit_in_slices(monkeypatch, mode):
    kernels = pytest.importorskip("rlcm_fast.kernels.policy_step")
    g = torch.Generator().manual_seed(10)
    mo, x, given, w = (torch.randn(5, 4, 3, 3, generator=g) for _ in range(4))
    scalars, step = mixed_rows(5, seed=11), {"noise" if mode == "sampling" else "next_state": given}
    results = []
    for limit in (65535, 2):  # CUDA's 65535 grid rows, and a stand-in small enough to slice 5 rows
        monkeypatch.setattr(kernels, "_MAX_GRID_ROWS", limit)
        leaf = mo.clone().requires_grad_(True)
        denoised, sampled, logp = policy_step(leaf, x, scalars, "epsilon", **step, backend="triton")
        ((denoised * w).sum() + logp.sum()).backward()
        results.append((denoised.detach(), sampled.detach(), logp.detach(), leaf.grad))
    for whole, sliced in zip(*results):
        assert torch.equal(whole, sliced)
    if mode == "training":
        assert sampled is given


def test_the_checkouts_kernels_folder_never_hides_an_installed_kernels_package():
    """kernels/ is rlcm_fast.kernels and never the top-level `kernels`: transformers >= 5.25 requires and imports
    Hugging Face's package of that name, and with the checkout's root first on sys.path (`python -m pytest` or a
    notebook there) a kernels/__init__.py was found first: diffusers' LCM pipeline failed to import."""
    root = Path(__file__).resolve().parents[1]
    assert not (root / "kernels" / "__init__.py").exists()
    code = ("import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec and spec.origin); "
            "from diffusers import LatentConsistencyModelPipeline")
    # python -c puts its working directory, the checkout's root, first on sys.path (and there the source tree's
    # rlcm_fast, which has no kernels/ beside it unless the install is editable: rlcm_fast.kernels is not asked).
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    origin = result.stdout.strip()  # None, or the installed package's __init__.py
    assert origin == "None" or not Path(origin).is_relative_to(root / "kernels"), origin


def test_a_training_run_without_a_fused_step_says_so_once(monkeypatch, tmp_path, capsys):
    from rlcm_fast import _native
    from rlcm_fast import policy_step as policy_step_module
    from rlcm_fast.config import resolve_config
    from rlcm_fast.policy_step import fused_step_missing
    from rlcm_fast.trainer import Trainer

    assert (fused_step_missing(torch.device("cpu")) is None) == _native.native_available()
    monkeypatch.setattr(policy_step_module, "triton_available", lambda: False)
    assert fused_step_missing(torch.device("cuda")) == "triton is not installed"
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_IMPORT_ERROR", ImportError("no _C here"))
    Trainer(resolve_config(overrides={"device": "cpu", "grid_every": 0}), tmp_path / "run")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "plain PyTorch" in line]
    assert warnings == ["rlcm-fast: warning: the policy step runs in plain PyTorch (slower, same results): the C++ "
                        "module rlcm_fast._C did not import (no _C here)"]
