"""The straightforward-path switches each change only what they name: one seeded update on the tiny model
gives the same rewards, loss and LoRA gradients as the default (fast) path, within float32 tolerance."""

import os

import pytest
import torch

from rlcm_fast.config import ConfigError, resolve_config
from rlcm_fast.epoch_samples import epoch_generator
from rlcm_fast.launch import FIRST_TORCH_WITH_RIGHT_CPU_INDUCTOR_GRADIENTS, cpu_inductor_gradients_are_wrong
from rlcm_fast.minibatches import flattened_rows, minibatch_plan, per_timestep_rows, updates_per_pass
from rlcm_fast.trainer import Trainer

SYMBOLIC_GRAPHS = []  # for each graph compiled by the backend below: its inputs of symbolic size or value


@torch._dynamo.register_backend(name="rlcm_test_aot_eager")
def aot_eager_noting_symbolic_inputs(graph, example_inputs):
    """aot_eager, noting which of the graph's inputs dynamo made symbolic (a dynamic batch size, say)."""
    values = [node.meta.get("example_value") for node in graph.graph.find_nodes(op="placeholder")]
    SYMBOLIC_GRAPHS.append([v for v in values if isinstance(v, torch.SymInt) or (
        isinstance(v, torch.Tensor) and any(isinstance(size, torch.SymInt) for size in v.shape))])
    return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)


# One update per epoch (4 samples = train_batch_size x gradient_accumulation_steps), so the flattened and
# the per-timestep plans cover the same (sample, step) rows with the same weights.
ONE_UPDATE = {"device": "cpu", "batches_per_epoch": 2, "sample_batch_size": 2, "train_batch_size": 2,
              "gradient_accumulation_steps": 2, "grid_every": 0, "seed": 3}


def one_update(tmp_path, name: str, prepare=None, **overrides):
    """Sample one epoch, train its single update; return the trajectory, rewards, logged loss and the LoRA
    gradients just before the optimizer step, and what the reward function was handed. `prepare(trainer)`,
    if given, runs first."""
    trainer = Trainer(resolve_config(overrides={**ONE_UPDATE, **overrides}), tmp_path / name)
    if prepare is not None:
        prepare(trainer)
    seen_devices = []
    reward_fn = trainer.reward.fn
    trainer.reward.fn = lambda images, prompts: seen_devices.append(images.device.type) or reward_fn(images, prompts)
    captured = {}
    trainer.optimizer.register_step_pre_hook(
        lambda *_: captured.update(grads=[p.grad.detach().clone() for p in trainer.params]))
    trainer.log_step = lambda epoch, sums, grad_norm: captured.update(sums)
    samples = trainer.sample_epoch(0)
    trainer.compute_advantages(samples)
    trainer.train_epoch(0, samples)
    return samples, captured, seen_devices


@pytest.fixture(scope="module")
def default_path(tmp_path_factory):
    return one_update(tmp_path_factory.mktemp("default"), "default")


