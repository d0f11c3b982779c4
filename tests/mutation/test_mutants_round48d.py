"""Mutation-testing round 48d (rewards/clip_scores, rewards/alignment, rewards/alignment_server), a second round over
them after 44c: hand-written mutants of those modules were run against their tests (test_clip_rewards,
test_alignment_client, test_alignment_server, test_mutants_round44c, test_mutants_round44h, test_cli_mutants); each
test here kills one that survived (named in its docstring). All are CPU-only, seeded and fast: tiny random models
only where a test needs one, stub servers on 127.0.0.1 for the client, and the server's request decoding and HTTP
handler in this process with a stand-in scorer (no VLM)."""

import base64
import io
import json
import re
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rlcm_fast.rewards import AlignmentClient, RewardError, make_reward
from rlcm_fast.rewards import alignment_server
from rlcm_fast.rewards.alignment_server import BadRequest, decode_request, make_handler
from rlcm_fast.rewards.clip_scores import ClipImageSettings, clip_preprocess
from test_mutants_round44c import client_images, exchange, handler_server, stub  # noqa: F401 - a fixture
from tiny_reward_models import clip_image_processor, save_tiny_clip


# -- clip_scores -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_images_of_any_float_dtype_are_preprocessed_as_their_float32_values(dtype):
    """Mutant: clip_preprocess's `images.float()` dropped. Images that need a resize and are not float32 (a pipeline
    decoding in fp16 or bf16, or float64 from numpy) then met the float32 resize matrices in a matmul and failed
    with a dtype-mismatch traceback, though rewards take any float tensor; clip_preprocess promises fp32 pixels."""
    images = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0)).to(dtype)
    settings = ClipImageSettings(shortest_edge=32, crop=(32, 32))
    pixels = clip_preprocess(images, settings)
    assert pixels.dtype == torch.float32 and pixels.shape == (2, 3, 32, 32)
    torch.testing.assert_close(pixels, clip_preprocess(images.float(), settings), atol=0, rtol=0)


def test_a_checkpoint_lacking_many_weights_is_refused_with_their_count(tmp_path):
    """Mutant: the count of missing weights in the refusal fixed at 1. CLIPScore needs the text tower as well as
    the projections: given a vision-only checkpoint it lacks dozens of weights, and a message saying one is missing
    sent the user looking for a single absent layer instead of the wrong kind of checkpoint."""
    from transformers import CLIPModel, CLIPVisionModel

    full = save_tiny_clip(tmp_path / "full")
    vision_only = tmp_path / "vision"
    CLIPVisionModel.from_pretrained(full, use_safetensors=True).save_pretrained(vision_only)
    CLIPModel.config_class.from_pretrained(full).save_pretrained(vision_only)
    clip_image_processor().save_pretrained(vision_only)
    lacking = sorted(set(load_file(full / "model.safetensors")) - set(load_file(vision_only / "model.safetensors")))
    assert len(lacking) > 1
    with pytest.raises(RewardError, match=rf"^clipscore_model '.*vision' lacks {len(lacking)} weight\(s\) the reward "
                                          rf"needs \(e\.g\. {lacking[0]}\); it needs a CLIP checkpoint"):
        make_reward("clipscore", clipscore_model=str(vision_only))


def test_the_processors_own_mean_and_std_normalise_the_images(tmp_path):
    """Mutant: the processor's image_mean and image_std not read (OpenAI CLIP's used for every checkpoint). A CLIP
    trained with other statistics (0.5 and 0.5, as many are) was fed pixels normalised for OpenAI's, shifting
    every score, while its preprocessor_config.json said how to normalise them."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.5]).save_pretrained(tmp_path)
    settings = ClipImageSettings.from_pretrained(str(tmp_path), "clipscore_model")
    assert settings == ClipImageSettings(32, (32, 32), (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    expected = (images - mean) / std
    torch.testing.assert_close(clip_preprocess(images, settings), expected)


# -- alignment: the client -------------------------------------------------------------------------------------

@contextmanager
def raw_server(answer: bytes):
    """A listener on 127.0.0.1 answering each connection's first bytes with `answer` and closing; yields its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)  # accept() wakes to see `stop`: closing the socket would not wake it
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.settimeout(10)
            with connection:
                connection.recv(65536)
                connection.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(10)
        listener.close()


