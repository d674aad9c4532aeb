"""One layer of the compressed cache: packed history segments + a full-precision residual of recent tokens.

Inside a compressed run (``kernels/interface.py``) the model's attention reads this layer directly:
``update(k, v)`` (k post-RoPE, ``[B, H_kv, q, D]``) takes a view of the history and returns the new
tokens untouched; the attention function then calls ``attend(query, k, v, scale)``, which attends over
the packed history tile by tile plus the new tokens (causal, ``kernels/chunk.py``), scores them from the
same pass, and only then stores them: into the residual, flushing everything older than
``quantizer.residual_length`` into packed segments (prefill chunks), or one ``flush_group`` at a time
(decode). Used outside such a run, ``update`` returns ``materialize(k, v)`` (the dequantized history
followed by the new tokens) and stores at once; ``materialize`` is otherwise only the tests' oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import CacheLayerMixin

from kvcomp.cache.accounting import held_tensors, layer_stats, select_state_rows
from kvcomp.cache.arena import Arena
from kvcomp.cache.oracle import materialize, materialized_attention
from kvcomp.cache.storage import Stored
from kvcomp.kernels.chunk import History, chunk_attention, scope
from kvcomp.kernels.decode import decode_layer_cpu
from kvcomp.model.rope import Rope

if TYPE_CHECKING:
    from kvcomp.quantizer.base import Quantizer

#: policy(scores [T] (NaN = unscored), positions [T], prompt_len, layer_idx, n_layers)
#: -> token_bits [T] (0 drop, -1 default) or None
PrecisionPolicy = Callable[[torch.Tensor, torch.Tensor, int, int, int], "torch.Tensor | None"]


class CompressedLayer(CacheLayerMixin):
    """Cache layer holding bit-packed K/V segments, their int32 positions and the quantizer's state."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int, quantizer: Quantizer, rope: Rope | None, owner: Any) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.quantizer = quantizer
        self.rope = rope if quantizer.pre_rope else None
        self.owner = owner  # the CompressedCache (its ``run``: positions, guide, scores, bits per token)
        self.reset()

    # -- transformers CacheLayerMixin API ------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def reset(self) -> None:
        self.arena = Arena()  # the stored tokens: width arenas and pages (``arena.py``)
        self.res_k: torch.Tensor | None = None  # [B, H, R, D] (pre-RoPE when rope is set)
        self.res_v: torch.Tensor | None = None
        self.res_pos: torch.Tensor | None = None  # int32 [R]
        self.res_score: torch.Tensor | None = None  # float32 [R] importance (NaN = unscored)
        self.state: dict[str, Any] = self.quantizer.init_state()
        self.seen = 0  # absolute tokens processed (the sequence length the model sees)
        self.dropped = 0
        self.pending: tuple[History, torch.Tensor] | None = None
        self.is_initialized = False

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    @property
    def k_blocks(self) -> list[Stored]:
        """K of each arena slot (``Arena.segments``): a width arena's view, or a page's block."""
        return [k for k, _, _ in self.arena.segments()]

    @property
    def v_blocks(self) -> list[Stored]:
        return [v for _, v, _ in self.arena.segments()]

    @property
    def pos_blocks(self) -> list[torch.Tensor]:
        """int32 absolute positions of each slot's tokens."""
        return [p for _, _, p in self.arena.segments()]

    def held(self) -> int:
        """Tokens this layer holds (packed + residual); < seen when tokens were dropped."""
        return self.arena.held() + (0 if self.res_pos is None else int(self.res_pos.numel()))

    def held_positions(self) -> torch.Tensor:
        """Absolute positions (int32) of the held tokens, in the order ``materialize`` returns them."""
        pb = [*self.pos_blocks, *([] if self.res_pos is None else [self.res_pos])]
        return torch.cat(pb) if pb else torch.zeros(0, dtype=torch.int32)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """kv_offset = seen - held, so held history sits just before the queries: all of it visible,
        and the new tokens stay causal among themselves at their true positions."""
        held = self.held()
        return held + query_length, self.seen - held

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        positions = self.owner.run.take_positions(self.layer_idx, self.seen, q, key_states.device)
        if self.owner.run.deferred:  # the attention function reads the history, then stores (``attend``)
            self.pending = (self.history(), positions)
            return key_states, value_states
        keys, values = self.materialize(key_states, value_states)
        self._store(key_states, value_states, positions, None)
        return keys, values

    def history(self) -> History:
        """What this layer holds now, as a view that later stores leave unchanged."""
        segs = self.arena.segments()
        return History([k for k, _, _ in segs], [v for _, v, _ in segs], [p for _, _, p in segs], self.res_k,
                       self.res_v, self.res_pos, self.arena, self.arena.version)

    def attend(self, query: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor, scale: float,
               impl: str = "tiled", window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """Attention of ``query`` ``[B, Hq, q, D]`` over the history this forward found plus its own post-RoPE
        ``key_states``/``value_states`` ``[B, Hkv, q, D]`` (causal), then store those tokens (their scores come
        from the same pass). Returns ``[B, Hq, q, D]``. ``impl="materialize"``: the oracle (whole history)."""
        if self.pending is None:
            raise RuntimeError(f"layer {self.layer_idx}: attend() without a preceding update()")
        hist, positions = self.pending
        self.pending = None
        q_len = query.shape[-2]
        if impl == "materialize":
            out, lse = materialized_attention(self, query, key_states, value_states, positions, scale, window,
                                              softcap)
        elif q_len == 1 and _triton_decode(query):  # a decode step on CUDA: the fused kernel (no scores needed)
            from kvcomp.kernels import triton_decode

            out, lse = triton_decode.decode_attention_triton(query, self, key_states, value_states, scale=scale), None
        elif q_len > 1 and _triton_chunk(query):  # a prefill chunk on CUDA: the kernel over the packed history
            from kvcomp.kernels.triton_chunk import chunk_attention_triton

            out, lse = chunk_attention_triton(query, self, key_states, value_states, scale, hist)
        else:
            # stored positions all precede this step's own: the rope table need reach no further
            top = int(positions.max()) + 1 if q_len == 1 and positions.numel() else None
            fast = (decode_layer_cpu(query, hist, key_states, value_states, scale, self.rope, top=top)
                    if q_len == 1 else None)
            out, lse = fast if fast is not None else chunk_attention(query, hist, key_states, value_states, scale,
                                                                     self.rope)
        self._store(key_states, value_states, positions, (query, lse, scale))
        return out

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor,
               attn: tuple[torch.Tensor, torch.Tensor | None, float] | None) -> None:
        q = key_states.shape[-2]
        # the last `guide` tokens (a question appended to a prefill chunk) are attended to, never stored
        store = q - self.owner.run.guide_appended
        with scope("kvcomp::score"):
            scores = self.owner.run.score(self.layer_idx, key_states, positions, store, attn)
        with scope("kvcomp::rope"):
            k_store = self.rope.invert(key_states, positions).to(key_states.dtype) if self.rope else key_states
        self._append(k_store[..., :store, :], value_states[..., :store, :], positions[:store].to(torch.int32),
                     scores)
        self.seen += store
        with scope("kvcomp::quantize"):
            self._flush(decode=q == 1)

    # -- storage -------------------------------------------------------------------------------------
    def materialize(self, new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None,
                    with_values: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Dequantized history (post-RoPE keys) followed by ``new_k``/``new_v`` as given: ``[B, H, held + q, D]``
        in the model dtype (``oracle.materialize``; ``with_values=False``: keys only)."""
        return materialize(self, new_k, new_v, with_values)

    def _append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, score: torch.Tensor | None) -> None:
        if score is None:
            score = torch.full((pos.numel(),), float("nan"), device=pos.device)
        if self.res_k is None:
            self.res_k, self.res_v, self.res_pos, self.res_score = k, v, pos, score.float()
        else:
            self.res_k = torch.cat([self.res_k, k], dim=-2)
            self.res_v = torch.cat([self.res_v, v], dim=-2)
            self.res_pos = torch.cat([self.res_pos, pos])
            self.res_score = torch.cat([self.res_score, score.float()])

    def _flush(self, decode: bool) -> None:
        """Move residual tokens older than ``residual_length`` into packed segments."""
        n = 0 if self.res_pos is None else int(self.res_pos.numel())
        extra = n - self.quantizer.residual_length
        if extra <= 0 or (decode and extra < self.quantizer.flush_group):
            return
        k, v, pos = self.res_k[..., :extra, :], self.res_v[..., :extra, :], self.res_pos[:extra]
        score = self.res_score[:extra]
        if extra == n:
            self.res_k = self.res_v = self.res_pos = self.res_score = None
        else:
            self.res_k = self.res_k[..., extra:, :].contiguous()
            self.res_v = self.res_v[..., extra:, :].contiguous()
            self.res_pos = self.res_pos[extra:].clone()
            self.res_score = self.res_score[extra:].clone()
        self.compress(k, v, pos, score, decode)

    def compress(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, score: torch.Tensor,
                 decode: bool = False) -> None:
        """Quantize ``[B, H, T, D]`` tokens at ``pos`` [T]; the owner's precision policy maps their
        importance ``score`` [T] to bits per token (0 = drop). ``decode``: a group of decoded tokens."""
        bits = self.owner.run.token_bits(self.layer_idx, score, pos)
        if bits is not None:
            keep = bits != 0
            if not bool(keep.all()):
                self.dropped += int((~keep).sum())
                k, v, pos, bits = k[..., keep, :], v[..., keep, :], pos[keep], bits[keep]
            if pos.numel() == 0:
                return
            if bool((bits == -1).all()):
                bits = None
        for seg in self.quantizer.compress(k, v, pos, self.state, bits, decode=decode):
            self.arena.append(seg.keys, seg.values, pos if seg.index is None else pos[seg.index])
        blocks = [(kb, vb) for kb, vb, _ in self.arena.segments()]
        for i, (kb, vb) in self.quantizer.requantize(blocks, self.state).items():
            self.arena.replace(i, kb, vb)

    def stats(self) -> dict[str, Any]:
        """Bytes and element counts of everything this layer holds (``accounting.layer_stats``)."""
        return layer_stats(self)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held (for the kv_bytes == sum of nbytes check)."""
        return held_tensors(self)

    # -- accounting ----------------------------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the compressed cache cannot be cropped (assisted decoding is unsupported)")

    # -- batch rows (beam search, several sequences per prompt): transformers' Cache API ----------------
    def batch_size(self) -> int:
        first = self.res_k if self.res_k is not None else (self.k_blocks[0] if self.k_blocks else None)
        return 0 if first is None else int(first.shape[0])

    def select_rows(self, rows: torch.Tensor) -> None:
        """Row ``i`` of the batch becomes old row ``rows[i]`` in every held tensor (packed blocks are shared via
        ``Rows``, not copied); the quantizer's per-row statistics follow."""
        b = self.batch_size()
        if b == 0:
            return
        rows = rows.to(device=self.device, dtype=torch.long)
        self.arena.select_rows(rows)
        if self.res_k is not None:
            self.res_k, self.res_v = self.res_k.index_select(0, rows), self.res_v.index_select(0, rows)
        self.state = select_state_rows(self.state, rows, b)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.select_rows(torch.arange(self.batch_size(), device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)


def _triton_decode(query: torch.Tensor) -> bool:
    from kvcomp.cache.dispatch import use_triton_decode

    return use_triton_decode(query)


def _triton_chunk(query: torch.Tensor) -> bool:
    from kvcomp.cache.dispatch import use_triton_chunk

    return use_triton_chunk(query)
