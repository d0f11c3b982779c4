"""The prompt-image alignment reward server (`rlcm-fast serve-reward --reward alignment`).

A vision-language model answers QUESTION about each image; the reward is the BERTScore recall of that
answer against "The image contains {prompt}" (RLCM's fourth task, after DDPO's). The models live in
one process, usually on a GPU of their own, and several training processes may share it.

Protocol (JSON over HTTP; nothing is ever unpickled):
    POST /score   {"images": [base64 JPEG, ...], "prompts": [str, ...]}
               -> 200 {"rewards": [float, ...], "answers": [str, ...]}
    GET  /health  -> 200 {"status": "ok", "vlm": ..., "scorer": ..., "layer": ...}
A malformed request gets 400 {"error": "..."}; a failure while scoring gets 500 {"error": "..."}.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

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


class BadRequest(ValueError):
    """A request the server refuses with 400 and this message."""


class BertScoreRecall:
    """BERTScore recall, idf off: for each reference token the best cosine similarity with any candidate
    token (contextual embeddings from one hidden layer), averaged over the reference's tokens. Special
    tokens ([CLS]/[SEP], <s>/</s>) are left out, as bert_score does."""

    def __init__(self, model_id: str = DEFAULT_SCORER, layer: int | None = None, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_id)
        self.model = AutoModel.from_pretrained(model_id, use_safetensors=True).eval().to(device)
        layers = self.model.config.num_hidden_layers
        self.layer = layer if layer is not None else BERTSCORE_LAYERS.get(model_id, layers)
        if not 0 <= self.layer <= layers:
            raise ValueError(f"scorer layer {self.layer} is invalid for {model_id!r}: allowed 0..{layers}")
        self.device = device

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                               return_special_tokens_mask=True).to(self.device)
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
        self.processor = AutoProcessor.from_pretrained(model_id)
        self.processor.tokenizer.padding_side = "left"  # decoder-only batched generation pads on the left
        self.model = AutoModelForImageTextToText.from_pretrained(model_id, use_safetensors=True, dtype=dtype)
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

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> tuple[list[float], list[str]]:
        with self.lock:
            answers = self.vlm.answers(images)
            rewards = self.bertscore.recall(answers, [REFERENCE.format(prompt=p) for p in prompts])
        return rewards, answers


def decode_request(body: bytes) -> tuple[list[Image.Image], list[str]]:
    """The images and prompts of a /score request, or BadRequest saying what is wrong."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("images"), list) \
            or not isinstance(request.get("prompts"), list):
        raise BadRequest('expected a JSON object {"images": [base64 JPEG, ...], "prompts": [str, ...]}')
    images, prompts = request["images"], request["prompts"]
    if len(images) != len(prompts) or not images:
        raise BadRequest(f"got {len(images)} images and {len(prompts)} prompts; expected the same number, at least 1")
    if not all(isinstance(p, str) for p in prompts):
        raise BadRequest("every prompt must be a string")
    decoded = []
    for index, item in enumerate(images):
        try:
            image = Image.open(io.BytesIO(base64.b64decode(item, validate=True)))
            image.load()
        except (TypeError, ValueError, binascii.Error, OSError):
            raise BadRequest(f"images[{index}] is not a base64-encoded image") from None
        decoded.append(image.convert("RGB"))
    return decoded, prompts


def make_handler(scorer: AlignmentScorer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path != "/health":
                return self.reply(404, {"error": f"no such path {self.path!r}; use GET /health or POST /score"})
            self.reply(200, {"status": "ok", "vlm": scorer.vlm_id, "scorer": scorer.scorer_id,
                             "layer": scorer.bertscore.layer})

        def do_POST(self):  # noqa: N802
            if self.path != "/score":
                return self.reply(404, {"error": f"no such path {self.path!r}; use POST /score"})
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self.reply(411, {"error": "a Content-Length header is required"})
            if not 0 < length <= MAX_REQUEST_BYTES:
                return self.reply(413, {"error": f"body of {length} bytes; allowed 1..{MAX_REQUEST_BYTES}"})
            body = self.rfile.read(length)
            try:
                images, prompts = decode_request(body)
            except BadRequest as exc:
                return self.reply(400, {"error": str(exc)})
            try:
                rewards, answers = scorer.score(images, prompts)
            except Exception as exc:  # a scoring failure is the server's fault: 500, and the server stays up
                return self.reply(500, {"error": f"{type(exc).__name__}: {exc}"})
            self.reply(200, {"rewards": rewards, "answers": answers})

        def log_message(self, format, *args):  # one line per request on stderr, without reverse DNS
            sys.stderr.write(f"serve-reward: {self.address_string()} {format % args}\n")

    return Handler


def serve(scorer: AlignmentScorer, host: str, port: int) -> None:
    server = ThreadingHTTPServer((host, port), make_handler(scorer))
    print(f"serve-reward: alignment ({scorer.vlm_id} + BERTScore {scorer.scorer_id} layer "
          f"{scorer.bertscore.layer}) on http://{host}:{server.server_port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
