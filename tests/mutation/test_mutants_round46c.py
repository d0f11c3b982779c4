"""Mutation-testing round 46c (benchmarks/ablation_algorithms.py, benchmarks/compiled_gradients.py,
benchmarks/gradient_direction.py): hand-written mutants of those modules were run against their tests (the
ablation, compiled_gradients and gradient_direction tests of test_run_all and test_benchmark_cli); each test here
kills one or more that survived (named in its docstring). All are CPU-only, seeded and fast: the trainer is a
stand-in of a few lines (a linear "policy" whose effect on the reward is known), the ablation's runs are stubbed,
and compiled_gradients runs the tiny model once with the aot_eager backend."""

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
from rlcm_fast.models import ModelLoadError  # noqa: E402

# -- gradient_direction: a stand-in trainer whose reward is linear in its LoRA weight -----------------------------

H, D = 4, 3  # UNet calls per trajectory, LoRA weight entries
# Each UNet call k adds CALL_WEIGHTS[k] @ weight to every reward of its batch (while the LoRA is on).
CALL_WEIGHTS = torch.randn(H, D, generator=torch.Generator().manual_seed(0))


class FakeUNet:
    def __init__(self):
        self.weight = torch.nn.Parameter(torch.zeros(D))
        self.adapters = True

    def train(self):
        return self

    def disable_adapters(self):
        self.adapters = False

    def enable_adapters(self):
        self.adapters = True


class FakeSampler:
    horizon = H

    def __init__(self):
        self.adapters_seen = []  # per UNet call: was the LoRA on

    def unet_output(self, unet, x, timesteps, embeds, w_embedding):  # x: the call's index k
        self.adapters_seen.append(unet.adapters)
        return float(CALL_WEIGHTS[x] @ unet.weight.detach()) if unet.adapters else 0.0

    def prompt_embeddings(self, prompts):
        return torch.zeros(len(prompts), 1)

    def action_log_probs(self, unet, states, sample_idx, step_idx, embeds):
        return ((states[sample_idx, step_idx] * unet.weight).sum(-1),)


class FakeTrainer:
    """Samples cfg.samples_per_epoch trajectories in batches of 32, H UNet calls per batch; the epoch seeds the
    noise (common random numbers) and the states the estimate reads."""
    made = []

    def __init__(self, cfg, run_dir=None, progress_bars=False):
        self.cfg, self.unet, self.sampler = cfg, FakeUNet(), FakeSampler()
        self.params = [self.unet.weight]
        self.epochs = []
        FakeTrainer.made.append(self)

    def autocast(self):
        return contextlib.nullcontext()

    def sample_epoch(self, epoch):
        self.epochs.append(epoch)
        n = self.cfg.samples_per_epoch
        generator = torch.Generator().manual_seed(epoch)
        rewards = 5.0 + torch.randn(n, generator=generator, dtype=torch.float64).numpy()
        states = torch.randn(n, H - 1, D, generator=generator)
        for start in range(0, n, gradient_direction.BATCH):
            rewards[start:start + gradient_direction.BATCH] += sum(
                self.sampler.unet_output(self.unet, k, None, None, None) for k in range(H))
        return SimpleNamespace(rewards=rewards, states=states, log_probs=torch.zeros(n, H - 1),
                               prompts=["p"] * n)


def expected_estimate(samples) -> torch.Tensor:
    """mean over (i, k) of A_i * grad log pi = A_i * states[i, k], A the normalised rewards."""
    rewards = samples.rewards
    advantages = torch.as_tensor((rewards - rewards.mean()) / (rewards.std() + 1e-6), dtype=torch.float32)
    n, steps = samples.log_probs.shape
    return (advantages[:, None, None] * samples.states).sum((0, 1)) / (n * steps)


