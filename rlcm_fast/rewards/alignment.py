"""The trainer's side of the prompt-image alignment reward: a client of `rlcm-fast serve-reward`.

Images go as base64 JPEG (quality 95, Pillow) in JSON batches to POST {url}/score (protocol in
alignment_server.py). Connection errors, timeouts, replies cut short and 5xx replies are retried with
exponential backoff; a 4xx reply is a bug in the request and fails at once; when the server stays down the
RewardError names the URL. The timeout bounds each attempt whole, from connecting to the reply's last byte.
A redirect fails at once (never followed: the rewards would come from wherever it points), and so does a
reply over MAX_REPLY_BYTES. The request goes straight to the server (http.client: no proxy, no redirect).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import urllib.parse
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..config_checks import MAX_REWARD_TIMEOUT, url_problem, without_credentials
from ..faults import first_line
from .base import RewardError, check_reward_inputs, reward_cancelled
from .jpeg import to_uint8_images

DEFAULT_SERVER = "http://127.0.0.1:8060"

# The most bytes of a reply read, body or error. A batch's reply is 16 rewards and 16 answers of at most
# --max-new-tokens tokens (48 by default): a few KB, and still well under 1 MiB at 4096 tokens of escaped
# non-ASCII text; an error body is one message. Beyond it a server sending an endless body grew memory by
# 600 MiB/s; 8 MiB is far above any real reply and harmless to hold.
MAX_REPLY_BYTES = 8 * 2**20


class ReplyTooLarge(Exception):
    """A reply over MAX_REPLY_BYTES: a broken or hostile server, not worth retrying."""


def _check_client_settings(**settings) -> None:
    """A client made in code checks what the trainer's config checks for its own: batch_size 0 was range()'s
    traceback at the first batch, retries -1 "unreachable after 0 attempts ()", a timeout of 0 never connected."""
    for name, (least, most) in (("retries", (0, None)), ("batch_size", (1, None)), ("jpeg_quality", (1, 100))):
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < least or (most and value > most):
            allowed = f"in {least}..{most}" if most else f">= {least}"
            raise RewardError(f"AlignmentClient {name}={value!r} is invalid: it must be an int {allowed}")
    for name in ("timeout", "backoff", "max_backoff"):  # a wait of 0 s between attempts, not an attempt of 0 s
        value, lower = settings[name], "(0" if name == "timeout" else "[0"
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_REWARD_TIMEOUT
                or (value == 0 and name == "timeout")):
            raise RewardError(f"AlignmentClient {name}={value!r} is invalid: it must be a number of seconds in "
                              f"{lower}, {MAX_REWARD_TIMEOUT:g}]")


class AlignmentClient:
    def __init__(self, url: str = DEFAULT_SERVER, timeout: float = 120.0, retries: int = 6, backoff: float = 1.0,
                 max_backoff: float = 30.0, batch_size: int = 16, jpeg_quality: int = 95):
        if problem := url_problem(url):  # credentials are never echoed: the message shows the URL without them
            raise RewardError(f"reward_server {without_credentials(url)!r} is invalid ({problem}): "
                              "expected http://host:port")
        _check_client_settings(timeout=timeout, retries=retries, backoff=backoff, max_backoff=max_backoff,
                               batch_size=batch_size, jpeg_quality=jpeg_quality)
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.batch_size, self.jpeg_quality = batch_size, jpeg_quality

    def health_problem(self, timeout: float = 3.0) -> str | None:
        """What is wrong with the server as GET /health finds it within `timeout` s, as words to follow its URL, or
        None. For a warning only: a server still loading its models refuses connections, and scoring retries it."""
        connection, path = self._connection(timeout)
        try:
            connection.request("GET", f"{path}/health")
            status = connection.getresponse().status
        except (OSError, http.client.HTTPException) as exc:
            return (f"does not answer ({_connection_error(exc)}); unless it is still loading its models, "
                    f"start it with `{self.serve_command()}`: each batch's scoring retries it for about a minute")
        finally:
            connection.close()
        return None if status == 200 else f"answers GET /health with {status}, not 200: is it the reward server?"

    def serve_command(self) -> str:
        """The `rlcm-fast serve-reward` command that serves this client's URL on this machine."""
        parts = urllib.parse.urlsplit(self.url)
        default = urllib.parse.urlsplit(DEFAULT_SERVER)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        command = "rlcm-fast serve-reward --reward alignment"
        if parts.hostname != default.hostname:
            command += f" --host {parts.hostname}"
        if port != default.port:
            command += f" --port {port}"
        return command

    def _connection(self, timeout: float) -> tuple[http.client.HTTPConnection, str]:
        """An unopened connection to the server (no proxy), and the URL's path that its endpoints follow."""
        parts = urllib.parse.urlsplit(self.url)
        connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        return connection_type(parts.hostname, parts.port, timeout=timeout), parts.path

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
            try:
                reply, data = self._exchange(payload)
            except TimeoutError:
                last = f"timed out: no complete reply within reward_timeout={self.timeout:g} s"
                continue
            except ReplyTooLarge as exc:
                raise RewardError(f"reward server {self.url} sent a reply over {MAX_REPLY_BYTES} bytes ({exc}); "
                                  "expected a JSON object of rewards") from None
            except (OSError, http.client.HTTPException) as exc:
                # refused, reset, or the server died halfway through its reply (IncompleteRead)
                last = _connection_error(exc)
                continue
            status = reply.status
            if 300 <= status < 400:
                raise RewardError(f"reward server {self.url} answered {status} redirecting to "
                                  f"{reply.getheader('Location')!r:.200}; redirects are not followed: set "
                                  "reward_server to the server's own address")
            if status >= 500:
                last = f"HTTP {status}: {_error_message(reply, data)}"
                continue
            if not 200 <= status < 300:
                raise RewardError(f"reward server {self.url} refused the request ({status}): "
                                  f"{_error_message(reply, data)}")
            try:
                body = json.loads(data)
            # ValueError: not JSON, or not UTF-8 (UnicodeDecodeError); RecursionError: nested too deep to parse
            except (ValueError, RecursionError):
                raise RewardError(f"reward server {self.url} sent a reply that is not JSON") from None
            rewards = body.get("rewards") if isinstance(body, dict) else None
            if not isinstance(rewards, list) or len(rewards) != count \
                    or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rewards):
                raise RewardError(f"reward server {self.url} sent {body!r:.200}, expected {count} numbers as rewards")
            try:
                return [float(r) for r in rewards]
            except OverflowError:  # JSON integers have no size limit
                raise RewardError(f"reward server {self.url} sent a reward beyond float64's range") from None
        raise RewardError(
            f"reward server {self.url} is unreachable after {self.retries + 1} attempts ({last}); "
            f"start it with `{self.serve_command()}` or set reward_server"
        )

    def _exchange(self, payload: bytes) -> tuple[http.client.HTTPResponse, bytes]:
        """One POST /score: the reply and its body (at most MAX_REPLY_BYTES); TimeoutError when it is not
        over within self.timeout. The socket timeout bounds each read only, so a server sending a byte a second
        never timed out: at the deadline a timer shuts the connection, which ends whatever read is waiting."""
        connection, path = self._connection(self.timeout)
        expired = threading.Event()
        connected: list[socket.socket] = []  # the socket itself: a reply that closes the connection (Connection:
        # close, or no length) leaves connection.sock None while its body is still read from this socket

        def expire():
            expired.set()
            for sock in connected:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed
                    pass

        deadline = threading.Timer(self.timeout, expire)
        deadline.daemon = True
        deadline.start()
        try:
            connection.connect()
            connected.append(connection.sock)
            if expired.is_set():  # expired while connecting, before the socket could be shut
                raise TimeoutError
            connection.request("POST", f"{path}/score", body=payload,
                               headers={"Content-Type": "application/json"})
            reply = connection.getresponse()
            data = _read_capped(reply)
        except (OSError, http.client.HTTPException):
            if expired.is_set():  # what the shut connection raised
                raise TimeoutError from None
            raise
        finally:
            deadline.cancel()
            connection.close()
        if expired.is_set():  # a reply without Content-Length reads as ended where the connection was shut
            raise TimeoutError
        return reply, data

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> np.ndarray:
        check_reward_inputs(images, prompts)
        pixels = to_uint8_images(images)
        rewards: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = list(prompts[start : start + self.batch_size])
            payload = json.dumps({"images": [self._encode(p) for p in pixels[start : start + len(batch)]],
                                  "prompts": batch}).encode()
            rewards.extend(self._post(payload, len(batch)))
        return np.asarray(rewards, dtype=np.float64)


