"""Mutation-testing round 51c (rewards/alignment, rewards/alignment_server), a third round over them after 44c and
48d: hand-written mutants of those modules were run against their tests (test_alignment_client,
test_alignment_server, test_mutants_round44c, test_mutants_round48d, the serve-reward tests of the CLI's files);
each test here kills one that survived (named in its docstring). All are CPU-only, seeded and fast: stub servers
on 127.0.0.1 for the client, the server's request decoding and HTTP handler in this process with a stand-in scorer,
and the VLM's loading stubbed (no model is loaded)."""

import base64
import io
import json
import socket
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from rlcm_fast.rewards import AlignmentClient, alignment, silent_reward_server
from rlcm_fast.rewards import alignment_server
from rlcm_fast.rewards.alignment_server import BadRequest, decode_request, make_handler
from test_mutants_round44c import client_images, exchange, handler_server, stub  # noqa: F401 - a fixture


# -- alignment: the client's defaults and its messages ---------------------------------------------------------

def test_the_default_retries_last_about_the_minute_the_messages_promise(monkeypatch):
    """Mutant: the default retries 6 -> 3. The trainer makes its client with the defaults, and its start-up warning
    says each batch's scoring retries the server "for about a minute" (room for a restarted server to load its
    models); with 3 retries a batch gave up after 7 s of waiting, ending a run that a server restart would have
    let go on."""
    waits = []
    monkeypatch.setattr(alignment, "reward_cancelled", lambda wait: waits.append(wait) or False)
    with socket.create_server(("127.0.0.1", 0)) as probe:
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(alignment.RewardError, match=r"is unreachable after \d+ attempts \(.*refused") as caught:
        AlignmentClient(url, timeout=1)(client_images(), ["a"])
    assert f"after {len(waits) + 1} attempts" in str(caught.value)  # a wait before each retry
    assert 45 <= sum(waits) <= 90, waits
    assert "retries it for about a minute" in AlignmentClient(url).health_problem()


def test_the_start_up_health_check_waits_seconds_not_the_scoring_timeout(monkeypatch):
    """Mutant: health_problem's default timeout 3 s -> 120 s. The check a run makes as it starts (with the client's
    defaults) then waited as long as a whole scoring request: a server that accepts connections but does not answer
    (hung, or its backlog full while it loads) held the start of every run for two minutes before the warning."""
    timeouts = []
    real = AlignmentClient._connection
    monkeypatch.setattr(AlignmentClient, "_connection", lambda self, timeout: timeouts.append(timeout) or real(
        self, timeout))
    with stub(200, b'{"status": "ok"}') as (url, requests):
        assert silent_reward_server("alignment", url) is None
    assert [(method, path) for method, path, _ in requests] == [("GET", "/health")]
    assert len(timeouts) == 1 and 0 < timeouts[0] <= 10


def test_a_connection_error_of_exactly_the_limit_is_quoted_whole():
    """Mutant: `len(text) <= limit` -> `<`. An error of exactly 200 characters (what the messages allow) was cut
    and given "..." as if something had been left out; one character more is cut to the 200."""
    assert alignment._connection_error(OSError("x" * 200)) == "x" * 200
    assert alignment._connection_error(OSError("x" * 201)) == "x" * 200 + "..."


def test_no_deadline_timer_outlives_its_request():
    """Mutant: the deadline's timer not cancelled once the reply is read. Each request then left a thread sleeping
    out the rest of reward_timeout (120 s by default): a run scoring a batch every second held a hundred idle
    threads, each to shut a socket long closed."""
    def timers():
        return [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.is_alive()]

    before = set(timers())
    with stub() as (url, _):
        assert AlignmentClient(url, timeout=60, retries=0)(client_images(), ["a"]).tolist() == [0.5]
    deadline = time.monotonic() + 5
    while set(timers()) - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not set(timers()) - before


# -- alignment_server: the VLM's loading and generation, stubbed -----------------------------------------------

