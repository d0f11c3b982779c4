"""Mutation-testing round 50a (benchmarks/bench_train.py), a second round over it after 44h: hand-written mutants
of the module were run against its tests (test_benchmark_cli, test_run_all, test_unet_profile, test_mutants_round44h,
test_mutants_round49h); each test here kills one or more that survived (named in its docstring). All are CPU-only,
seeded and fast: the trainer, the sampler, the clock and main's rows are stubbed (round 44h's stubs), so every
recorded figure is known exactly."""

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_train  # noqa: E402
from test_mutants_round44h import FakeTrainer, stubbed_row  # noqa: E402, F401 - a fixture


# -- unet_work, training_calls, policy_step_backend: what MFU and the per-op time are divided by -------------------

class CachingSampler:
    """A sampler whose text encoder (one 8x8 matmul: 1024 FLOPs) runs once per prompt list, then is cached, as
    rlcm_fast's prompt cache is; a trajectory is one 4x4 matmul (128 FLOPs), a trained row one 1x3 by 3x1 matmul. No
    cuda_graph: DDPO's sampler has none."""

    def __init__(self):
        self.cache = {}

    def prompt_embeddings(self, prompts):
        key = tuple(prompts)
        if key not in self.cache:
            self.cache[key] = torch.ones(8, 8) @ torch.ones(8, 8)
        return self.cache[key]

    def sample(self, unet, prompts, generator, decode):
        self.prompt_embeddings([*prompts, ""])
        return SimpleNamespace(states=torch.ones(4, 4) @ torch.ones(4, 4))

    def action_log_probs(self, unet, states, index, steps, embeds):
        return [(states[:1, :3] @ unet).sum(1)]


def test_counting_aten_ops_does_not_change_what_they_compute():
    """Mutant: AtenOpCounter calling each op without its keyword arguments: an add's alpha or a sum's dtype was
    dropped, so the counted sampling trajectory and training row computed something else than the row runs."""
    a, b = torch.ones(3), torch.full((3,), 2.0)
    with bench_train.AtenOpCounter() as counter:
        scaled = torch.add(a, b, alpha=3)
        total = torch.arange(4, dtype=torch.int32).sum(dtype=torch.float64)
    assert torch.equal(scaled, torch.full((3,), 7.0)) and total.dtype == torch.float64 and total.item() == 6.0
    assert counter.ops == 3


def stub_unet_trainer(zeroed):
    unet = torch.ones(3, 1, requires_grad=True)
    return SimpleNamespace(sampler=CachingSampler(), prompt_set=["cat"], device=torch.device("cpu"), unet=unet,
                           autocast=contextlib.nullcontext,
                           optimizer=SimpleNamespace(zero_grad=lambda set_to_none: zeroed.append(set_to_none)))


def test_unet_work_counts_the_unet_alone_and_keeps_sampling_and_training_apart():
    """Mutants: the text encoder's warm call before the count dropped (its FLOPs then counted as the trajectory's
    UNet work: MFU overstated), and the ATen op counts of sampling and training swapped (the training time per op,
    the host-bound check, divided by the sampling trajectory's ops)."""
    flops, ops = bench_train.unet_work(stub_unet_trainer([]))
    assert flops["sampling_per_trajectory"] == 2 * 4 * 4 * 4
    warm = CachingSampler()
    warm.prompt_embeddings(["cat", ""])
    with bench_train.AtenOpCounter() as sampling:  # a trajectory once the text encoder's output is cached
        warm.sample(None, ["cat"], None, False)
    assert ops["sampling_per_trajectory"] == sampling.ops
    assert ops["training_per_row"] > ops["sampling_per_trajectory"]  # forward and backward


def test_unet_work_leaves_no_gradient_for_the_first_update():
    """Mutant: the optimizer's zero_grad after the counted backward dropped: the counted row's LoRA gradients
    would then be added into the row's first real update (gradient accumulation does not zero first)."""
    zeroed = []
    bench_train.unet_work(stub_unet_trainer(zeroed))
    assert zeroed == [True]


