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
    """Rows: score (with its 95 % interval and the paired difference when the run has them), KV MiB held,
    x fewer bytes than fp16, memory_savings, TTFT, peak RSS during prefill.

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
    cells = [(name, _cell(a, fmt), _cell(b, fmt)) for name, a, b, fmt in rows]
    ci, base_ci = (m.get("ci") or {}).get("score"), (m.get("baseline_ci") or {}).get("score")
    if ci or base_ci:
        cells.insert(1, ("  95 % interval", _interval(ci), _interval(base_ci)))
    diff = (m.get("diff_vs_baseline") or {}).get("score")
    if diff and diff.get("mean") is not None:
        verdict = "differs" if diff.get("significant") else "tie"
        cells.insert(2 if ci or base_ci else 1,
                     ("  minus full cache (paired)", f"{diff['mean']:+.1f} {_interval(diff)} {verdict}", ""))
    w1 = max(len(label), *(len(a) for _, a, _ in cells))
    w2 = max(len("full cache"), *(len(b) for _, _, b in cells))
    lines = [f"{'':<28} {label:>{w1}}   {'full cache':>{w2}}"]
    lines += [f"{name:<28} {a:>{w1}}   {b:>{w2}}" for name, a, b in cells]
    lines.append("(KV bytes: what the cache holds after the answer; RSS: the whole process, weights included)")
    return "\n".join(lines)


def _interval(iv: Mapping[str, Any] | None) -> str:
    if not iv or iv.get("low") is None:
        return "-"
    return f"[{iv['low']:.1f}, {iv['high']:.1f}]"


def _div(x: Any) -> float | None:
    return x / MIB if isinstance(x, int | float) else None


def _cell(x: Any, fmt: Callable[[float], str]) -> str:
    return fmt(x) if isinstance(x, int | float) else "-"
