"""Mutation-testing round 44h (benchmarks/bench_train.py, benchmarks/bench_rewards.py): hand-written mutants of those
modules were run against their tests (test_run_all, test_unet_profile, test_benchmark_cli); each test here kills one
that survived (named in its docstring). All are CPU-only, seeded and fast: the trainer, the reward encoders, the
aesthetic tower and the clock are stubbed, so every recorded figure is known exactly."""

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_rewards  # noqa: E402
import bench_train  # noqa: E402


class Clock:
    """A perf_counter that moves only when the stubs say time passed."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


# -- bench_train.time_row: each figure of a row, from a stubbed trainer on a stubbed clock ---------------------

class FakeAsyncReward:
    """The trainer's AsyncReward: `fn` runs at submit (busy 0.5 s); the loop then waits 0.25 s for the result."""

    def __init__(self, clock):
        self.clock = clock
        self.fn = lambda images, prompts: (clock.advance(0.5), [1.0] * len(prompts))[1]

    def submit(self, images, prompts):
        value, clock = self.fn(images, prompts), self.clock

        class Future:
            def result(self):
                clock.advance(0.25)
                return value
        return Future()


class FakeTrainer:
    """Epoch e samples in 3 + e s of its own (reward wait aside) and trains in 2 + e s; its first update's
    statistics and its reward mean name the epoch."""
    device_type = "cpu"

    def __init__(self, cfg, clock):
        self.cfg, self.clock, self.device = cfg, clock, torch.device(self.device_type)
        self.reward = FakeAsyncReward(clock)
        self.sampler = SimpleNamespace(trained_steps=4, cuda_graph=False)
        self.train_unet = object()
        self.finish_update = lambda epoch, sums, grad_norm, done, total: None
        self.warmed = []

    def sample_epoch(self, epoch):
        self.clock.advance(3 + epoch)
        self.reward.submit(None, [""] * self.cfg.samples_per_epoch).result()
        return SimpleNamespace(epoch=epoch)

    def compute_advantages(self, samples):
        return {"reward_mean": 10.0 + samples.epoch}

    def train_epoch(self, epoch, samples):
        self.clock.advance(2 + epoch)
        for done in (1, 2):
            self.finish_update(epoch, {"approx_kl": epoch + done / 10, "clipfrac": 0.0, "ratio": 1.0}, 1.0, done, 2)


def row_config(**changes):
    fields = dict(samples_per_epoch=8, num_inner_epochs=2, method="rlcm", model="tiny", resolution=32, horizon=4,
                  sample_batch_size=4, train_batch_size=2, gradient_accumulation_steps=2, mixed_precision="no",
                  sample_batches_per_call=1, train_rows_per_call=0, clip_range=1e-4, sample_cuda_graph=False,
                  batches_per_epoch=2, policy_step_backend="reference", algorithm="ppo")
    return SimpleNamespace(**{**fields, **changes})


@pytest.fixture
def stubbed_row(monkeypatch, tmp_path):
    """time_row on a FakeTrainer: UNet work 1000 FLOPs per trajectory, 100 per trained row, 50 ATen ops per
    trained row, 4 training calls an epoch; the warm-up call is recorded, not run."""
    clock, made = Clock(), {}

    def trainer(cfg, run_dir):
        made["trainer"] = FakeTrainer(cfg, clock)
        return made["trainer"]

    def resolve_config(overrides):
        made["overrides"] = overrides
        return row_config(**{k: v for k, v in overrides.items() if k in ("policy_step_backend", "method")})

    monkeypatch.setattr(bench_train.time, "perf_counter", clock)
    monkeypatch.setattr(bench_train, "Trainer", trainer)
    monkeypatch.setattr(bench_train, "resolve_config", resolve_config)
    monkeypatch.setattr(bench_train, "unet_work", lambda trainer: (
        {"sampling_per_trajectory": 1000, "training_per_row": 100},
        {"sampling_per_trajectory": 20, "training_per_row": 50}))
    monkeypatch.setattr(bench_train, "training_calls", lambda cfg, trained_steps: 4)
    monkeypatch.setattr(bench_train, "warm_up", lambda trainer, epoch: made.setdefault("warm_ups", []).append(epoch))

    def run(epochs=2, warmup=1, warmup_epochs=False, overrides=None):
        row = bench_train.time_row("fast", overrides or {}, epochs, warmup, 1e4, tmp_path, warmup_epochs)
        return row, made
    return run


