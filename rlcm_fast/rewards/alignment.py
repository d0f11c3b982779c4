"""The trainer's side of the prompt-image alignment reward: a client of `rlcm-fast serve-reward`.

Images go as base64 JPEG (quality 95, Pillow) in JSON batches to POST {url}/score (protocol in
alignment_server.py). Connection errors, timeouts, replies cut short and 5xx replies are retried with
exponential backoff; a 4xx reply is a bug in the request and fails at once; when the server stays down the
RewardError names the URL.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import urllib.error
import urllib.request
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..config_checks import url_problem, without_credentials
from .base import RewardError, reward_cancelled
from .jpeg import to_uint8_images

DEFAULT_SERVER = "http://127.0.0.1:8060"


class AlignmentClient:
    def __init__(self, url: str = DEFAULT_SERVER, timeout: float = 120.0, retries: int = 6, backoff: float = 1.0,
                 max_backoff: float = 30.0, batch_size: int = 16, jpeg_quality: int = 95):
        if problem := url_problem(url):  # credentials are never echoed: the message shows the URL without them
            raise RewardError(f"reward_server {without_credentials(url)!r} is invalid ({problem}): "
                              "expected http://host:port")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.batch_size, self.jpeg_quality = batch_size, jpeg_quality

    def _encode(self, pixels: np.ndarray) -> str:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=self.jpeg_quality)
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def _post(self, payload: bytes, count: int) -> list[float]:
        last = ""
        for attempt in range(self.retries + 1):
            # The wait wakes at once when the run stops (AsyncReward.close): no one would read these rewards.
            if attempt and reward_cancelled(wait=min(self.backoff * 2 ** (attempt - 1), self.max_backoff)):
                raise RewardError(f"reward server {self.url}: retries abandoned ({last}): the run is stopping")
            request = urllib.request.Request(f"{self.url}/score", data=payload, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    body = json.loads(reply.read())
            except urllib.error.HTTPError as exc:
                message = _error_message(exc)
                if exc.code < 500:
                    raise RewardError(f"reward server {self.url} refused the request ({exc.code}): {message}") from None
                last = f"HTTP {exc.code}: {message}"
                continue
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                # refused, reset, timed out, or the server died halfway through its reply (IncompleteRead)
                last = str(getattr(exc, "reason", exc)) or type(exc).__name__
                continue
            except json.JSONDecodeError:
                raise RewardError(f"reward server {self.url} sent a reply that is not JSON") from None
            rewards = body.get("rewards") if isinstance(body, dict) else None
            if not isinstance(rewards, list) or len(rewards) != count \
                    or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rewards):
                raise RewardError(f"reward server {self.url} sent {body!r:.200}, expected {count} numbers as rewards")
            return rewards
        raise RewardError(
            f"reward server {self.url} is unreachable after {self.retries + 1} attempts ({last}); "
            f"start it with `rlcm-fast serve-reward --reward alignment` or set reward_server"
        )

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> np.ndarray:
        pixels = to_uint8_images(images)
        rewards: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = list(prompts[start : start + self.batch_size])
            payload = json.dumps({"images": [self._encode(p) for p in pixels[start : start + len(batch)]],
                                  "prompts": batch}).encode()
            rewards.extend(self._post(payload, len(batch)))
        return np.asarray(rewards, dtype=np.float64)


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(error.read()).get("error", ""))[:300]
    except (ValueError, AttributeError, OSError, http.client.HTTPException):
        return error.reason or ""
