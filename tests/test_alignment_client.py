"""The alignment client against broken or hostile servers (stubs on 127.0.0.1), and the async runner's cancelling:
no models, each test well under a few seconds."""

import base64
import io
import json
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlcm_fast.rewards import AlignmentClient, AsyncReward, RewardError, alignment
from rlcm_fast.rewards.base import reward_cancelled

REPO = Path(__file__).resolve().parents[1]


def images(n=1, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@contextmanager
def stub(answer):
    """A server on a thread whose POST handler is answer(handler); yields (url, the paths requested)."""
    requests = []

    class Stub(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            requests.append(("POST", self.path))
            try:
                answer(self)
            except OSError:  # the client hung up
                pass
            self.close_connection = True

        def do_GET(self):  # noqa: N802  (where a followed redirect would land)
            requests.append(("GET", self.path))
            send(self, 200, json.dumps({"rewards": [99.0]}).encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # quick shutdown
    try:
        yield f"http://127.0.0.1:{server.server_port}", requests
    finally:
        server.shutdown()
        server.server_close()


def send(handler, status, body, headers=(("Content-Length", None),)):
    handler.send_response(status)
    for name, value in headers:
        handler.send_header(name, str(len(body)) if value is None else value)
    handler.end_headers()
    handler.wfile.write(body)


def free_port_url():
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as probe:
        return f"http://127.0.0.1:{probe.server_port}"  # free a moment ago; nothing listens there now


# -- the reply's size and time --------------------------------------------------------------------------

BIG_BUT_VALID = b" " * 5000 + b'{"rewards": [0.5]}'  # JSON, so read whole it used to pass as rewards


@pytest.mark.parametrize("status, headers, message", [
    (200, [("Content-Length", None)], r"over 1000 bytes \(HTTP 200, Content-Length 5018\)"),
    (200, [("Connection", "close")], r"over 1000 bytes \(HTTP 200, without Content-Length\)"),
    (400, [("Connection", "close")], r"over 1000 bytes \(HTTP 400, without Content-Length\)"),
    (503, [("Content-Length", None)], r"over 1000 bytes \(HTTP 503, Content-Length 5018\)"),
])
def test_a_reply_over_the_cap_fails_at_once_without_retries(monkeypatch, status, headers, message):
    # An endless body grew memory by 600 MiB/s; a smaller cap here stands for MAX_REPLY_BYTES.
    monkeypatch.setattr(alignment, "MAX_REPLY_BYTES", 1000)
    with stub(lambda handler: send(handler, status, BIG_BUT_VALID, headers)) as (url, requests):
        with pytest.raises(RewardError, match=rf"^reward server {url} sent a reply {message}; expected a JSON"):
            AlignmentClient(url, retries=3, backoff=0.01)(images(), ["a"])
        assert len(requests) == 1


def test_a_reply_at_the_cap_is_read(monkeypatch):
    monkeypatch.setattr(alignment, "MAX_REPLY_BYTES", len(BIG_BUT_VALID))
    with stub(lambda handler: send(handler, 200, BIG_BUT_VALID, [("Connection", "close")])) as (url, _):
        assert AlignmentClient(url, retries=0)(images(), ["a"]).tolist() == [0.5]


def drip(data, seconds_per_byte=0.05):
    def answer(handler):
        for byte in data:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(seconds_per_byte)
    return answer


REPLY = b'{"rewards": [0.5]}'


@pytest.mark.parametrize("answer", [
    drip(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(REPLY), REPLY)),  # the headers too
    lambda handler: (handler.send_response(200), handler.send_header("Content-Length", str(len(REPLY))),
                     handler.end_headers(), drip(REPLY)(handler)),
    # http.client lets go of the connection's socket at once when the reply closes it: the deadline missed these
    lambda handler: (handler.send_response(200), handler.send_header("Content-Length", str(len(REPLY))),
                     handler.send_header("Connection", "close"), handler.end_headers(), drip(REPLY)(handler)),
    lambda handler: (handler.send_response(200), handler.send_header("Connection", "close"), handler.end_headers(),
                     drip(REPLY)(handler)),
], ids=["headers", "body", "body, connection close", "body, no length"])
def test_a_reply_that_drips_times_out_at_reward_timeout(answer):
    # Each byte came well within the socket timeout, so a reply at one byte a second never timed out.
    with stub(answer) as (url, requests):
        start = time.monotonic()
        with pytest.raises(RewardError, match=rf"{url} is unreachable after 2 attempts \(timed out: no complete "
                                              r"reply within reward_timeout=0.4 s\)"):
            AlignmentClient(url, timeout=0.4, retries=1, backoff=0.01)(images(), ["a"])
        assert time.monotonic() - start < 1.5  # 2 x 0.4 s, not the 2 x 2.6 s the drips take
        assert len(requests) == 2  # retried, like any timeout


def test_a_slow_but_steady_reply_within_the_timeout_is_read():
    with stub(lambda handler: (time.sleep(0.2), send(handler, 200, REPLY))) as (url, _):
        assert AlignmentClient(url, timeout=2, retries=0)(images(), ["a"]).tolist() == [0.5]


# -- redirects ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_one_line_failure_and_is_not_followed(status):
    with stub(lambda handler: None) as (elsewhere, landed):
        target = f"{elsewhere}/elsewhere?stolen=1"
        answer = lambda handler: send(handler, status, b"", [("Location", target), ("Content-Length", None)])
        with stub(answer) as (url, requests):
            with pytest.raises(RewardError, match=rf"^reward server {url} answered {status} redirecting to "
                                                  rf"{re.escape(repr(target))}; redirects are not followed"):
                AlignmentClient(url, retries=3, backoff=0.01)(images(), ["a"])
            assert requests == [("POST", "/score")]
        assert landed == []


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
    # Scored once the program exits (the main thread stopped, the exit hooks next), however busy the machine:
    # a fixed 0.3 s let a slow exit start a queued batch (seen once with the two cores shared).
    deadline = time.monotonic() + 10
    while threading.main_thread().is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
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


@pytest.mark.parametrize("body, message", [
    (b'\xff\xfe{"rewards": [0.5]}', "sent a reply that is not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "sent a reply that is not JSON"),
    (b'{"rewards": [1' + b"0" * 400 + b"]}", "sent a reward beyond float64's range"),
], ids=["not UTF-8", "nested too deep", "a 401-digit integer"])
def test_a_reply_of_garbage_is_a_reward_error_that_says_so(body, message):
    with stub(lambda handler: send(handler, 200, body)) as (url, _):
        reward = AsyncReward("alignment", AlignmentClient(url, timeout=5.0, retries=0))
        try:
            with pytest.raises(RewardError, match=re.escape(message)):
                reward.submit(images(), ["a cat"]).result(timeout=10)
        finally:
            reward.close()


def test_the_alignment_client_refuses_uint8_pixels_before_any_request():
    """uint8 pixels went to the server, scored as floats (found by mutation testing)."""
    with stub(lambda handler: send(handler, 200, b'{"rewards": [0.5]}')) as (url, requests):
        with pytest.raises(RewardError, match=r"images of dtype torch.uint8 given; rewards take floats in \[0, 1\]"):
            AlignmentClient(url, retries=0)((torch.rand(1, 3, 16, 16) * 255).to(torch.uint8), ["a"])
        assert requests == []


@pytest.mark.parametrize("setting, message", [
    ({"batch_size": 0}, "batch_size=0 is invalid: it must be an int >= 1"),
    ({"batch_size": 2.0}, "batch_size=2.0 is invalid: it must be an int >= 1"),
    ({"retries": -1}, "retries=-1 is invalid: it must be an int >= 0"),
    ({"retries": True}, "retries=True is invalid: it must be an int >= 0"),
    ({"jpeg_quality": 101}, "jpeg_quality=101 is invalid: it must be an int in 1..100"),
    ({"timeout": 0}, r"timeout=0 is invalid: it must be a number of seconds in \(0, 86400\]"),
    ({"timeout": float("nan")}, r"timeout=nan is invalid: it must be a number of seconds in \(0, 86400\]"),
    ({"backoff": -1.0}, r"backoff=-1.0 is invalid: it must be a number of seconds in \[0, 86400\]"),
    ({"max_backoff": "30"}, r"max_backoff='30' is invalid: it must be a number of seconds in \[0, 86400\]"),
])
def test_a_client_made_in_code_refuses_bad_settings_in_one_line(setting, message):
    """Unchecked in code (the trainer's config checks its own): batch_size 0 was range()'s traceback at the first
    batch, retries -1 "unreachable after 0 attempts ()", a timeout of 0 never connected."""
    with pytest.raises(RewardError, match=f"^AlignmentClient {message}$"):
        AlignmentClient(free_port_url(), **setting)
    AlignmentClient(free_port_url(), retries=0, backoff=0, max_backoff=0)  # no wait between attempts is allowed


# The tests below pin what a mutation round on the client found unchecked.

def test_the_waits_between_attempts_double_from_backoff_up_to_max_backoff(monkeypatch):
    waits = []
    monkeypatch.setattr(alignment, "reward_cancelled", lambda wait: waits.append(wait) or False)
    with pytest.raises(RewardError, match="unreachable after 5 attempts"):
        AlignmentClient(free_port_url(), retries=4, backoff=1.0, max_backoff=3.0, timeout=1)(images(), ["a"])
    assert waits == [1.0, 2.0, 3.0, 3.0]


def test_a_500_is_retried():  # what the server answers for e.g. a CUDA out-of-memory error
    calls = []

    def answer(handler):
        calls.append(handler)
        if len(calls) == 1:
            send(handler, 500, b'{"error": "CUDA out of memory"}')
        else:
            send(handler, 200, b'{"rewards": [0.25]}')

    with stub(answer) as (url, _):
        assert AlignmentClient(url, retries=2, backoff=0.01)(images(), ["a"]).tolist() == [0.25]
    assert len(calls) == 2


def test_a_300_is_reported_as_a_redirect():
    with stub(lambda handler: send(handler, 300, b"", [("Content-Length", None), ("Location", "http://x/")])) as (url, _):
        with pytest.raises(RewardError, match=r"answered 300 redirecting to 'http://x/'"):
            AlignmentClient(url, retries=0)(images(), ["a"])


@pytest.mark.parametrize("body", [b'{"rewards": [0.5]}', b'{"rewards": [true, false]}'], ids=["too few", "booleans"])
def test_a_reply_of_the_wrong_count_or_of_booleans_is_refused_without_a_retry(body):
    with stub(lambda handler: send(handler, 200, body)) as (url, requests):
        with pytest.raises(RewardError, match="expected 2 numbers as rewards"):
            AlignmentClient(url, retries=3, backoff=0.01)(images(2), ["a", "b"])
        assert len(requests) == 1


def test_each_batch_sends_its_own_images():
    class MeanPixel(BaseHTTPRequestHandler):  # each image's reward is its mean pixel, decoded from the JPEG
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            means = [float(np.asarray(Image.open(io.BytesIO(base64.b64decode(image)))).mean()) / 255
                     for image in body["images"]]
            send(self, 200, json.dumps({"rewards": means}).encode())

        def log_message(self, *args):
            pass

    pixels = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16), torch.full((3, 16, 16), 0.5)])
    with ThreadingHTTPServer(("127.0.0.1", 0), MeanPixel) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            got = AlignmentClient(f"http://127.0.0.1:{server.server_port}", batch_size=2)(pixels, ["a", "b", "c"])
        finally:
            server.shutdown()
    np.testing.assert_allclose(got, [0.0, 1.0, 0.5], atol=0.01)


