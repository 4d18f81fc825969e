"""stella: reference implementation of STELLA (continual audio-video pre-training, ICML 2024)."""

__version__ = "0.1.0"
