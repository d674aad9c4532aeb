"""Report of the peer benchmark: ``peers.md`` (header, table, checks, goals), ``peers.csv`` and ``peers.png``
(task score and PPL vs kv_bytes, one Pareto front per system)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from benchmarks.common import table

COLS = [("name", "configuration", ""), ("env", "env", ""), ("length", "tokens", ""),
        ("keep", "kvcomp keep", ".4f"), ("kv_mib", "kv MiB held", ".2f"), ("score_ci", "suite score ± 95 % (n)", ""),
        ("ppl", "PPL", ".3f"),
        ("kv_ppl_mib", "kv MiB (PPL ctx)", ".2f"), ("rss_mib", "peak prefill RSS MiB", ".0f"),
        ("ttft_s", "TTFT s", ".2f")]
CSV_KEYS = ["name", "system", "env", "length", "score", "score_passkey", "score_needle", "score_kv_retrieval",
            "score_passage_retrieval", "score_passage_count", "kv_bytes", "ppl", "kv_bytes_ppl", "peak_rss_bytes",
            "ttft_s", "keep", "error"]
MARKERS = {"full": "*", "kvpress": "o", "kvpress+quant": "s", "hf-quantized": "^", "kvcomp": "D"}


def pareto(points: list[tuple[float, float]], higher_better: bool = True) -> list[tuple[float, float]]:
    """Points not dominated by another with fewer-or-equal bytes and a better-or-equal value, by bytes."""
    out: list[tuple[float, float]] = []
    best = None
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_better else p[1])):
        if best is None or (y > best if higher_better else y < best):
            out.append((x, y))
            best = y
    return out


def identity_check(rows: list[dict[str, Any]]) -> str:
    """Do the two full-cache rows (one per environment) give identical predicted tokens on every sample?"""
    full = {r["env"]: r for r in rows if r.get("system") == "full" and "predictions" in r}
    lines = []
    for length in sorted({r["length"] for r in full.values()}):
        a = next((r for r in rows if r.get("system") == "full" and r["env"] == "peers" and r["length"] == length), None)
        b = next((r for r in rows if r.get("system") == "full" and r["env"] == "main" and r["length"] == length), None)
        if a is None or b is None:
            continue
        same = [k for k in a["predictions"] if a["predictions"][k] == b["predictions"].get(k)]
        n = len(a["predictions"])
        ok = "identical" if len(same) == n else "DIFFERENT"
        lines.append(f"- full cache, {length} tokens: predictions {ok} in both environments ({len(same)}/{n} "
                     f"samples; transformers {a['versions'].get('transformers')} vs "
                     f"{b['versions'].get('transformers')}); PPL {a['ppl']} vs {b['ppl']}")
    return "\n".join(lines) or "- full-cache rows missing: no identity check"


def equal_bytes_verdicts(rows: list[dict[str, Any]]) -> str:
    """Per length, every kvcomp row against every kvpress row holding the same kv_bytes (±5 %): the paired
    score difference over the same samples with its 95 % bootstrap interval, and better / worse /
    indistinguishable (the interval excludes 0 or not)."""
    from kvcomp.stats import paired

    ok = [r for r in rows if "error" not in r and r.get("sample_scores")]
    out = []
    for length in sorted({r["length"] for r in ok}):
        at = [r for r in ok if r["length"] == length]
        for c in (r for r in at if r["system"] == "kvcomp"):
            for p in (r for r in at if r["system"].startswith("kvpress")):
                if abs(c["kv_bytes"] / p["kv_bytes"] - 1) > 0.05:
                    continue
                ids = [i for i in c["sample_scores"] if i in p["sample_scores"]]
                d = paired([c["sample_scores"][i] for i in ids], [p["sample_scores"][i] for i in ids], scale=100.0)
                word = ("indistinguishable" if not d["significant"] else "better" if d["mean"] > 0 else "worse")
                out.append(f"- {length}: {c['name']} − {p['name']} = {d['mean']:+.1f} [{d['low']:+.1f}, "
                           f"{d['high']:+.1f}] points (n={d['n']}): kvcomp {word}")
    return "\n".join(out) or "- no kvcomp row within 5 % of a kvpress row's kv_bytes"


def fewer_bytes_verdicts(rows: list[dict[str, Any]]) -> str:
    """Per length, every kvcomp row holding more than 5 % fewer kv_bytes than a group of presses at one ratio,
    against the best-scoring press of that group: the paired score difference with its 95 % bootstrap interval
    (a fixed-ratio method such as a 4-bit quantizer sets its own bytes, so it rarely lands at a press's)."""
    from kvcomp.stats import paired

    ok = [r for r in rows if "error" not in r and r.get("sample_scores")]
    out = []
    for length in sorted({r["length"] for r in ok}):
        at = [r for r in ok if r["length"] == length]
        groups: dict[float, list[dict[str, Any]]] = {}
        for p in (r for r in at if r["system"].startswith("kvpress")):
            groups.setdefault(round(p["kv_bytes"] / 2**20, 1), []).append(p)
        for c in (r for r in at if r["system"] == "kvcomp"):
            for mib, group in sorted(groups.items()):
                p = max(group, key=lambda r: r["score"])
                if c["kv_bytes"] >= 0.95 * p["kv_bytes"]:
                    continue
                ids = [i for i in c["sample_scores"] if i in p["sample_scores"]]
                d = paired([c["sample_scores"][i] for i in ids], [p["sample_scores"][i] for i in ids], scale=100.0)
                word = ("indistinguishable" if not d["significant"] else "better" if d["mean"] > 0 else "worse")
                out.append(f"- {length}: {c['name']} ({c['kv_bytes'] / p['kv_bytes']:.2f}x the bytes) vs the best "
                           f"press at {mib:g} MiB, {p['name']}: {d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}] "
                           f"points (n={d['n']}): kvcomp {word}")
    return "\n".join(out) or "- no kvcomp row holds more than 5 % fewer bytes than a kvpress row"


def goals(rows: list[dict[str, Any]]) -> str:
    ok = [r for r in rows if "error" not in r]
    out = []
    for length in sorted({r["length"] for r in ok}):
        at = [r for r in ok if r["length"] == length]
        kvc = [r for r in at if r["system"] == "kvcomp"]
        press = [r for r in at if r["system"].startswith("kvpress")]
        pairs = [(c, p) for c in kvc for p in press if abs(c["kv_bytes"] / p["kv_bytes"] - 1) <= 0.05]
        if pairs:
            c, p = max(pairs, key=lambda cp: (cp[0]["score"] - cp[1]["score"], cp[0]["score"]))
            met = all(max(x["score"] for x, y in pairs if y is q) >= q["score"] for _, q in pairs)
            out.append(f"- [{'x' if met else ' '}] {length}: at equal kv_bytes (±5 %), kvcomp >= best kvpress press: "
                       f"{len(pairs)} pair(s); e.g. {c['name']} {c['score']:.1f} vs {p['name']} {p['score']:.1f}")
        else:
            best_p = max(press, key=lambda r: r["score"], default=None)
            out.append(f"- [ ] {length}: no kvcomp row within 5 % of a kvpress row's kv_bytes; best kvpress "
                       + (f"{best_p['name']} {best_p['score']:.1f} at {best_p['kv_bytes'] / 2**20:.2f} MiB"
                          if best_p else "none"))
        chunked = [r for r in kvc if r.get("peak_rss_bytes") is not None]
        peers = [r for r in at if r["system"] != "kvcomp" and r.get("peak_rss_bytes") is not None]
        if chunked and peers:
            worst = max(chunked, key=lambda r: r["peak_rss_bytes"])
            low = min(peers, key=lambda r: r["peak_rss_bytes"])
            met = worst["peak_rss_bytes"] < low["peak_rss_bytes"]
            out.append(f"- [{'x' if met else ' '}] {length}: peak prefill RSS of every kvcomp row below every peer: "
                       f"max kvcomp {worst['peak_rss_bytes'] / 2**20:.0f} MiB ({worst['name']}) vs min peer "
                       f"{low['peak_rss_bytes'] / 2**20:.0f} MiB ({low['name']})")
    q4 = next((r for r in ok if r["name"] == "HF QuantizedCache quanto int4" and r.get("ppl")), None)
    k4 = next((r for r in ok if r["name"] == "kvcomp kvquant_stream" and r.get("ppl")), None)
    if q4 and k4:
        eq = abs(k4["ppl"] / q4["ppl"] - 1) <= 0.005
        fewer = k4["kv_bytes_ppl"] < q4["kv_bytes_ppl"]
        out.append(f"- [{'x' if eq and fewer else ' '}] kvcomp 4-bit (kvquant_stream) holds fewer bytes than HF "
                   f"QuantizedCache int4 at equal PPL (±0.5 %): {k4['kv_bytes_ppl'] / 2**20:.2f} vs "
                   f"{q4['kv_bytes_ppl'] / 2**20:.2f} MiB, PPL {k4['ppl']:.3f} vs {q4['ppl']:.3f} "
                   f"({100 * (k4['ppl'] / q4['ppl'] - 1):+.2f} %)")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    lengths = sorted({r["length"] for r in ok})
    fig, axes = plt.subplots(1, len(lengths) + 1, figsize=(5.5 * (len(lengths) + 1), 4.5), squeeze=False)
    panels = [(length, "score", True) for length in lengths] + [(lengths[0] if lengths else 0, "ppl", False)]
    for ax, (length, key, hi) in zip(axes[0], panels):
        xkey = "kv_bytes" if key == "score" else "kv_bytes_ppl"
        for system, marker in MARKERS.items():
            pts = [(r[xkey] / 2**20, r[key]) for r in ok if r["system"] == system and r["length"] == length
                   and r.get(key) is not None and r.get(xkey)]
            if not pts:
                continue
            line = ax.plot(*zip(*pts), marker, linestyle="none", alpha=0.6, label=system)[0]
            front = pareto(pts, hi)
            ax.plot(*zip(*front), "-", color=line.get_color(), alpha=0.9)
        ax.set_xscale("log")
        ax.set_xlabel("bytes the cache holds (MiB, log)")
        ax.set_ylabel("offline suite score" if key == "score" else "WikiText-2 PPL (lower is better)")
        ax.set_title(f"{length} tokens" if key == "score" else "perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict[str, Any]], out_dir: Path, head: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    from kvcomp.stats import fmt, interval

    for r in rows:
        if "error" not in r:
            r["kv_mib"], r["rss_mib"] = r["kv_bytes"] / 2**20, r["peak_rss_bytes"] / 2**20
            scores = list((r.get("sample_scores") or {}).values())
            r["score_ci"] = fmt(interval(scores, scale=100.0), ".1f") if scores else f"{r['score']:.1f}"
            r["kv_ppl_mib"] = r["kv_bytes_ppl"] / 2**20 if r.get("kv_bytes_ppl") else None
    versions = {f"{k} ({r['env']})": v for r in rows for k, v in r.get("versions", {}).items()}
    errors = "\n".join(f"- {r['name']}: {r['error']}" for r in rows if "error" in r)
    text = (head + "- packages: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + "\n"
            "- kv MiB held: sum of `nbytes` of every tensor the cache object holds after the prefill (quanto's "
            "packed tensors through their inner tensors); peak prefill RSS: kernel high-water mark above the RSS "
            "before the prefill, fresh process per row, glibc MALLOC_MMAP_THRESHOLD_=1 MiB in every row (large "
            "buffers return to the OS when freed); TTFT: prefill + first decode step. Decoding passes absolute "
            "position ids (as kvpress's pipeline does), so evicting caches keep their RoPE positions.\n\n"
            + table(rows, COLS) + "\n\nSame-prompt check:\n" + identity_check(rows)
            + "\n\nEqual bytes, paired over the same samples (95 % bootstrap interval of the score difference):\n"
            + equal_bytes_verdicts(rows) + "\n\nFewer bytes, paired against the best press at each press's bytes "
            "(95 % bootstrap interval):\n" + fewer_bytes_verdicts(rows)
            + "\n\nGoals (kvcomp vs the peers):\n" + goals(rows) + "\n"
            + (f"\nFailed rows:\n{errors}\n" if errors else ""))
    (out_dir / "peers.md").write_text(text)
    with (out_dir / "peers.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_KEYS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if any("error" not in r for r in rows):
        plot(rows, out_dir / "peers.png")
    print(text)