def test_unet_work_leaves_a_sampler_without_a_cuda_graph_without_one():
    """Mutant: unet_work's restore defaulting to True for a sampler with no cuda_graph (DDPO's DDIM sampler): the
    DDPO row then recorded sampling_cuda_graph true, a graphed loop it has not got."""
    trainer = stub_unet_trainer([])
    assert not hasattr(trainer.sampler, "cuda_graph")
    bench_train.unet_work(trainer)
    assert getattr(trainer.sampler, "cuda_graph", False) is False


def cpu_config(**changes):
    from rlcm_fast.config import resolve_config

    base = {"device": "cpu", "batches_per_epoch": 2, "sample_batch_size": 4, "train_batch_size": 4,
            "gradient_accumulation_steps": 1, "horizon": 3, "num_inner_epochs": 1, "train_rows_per_call": 0,
            "sample_batches_per_call": 1}
    return resolve_config(overrides={**base, **changes})


def test_training_calls_follow_the_trainers_minibatch_plan():
    """Mutants: training_calls on one trained step fewer, with train_rows_per_call ignored, and with the train
    batch and the accumulation steps swapped. 8 samples, 4 an update: 2 updates, each of 1 accumulation step x 3
    trained steps = 3 calls of 4 rows (12 rows: 2 calls of 6 where the row asks for calls of 6). A wrong count
    makes training_us_per_unet_aten_op, the host-bound figure, wrong by the same factor."""
    assert bench_train.training_calls(cpu_config(), 3) == 2 * 3
    assert bench_train.training_calls(cpu_config(train_rows_per_call=6), 3) == 2 * 2


def test_auto_policy_step_backend_is_resolved_on_the_rows_device(monkeypatch):
    """Mutant: select_backend asked about a CPU tensor whatever the row's device: on a GPU every row recorded
    "reference" (the CPU's backend) instead of the Triton or native step it ran."""
    seen = []
    monkeypatch.setattr(bench_train, "select_backend", lambda tensor: (seen.append(tensor.device.type), "x")[1])
    cfg = SimpleNamespace(method="rlcm", policy_step_backend="auto")
    assert bench_train.policy_step_backend(cfg, torch.device("meta")) == "x" and seen == ["meta"]


# -- warm_up and record_first_updates ----------------------------------------------------------------------------

def test_a_warm_up_samples_enough_for_one_whole_update_in_one_pass_and_scores_it():
    """Mutants: the warm-up's sampling calls rounded down (6 samples an update, 4 a call: one call, and the update
    trained on 4 samples, so the first measured update paid for its full shapes), num_sample_iters left as the
    row's (the warm-up sampled the row's whole epoch), and compute_advantages skipped (the update trained on
    samples without advantages, unlike every measured one)."""
    cfg = cpu_config(train_batch_size=2, gradient_accumulation_steps=3, batches_per_epoch=3, num_sample_iters=2)
    seen, trained = [], []

    @dataclasses.dataclass
    class Samples:
        rows: torch.Tensor
        advantages: torch.Tensor | None = None

    trainer = SimpleNamespace(cfg=cfg)
    trainer.sample_epoch = lambda epoch: (
        seen.append((trainer.cfg.batches_per_epoch, trainer.cfg.num_sample_iters)),
        Samples(torch.arange(trainer.cfg.samples_per_epoch)))[1]

    def compute_advantages(samples):
        samples.advantages = -samples.rows
    trainer.compute_advantages = compute_advantages
    trainer.train_epoch = lambda epoch, samples: trained.append((samples.rows.tolist(), samples.advantages.tolist()))
    bench_train.warm_up(trainer, 0)
    assert seen == [(2, 1)] and trained == [(list(range(6)), [-r for r in range(6)])] and trainer.cfg is cfg