def stub_vlm(monkeypatch, generated=None):
    """transformers' loading stubbed: records the dtype each model is loaded in; the model's generate records its
    keyword arguments into `generated` and returns the input ids followed by two new tokens."""
    import torch
    import transformers

    class Processor:
        tokenizer = SimpleNamespace(padding_side="right")
        image_processor = object()
        chat_template = None

        def __call__(self, images, text, return_tensors, padding):
            return Batch(input_ids=torch.ones(len(images), 4, dtype=torch.long),
                         pixel_values=torch.zeros(len(images), 3, 2, 2))

        def batch_decode(self, tokens, skip_special_tokens):
            return [" ".join(map(str, row.tolist())) + " " for row in tokens]

    class Batch(dict):
        def to(self, device):
            return self

    loaded = []

    class Model:
        dtype = torch.float32

        def eval(self):
            return self

        def to(self, device):
            return self

        def generate(self, **kwargs):
            if generated is not None:
                generated.append(kwargs)
            ids = kwargs["input_ids"]
            return torch.cat([ids, torch.full((len(ids), 2), 7, dtype=torch.long)], dim=1)

    def load(model_id, **kwargs):
        loaded.append(kwargs["dtype"])
        return Model()

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: Processor())
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", load)
    return loaded


def test_every_cuda_device_loads_the_vlm_in_bf16(monkeypatch):
    """Mutant: bf16 only for the device spelled "cuda" (`device == "cuda"` for `startswith("cuda")`). A server on
    `--device cuda:1` (its own GPU, as the module suggests) loaded LLaVA in float32: twice the memory (28 GB for the
    7B model) and slower generation, for the same answers; the CPU keeps float32."""
    import torch

    loaded = stub_vlm(monkeypatch)
    for device in ("cuda", "cuda:1", "cpu"):
        alignment_server.VlmAnswerer("org/vlm", device)
    assert loaded == [torch.bfloat16, torch.bfloat16, torch.float32]


def test_the_vlm_generates_at_most_max_new_tokens(monkeypatch):
    """Mutant: generate called with 48 new tokens whatever --max-new-tokens says. The option bounds each answer's
    length (and so the time each request holds the models, and the reply's size, which the client caps); a server
    started with --max-new-tokens 6 generated up to 48, and greedily: never sampled."""
    generated = []
    stub_vlm(monkeypatch, generated)
    vlm = alignment_server.VlmAnswerer("org/vlm", "cpu", max_new_tokens=6)
    assert vlm.answers([Image.new("RGB", (8, 8))] * 2) == ["7 7", "7 7"]
    assert [(kwargs["max_new_tokens"], kwargs["do_sample"]) for kwargs in generated] == [(6, False)]


# -- alignment_server: decode_request --------------------------------------------------------------------------

def jpeg_text(size=(8, 8), seed=0) -> str:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_a_body_that_is_not_utf8_is_a_bad_request():
    """Mutant: only JSONDecodeError caught as the body is parsed. A body that is not UTF-8 (a client sending Latin-1
    text, or bytes cut mid-character) raised UnicodeDecodeError: a 500 with a traceback in the server's log, which
    the client retries for a minute, instead of a 400 saying the body is not JSON."""
    with pytest.raises(BadRequest, match=r"^body is not JSON: .*can't decode byte 0xe9"):
        decode_request(b'{"images": [], "prompts": ["caf\xe9"]}')


@pytest.mark.parametrize("request_body", [[], [{"images": [], "prompts": []}], "images", 3])
def test_a_body_that_is_json_but_not_an_object_is_a_bad_request(request_body):
    """Mutant: the body not checked to be a JSON object. A list or a string (a client sending its images bare)
    raised AttributeError ('list' object has no attribute 'get'): a 500 the client retries for a minute, for a
    malformed request that the 400 describes at once."""
    with pytest.raises(BadRequest, match=r'^expected a JSON object \{"images": \[base64 JPEG, \.\.\.\], '):
        decode_request(json.dumps(request_body).encode())


