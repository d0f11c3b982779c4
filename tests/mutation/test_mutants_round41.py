"""Mutation-testing round 41 (call_sizes, norm_precision, minibatches, epoch_samples): hand-written mutants of
those four modules were run against their tests; each test here kills one that survived (named in its
docstring). All are CPU-only, seeded and fast: no model is loaded."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import rlcm_fast.epoch_samples as epoch_samples_module
from rlcm_fast.call_sizes import resolve_call_sizes
from rlcm_fast.checkpoint import CheckpointError
from rlcm_fast.config import resolve_config
from rlcm_fast.epoch_samples import (SAMPLES_FILE, EpochSamples, check_process_count, restore_stopped_epoch,
                                     stopped_epoch_record)
from rlcm_fast.minibatches import minibatch_plan
from rlcm_fast.norm_precision import cuda_autocast_norms_on_cpu, use_half_precision_norms
from rlcm_fast.run_logging import GRID_IMAGES


# -- call_sizes ------------------------------------------------------------------------------------------------

def chosen(latent_side: int, **overrides) -> tuple[int, int]:
    cfg = resolve_call_sizes(resolve_config(overrides={"model": "sd15-lcm", **overrides}), "cuda", latent_side)
    return cfg.train_rows_per_call, cfg.sample_batches_per_call


def test_auto_train_rows_equal_to_train_batch_size_are_not_wider_and_stay_0():
    """Mutant: `rows > cfg.train_batch_size` -> `rows >= ...`. At 1280 px (160 x 160 latents) 7 x 96 x 96 pixels
    hold 2 rows, train_batch_size's 2: no wider call, so auto keeps the paper's (0), not an explicit 2."""
    assert chosen(160) == (0, 1)
    assert chosen(160, train_batch_size=1) == (2, 1)  # one row wider than train_batch_size 1: taken


def test_auto_sampling_batches_count_every_sampling_iteration_of_the_epoch():
    """Mutant: rounds = batches_per_epoch (num_sample_iters left out). 2 batches x 2 iterations = 4 rounds of 4
    prompts at 768 px: all 4 (16 trajectories) fit 20 x 96 x 96 pixels in one call, not just 2."""
    assert chosen(96, batches_per_epoch=2, num_sample_iters=2) == (7, 4)
    assert chosen(96, batches_per_epoch=2, num_sample_iters=1) == (7, 2)


# -- norm_precision --------------------------------------------------------------------------------------------

def test_float16_autocast_runs_the_norms_in_float16_too():
    """Mutant: HALF = (torch.bfloat16,) (float16 left out). Under CUDA's rule with autocast in float16 the
    switched norms run in float16 (as fp16 mixed precision uses them), not autocast's float32."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3)
    group_norm, layer_norm = nn.GroupNorm(2, 4), nn.LayerNorm(3)
    use_half_precision_norms(group_norm, layer_norm)
    with cuda_autocast_norms_on_cpu(), torch.autocast("cpu", dtype=torch.float16):
        outs = [group_norm(x), layer_norm(x)]
        assert F.group_norm(x, 2).dtype == torch.float32  # what the switch removes
    assert [t.dtype for t in outs] == [torch.float16] * 2
    torch.testing.assert_close(outs[0], F.group_norm(x.half(), 2, group_norm.weight.half(), group_norm.bias.half()),
                               rtol=0, atol=0)
    torch.testing.assert_close(outs[1], F.layer_norm(x.half(), (3,), layer_norm.weight.half(),
                                                     layer_norm.bias.half()), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["group", "layer"])