def test_first_update_statistics_keep_only_what_the_update_summed():
    """Mutant: the `if k in sums` filter dropped: an update whose sums lack clipfrac (an objective without
    clipping) raised KeyError inside the trainer and failed the whole row."""
    trainer = SimpleNamespace(finish_update=lambda epoch, sums, grad_norm, done, total: None)
    first = bench_train.record_first_updates(trainer, 1)
    trainer.finish_update(1, {"approx_kl": 0.5, "ratio": 1.0, "loss": 2.0}, 1.0, 1, 2)
    assert first == [{"approx_kl": 0.5, "ratio": 1.0}]


# -- time_row: what a row records -------------------------------------------------------------------------------

def test_a_rows_own_settings_win_over_the_common_ones(stubbed_row):
    """Mutant: COMMON laid over the row's overrides: a row that sets the seed (or checkpointing) got COMMON's."""
    _, made = stubbed_row(epochs=1, overrides={"seed": 7})
    assert made["overrides"]["seed"] == 7


def test_trained_steps_and_the_epochs_flops_are_the_samplers_not_the_horizon(stubbed_row, monkeypatch):
    """Mutants: trained_steps recorded, and the epoch's training FLOPs counted, from the horizon: where fewer steps
    than the horizon are trained (DDPO's timestep_fraction), both overstated and MFU with them."""
    make = bench_train.Trainer

    def fewer_trained_steps(cfg, run_dir):
        trainer = make(cfg, run_dir)
        trainer.sampler.trained_steps = 3  # horizon 4
        return trainer
    monkeypatch.setattr(bench_train, "Trainer", fewer_trained_steps)
    row, _ = stubbed_row(epochs=1)
    assert row["trained_steps"] == 3 and row["steps"] == 4
    assert row["unet_flops_per_epoch"] == 8 * 1000 + 8 * 3 * 2 * 100


def graphed_row(stubbed_row, monkeypatch, sampled_graphed, signatures):
    """A CUDA row asking for sample_cuda_graph, whose sampler ended `sampled_graphed` and whose training UNet
    has the given CUDA-graph `signatures`."""
    class Graphed:
        def signatures(self):
            return signatures

    make = bench_train.Trainer

    def trainer(cfg, run_dir):
        made = make(cfg, run_dir)
        made.cfg.sample_cuda_graph = True
        made.sampler.cuda_graph, made.train_unet = sampled_graphed, Graphed()
        return made
    monkeypatch.setattr(FakeTrainer, "device_type", "cuda")
    monkeypatch.setattr(bench_train, "synchronize", lambda device: None)
    monkeypatch.setattr(bench_train, "GraphedTrainingUNet", Graphed)
    for name in ("reset_peak_memory_stats", "max_memory_allocated", "max_memory_reserved"):
        monkeypatch.setattr(bench_train.torch.cuda, name, lambda device: 0)
    monkeypatch.setattr(bench_train, "Trainer", trainer)
    monkeypatch.setattr(bench_train, "policy_step_backend", lambda cfg, device: "reference")
    return stubbed_row(epochs=1)[0]


@pytest.mark.parametrize("graphed", [False, True])
def test_a_failed_sampling_graph_capture_is_recorded_and_warned_of(stubbed_row, monkeypatch, capsys, graphed):
    """Mutants: sampling_cuda_graph recorded from the row's config (what was asked, not what ran: a capture that
    failed and fell back to eager looked graphed), and the warning's condition inverted (a graphed row warned of,
    a failed capture not)."""
    row = graphed_row(stubbed_row, monkeypatch, graphed, {"graphed": 2, "not_graphed": 0})
    assert row["sampling_cuda_graph"] is graphed
    warned = "bench_train: row fast sampled without its CUDA graph (the capture failed)" in capsys.readouterr().err
    assert warned is not graphed


