"""Mutation-testing round 50g (benchmarks/ablation_algorithms.py, benchmarks/compiled_gradients.py,
benchmarks/gradient_direction.py), a second round over them after 46c: hand-written mutants of those modules were
run against their tests (the ablation, compiled_gradients and gradient_direction tests of test_run_all and
test_benchmark_cli, and test_mutants_round46c); each test here kills one or more that survived (named in its
docstring). All are CPU-only, seeded and fast: the trainers are stand-ins of a few lines, the ablation's runs are
stubbed, and compiled_gradients runs on a stand-in UNet of one linear layer."""

import contextlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import ablation_algorithms  # noqa: E402
import compiled_gradients  # noqa: E402
import gradient_direction  # noqa: E402
from rlcm_fast.config import resolve_config  # noqa: E402
from test_mutants_round46c import stub_runs  # noqa: E402 - its stubbed run_variant

# -- ablation_algorithms ------------------------------------------------------------------------------------------


class StubAblationTrainer:
    """One process; epoch e (1-based) has reward mean -2 + e, std 0.1 e, samples for 1 + e s, trains for 3 e s."""

    def __init__(self, cfg, run_dir):
        self.cfg, self.accelerator = cfg, SimpleNamespace(num_processes=1)

    def train(self):
        return [{"epoch": e, "reward_mean": -2.0 + e, "reward_std": 0.1 * e, "sample_seconds": 1.0 + e,
                 "train_seconds": 3.0 * e} for e in range(1, self.cfg.epochs + 1)]


def test_run_variant_keeps_each_epochs_reward_spread_and_its_sampling_and_training_times_apart(tmp_path,
                                                                                             monkeypatch):
    """Mutants: each epoch's reward_std recorded as its mean, and the sampling and training seconds swapped: the
    elapsed time (their sum) stays right, so only these records show it; the result's split of an epoch into
    sampling and training is what the ablation's GPU part exists to report."""
    monkeypatch.setattr(ablation_algorithms, "Trainer", StubAblationTrainer)
    overrides = {"device": "cpu", "model": "tiny", "epochs": 2, "seed": 0, "batches_per_epoch": 1,
                 "sample_batch_size": 8, "train_batch_size": 8}
    result = ablation_algorithms.run_variant(overrides, tmp_path / "run", measure_kl=False)
    assert [e["reward_std"] for e in result["epochs"]] == pytest.approx([0.1, 0.2])
    assert [e["reward_mean"] for e in result["epochs"]] == pytest.approx([-1.0, 0.0])
    assert [e["sample_seconds"] for e in result["epochs"]] == pytest.approx([2.0, 3.0])
    assert [e["train_seconds"] for e in result["epochs"]] == pytest.approx([3.0, 6.0])


def test_ablation_quick_run_on_a_gpu_machine_skips_the_gpu_part_and_says_why(tmp_path, monkeypatch):
    """Mutant: the GPU part's `and not args.quick` dropped: a smoke run (documented "no GPU part") on a machine with
    CUDA timed all six sd15-lcm variants, many minutes where 1-3 were promised."""
    calls = stub_runs(monkeypatch, cuda=True)
    assert ablation_algorithms.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    assert [name for name, _, _ in calls] == ["tiny-ppo", "tiny-ppo+kl"]
    result = json.loads((tmp_path / "ablation_algorithms.json").read_text())
    assert "gpu_sd15_lcm" not in result
    assert {"part": "gpu_sd15_lcm timings", "reason": "--quick (smoke run)"} in result["skipped"]