@pytest.mark.parametrize("switch", [
    {"policy_step_backend": "reference"},
    {"train_rows": "per_timestep"},
    {"reward_device": "cpu"},
    {"reward_overlap": False},
    # The update's 12 rows in UNet calls of 4 (3 calls), and of 5 (5, 5, 2: unequal weights).
    {"train_rows_per_call": 4},
    {"train_rows_per_call": 5},
    # The epoch's two sampling batches in one UNet batch of 4: the same draws, decoded and scored batch by batch.
    {"sample_batches_per_call": 2},
    # The compiled UNet. aot_eager traces forward and backward as inductor does, without its code generation
    # (inductor on the CPU is refused with torch older than 2.14.1, whose gradients were wrong: test_inductor_on_
    # the_cpu_is_refused_with_a_torch_that_got_its_gradients_wrong). With the sampling batches joined, sampling
    # (4 rows) and training (2) compile the UNet at two batch sizes.
    {"compile_unet": True, "compile_backend": "rlcm_test_aot_eager", "sample_batches_per_call": 2},
    # inductor itself, where it is allowed on the CPU. Its first compiles take minutes on 2 cores, too slow for
    # every CI run: RLCM_FAST_SLOW_TESTS=1 runs it.
    pytest.param({"compile_unet": True, "compile_backend": "inductor", "sample_batches_per_call": 2},
                 id="inductor", marks=[
                     pytest.mark.skipif(cpu_inductor_gradients_are_wrong(), reason="inductor on the CPU is refused "
                                        f"before torch {FIRST_TORCH_WITH_RIGHT_CPU_INDUCTOR_GRADIENTS}"),
                     pytest.mark.skipif(not os.environ.get("RLCM_FAST_SLOW_TESTS"),
                                        reason="slow: set RLCM_FAST_SLOW_TESTS=1")]),
    # Only the transformer blocks compiled (regional compilation).
    {"compile_unet": True, "compile_scope": "blocks", "compile_backend": "rlcm_test_aot_eager",
     "sample_batches_per_call": 2},
    # Only sampling's UNet compiled; training's forward and backward eager.
    {"compile_unet": True, "compile_scope": "sampling", "compile_backend": "rlcm_test_aot_eager",
     "sample_batches_per_call": 2},
    # The VAE decode compiled (the UNet eager).
    {"compile_decode": True, "compile_backend": "rlcm_test_aot_eager"},
    # The UNet and the VAE in channels-last memory format (the LoRA's convolutions too: tiny puts LoRA on them).
    {"channels_last": True},
    # Ignored on a CPU (cuDNN is CUDA's).
    {"cudnn_benchmark": True},
    # Without mixed precision the half-precision norms are the plain ones (with it: test_norm_precision.py).
    {"half_precision_norms": True},
])
def test_switch_changes_only_what_it_names(tmp_path, default_path, switch):
    base_samples, base, _ = default_path
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them
    SYMBOLIC_GRAPHS.clear()
    trainers = []
    samples, switched, devices = one_update(tmp_path, "switched", prepare=trainers.append, **switch)
    trainer = trainers[0]
    if switch.get("compile_scope") == "blocks":  # each block shape compiled for sampling and for training
        compiled = {type(m).__name__ for m in trainer.unet.modules() if m._compiled_call_impl is not None}
        assert compiled == {"BasicTransformerBlock"} and trainer.sample_unet is trainer.unet
        # tiny's blocks come in two widths, each at one latent size: a graph per width, without and with grad
        widths = {block.norm1.normalized_shape for block in trainer.unet.modules()
                  if type(block).__name__ == "BasicTransformerBlock"}
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2 * len(widths) == 4
    elif switch.get("compile_scope") == "sampling":  # one graph, sampling's 4 rows without grad; training eager
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1 == len(SYMBOLIC_GRAPHS)
        assert trainer.train_unet is trainer.ddp_unet and trainer.sample_unet is not trainer.unet
    elif "compile_decode" in switch:  # one graph, the decode of a sampling batch of 2; the UNet eager
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1 == len(SYMBOLIC_GRAPHS)
        assert trainer.sample_unet is trainer.unet and trainer.train_unet is trainer.ddp_unet
    elif "compile_unet" in switch:  # both the sampling (no grad) and the training (grad) forward were compiled
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
        if switch["compile_backend"] == "rlcm_test_aot_eager":
            # ... each for its own batch size: dynamo's default would make the second one's batch size symbolic.
            assert len(SYMBOLIC_GRAPHS) >= 2
    assert SYMBOLIC_GRAPHS == [[]] * len(SYMBOLIC_GRAPHS)
    assert samples.prompts == base_samples.prompts
    torch.testing.assert_close(samples.states, base_samples.states, atol=1e-5, rtol=0)
    torch.testing.assert_close(samples.log_probs, base_samples.log_probs, atol=1e-5, rtol=0)
    assert abs(samples.rewards - base_samples.rewards).max() < 1e-9
    assert switched["loss"] == pytest.approx(base["loss"], abs=1e-6)
    assert len(switched["grads"]) == len(base["grads"])
    largest = max(g.abs().max().item() for g in base["grads"])
    assert largest > 0  # the update has a gradient to compare
    for ours, theirs in zip(switched["grads"], base["grads"]):
        torch.testing.assert_close(ours, theirs, atol=1e-5 * largest, rtol=1e-4)
    if "reward_device" in switch:
        assert devices == ["cpu", "cpu"]
    assert len(devices) == 2  # the reward was called once per sampling batch, whatever the UNet's batch


