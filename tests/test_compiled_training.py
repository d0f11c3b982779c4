"""The compiled UNet (inductor) and the CUDA-graph sampling loop on a GPU change no result: one seeded update
on the tiny model gives the eager path's trajectories, loss and LoRA gradients, in float32 without TF32.
(On the CPU inductor is refused with torch older than 2.14.1, test_switches.py; these are the checks that decide
whether the two may be the GPU's defaults.) Also xformers' attention (attention_backend=xformers), where it is
installed."""

import pytest
import torch

from test_switches import one_update

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's GPU code and CUDA graphs need a GPU")]


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        patch.setattr(torch.backends.cudnn, "allow_tf32", False)
        return one_update(tmp_path_factory.mktemp("eager"), "eager", device="cuda", mixed_precision="no")


@pytest.mark.parametrize("switches", [
    # Only sampling's UNet and decode compiled (no backward to compile: the quickest warm-up), training from
    # CUDA graphs.
    {"compile_unet": True, "compile_scope": "sampling", "compile_decode": True, "train_cuda_graph": True},
    {"compile_unet": True},
    {"compile_unet": True, "sample_cuda_graph": True},
    # Only the transformer blocks: on the CPU inductor got sd15-lcm's LoRA gradients wrong this way (not tiny's).
    {"compile_unet": True, "compile_scope": "blocks", "sample_cuda_graph": True},
], ids=["compiled_sampling_graphed_training", "compiled", "compiled_and_graphed", "compiled_blocks_and_graphed"])
def test_compiled_training_on_a_gpu_equals_eager(tmp_path, monkeypatch, eager, switches):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them
    trainers = []
    samples, logged, _ = one_update(tmp_path, "switched", prepare=trainers.append, device="cuda",
                                    mixed_precision="no", **switches)
    base_samples, base, _ = eager
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if switches.get("compile_scope") == "sampling":  # the UNet and the decode at sampling's one batch size
        assert graphs == 2 and trainers[0].train_unet.signatures() == {"graphed": 1, "not_graphed": 0}
    else:
        assert graphs >= 2  # sampling and training were compiled
    # A failed capture warns and samples without the graph, which would match eager too.
    assert trainers[0].sampler.cuda_graph == switches.get("sample_cuda_graph", False)
    if switches.get("compile_scope") == "blocks":
        unet = trainers[0].unet
        assert {type(m).__name__ for m in unet.modules() if m._compiled_call_impl is not None} == {
            "BasicTransformerBlock"}
    torch.testing.assert_close(samples.states, base_samples.states, atol=1e-4, rtol=0)
    torch.testing.assert_close(samples.log_probs, base_samples.log_probs, atol=1e-4, rtol=0)
    assert logged["loss"] == pytest.approx(base["loss"], abs=1e-5)
    largest = max(g.abs().max().item() for g in base["grads"])
    assert largest > 0
    nonzero = [bool(g.abs().max() > 0) for g in base["grads"]]
    assert [bool(g.abs().max() > 0) for g in logged["grads"]] == nonzero  # CPU inductor zeroed some (torch 2.13)
    for ours, theirs in zip(logged["grads"], base["grads"]):
        torch.testing.assert_close(ours, theirs, atol=1e-4 * largest, rtol=1e-3)


@pytest.mark.skipif(__import__("importlib").util.find_spec("xformers") is None, reason="xformers is not installed")
def test_xformers_attention_on_a_gpu_gives_sdpas_update(tmp_path, monkeypatch, eager):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    samples, logged, _ = one_update(tmp_path, "xformers", device="cuda", mixed_precision="no",
                                    attention_backend="xformers")
    base_samples, base, _ = eager
    torch.testing.assert_close(samples.states, base_samples.states, atol=1e-4, rtol=0)
    assert logged["loss"] == pytest.approx(base["loss"], abs=1e-5)
    largest = max(g.abs().max().item() for g in base["grads"])
    for ours, theirs in zip(logged["grads"], base["grads"]):
        torch.testing.assert_close(ours, theirs, atol=1e-4 * largest, rtol=1e-3)
