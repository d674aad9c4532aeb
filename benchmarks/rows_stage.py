"""Stage-schedule and H2O rows for ``benchmarks.methods``: name -> (experiment, overrides).

``fastkv`` and ``prompt_guided`` now select at the prompt's end, stage by stage (``propagation.schedule:
stage``); ``schedule=chunk`` rows are the per-chunk ablation (the behaviour before the stage schedule, with the
earlier fastkv preset). ``fastkv`` itself runs the official code's settings; the tuned row is named.
The h2o rows separate the two reasons its keep-0.5 budget loses the answer (``docs/h2o.md``).
"""

from __future__ import annotations

FP16_STORE = ["quantizer=uniform", "quantizer.key_bits=16", "quantizer.value_bits=16", "quantizer.pre_rope=false"]
#: kvcomp's earlier fastkv preset (before the official code's settings were checked, docs/propagation.md): TSP
#: after layer 15 of 30, average pooling, keep 0.5 of what each layer holds, a 32-query budget window, 4 sinks
FASTKV_EARLIER = ["propagation.tsp_layer=15", "propagation.pool=avg", "compressor.precision.keep_ratio=0.5",
                  "compressor.precision.keep_of=held", "scorer.window=32", "compressor.precision.protect_sinks=4"]
FASTKV_CHUNK = [*FASTKV_EARLIER, "propagation.schedule=chunk", "compressor.precision.budget_at=stream"]
ROWS: dict[str, tuple[str, list[str]]] = {
    "prompt_guided_end": ("prompt_guided_end", []),
    "fastkv, tsp_rate=0.4": ("fastkv", ["propagation.tsp_rate=0.4"]),
    "fastkv tuned (tsp_rate=0.4, earlier preset)": ("fastkv", [*FASTKV_EARLIER, "propagation.tsp_rate=0.4"]),
    "fastkv, earlier preset": ("fastkv", FASTKV_EARLIER),
    # FastKV's two cuts apart: its 0.2 propagation with no KV budget, and its 0.1 budget with no propagation
    "fastkv, keep_ratio=1.0 (propagation alone)": ("fastkv", ["compressor.precision.keep_ratio=1.0"]),
    "fastkv, propagation=none (budget alone)": ("fastkv", ["propagation=none"]),
    # one token set per layer (kvcomp's cache) chosen by each KV head's own score instead of the heads' mean
    "fastkv, heads=max": ("fastkv", ["scorer.heads=max"]),
    "fastkv, heads=rank": ("fastkv", ["scorer.heads=rank"]),
    "fastkv, scorer.window=32": ("fastkv", ["scorer.window=32"]),
    "fastkv, scorer.window=4": ("fastkv", ["scorer.window=4"]),
    # a budget equal to the carried share: 0.2 x the prompt in every layer (past the TSP layer: all it carries)
    "fastkv, keep_ratio=0.2": ("fastkv", ["compressor.precision.keep_ratio=0.2"]),
    "fastkv, keep_ratio=0.2, tsp heads=max": ("fastkv", ["compressor.precision.keep_ratio=0.2",
                                                         "propagation.heads=max"]),
    "fastkv, tsp heads=max": ("fastkv", ["propagation.heads=max"]),
    "fastkv, tsp heads=max, heads=max": ("fastkv", ["propagation.heads=max", "scorer.heads=max"]),
    "fastkv, schedule=chunk": ("fastkv", FASTKV_CHUNK),
    "prompt_guided, question=end, schedule=chunk": ("prompt_guided", ["compressor.question=end",
                                                                      "propagation.schedule=chunk"]),
    "h2o, normalize=mean": ("h2o", ["scorer.normalize=mean"]),
    "h2o, budget_at=end": ("h2o", ["compressor.precision.budget_at=end", *FP16_STORE]),
    "h2o, normalize=mean, budget_at=end": ("h2o", ["scorer.normalize=mean", "compressor.precision.budget_at=end",
                                                    *FP16_STORE]),
}