def test_gradient_direction_refuses_a_nan_step_size():
    """Mutant: the --eps check `not eps > 0` -> `eps <= 0`: --eps nan passed it, and every LoRA weight became
    nan (an hour's run of nan rewards) instead of the one-line refusal."""
    with pytest.raises(SystemExit) as exit_info:
        gradient_direction.parse_args(["--eps", "0.001", "nan"])
    assert exit_info.value.code == 2
    gradient_direction.parse_args(["--eps", "0.001"])  # a good size still passes


def test_gradient_direction_refuses_an_infinite_step_size(capsys):
    """--eps inf moved every LoRA weight to +-inf: the run sampled nan images for its whole length and recorded
    nonsense, where a bad size gets the one-line refusal (a source bug this round found, mended with the test)."""
    with pytest.raises(SystemExit) as exit_info:
        gradient_direction.parse_args(["--eps", "inf"])
    assert exit_info.value.code == 2
    assert "--eps inf invalid: each sign-step size must be > 0 and finite" in capsys.readouterr().err


def test_gradient_direction_refuses_a_step_size_given_twice(capsys):
    """--eps 0.001 0.001 measured the same size twice (two rows, twice the time); the other scripts' lists refuse
    repeats in one line, and so does this one."""
    with pytest.raises(SystemExit) as exit_info:
        gradient_direction.parse_args(["--eps", "0.001", "0.003", "1e-3"])
    assert exit_info.value.code == 2
    assert "--eps repeats 0.001: give each size once" in capsys.readouterr().err


def test_base_weights_for_switches_the_lora_off_exactly_outside_the_scope():
    """Mutants: the final call found at `k == horizon` (never), the scope test inverted, the call counter not taken
    modulo the horizon (the second batch's calls all counted as actions), the LoRA not switched back on after a
    call, the sampler's hook not restored after the block, and `actions` taken for `all`: each measures another
    step than the one the row names (actions: every call but the last; final: only the last)."""
    cfg = SimpleNamespace(samples_per_epoch=64)
    for scope, on in (("all", [True] * H), ("actions", [True] * (H - 1) + [False]),
                      ("final", [False] * (H - 1) + [True])):
        trainer = FakeTrainer(cfg)
        with gradient_direction.base_weights_for(trainer, scope):
            for k in list(range(H)) * 2:  # two sampling batches
                trainer.sampler.unet_output(trainer.unet, k, None, None, None)
        assert trainer.sampler.adapters_seen == on * 2, scope
        assert trainer.unet.adapters
        trainer.sampler.unet_output(trainer.unet, 0, None, None, None)  # after the block: the LoRA on for every call
        assert trainer.sampler.adapters_seen[-1] is True, scope


def test_policy_gradient_estimate_is_the_mean_of_advantage_times_score_over_every_row_and_step():
    """Mutants: the rewards not centred before normalising, the sum divided by the trajectories only (not times
    the steps), the step index built with repeat_interleave (rows paired with other rows' steps), and only the
    first batch of 32 rows used: the direction the benchmark steps along is then not the PPO estimate's."""
    trainer = FakeTrainer(SimpleNamespace(samples_per_epoch=64))
    samples = trainer.sample_epoch(3)
    (estimate,) = gradient_direction.policy_gradient_estimate(trainer, samples)
    torch.testing.assert_close(estimate, expected_estimate(samples), rtol=1e-5, atol=1e-7)


def run_gradient_direction(tmp_path, monkeypatch, *argv):
    FakeTrainer.made.clear()
    monkeypatch.setattr(gradient_direction, "Trainer", FakeTrainer)
    assert gradient_direction.main([*argv, "--out-dir", str(tmp_path)]) == 0
    (trainer,) = FakeTrainer.made
    return trainer


