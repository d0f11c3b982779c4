"""Models named by hub id on a machine that cannot reach the hub (a cluster's compute nodes, CI).

The hub client asks the hub for each file it loads, even a cached one, and on a connection error retries five
times with backoff (1+2+4+8+8 s) before it falls back to its cache: about 23 s and ten lines of warnings per
file, a minute for a CLIP reward, minutes for a pipeline. One short probe of the hub's endpoint decides
instead: when it gets no answer, every hub id is loaded with `local_files_only=True` (the cache, at once), and
one line says so. Where HF_HUB_OFFLINE is set the client asks the hub nothing; the hub is not probed then, nor for
a local folder.
"""

from __future__ import annotations

import functools
import os
import sys

from .faults import one_line

PROBE_TIMEOUT_S = 5.0  # a reachable hub answers a HEAD well within it; an unreachable one costs at most this


def _no_answer(error: BaseException) -> bool:
    """A transport failure (no HTTP answer): httpx's TransportError family, or an OSError (requests', sockets')."""
    return isinstance(error, OSError) or any(cls.__name__ == "TransportError" for cls in type(error).__mro__)


@functools.lru_cache(maxsize=None)
def hub_unreachable_why() -> str | None:
    """Why the hub's endpoint gave no answer to one HEAD request (the error, one line), or None when it answered
    (any HTTP status counts: the hub client handles those itself). Asked once per process."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - only transport failures are kept, anything else is re-raised
        if not _no_answer(error):
            raise
        why = one_line(error, 160)
        if os.environ.get("RANK", "0") == "0":  # one line per run, not one per training process
            print(f"rlcm-fast: the hub {constants.ENDPOINT} cannot be reached ({why}): models given by hub id are "
                  "read from this machine's hub cache", file=sys.stderr, flush=True)
        return why
    return None


def reads_cache_only(model_id: str) -> bool:
    """Whether `model_id` is a hub id to be read from this machine's hub cache alone: in offline mode
    (HF_HUB_OFFLINE, as the hub client read it), or where the hub gives no answer. The hub is probed only here."""
    from huggingface_hub import constants

    return not os.path.exists(model_id) and (constants.HF_HUB_OFFLINE or hub_unreachable_why() is not None)


def hub_load_options(model_id: str, auto_model: bool = False) -> dict:
    """Keyword arguments for a from_pretrained of `model_id`: `local_files_only=True` where it `reads_cache_only`
    (the cache at once, without the client's retries), else none. `auto_model`: for transformers' AutoModel*
    classes, whose look for a PEFT adapter does not follow local_files_only (transformers 5.25)."""
    if not reads_cache_only(model_id):
        return {}
    return {"local_files_only": True, **({"adapter_kwargs": {"local_files_only": True}} if auto_model else {})}
