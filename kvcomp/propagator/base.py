"""Selective propagation: which tokens' hidden states go on to later layers during prefill.

``ratio(l, L)`` is the fraction of a forward's candidate tokens whose hidden states leave layer ``l``.
The base class owns the hooks (installed per sequence by the compressor, removed on exit):

- a forward hook on decoder layer ``l`` keeps the top ``ratio(l) * n`` candidates by their importance
  scores summed over the layers so far (``session.layer_scores``; summing makes one noisy layer matter
  less) and slices the layer's output ``[B, T, hidden]``;
  the last ``max(guide, keep_last)`` tokens (the question / prompt end) always go on;
- a forward pre-hook on layer ``l + 1`` slices its RoPE ``position_embeddings`` and ``position_ids``
  to the kept tokens (positions are preserved), tells the session their absolute positions and rebuilds
  the attention mask for that layer's own history length (layers hold different numbers of tokens).

Later layers therefore compute, and cache, only the propagated tokens. Decode steps pass untouched.

Layer -> share map (``layer_shares``): ``ratio(l)`` applies to the hidden states *leaving* layer ``l``, so
layer 0 computes and holds every token (it must, to score them), layer ``l >= 1`` computes and holds
``min(ratio(0..l-1))`` of them, and the last layer's ratio never applies (nothing follows it). A band's
ratio therefore takes effect one layer late: with ``layer_ratio`` on 30 layers (bands 0-8 / 9-20 / 21-29)
layers 1-9 hold 80 %, 10-21 hold 60 %, 22-29 hold 40 %; on 4 layers (0.8, 0.8, 0.6, 0.4) the shares are
1, 0.8, 0.8, 0.6 and the 40 % band never applies.

``budget`` says over what the share holds: ``chunk`` = every forward (prefill chunk) keeps that share of
its own candidates, whatever they hold; ``prompt`` = the share holds over the whole prompt: a candidate
goes on when its accumulated score's quantile among every candidate that reached this layer so far (this
chunk included) is in the top share, so an important chunk's tokens may all go on while a filler chunk's
mostly stop (a chunk never carries more than its own tokens; the first chunk is ranked against itself).

``schedule`` says when the selections are made. ``stage`` (default): once per selection point, when the whole
prompt has passed the layers below it (``kvcomp/propagator/stage.py``, which drives the model; ``select``
here ranks every carried token by the scorer, called with the prompt end's queries at that layer, plus the
scores of the earlier points); ``budget`` then plays no part. ``chunk``: the hooks above, inside each
forward, before the prompt's end (and its question) has been read (the ablation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from kvcomp.compressor.precision import RunningScores
from kvcomp.errors import ConfigError
from kvcomp.fields import param
from kvcomp.masks import layer_mask
from kvcomp.model.arch import MASK_IMPLS, decoder_layers, windows

__all__ = ["Propagator", "decoder_layers"]


_SLICED = ("hidden_states", "attention_mask", "position_ids", "position_embeddings")


def _slice_kwargs(kwargs: dict, index: torch.Tensor, pos_ids: torch.Tensor, t0: int, layer: int) -> None:
    """Cut a decoder layer's per-token inputs to the propagated tokens ``index``; refuse ones it cannot cut."""
    pe = kwargs.get("position_embeddings")
    if pe is not None:
        kwargs["position_embeddings"] = tuple(x[:, index] for x in pe)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = pos_ids
    for k, v in kwargs.items():
        if k not in _SLICED and isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == t0:
            raise ConfigError(f"propagation cannot carry the per-token input {k!r} of decoder layer {layer}; "
                              "use propagation=none with this model")


