"""rlcm-fast: reinforcement learning for latent consistency models (RLCM), made fast."""

__version__ = "0.1.0"