def test_the_half_precision_norms_keep_their_own_eps(kind):
    """Mutants: the group norm's / the layer norm's `self.eps` dropped from the half-precision call (torch's
    default 1e-5 used instead). diffusers' UNets build norms with eps=1e-6 and other values; here eps=0.5 on an
    input of small variance, where the eps decides the output."""
    torch.manual_seed(0)
    x = 0.1 * torch.randn(2, 4, 3, 3)
    norm = nn.GroupNorm(2, 4, eps=0.5) if kind == "group" else nn.LayerNorm(3, eps=0.5)
    use_half_precision_norms(norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    h = x.bfloat16()
    expected = (F.group_norm(h, 2, norm.weight.bfloat16(), norm.bias.bfloat16(), eps=0.5) if kind == "group"
                else F.layer_norm(h, (3,), norm.weight.bfloat16(), norm.bias.bfloat16(), eps=0.5))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    exact = (F.group_norm(x, 2, norm.weight, norm.bias, eps=0.5) if kind == "group"
             else F.layer_norm(x, (3,), norm.weight, norm.bias, eps=0.5))
    torch.testing.assert_close(out.float(), exact, rtol=2e-2, atol=2e-2)  # the float32 norm, to bf16's rounding


def test_a_float32_layer_norm_runs_with_its_weight_and_bias_rounded_to_autocasts_dtype():
    """Mutant: the layer norm's bias not cast to autocast's dtype (the CPU's layer_norm takes a float32 bias
    with a bf16 input, so nothing fails: it adds the unrounded bias). The switched norm must compute exactly the
    bf16 norm of bf16 parameters, as the group norm does."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    use_half_precision_norms(norm)
    x = torch.randn(3, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.layer_norm(x.bfloat16(), (6,), norm.weight.bfloat16(), norm.bias.bfloat16()),
                               rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["group", "layer"])
def test_the_cpu_emulation_of_cudas_rule_keeps_the_norms_eps(kind):
    """Mutant: cuda_autocast_norms_on_cpu's group_norm passing eps 1e-5 instead of the caller's. Under the
    emulated rule a norm runs in float32 with its own eps, as CUDA's autocast runs it."""
    torch.manual_seed(0)
    x = (0.1 * torch.randn(2, 4, 3, 3)).bfloat16()
    norm = (lambda t: F.group_norm(t, 2, eps=0.5)) if kind == "group" else (lambda t: F.layer_norm(t, (3,), eps=0.5))
    with cuda_autocast_norms_on_cpu(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, norm(x.float()), rtol=0, atol=0)


# -- minibatches -----------------------------------------------------------------------------------------------

def drawn(algorithm: str, train_rows: str, seed: int, rows_per_call: int = 0) -> list:
    """Every (sample, step) index of a plan over 12 trajectories of 3 trained steps, in order, for a seed."""
    trained = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(i))[:3] for i in range(12)])
    plan = minibatch_plan(algorithm, train_rows, rows_per_call)(trained, torch.Generator().manual_seed(seed), 2, 2)
    return [[(s.tolist(), k.tolist()) for s, k in update] for update in plan]


@pytest.mark.parametrize("algorithm, train_rows, rows_per_call", [
    ("ppo", "flattened", 0), ("ppo", "flattened", 5), ("ppo", "per_timestep", 0), ("rebel", "flattened", 0)])
def test_every_plan_is_drawn_from_its_generator_alone(algorithm, train_rows, rows_per_call):
    """Mutant: REBEL's pair order not shuffled (torch.arange; also the flattened plan's within-update mix drawn
    from torch's global generator, and the per-timestep order unshuffled). A plan is the same for the same
    generator (a resume redraws it: its updates must be the uninterrupted run's), whatever the global stream did
    in between, and another seed shuffles otherwise."""
    torch.manual_seed(0)
    first = drawn(algorithm, train_rows, 7, rows_per_call)
    torch.manual_seed(1)  # another global stream: no plan may draw from it
    assert drawn(algorithm, train_rows, 7, rows_per_call) == first
    assert drawn(algorithm, train_rows, 8, rows_per_call) != first


# -- epoch_samples ---------------------------------------------------------------------------------------------

def samples_of(n: int, seed: int, tag: str) -> EpochSamples:
    generator = torch.Generator().manual_seed(seed)
    return EpochSamples(prompts=[f"{tag}{i}" for i in range(n)], states=torch.randn(n, 3, 4, 2, 2, generator=generator),
                        log_probs=torch.randn(n, 2, generator=generator),
                        rewards=np.random.default_rng(seed).normal(size=n),
                        advantages=torch.randn(n, generator=generator),
                        images=torch.rand(min(n, GRID_IMAGES), 3, 8, 8, generator=generator))


def accelerator(processes: int, index: int = 0, gather=lambda t: t):
    return SimpleNamespace(device=torch.device("cpu"), gather=gather, num_processes=processes, process_index=index,
                           is_main_process=index == 0)


def write_stopped(tmp_path, files: dict, stopped: dict):
    checkpoint = tmp_path / "checkpoint-0-1"
    checkpoint.mkdir()
    save_file(files[SAMPLES_FILE], str(checkpoint / SAMPLES_FILE))
    return checkpoint, {"epoch": 0, "update": stopped["updates_done"], "stopped_epoch": stopped}


STATS = {"reward_mean": 0.5, "reward_std": 0.25, "samples": 8, "sample_seconds": 1.0}


