"""train_cuda_graph: the training UNet's forward and backward replayed from CUDA graphs
(cuda_graphs.GraphedTrainingUNet). On the CPU, with a stand-in for torch.cuda.make_graphed_callables that
keeps its contract (outputs and gradients handed out in static buffers that every call overwrites): the
trainer's update gives the eager gradients, because it keeps the gradients allocated; without that, the
same stand-in gives a wrong sum. Also the refusals and the CPU fallback. On a GPU: the real graphs."""

import pytest
import torch

from rlcm_fast.config import ConfigError, resolve_config
from rlcm_fast.cuda_graphs import GraphedTrainingUNet
from rlcm_fast.trainer import Trainer
from test_switches import ONE_UPDATE, one_update


def static_buffer_graphs(module, sample_args, num_warmup_iters):
    """make_graphed_callables' contract, run eagerly: the call's output and the parameters' gradients come
    back as detached views of buffers that belong to the "graph" and are overwritten by its next call; given
    a module, it hands back that module, its forward replaced (as torch does)."""
    params = tuple(p for p in module.parameters() if p.requires_grad)
    eager_forward = module.forward
    static_grads = [torch.zeros_like(p) for p in params]
    static_output = []

    class Replayed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.args = inputs[:len(sample_args)]
            output = eager_forward(*ctx.args)
            if not static_output:
                static_output.append(torch.empty_like(output))
            static_output[0].copy_(output)
            return static_output[0].detach()

        @staticmethod
        def backward(ctx, grad_output):
            with torch.enable_grad():
                grads = torch.autograd.grad(eager_forward(*ctx.args), params, grad_output)
            for static, grad in zip(static_grads, grads):
                static.copy_(grad)
            return (None,) * len(ctx.args) + tuple(g.detach() for g in static_grads)

    module.forward = lambda *args: Replayed.apply(*args, *params)
    return module


def graphed_update(tmp_path, monkeypatch, keep_gradients_allocated: bool):
    """One seeded update of test_switches' set-up with the stand-in graphs: (logged sums and LoRA gradients,
    the trainer)."""
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", static_buffer_graphs)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)  # no streams on the CPU
    trainers = []

    def use_graphs(trainer):  # what Trainer.__init__ does on CUDA ("cuda" here only names autocast's device)
        trainers.append(trainer)
        trainer.train_unet = GraphedTrainingUNet(trainer.unet, torch.device("cuda"))
        trainer.grads_stay_allocated = keep_gradients_allocated

    _, captured, _ = one_update(tmp_path, "graphed", prepare=use_graphs)
    return captured, trainers[0]


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    return one_update(tmp_path_factory.mktemp("eager"), "eager")[1]


def test_graphed_training_calls_give_eager_gradients_with_gradients_kept_allocated(tmp_path, monkeypatch, eager):
    graphed, trainer = graphed_update(tmp_path, monkeypatch, keep_gradients_allocated=True)
    # One signature, every call having train_batch_size rows; its graphs replayed.
    assert trainer.train_unet.signatures() == {"graphed": 1, "not_graphed": 0}
    assert graphed["loss"] == pytest.approx(eager["loss"], abs=1e-6)
    largest = max(g.abs().max().item() for g in eager["grads"])
    assert largest > 0
    for ours, theirs in zip(graphed["grads"], eager["grads"]):
        torch.testing.assert_close(ours, theirs, atol=1e-5 * largest, rtol=1e-4)
    # Zeroed in place after the update, not dropped: the next update's first backward adds to them.
    assert all(p.grad is not None and not p.grad.any() for p in trainer.params)


def test_without_allocated_gradients_the_graphs_buffers_give_a_wrong_sum(tmp_path, monkeypatch, eager):
    """Why keeps_gradients_allocated: a .grad that is None takes the graph's gradient buffer as its own, so
    the update's next backward overwrites it and then adds to it (2 g2 instead of g1 + g2)."""
    graphed, _ = graphed_update(tmp_path, monkeypatch, keep_gradients_allocated=False)
    largest = max(g.abs().max().item() for g in eager["grads"])
    worst = max((ours - theirs).abs().max().item() for ours, theirs in zip(graphed["grads"], eager["grads"]))
    assert worst > 0.01 * largest


def test_graphed_training_unet_runs_the_unet_itself_without_grad(monkeypatch):
    calls = []
    unet = lambda *args, **kwargs: calls.append(kwargs) or (torch.zeros(1),)  # noqa: E731
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", lambda *a, **k: pytest.fail("captured without grad"))
    graphed = GraphedTrainingUNet(unet, torch.device("cuda"))
    with torch.no_grad():
        graphed(torch.zeros(1), torch.zeros(1), encoder_hidden_states=torch.zeros(1), timestep_cond=None)
    assert len(calls) == 1 and calls[0]["timestep_cond"] is None and calls[0]["return_dict"] is False