def test_the_health_check_of_a_port_where_another_protocol_answers_is_a_warning_not_a_traceback():
    """Mutant: only OSError caught around GET /health. reward_server pointing at a port where something other than
    HTTP answers (an SSH server's banner) raised http.client's BadStatusLine out of the start-up check: the run
    died with a traceback instead of the one-line warning that names the URL and the command to start the server."""
    with raw_server(b"SSH-2.0-OpenSSH_9.6\r\n") as url:
        client = AlignmentClient(url)
        problem = client.health_problem(timeout=5)
    assert re.fullmatch(r"does not answer \(SSH-2\.0-OpenSSH_9\.6\s*\); unless it is still loading its models, start "
                        rf"it with `{re.escape(client.serve_command())}`: each batch's scoring retries it for about a "
                        r"minute", problem), problem


@pytest.mark.parametrize("status", [201, 203])
def test_a_success_status_other_than_200_with_rewards_is_read(status):
    """Mutant: only 200 taken as success (`not 200 <= status < 300` -> `status != 200`). A reply of rewards with
    another 2xx status (203 from a caching proxy in front of the server) was called a refused request, and the run
    ended with the error "refused the request (203)" over rewards it had been sent."""
    with stub(status, b'{"rewards": [0.25, 0.75]}') as (url, requests):
        rewards = AlignmentClient(url, retries=0)(client_images(2), ["a", "b"])
    assert rewards.tolist() == [0.25, 0.75] and len(requests) == 1


def test_an_error_reply_nested_too_deeply_to_parse_is_named_by_its_reason_phrase():
    """Mutant: RecursionError not caught when the error reply's body is parsed. A 4xx or 5xx whose body is JSON
    nested deeper than Python parses (a broken or hostile server) ended the run with a RecursionError traceback
    from deep in json, where the reward's one-line error names the server, the status and its reason phrase."""
    nested = b"[" * 100_000 + b"]" * 100_000
    with stub(400, nested) as (url, requests):
        with pytest.raises(RewardError, match=rf"^reward server {url} refused the request \(400\): Bad Request$"):
            AlignmentClient(url, retries=3, backoff=0.01)(client_images(), ["a"])
    assert len(requests) == 1


def test_a_non_http_answer_is_quoted_on_one_line_in_the_warning_and_the_error():
    """A source bug found with the mutant above: http.client's BadStatusLine holds the raw line read, CR LF
    included, and the client put str(exc) into its messages as it was. The start-up warning and the run's final
    error then broke over two lines (a stray carriage return first), against the one-line messages the run's log
    and its error report rely on; a long line (up to 64 KiB) was quoted whole."""
    with raw_server(b"SSH-2.0-OpenSSH_9.6\r\n") as url:
        client = AlignmentClient(url, retries=0)
        problem = client.health_problem(timeout=5)
        with pytest.raises(RewardError) as caught:
            client(client_images(), ["a"])
    assert problem.startswith("does not answer (SSH-2.0-OpenSSH_9.6); unless"), problem
    assert re.fullmatch(rf"reward server {url} is unreachable after 1 attempts \(SSH-2\.0-OpenSSH_9\.6\); start it "
                        r"with `.*` or set reward_server", str(caught.value)), str(caught.value)
    with raw_server(b"X" * 5000 + b"\r\n") as url:
        problem = AlignmentClient(url, retries=0).health_problem(timeout=5)
    assert problem.startswith(f"does not answer ({'X' * 200}...); unless"), problem[:300]


def test_rewards_sent_as_strings_of_numbers_are_refused():
    """Mutant: strings let through the rewards' type check (then cast with float()). A server sending its rewards
    as text ("0.5", a bug in its serialisation) had them trained on as numbers, so the bug went unseen; and text
    that is no number ended the run with a ValueError traceback instead of the reward's one-line error."""
    for body in (b'{"rewards": ["0.5", "0.25"]}', b'{"rewards": ["high", "low"]}'):
        with stub(200, body) as (url, requests):
            with pytest.raises(RewardError, match=rf"^reward server {url} sent .*, expected 2 numbers as rewards$"):
                AlignmentClient(url, retries=3, backoff=0.01)(client_images(2), ["a", "b"])
        assert len(requests) == 1