def test_a_reply_of_exactly_the_cap_with_a_content_length_is_read(monkeypatch):
    monkeypatch.setattr(alignment, "MAX_REPLY_BYTES", len(BIG_BUT_VALID))
    with stub(lambda handler: send(handler, 200, BIG_BUT_VALID)) as (url, _):
        assert AlignmentClient(url, retries=0)(images(), ["a"]).tolist() == [0.5]


def test_a_reward_server_that_does_not_answer_is_a_warning_as_the_run_starts(tmp_path, capsys):
    """The first batch's scoring found it out, after sampling, and retried it for a minute before the error."""
    from rlcm_fast.config import resolve_config
    from rlcm_fast.rewards import silent_reward_server
    from rlcm_fast.trainer import Trainer

    down = free_port_url()
    warning = silent_reward_server("jpeg_compressibility:0.1,alignment", down)
    port = down.rsplit(":", 1)[1]  # the command it suggests serves that port, not the default 8060
    assert re.fullmatch(rf"reward server {down} does not answer \(.*Connection refused\); unless it is still "
                        rf"loading its models, start it with `rlcm-fast serve-reward --reward alignment --port {port}`: "
                        r"each batch's scoring retries it for about a minute", warning)
    assert silent_reward_server("jpeg_compressibility", down) is None  # no server in it: not even asked
    with stub(lambda handler: None) as (url, requests):
        assert silent_reward_server("alignment", url) is None
        assert requests == [("GET", "/health")]
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as other:  # answers GET with 501
        threading.Thread(target=other.serve_forever, args=(0.05,), daemon=True).start()
        url = f"http://127.0.0.1:{other.server_port}"
        assert silent_reward_server("alignment", url) == (f"reward server {url} answers GET /health with 501, not "
                                                          "200: is it the reward server?")
        other.shutdown()
    cfg = resolve_config(task="alignment", overrides={"device": "cpu", "reward_server": down})
    Trainer(cfg, tmp_path / "run", progress_bars=False)
    assert f"rlcm-fast: warning: {warning}\n" in capsys.readouterr().err


@pytest.mark.parametrize("url, command", [
    ("http://127.0.0.1:8060", "rlcm-fast serve-reward --reward alignment"),
    ("http://127.0.0.1:8060/", "rlcm-fast serve-reward --reward alignment"),
    ("http://[::1]:9000", "rlcm-fast serve-reward --reward alignment --host ::1 --port 9000"),
    ("http://localhost", "rlcm-fast serve-reward --reward alignment --host localhost --port 80"),
])
def test_the_serve_command_a_client_suggests_serves_its_own_url(url, command):
    assert AlignmentClient(url).serve_command() == command