class _Forward:
    """Per-forward bookkeeping: indices (into the forward's tokens) of those still carried."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.n_cand0 = 0
        self.acc: torch.Tensor | None = None  # running sum of the carried candidates' scores over layers
        self.layers = 0
        self.share = 1.0  # scheduled share of the forward's candidates still carried
        self.stats: RunningScores | None = None  # budget: prompt -- per layer, across the prompt's forwards


@dataclass
class Propagator:
    """Base: propagates every token (``ratio`` 1); subclasses give a schedule. ``keep_last``: tail always kept."""

    keep_last: int = param(32, ge=0)
    budget: Literal["prompt", "chunk"] = "prompt"
    schedule: Literal["stage", "chunk"] = "stage"
    score_layers: Literal["point", "stage"] = "point"

    def ratio(self, layer_idx: int, n_layers: int) -> float:
        return 1.0

    def layer_shares(self, n_layers: int) -> list[float]:
        """Share of the prompt's (candidate) tokens each layer computes and holds (see the module doc)."""
        shares, share = [], 1.0
        for i in range(n_layers):
            shares.append(share)
            share = min(share, self.ratio(i, n_layers))
        return shares

    def active(self, n_layers: int) -> bool:
        return any(self.ratio(i, n_layers) < 1.0 for i in range(n_layers))

    def points(self, n_layers: int) -> list[tuple[int, float]]:
        """Selection points: (layer whose output is cut, share of the prompt's candidates carried on after it)."""
        out, share = [], 1.0
        for i in range(n_layers - 1):
            r = self.ratio(i, n_layers)
            if r < share:
                out.append((i, r))
                share = r
        return out

    def staged(self, n_layers: int) -> bool:
        """True when the stage schedule drives this prompt's prefill (``schedule: stage`` and tokens dropped)."""
        return self.schedule == "stage" and self.active(n_layers)

    def query_window(self, run: Any, step: int) -> int:
        """Trailing prompt queries a selection layer records: the scorer's window (-1 = one chunk's worth)."""
        w = int(run.scoring.window)
        return step if w < 0 else w

    def stage_scores(self, run: Any, layers: range, pos: torch.Tensor) -> torch.Tensor | None:
        """``score_layers: stage``: the scorer's scores of the carried tokens (positions ``pos`` [N]) with the prompt
        end's queries, summed over ``layers`` (the stage's other layers, read from what they hold), [N]; None for
        ``point`` (the selection layer's own scores only)."""
        if self.score_layers == "point" or not len(layers):
            return None
        from kvcomp.compressor.timing import end_scores

        scores, positions, _ = end_scores(run, run.scoring, lambda i: 0, layers=layers)
        out = torch.zeros(pos.numel(), device=pos.device)
        for i, s in scores.items():
            p = positions[i].to(pos.device)
            at = torch.searchsorted(pos, p).clamp(max=pos.numel() - 1)
            ok = pos[at] == p
            out.index_add_(0, at[ok], s.to(out.device)[ok])
        return out

    def reads_question(self, n_layers: int) -> bool:
        """Whether this propagator reads the question (its length: the protected prompt end, ``protected``)."""
        return self.active(n_layers)

    def protected(self, run: Any) -> int:
        """Prompt-end tokens every selection keeps: ``keep_last`` plus the question's length."""
        return self.keep_last + run.question_len

    def select(self, run: Any, layer: int, n_layers: int, keys: torch.Tensor, queries: torch.Tensor,
               scaling: float, pos: torch.Tensor, prompt_len: int, share: float, acc: torch.Tensor | None,
               window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage schedule: which of the ``N`` carried tokens (absolute positions ``pos`` [N]) go on after ``layer``.
        ``keys``: that layer's post-RoPE keys of them ``[B, H_kv, N, D]``; ``queries``: the prompt end's
        ``[B, H_q, W, D]``. The scorer scores every carried token against those queries (softmax over all of
        them), ``acc`` [N] (earlier points' scores) is added, and the top ``share`` of the prompt's candidates go
        on with the protected tail. Returns (kept indices into the N, sorted; their accumulated scores)."""
        from kvcomp.compressor.timing import question_lse
        from kvcomp.scorer.base import ScoreContext

        n, w = pos.numel(), queries.shape[2]
        lse = question_lse(queries, keys, pos[-w:], pos, scaling, window)
        rope = run.cache.ropes[layer]
        pre = rope.invert(keys, pos) if rope is not None else keys
        ctx = ScoreContext(layer, n_layers, keys, pre, queries, lse, pos, n, scaling, prompt_len, window)
        s = torch.nan_to_num(run.scoring.scorer.score(ctx).float(), nan=0.0)
        acc = s if acc is None else acc + s
        prot0 = min(prompt_len, self.protected(run))
        cand = n - min(n, prot0)
        target = min(cand, round(share * (prompt_len - prot0)))
        top = torch.topk(acc[:cand], target).indices.sort().values
        keep = torch.cat([top, torch.arange(cand, n, device=top.device)])
        return keep, acc[keep]

    def install(self, model: Any, run: Any, fix_masks: bool = False) -> list[Any]:
        """Register the hooks for one prompt's ``run`` (a ``Session``); ``fix_masks`` rebuilds per-layer masks
        even without dropping hidden states (needed when the precision policy drops tokens, so layers hold
        different counts; not with kvcomp's own attention, which needs no mask)."""
        layers = decoder_layers(model)
        n = len(layers)
        active = self.active(n)
        if not (active or fix_masks):
            return []
        impl = str(getattr(model.config, "_attn_implementation", None) or "eager")
        if impl not in MASK_IMPLS:
            raise ConfigError(f"model.attn_implementation={impl} takes no per-layer masks; propagation and token "
                              "drops need sdpa or eager (model.attn_implementation=sdpa)")
        if self.staged(n):
            return []  # the stage schedule (Session.prefill) needs no per-forward hooks
        win = windows(model)
        fw = _Forward()
        fw.stats = RunningScores() if self.budget == "prompt" else None
        handles = []
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(self._pre(i, run, fw, win[i], impl), with_kwargs=True))
            if active and i < n - 1:
                handles.append(layer.register_forward_hook(self._post(i, n, run, fw)))
        return handles

    def _pre(self, i: int, run: Any, fw: _Forward, window: int | None, impl: str) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            h = args[0] if args else kwargs["hidden_states"]
            t = h.shape[1]
            if i == 0:
                fw.index, fw.acc, fw.layers, fw.share = None, None, 0, 1.0
                fw.n_cand0 = t - self._protected(run, t)
                fw.positions = kwargs.get("position_ids")  # [B, T] of the whole forward
                if fw.positions is None:
                    seen = run.cache.get_seq_length()
                    fw.positions = torch.arange(seen, seen + t, device=h.device)[None]
            pos_ids = fw.positions
            if fw.index is not None and t > 1:
                pos_ids = pos_ids[:, fw.index]
                _slice_kwargs(kwargs, fw.index, pos_ids, fw.positions.shape[1], i)
                run.pending_positions[i] = pos_ids[0]
            if run.deferred:  # kvcomp's own attention: causal and windowed by position, no mask needed
                return args, kwargs
            # this layer's own keys: its held (possibly sparse) history, then the new tokens, by absolute position
            q_pos = pos_ids[0]
            k_pos = torch.cat([run.cache.layers[i].held_positions().to(q_pos.device), q_pos])
            kwargs["attention_mask"] = layer_mask(k_pos, q_pos, window, impl, h.dtype)
            return args, kwargs

        return hook

    def _post(self, i: int, n: int, run: Any, fw: _Forward) -> Any:
        def hook(module: Any, args: tuple, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else output
            t = h.shape[1]
            scores = run.layer_scores.get(i)
            if t == 1 or scores is None:
                return None
            prot = self._protected(run, t)
            cand = t - prot
            s = scores[:cand].float()
            fw.acc = s if fw.acc is None else fw.acc + s
            fw.layers += 1
            if fw.stats is not None:  # budget: prompt -- a running quantile threshold per layer
                ratio = self.ratio(i, n)
                if ratio >= fw.share or cand <= 0:
                    return None
                keep = ratio / fw.share  # of the candidates that reached this layer
                fw.share = ratio
                u = fw.stats.quantile(i, fw.acc)
                top = (u >= 1.0 - keep).nonzero().squeeze(1)
            else:
                target = round(self.ratio(i, n) * fw.n_cand0)
                if cand <= target or cand <= 0:
                    return None
                top = torch.topk(fw.acc, max(target, 0)).indices.sort().values
            fw.acc = fw.acc[top]
            local = torch.cat([top, torch.arange(cand, t, device=top.device)])
            base = fw.index if fw.index is not None else torch.arange(t, device=local.device)
            fw.index = base[local]
            h = h[:, local]
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    def _protected(self, run: Any, t: int) -> int:
        """Tail tokens always carried: an appended question, else ``keep_last`` plus the question's length
        (the prompt ends with the question and the chat template's assistant header)."""
        guide = run.guide_appended
        if guide:
            return min(t, guide)
        return min(t, self.keep_last + run.question_len)