def test_channels_last_converts_every_convolution_and_survives_a_checkpoint(tmp_path):
    overrides = {**ONE_UPDATE, "channels_last": True}
    trainer = Trainer(resolve_config(overrides=overrides), tmp_path / "run")
    assert torch.backends.cudnn.benchmark is False  # cudnn_benchmark is off by default
    convolutions = {name: p for model in (trainer.unet, trainer.pipe.vae) for name, p in model.named_parameters()
                    if p.ndim == 4}
    assert any("lora" in name for name in convolutions)  # the tiny preset's LoRA on convolutions
    assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in convolutions.values() if p.shape[1] > 1 and p.shape[2:] != (1, 1))
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {id(p) for name, p in trainer.unet.named_parameters() if p.requires_grad} == held
    samples = trainer.sample_epoch(0)
    trainer.compute_advantages(samples)
    trainer.train_epoch(0, samples)
    checkpoint = trainer.save_checkpoint(1)  # safetensors wants contiguous tensors: NHWC ones are not
    resumed = Trainer(resolve_config(overrides=overrides), tmp_path / "resumed", resume_from=checkpoint)
    for (name, ours), (_, theirs) in zip(resumed.unet.named_parameters(), trainer.unet.named_parameters()):
        assert torch.equal(ours, theirs), name
        assert ours.is_contiguous(memory_format=torch.channels_last) or ours.ndim != 4, name
    for ours, theirs in zip(resumed.params, trainer.params):
        assert torch.equal(resumed.optimizer.state[ours]["exp_avg"], trainer.optimizer.state[theirs]["exp_avg"])


def test_compiled_blocks_get_a_graph_for_every_batch_size(tmp_path):
    # All transformer blocks share one compiled forward, and dynamo's default of 8 graphs per function would
    # leave the 10 here (2 block widths x 5 batch sizes) partly eager, with a warning. (config.patch, not
    # monkeypatch: monkeypatch's undo deletes the setting from dynamo's config, which breaks later compiles.)
    with torch._dynamo.config.patch(recompile_limit=8):
        overrides = {**ONE_UPDATE, "compile_unet": True, "compile_scope": "blocks", "compile_backend": "aot_eager"}
        unet = Trainer(resolve_config(overrides=overrides), tmp_path / "run").unet
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        latent = unet.config.sample_size
        with torch.no_grad():
            for rows in range(1, 6):
                unet(torch.randn(rows, 4, latent, latent), 999,
                     torch.randn(rows, 77, unet.config.cross_attention_dim),
                     timestep_cond=torch.randn(rows, unet.config.time_cond_proj_dim))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 10
    assert torch._dynamo.config.recompile_limit >= 8  # put back as it was, still readable


def test_the_recompile_limit_is_raised_for_either_scope_and_never_lowered(tmp_path):
    from rlcm_fast.policy_model import GRAPHS_PER_COMPILED_FUNCTION, allow_a_graph_per_shape

    with torch._dynamo.config.patch(recompile_limit=GRAPHS_PER_COMPILED_FUNCTION * 4):
        allow_a_graph_per_shape()
        assert torch._dynamo.config.recompile_limit == GRAPHS_PER_COMPILED_FUNCTION * 4
    with torch._dynamo.config.patch(recompile_limit=8):  # the whole UNet has a graph per batch size too
        overrides = {**ONE_UPDATE, "compile_unet": True, "compile_scope": "unet", "compile_backend": "aot_eager"}
        Trainer(resolve_config(overrides=overrides), tmp_path / "run")
        assert torch._dynamo.config.recompile_limit == GRAPHS_PER_COMPILED_FUNCTION


class PastTheChecks(Exception):
    """Raised where start_accelerator is done refusing settings and starts building the Accelerator."""


@pytest.fixture
def start_checks_only(monkeypatch):
    """launch.start_accelerator, stopped with PastTheChecks once its checks have passed."""
    from rlcm_fast import launch

    def past_the_checks(*args, **kwargs):
        raise PastTheChecks

    monkeypatch.setattr(launch, "forget_other_accelerator_state", past_the_checks)
    return launch.start_accelerator