def test_gradient_direction_records_each_scopes_reward_change_both_ways(tmp_path, monkeypatch):
    """Mutants: the step's signs swapped (along <-> against), the step added to the weights already moved (p.add_,
    or a base that shares the weights' storage) rather than taken from the base, the evaluation drawn from the
    estimate's own epoch 0, the estimate from epoch 1, the reward change recorded without the base reward taken
    off, --samples // 32 + 1 batches, and the base reward's std recorded as its variance (or its mean). With a
    reward linear in the weights, `along` is the step's exact effect, `against` its negative, and `all` is
    `actions` plus `final`."""
    trainer = run_gradient_direction(tmp_path, monkeypatch, "--samples", "64", "--eps", "0.5", "2")
    assert trainer.cfg.samples_per_epoch == 64
    rows = 1 + 2 * 3 * 2  # the base evaluation, then along and against for 3 scopes x 2 sizes
    assert trainer.epochs == [0] + [1] * rows  # the estimate's epoch, then one other, the same for each evaluation
    estimate = expected_estimate(FakeTrainer(trainer.cfg).sample_epoch(0))
    effect = {"all": CALL_WEIGHTS.sum(0), "actions": CALL_WEIGHTS[:-1].sum(0), "final": CALL_WEIGHTS[-1]}
    result = json.loads((tmp_path / "gradient_direction.json").read_text())
    assert [(row["scope"], row["eps"]) for row in result["reward_change"]] == [
        (scope, eps) for scope in ("all", "actions", "final") for eps in (0.5, 2.0)]
    for row in result["reward_change"]:
        along = float(effect[row["scope"]] @ (row["eps"] * estimate.sign()))
        assert row["along"] == pytest.approx(along, rel=1e-5, abs=1e-6), row
        assert row["against"] == pytest.approx(-along, rel=1e-5, abs=1e-6), row
    base = FakeTrainer(trainer.cfg).sample_epoch(1).rewards
    assert result["base_reward_mean"] == pytest.approx(np.mean(base))
    assert result["base_reward_std"] == pytest.approx(np.std(base))
    assert result["config"]["samples"] == 64 and result["config"]["method"] == "rlcm"


def test_gradient_direction_with_ddpo_measures_only_all_and_writes_its_own_file(tmp_path, monkeypatch):
    """Mutants: every scope measured for DDPO too (its every DDIM step is an action: `actions` and `final` mean
    nothing there, and its sampler has no per-call hook), and its results written to gradient_direction.json,
    over the RLCM run's."""
    run_gradient_direction(tmp_path, monkeypatch, "--samples", "32", "--eps", "0.5", "--set", "method=ddpo",
                           "--set", "model=tiny-sd")
    assert not (tmp_path / "gradient_direction.json").exists()
    result = json.loads((tmp_path / "gradient_direction_ddpo.json").read_text())
    assert [row["scope"] for row in result["reward_change"]] == ["all"]
    assert result["config"]["method"] == "ddpo"


