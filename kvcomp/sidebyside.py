"""The table a ``compare_baseline=true`` run ends with: the method next to the full cache, same prompts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

MIB = 2**20


def method_label(cfg: Mapping[str, Any]) -> str:
    """'kvquant_stream', 'prompt_guided+uniform', ... from the composed config's component names."""
    names = [str((cfg.get(g) or {}).get("name", "none")) for g in ("scorer", "quantizer", "propagation")]
    return "+".join(n for n in names if n != "none") or str(cfg.get("exp_name", "this run"))


def side_by_side(m: Mapping[str, Any], label: str = "this run") -> str:
    """Rows: score, KV MiB held, x fewer bytes than fp16, memory saved, TTFT, peak RSS during prefill.

    ``m`` is a run's metrics with the ``baseline_*`` numbers of ``compare_baseline=true``; a number a
    run did not measure is shown as '-'."""
    fp16 = m.get("kv_bytes_fp16")
    base_fp16 = m.get("baseline_kv_bytes_fp16", fp16)  # the same prompts: the same fp16 reference

    def ratio(kv: Any, ref: Any) -> float | None:
        return ref / kv if kv and ref else None

    def saved(kv: Any, ref: Any) -> float | None:
        return 1 - kv / ref if kv and ref else None

    rows: list[tuple[str, Any, Any, Callable[[float], str]]] = [
        (f"score (0-100, n={m.get('n_samples', '?')})", m.get("score"), m.get("baseline_score"), "{:.1f}".format),
        ("KV cache held (MiB)", _div(m.get("kv_bytes")), _div(m.get("baseline_kv_bytes")), "{:.2f}".format),
        ("x fewer bytes than fp16", ratio(m.get("kv_bytes"), fp16), ratio(m.get("baseline_kv_bytes"), base_fp16),
         "{:.2f}x".format),
        ("memory_savings (vs fp16)", saved(m.get("kv_bytes"), fp16), saved(m.get("baseline_kv_bytes"), base_fp16),
         "{:.2f}".format),
        ("TTFT (s, mean)", m.get("ttft_s"), m.get("baseline_ttft_s"), "{:.2f}".format),
        ("peak RSS in prefill (MiB)", _div(m.get("peak_rss_bytes")), _div(m.get("baseline_peak_rss_bytes")),
         "{:.0f}".format),
    ]
    width = max(len(label), 10)
    lines = [f"{'':<26} {label:>{width}}   {'full cache':>10}"]
    for name, a, b, fmt in rows:
        lines.append(f"{name:<26} {_cell(a, fmt):>{width}}   {_cell(b, fmt):>10}")
    lines.append("(KV bytes: what the cache holds after the answer; RSS: the whole process, weights included)")
    return "\n".join(lines)


def _div(x: Any) -> float | None:
    return x / MIB if isinstance(x, int | float) else None


def _cell(x: Any, fmt: Callable[[float], str]) -> str:
    return fmt(x) if isinstance(x, int | float) else "-"