def _read_capped(reply: http.client.HTTPResponse) -> bytes:
    """The reply's body, or ReplyTooLarge past MAX_REPLY_BYTES (read no further); IncompleteRead when cut short."""
    if reply.length is not None:  # Content-Length: known before reading
        if reply.length > MAX_REPLY_BYTES:
            raise ReplyTooLarge(f"HTTP {reply.status}, Content-Length {reply.length}")
        return reply.read()
    data = reply.read(MAX_REPLY_BYTES + 1)  # chunked or until the server closes
    if len(data) > MAX_REPLY_BYTES:
        raise ReplyTooLarge(f"HTTP {reply.status}, without Content-Length")
    return data


def _connection_error(exc: BaseException, limit: int = 200) -> str:
    """A failed exchange's error for a one-line message. Something other than an HTTP server on the port makes
    http.client raise BadStatusLine holding the raw line it read: CR LF included, up to 64 KiB."""
    text = first_line(exc)
    return text if len(text) <= limit else text[:limit] + "..."


def _error_message(reply: http.client.HTTPResponse, data: bytes) -> str:
    """The server's {"error": ...} on one line (a 500 carries the server's exception, which may span lines)."""
    try:
        return " ".join(str(json.loads(data).get("error", "")).split())[:300]
    except (ValueError, AttributeError, RecursionError):  # not the server's {"error": ...}: e.g. a proxy's page
        return reply.reason or ""