def test_a_call_that_cannot_be_captured_warns_and_runs_eagerly(monkeypatch):
    """Also after make_graphed_callables failed: the caller's streams are put back (a failed capture can
    leave the thread on its capture stream), and the signature is not tried again."""
    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors ...")

    streams_set = []
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", refuse)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    monkeypatch.setattr(torch.cuda, "set_stream", streams_set.append)
    unet = torch.nn.Linear(3, 3)
    graphed = GraphedTrainingUNet(lambda x, t, **kwargs: (unet(x),), torch.device("cuda"))
    x = torch.randn(2, 3)
    with pytest.warns(UserWarning, match=r"training calls of \(2, 3\) could not be captured as CUDA graphs "
                                         r"\(RuntimeError: operation not permitted when stream is capturing"):
        (out,) = graphed(x, torch.zeros(2), encoder_hidden_states=torch.zeros(2, 1))
    assert streams_set == ["stream of cuda", "stream of None"]
    torch.testing.assert_close(out, unet(x))
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", lambda *a, **k: pytest.fail("tried again"))
    (again,) = graphed(x, torch.zeros(2), encoder_hidden_states=torch.zeros(2, 1))
    torch.testing.assert_close(again, unet(x))
    assert graphed.signatures() == {"graphed": 0, "not_graphed": 1}  # what bench_train records


def test_graphed_training_unet_needs_cuda():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, got cpu"):
        GraphedTrainingUNet(torch.nn.Identity(), torch.device("cpu"))


def test_on_the_cpu_train_cuda_graph_is_ignored(tmp_path):
    trainer = Trainer(resolve_config(overrides={**ONE_UPDATE, "train_cuda_graph": True}), tmp_path / "run")
    assert trainer.train_unet is trainer.ddp_unet and not trainer.grads_stay_allocated


@pytest.mark.parametrize("other", ["compile_unet", "gradient_checkpointing"])
def test_train_cuda_graph_with_compile_or_checkpointing_is_refused_in_one_line(other):
    with pytest.raises(ConfigError, match=f"train_cuda_graph=true with {other}=true is refused") as info:
        resolve_config(overrides={"train_cuda_graph": True, other: True})
    assert "\n" not in str(info.value)


def test_train_cuda_graph_goes_with_compiled_sampling_but_not_with_compiled_training():
    """compile_scope=sampling leaves training's forward and backward eager: the graphs may replay them."""
    cfg = resolve_config(overrides={"train_cuda_graph": True, "compile_unet": True, "compile_scope": "sampling"})
    assert cfg.train_cuda_graph and cfg.compile_scope == "sampling"
    for scope in ("unet", "blocks"):
        with pytest.raises(ConfigError, match="train_cuda_graph=true with compile_unet=true is refused"):
            resolve_config(overrides={"train_cuda_graph": True, "compile_unet": True, "compile_scope": scope})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("precision, tolerance", [("no", 1e-4), ("bf16", 2e-2)])
def test_graphed_training_on_a_gpu_gives_eager_results(tmp_path, monkeypatch, precision, tolerance):
    """Two seeded updates on the tiny model, the real graphs against eager (float32 without TF32, and bf16),
    compared at the second: its graphed forward must read the LoRA weights the first update changed (with
    accelerate's autocast wrapper on the forward, the graph would have kept the warm-up's casts of them)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

    def two_updates(name, **overrides):
        trainers = []
        _, captured, _ = one_update(tmp_path, name, prepare=trainers.append, device="cuda",
                                    mixed_precision=precision, **overrides)
        trainer = trainers[0]
        samples = trainer.sample_epoch(1)
        trainer.compute_advantages(samples)
        trainer.train_epoch(1, samples)  # its loss and gradients replace the first update's in `captured`
        assert trainer.global_step == 2
        return captured, trainer

    base, _ = two_updates("eager")
    graphed, trainer = two_updates("graphed", train_cuda_graph=True)
    # One signature, captured: a failed capture warns and runs eagerly, which would match eager too.
    assert trainer.train_unet.signatures() == {"graphed": 1, "not_graphed": 0}
    # The second update's mean ratio is 1 when its forward reads the weights that sampled (on-policy). With
    # the weights from before the first update put back for it (what stale casts give), 0.9993 on the CPU (bf16).
    assert graphed["ratio"] == pytest.approx(base["ratio"], abs=tolerance * 0.01)
    assert graphed["loss"] == pytest.approx(base["loss"], abs=tolerance * 0.1)
    largest = max(g.abs().max().item() for g in base["grads"])
    assert largest > 0
    for ours, theirs in zip(graphed["grads"], base["grads"]):
        torch.testing.assert_close(ours, theirs, atol=tolerance * largest, rtol=tolerance * 10)
