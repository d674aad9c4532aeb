"""Stage-schedule and H2O rows for ``benchmarks.methods``: name -> (experiment, overrides).

``fastkv`` and ``prompt_guided`` now select at the prompt's end, stage by stage (``propagation.schedule:
stage``); ``schedule=chunk`` rows are the per-chunk ablation (today's behaviour before the stage schedule).
The h2o rows separate the two reasons its keep-0.5 budget loses the answer (``docs/propagation.md``, "H2O").
"""

from __future__ import annotations

FP16_STORE = ["quantizer=uniform", "quantizer.key_bits=16", "quantizer.value_bits=16", "quantizer.pre_rope=false"]
ROWS: dict[str, tuple[str, list[str]]] = {
    "fastkv, tsp_rate=0.4": ("fastkv", ["propagation.tsp_rate=0.4"]),
    "fastkv, schedule=chunk": ("fastkv", ["propagation.schedule=chunk", "compressor.precision.budget_at=stream",
                                          "quantizer=none"]),
    "prompt_guided, question=end, schedule=chunk": ("prompt_guided", ["compressor.question=end",
                                                                      "propagation.schedule=chunk"]),
    "h2o, normalize=mean": ("h2o", ["scorer.normalize=mean"]),
    "h2o, budget_at=end": ("h2o", ["compressor.precision.budget_at=end", *FP16_STORE]),
    "h2o, normalize=mean, budget_at=end": ("h2o", ["scorer.normalize=mean", "compressor.precision.budget_at=end",
                                                    *FP16_STORE]),
}
