"""The alignment reward server and its client, for real on 127.0.0.1 with tiny random models."""

import base64
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rlcm_fast.rewards import AlignmentClient, RewardError, make_reward
from rlcm_fast.rewards import alignment_server
from rlcm_fast.rewards.alignment_server import REFERENCE, AlignmentScorer, BertScoreRecall, make_handler
from tiny_reward_models import save_tiny_bert, save_tiny_llava

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat riding a bike", "an owl playing chess", "a dog washing the dishes"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("alignment-models")
    return save_tiny_llava(root / "llava"), save_tiny_bert(root / "bert")


def start_server(models, port=0, timeout=120):
    llava, bert = models
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "rlcm_fast", "serve-reward", "--reward", "alignment", "--host", "127.0.0.1",
         "--port", str(port), "--vlm", str(llava), "--scorer", str(bert), "--max-new-tokens", "6", "--device", "cpu"],
        stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    lines = []
    for line in process.stderr:  # the server announces its address once it listens
        lines.append(line)
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if found:
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # keep draining
            return process, found.group(1)
        if time.monotonic() > deadline:
            break
    process.kill()
    raise AssertionError("server did not start:\n" + "".join(lines[-20:]))


@pytest.fixture(scope="module")
def server(models):
    process, url = start_server(models)
    state = {"process": process, "url": url}
    yield state
    state["process"].kill()
    state["process"].wait()


@pytest.fixture(scope="module")
def in_process(models):
    """The server's handler on a thread of this process, where a test can hold the models' lock, count their
    calls and read the log (capsys)."""
    scorer = AlignmentScorer(str(models[0]), str(models[1]), device="cpu", max_new_tokens=6)
    with ThreadingHTTPServer(("127.0.0.1", 0), make_handler(scorer)) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        yield scorer, f"http://127.0.0.1:{httpd.server_port}"
        httpd.shutdown()


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 40, 40, generator=g)


def http(url, body=None, method=None):
    request = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_bertscore_recall_is_greedy_max_cosine_over_reference_tokens(models):
    scorer = BertScoreRecall(str(models[1]), layer=2)
    candidates, references = ["a cat on a bike", "chess", "the cat"], ["the image contains a cat", "a dog", "the cat"]
    got = scorer.recall(candidates, references)
    expected = []
    for candidate, reference in zip(candidates, references):  # one pair at a time, no padding, plain loops
        embeddings = []
        for text in (candidate, reference):
            tokens = scorer.tokenizer(text, return_tensors="pt")
            with torch.no_grad():
                hidden = scorer.model(**tokens, output_hidden_states=True).hidden_states[2][0, 1:-1]  # drop CLS/SEP
            embeddings.append(F.normalize(hidden, dim=-1))
        cand, ref = embeddings
        expected.append(float(np.mean([max(float(r @ c) for c in cand) for r in ref])))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got[2] == pytest.approx(1.0, abs=1e-5)  # a text recalls itself fully


def test_a_reference_longer_than_the_scorer_takes_is_truncated(models):
    # The tiny BERT's tokenizer was saved without model_max_length, as local folders may be: a long prompt
    # used to run past the 128 position embeddings and fail every request holding it with a 500.
    scorer = BertScoreRecall(str(models[1]), layer=2)
    long = "the image contains " + "a cat riding a bike " * 60
    got = scorer.recall(["a cat on a bike", "a cat"], [long, "a cat"])
    # 126 tokens, [CLS] and [SEP] included: 2 positions short of the table, which RoBERTa's layout needs
    truncated = scorer.tokenizer.decode(scorer.tokenizer(long, truncation=True, max_length=126)["input_ids"][1:-1])
    assert len(scorer.tokenizer(truncated)["input_ids"]) == 126
    assert got == pytest.approx(scorer.recall(["a cat on a bike", "a cat"], [truncated, "a cat"]), abs=1e-6)
    assert got[1] == pytest.approx(1.0, abs=1e-5)


def test_bertscore_layer_defaults_and_checks(models):
    assert BertScoreRecall(str(models[1])).layer == 3  # unknown model: the last layer
    with pytest.raises(ValueError, match="scorer layer 7 is invalid"):
        BertScoreRecall(str(models[1]), layer=7)