def test_the_client_sends_at_most_16_images_per_request_by_default():
    """Mutant: the client's default batch_size 16 -> 32. The trainer makes its client with the default, and the
    server's per-request pixel limit is sized for 16 images (16 at 2048 px is exactly MAX_REQUEST_PIXELS): with 32
    per request a run at 2048 px had every batch refused with a 400, and every request held the models twice as
    long."""
    counts = []

    class Counting(BaseHTTPRequestHandler):  # one reward per image received, numbered in the order received
        def do_POST(self):  # noqa: N802
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            start = sum(counts)
            counts.append(len(request["images"]))
            body = json.dumps({"rewards": [float(start + i) for i in range(len(request["images"]))]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Counting) as server:
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        try:
            rewards = AlignmentClient(f"http://127.0.0.1:{server.server_port}", retries=0)(
                client_images(33), [f"p{i}" for i in range(33)])
        finally:
            server.shutdown()
    assert counts == [16, 16, 1] and rewards.tolist() == [float(i) for i in range(33)]
    assert alignment_server.MAX_REQUEST_PIXELS == 16 * 2048 * 2048


# -- alignment_server: requests, binding, the VLM's processor, the HTTP handler --------------------------------

@pytest.mark.parametrize("length", ["abc", "1e3", "-1"])
def test_a_content_length_that_is_not_a_number_of_bytes_is_named_invalid(handler_server, length):
    """Mutant: `length < 0` -> `length < -1`. A Content-Length that is no integer (read as -1) or is -1 itself got
    413 "body of -1 bytes", telling the client its body was too large when its header was malformed; the 400 names
    the header's own value and what it must be."""
    request = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()
    received = exchange(handler_server, request)
    assert received.count(b"HTTP/1.1 ") == 1 and received.startswith(b"HTTP/1.1 400 ")
    assert json.loads(received.split(b"\r\n\r\n", 1)[1]) == {
        "error": f"Content-Length {length!r} is invalid: expected a number of bytes"}


def jpeg_text(size=(8, 8)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.mark.parametrize("prompts", [["a cat", 3], ["a cat", None], [["a cat"], "a dog"]])
def test_a_request_with_any_prompt_that_is_not_a_string_is_a_bad_request(prompts):
    """Mutant: `all(isinstance(p, str) ...)` -> `any(...)`. A request with one string prompt among others that are
    not got past the check and failed in the prompts' Unicode check with an AttributeError: a 500, which the
    client retries for a minute, for a malformed request that the 400 names at once."""
    body = json.dumps({"images": [jpeg_text(), jpeg_text()], "prompts": prompts}).encode()
    with pytest.raises(BadRequest, match="^every prompt must be a string$"):
        decode_request(body)


@pytest.mark.parametrize("host", ["[::1", "[127.0.0.1"])
def test_a_host_with_an_unclosed_bracket_is_refused_not_cut_to_another_address(host):
    """Mutant: the brackets stripped when the host only starts with "[". A typo such as `--host [::1` was cut to
    "::", which binds every interface: a server meant for this machine only listened to the whole network (and
    "[127.0.0.1" became the name "127.0.0."). As typed, neither is an address, and binding it fails (the CLI
    turns that into its one-line "cannot serve on ..." error)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 here: {exc}")
    with pytest.raises(OSError):
        server = alignment_server.bind(host, 0)
        server.server_close()  # reached only when the mutant bound some other address


def test_a_vlm_whose_processor_has_a_tokenizer_but_no_image_processor_is_refused_before_loading(monkeypatch):
    """Mutant: the processor's check needed both parts missing (`or` -> `and`). A model whose processor has a
    tokenizer but takes no images (a speech model's: a tokenizer and a feature extractor) passed, and the server
    loaded it for minutes before failing without saying why; the check names the processor it got at once."""
    import transformers

    class SpeechProcessor:  # what AutoProcessor gives for e.g. a Whisper folder: no image_processor
        tokenizer = SimpleNamespace(padding_side="right")
        feature_extractor = object()

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: SpeechProcessor())

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", loaded)
    with pytest.raises(ValueError, match=r"^vlm 'org/speech' has a SpeechProcessor, not a processor of images and "
                                         r"text \(a text model, or a folder without preprocessor_config\.json\)"):
        alignment_server.VlmAnswerer("org/speech", "cpu")


def test_a_client_that_resets_while_its_reply_is_sent_is_logged_as_such(capsys):
    """Mutant: only BrokenPipeError caught while the reply is written. A client resetting its connection then (a
    trainer killed, its machine gone) raised ConnectionResetError out of the reply, and the log said the client
    hung up "while sending its request", sending the operator after a request that had in fact been scored."""
    class Reset(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise ConnectionResetError(104, "Connection reset by peer")

    handler_class = make_handler(SimpleNamespace())
    handler = handler_class.__new__(handler_class)  # no socket: only what reply() uses is set
    handler.wfile, handler.close_connection = Reset(), False
    handler.request_version, handler.requestline, handler.command = "HTTP/1.1", "POST /score HTTP/1.1", "POST"
    handler.client_address = ("127.0.0.1", 5555)
    capsys.readouterr()
    handler.reply(200, {"rewards": [0.5], "answers": ["x"]})
    assert handler.close_connection is True
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == 'serve-reward: 127.0.0.1 "POST /score HTTP/1.1": client hung up before the 200 reply'