def test_two_processes_samples_are_gathered_saved_and_each_process_resumes_its_own_share(tmp_path, monkeypatch):
    """Mutants: the record's `processes` fixed at 1; its prompts not gathered; restore's share n = rows (not
    rows // processes); every process taking the first share; a non-main process keeping the grid images.
    Two processes' epochs (4 samples each) are gathered as accelerate does (process 0's rows, then 1's)."""
    mine, theirs = samples_of(4, 0, "a"), samples_of(4, 1, "b")
    others = {id(mine.states): theirs.states, id(mine.log_probs): theirs.log_probs,
              id(mine.advantages): theirs.advantages}

    def gather(t):  # the other process's tensor of the same name
        other = others.get(id(t))
        return torch.cat([t, other if other is not None else torch.as_tensor(theirs.rewards)])

    monkeypatch.setattr(epoch_samples_module, "gather_object", lambda prompts: prompts + theirs.prompts)
    files, stopped = stopped_epoch_record(mine, STATS, 1, accelerator(2, 0, gather))
    assert stopped["processes"] == 2 and stopped["prompts"] == mine.prompts + theirs.prompts
    assert files[SAMPLES_FILE]["states"].shape[0] == 8
    checkpoint, state = write_stopped(tmp_path, files, stopped)
    for index, expected in enumerate((mine, theirs)):
        restored, stats, done = restore_stopped_epoch(checkpoint, state, accelerator(2, index))
        assert (stats, done) == (STATS, 1)
        assert restored.prompts == expected.prompts
        for name in ("states", "log_probs", "advantages"):
            assert torch.equal(getattr(restored, name), getattr(expected, name)), (index, name)
        assert np.array_equal(restored.rewards, expected.rewards)
        if index == 0:
            assert torch.equal(restored.images, mine.images)  # the main process's grid images
        else:
            assert restored.images.numel() == 0  # the others keep none
    with pytest.raises(CheckpointError, match="stopped mid-epoch with 2 process"):
        restore_stopped_epoch(checkpoint, state, accelerator(1))


def test_a_stopped_epoch_of_more_samples_than_the_grid_shows_resumes(tmp_path):
    """Mutants: restore checking grid_images' rows against the prompts' (an epoch of 20 samples keeps the grid's
    16 images: it would be refused as damaged)."""
    samples = samples_of(20, 2, "p")
    samples.images = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    files, stopped = stopped_epoch_record(samples, STATS, 2, accelerator(1))
    checkpoint, state = write_stopped(tmp_path, files, stopped)
    restored, _, done = restore_stopped_epoch(checkpoint, state, accelerator(1))
    assert done == 2 and restored.prompts == samples.prompts
    assert torch.equal(restored.states, samples.states) and torch.equal(restored.images, samples.images[:GRID_IMAGES])
    assert np.array_equal(restored.rewards, samples.rewards)  # float64, exactly


@pytest.mark.parametrize("name, shape", [("states", (2, 3, 4, 2)), ("log_probs", (2,)), ("grid_images", (2, 3, 8))])
def test_a_stopped_epochs_tensor_with_the_wrong_number_of_dimensions_is_damaged(tmp_path, name, shape):
    """Mutant: restore's `tensors[name].dim() != dim` check dropped (only the row counts checked). A tensor of
    the right rows but the wrong rank is a damaged checkpoint, said in one line, not a shape error later."""
    files, stopped = stopped_epoch_record(samples_of(2, 4, "p"), STATS, 1, accelerator(1))
    files[SAMPLES_FILE][name] = torch.zeros(shape)
    checkpoint, state = write_stopped(tmp_path, files, stopped)
    with pytest.raises(CheckpointError) as error:
        restore_stopped_epoch(checkpoint, state, accelerator(1))
    assert str(error.value) == (f"checkpoint {str(checkpoint)!r} is damaged: {SAMPLES_FILE} holds {name} of shape "
                                f"{shape} for 2 prompts")


@pytest.mark.parametrize("saved, resumed", [(1, 2), (2, 1), (4, 2)])
def test_a_mid_epoch_checkpoint_refuses_any_other_process_count(tmp_path, saved, resumed):
    """Mutants: check_process_count's `!=` -> `<` / `>` (fewer or more processes than the checkpoint's let by)."""
    state = {"stopped_epoch": {"updates_done": 1, "processes": saved, "prompts": [], "stats": {}}}
    with pytest.raises(CheckpointError, match=rf"stopped mid-epoch with {saved} process\(es\); resume it with "
                                              rf"--num-processes {saved}, "):
        check_process_count(tmp_path, state, resumed)
    check_process_count(tmp_path, state, saved)  # the same count: resumed
    check_process_count(tmp_path, {"epoch": 1}, resumed)  # an epoch checkpoint: any count