def test_a_rows_times_are_split_into_sampling_reward_wait_and_training(stubbed_row):
    """Mutants: busy and wait assigned (`=`) instead of summed per epoch, the per-epoch reset of both dropped,
    sampling_s no longer less the reward wait, training_s from the epoch's start (sampling counted twice).
    Epochs 1 and 2 (after a warm-up at 0) sample in 4 and 5 s plus the reward's 0.5 busy and 0.25 wait, and train
    in 3 and 4 s."""
    row, _ = stubbed_row()
    first, second = row["epochs"]
    assert first == pytest.approx({"epoch_s": 7.75, "sampling_s": 4.5, "reward_wait_s": 0.25, "reward_busy_s": 0.5,
                                   "training_s": 3.0, "images_per_s": 8 / 7.75,
                                   "mfu": (8 * 1000 + 8 * 4 * 2 * 100) / 7.75 / 1e4})
    assert second["epoch_s"] == pytest.approx(9.75) and second["reward_busy_s"] == pytest.approx(0.5)
    assert second["reward_wait_s"] == pytest.approx(0.25) and second["sampling_s"] == pytest.approx(5.5)


def test_two_reward_calls_in_an_epoch_add_up(stubbed_row, monkeypatch):
    """Mutants: `self.busy += ...` and `meter.wait += ...` made `=`: an epoch of several sampling calls (the
    paper's 10 batches) recorded only its last reward call's busy and wait times, hiding most of the reward cost."""
    sample_epoch = FakeTrainer.sample_epoch

    def twice(self, epoch):
        self.reward.submit(None, [""]).result()
        return sample_epoch(self, epoch)
    monkeypatch.setattr(FakeTrainer, "sample_epoch", twice)
    row, _ = stubbed_row(epochs=1)
    assert row["reward_busy_s"] == pytest.approx(1.0) and row["reward_wait_s"] == pytest.approx(0.5)
    assert row["sampling_s"] == pytest.approx(5.0)


def test_a_rows_summary_figures_are_the_means_of_its_measured_epochs(stubbed_row):
    """Mutants: the row's mean taken from the last epoch only, images/s from sampling batches instead of samples,
    MFU halved, the per-sample step divided by batches, training time per ATen op in ms instead of us, the UNet
    FLOPs of an epoch without its 8 trajectories or its inner epochs, epochs_measured the asked count. The README
    and check_claims quote these figures."""
    row, made = stubbed_row()
    assert row["epoch_s"] == pytest.approx((7.75 + 9.75) / 2) and row["training_s"] == pytest.approx(3.5)
    assert row["images_per_s"] == pytest.approx((8 / 7.75 + 8 / 9.75) / 2)
    flops = 8 * 1000 + 8 * 4 * 2 * 100  # trajectories x their FLOPs + rows x steps x inner epochs x theirs
    assert row["unet_flops_per_epoch"] == flops
    assert row["mfu"] == pytest.approx((flops / 7.75 / 1e4 + flops / 9.75 / 1e4) / 2)
    assert row["per_sample_rl_step_s"] == pytest.approx(8.75 / 8)
    assert row["training_us_per_unet_aten_op"] == pytest.approx(1e6 * 3.5 / (4 * 50))
    assert row["epochs_measured"] == 2 and made["warm_ups"] == [0]
    assert made["overrides"]["epochs"] == 3  # the trainer's schedule covers the warm-up and measured epochs


def test_first_update_statistics_and_rewards_are_per_measured_epoch(stubbed_row):
    """Mutants: `epoch >= warmup` -> `>` (the first measured epoch's statistics lost), `done == 1` dropped (every
    update recorded, not the first). The first update is the one that evaluates the weights that sampled the epoch."""
    row, _ = stubbed_row()
    assert row["first_update_statistics"] == [{"approx_kl": pytest.approx(1.1), "clipfrac": 0.0, "ratio": 1.0},
                                              {"approx_kl": pytest.approx(2.1), "clipfrac": 0.0, "ratio": 1.0}]
    assert row["reward_mean_per_epoch"] == [11.0, 12.0]


