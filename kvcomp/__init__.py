"""kvcomp: config-driven experiments for real-time prefill KV-cache compression."""

__version__ = "0.1.0"
