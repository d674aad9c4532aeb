"""Engine: a loaded model + tokenizer + compressor that turns prompt ids into text and perf numbers."""

from __future__ import annotations

from typing import Any

import torch

from kvcomp.generation import Generation, greedy_generate

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")


def stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids from the tokenizer, the generation config and the usual chat end tokens."""
    ids: set[int] = set()
    for v in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in STOP_TOKENS if t in vocab)
    return ids


class Engine:
    """Runs one prompt at a time through ``compressor`` (greedy decoding)."""

    def __init__(self, model: Any, tokenizer: Any, compressor: Any) -> None:
        self.model, self.tokenizer, self.compressor = model, tokenizer, compressor
        self.device = next(model.parameters()).device
        self.stop_ids = stop_ids(model, tokenizer)

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, question_ids: list[int] | None = None,
        extra_stop_ids: list[int] | None = None, teacher_ids: list[int] | None = None,
    ) -> tuple[str, Generation]:
        """Greedy text after the prompt. ``extra_stop_ids`` end generation too, but only from the second new
        token on (as LongBench's ``min_length=prompt+1``: the first token is never a stop token then).
        ``teacher_ids``: also teacher-force them after the prompt (``Generation.forced``, see fidelity)."""
        ids = torch.tensor([prompt_ids], device=self.device)
        stops = self.stop_ids | set(extra_stop_ids or ())
        q = torch.tensor([question_ids], device=self.device) if question_ids else None
        with self.compressor.session(self.model, q) as s:
            gen = greedy_generate(s, ids, max_new_tokens, stops, min_new_tokens=1 if extra_stop_ids else 0,
                                  teacher_ids=teacher_ids)
        toks = gen.tokens[:-1] if gen.tokens and gen.tokens[-1] in stops else gen.tokens
        return self.tokenizer.decode(toks, skip_special_tokens=True), gen

    def teacher_forced(self, prompt_ids: list[int], target_ids: list[int], question_ids: list[int] | None = None
                       ) -> tuple[torch.Tensor, Generation]:
        """Prefill ``prompt_ids`` through the compressor (timed), then teacher-force ``target_ids`` as decode
        steps; returns their log-probs [m, V] and the prefill's Generation (no generated tokens)."""
        from kvcomp.fidelity import teacher_force
        from kvcomp.profiler import MemoryProfiler, Timer

        ids = torch.tensor([prompt_ids], device=self.device)
        q = torch.tensor([question_ids], device=self.device) if question_ids else None
        with self.compressor.session(self.model, q) as s:
            with MemoryProfiler(device=self.device) as prof, Timer(self.device) as t:
                last = s.prefill(ids)
            stats = s.stats()
            logp = teacher_force(self.model, s.cache, last, target_ids)
        return logp, Generation([], len(prompt_ids), t.s, 0.0, prof.result, stats)

    @staticmethod
    def perf_record(gen: Generation) -> dict[str, Any]:
        """Per-sample performance and cache numbers for predictions.jsonl."""
        c = gen.cache
        rec = {
            "ttft_s": gen.ttft_s,
            "decode_s": gen.decode_s,
            "new_tokens": len(gen.tokens),
            "tokens_per_s": gen.tokens_per_s,
            **gen.memory,
        }
        for k in ("kv_bytes", "kv_bytes_fp16", "compression_ratio", "memory_savings", "avg_key_bits",
                  "avg_value_bits", "outlier_ratio", "tokens_held", "tokens_dropped", "compression_ratio_key",
                  "compression_ratio_value", "sink_tokens"):
            rec[k] = c.get(k)
        rec["per_layer"] = c.get("per_layer", [])
        return rec