def test_ablation_gpu_timings_run_on_cuda_with_the_seed_task_and_config_recorded(tmp_path, monkeypatch):
    """Mutants: the sd15-lcm runs given device cpu (hours of CPU time reported as the GPU's), their --seed dropped
    (seed 0 whatever was asked), their task left to the default, and each timing's config left out of the result
    (the README's table cannot say which variant ran with which settings)."""
    calls = stub_runs(monkeypatch, cuda=True)
    assert ablation_algorithms.main(["--epochs", "1", "--seed", "7", "--out-dir", str(tmp_path)]) == 0
    gpu = [(name, overrides) for name, overrides, _ in calls if name.startswith("gpu-")]
    assert len(gpu) == 6
    for name, overrides in gpu:
        assert overrides["device"] == "cuda" and overrides["seed"] == 7, name
        assert overrides["task"] == "compressibility", name
    result = json.loads((tmp_path / "ablation_algorithms.json").read_text())
    for name, timing in result["gpu_sd15_lcm"].items():
        assert timing["config"]["device"] == "cuda" and timing["config"]["seed"] == 7, name
        assert timing["config"].get("kl_beta") == (0.01 if name.endswith("+kl") else None), name


def test_ablation_plot_goes_into_the_out_dir_beside_the_json(tmp_path, monkeypatch):
    """Mutant: the plot written to benchmarks/results/ whatever --out-dir said: a run into a folder of its own
    overwrote the repository's recorded plot and left its own folder without one."""
    stub_runs(monkeypatch, cuda=False)
    written = []
    monkeypatch.setattr(ablation_algorithms, "plot", lambda result, path: written.append(path))
    assert ablation_algorithms.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    assert written == [tmp_path / "ablation_algorithms.png"]
    assert (tmp_path / "ablation_algorithms.json").exists()


def test_ablation_plot_names_the_device_and_the_seed(tmp_path, monkeypatch):
    """Mutants: the wall-clock axis without the device it was measured on, and the title without the seed: two
    machines' (or seeds') plots then look alike, and the seconds on the x axis mean nothing without the device."""
    import matplotlib.figure

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *args, **kwargs: figures.append(self))
    run = {"epochs": [{"reward_mean": -2.0, "reward_queries": 8, "elapsed_seconds": 1.5}]}
    ablation_algorithms.plot({"device": "Stand-in CPU", "cpu_tiny": {"seed": 42, "runs": {"ppo": run}}},
                             tmp_path / "a.png")
    (figure,) = figures
    by_queries, by_time = figure.axes
    assert "Stand-in CPU" in by_time.get_xlabel()
    assert "seed 42" in figure._suptitle.get_text()


def test_ablation_variants_have_the_documented_batches(tmp_path, monkeypatch):
    """Mutants: REBEL's minibatch 2 pairs instead of 4 (8 trajectories), group PPO's groups of 2 images instead of
    4, and the quick run's train batch 4 instead of its one minibatch of 8: each compares the algorithms at other
    settings than those of the recorded results (test_algorithms' runs use the same)."""
    calls = stub_runs(monkeypatch, cuda=False)
    assert ablation_algorithms.main(["--epochs", "1", "--out-dir", str(tmp_path)]) == 0
    cfgs = {name: resolve_config(overrides=overrides) for name, overrides, _ in calls}
    for name, cfg in cfgs.items():
        per_minibatch = cfg.train_batch_size * (2 if cfg.algorithm == "rebel" else 1)
        assert (cfg.algorithm, cfg.advantages, cfg.images_per_prompt, per_minibatch) == {
            "ppo": ("ppo", "per_prompt", 1, cfg.train_batch_size), "rebel": ("rebel", "per_prompt", 2, 8),
            "group_ppo": ("ppo", "group", 4, cfg.train_batch_size)}[name[5:].removesuffix("+kl")], name
    calls.clear()
    assert ablation_algorithms.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    for name, overrides, _ in calls:
        cfg = resolve_config(overrides=overrides)
        assert cfg.samples_per_epoch == cfg.train_batch_size == 8, name  # one minibatch per epoch