def test_server_scores_like_the_in_process_scorer(server, models):
    url = server["url"]
    status, health = http(f"{url}/health")
    assert status == 200 and health["status"] == "ok" and health["layer"] == 3
    batch = images()
    rewards = make_reward("alignment", reward_server=url)(batch, PROMPTS)
    assert rewards.shape == (3,) and np.isfinite(rewards).all() and (np.abs(rewards) <= 1 + 1e-6).all()

    # The same JPEGs through the same models in this process give the same rewards.
    client = AlignmentClient(url)
    from rlcm_fast.rewards import to_uint8_images
    decoded = [Image.open(io.BytesIO(base64.b64decode(client._encode(p)))).convert("RGB") for p in to_uint8_images(batch)]
    local = AlignmentScorer(str(models[0]), str(models[1]), device="cpu", max_new_tokens=6)
    expected, answers = local.score(decoded, PROMPTS)
    np.testing.assert_allclose(rewards, expected, atol=1e-5)
    assert REFERENCE.format(prompt="x") == "The image contains x"


def test_client_batches_requests(server):
    url = server["url"]
    rewards = AlignmentClient(url, batch_size=2)(images(5, seed=1), PROMPTS + ["a cat", "an owl"])
    assert rewards.shape == (5,) and np.isfinite(rewards).all()