@pytest.mark.parametrize("not_graphed", [0, 1])
def test_training_calls_run_without_cuda_graphs_are_warned_of(stubbed_row, monkeypatch, capsys, not_graphed):
    """Mutant: the training warning keyed on "graphed" calls, not "not_graphed": every fully graphed row warned,
    and one whose calls all fell back to eager (no graphed one) did not."""
    signatures = {"graphed": 1 - not_graphed, "not_graphed": not_graphed}
    row = graphed_row(stubbed_row, monkeypatch, True, signatures)
    assert row["training_cuda_graph_signatures"] == signatures
    warned = "bench_train: row fast trained some calls without CUDA graphs" in capsys.readouterr().err
    assert warned is bool(not_graphed)


def test_a_profiled_rows_figures_are_handed_on_before_its_profile(stubbed_row, monkeypatch):
    """Mutant: `timed(result)` dropped: a profiler that hangs or kills the process (CUPTI) then cost the row's
    measured figures, which main writes from that call."""
    handed = []

    def profile_row(trainer):
        assert handed and handed[0]["variant"] == "fast"
        return {"ops": []}
    monkeypatch.setattr(bench_train, "profile_row", profile_row)
    monkeypatch.setattr(bench_train, "format_profile", lambda name, profile: "")
    row = bench_train.time_row("fast", {}, 1, 1, 1e4, Path("unused"), profiled=True, timed=handed.append)
    assert handed == [row] and row["profile"] == {"ops": []}


def test_the_warm_up_count_is_the_warm_ups_not_the_measured_epochs(stubbed_row):
    """Mutant: warmup's count recorded as the measured epochs: a row of 2 measured epochs said it warmed up twice."""
    row, _ = stubbed_row(epochs=2)
    assert row["warmup"] == {"count": 1, "kind": "sampling call and update"} and row["epochs_measured"] == 2


# -- reward_curves ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quick", [True, False])
def test_reward_curves_run_on_the_cpu_at_the_documented_sizes(monkeypatch, tmp_path, quick):
    """Mutants: --quick's batch of 2 swapped with the full curves' 16, DDPO's 4 steps under --quick dropped (its
    tiny-sd preset's 10: not the documented smoke run), the curves' device "cpu" dropped (on a GPU machine they ran
    on CUDA, not on the tiny presets' CPU as documented), reward_std recorded as the mean."""
    made = []

    class Trainer:
        def __init__(self, cfg, run_dir):
            made.append(cfg)

        def train(self):
            return [{"epoch": 1, "reward_mean": 0.5, "reward_std": 0.25, "sample_seconds": 1.0, "train_seconds": 0.5}]
    monkeypatch.setattr(bench_train, "Trainer", Trainer)
    monkeypatch.setattr(bench_train.torch.cuda, "is_available", lambda: True)
    curves = bench_train.reward_curves(1, quick, tmp_path)
    assert [(c.method, c.device, c.sample_batch_size) for c in made] == [
        ("rlcm", "cpu", 2 if quick else 16), ("ddpo", "cpu", 2 if quick else 16)]
    if quick:
        assert curves["ddpo"]["steps"] == 4 and curves["rlcm"]["steps"] == 4
    assert curves["ddpo"]["epochs"][0]["reward_std"] == 0.25


# -- main --------------------------------------------------------------------------------------------------------

@pytest.fixture
def gpu_main(monkeypatch, tmp_path):
    """bench_train.main as on a GPU, with time_row and reward_curves stubbed: what each row and the curves were
    asked for is recorded; rows named in `fail` raise."""
    asked, curves, fail = [], [], {}

    def time_row(name, overrides, epochs, warmup, rate, run_dir, warmup_epochs=False, profiled=False, timed=None):
        if name in fail:
            raise fail[name]
        asked.append((name, overrides, epochs))
        return {"variant": name, "epoch_s": 2.0, "per_sample_rl_step_s": 1.0}
    monkeypatch.setattr(bench_train.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_train, "time_row", time_row)
    monkeypatch.setattr(bench_train, "reward_curves", lambda epochs, quick, root: (curves.append(epochs), {})[1])
    monkeypatch.setattr(bench_train, "matmul_rate", lambda device: {"flops_per_s": 1.0})
    monkeypatch.setattr(bench_train, "release_memory", lambda device: None)
    monkeypatch.setattr(bench_train, "environment", lambda: {})

    def run(*argv):
        assert bench_train.main([*argv, "--out-dir", str(tmp_path)]) == 0
        return json.loads((tmp_path / "bench_train.json").read_text()), asked, curves
    run.fail = fail
    run.path = tmp_path / "bench_train.json"
    return run