def test_ablation_a_bad_kl_beta_is_refused_before_any_variant_runs(tmp_path, monkeypatch, capsys):
    """Mutant: only the first variant's configuration checked up front: ppo (no KL) passed, and --kl-beta -1 was a
    ConfigError traceback after ppo's whole training run (15 epochs on the full ablation)."""
    calls = stub_runs(monkeypatch, cuda=False)
    with pytest.raises(SystemExit) as exit_info:
        ablation_algorithms.main(["--kl-beta", "-1", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "kl_beta=-1.0 is invalid" in capsys.readouterr().err.strip().splitlines()[-1]
    assert calls == [] and not list(tmp_path.iterdir())


# -- compiled_gradients ------------------------------------------------------------------------------------------

def test_compare_prints_the_worst_tensors_and_the_summary_figures_the_result_holds(capsys):
    """Mutants: the five best tensors printed instead of the five worst (the ones to look at when compiled training
    strays), the summary's "worst" figure taken from the best tensor, and its "N of M tensors all zero" count
    printed the other way round."""
    names = [f"t{i}" for i in range(7)]
    eager = [torch.tensor([1.0, 1.0]) for _ in names]
    errors = [0.0, 0.3, 0.1, 0.6, 0.2, 0.5, 0.4]
    compiled = [torch.tensor([1.0 + e, 1.0]) for e in errors]
    compiled[2] = torch.zeros(2)  # relative error 1.0, and all zero where eager's is not
    check = compiled_gradients.compare("unet", 2.0, torch.zeros(3), compiled, torch.zeros(3), eager, names,
                                       "inductor", "cpu")
    out = capsys.readouterr().out.splitlines()
    assert check["gradient_relative_error_max"] == pytest.approx(1.0) and check["tensors_zeroed"] == ["t2"]
    assert "worst 1, 1 of 7 tensors all zero where eager's are not" in out[0]
    assert [line.split()[-1] for line in out[1:]] == ["t1", "t6", "t5", "t3", "t2"]  # ascending: the worst last


class StubLoRAUNet(torch.nn.Module):
    """A frozen weight and two LoRA-like factors (zero at first, as LoRA's B is); an LCM's config fields."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(cross_attention_dim=3, time_cond_proj_dim=2)
        self.base = torch.nn.Parameter(torch.ones(1))
        self.lora_a = torch.nn.Parameter(torch.zeros(4))
        self.lora_b = torch.nn.Parameter(torch.zeros(1))

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, return_dict=True):
        scale = self.base + (self.lora_a * self.lora_b).sum() + self.lora_a.sum() * timestep_cond.mean()
        return (sample * scale + encoder_hidden_states.mean() * self.lora_b,)

    def compile_repeated_blocks(self, **kwargs):
        pass


class ScaledCompile(torch.nn.Module):
    """Stands in for torch.compile's module: the UNet's output times `scale` (a compiler that gets it wrong)."""

    def __init__(self, unet, scale):
        super().__init__()
        self.unet, self.scale = unet, scale

    def forward(self, **inputs):
        return (self.unet(**inputs)[0] * self.scale,)


def run_compiled_gradients(tmp_path, monkeypatch, scale, *argv):
    seen = []
    real = compiled_gradients.forward_backward

    def spy(unet, inputs, target, params):
        seen.append([p.detach().clone() for p in params])
        return real(unet, inputs, target, params)

    def add_lora(unet, rank, alpha, targets):
        unet.base.requires_grad_(False)
        return [unet.lora_a, unet.lora_b]

    monkeypatch.setattr(compiled_gradients, "forward_backward", spy)
    monkeypatch.setattr(compiled_gradients, "load_pipeline", lambda model, device, dtype: SimpleNamespace(
        unet=StubLoRAUNet()))
    monkeypatch.setattr(compiled_gradients, "add_policy_lora", add_lora)
    monkeypatch.setattr(compiled_gradients, "latent_shape", lambda pipe, rows, resolution: (rows, 4, 2, 2))
    monkeypatch.setattr(torch, "compile", lambda unet, backend: ScaledCompile(unet, scale))
    assert compiled_gradients.main(["--backend", "eager", "--rows", "2", "--scopes", "unet", "--out-dir",
                                    str(tmp_path), *argv]) == 0
    return seen, json.loads((tmp_path / "compiled_gradients.json").read_text())["scopes"]


def test_compiled_gradients_compares_the_compiled_modules_fresh_gradients_with_eager_ones(tmp_path, monkeypatch):
    """Mutants: the compiled check run on the eager UNet (the whole-UNet scope then always reported a perfect
    match, whatever the compiler did) and the gradients not cleared between the eager and the compiled call (a
    compiler that is exactly right then reported a relative error of 1: eager's gradient added twice)."""
    _, (check,) = run_compiled_gradients(tmp_path / "right", monkeypatch, 1.0)
    assert check["forward_max_abs_difference"] == 0 and check["gradient_relative_error_max"] == 0
    _, (check,) = run_compiled_gradients(tmp_path / "wrong", monkeypatch, 2.0)
    assert check["forward_max_abs_difference"] > 0 and check["gradient_relative_error_max"] > 0.1
    assert check["tensors"] == 2 and check["tensors_zeroed"] == []


def test_compiled_gradients_lora_start_is_seeded(tmp_path, monkeypatch):
    """Mutant: the global seed not set before the LoRA factors get their random start: two runs compared different
    weights, so their errors (and a rerun to check a fix) are not comparable."""
    first, _ = run_compiled_gradients(tmp_path / "a", monkeypatch, 1.0)
    torch.randn(5)  # whatever ran before
    second, _ = run_compiled_gradients(tmp_path / "b", monkeypatch, 1.0)
    assert all(p.abs().max() > 0 for p in first[0])
    for ours, theirs in zip(first[0], second[0]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# -- gradient_direction ------------------------------------------------------------------------------------------

H, D = 3, 2  # UNet calls per trajectory, LoRA weight entries


class StubSampler:
    """Log-prob of action k of trajectory i: (states[i, k] @ weight) * embeds[i, 0], the prompt's embedding."""
    horizon = H

    def __init__(self, trainer):
        self.trainer = trainer

    def prompt_embeddings(self, prompts):
        return torch.tensor([[float(prompt)] for prompt in prompts])

    def action_log_probs(self, unet, states, sample_idx, step_idx, embeds):
        self.trainer.autocast_during.append(self.trainer.in_autocast)
        return ((states[sample_idx, step_idx] * unet.weight).sum(-1) * embeds[:, 0],)

    def unet_output(self, unet, x, timesteps, embeds, w_embedding):
        return float(unet.weight.detach().sum())


class StubTrainer:
    """A policy of D weights; epoch e's rewards are seeded by e (plus the weights' sum, with the LoRA on)."""
    made = []

    def __init__(self, cfg, run_dir=None, progress_bars=False):
        self.cfg, self.sampler = cfg, StubSampler(self)
        self.unet = SimpleNamespace(weight=torch.nn.Parameter(torch.zeros(D)), train=lambda: None,
                                    disable_adapters=lambda: None, enable_adapters=lambda: None)
        self.params = [self.unet.weight]
        self.in_autocast, self.autocast_during = False, []
        StubTrainer.made.append(self)

    @contextlib.contextmanager
    def autocast(self):
        self.in_autocast = True
        try:
            yield
        finally:
            self.in_autocast = False

    def samples(self, n, rewards, seed=0):
        generator = torch.Generator().manual_seed(seed)
        return SimpleNamespace(rewards=np.asarray(rewards, dtype=np.float64), states=torch.randn(n, H - 1, D,
                               generator=generator), log_probs=torch.zeros(n, H - 1), prompts=[i % 3 + 1 for i in
                                                                                                range(n)])

    def sample_epoch(self, epoch):
        n = self.cfg.samples_per_epoch
        rewards = torch.randn(n, generator=torch.Generator().manual_seed(epoch), dtype=torch.float64).numpy()
        rewards += sum(self.sampler.unet_output(self.unet, k, None, None, None) for k in range(H))
        return self.samples(n, rewards, seed=epoch)


def expected_estimate(samples) -> torch.Tensor:
    """mean over (i, k) of A_i * grad log pi = A_i * states[i, k] * e_i, A the normalised rewards, e_i the prompt's
    embedding."""
    rewards = samples.rewards
    advantages = torch.as_tensor((rewards - rewards.mean()) / (rewards.std() + 1e-6), dtype=torch.float32)
    embeds = torch.tensor([float(prompt) for prompt in samples.prompts])
    n, steps = samples.log_probs.shape
    return ((advantages * embeds)[:, None, None] * samples.states).sum((0, 1)) / (n * steps)


def test_policy_gradient_estimate_reads_each_rows_own_prompt_embedding_under_the_trainers_autocast():
    """Mutants: every row's log-prob given the whole batch's embeddings (not its own prompt's: each action scored
    under the wrong prompt) and the log-probs computed outside the trainer's autocast (under mixed precision the
    estimate is then not the gradient of what the trainer's updates compute)."""
    trainer = StubTrainer(SimpleNamespace(samples_per_epoch=40))
    samples = trainer.sample_epoch(2)
    (estimate,) = gradient_direction.policy_gradient_estimate(trainer, samples)
    torch.testing.assert_close(estimate, expected_estimate(samples), rtol=1e-5, atol=1e-7)
    assert trainer.autocast_during == [True, True]  # rows 0-31, then 32-39


def test_policy_gradient_estimate_starts_from_no_gradient_and_is_zero_when_every_reward_is_equal():
    """Mutants: the parameters' gradients not cleared first (an estimate after another, or after a training step,
    added to the old gradient), and the advantages' std taken without its 1e-6 (equal rewards divided 0 by 0: a nan
    estimate, and every LoRA weight nan after the step, where a step of zero is right)."""
    trainer = StubTrainer(SimpleNamespace(samples_per_epoch=32))
    samples = trainer.sample_epoch(1)
    first = gradient_direction.policy_gradient_estimate(trainer, samples)[0]
    again = gradient_direction.policy_gradient_estimate(trainer, samples)[0]
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    flat = trainer.samples(32, [3.0] * 32)
    (estimate,) = gradient_direction.policy_gradient_estimate(trainer, flat)
    assert torch.equal(estimate, torch.zeros(D))


def test_base_weights_for_all_leaves_a_sampler_without_a_per_call_hook_alone():
    """Mutant: the `all` scope's early exit dropped: it then wraps the sampler's unet_output and reads its horizon,
    which DDPO's sampler does not have (--set method=ddpo measures `all` only, and failed with an AttributeError)."""
    trainer = SimpleNamespace(sampler=SimpleNamespace(), unet=None)
    with gradient_direction.base_weights_for(trainer, "all"):
        pass
    assert vars(trainer.sampler) == {}


def test_gradient_direction_records_the_set_overrides_and_says_how_many_samples_it_scored(tmp_path, monkeypatch,
                                                                                          capsys):
    """Mutants: the result's `overrides` left empty (the run cannot be told from a default one) and the printed
    base reward said to be over 32 samples (one batch) when --samples were scored."""
    StubTrainer.made.clear()
    monkeypatch.setattr(gradient_direction, "Trainer", StubTrainer)
    assert gradient_direction.main(["--samples", "64", "--eps", "0.5", "--set", "seed=5", "--out-dir",
                                    str(tmp_path)]) == 0
    (trainer,) = StubTrainer.made
    assert trainer.cfg.seed == 5 and trainer.cfg.samples_per_epoch == 64
    result = json.loads((tmp_path / "gradient_direction.json").read_text())
    assert result["config"]["overrides"] == {"seed": 5} and result["config"]["seed"] == 5
    assert " over 64 samples" in capsys.readouterr().out.splitlines()[0]


def test_gradient_direction_set_overrides_its_own_defaults(tmp_path, monkeypatch):
    """Mutant: the script's own settings (reward_overlap off, no sample grids) put after --set's: a user's --set for
    them was silently ignored, where --set is documented as the override."""
    StubTrainer.made.clear()
    monkeypatch.setattr(gradient_direction, "Trainer", StubTrainer)
    assert gradient_direction.main(["--samples", "32", "--eps", "0.5", "--set", "grid_every=3", "--set",
                                    "reward_overlap=true", "--out-dir", str(tmp_path)]) == 0
    (trainer,) = StubTrainer.made
    assert trainer.cfg.grid_every == 3 and trainer.cfg.reward_overlap is True
    StubTrainer.made.clear()
    assert gradient_direction.main(["--samples", "32", "--eps", "0.5", "--out-dir", str(tmp_path)]) == 0
    (trainer,) = StubTrainer.made
    assert trainer.cfg.grid_every == 0 and trainer.cfg.reward_overlap is False
