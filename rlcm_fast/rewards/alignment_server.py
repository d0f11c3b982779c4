"""The prompt-image alignment reward server (`rlcm-fast serve-reward --reward alignment`).

A vision-language model answers QUESTION about each image; the reward is the BERTScore recall of that
answer against "The image contains {prompt}" (RLCM's fourth task, after DDPO's). The models live in
one process, usually on a GPU of their own, and several training processes may share it.

Protocol (JSON over HTTP; nothing is ever unpickled):
    POST /score   {"images": [base64 JPEG, ...], "prompts": [str, ...]}
               -> 200 {"rewards": [float, ...], "answers": [str, ...]}
    GET  /health  -> 200 {"status": "ok", "vlm": ..., "scorer": ..., "layer": ...}
A malformed request gets 4xx {"error": "..."} (411/413 for a missing or too large Content-Length, 404 for
another path, 400 for the rest); a failure while scoring gets 500 {"error": "..."}. Each request is one
line on stderr, with the error of a 4xx/5xx (and the traceback of a 500). A request whose client hung up
while it waited for the models (a trainer that timed out, and will retry) is dropped unscored.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import select
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..hub import hub_load_options

QUESTION = "Answer concisely: what is going on in this image?"
REFERENCE = "The image contains {prompt}"
DEFAULT_VLM = "llava-hf/llava-1.5-7b-hf"  # LLaVA-1.5 as in the paper (which used the 13B model)
DEFAULT_SCORER = "roberta-large"
# bert_score's default layer per model (its model2layers table, chosen by correlation with human
# judgements on WMT16): roberta-large, its default English model, uses layer 17; bert-base-uncased 9.
BERTSCORE_LAYERS = {"roberta-large": 17, "bert-base-uncased": 9}
# LLaVA-1.5's conversation format, for processors that ship no chat template.
LLAVA_PROMPT = "USER: <image>\n{question} ASSISTANT:"
MAX_REQUEST_BYTES = 256 * 2**20
# Far above any trainer's images (the VLM resizes to a few hundred pixels), far below what a few concurrent
# requests can decode without exhausting memory; Pillow's own bomb check stops only at 179M pixels.
MAX_IMAGE_PIXELS = 4096 * 4096
# Per request, for the same reason: a 256 MiB body holds thousands of small or flat JPEGs, which would be decoded
# (766 flat 4096x4096 ones: 38.6 GB) and handed to the VLM as one batch. The trainer's client sends 16 images
# per request: at 768 px, 9 Mi pixels; at 2048 px, the limit.
MAX_IMAGES_PER_REQUEST = 64
MAX_REQUEST_PIXELS = 64 * 2**20  # RGB: 192 MiB decoded; four images of the largest size
# A connection that sends nothing for this long is closed: a stalled client (or one that opened a connection
# and vanished) would otherwise hold a server thread for good. Scoring time does not count: no socket waits then.
IDLE_TIMEOUT_S = 120.0


class BadRequest(ValueError):
    """A request the server refuses with 400 and this message."""


class ClientGone(Exception):
    """The client closed its connection before its request was scored."""


class BertScoreRecall:
    """BERTScore recall, idf off: for each reference token the best cosine similarity with any candidate
    token (contextual embeddings from one hidden layer), averaged over the reference's tokens. Special
    tokens ([CLS]/[SEP], <s>/</s>) are left out, as bert_score does."""

    def __init__(self, model_id: str = DEFAULT_SCORER, layer: int | None = None, device: str = "cpu"):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        hub = hub_load_options(model_id)
        config = AutoConfig.from_pretrained(model_id, **hub)
        layers = getattr(config, "num_hidden_layers", None)
        if layers is None:  # a vision-language model's config keeps its layers in a text_config; found before loading
            raise ValueError(f"scorer {model_id!r} is a {config.model_type!r} model, not a text encoder with hidden "
                             "layers: BERTScore takes a BERT-family model such as roberta-large")
        self.tokenizer = AutoTokenizer.from_pretrained(model_id, **hub)
        self.model = AutoModel.from_pretrained(model_id, config=config, use_safetensors=True,
                                            **hub_load_options(model_id, auto_model=True)).eval().to(device)
        self.layer = layer if layer is not None else BERTSCORE_LAYERS.get(model_id, layers)
        if not 0 <= self.layer <= layers:
            raise ValueError(f"scorer layer {self.layer} is invalid for {model_id!r}: allowed 0..{layers}")
        self.device = device
        # A tokenizer saved without model_max_length would not truncate a long prompt, and the model would fail
        # on positions past its table; RoBERTa's table starts 2 positions in, hence the margin.
        positions = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = self.tokenizer.model_max_length
        if positions and self.max_length > positions:
            self.max_length = positions - 2

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt", return_special_tokens_mask=True).to(self.device)
        special = batch.pop("special_tokens_mask").bool()
        hidden = self.model(**batch, output_hidden_states=True).hidden_states[self.layer]  # [0] = embeddings
        return F.normalize(hidden.float(), dim=-1), batch["attention_mask"].bool() & ~special

    @torch.no_grad()
    def recall(self, candidates: Sequence[str], references: Sequence[str]) -> list[float]:
        cand, cand_mask = self.embed(candidates)
        ref, ref_mask = self.embed(references)
        similarity = ref @ cand.transpose(1, 2)  # batch x reference tokens x candidate tokens
        similarity = similarity.masked_fill(~cand_mask[:, None, :], float("-inf"))
        best = similarity.max(dim=2).values
        best = torch.where(ref_mask & cand_mask.any(1, keepdim=True), best, torch.zeros_like(best))
        # An empty answer scores 0 rather than NaN.
        return (best.sum(1) / ref_mask.sum(1).clamp(min=1)).tolist()


class VlmAnswerer:
    """Greedy answers to QUESTION from any transformers image-text-to-text model."""

    def __init__(self, model_id: str = DEFAULT_VLM, device: str = "cpu", max_new_tokens: int = 48):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        hub = hub_load_options(model_id)
        self.processor = AutoProcessor.from_pretrained(model_id, **hub)
        if not hasattr(self.processor, "tokenizer") or not hasattr(self.processor, "image_processor"):
            # A text model's folder gives a bare tokenizer here, before the minutes a model of any size takes to load.
            raise ValueError(f"vlm {model_id!r} has a {type(self.processor).__name__}, not a processor of images and "
                             "text (a text model, or a folder without preprocessor_config.json): it takes an "
                             "image-text-to-text model such as llava-hf/llava-1.5-7b-hf")
        self.processor.tokenizer.padding_side = "left"  # decoder-only batched generation pads on the left
        self.model = AutoModelForImageTextToText.from_pretrained(model_id, use_safetensors=True, dtype=dtype,
                                                                **hub_load_options(model_id, auto_model=True))
        self.model.eval().to(device)
        self.device, self.max_new_tokens = device, max_new_tokens
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
            self.text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        else:
            self.text = LLAVA_PROMPT.format(question=QUESTION)

    @torch.no_grad()
    def answers(self, images: Sequence[Image.Image]) -> list[str]:
        inputs = self.processor(images=list(images), text=[self.text] * len(images), return_tensors="pt",
                                padding=True).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]


class AlignmentScorer:
    def __init__(self, vlm: str = DEFAULT_VLM, scorer: str = DEFAULT_SCORER, layer: int | None = None,
                 device: str = "cpu", max_new_tokens: int = 48):
        self.vlm_id, self.scorer_id = vlm, scorer
        self.vlm = VlmAnswerer(vlm, device, max_new_tokens)
        self.bertscore = BertScoreRecall(scorer, layer, device)
        self.lock = threading.Lock()  # one GPU, one batch at a time; requests from several trainers queue here

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str],
              client_gone: Callable[[], bool] | None = None) -> tuple[list[float], list[str]]:
        with self.lock:
            # Checked once the lock is ours: a request that waited behind other trainers' may have been given
            # up (and resent); scoring it anyway would only lengthen the queue.
            if client_gone is not None and client_gone():
                raise ClientGone
            answers = self.vlm.answers(images)
            rewards = self.bertscore.recall(answers, [REFERENCE.format(prompt=p) for p in prompts])
        return rewards, answers


def decode_request(body: bytes) -> tuple[list[Image.Image], list[str]]:
    """The images and prompts of a /score request, or BadRequest saying what is wrong."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("body is not JSON this server reads: nested too deeply") from None
    if not isinstance(request, dict) or not isinstance(request.get("images"), list) \
            or not isinstance(request.get("prompts"), list):
        raise BadRequest('expected a JSON object {"images": [base64 JPEG, ...], "prompts": [str, ...]}')
    images, prompts = request["images"], request["prompts"]
    if len(images) != len(prompts) or not images:
        raise BadRequest(f"got {len(images)} images and {len(prompts)} prompts; expected the same number, at least 1")
    if len(images) > MAX_IMAGES_PER_REQUEST:
        raise BadRequest(f"got {len(images)} images; allowed at most {MAX_IMAGES_PER_REQUEST} per request")
    if not all(isinstance(p, str) for p in prompts):
        raise BadRequest("every prompt must be a string")
    for index, prompt in enumerate(prompts):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape (\ud800): valid JSON, but no tokenizer takes it
            raise BadRequest(f"prompts[{index}] is not valid Unicode text (a lone surrogate)") from None
    opened = []  # headers only: every size is checked before any image is decoded
    for index, item in enumerate(images):
        try:
            # JPEG only, as the protocol says: none of Pillow's other decoders (some of which hand the bytes to
            # external programs) sees what a client sends.
            image = Image.open(io.BytesIO(base64.b64decode(item, validate=True)), formats=["JPEG"])
        except Image.DecompressionBombError:  # Pillow refuses twice its MAX_IMAGE_PIXELS as it reads the header
            raise BadRequest(f"images[{index}] has over {2 * Image.MAX_IMAGE_PIXELS} pixels; "
                             f"allowed at most {MAX_IMAGE_PIXELS}") from None
        except (TypeError, ValueError, binascii.Error, OSError):
            raise BadRequest(f"images[{index}] is not a base64-encoded JPEG") from None
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise BadRequest(f"images[{index}] is {width}x{height}; allowed at most {MAX_IMAGE_PIXELS} pixels")
        opened.append(image)
    pixels = sum(image.width * image.height for image in opened)
    if pixels > MAX_REQUEST_PIXELS:
        raise BadRequest(f"the images have {pixels} pixels in all; allowed at most {MAX_REQUEST_PIXELS} per request")
    decoded = []
    for index, image in enumerate(opened):
        try:
            image.load()
        except (ValueError, OSError):
            raise BadRequest(f"images[{index}] is not a base64-encoded JPEG") from None
        decoded.append(image.convert("RGB"))
    return decoded, prompts


