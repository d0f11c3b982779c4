"""The alignment reward server and its client, for real on 127.0.0.1 with tiny random models."""

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rlcm_fast.rewards import AlignmentClient, RewardError, make_reward
from rlcm_fast.rewards.alignment_server import REFERENCE, AlignmentScorer, BertScoreRecall
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


@pytest.mark.parametrize("body, message", [
    (b"not json", "body is not JSON"),
    (json.dumps({"images": []}).encode(), "expected a JSON object"),
    (json.dumps({"images": ["aGk="], "prompts": ["a", "b"]}).encode(), "got 1 images and 2 prompts"),
    (json.dumps({"images": ["!!!"], "prompts": ["a"]}).encode(), r"images\[0\] is not a base64-encoded image"),
    (json.dumps({"images": ["aGk="], "prompts": [3]}).encode(), "every prompt must be a string"),
])
def test_bad_requests_get_400_with_a_message(server, body, message):
    status, reply = http(f"{server['url']}/score", body)
    assert status == 400 and re.search(message, reply["error"])


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
