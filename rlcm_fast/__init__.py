"""rlcm-fast: reinforcement learning for latent consistency models (RLCM), made fast."""

import logging

__version__ = "0.1.0"


class _NoTorchvisionFallbackNotice(logging.Filter):
    """Drops one kind of notice: transformers 5 warns at import time that an image processor falls back to
    its PIL version when torchvision is missing (`CLIPImageProcessor`, and in 5.25 `SiglipImageProcessor`
    too). diffusers' pipelines import them, so every run printed the notices, yet nothing here uses them
    (the pipelines' feature_extractor is None; rewards preprocess as tensors)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())


# The public sampler API, imported on first use so that `import rlcm_fast` (and the CLI's startup) does not
# pay for importing diffusers; listed for `from rlcm_fast import *`, dir() and tab completion.
__all__ = ["FastLCMSampler", "FastSamplerOutput"]


def __getattr__(name: str):
    if name in __all__:
        from . import fast_sampler

        return getattr(fast_sampler, name)
    raise AttributeError(f"module 'rlcm_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
