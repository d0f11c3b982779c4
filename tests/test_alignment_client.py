"""The async runner's cancelling of queued batches, with the alignment client against a port where nothing
listens: no models, each test well under a few seconds."""

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from rlcm_fast.rewards import AlignmentClient, AsyncReward, RewardError
from rlcm_fast.rewards.base import reward_cancelled

REPO = Path(__file__).resolve().parents[1]


def images(n=1, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def free_port_url():
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as probe:
        return f"http://127.0.0.1:{probe.server_port}"  # free a moment ago; nothing listens there now


# -- cancelling queued batches --------------------------------------------------------------------------

def test_a_failed_batch_cancels_the_batches_queued_behind_it():
    calls, release = [], threading.Event()

    def reward(images, prompts):
        calls.append(prompts[0])
        release.wait(5)  # the later batches are queued before this one fails
        if prompts[0] == "fails":
            raise RewardError("reward server down")
        return [1.0] * len(prompts)

    scorer = AsyncReward("alignment", reward)
    futures = [scorer.submit(images(), [prompt]) for prompt in ("ok", "fails", "queued", "queued too")]
    release.set()
    assert futures[0].result().tolist() == [1.0]
    with pytest.raises(RewardError, match="reward server down"):
        futures[1].result()
    for future in futures[2:]:
        with pytest.raises(RewardError, match="batch not scored, as an earlier batch failed or the run stopped"):
            future.result(timeout=5)
    with pytest.raises(RewardError, match="batch not scored"):  # sampling goes on submitting until it collects
        scorer.submit(images(), ["later"]).result(timeout=5)
    assert calls == ["ok", "fails"]  # each queued batch was retried for a minute with the server down


def test_a_failure_with_the_server_down_leaves_nothing_to_retry():
    scorer = AsyncReward("alignment", AlignmentClient(free_port_url(), retries=1, backoff=0.01, timeout=1))
    futures = [scorer.submit(images(), ["a"]) for _ in range(4)]
    with pytest.raises(RewardError, match="is unreachable after 2 attempts"):
        futures[0].result(timeout=5)
    start = time.monotonic()
    for future in futures[1:]:
        with pytest.raises(RewardError, match="batch not scored"):
            future.result(timeout=5)
    assert time.monotonic() - start < 0.5


def test_close_cancels_the_queue_and_wakes_a_retry_waiting_out_its_backoff():
    scorer = AsyncReward("alignment", AlignmentClient(free_port_url(), retries=3, backoff=30, timeout=1))
    futures = [scorer.submit(images(), ["a"]) for _ in range(3)]
    time.sleep(0.3)  # the first attempt is refused at once; the client then waits 30 s to retry
    start = time.monotonic()
    scorer.close()
    with pytest.raises(RewardError, match=r"retries abandoned \(\[Errno 111\] Connection refused\): the run is "
                                          "stopping"):
        futures[0].result(timeout=5)
    assert time.monotonic() - start < 1
    assert all(future.cancelled() for future in futures[1:])
    with pytest.raises(RewardError, match="batch not scored"):
        scorer.submit(images(), ["a"]).result(timeout=1)


def test_a_normal_run_scores_every_batch_in_order():
    scorer = AsyncReward("count", lambda images, prompts: [float(len(prompts[0]))])
    futures = [scorer.submit(images(), ["x" * n]) for n in range(1, 6)]
    assert [f.result(timeout=5).tolist() for f in futures] == [[1.0], [2.0], [3.0], [4.0], [5.0]]
    assert reward_cancelled() is False  # off the worker: nothing to cancel


EXITING = """
import sys, threading, time
from rlcm_fast.rewards import AsyncReward
started = threading.Event()
def slow(images, prompts):
    started.set()
    time.sleep(0.3)
    print("scored", flush=True)
    return [0.0]
scorer = AsyncReward("slow", slow)
for _ in range(5):
    scorer.submit(None, ["a"])
started.wait(5)
sys.exit(2)  # e.g. a training fault while batches are queued
"""


def test_the_program_exits_without_scoring_the_queued_batches():
    # Python joins the worker thread at exit: it used to score each queued batch first (with the reward server
    # down, a minute of retries each).
    done = subprocess.run([sys.executable, "-c", EXITING], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stdout.split() == ["scored"]  # the running one only
