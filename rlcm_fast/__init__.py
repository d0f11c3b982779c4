"""rlcm-fast: reinforcement learning for latent consistency models (RLCM), made fast."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The public sampler API, imported on first use so that `import rlcm_fast` (and the CLI's startup)
    # does not pay for importing diffusers.
    if name in ("FastLCMSampler", "FastSamplerOutput"):
        from . import fast_sampler

        return getattr(fast_sampler, name)
    raise AttributeError(f"module 'rlcm_fast' has no attribute {name!r}")