def test_a_gpu_run_measures_the_epochs_asked_and_quick_ones_once(gpu_main):
    """Mutants: --epochs ignored (always the default count), a GPU --quick run measuring the GPU's 2 epochs a row
    (the smoke run twice as long), the curves' 12 and --quick's 2 epochs swapped, --quick not recorded in the JSON
    (run_all and the README then present a smoke run as the full one)."""
    result, asked, curves = gpu_main("--rows", "fast", "--epochs", "3")
    assert asked[-1][2] == 3 and curves == [12] and result["quick"] is False and result["mode"] == "gpu-sd15"
    result, asked, curves = gpu_main("--rows", "fast", "--quick")
    assert asked[-1][2] == 1 and curves[-1] == 2 and result["quick"] is True
    gpu_main("--rows", "fast")
    assert asked[-1][2] == 2


def test_a_gpu_ddpo_row_gets_the_asked_sampling_batches_and_10_by_default(gpu_main):
    """Mutants: main building its rows without --ddpo-batches (ignored: an hour-long DDPO row a user asked to
    shorten), and the flag's default 10 changed (DDPO then made fewer reward queries than RLCM's 10 batches)."""
    _, asked, _ = gpu_main("--rows", "ddpo", "--ddpo-batches", "3", "--no-curves")
    assert asked[-1][1]["batches_per_epoch"] == 3
    _, asked, _ = gpu_main("--rows", "ddpo", "--no-curves")
    assert asked[-1][1]["batches_per_epoch"] == 10


def test_a_failed_row_is_skipped_with_its_error_and_a_run_cut_short_keeps_its_rows(gpu_main):
    """Mutants: a failed row's reason without its error (the JSON said "failed" and not why), and the write after
    each row dropped (a run killed by its time limit, here interrupted at its third row, lost every row it had
    measured). A run without a `fast` row has no ratios to it and still ends."""
    gpu_main.fail.update(straightforward=RuntimeError("CUDA out of memory\nTried to allocate 2 GiB"),
                         ddpo=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        gpu_main("--rows", "training_calls_of_7,straightforward,ddpo", "--no-curves")
    kept = json.loads(gpu_main.path.read_text())
    assert [row["variant"] for row in kept["rows"]] == ["training_calls_of_7"] and kept["complete"] is False
    assert {"row": "straightforward", "reason": "failed: RuntimeError: CUDA out of memory Tried to allocate 2 GiB"} \
        in kept["skipped"]
    gpu_main.fail.clear()
    result, _, _ = gpu_main("--rows", "straightforward", "--no-curves")
    assert "epoch_time_vs_fast" not in result["rows"][0] and result["complete"] is True


def test_a_profiled_rows_figures_are_written_before_its_profile(gpu_main, monkeypatch):
    """Mutant: write_row writing the run without the row handed to it: a profile that killed the process (CUPTI)
    then lost the row's figures, which it is there to keep."""
    seen = []

    def time_row(name, overrides, epochs, warmup, rate, run_dir, warmup_epochs=False, profiled=False, timed=None):
        row = {"variant": name, "epoch_s": 2.0, "per_sample_rl_step_s": 1.0}
        timed(row)
        seen.append(json.loads(gpu_main.path.read_text()))
        return row
    monkeypatch.setattr(bench_train, "time_row", time_row)
    gpu_main("--rows", "fast", "--profile", "fast", "--no-curves")
    assert seen[0]["rows"] == [{"variant": "fast", "epoch_s": 2.0, "per_sample_rl_step_s": 1.0}]
    assert seen[0]["complete"] is False