def test_warm_up_epochs_run_whole_and_are_neither_timed_nor_called_warm_ups(stubbed_row):
    """Mutants: `--warmup-epochs` ignored (a warm-up call and update instead of the whole epoch asked for), the
    warm-up kind's words swapped. The whole warm-up epoch's reward counts in the curve, not in the times."""
    row, made = stubbed_row(epochs=1, warmup_epochs=True)
    assert "warm_ups" not in made and row["warmup"] == {"count": 1, "kind": "epoch"}
    assert row["reward_mean_per_epoch"] == [10.0, 11.0] and row["epochs_measured"] == 1
    assert row["epoch_s"] == pytest.approx(7.75)
    row, made = stubbed_row(epochs=1)
    assert made["warm_ups"] == [0] and row["warmup"] == {"count": 1, "kind": "sampling call and update"}


def test_the_policy_step_backend_recorded_is_the_rows_own(stubbed_row):
    """Mutants: `!= "auto"` -> `== "auto"` (a row that set its backend recorded what auto would choose), DDPO's
    None dropped (a DDIM row said to use an LCM step backend)."""
    row, _ = stubbed_row(epochs=1, overrides={"policy_step_backend": "triton"})
    assert row["policy_step_backend"] == "triton"
    row, _ = stubbed_row(epochs=1, overrides={"method": "ddpo"})
    assert row["policy_step_backend"] is None


def test_an_epochs_training_calls_count_every_inner_epoch():
    """Mutant: training_calls without `num_inner_epochs *`: with two inner epochs the training time per ATen op
    came out twice what it is, a host-bound loop looking twice as slow per launch."""
    from rlcm_fast.config import resolve_config

    base = {"device": "cpu", "batches_per_epoch": 2, "sample_batch_size": 2, "train_batch_size": 2, "horizon": 3,
            "train_rows_per_call": 0}
    once = bench_train.training_calls(resolve_config(overrides={**base, "num_inner_epochs": 1}), 3)
    twice = bench_train.training_calls(resolve_config(overrides={**base, "num_inner_epochs": 2}), 3)
    assert once > 0 and twice == 2 * once


def test_counting_the_unet_work_gives_the_sampler_its_cuda_graph_back():
    """Mutant: unet_work leaves the sampler's cuda_graph False: every graphed row (sample_cuda_graph, all_graphed...)
    then sampled eagerly and was recorded as not graphed, its times those of the eager loop."""
    seen = []

    class Sampler:
        cuda_graph = True

        def prompt_embeddings(self, prompts):
            return torch.zeros(len(prompts), 2)

        def sample(self, unet, prompts, generator, decode):
            seen.append(self.cuda_graph)
            return SimpleNamespace(states=torch.ones(1, 3))

        def action_log_probs(self, unet, states, index, steps, embeds):
            return [states.sum(1) * unet]

    unet = torch.ones((), requires_grad=True)
    trainer = SimpleNamespace(sampler=Sampler(), prompt_set=["cat"], device=torch.device("cpu"), unet=unet,
                              autocast=contextlib.nullcontext,
                              optimizer=SimpleNamespace(zero_grad=lambda set_to_none: None))
    flops, ops = bench_train.unet_work(trainer)
    assert seen == [False] and trainer.sampler.cuda_graph is True  # counted eagerly, graphed again after
    assert ops["training_per_row"] > 0 and set(flops) == {"sampling_per_trajectory", "training_per_row"}


