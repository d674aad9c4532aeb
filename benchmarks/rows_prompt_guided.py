"""prompt_guided variants for ``benchmarks.methods``: name -> (experiment, overrides), one variant each.

Question timing (``compressor.question``), tier normalisation (``compressor.precision.normalize`` with the
scorer's matching ``term_scale``) and the propagation variants (``propagation.budget``, ``propagation=none``).
The defaults are ``question: oracle``, ``normalize: global`` + ``term_scale: absolute``, ``budget: prompt``
(the plain ``prompt_guided`` row). Each row's bytes differ; an equal-bytes comparison calibrates snapkv@eq /
h2o@eq against the row in question (``compressor.question=end`` for the issue's goal).
"""

from __future__ import annotations

PG = "prompt_guided"
#: question=end at >= 4.5x: no propagation, tiers 4/4/drop (theta_m 0.3), drops at the end
END_DROPS = (PG, ["compressor.question=end", "propagation=none", "compressor.precision.bits=[4,4,2]",
                  "compressor.precision.drop_low=true"])
ROWS: dict[str, tuple[str, list[str]]] = {
    "prompt_guided, question=end": (PG, ["compressor.question=end"]),
    "prompt_guided, question=none": (PG, ["compressor.question=none"]),
    "prompt_guided, question=end, propagation=none": (PG, ["compressor.question=end", "propagation=none"]),
    "prompt_guided, normalize=minmax (per chunk)": (PG, ["compressor.precision.normalize=minmax",
                                                          "scorer.term_scale=chunk"]),
    "prompt_guided, normalize=rank (per chunk)": (PG, ["compressor.precision.normalize=rank",
                                                        "scorer.term_scale=chunk"]),
    "prompt_guided, question=end, normalize=minmax": (PG, ["compressor.question=end",
                                                            "compressor.precision.normalize=minmax",
                                                            "scorer.term_scale=chunk"]),
    "prompt_guided, pool_kernel=21": (PG, ["scorer.pool_kernel=21"]),
    "prompt_guided, question=end, pool_kernel=21": (PG, ["compressor.question=end", "scorer.pool_kernel=21"]),
    "prompt_guided, propagation budget=chunk": (PG, ["propagation.budget=chunk"]),
    # the question's attention left out of the first half of the layers: the selections after layers 0 and 9
    # rest on b_pos and r (at layer 0 that attention ranked the answer's tokens at the bottom,
    # docs/propagation_quality.md)
    "prompt_guided, question=end, attention_from=0.5": (PG, ["compressor.question=end",
                                                             "scorer.attention_from=0.5"]),
    "prompt_guided, question=end, propagation budget=chunk": (PG, ["compressor.question=end",
                                                                    "propagation.budget=chunk"]),
    # the question-aware end pass instead of question-blind propagation: every token reaches every layer and
    # is held at 4 bits until the question arrives; the end pass then drops the 30 % it scores lowest per band
    "prompt_guided, question=end, no propagation, 4-bit, end drops": END_DROPS,
    "prompt_guided, no propagation, 4-bit, drops (oracle)": (PG, END_DROPS[1][1:]),
}
