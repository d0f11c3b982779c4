"""Several processes (gloo on CPUs): the gathered advantages are the 1-process ones over the gathered
batch, checkpoints resume with 1 or 2 processes, and a stop signal to `--num-processes 2` is agreed,
checkpointed mid-epoch and resumed exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import rlcm_fast
from rlcm_fast.checkpoint import read_training_state, verify_checkpoint
from rlcm_fast.cli import main
from rlcm_fast.config import resolve_config
from rlcm_fast.epoch_samples import EpochSamples, epoch_generator
from rlcm_fast.trainer import Trainer

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PACKAGE_ROOT = Path(rlcm_fast.__file__).resolve().parents[1]  # the rlcm_fast this process imported (installed in CI)
# Per process: 8 samples, 4 updates of 2 samples each per epoch (so a stop can land mid-epoch).
SETS = {"batches_per_epoch": 1, "sample_batch_size": 8, "train_batch_size": 2, "epochs": 2, "checkpoint_every": 1}
ARGS = ["--device", "cpu", *[x for k, v in SETS.items() for x in ("--set", f"{k}={v}")]]
TIMINGS = ("sample_seconds", "train_seconds", "eval_seconds")
# Evaluations before the first epoch and after the second: 5 images, 3 on process 0 and 2 on process 1.
EVAL_SETS = {"eval_every": 2, "eval_images": 5}
EVAL_ARGS = [x for k, v in EVAL_SETS.items() for x in ("--set", f"{k}={v}")]


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    """A 2-process run under torchrun (as `torchrun -m rlcm_fast train` / accelerate launch would start it)."""
    root = tmp_path_factory.mktemp("ddp")
    # --standalone: a free port (a fixed one is taken when another pytest-xdist worker runs this fixture too).
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TESTS / "ddp_probe.py"), str(root / "probe"), "train", "--output-dir", str(root / "run"), *ARGS,
               *EVAL_ARGS]
    result = subprocess.run(command, env=env(), cwd=root, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def probe(root: Path, process: int) -> list[dict]:
    return [json.loads(line) for line in (root / "probe" / f"advantages-{process}.jsonl").read_text().splitlines()]


def test_two_processes_gather_rewards_and_compute_the_one_process_advantages(two_process_run, tmp_path):
    root = two_process_run
    epochs = [r for r in records(root / "run") if r["kind"] == "epoch"]
    assert [r["samples"] for r in epochs] == [16, 16]  # 8 per process, gathered
    first, second = probe(root, 0), probe(root, 1)
    assert len(first) == len(second) == 2
    # One process, fed the gathered batch of each epoch, computes exactly the advantages the two did.
    cfg = resolve_config(overrides={"device": "cpu", **SETS})
    single = Trainer(cfg, tmp_path / "single")
    for epoch, (a, b) in enumerate(zip(first, second)):
        gathered = EpochSamples(prompts=a["prompts"] + b["prompts"], states=torch.empty(0), log_probs=torch.empty(0),
                                rewards=np.array(a["rewards"] + b["rewards"]), advantages=torch.empty(0),
                                images=torch.empty(0))
        single.compute_advantages(gathered)
        assert gathered.advantages.tolist() == pytest.approx(a["advantages"] + b["advantages"], abs=1e-6)
        if epoch == 0:  # process 0 draws what a 1-process run draws: randomness is per (seed, epoch, process)
            # With the processes' one thread (env()): on an Intel Xeon, 2 threads changed one image's JPEG by 3 bytes.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                own = single.sample_epoch(0)
            finally:
                torch.set_num_threads(threads)
            assert own.prompts == a["prompts"] and own.rewards.tolist() == pytest.approx(a["rewards"], abs=1e-9)
    # The checkpoint's stat tracker is the 1-process one (process-count independent).
    saved = read_training_state(root / "run" / "checkpoint-2")["stat_tracker"]
    assert saved == json.loads(json.dumps(single.stat_tracker.state_dict()))
    # Everything a checkpoint stores is the same on both processes, so the one the main process writes
    # is every process's state: LoRA weights, AdamW moments, stat tracker.
    hashes = [(root / "probe" / f"state-{p}.jsonl").read_text().splitlines() for p in (0, 1)]
    assert len(hashes[0]) == 2 and hashes[0] == hashes[1]


def test_each_step_logs_the_reward_std_of_both_processes_samples(two_process_run):
    """An update trains on 2 samples of each process; its logged reward_std is the std of those 4 rewards. It
    was the mean of each process's own std (0.057 for a true 0.100 in one measured update)."""
    root = two_process_run
    steps = [r for r in records(root / "run") if r["kind"] == "step"]
    assert len(steps) == 2 * 4  # 2 epochs of 4 updates
    seed = resolve_config(overrides={"device": "cpu", **SETS}).seed
    for epoch, per_process in enumerate(zip(probe(root, 0), probe(root, 1))):
        # The trainer's shuffle of each process (flattened rows, step_fraction 1): update u trains order[2u:2u+2].
        orders = [torch.randperm(8, generator=epoch_generator(seed, epoch, process, stream=2))
                  for process in (0, 1)]
        for update in range(4):
            rewards = np.concatenate([np.asarray(record["rewards"])[order[2 * update:2 * update + 2].numpy()]
                                      for record, order in zip(per_process, orders)])
            logged = steps[epoch * 4 + update]
            assert logged["reward_mean"] == pytest.approx(rewards.mean(), abs=1e-9)
            assert logged["reward_std"] == pytest.approx(rewards.std(), abs=1e-6)