def test_a_rebel_warm_up_trains_on_the_pairs_one_update_takes(tmp_path):
    """Mutant: the warm-up's samples per update without REBEL's factor 2: a REBEL row's update takes pairs, so
    its warm-up update saw half the shapes of its measured ones and the first measured update paid the rest."""
    from rlcm_fast.config import resolve_config

    cfg = resolve_config(overrides={"device": "cpu", "algorithm": "rebel", "images_per_prompt": 2,
                                    "batches_per_epoch": 4, "sample_batch_size": 2, "train_batch_size": 2, "horizon": 3,
                                    "sample_batches_per_call": 1, "train_rows_per_call": 0})
    sampled, trained = [], []

    @dataclasses.dataclass
    class Samples:
        rows: torch.Tensor

    trainer = SimpleNamespace(cfg=cfg)
    trainer.sample_epoch = lambda epoch: (sampled.append(trainer.cfg.batches_per_epoch), Samples(torch.arange(8)))[1]
    trainer.compute_advantages = lambda samples: {}
    trainer.train_epoch = lambda epoch, samples: trained.append(samples.rows.tolist())
    bench_train.warm_up(trainer, 0)
    units = cfg.train_batch_size * cfg.gradient_accumulation_steps
    assert sampled == [-(-2 * units // 2)] and trained == [list(range(2 * units))] and trainer.cfg is cfg


# -- bench_train.main and reward_curves: the run's JSON around its rows -----------------------------------------

@pytest.fixture
def stubbed_main(monkeypatch, tmp_path):
    """bench_train.main on a CPU with time_row stubbed: `fast` takes 2 s an epoch, every other row 6 s."""
    asked = []

    def time_row(name, overrides, epochs, warmup, rate, run_dir, warmup_epochs=False, profiled=False, timed=None):
        asked.append((name, epochs))
        epoch_s = 2.0 if name == "fast" else 6.0
        return {"variant": name, "epoch_s": epoch_s, "per_sample_rl_step_s": epoch_s / (4 if name == "fast" else 2)}
    monkeypatch.setattr(bench_train.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench_train, "time_row", time_row)
    monkeypatch.setattr(bench_train, "matmul_rate", lambda device: {"flops_per_s": 1.0})

    def run(*argv):
        assert bench_train.main([*argv, "--no-curves", "--out-dir", str(tmp_path)]) == 0
        return json.loads((tmp_path / "bench_train.json").read_text()), asked
    return run


def test_rows_are_compared_with_fast_as_time_ratios(stubbed_main):
    """Mutants: epoch_time_vs_fast inverted (fast / row: a 3x slower row read as 3x faster), per_sample_step_vs_fast
    taken from the epoch times (a row of other batch sizes compared per epoch, not per sample)."""
    result, _ = stubbed_main("--rows", "fast,straightforward")
    slow = result["rows"][1]
    assert slow["epoch_time_vs_fast"] == pytest.approx(3.0) and slow["per_sample_step_vs_fast"] == pytest.approx(6.0)
    assert result["rows"][0]["epoch_time_vs_fast"] == 1.0


def test_a_cpu_run_measures_one_epoch_a_row_and_says_what_it_skipped(stubbed_main, capsys):
    """Mutants: the CPU's default of 1 measured epoch turned into 2, paper_calls not listed as skipped (it vanished
    from a CPU run with no word), the CPU entry's reason without "CUDA is not available", --no-curves not said.
    Also --profile of a row skipped on this CPU is not called a row that does not run (mutant: warned)."""
    result, asked = stubbed_main("--rows", "fast,paper_calls", "--profile", "paper_calls")
    assert asked == [("fast", 1)]
    gpu_only = [s for s in result["skipped"] if s.get("row") == "paper_calls"]
    assert len(gpu_only) == 1 and gpu_only[0]["reason"].startswith("CUDA is not available: a GPU-only row")
    parts = {s["part"]: s["reason"] for s in result["skipped"] if "part" in s}
    assert parts == {"sd15-lcm / sd15 rows at 768 px, peak GPU memory":
                     "CUDA is not available: the rows ran on the tiny presets (32 px)", "curves": "--no-curves"}
    assert "not among the rows that run" not in capsys.readouterr().err


def test_the_reward_curves_are_against_cumulative_sampling_and_training_time(monkeypatch, tmp_path):
    """Mutants: elapsed_s the epoch's own time (not cumulative: the wall-clock axis of run_all's plot went back and
    forth), training time left out of it, reward_queries counted one epoch ahead. Records are the trainer's, whose
    epochs count from 1."""
    class Trainer:
        def __init__(self, cfg, run_dir):
            self.cfg = cfg

        def train(self):
            return [{"epoch": e, "reward_mean": 0.1 * e, "reward_std": 0.0, "sample_seconds": 1.0 * e,
                     "train_seconds": 0.5} for e in (1, 2)]
    monkeypatch.setattr(bench_train, "Trainer", Trainer)
    curves = bench_train.reward_curves(2, True, tmp_path)
    for method in ("rlcm", "ddpo"):
        per_epoch = curves[method]["samples_per_epoch"]
        assert per_epoch > 0
        assert [p["elapsed_s"] for p in curves[method]["epochs"]] == [1.5, 4.0]
        assert [p["reward_queries"] for p in curves[method]["epochs"]] == [per_epoch, 2 * per_epoch]


# -- bench_rewards: JPEG rows, nvJPEG's agreement, the aesthetic rows, the run's JSON ------------------------------

class FakeJpeg:
    """JpegSizeReward: each call takes the next of `durations` on the clock and returns kB per image 1, 2, 3..."""
    made = []

    def __init__(self, weight, quality, threads, backend, nvjpeg_colour=None):
        self.threads, self.backend, self.calls = threads, backend, 0
        FakeJpeg.made.append(self)

    def __call__(self, images, prompts):
        FakeJpeg.clock.advance(FakeJpeg.durations[self.calls % len(FakeJpeg.durations)])
        self.calls += 1
        return np.arange(1.0, len(prompts) + 1)


@pytest.fixture
def fake_backends(monkeypatch):
    """Pillow and a torchvision that imports (threads 0), no nvJPEG, 3 usable cores, a stubbed clock."""
    import types

    FakeJpeg.clock, FakeJpeg.made = Clock(), []
    # per reward: the recorded call, the warm-up, then 3 timed repeats
    FakeJpeg.durations = [5.0, 5.0, 0.3, 0.1, 0.5]
    monkeypatch.setattr(bench_rewards.time, "perf_counter", FakeJpeg.clock)
    monkeypatch.setattr(bench_rewards, "JpegSizeReward", FakeJpeg)
    monkeypatch.setattr(bench_rewards, "usable_cpu_cores", lambda: 3)
    monkeypatch.setattr(bench_rewards, "nvjpeg_unavailable_reason", lambda: "no nvJPEG here")
    package = types.ModuleType("torchvision")
    package.io = types.ModuleType("torchvision.io")
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.io", package.io)


def test_jpeg_rows_record_each_backends_median_time_and_mean_size(fake_backends):
    """Mutants: no warm-up call (the first timed call paid thread pools and encoder states), one repeat fewer than
    recorded, min instead of median, images/s from the fastest call, the largest file's size as the mean, the
    all-cores Pillow row run with 0 threads, torchvision's threads 0 recorded as 0 instead of None (not applicable),
    4:4:4 claimed for torchvision on CPU images, the `exact` backend (90x slower on a CPU) run without a GPU, and
    nvJPEG's reason for not running left out of "skipped"."""
    skipped = []
    rows = bench_rewards.jpeg_rows(torch.device("cpu"), 3, skipped, sizes=(8,), batches=(4,))
    assert [(r["backend"], r["threads"], r["chroma_subsampling"]) for r in rows] == [
        ("pillow", 1, "4:2:0"), ("pillow", 3, "4:2:0"), ("torchvision", None, "4:2:0")]
    for row in rows:
        assert row["median_s"] == pytest.approx(0.3) and row["min_s"] == pytest.approx(0.1)
        assert row["images_per_s"] == pytest.approx(4 / 0.3) and row["mean_size_kb"] == pytest.approx(2.5)
        assert row["repeats"] == 3
    assert [m.calls for m in FakeJpeg.made] == [5, 5, 5]
    assert skipped == [{"row": "jpeg nvjpeg", "reason": "no nvJPEG here"}]


def test_a_jpeg_backend_that_fails_is_skipped_with_its_reason_and_the_others_still_run(fake_backends, monkeypatch):
    """Mutants: a backend that cannot start dropped without a skipped entry; a failed encode recorded as "failed"
    without its error; a failed row not left at `continue` (a row of nonsense figures written after the failure)."""
    from rlcm_fast.rewards import RewardError

    class Picky(FakeJpeg):
        def __init__(self, weight, quality, threads, backend, nvjpeg_colour=None):
            if backend == "torchvision":
                raise RewardError("torchvision's encoder is broken\nhere")
            super().__init__(weight, quality, threads, backend)

        def __call__(self, images, prompts):
            if self.threads == 3:
                raise RuntimeError("pool died")
            return super().__call__(images, prompts)
    monkeypatch.setattr(bench_rewards, "JpegSizeReward", Picky)
    skipped = []
    rows = bench_rewards.jpeg_rows(torch.device("cpu"), 3, skipped, sizes=(8,), batches=(2,))
    assert [(r["backend"], r["threads"]) for r in rows] == [("pillow", 1)]
    assert skipped == [{"row": "jpeg nvjpeg", "reason": "no nvJPEG here"},
                       {"row": "jpeg torchvision", "reason": "RewardError: torchvision's encoder is broken here"},
                       {"row": "jpeg pillow threads=3 8px batch 2", "reason": "RuntimeError: pool died"}]


def test_nvjpeg_agreement_records_the_largest_relative_gap_and_the_rank_correlation(monkeypatch):
    """Mutants: the relative difference without abs (nvJPEG 50% smaller on one image read as 5% apart), Spearman
    from argsort instead of ranks, the smaller batch compared, nvJPEG's mean size taken from Pillow's. These back
    the claim "nvJPEG sizes within 3% of Pillow's"."""
    sizes = {"pillow": np.array([30.0, 10.0, 40.0, 20.0]), "nvjpeg": np.array([15.0, 10.5, 44.0, 10.0])}

    class Sizes:
        def __init__(self, weight, quality, threads, backend, nvjpeg_colour=None):
            self.backend = backend

        def __call__(self, images, prompts):
            assert len(prompts) == len(images) == 4
            return sizes[self.backend]
    monkeypatch.setattr(bench_rewards, "JpegSizeReward", Sizes)
    monkeypatch.setattr(bench_rewards, "NVJPEG_COLOURS", ("libjpeg",))  # encode_file compared only for "nvjpeg"
    skipped = []
    [row] = bench_rewards.nvjpeg_agreement(torch.device("cpu"), (8,), (2, 4), skipped)
    gap = (sizes["nvjpeg"] - sizes["pillow"]) / sizes["pillow"]
    assert skipped == [] and row["images"] == 4 and row["max_relative_difference"] == pytest.approx(0.5)
    assert row["relative_difference"] == pytest.approx(gap.tolist())
    assert row["mean_size_kb_nvjpeg"] == pytest.approx(19.875) and row["mean_size_kb_pillow"] == pytest.approx(25.0)
    ranks_pillow, ranks_nvjpeg = np.array([2, 0, 3, 1]), np.array([2, 1, 3, 0])
    spearman = 1 - 6 * ((ranks_pillow - ranks_nvjpeg) ** 2).sum() / (4 * (4**2 - 1))
    assert row["spearman"] == pytest.approx(spearman)


def test_a_failed_nvjpeg_agreement_is_skipped_with_its_reason(monkeypatch):
    """Mutant: the failure not recorded: the nvjpeg_vs_pillow section vanished from the JSON with no word why."""
    def broken(*args, **kwargs):
        raise RuntimeError("nvJPEG state\nlost")
    monkeypatch.setattr(bench_rewards, "JpegSizeReward", broken)
    skipped = []
    assert bench_rewards.nvjpeg_agreement(torch.device("cpu"), (8,), (2,), skipped) == []
    assert skipped == [{"row": "nvjpeg_vs_pillow", "reason": "RuntimeError: nvJPEG state lost"}]


def test_the_encoder_comparison_looks_at_every_image_and_at_nvjpegs_own_files():
    """Mutants: same_quantization_tables kept from the last image only (`&=` -> `=`), nvJPEG's PSNR taken from
    Pillow's file, PSNR from 255 instead of 255 squared. nvJPEG is stubbed by Pillow at quality 75 for the first
    image (other tables, a lower PSNR) and 95 for the second (Pillow's own file)."""
    import io

    from PIL import Image

    from rlcm_fast.rewards import to_uint8_images

    qualities = iter((75, 95))

    def encode_file(image):
        buffer = io.BytesIO()
        Image.fromarray(to_uint8_images(image[None])[0]).save(buffer, format="JPEG", quality=next(qualities))
        return buffer.getvalue()
    images = bench_rewards.natural_images(2, 16)
    facts = bench_rewards.encoder_comparison(SimpleNamespace(encode_file=encode_file), images)
    assert facts["same_quantization_tables"] is False and facts["same_chroma_sampling"] is True
    assert facts["psnr_db_nvjpeg"][0] < facts["psnr_db_pillow"][0]
    assert facts["psnr_db_nvjpeg"][1] == pytest.approx(facts["psnr_db_pillow"][1])
    pixels = to_uint8_images(images[:1])[0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float64)
    mse = ((decoded - pixels) ** 2).mean()
    assert facts["psnr_db_pillow"][0] == pytest.approx(20 * np.log10(255 / np.sqrt(mse)))


def test_aesthetic_rows_record_throughput_and_achieved_tflops_per_batch(monkeypatch):
    """Mutant: achieved_tflops without the batch (a batch of 2 reported at half its rate)."""
    import rlcm_fast.rewards

    class Aesthetic:
        tower_dtype = torch.float32

        def __init__(self, folder):
            self.weight = torch.ones(3, 3)

        def __call__(self, images, prompts):
            return (images.flatten(2).transpose(1, 2)[:, :4] @ self.weight).sum((1, 2))
    monkeypatch.setattr(rlcm_fast.rewards, "AestheticReward", Aesthetic)
    monkeypatch.setattr(bench_rewards, "vit_l14_folder", lambda folder: folder)
    monkeypatch.setattr(bench_rewards, "time_call", lambda fn, device, repeats: [0.4, 0.2, 0.3])
    monkeypatch.setattr(bench_rewards, "natural_images", lambda n, size, seed=0: torch.rand(n, 3, 4, 4))
    [row] = bench_rewards.aesthetic_rows(torch.device("cpu"), (2,), 3)
    assert row["flops_per_image"] == 2 * 4 * 3 * 3 and row["tower_dtype"] == "float32"
    assert row["median_s"] == pytest.approx(0.3) and row["images_per_s"] == pytest.approx(2 / 0.3)
    assert row["achieved_tflops"] == pytest.approx(2 * 4 * 3 * 3 * 2 / 0.3 / 1e12)


@pytest.mark.parametrize("cuda", [False, True])
def test_a_rewards_run_says_what_it_skipped_and_ends_complete(monkeypatch, tmp_path, cuda):
    """Mutants: --quick's 2 repeats swapped with the full run's 5, the --no-aesthetic and CPU batch-32 entries
    left out of "skipped", the last write still `"complete": false` (run_all then treats the run as cut short),
    and on a GPU the aesthetic rows at --batches' JPEG sizes instead of their own 8 and 32."""
    asked = {}
    monkeypatch.setattr(bench_rewards.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(bench_rewards, "environment", lambda: {"device": "stubbed"})  # no GPU to name
    monkeypatch.setattr(bench_rewards, "nvjpeg_unavailable_reason", lambda: "no nvJPEG here")
    monkeypatch.setattr(bench_rewards, "jpeg_rows", lambda device, repeats, skipped, sizes, batches, rows, on_row:
                        asked.update(jpeg=(repeats, sizes, batches)))
    monkeypatch.setattr(bench_rewards, "aesthetic_rows", lambda device, batches, repeats, rows, on_row:
                        asked.update(aesthetic=(batches, repeats)))
    out = ["--out-dir", str(tmp_path), "--sizes", "8", "--batches", "2"]
    assert bench_rewards.main(["--quick", *out]) == 0
    result = json.loads((tmp_path / "bench_rewards.json").read_text())
    assert result["complete"] is True and asked["jpeg"] == (2, (8,), (2,))
    assert asked["aesthetic"] == (((8, 32), 2) if cuda else ((8,), 2))
    assert ({"row": "aesthetic batch 32", "reason": "CPU run: batch 8 only"} in result["skipped"]) is not cuda
    asked.clear()
    assert bench_rewards.main(["--no-aesthetic", *out]) == 0
    result = json.loads((tmp_path / "bench_rewards.json").read_text())
    assert asked["jpeg"][0] == 5 and "aesthetic" not in asked
    assert {"row": "aesthetic", "reason": "--no-aesthetic"} in result["skipped"]


def test_a_gpu_rows_peak_memory_is_recorded_as_allocated_and_as_reserved(stubbed_row, monkeypatch):
    """Mutant: peak_reserved_gib read from max_memory_allocated: the memory claim quotes reserved memory (what the
    GPU must hold), which would then read low by the allocator's cache. The CUDA calls are stubbed."""
    resets = []
    monkeypatch.setattr(FakeTrainer, "device_type", "cuda")
    monkeypatch.setattr(bench_train, "synchronize", lambda device: None)
    monkeypatch.setattr(bench_train.torch.cuda, "reset_peak_memory_stats", lambda device: resets.append(device))
    monkeypatch.setattr(bench_train.torch.cuda, "max_memory_allocated", lambda device: 3 * 2**29)
    monkeypatch.setattr(bench_train.torch.cuda, "max_memory_reserved", lambda device: 5 * 2**29)
    row, _ = stubbed_row(epochs=1)
    assert row["peak_memory_gib"] == pytest.approx(1.5) and row["peak_reserved_gib"] == pytest.approx(2.5)
    assert len(resets) == 2  # at the start, and again after the warm-up so that its peak is not the row's