def test_gradient_direction_a_model_that_does_not_load_is_one_line(tmp_path, monkeypatch, capsys):
    """Mutant: only ConfigError caught around the trainer: a model folder that holds no model (ModelLoadError) was
    a traceback, not argparse's one line."""
    def no_model(cfg, run_dir, progress_bars=False):
        raise ModelLoadError("model '/nowhere' holds no model")

    monkeypatch.setattr(gradient_direction, "Trainer", no_model)
    with pytest.raises(SystemExit) as exit_info:
        gradient_direction.main(["--samples", "32", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "model '/nowhere' holds no model" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())


# -- ablation_algorithms: run_variant on a stand-in trainer -----------------------------------------------------

class FakeAblationTrainer:
    """Two processes; epoch e (1-based) samples for 1 + e s and trains for 0.25 e s."""

    def __init__(self, cfg, run_dir):
        self.cfg, self.accelerator, self.sampled = cfg, SimpleNamespace(num_processes=2), []

    def train(self):
        return [{"epoch": e, "reward_mean": -2.0 + e, "reward_std": 0.5, "sample_seconds": 1.0 + e,
                 "train_seconds": 0.25 * e} for e in range(1, self.cfg.epochs + 1)]

    def sample_epoch(self, epoch):
        self.sampled.append(epoch)
        return SimpleNamespace(epoch=epoch)

    def kl_to_base(self, samples):
        return 0.01 * samples.epoch


def test_run_variant_counts_every_processes_queries_accumulates_time_and_measures_kl_after_training(
        tmp_path, monkeypatch):
    """Mutants: reward queries counted from epoch + 1 (one epoch ahead) or for one process only, the elapsed time
    per epoch instead of accumulated (the reward-vs-wall-clock curve's x axis), and the final KL measured on the
    last training epoch's stream rather than on fresh samples after it."""
    made = []
    monkeypatch.setattr(ablation_algorithms, "Trainer", lambda cfg, run_dir: made.append(
        FakeAblationTrainer(cfg, run_dir)) or made[-1])
    overrides = {"device": "cpu", "model": "tiny", "epochs": 3, "seed": 0, "batches_per_epoch": 1,
                 "sample_batch_size": 8, "train_batch_size": 8, "kl_beta": 0.05}
    result = ablation_algorithms.run_variant(overrides, tmp_path / "run", measure_kl=True)
    (trainer,) = made
    per_epoch = trainer.cfg.samples_per_epoch * 2
    assert per_epoch == 16
    assert [e["reward_queries"] for e in result["epochs"]] == [per_epoch * e for e in (1, 2, 3)]
    assert [e["elapsed_seconds"] for e in result["epochs"]] == pytest.approx(
        np.cumsum([1.0 + e + 0.25 * e for e in (1, 2, 3)]).tolist())
    assert trainer.sampled == [3] and result["final_kl_to_base"] == pytest.approx(0.03)
    assert result["config"]["kl_beta"] == 0.05 and result["config"]["epochs"] == 3
    assert "final_kl_to_base" not in ablation_algorithms.run_variant(overrides, tmp_path / "run2", measure_kl=False)


# -- ablation_algorithms: main with its runs stubbed -------------------------------------------------------------

def stub_runs(monkeypatch, cuda: bool) -> list:
    """run_variant recorded; a run of E epochs has rewards -2 + 0.5 e and a KL of 0.25 when measured."""
    calls = []

    def run_variant(overrides, run_dir, measure_kl):
        calls.append((run_dir.name, overrides, measure_kl))
        epochs = [{"epoch": e, "reward_mean": -2.0 + 0.5 * e, "reward_std": 0.1, "reward_queries": 8 * e,
                   "sample_seconds": 1.0, "train_seconds": 1.0, "elapsed_seconds": 2.0 * e}
                  for e in range(1, overrides["epochs"] + 1)]
        result = {"config": dict(overrides), "wall_seconds": 3.0, "epochs": epochs}
        if measure_kl:
            result["final_kl_to_base"] = 0.25
        return result

    monkeypatch.setattr(ablation_algorithms, "run_variant", run_variant)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if cuda:  # no real GPU to name
        monkeypatch.setattr(ablation_algorithms, "environment", lambda: {"device": "Stand-in GPU"})
    return calls


def test_ablation_full_cpu_run_trains_every_variant_with_the_documented_defaults(tmp_path, monkeypatch, capsys):
    """Mutants: 14 epochs by default instead of the documented 15, a --kl-beta default of 0.1 instead of the
    documented 0.01, the tiny runs without device=cpu (on a GPU machine they went to the GPU, and their
    wall-clock curves were not the CPU's), the tiny runs' KL not measured, the GPU part run without CUDA (`and not
    --quick` -> `or`: sd15-lcm on a CPU after the whole CPU part), and the summary's last reward taken from the
    first epoch."""
    calls = stub_runs(monkeypatch, cuda=False)
    assert "[--epochs 15]" in ablation_algorithms.__doc__ and "[--kl-beta 0.01]" in ablation_algorithms.__doc__
    assert ablation_algorithms.main(["--out-dir", str(tmp_path)]) == 0
    assert [name for name, _, _ in calls] == [f"tiny-{name}{kl}" for name in ("ppo", "rebel", "group_ppo")
                                              for kl in ("", "+kl")]
    for name, overrides, measure_kl in calls:
        assert measure_kl and overrides["device"] == "cpu" and overrides["model"] == "tiny", name
        assert overrides["epochs"] == 15 and overrides["seed"] == 0, name
        assert overrides.get("kl_beta") == (0.01 if name.endswith("+kl") else None), name
    result = json.loads((tmp_path / "ablation_algorithms.json").read_text())
    assert result["skipped"] == [{"part": "gpu_sd15_lcm timings", "reason": "CUDA is not available"}]
    assert "gpu_sd15_lcm" not in result
    out = capsys.readouterr().out
    assert f"ppo            reward {-2.0 + 0.5:+.3f} -> {-2.0 + 0.5 * 15:+.3f}  KL to base 0.2500" in out


def test_ablation_quick_run_keeps_its_kl_beta_and_says_what_it_left_out(tmp_path, monkeypatch):
    """Mutants: the +kl variant's kl_beta fixed at 0.01 (--kl-beta ignored), 4 samples per epoch instead of the
    documented 8, the result's kl_beta not the one the runs used, the quick run's skip entry for the rebel and
    group_ppo variants dropped (the README then lacks them with no word why), and the GPU part's skip reason always
    "CUDA is not available" (a smoke run on a GPU machine said so)."""
    calls = stub_runs(monkeypatch, cuda=False)
    assert ablation_algorithms.main(["--quick", "--kl-beta", "0.05", "--seed", "3", "--out-dir", str(tmp_path)]) == 0
    assert [name for name, _, _ in calls] == ["tiny-ppo", "tiny-ppo+kl"]
    for name, overrides, _ in calls:
        cfg = resolve_config(overrides=overrides)
        assert cfg.samples_per_epoch == 8 and cfg.epochs == 1 and cfg.seed == 3, name
        assert cfg.kl_beta == (0.05 if name.endswith("+kl") else 0.0), name
    result = json.loads((tmp_path / "ablation_algorithms.json").read_text())
    assert result["cpu_tiny"]["seed"] == 3 and result["cpu_tiny"]["kl_beta"] == 0.05
    assert result["skipped"] == [{"part": "rebel and group_ppo variants", "reason": "--quick (smoke run)"},
                                 {"part": "gpu_sd15_lcm timings", "reason": "--quick (smoke run)"}]


def test_ablation_gpu_part_times_each_valid_sd15_variant_for_the_gpu_epochs(tmp_path, monkeypatch):
    """Mutants: the GPU runs given --epochs instead of --gpu-epochs, the tiny preset's variant table (REBEL's 4
    pairs per minibatch, which sd15-lcm's 20 pairs per epoch cannot be split into: the GPU part failed after the
    whole CPU part), and a KL measured after each timing run (extra sampling, minutes on the GPU, recorded
    nowhere)."""
    calls = stub_runs(monkeypatch, cuda=True)
    assert ablation_algorithms.main(["--epochs", "2", "--gpu-epochs", "3", "--out-dir", str(tmp_path)]) == 0
    gpu = [(name, overrides, measure_kl) for name, overrides, measure_kl in calls if name.startswith("gpu-")]
    assert [name for name, _, _ in gpu] == [f"gpu-{name}{kl}" for name in ("ppo", "rebel", "group_ppo")
                                            for kl in ("", "+kl")]
    for name, overrides, measure_kl in gpu:
        assert not measure_kl and overrides["epochs"] == 3 and overrides["model"] == "sd15-lcm", name
        resolve_config(overrides={**overrides, "device": "cpu"})  # a valid configuration (no CUDA here)
    result = json.loads((tmp_path / "ablation_algorithms.json").read_text())
    assert sorted(result["gpu_sd15_lcm"]) == sorted(name[4:] for name, _, _ in gpu)
    assert all(len(run["epochs"]) == 3 for run in result["gpu_sd15_lcm"].values())
    assert result["skipped"] == []


def test_ablation_plot_draws_kl_runs_dashed_against_queries_and_accumulated_time(tmp_path, monkeypatch):
    """Mutants: the line styles swapped (the legend's +kl runs drawn solid) and the wall-clock panel plotted
    against reward queries."""
    import matplotlib.figure

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *args, **kwargs: figures.append(self))
    run = {"epochs": [{"reward_mean": -2.0, "reward_queries": 8, "elapsed_seconds": 1.5},
                      {"reward_mean": -1.0, "reward_queries": 16, "elapsed_seconds": 4.0}]}
    ablation_algorithms.plot({"device": "cpu", "cpu_tiny": {"seed": 0, "runs": {"ppo": run, "ppo+kl": run}}},
                             tmp_path / "a.png")
    (figure,) = figures
    by_queries, by_time = figure.axes
    assert [(line.get_label(), line.get_linestyle()) for line in by_queries.lines] == [("ppo", "-"), ("ppo+kl", "--")]
    assert [list(line.get_xdata()) for line in by_queries.lines] == [[8, 16]] * 2
    assert [list(line.get_xdata()) for line in by_time.lines] == [[1.5, 4.0]] * 2
    assert [list(line.get_ydata()) for line in by_time.lines] == [[-2.0, -1.0]] * 2