def test_two_processes_evaluate_the_images_one_process_evaluates(two_process_run, tmp_path):
    """Each process samples its share of the evaluation images, each image from its own stream: the starting
    policy's evaluation is the one-process one (the images are in other batches, hence the tolerance)."""
    from rlcm_fast.evaluation import evaluate_policy

    evals = [r for r in records(two_process_run / "run") if r["kind"] == "eval"]
    assert [(r["epoch"], r["step"], r["images"]) for r in evals] == [(0, 0, 5), (2, 8, 5)]
    single = Trainer(resolve_config(overrides={"device": "cpu", **SETS, **EVAL_SETS}), tmp_path / "single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the processes' (env())
    try:
        own = evaluate_policy(single)
    finally:
        torch.set_num_threads(threads)
    assert own["images"] == 5
    assert own["reward_mean"] == pytest.approx(evals[0]["reward_mean"], abs=2e-3)
    assert own["reward_std"] == pytest.approx(evals[0]["reward_std"], abs=2e-3)


def test_a_two_process_checkpoint_resumes_with_one_process(two_process_run, tmp_path):
    run_dir = tmp_path / "one"
    assert main(["train", "--resume", str(two_process_run / "run" / "checkpoint-1"), "--output-dir", str(run_dir)]) == 0
    epochs = [r for r in records(run_dir) if r["kind"] == "epoch"]
    assert [(r["epoch"], r["samples"]) for r in epochs] == [(2, 8)]
    verify_checkpoint(run_dir / "checkpoint-2")


def test_sigterm_to_num_processes_2_checkpoints_mid_epoch_and_resumes_exactly(two_process_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # With the evaluations: the one of the starting policy, before the stop, is logged once and not run again.
    command = [sys.executable, "-m", "rlcm_fast", "train", "--num-processes", "2", "--output-dir", str(run_dir), *ARGS,
               *EVAL_ARGS]
    child = subprocess.Popen(command, env=env(), cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count('"kind": "step"') >= 1):
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()[1][-3000:]
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)  # to the launcher, which forwards it to both processes
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    assert err.count("SIGTERM received") == 1  # printed by the main process only
    assert err.count(f"Resume with: rlcm-fast train --resume {run_dir} --num-processes 2 (or --resume auto "
                     f"--output-dir {run_dir} --num-processes 2; under accelerate launch or torchrun, the same "
                     "without --num-processes)") == 1
    stopped = (run_dir / "latest").read_text().strip()
    assert stopped.startswith("checkpoint-0-"), stopped  # mid-epoch 1
    # Mid-epoch checkpoints hold each process's samples: another process count is refused, clearly.
    assert main(["train", "--resume", "auto", "--output-dir", str(run_dir)]) == 2
    assert "stopped mid-epoch with 2 process(es); resume it with --num-processes 2" in capsys.readouterr().err
    command = [sys.executable, "-m", "rlcm_fast", "train", "--num-processes", "2", "--resume", "auto",
               "--output-dir", str(run_dir)]
    result = subprocess.run(command, env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert records(run_dir) == records(two_process_run / "run")


FAILING_REWARD = """
import os

def score(images, prompts):
    if os.environ["RANK"] in FAILING:
        raise ValueError(f"no score on process {os.environ['RANK']}")
    return [0.0] * len(images)
"""


@pytest.mark.parametrize("failing, expected", [
    ("01", ["reward 'failing_reward:score' raised ValueError: no score on process 0"]),
    ("1", ["reward 'failing_reward:score' failed on process 1",
           "reward 'failing_reward:score' raised ValueError: no score on process 1"]),
])
def test_a_reward_error_of_a_two_process_run_is_printed_once(tmp_path, failing, expected):
    """Every process stops on a reward error (agreed); the main process prints it, and the failed process prints
    its own when the main one did not fail. Each process printed its own copy before."""
    (tmp_path / "failing_reward.py").write_text(f"FAILING = {failing!r}\n" + FAILING_REWARD)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "rlcm_fast", "train", "--output-dir", str(tmp_path / "run"), "--reward", "failing_reward:score",
               *ARGS, "--set", "sample_batch_size=2"]  # it stops at the first batch's reward
    environment = {**env(), "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), str(tmp_path)])}
    result = subprocess.run(command, env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    errors = [line.removeprefix("rlcm-fast: error: ") for line in result.stderr.splitlines()
              if line.startswith("rlcm-fast: error: ")]
    assert sorted(errors) == sorted(expected), result.stderr[-3000:]