@pytest.mark.parametrize("images", [None, "aGk=", {"0": "aGk="}], ids=["missing", "a string", "an object"])
def test_images_that_are_not_a_list_are_a_bad_request(images):
    """Mutant: the images not checked to be a list. A request without images failed on len(None) (a 500); images
    as one string were taken character by character as images, each then refused as "images[i] is not a
    base64-encoded JPEG", a message about the wrong thing."""
    request = {"prompts": ["a"]} if images is None else {"images": images, "prompts": ["a"] * 4}
    with pytest.raises(BadRequest, match=r'^expected a JSON object \{"images": \[base64 JPEG, \.\.\.\], '):
        decode_request(json.dumps(request).encode())


def test_more_images_than_prompts_is_a_bad_request():
    """Mutant: only fewer images than prompts refused (`!=` -> `<`). A request with an image more than its prompts
    (a client's off-by-one) went to the models: the VLM answered every image and BERTScore then failed on answers
    and references of different counts (a 500, retried for a minute), or a reply of rewards for the wrong count."""
    body = json.dumps({"images": [jpeg_text(), jpeg_text()], "prompts": ["a"]}).encode()
    with pytest.raises(BadRequest, match=r"^got 2 images and 1 prompts; expected the same number, at least 1$"):
        decode_request(body)


@pytest.mark.parametrize("item", [3, None, ["aGk="], {"jpeg": "aGk="}])
def test_an_image_that_is_not_a_string_is_a_bad_request_naming_it(item):
    """Mutant: TypeError not caught as an image is decoded. An image given as a number, null, a list or an object
    (a client's serialisation bug) raised out of base64's decoder: a 500, retried for a minute, instead of a 400
    naming which image is wrong."""
    body = json.dumps({"images": [jpeg_text(), item], "prompts": ["a", "b"]}).encode()
    with pytest.raises(BadRequest, match=r"^images\[1\] is not a base64-encoded JPEG$"):
        decode_request(body)


def test_a_tall_image_over_the_pixel_limit_is_refused(monkeypatch):
    """Mutant: an image's pixels counted as width x width. A tall image (8 x 9 against a limit of 64 here, 1000 x
    20000 against the real one) passed as if square and was decoded whatever its size: the per-image limit, which
    keeps a few concurrent requests from exhausting the server's memory, held for wide images only."""
    monkeypatch.setattr(alignment_server, "MAX_IMAGE_PIXELS", 64)
    images, _ = decode_request(json.dumps({"images": [jpeg_text((8, 8))], "prompts": ["a"]}).encode())
    assert images[0].size == (8, 8)
    with pytest.raises(BadRequest, match=r"^images\[0\] is 8x9; allowed at most 64 pixels$"):
        decode_request(json.dumps({"images": [jpeg_text((8, 9))], "prompts": ["a"]}).encode())


# -- alignment_server: the HTTP handler ------------------------------------------------------------------------

def test_a_body_one_byte_short_is_named_as_cut_short(handler_server):
    """Mutant: `len(body) < length` -> `< length - 1`. A body one byte shorter than its Content-Length (a client
    that counted characters, not UTF-8 bytes, or a connection dropped at the last byte) was parsed as if whole, and
    the 400 said "not JSON" instead of that the body ended early, hiding the client's real bug."""
    payload = json.dumps({"images": [jpeg_text()], "prompts": ["a"]}).encode()
    request = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload) + 1}\r\n\r\n".encode() + payload
    received = exchange(handler_server, request, half_close=True)
    assert received.startswith(b"HTTP/1.1 400 ")
    assert json.loads(received.split(b"\r\n\r\n", 1)[1]) == {
        "error": f"body ended after {len(payload)} of {len(payload) + 1} bytes"}