# -- compiled_gradients ------------------------------------------------------------------------------------------

def test_compare_reports_median_and_worst_relative_error_and_only_gradients_compile_zeroed():
    """Mutants: the median taken as the smallest error, the worst as the second worst, the error made relative to
    the compiled gradient instead of eager's, and a tensor counted as zeroed when eager's is zero too (no
    gradient to lose): each misreports how far compiled training strays from eager."""
    eager = [torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.0]), torch.tensor([0.5, 1.0]), torch.zeros(2)]
    compiled = [torch.tensor([1.0, -1.0]), torch.zeros(2), torch.tensor([0.5, 0.9]), torch.zeros(2)]
    check = compiled_gradients.compare("blocks", 1.5, torch.tensor([1.0, 2.0]), compiled, torch.tensor([1.0, 2.5]),
                                       eager, ["a", "b", "c", "d"], "aot_eager", "cpu")
    relative = sorted([1.0 / 2.0, 4.0 / 4.0, 0.1 / 1.0, 0.0])  # max |difference| over eager's max |entry|
    assert check["gradient_relative_error_median"] == pytest.approx(relative[2])
    assert check["gradient_relative_error_max"] == pytest.approx(relative[-1])
    assert check["tensors_zeroed"] == ["b"] and check["tensors"] == 4
    assert check["forward_max_abs_difference"] == pytest.approx(0.5)


