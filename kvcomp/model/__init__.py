"""Model loading: embedded SmolLM2 (GGUF -> safetensors cache), tiny random LLaMA, hub or local paths."""

from kvcomp.model.loader import ModelConfig, load_model, resolve_device, resolve_dtype

__all__ = ["ModelConfig", "load_model", "resolve_device", "resolve_dtype"]