def test_the_reply_of_a_scored_request_carries_the_vlms_answers(handler_server):
    """Mutant: the answers left out of the 200 reply. The protocol promises {"rewards": [...], "answers": [...]}:
    the answers are how a user sees what the VLM made of each image (a reward near 0 from an empty or off-topic
    answer) without the server's log."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", handler_server, timeout=10)
    try:
        connection.request("POST", "/score", body=json.dumps({"images": [jpeg_text()] * 2, "prompts": ["a", "b"]}))
        reply = connection.getresponse()
        assert reply.status == 200
        assert json.loads(reply.read()) == {"rewards": [0.5, 0.5], "answers": ["x", "x"]}
    finally:
        connection.close()


def test_client_gone_leaves_a_pipelined_request_to_be_read():
    """Mutant: client_gone's recv without MSG_PEEK. Checking whether the client is still there took the first byte
    of the next request a client had already sent on its kept-alive connection ("POST /score" read as
    "OST /score"): that request then got a 400 for a malformed request line."""
    gone = make_handler(SimpleNamespace()).client_gone
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as peer:
            server_side, _ = listener.accept()
            with server_side:
                peer.sendall(b"POST /score HTTP/1.1\r\n")
                server_side.settimeout(10)
                deadline = time.monotonic() + 5
                while not server_side.recv(64, socket.MSG_PEEK).endswith(b"\r\n") and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert gone(SimpleNamespace(connection=server_side)) is False
                assert server_side.recv(64) == b"POST /score HTTP/1.1\r\n"


def test_client_gone_scores_a_request_whose_socket_select_cannot_watch(monkeypatch):
    """Mutant: a socket select() refuses (ValueError: a descriptor past FD_SETSIZE, 1024) taken as a gone client. A
    busy server with over a thousand open descriptors then dropped every request unscored; the clients timed out
    and resent them, and no batch was ever scored. When it cannot tell, the server scores the request."""
    def refuse(*args):
        raise ValueError("filedescriptor out of range in select()")

    monkeypatch.setattr(alignment_server, "select", SimpleNamespace(select=refuse))
    gone = make_handler(SimpleNamespace()).client_gone
    server_side, peer = socket.socketpair()
    with server_side, peer:
        assert gone(SimpleNamespace(connection=server_side)) is False


def test_the_url_of_a_server_on_any_ipv6_address_brackets_it():
    """Mutant: the brackets only for an address spelled with "::". A server bound to a full IPv6 address (one
    without a run of zeros, e.g. a global 2001:db8:1:2:3:4:5:6) announced http://2001:db8:1:2:3:4:5:6:8060, which no
    client can parse as host and port; the trainer's reward_server is copied from that line."""
    for host, url in (("2001:db8:1:2:3:4:5:6", "http://[2001:db8:1:2:3:4:5:6]:8060"), ("::1", "http://[::1]:8060"),
                      ("127.0.0.1", "http://127.0.0.1:8060")):
        address = (host, 8060, 0, 0) if ":" in host else (host, 8060)
        assert alignment_server.server_url(SimpleNamespace(server_address=address)) == url


# -- a source bug found with the mutants above (mended) -----------------------------------------------------------------

CUDA_ASSERT = ("RuntimeError: CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously "
               "reported at some other API call, so the stacktrace below might be incorrect.\nFor debugging consider "
               "passing CUDA_LAUNCH_BLOCKING=1")


@pytest.mark.parametrize("status, message", [
    (500, r"is unreachable after 1 attempts \(HTTP 500: RuntimeError: CUDA error: device-side assert triggered"),
    (400, r"refused the request \(400\): RuntimeError: CUDA error: device-side assert triggered"),
])
def test_a_server_error_of_several_lines_is_one_line_in_the_reward_error(status, message):
    """Found with the mutants of _error_message: the reward server answers a failure while scoring with 500 and
    `f"{type(exc).__name__}: {exc}"`, and many of torch's errors span lines (a CUDA device-side assert: three). The
    client put that text into its RewardError as it was, so the run's final "rlcm-fast: error: ..." broke over
    several lines, against the one-line errors the run's log and its error report rely on (the server's own log
    escapes them; a BadStatusLine was made one line in round 48d). (Mended in round 51c: its lines are joined
    with single spaces.)"""
    with stub(status, json.dumps({"error": CUDA_ASSERT}).encode()) as (url, _):
        with pytest.raises(alignment.RewardError, match=f"^reward server {url} {message}") as caught:
            AlignmentClient(url, retries=0)(client_images(), ["a"])
    assert "\n" not in str(caught.value) and " ".join(CUDA_ASSERT.split()) in str(caught.value)