def test_compiled_gradients_feeds_every_lora_factor_a_gradient_and_the_guidance_embedding(tmp_path, monkeypatch):
    """Mutants: the LoRA factors left at their start (B = 0, so every A's gradient is zero and its check compares
    zeros), the LCM's guidance embedding (timestep_cond) left out of the UNet's inputs, and the recorded batch
    not the one run."""
    seen = []
    real = compiled_gradients.forward_backward

    def spy(unet, inputs, target, params):
        out, grads = real(unet, inputs, target, params)
        seen.append((unet.config.time_cond_proj_dim, set(inputs), grads))
        return out, grads

    from diffusers import UNet2DConditionModel

    monkeypatch.setattr(compiled_gradients, "forward_backward", spy)
    # What is checked here is what goes into both calls: the "compiled" one may run eagerly (seconds, not a compile).
    monkeypatch.setattr(UNet2DConditionModel, "compile_repeated_blocks", lambda self, **kwargs: None)
    assert compiled_gradients.main(["--backend", "aot_eager", "--rows", "2", "--scopes", "blocks",
                                    "--resolution", "16", "--out-dir", str(tmp_path)]) == 0
    (proj_dim, eager_inputs, eager_grads), _ = seen
    assert proj_dim is not None and "timestep_cond" in eager_inputs  # the tiny preset is an LCM
    assert all(grad.abs().max() > 0 for grad in eager_grads)
    result = json.loads((tmp_path / "compiled_gradients.json").read_text())
    assert result["config"]["rows"] == 2