def test_inductor_is_not_refused_on_cuda(monkeypatch, start_checks_only):
    """The refusal is the CPU's: on CUDA inductor's gradients matched eager's (test_compiled_training.py)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "__version__", "2.13.0+cu130")
    for scope in ("unet", "blocks"):
        cfg = resolve_config(overrides={**ONE_UPDATE, "device": "cuda", "mixed_precision": "no",
                                        "compile_unet": True, "compile_scope": scope})
        assert cfg.compile_backend == "inductor"
        with pytest.raises(PastTheChecks):
            start_checks_only(cfg)


def test_compiled_blocks_of_a_unet_without_them_is_one_line(tmp_path, monkeypatch):
    """diffusers' ValueError (a UNet whose class names blocks it does not have) was a traceback."""
    from diffusers import UNet2DConditionModel

    monkeypatch.setattr(UNet2DConditionModel, "_repeated_blocks", ["NoSuchBlock"])
    overrides = {**ONE_UPDATE, "compile_unet": True, "compile_scope": "blocks", "compile_backend": "aot_eager"}
    with pytest.raises(ConfigError, match=r"^compile_scope=blocks: model 'tiny' has no repeated transformer blocks "
                                          r"to compile \(.*NoSuchBlock.*\); use compile_scope=unet$") as error:
        Trainer(resolve_config(overrides=overrides), tmp_path / "run")
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no chained traceback to print


