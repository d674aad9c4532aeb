"""``propagation.schedule: stage``: selective propagation decided at the prompt's end, one stage at a time.

A propagator's selection points (``Propagator.points``: the layers after which fewer tokens go on) cut the
decoder into stages. Stage 1 (layers ``0..p1``) takes the whole prompt chunk by chunk, each chunk's K/V
compressed as usual; the hidden states leaving ``p1`` are held for every token (``[1, T, hidden]``, the only
all-token buffer). When the prompt has been read, the selection at ``p1`` is made once over the whole prompt
(``Propagator.select``: the prompt end's queries at ``p1`` over that layer's keys of every token, plus the
scores accumulated at earlier points); only the kept tokens' hidden states go through stage 2 (``p1+1..p2``),
again chunk by chunk, and so on. Positions stay absolute; decode runs every layer.

The model's own forward does the work: during stage ``[a, b)`` the decoder layers below ``a`` are replaced
in their ``ModuleList`` by pass-through stand-ins (indices unchanged, so per-layer types stay right), a
pre-hook on layer ``a`` feeds it the held boundary states, and a hook on layer ``b - 1`` records its output
and ends the forward there (nothing above it runs). All of it is per model instance and undone after each
stage. A model whose forward does not go through its layer list this way is refused (``ConfigError``).

Memory: the boundary states of the carried tokens (fp32 ``[N, hidden]``) plus the selection layer's keys
of every carried token (``[H_kv, N, D]``), one stage at a time (``Session.stats()``: ``stage_boundary_bytes``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from kvcomp.errors import ConfigError
from kvcomp.model.arch import decoder_layers, windows
from kvcomp.profiler import release_memory


class _Stop(Exception):
    """Raised by the last layer of a stage: the model's forward ends there."""


class _Skip(torch.nn.Module):
    """Stands in for a decoder layer below the running stage: hands the hidden states on untouched (the first
    real layer's pre-hook replaces them with the held boundary states)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width  # 0: the real layers return a tensor; else a tuple of this length

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return hidden_states if not self.width else (hidden_states, *([None] * (self.width - 1)))


class _Capture:
    """What a selection layer records while its stage runs: its post-RoPE keys of every carried token
    (``[B, H_kv, N, D]`` in order) and the trailing ``w`` queries of the prompt's tokens ``[B, H_q, <=w, D]``."""

    def __init__(self, w: int) -> None:
        self.w = w
        self.keys: list[torch.Tensor] = []
        self.queries: torch.Tensor | None = None
        self.scaling = 1.0

    def add(self, keys: torch.Tensor, n_store: int, attn: tuple | None) -> None:
        self.keys.append(keys[..., :n_store, :].detach())
        if attn is not None:
            q = attn[0][:, :, :n_store]
            self.queries = q if self.queries is None else torch.cat([self.queries, q], dim=2)
            self.queries = self.queries[:, :, -self.w :]
            self.scaling = float(attn[2])