def make_handler(scorer: AlignmentScorer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = IDLE_TIMEOUT_S  # socketserver sets it on each connection
        note = ""  # what the request's log line adds after its status

        def handle(self):
            try:
                super().handle()
            except ConnectionResetError:  # mid request line or headers (http.server lets it reach a traceback)
                self.log_message("client hung up while sending its request")

        def reply(self, status: int, payload: dict, body_unread: bool = False) -> None:
            if "error" in payload:
                self.note = payload["error"]
            if body_unread:  # on a kept-alive connection its bytes would be read as the next request
                self.close_connection = True
            body = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up; nothing to tell it
                self.close_connection = True
                self.log_message('"%s": client hung up before the %d reply', self.requestline, status)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path != "/health":
                return self.reply(404, {"error": f"no such path {self.path!r}; use GET /health or POST /score"})
            self.reply(200, {"status": "ok", "vlm": scorer.vlm_id, "scorer": scorer.scorer_id,
                             "layer": scorer.bertscore.layer})

        def do_POST(self):  # noqa: N802
            if self.path != "/score":
                return self.reply(404, {"error": f"no such path {self.path!r}; use POST /score"}, body_unread=True)
            header = self.headers.get("Content-Length")
            if header is None:
                return self.reply(411, {"error": "a Content-Length header is required"}, body_unread=True)
            try:
                length = int(header)
            except ValueError:
                length = -1
            if length < 0:
                return self.reply(400, {"error": f"Content-Length {header!r} is invalid: expected a number of bytes"},
                                  body_unread=True)
            if not 0 < length <= MAX_REQUEST_BYTES:
                return self.reply(413 if length else 400,
                                  {"error": f"body of {length} bytes; allowed 1..{MAX_REQUEST_BYTES}"},
                                  body_unread=True)
            try:
                body = self.rfile.read(length)
            except OSError:  # reset: a trainer killed, or its machine gone
                self.close_connection = True
                return self.log_message('"%s": client hung up while sending its body', self.requestline)
            if len(body) < length:
                return self.reply(400, {"error": f"body ended after {len(body)} of {length} bytes"},
                                  body_unread=True)
            start = time.monotonic()
            try:
                images, prompts = decode_request(body)
                rewards, answers = scorer.score(images, prompts, self.client_gone)
            except BadRequest as exc:
                return self.reply(400, {"error": str(exc)})
            except ClientGone:
                self.close_connection = True
                return self.log_message('"%s": client hung up while waiting; not scored', self.requestline)
            except Exception as exc:  # the server's fault: 500, the traceback in its log, and it stays up
                traceback.print_exc(file=sys.stderr)
                return self.reply(500, {"error": f"{type(exc).__name__}: {exc}"})
            self.note = f"{len(images)} images in {time.monotonic() - start:.2f} s"
            self.reply(200, {"rewards": rewards, "answers": answers})

        def client_gone(self) -> bool:
            """Whether the client closed its end: its socket reads as EOF (or fails) without blocking."""
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
            except ValueError:  # a descriptor past select's FD_SETSIZE: cannot tell, so score it
                return False
            except OSError:
                return True

        def log_request(self, code="-", size="-"):  # one line per request, with what went wrong or how long it took
            code = getattr(code, "value", code)
            self.log_message('"%s" %s%s', self.requestline, code, f" {self.note}" if self.note else "")
            self.note = ""  # the next request on a kept-alive connection has its own

        def log_message(self, format, *args):  # on stderr, without reverse DNS
            # A client's request line may hold control characters (an escape sequence for the operator's terminal).
            sys.stderr.write(f"serve-reward: {self.address_string()} {printable(format % args)}\n")

    return Handler


def printable(text: str) -> str:
    """`text` with each character a terminal would act on (ESC, CR, ...) written as a Python escape, and a
    backslash doubled: a client's own `\\x1b` text is not read as an escaped ESC."""
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii") for c in text)


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def bind(host: str, port: int) -> ThreadingHTTPServer:
    """A server bound to host:port (an IPv6 address such as ::1 or [::1] too, or a name that resolves to either
    family) that does not listen yet: a port in use fails here, before minutes of model loading, and until
    `serve` listens a client's connection is refused (and retried), not left hanging."""
    if host.startswith("[") and host.endswith("]"):  # as a URL spells an IPv6 address
        host = host[1:-1]
    if ":" not in host:  # a name or an IPv4 address: bound as the resolver's first answer for it, IPv4 or IPv6
        host = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]  # (family, ..., (address, port...))
    kind = _IPv6Server if ":" in host else ThreadingHTTPServer
    server = kind((host, port), BaseHTTPRequestHandler, bind_and_activate=False)
    try:
        server.server_bind()
    except BaseException:
        server.server_close()
        raise
    return server


def server_url(server: ThreadingHTTPServer) -> str:
    """The URL a client reaches the bound `server` at (an IPv6 address in brackets, as a URL spells it)."""
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(scorer: AlignmentScorer, host: str = "127.0.0.1", port: int = 0,
          server: ThreadingHTTPServer | None = None) -> None:
    """Serve `scorer` on `server` (from `bind`), else on host:port, until interrupted."""
    server = server or bind(host, port)
    try:
        server.RequestHandlerClass = make_handler(scorer)
        server.server_activate()
        print(f"serve-reward: alignment ({scorer.vlm_id} + BERTScore {scorer.scorer_id} layer "
              f"{scorer.bertscore.layer}) on {server_url(server)}", file=sys.stderr, flush=True)
        server.serve_forever()
    finally:
        server.server_close()