@pytest.mark.parametrize("scope", ["unet", "blocks"])
def test_inductor_on_the_cpu_is_refused_with_a_torch_that_got_its_gradients_wrong(tmp_path, monkeypatch, scope):
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    with pytest.raises(ConfigError, match=r"^compile_unet=true with compile_backend='inductor' on the CPU is refused "
                                          r"with torch 2\.13\.0\+cpu: inductor's CPU LoRA gradients were measured "
                                          r"wrong with torch 2\.13 and right from 2\.14\.1 .*; upgrade torch to "
                                          r"2\.14\.1 or newer, or use compile_backend=aot_eager or "
                                          r"compile_unet=false$"):
        Trainer(resolve_config(overrides={**ONE_UPDATE, "compile_unet": True, "compile_scope": scope}),
                tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("version, wrong", [
    ("2.8.0", True), ("2.13.0+cpu", True), ("2.13.0+cu130", True), ("2.14.0", True), ("2.14.1.dev20260101", True),
    ("2.14.1rc1", True), ("not a version", True), ("", True),
    ("2.14.1", False), ("2.14.1+cu130", False), ("2.14.10", False), ("2.15.0", False), ("2.16.0a0+git0123abc", False)])
def test_which_torch_releases_get_cpu_inductor_gradients_wrong(version, wrong):
    """2.13.0 measured wrong, 2.14.1 and 2.15.0 right (benchmarks/compiled_gradients.py); unmeasured older ones,
    2.14.0, 2.14.1's pre-releases and a version that cannot be read count as wrong."""
    assert cpu_inductor_gradients_are_wrong(version) is wrong


def test_inductor_is_not_refused_on_the_cpu_with_a_torch_that_gets_its_gradients_right(monkeypatch,
                                                                                         start_checks_only):
    monkeypatch.setattr(torch, "__version__", "2.15.0+cpu")
    for scope in ("unet", "blocks"):
        cfg = resolve_config(overrides={**ONE_UPDATE, "compile_unet": True, "compile_scope": scope})
        assert cfg.compile_backend == "inductor"
        with pytest.raises(PastTheChecks):
            start_checks_only(cfg)


def test_inductor_on_the_cpu_compiling_only_sampling_is_not_refused(monkeypatch, start_checks_only):
    """The refusal is of inductor's CPU gradients; compile_scope=sampling compiles none (its forward matched)."""
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    cfg = resolve_config(overrides={**ONE_UPDATE, "compile_unet": True, "compile_scope": "sampling"})
    with pytest.raises(PastTheChecks):
        start_checks_only(cfg)


def test_sdpa_attention_is_diffusers_default_processor(tmp_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    trainer = Trainer(resolve_config(overrides={**ONE_UPDATE, "attention_backend": "sdpa"}), tmp_path / "run")
    processors = {type(p) for p in (*trainer.unet.attn_processors.values(), *trainer.pipe.vae.attn_processors.values())}
    assert processors == {AttnProcessor2_0}  # torch.nn.functional.scaled_dot_product_attention


@pytest.mark.parametrize("installed, message", [
    (False, "attention_backend=xformers needs the xformers package, which is not installed"),
    (True, "attention_backend=xformers needs a CUDA device, not cpu; use attention_backend=sdpa"),
])
def test_xformers_attention_is_refused_where_it_cannot_run(tmp_path, monkeypatch, installed, message):
    import importlib.machinery
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: (
        (importlib.machinery.ModuleSpec(name, None) if installed else None) if name == "xformers"
        else find_spec(name, *args)))
    with pytest.raises(ConfigError, match=message) as info:
        Trainer(resolve_config(overrides={**ONE_UPDATE, "attention_backend": "xformers"}), tmp_path / "run")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_cudnn_attention_on_the_cpu_is_refused_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="attention_backend=cudnn needs a CUDA device, not cpu; use "
                                          "attention_backend=sdpa"):
        Trainer(resolve_config(overrides={**ONE_UPDATE, "attention_backend": "cudnn"}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_per_timestep_minibatches_hold_one_step_each():
    trained = torch.arange(3).expand(4, 3)
    (update,) = list(per_timestep_rows(trained, torch.Generator().manual_seed(0), rows=2, accumulation=2))
    assert len(update) == 2 * 3  # ga x steps minibatches, as the flattened plan
    for micro, (sample_idx, step_idx) in enumerate(update):
        assert sample_idx.shape == step_idx.shape == (2, 1)
        assert step_idx.unique().tolist() == [micro % 3]
    covered = sorted((int(i), int(k)) for s, t in update for i, k in zip(s.flatten(), t.flatten()))
    assert covered == [(i, k) for i in range(4) for k in range(3)]


@pytest.mark.parametrize("step_fraction", [1.0, 0.5])
def test_each_flattened_update_covers_every_trained_step_of_the_same_samples_as_per_timestep(step_fraction):
    """An update's minibatches (README, "The algorithm") cover all trained steps of its samples. Flattened and
    per-timestep plans differ only in how they batch those pairs (the ablation compares like with like)."""
    from rlcm_fast.algorithms import choose_trained_steps

    trained = choose_trained_steps(12, 5, step_fraction, torch.Generator().manual_seed(2))  # (12, K) steps
    pairs = lambda update: sorted((int(i), int(k)) for s, t in update for i, k in zip(s.flatten(), t.flatten()))
    flat = list(flattened_rows(trained, torch.Generator().manual_seed(0), rows=2, accumulation=3))
    reference = list(per_timestep_rows(trained, torch.Generator().manual_seed(0), rows=2, accumulation=3))
    assert len(flat) == len(reference) == 2
    for ours, theirs in zip(flat, reference):
        assert len(ours) == len(theirs) == 3 * trained.shape[1] and all(len(s) == 2 for s, _ in ours)
        samples = sorted({i for i, _ in pairs(ours)})
        assert len(samples) == 6 and pairs(ours) == pairs(theirs)
        assert pairs(ours) == sorted((i, int(k)) for i in samples for k in trained[i])
    assert len({k for s, t in flat[0] for k in t.flatten().tolist()}) > 1  # timesteps are mixed ...
    assert any(len(set(t.flatten().tolist())) > 1 for _, t in flat[0])  # ... within a minibatch


def test_each_step_logs_the_rewards_of_the_samples_it_trained_on(tmp_path):
    overrides = {**ONE_UPDATE, "batches_per_epoch": 4}  # 8 samples: two updates of 4 samples each
    trainer = Trainer(resolve_config(overrides=overrides), tmp_path / "run")
    logged = []
    trainer.logger = type("Logger", (), {"log": lambda self, kind, epoch, step, values: logged.append(values)})()
    samples = trainer.sample_epoch(0)
    trainer.compute_advantages(samples)
    trainer.train_epoch(0, samples)
    shuffle = epoch_generator(overrides["seed"], 0, 0, stream=2)  # the trainer's: the same samples per update
    plan = per_timestep_rows(torch.arange(3).expand(8, 3), shuffle, rows=2, accumulation=2)
    assert len(logged) == 2
    for sums, update in zip(logged, plan):
        rewards = torch.as_tensor(samples.rewards)[torch.cat([s.flatten() for s, _ in update]).unique()]
        assert len(rewards) == 4
        assert sums["reward_mean"] == pytest.approx(float(rewards.mean()), abs=1e-12)
        assert sums["reward_std"] == pytest.approx(float(rewards.std(correction=0)), abs=1e-12)
    assert logged[0]["reward_mean"] != logged[1]["reward_mean"]


def test_a_step_whose_rewards_are_all_equal_logs_a_std_of_zero(tmp_path):
    """The std came from the mean square minus the squared mean: float64 rounding logged ~1e-8 for equal rewards."""
    trainer = Trainer(resolve_config(overrides=ONE_UPDATE), tmp_path / "run")
    logged = []
    trainer.logger = type("Logger", (), {"log": lambda self, kind, epoch, step, values: logged.append(values)})()
    # A sample trained at n steps is n equal rewards; these gave a std of 1.5e-8, 1.9e-9 and 5.4e-6.
    for reward, n in ((-1.3675, 3), (0.1, 6), (-412.7, 6)):
        rewards = torch.full((n,), reward, dtype=torch.float64)
        sums = {"reward_mean": float(rewards.mean()), "reward_mean_square": float(rewards.square().mean())}
        trainer.log_step(0, sums, grad_norm=0.0)
        assert logged[-1]["reward_std"] == 0.0, reward
    trainer.log_step(0, {"reward_mean": 1.0, "reward_mean_square": 1.0 + 1e-6}, grad_norm=0.0)  # a std of 1e-3
    assert logged[-1]["reward_std"] == pytest.approx(1e-3, rel=1e-6)


def test_rows_per_call_cut_the_same_rows_into_fewer_calls():
    trained = torch.arange(3).expand(8, 3)
    plain = list(flattened_rows(trained, torch.Generator().manual_seed(1), rows=2, accumulation=2))
    called = list(minibatch_plan("ppo", "flattened", 5)(trained, torch.Generator().manual_seed(1), 2, 2))
    assert len(plain) == len(called) == 2
    for minibatches, calls in zip(plain, called):
        assert [len(s) for s, _ in calls] == [5, 5, 2]  # 2 samples x 2 accumulation x 3 steps = 12 rows
        for column in (0, 1):
            assert torch.equal(torch.cat([m[column] for m in minibatches]), torch.cat([c[column] for c in calls]))


@pytest.mark.parametrize("algorithm, train_rows, rows_per_call", [
    ("ppo", "flattened", 0), ("ppo", "flattened", 5), ("ppo", "per_timestep", 0), ("rebel", "flattened", 0)])
@pytest.mark.parametrize("samples", [12, 13, 16])
def test_every_plan_yields_the_update_count_the_trainer_counts_by(algorithm, train_rows, rows_per_call, samples):
    """The trainer's progress and a resume's position count updates by updates_per_pass; each plan must yield
    that many (a remainder too small for an update left out)."""
    trained = torch.arange(3).expand(samples, 3)
    plan = minibatch_plan(algorithm, train_rows, rows_per_call)(trained, torch.Generator().manual_seed(0), 2, 2)
    expected = {"ppo": samples // 4, "rebel": samples // 2 // 4}[algorithm]
    assert updates_per_pass(algorithm, samples, rows=2, accumulation=2) == expected
    assert len(list(plan)) == expected


def test_trainer_calls_the_unet_with_rows_per_call(tmp_path):
    trainer = Trainer(resolve_config(overrides={**ONE_UPDATE, "train_rows_per_call": 5}), tmp_path / "run")
    batches = []
    log_probs = trainer.sampler.action_log_probs
    trainer.sampler.action_log_probs = lambda unet, states, i, *rest, **kw: (batches.append(len(i)),
                                                                                 log_probs(unet, states, i, *rest, **kw))[1]
    samples = trainer.sample_epoch(0)
    trainer.compute_advantages(samples)
    trainer.train_epoch(0, samples)
    assert batches == [5, 5, 2]


@pytest.mark.parametrize("overrides, message", [
    ({"train_rows_per_call": -1}, "train_rows_per_call=-1 is invalid: it must be an integer >= 0"),
    ({"train_rows_per_call": 4, "train_rows": "per_timestep"}, "train_rows_per_call=4 applies to train_rows=flattened"),
    ({"train_rows_per_call": 4, "algorithm": "rebel", "images_per_prompt": 2}, "algorithm=rebel"),
])
def test_rows_per_call_outside_flattened_ppo_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(overrides=overrides)


@pytest.mark.parametrize("method, model", [("rlcm", "tiny"), ("ddpo", "tiny-sd")])
def test_joined_sampling_batches_give_the_same_epoch_in_fewer_unet_batches(tmp_path, method, model):
    """Three sampling batches of 2 in one UNet batch of 6: the same prompts, trajectories and rewards as
    batch by batch (each batch's noise drawn in the same order), the rewards still called per batch."""
    overrides = {**ONE_UPDATE, "method": method, "model": model, "batches_per_epoch": 3, "horizon": 3,
                 "gradient_accumulation_steps": 1}
    epochs, sizes = [], {}
    for joined in (1, 3):
        trainer = Trainer(resolve_config(overrides={**overrides, "sample_batches_per_call": joined}),
                          tmp_path / f"joined{joined}")
        sample, scored = trainer.sampler.sample, []
        trainer.sampler.sample = lambda unet, prompts, **kw: (sizes.setdefault(joined, []).append(len(prompts)),
                                                              sample(unet, prompts, **kw))[1]
        reward_fn = trainer.reward.fn
        trainer.reward.fn = lambda images, prompts: scored.append(len(images)) or reward_fn(images, prompts)
        epochs.append(trainer.sample_epoch(0))
        assert scored == [2, 2, 2]
    assert sizes == {1: [2, 2, 2], 3: [6]}
    batch_by_batch, joined = epochs
    # Batch by batch is the sampler's own draw order: each batch from the epoch's noise stream in turn.
    generator = epoch_generator(ONE_UPDATE["seed"], 0, 0, stream=1, device=trainer.device)
    drawn = [sample(trainer.unet, batch_by_batch.prompts[b : b + 2], generator=generator) for b in (0, 2, 4)]
    torch.testing.assert_close(torch.cat([t.states for t in drawn]), batch_by_batch.states, atol=0, rtol=0)
    assert joined.prompts == batch_by_batch.prompts
    for name in ("states", "log_probs", "images"):
        torch.testing.assert_close(getattr(joined, name), getattr(batch_by_batch, name), atol=1e-5, rtol=0)
    # Each reward is its own image's. Against batch by batch, images 1e-5 apart can still round a pixel to
    # another uint8 level, which moves that JPEG by a few bytes (0.002 kB under CPU torch 2.8; equal under 2.13).
    assert list(joined.rewards) == list(reward_fn(joined.images, joined.prompts))
    assert abs(joined.rewards - batch_by_batch.rewards).max() < 0.01


@pytest.mark.parametrize("joined", [0, 4, -1])
def test_sampling_batches_per_call_must_divide_the_epoch(joined):
    with pytest.raises(ConfigError, match=f"sample_batches_per_call={joined} is invalid: it must be a positive "
                                          "integer dividing batches_per_epoch x num_sample_iters = 6 "):
        resolve_config(overrides={"device": "cpu", "batches_per_epoch": 3, "num_sample_iters": 2,
                                  "sample_batches_per_call": joined})


def test_each_seed_epoch_process_and_stream_draws_its_own_numbers():
    keys = [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 1, 1)]
    draws = {tuple(torch.rand(4, generator=epoch_generator(*key)).tolist()) for key in keys}
    assert len(draws) == len(keys)
    assert torch.equal(torch.rand(4, generator=epoch_generator(3, 2, 1, 0)),
                       torch.rand(4, generator=epoch_generator(3, 2, 1, 0)))  # and reproducible


def test_rebel_minibatches_pair_the_two_images_of_one_prompt():
    """Samples 2p and 2p+1 are one prompt's two images (REBEL's y and y'), side by side in every minibatch."""
    trained = torch.arange(3).repeat(12, 1)  # 12 trajectories, their 3 trained steps
    plan = minibatch_plan("rebel", "flattened")
    updates = list(plan(trained, torch.Generator().manual_seed(0), 2, 1))
    assert len(updates) == 3
    seen = []
    for (sample_idx, step_idx), in updates:
        first = sample_idx[:, 0]
        assert (first[0::2] % 2 == 0).all() and torch.equal(first[1::2], first[0::2] + 1)
        assert torch.equal(step_idx, trained[first])
        seen += first.tolist()
    assert sorted(seen) == list(range(12))


def test_the_per_timestep_plan_trains_one_timestep_per_minibatch():
    trained = torch.arange(3).repeat(8, 1)
    for plan_name, one_step in (("per_timestep", True), ("flattened", False)):
        steps_per_minibatch = [len(step_idx.unique()) for minibatches in
                               minibatch_plan("ppo", plan_name)(trained, torch.Generator().manual_seed(0), 4, 2)
                               for _, step_idx in minibatches]
        assert all(n == 1 for n in steps_per_minibatch) == one_step, (plan_name, steps_per_minibatch)