def encoded(fmt="JPEG", size=(40, 40), claimed=None):
    """A base64 image; `claimed` rewrites the JPEG's frame header to say another width x height."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buffer, fmt)
    data = buffer.getvalue()
    if claimed:
        at = data.index(b"\xff\xc0") + 5  # SOF0: marker, length, precision, then height and width
        data = data[:at] + claimed[1].to_bytes(2, "big") + claimed[0].to_bytes(2, "big") + data[at + 4:]
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("body, message", [
    (b"not json", "body is not JSON"),
    (json.dumps({"images": []}).encode(), "expected a JSON object"),
    (json.dumps({"images": ["aGk="], "prompts": ["a", "b"]}).encode(), "got 1 images and 2 prompts"),
    (json.dumps({"images": ["!!!"], "prompts": ["a"]}).encode(), r"images\[0\] is not a base64-encoded JPEG"),
    (json.dumps({"images": ["aGk="], "prompts": [3]}).encode(), "every prompt must be a string"),
    # These used to drop the connection with a traceback in the log (deep nesting, a decompression bomb;
    # the client retried them for a minute), get a 500 that the client retried too (a lone surrogate), or be
    # decoded whatever their size (a 5000x4000 JPEG) or format (by whichever Pillow plugin claimed the bytes).
    (b"[" * 100_000 + b"]" * 100_000, "body is not JSON this server reads: nested too deeply"),
    (json.dumps({"images": [encoded(claimed=(20000, 20000))], "prompts": ["a"]}).encode(),
     r"images\[0\] has over 178956970 pixels; allowed at most 16777216"),
    (json.dumps({"images": [encoded(claimed=(5000, 4000))], "prompts": ["a"]}).encode(),
     r"images\[0\] is 5000x4000; allowed at most 16777216 pixels"),
    # Many images that are each allowed: decoded together they would have exhausted memory.
    (json.dumps({"images": [encoded(size=(8, 8))] * 65, "prompts": ["a"] * 65}).encode(),
     "got 65 images; allowed at most 64 per request"),
    (json.dumps({"images": [encoded(claimed=(4096, 4096))] * 5, "prompts": ["a"] * 5}).encode(),
     "the images have 83886080 pixels in all; allowed at most 67108864 per request"),
    (json.dumps({"images": [encoded(), encoded()], "prompts": ["a", "\ud800"]}).encode(),
     r"prompts\[1\] is not valid Unicode text \(a lone surrogate\)"),
    (json.dumps({"images": [encoded(), encoded("PNG")], "prompts": ["a", "b"]}).encode(),
     r"images\[1\] is not a base64-encoded JPEG"),
])
def test_bad_requests_get_400_with_a_message(server, body, message):
    status, reply = http(f"{server['url']}/score", body)
    assert status == 400 and re.search(message, reply["error"])
    assert http(f"{server['url']}/health")[0] == 200


def raw_exchange(url, request, linger=5.0):
    """Everything the server sends back on one connection for `request` (bytes), until it closes the
    connection; None in place of the data if it keeps the connection open for `linger` seconds."""
    host, port = url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=linger) as connection:
        connection.sendall(request)
        received = b""
        try:
            while chunk := connection.recv(65536):
                received += chunk
        except TimeoutError:
            return None
    return received


@pytest.mark.parametrize("headers, body, status, message", [
    ("Content-Length: 300000000", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 413,
     "body of 300000000 bytes; allowed 1..268435456"),
    ("Transfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n", 411, "a Content-Length header is required"),
    ("Content-Length: -5", b"", 400, "Content-Length '-5' is invalid: expected a number of bytes"),
    ("Content-Length: 0", b"", 400, "body of 0 bytes; allowed 1..268435456"),
])
def test_a_refused_body_is_not_read_as_the_next_request(server, headers, body, status, message):
    # On a kept-alive connection the unread body used to be parsed as a request of its own (answered: a
    # /health reply, or an HTML error page, after the JSON one); now the server answers once and closes.
    request = f"POST /score HTTP/1.1\r\nHost: x\r\n{headers}\r\n\r\n".encode() + body
    received = raw_exchange(server["url"], request)
    assert received is not None, "the server kept the connection open"
    assert received.count(b"HTTP/1.1 ") == 1 and received.startswith(f"HTTP/1.1 {status} ".encode())
    assert json.loads(received.split(b"\r\n\r\n", 1)[1]) == {"error": message}


def test_each_request_is_one_log_line_with_its_error_or_timing(in_process, capsys, monkeypatch):
    scorer, url = in_process
    ok = json.dumps({"images": [encoded()], "prompts": ["a cat"]}).encode()
    capsys.readouterr()
    assert http(f"{url}/score", ok)[0] == 200
    assert http(f"{url}/score", json.dumps({"images": [encoded()], "prompts": ["a", "b"]}).encode())[0] == 400

    def out_of_memory(images):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(scorer.vlm, "answers", out_of_memory)
    assert http(f"{url}/score", ok) == (500, {"error": "RuntimeError: CUDA out of memory"})
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("serve-reward: ")]
    assert len(lines) == 3
    assert re.fullmatch(r'serve-reward: 127\.0\.0\.1 "POST /score HTTP/1\.1" 200 1 images in \d+\.\d\d s', lines[0])
    assert lines[1] == ('serve-reward: 127.0.0.1 "POST /score HTTP/1.1" 400 got 1 images and 2 prompts; expected '
                        'the same number, at least 1')
    assert lines[2] == 'serve-reward: 127.0.0.1 "POST /score HTTP/1.1" 500 RuntimeError: CUDA out of memory'
    assert "Traceback" in err and "in out_of_memory" in err  # the server's own failure: where, for the operator


def test_a_request_given_up_while_queued_is_not_scored(in_process, capsys, monkeypatch):
    # Several trainers share the models; a trainer whose request waited past its timeout resends it, and
    # scoring the abandoned copy too would only lengthen the queue.
    scorer, url = in_process
    calls, finished = [], []
    answers, score = scorer.vlm.answers, scorer.score
    monkeypatch.setattr(scorer.vlm, "answers", lambda batch: calls.append(len(batch)) or answers(batch))

    def recorded(*args, **kwargs):
        try:
            return score(*args, **kwargs)
        finally:
            finished.append(1)

    monkeypatch.setattr(scorer, "score", recorded)
    with scorer.lock:  # another trainer's batch, still being scored
        with pytest.raises(RewardError, match="unreachable after 1 attempts .*timed out"):
            AlignmentClient(url, timeout=0.5, retries=0)(images(1), ["a cat"])
    assert wait_for(lambda: finished)
    assert calls == []
    assert "client hung up while waiting; not scored" in capsys.readouterr().err
    assert AlignmentClient(url)(images(2), ["a cat", "an owl"]).shape == (2,) and calls == [2]


@pytest.mark.parametrize("sent, logged_line", [
    (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"images\"",
     '"POST /score HTTP/1.1": client hung up while sending its body'),
    (b"POST /score HTTP/1.1\r\nHost:", "client hung up while sending its request"),  # mid headers
])
def test_a_client_that_resets_mid_request_is_one_log_line(in_process, capsys, sent, logged_line):
    url = in_process[1]
    capsys.readouterr()
    host, port = url.rsplit("/", 1)[1].split(":")
    connection = socket.create_connection((host, int(port)))
    connection.sendall(sent)
    time.sleep(1.0)  # the server has read what was sent and waits for the rest
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()  # with linger 0: a reset, as from a killed trainer's machine
    err = ""

    def logged():
        nonlocal err
        err += capsys.readouterr().err
        return "hung up" in err or "Traceback" in err

    assert wait_for(logged, 5)
    assert "Traceback" not in err
    assert f"serve-reward: 127.0.0.1 {logged_line}\n" in err
    assert http(f"{url}/health")[0] == 200


def test_a_client_that_stalls_is_disconnected_after_the_idle_timeout(in_process, monkeypatch):
    """A trainer whose machine vanished mid-request would otherwise hold one of the server's threads for good."""
    monkeypatch.setattr(alignment_server, "IDLE_TIMEOUT_S", 0.5)
    with ThreadingHTTPServer(("127.0.0.1", 0), make_handler(in_process[0])) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        for partial in (b"POST /score HTTP/1.1\r\nHost: x\r\n",  # headers never finished
                        b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"):  # body never finished
            with socket.create_connection(("127.0.0.1", httpd.server_port), timeout=10) as connection:
                connection.sendall(partial)
                started = time.monotonic()
                while connection.recv(4096):  # whatever the server says, until it closes the connection
                    pass
                assert time.monotonic() - started < 5
        httpd.shutdown()


def test_unknown_paths_get_404(server):
    assert http(f"{server['url']}/nope")[0] == 404
    assert http(f"{server['url']}/health", b"{}")[0] == 404


def test_client_reports_a_4xx_at_once(server):
    client = AlignmentClient(server["url"], retries=3, backoff=10.0)
    start = time.monotonic()
    with pytest.raises(RewardError, match=rf"reward server {server['url']} refused the request \(400\): got 1 images"):
        client._post(json.dumps({"images": ["aGk="], "prompts": ["a", "b"]}).encode(), 2)
    assert time.monotonic() - start < 5  # no retries on a client error


def test_server_down_is_a_clear_error_naming_the_url():
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as probe:
        port = probe.server_port  # a port that was free a moment ago; nothing listens there now
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(RewardError, match=rf"reward server {url} is unreachable after 3 attempts .*serve-reward"):
        AlignmentClient(url, retries=2, backoff=0.01, timeout=2)(images(1), ["a cat"])


def test_client_retries_5xx_then_succeeds():
    calls = []

    class Flaky(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(1)
            status, body = (503, {"error": "warming up"}) if len(calls) < 3 else (200, {"rewards": [0.25]})
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Flaky) as stub:
        threading.Thread(target=stub.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{stub.server_port}"
        assert AlignmentClient(url, retries=3, backoff=0.01)(images(1), ["a"]).tolist() == [0.25]
        assert len(calls) == 3
        calls.clear()
        with pytest.raises(RewardError, match=r"unreachable after 2 attempts \(HTTP 503: warming up\)"):
            AlignmentClient(url, retries=1, backoff=0.01)(images(1), ["a"])
        stub.shutdown()


def stub_server(replies):
    """A server on a thread answering each POST with the next of `replies`: (status, body bytes, Content-Length
    it claims); the body is cut short, and the connection closed, when the claim is longer."""
    calls = []

    class Stub(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            status, data, claimed = replies[min(len(calls), len(replies) - 1)]
            calls.append(1)
            self.send_response(status)
            self.send_header("Content-Length", str(claimed))
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True

        def log_message(self, *args):
            pass

    stub = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    return stub, f"http://127.0.0.1:{stub.server_port}", calls


def test_client_retries_a_reply_cut_short():
    # A server killed (OOM) or restarted halfway through its reply used to end the run with http.client's
    # IncompleteRead instead of being retried like any other dropped connection.
    stub, url, calls = stub_server([(200, b'{"rewards": [', 100), (200, b'{"rewards": [0.5]}', 18)])
    with stub:
        assert AlignmentClient(url, retries=2, backoff=0.01)(images(1), ["a"]).tolist() == [0.5]
        assert len(calls) == 2
        stub.shutdown()
    stub, url, calls = stub_server([(200, b'{"rewards": [', 100)])
    with stub:
        with pytest.raises(RewardError, match=rf"{url} is unreachable after 2 attempts \(IncompleteRead\(13 bytes"):
            AlignmentClient(url, retries=1, backoff=0.01)(images(1), ["a"])
        stub.shutdown()


def test_client_refuses_rewards_that_are_not_numbers():
    stub, url, calls = stub_server([(200, b'{"rewards": ["x", null]}', 24)])
    with stub:
        with pytest.raises(RewardError, match=rf"server {url} sent .*'x', None.*, expected 2 numbers as rewards"):
            AlignmentClient(url, retries=3, backoff=0.01)(images(2), ["a", "b"])
        assert len(calls) == 1
        stub.shutdown()


def test_killed_server_restarted_on_the_same_port_is_retried_until_it_answers(server, models):
    # Runs after the tests above (file order): it replaces the module's server by a restarted one.
    url = server["url"]
    client = AlignmentClient(url, retries=60, backoff=0.25, max_backoff=1.0, timeout=30)
    assert np.isfinite(client(images(2), PROMPTS[:2])).all()
    server["process"].kill()
    server["process"].wait()
    port = int(url.rsplit(":", 1)[1])
    threading.Thread(target=lambda: server.update(zip(("process", "url"), start_server(models, port))),
                     daemon=True).start()
    rewards = client(images(2, seed=5), PROMPTS[:2])  # connection refused until the new server listens
    assert rewards.shape == (2,) and np.isfinite(rewards).all()
    assert server["url"] == url


@pytest.mark.parametrize("args, message", [
    (["--vlm", "/no/such/vlm"], "--vlm '/no/such/vlm' is invalid: no such folder"),
    (["--device", "tpu"], "--device 'tpu' is invalid; allowed: auto, cpu, cuda, cuda:N"),
    (["--port", "70000"], "--port 70000 is invalid: it must be in 0..65535"),
])
def test_serve_reward_bad_input_is_one_line_exit_2(monkeypatch, capsys, args, message):
    from rlcm_fast.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["serve-reward", "--reward", "alignment", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rlcm-fast: error: ") and message in err[-1]


@pytest.mark.parametrize("swap, message", [
    ("--vlm", "has a BertTokenizer, not a processor of images and text (a text model, or a folder without "
              "preprocessor_config.json): it takes an image-text-to-text model"),
    # From its config, before its weights load (which printed transformers' table of the weights left unused).
    ("--scorer", "is a 'llava' model, not a text encoder with hidden layers: BERTScore takes a BERT-family model"),
])
def test_serve_reward_given_the_wrong_kind_of_model_is_one_line(models, monkeypatch, capsys, swap, message):
    from rlcm_fast.cli import main

    llava, bert = map(str, models)
    vlm, scorer = (bert, bert) if swap == "--vlm" else (llava, llava)  # an AttributeError traceback before
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["serve-reward", "--reward", "alignment", "--host", "127.0.0.1", "--port", "0", "--device", "cpu",
                 "--vlm", vlm, "--scorer", scorer]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rlcm-fast: error: the alignment models cannot be loaded: ")
    assert message in err[-1] and "Traceback" not in "".join(err)
    assert err[0].endswith(f" bound; loading the VLM {vlm} and the scorer {scorer}")  # folders: no word of the hub


def test_serve_reward_names_its_port_before_the_models_load(monkeypatch, capsys):
    from rlcm_fast.cli import main

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr("rlcm_fast.rewards.alignment_server.AlignmentScorer", unreachable)
    assert main(["serve-reward", "--reward", "alignment", "--host", "127.0.0.1", "--port", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # The port --port 0 bound is printed before the models load (minutes for LLaVA), not only once they have.
    bound = re.fullmatch(r"serve-reward: http://127\.0\.0\.1:(\d+) bound; (.*)", err[0])
    assert bound and int(bound.group(1)) > 0
    assert bound.group(2) == "loading the VLM llava-hf/llava-1.5-7b-hf and the scorer roberta-large"
    assert err[1:] == ["rlcm-fast: error: the alignment models cannot be loaded: We couldn't connect to "
                       "'https://huggingface.co' to load the files"]


def test_serve_reward_with_models_neither_cached_nor_reachable_says_so_in_a_few_words(monkeypatch, capsys):
    from huggingface_hub.errors import OfflineModeIsEnabled

    from rlcm_fast.cli import main

    def not_cached(*args, **kwargs):
        try:
            raise OfflineModeIsEnabled("offline")
        except OfflineModeIsEnabled as cause:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                          "in the cached files. Check your internet connection or see ...") from cause

    monkeypatch.setattr("rlcm_fast.rewards.alignment_server.AlignmentScorer", not_cached)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # the hub client reads it at import
    assert main(["serve-reward", "--reward", "alignment", "--host", "127.0.0.1", "--port", "0", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "rlcm-fast: error: the alignment models cannot be loaded: not in this machine's hub cache, and offline mode "
        "(HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE) keeps the hub from being asked: download the model once where "
        "there is a network, or give a local folder")


def test_serve_reward_port_in_use_fails_before_the_models_load(monkeypatch, capsys):
    from rlcm_fast.cli import main

    # Loading a 7B VLM takes minutes (and a GPU's memory); a port in use used to be found only after it.
    monkeypatch.setattr("rlcm_fast.rewards.alignment_server.AlignmentScorer",
                        lambda *a, **k: pytest.fail("the models were loaded"))
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as taken:
        port = taken.server_port
        assert main(["serve-reward", "--reward", "alignment", "--host", "127.0.0.1", "--port", str(port),
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"rlcm-fast: error: cannot serve on 127.0.0.1:{port}: Address already in use"


def test_serve_reward_interrupted_says_it_stopped_and_frees_the_port(monkeypatch, capsys):
    from rlcm_fast.cli import main

    ports = []

    def interrupted(scorer, *args, server=None, **kwargs):  # Ctrl-C while serving
        ports.append(server.server_port if server else args[1])
        raise KeyboardInterrupt

    monkeypatch.setattr("rlcm_fast.rewards.alignment_server.AlignmentScorer", lambda *a, **k: object())
    monkeypatch.setattr("rlcm_fast.rewards.alignment_server.serve", interrupted)
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as probe:
        port = probe.server_port  # free a moment ago
    assert main(["serve-reward", "--port", str(port), "--device", "cpu"]) == 130
    # main's own message for an interrupt is about resuming training from a checkpoint
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith(f"serve-reward: http://127.0.0.1:{port} bound; loading the VLM ")
    assert err[1] == "rlcm-fast: serve-reward stopped (interrupted)"
    assert ports == [port]
    with ThreadingHTTPServer(("127.0.0.1", port), BaseHTTPRequestHandler):
        pass


def serving(host: str):
    """`bind` and the real handler on a thread, with a stand-in scorer (only GET /health is asked)."""
    scorer = SimpleNamespace(vlm_id="vlm", scorer_id="bert", bertscore=SimpleNamespace(layer=2))
    server = alignment_server.bind(host, 0)
    server.RequestHandlerClass = make_handler(scorer)
    server.server_activate()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def ipv6_loopback_or_skip():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:  # a machine without IPv6
        pytest.skip(f"no IPv6 loopback here: {exc}")


def test_serve_reward_listens_on_an_ipv6_address():
    """`--host ::1` was refused as an IPv4 address ("Address family for hostname not supported")."""
    ipv6_loopback_or_skip()
    for host in ("::1", "[::1]"):  # the second as a URL spells it
        server = serving(host)
        try:
            assert http(f"http://[::1]:{server.server_port}/health") == (
                200, {"status": "ok", "vlm": "vlm", "scorer": "bert", "layer": 2})
        finally:
            server.shutdown()
            server.server_close()


def test_an_empty_host_is_refused_not_bound_to_every_interface(capsys):
    from rlcm_fast.cli import main

    assert main(["serve-reward", "--host", "", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "rlcm-fast: error: --host '' is invalid: give an address (127.0.0.1 for this machine, 0.0.0.0 or :: for "
        "every interface)")


def test_a_request_line_with_control_characters_is_logged_escaped(capsys):
    """An escape sequence in a client's request line reached the operator's terminal as is."""
    server = serving("127.0.0.1")
    try:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as conn:
            conn.sendall(b"GET /\x1b[31mred\x07 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert conn.recv(100).split(b"\r\n")[0].endswith(b" 404 Not Found")
        err = ""

        def logged():
            nonlocal err
            err += capsys.readouterr().err
            return "red" in err

        assert wait_for(logged)
    finally:
        server.shutdown()
        server.server_close()
    assert "\x1b" not in err and "\x07" not in err
    assert 'serve-reward: 127.0.0.1 "GET /\\x1b[31mred\\x07 HTTP/1.1" 404 no such path' in err
    assert alignment_server.printable("a\x1b[31m\x07\té") == "a\\x1b[31m\\x07\\té"
    assert alignment_server.printable("a\\x1b") == "a\\\\x1b"  # the text, not an escaped ESC


def test_a_full_form_ipv6_address_binds_as_ipv6():
    """Any spelling of an IPv6 address binds an IPv6 socket, the full form too."""
    ipv6_loopback_or_skip()
    server = alignment_server.bind("0:0:0:0:0:0:0:1", 0)
    try:
        assert server.socket.family == socket.AF_INET6 and server.server_address[0] == "::1"
    finally:
        server.server_close()


def test_the_printed_url_of_an_ipv6_server_brackets_its_address(monkeypatch, capsys):
    """`http://::1:8060` is no URL; the start line must say `http://[::1]:8060`."""
    ipv6_loopback_or_skip()
    scorer = SimpleNamespace(vlm_id="vlm", scorer_id="bert", bertscore=SimpleNamespace(layer=2))
    server = alignment_server.bind("[::1]", 0)
    port = server.server_address[1]

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(server, "serve_forever", interrupted)
    with pytest.raises(KeyboardInterrupt):
        alignment_server.serve(scorer, server=server)
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"serve-reward: alignment (vlm + BERTScore bert layer 2) on http://[::1]:{port}")


def test_a_name_is_bound_as_the_resolvers_first_answer_of_either_family(monkeypatch):
    """A name was bound as IPv4 whatever it resolved to: one with only an IPv6 address could not be served on."""
    ipv6_loopback_or_skip()
    real = socket.getaddrinfo

    def resolve(host, port, family=0, type=0, proto=0, flags=0):  # a family asked for is honoured
        v6, v4 = (socket.AF_INET6, type, 6, "", ("::1", port, 0, 0)), (socket.AF_INET, type, 6, "", ("127.0.0.1", port))
        answers = {"v6only.test": [v6], "dual.test": [v6, v4]}.get(host)
        if answers is None:
            return real(host, port, family, type, proto, flags)
        return [answer for answer in answers if family in (0, answer[0])]

    monkeypatch.setattr(alignment_server.socket, "getaddrinfo", resolve)
    for host, family, address in (("v6only.test", socket.AF_INET6, "::1"), ("dual.test", socket.AF_INET6, "::1"),
                                  ("127.0.0.1", socket.AF_INET, "127.0.0.1")):  # the last through the real resolver
        server = alignment_server.bind(host, 0)
        try:
            assert (server.socket.family, server.server_address[0]) == (family, address), host
        finally:
            server.server_close()


def test_a_host_name_that_does_not_resolve_is_one_line(monkeypatch, capsys):
    from rlcm_fast.cli import main

    def unknown(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(alignment_server.socket, "getaddrinfo", unknown)
    assert main(["serve-reward", "--host", "nosuch.test", "--port", "8060", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "rlcm-fast: error: cannot serve on nosuch.test:8060: Name or service not known")