class StageSchedule:
    """Drives one prompt's prefill stage by stage for ``propagator`` on the session ``run``."""

    def __init__(self, propagator: Any, run: Any) -> None:
        model = run.model
        self.prop, self.run, self.model = propagator, run, model
        self.layers = decoder_layers(model)
        self.n = len(self.layers)
        self.points = propagator.points(self.n)
        self.windows = windows(model)
        if "position_ids" not in inspect.signature(model.forward).parameters:
            raise ConfigError(f"{type(model).__name__}: its forward takes no position_ids, which propagation.schedule"
                              "=stage needs (kept tokens keep their absolute positions); use propagation.schedule"
                              "=chunk")
        self.capture: dict[int, _Capture] = {}
        self.width = -1  # the real layers' output structure, learnt in stage 1 (0 = a tensor)
        self.feed: torch.Tensor | None = None
        self.fed = False
        self.out: torch.Tensor | None = None
        self.boundary_bytes = 0  # peak bytes of the boundary states + selection keys held at once
        self.kept: list[torch.Tensor] = []  # per selection point: absolute positions of the tokens carried on

    # -- what the selection layer records (called by Session.score, from the attention pass) ------------------
    def observe(self, layer_idx: int, keys: torch.Tensor, n_store: int, attn: tuple | None) -> None:
        cap = self.capture.get(layer_idx)
        if cap is not None and keys.shape[-2] > 1:
            cap.add(keys, n_store, attn)

    # -- driving the model --------------------------------------------------------------------------------------
    @contextmanager
    def _stage(self, a: int, b: int) -> Iterator[None]:
        """Layers ``[a, b)`` run; those below ``a`` pass through; the forward stops after ``b - 1`` (``b < n``)."""
        handles, saved = [], {}

        def feed(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if self.feed is not None:
                if args:
                    args = (self.feed, *args[1:])
                elif "hidden_states" in kwargs:
                    kwargs["hidden_states"] = self.feed
                else:
                    raise ConfigError(f"{type(self.model).__name__}: decoder layer {a} takes its hidden states "
                                      "neither first nor as hidden_states; use propagation.schedule=chunk")
            self.fed = True
            return args, kwargs

        def record(module: Any, args: tuple, output: Any) -> None:
            if self.width < 0:
                self.width = len(output) if isinstance(output, tuple) else 0
            self.out = output[0] if isinstance(output, tuple) else output
            if b < self.n:
                raise _Stop

        try:
            handles.append(self.layers[a].register_forward_pre_hook(feed, with_kwargs=True))
            handles.append(self.layers[b - 1].register_forward_hook(record))
            for i in range(a):
                saved[i] = self.layers[i]
                self.layers[i] = _Skip(max(self.width, 0))
            yield
        finally:
            for i, layer in saved.items():
                self.layers[i] = layer
            for h in handles:
                h.remove()

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, feed: torch.Tensor | None, guide: int,
                 logits: bool) -> Any:
        """One forward of ``ids`` [1, q] at ``positions`` [q] (the last ``guide`` an appended question)."""
        run = self.run
        self.feed, self.fed, self.out = feed, False, None
        run.guide_appended = guide
        none = torch.zeros(0, dtype=torch.long, device=ids.device)
        try:
            out = self.model(input_ids=ids, position_ids=positions[None], past_key_values=run.cache, use_cache=True,
                             logits_to_keep=1 if logits else none)
        except _Stop:
            out = None
        finally:
            run.guide_appended = 0
            self.feed = None
        if not self.fed or self.out is None:
            raise ConfigError(f"{type(self.model).__name__}: its forward does not run its decoder layers from its "
                              "layer list, which propagation.schedule=stage drives; use propagation.schedule=chunk")
        return out

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The whole prompt ``input_ids`` [1, T], stage by stage; returns the last position's logits [1, V]."""
        run, dev = self.run, input_ids.device
        t = input_ids.shape[1]
        step = run.chunk_size if run.chunk_size > 0 else t
        guide_ids = run.guide_ids.to(dev) if run.guide_ids is not None else None
        n_guide = 0 if guide_ids is None else guide_ids.shape[1]
        idx = torch.arange(t, device=dev)  # absolute positions of the carried tokens
        hidden: torch.Tensor | None = None  # their states entering the stage (None: the embeddings)
        guide_h: torch.Tensor | None = None
        acc: torch.Tensor | None = None
        bounds = [0, *[p + 1 for p, _ in self.points], self.n]
        last = None
        for k in range(len(bounds) - 1):
            a, b = bounds[k], bounds[k + 1]
            sel = b - 1 if b < self.n else None
            self.capture = {} if sel is None else {sel: _Capture(self.prop.query_window(run, step))}
            outs, g_out = [], None
            with self._stage(a, b):
                for start in range(0, idx.numel(), step):
                    sub = idx[start : start + step]
                    final = start + step >= idx.numel()
                    ids, pos, feed = input_ids[:, sub], sub, None if hidden is None else hidden[:, start : start + step]
                    guided = guide_ids is not None and not final and (a == 0 or guide_h is not None)
                    if guided:
                        ids = torch.cat([ids, guide_ids], dim=1)
                        pos = torch.cat([sub, sub[-1] + 1 + torch.arange(n_guide, device=dev)])
                        if feed is not None:
                            feed = torch.cat([feed, guide_h], dim=1)
                    for i in range(a, b):
                        run.pending_positions[i] = pos
                    out = self._forward(ids, pos, feed, n_guide if guided else 0, sel is None and final)
                    if sel is not None:
                        h = self.out
                        outs.append(h[:, : sub.numel()])
                        if guided:
                            g_out = h[:, sub.numel() :]
                    elif final:
                        last = out.logits[:, -1, :]
                    del out
                    if step < t:
                        release_memory(dev)
            if sel is None:
                break
            hidden = torch.cat(outs, dim=1)
            outs.clear()
            guide_h = g_out if g_out is not None else guide_h
            cap = self.capture.pop(sel)
            keys = torch.cat(cap.keys, dim=2)
            held = hidden.numel() * hidden.element_size() + keys.numel() * keys.element_size()
            self.boundary_bytes = max(self.boundary_bytes, held)
            extra = self.prop.stage_scores(run, range(a, sel), idx)
            if extra is not None:
                acc = extra if acc is None else acc + extra
            keep, acc = self.prop.select(run, sel, self.n, keys, cap.queries, cap.scaling, idx, t,
                                         self.points[k][1], acc, self.windows[sel])
            idx, hidden = idx[keep], hidden[:, keep]
            self.kept.append(idx)
            del keys, cap
        if last is None:
            raise ValueError("empty input")
        return last
