"""Stage routing: which stage each sample of the forward in progress runs, and checkpointing under it.

A specialised model carries one :class:`StageContext`. Its forward pre-hook reads ``stage`` (an
int or ``[B]`` integer tensor) from the call and pushes a :class:`Route`; every specialised layer
(:mod:`dfm_ext.specialization.layers`) reads the innermost route. :func:`checkpoint` re-installs the
route when activation checkpointing recomputes a segment in backward, after the forward is over.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

import numpy as np

from dfm_ext.process.host_values import host_to_device, host_twin
from dfm_ext.validation import on_host

__all__ = ["Route", "StageContext", "routing_active", "checkpoint"]


class Route:
    """How one forward's batch splits by stage; computed once per forward, read by every layer.

    Three kinds, chosen by :meth:`StageContext.make_route`:

    * ``uniform``: an int ``stage``, every sample runs that stage (only its parameters are used);
    * ``counts`` known: a ``[B]`` tensor whose values were already on the host (a CPU tensor, or a
      device tensor with a host twin, :mod:`~dfm_ext.process.host_values`, as the samplers draw it;
      outside ``torch.compile``): the per-stage sample counts and row indices are host values, so layers
      compute each stage's update on that stage's samples only. When the batch is in stage order
      (``ordered``; a model with ``permute_batch``/``permute_output``, as ``DFMTransformer``, has
      its inputs reordered by the pre-hook and its output put back by the post-hook) each stage's
      rows are one block, which layers slice instead of gathering and scattering;
    * neither: a device tensor (or under ``torch.compile``): nothing is read back (no device-to-host
      sync per step); ``index`` ``[B]`` and ``onehot`` ``[B, S]`` stay on the device and LoRA layers
      route by masking per sample.

    With a ``[B]`` tensor ``stage``, every stage's parameters take part in the forward (a stage
    with no sample in the batch gets exact zero gradients), whichever kind: the set of parameters a
    step uses never depends on the batch's stage values, so data-parallel ranks always agree on it.
    """

    def __init__(
        self,
        batch: int,
        uniform: int | None,
        index: Tensor | None = None,
        num_stages: int = 0,
        counts: tuple[int, ...] | None = None,
        ordered: bool = False,
        restore: Tensor | None = None,
        host_index: np.ndarray | None = None,
    ) -> None:
        self.batch = batch
        self.uniform = uniform  # the stage of every sample, for an int stage
        self.index = index  # [B] long, stage[b]
        self.num_stages = num_stages
        self.counts = counts  # samples per stage, when read on the host
        # The samples are grouped by stage in ascending order (needs ``counts``): each stage's rows
        # are one contiguous block, so layers slice instead of gathering and scattering rows.
        self.ordered = ordered
        # [B] long: where each sample of the caller's batch went when the routing sorted the batch
        # itself (:meth:`StageContext.pre_hook`); the output is put back in the caller's order.
        self.restore = restore
        # [B] int64 on the host, equal to index (a device index's host twin): row indices and the
        # stage order come from it and are copied to the device without a sync.
        self.host_index = host_index
        self._onehot: Tensor | None = None
        self._major: int | None = None
        self._split: tuple[Tensor, Tensor, tuple[int, ...]] | None = None
        self._rows: dict[tuple[int, torch.device] | tuple[int, torch.device, int], Tensor] = {}
        self._masks: dict[tuple[int, torch.dtype], Tensor] = {}

    @property
    def onehot(self) -> Tensor:
        """``[B, S]`` bool, ``stage[b] == s``."""
        idx = self.index
        assert idx is not None, "onehot is read only for a batch of mixed stages (uniform is None)"
        if torch.compiler.is_compiling():  # not cached on the route: a traced write would guard later calls
            return idx[:, None] == torch.arange(self.num_stages, device=idx.device)[None, :]
        if self._onehot is None:
            self._onehot = idx[:, None] == torch.arange(self.num_stages, device=idx.device)[None, :]
        return self._onehot

    def rank_mask(self, rank: int, dtype: torch.dtype) -> Tensor:
        """``[B, S r]``: ``onehot`` with every stage column repeated ``rank`` times, as ``dtype``.

        Shared by all LoRA layers of the forward (same rank and dtype): built once, not per layer.
        """
        key = (rank, dtype)
        if torch.compiler.is_compiling():
            return self.onehot.repeat_interleave(rank, dim=1).to(dtype)
        if key not in self._masks:
            self._masks[key] = self.onehot.repeat_interleave(rank, dim=1).to(dtype)
        return self._masks[key]

    @property
    def major(self) -> int:
        """The stage with the most samples (the lowest such stage on a tie); needs ``counts``."""
        if self._major is None:
            counts = self.counts
            assert counts is not None, "major is read only for a route whose counts are on the host"
            self._major = max(range(len(counts)), key=lambda s: (counts[s], -s))
        return self._major

    def rows(self, s: int, device: torch.device) -> Tensor:
        """``[counts[s]]`` long: the samples of stage ``s``, in order, on ``device`` (needs ``counts``)."""
        key = (s, device)
        if key not in self._rows:
            idx = self.index
            assert idx is not None and self.counts is not None, "rows are read only when counts are on the host"
            if self.host_index is not None:
                self._rows[key] = host_to_device(np.flatnonzero(self.host_index == s), device)
            else:
                self._rows[key] = (idx == s).nonzero().squeeze(1).to(device, non_blocking=True)
        return self._rows[key]

    def block(self, s: int, per_sample: int) -> tuple[int, int]:
        """``(start, stop)``: stage ``s``'s rows in the input flattened to ``[B * per_sample, F]``
        (needs ``ordered``: samples grouped by stage in ascending order)."""
        counts = self.counts
        assert counts is not None and self.ordered, "block is read only for a batch grouped by stage"
        start = sum(counts[:s])
        return start * per_sample, (start + counts[s]) * per_sample

    def token_rows(self, s: int, per_sample: int, device: torch.device) -> Tensor:
        """``[counts[s] * per_sample]``: rows of stage ``s`` in the input flattened to ``[B * per_sample, F]``."""
        key = (s, device, per_sample)
        if key not in self._rows:
            rows = self.rows(s, device)
            if per_sample != 1:
                rows = (rows[:, None] * per_sample + torch.arange(per_sample, device=device)[None, :]).flatten()
            self._rows[key] = rows
        return self._rows[key]

    def split(self) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        """``(perm, inverse, counts)``: sample order grouped by stage, its inverse, samples per stage.

        ``counts`` is read on the host (one sync for a device ``stage``, once per forward).
        """
        if self._split is None:
            idx = self.index
            assert idx is not None, "split is read only for a [B] stage tensor"
            counts = self.counts
            if self.host_index is not None:
                order = np.argsort(self.host_index, kind="stable")
                inverse_host = np.empty_like(order)
                inverse_host[order] = np.arange(self.batch)
                self._split = (host_to_device(order, idx.device), host_to_device(inverse_host, idx.device), cast(tuple, counts))
                return self._split
            if counts is None:
                counts = tuple(int(c) for c in torch.bincount(idx, minlength=self.num_stages).tolist())
            perm = torch.argsort(idx, stable=True)
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(self.batch, device=perm.device)
            self._split = (perm, inverse, counts)
        return self._split


class StageContext:
    """Per-model holder of the ``stage`` of the forward in progress."""

    def __init__(self, num_stages: int, stage_arg: str, position: int | None, consume: bool) -> None:
        self.num_stages = num_stages
        self.stage_arg = stage_arg
        self.position = position
        self.consume = consume
        self.hook_ids: tuple[int, ...] = ()
        self.requires_grad: dict[str, bool] = {}
        # kind/rank/alpha/stages as given to specialize(): alpha is not recoverable bit-exactly
        # from a layer's alpha / rank scaling, and save_specialization needs it to rebuild.
        self.settings: dict[str, Any] = {}
        # Read a CPU ``stage``'s counts on the host (the grouped route). False: always the masked
        # route a device ``stage`` takes (benchmarks compare the two on one machine).
        self.read_counts = True
        # With counts on the host, let a model that can reorder its per-sample inputs
        # (``permute_batch``/``permute_output``, as DFMTransformer does) run the batch grouped by
        # stage: the layers then slice contiguous rows. False: keep the caller's order.
        self.group_batch = True
        self._calls: list[Route | None] = []
        self._manual: list[Route] = []
        self._replay: list[Route] = []  # routes re-installed by an activation-checkpoint recompute
        # The innermost of the three, kept up to date on every change (refresh()): a layer compiled on its
        # own reads this one attribute, so its guards do not depend on how deep the lists are.
        self._active: Route | None = None

    def make_route(self, stage: object) -> Route:
        s = self.num_stages
        if isinstance(stage, bool) or not isinstance(stage, (int, Tensor)):
            raise TypeError(f"stage must be an int or an integer tensor [B], got {type(stage).__name__}")
        if isinstance(stage, int):
            if not 0 <= stage < s:
                raise ValueError(f"stage must be in [0, {s - 1}], got {stage}")
            return Route(batch=-1, uniform=stage)
        if stage.dtype.is_floating_point or stage.dtype.is_complex or stage.dtype == torch.bool:
            raise TypeError(f"stage must be an integer tensor, got dtype {stage.dtype}")
        if stage.ndim != 1 or stage.shape[0] == 0:
            raise ValueError(f"stage must have shape [B] with B >= 1, got {tuple(stage.shape)}")
        # Values are read where they already are on the host (a CPU tensor, outside
        # torch.compile): checked, and the per-stage counts kept for the layers. A device tensor
        # is not read back (no sync per training step): its range is asserted on the device
        # (asynchronously; it fails at the next sync) and the layers route by masking.
        batch = stage.shape[0]
        index = stage.long()
        host = host_twin(stage) if self.read_counts else None
        if host is not None:  # values known on the host (drawn there): no read of the device tensor
            host = host.astype(np.int64, copy=False)
            lo, hi = int(host.min()), int(host.max())
            if lo < 0 or hi >= s:
                raise ValueError(f"stage values must be in [0, {s - 1}], got min {lo} max {hi}")
            counts = tuple(int(c) for c in np.bincount(host, minlength=s))
            ordered = bool((host[1:] >= host[:-1]).all())
            return Route(batch=batch, uniform=None, index=index, num_stages=s, counts=counts, ordered=ordered, host_index=host)
        if self.read_counts and on_host(stage):
            lo, hi = (int(v) for v in torch.stack([stage.min(), stage.max()]).tolist())
            if lo < 0 or hi >= s:
                raise ValueError(f"stage values must be in [0, {s - 1}], got min {lo} max {hi}")
            counts = tuple(int(c) for c in torch.bincount(index, minlength=s).tolist())
            ordered = bool((index[1:] >= index[:-1]).all()) if batch > 1 else True
            return Route(batch=batch, uniform=None, index=index, num_stages=s, counts=counts, ordered=ordered)
        if not torch.compiler.is_compiling():
            torch._assert_async(((stage >= 0) & (stage < s)).all(), f"stage values must be in [0, {s - 1}]")
        return Route(batch=batch, uniform=None, index=index, num_stages=s)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.consume:
            stage = kwargs.pop(self.stage_arg, None)
        elif self.stage_arg in kwargs:
            stage = kwargs[self.stage_arg]
        elif self.position is not None and len(args) > self.position:
            stage = args[self.position]
        else:
            stage = None
        route = None if stage is None else self.make_route(stage)
        changed = self.consume
        if route is not None and route.counts is not None and not route.ordered and self.group_batch:
            grouped = self._group(module, route, args, kwargs)
            if grouped is not None:
                route, args, kwargs = grouped
                changed = True
        self._calls.append(route)
        self.refresh()
        _ACTIVE.append((self, route))
        return (args, kwargs) if changed else None

    @staticmethod
    def _group(module: nn.Module, route: Route, args: tuple, kwargs: dict) -> tuple[Route, tuple, dict] | None:
        """The call's inputs reordered so that samples are grouped by stage, and its new route.

        Only for a model that says how to reorder its per-sample inputs (``permute_batch``, which
        may decline: ``None``); the order is undone on the output in :meth:`post_hook`. Every
        per-sample computation is unchanged, only its row in the batch moves.
        """
        permute = getattr(module, "permute_batch", None)
        if permute is None or not hasattr(module, "permute_output"):
            return None
        index = cast(Tensor, route.index)
        perm, restore, _ = route.split()  # stage order and its inverse (counts already on the host)
        moved = permute(args, kwargs, perm)
        if moved is None:
            return None
        host = None if route.host_index is None else route.host_index[np.argsort(route.host_index, kind="stable")]
        grouped = Route(batch=route.batch, uniform=None, index=index[perm], num_stages=route.num_stages,
                        counts=route.counts, ordered=True, restore=restore, host_index=host)  # fmt: skip
        return grouped, moved[0], moved[1]

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._calls:
            route = self._calls.pop()
            self.refresh()
            _ACTIVE.pop()
            if route is not None and route.restore is not None and output is not None:
                return module.permute_output(output, route.restore)  # type: ignore[operator]
        return None

    @contextlib.contextmanager
    def manual(self, stage: int | Tensor) -> Iterator[None]:
        route = self.make_route(stage)
        self._manual.append(route)
        self.refresh()
        _ACTIVE.append((self, route))
        try:
            yield
        finally:
            self._manual.pop()
            self.refresh()
            _ACTIVE.pop()

    def current(self) -> Route | None:
        """The route of the forward in progress (None when the model runs no routed forward)."""
        return self._active

    def refresh(self) -> None:
        """Recompute the innermost route (a checkpoint recompute's, a forward's, a ``route()`` block's)."""
        if self._replay:
            self._active = self._replay[-1]
        elif self._calls and self._calls[-1] is not None:
            self._active = self._calls[-1]
        else:
            self._active = self._manual[-1] if self._manual else None

    def route(self, layer: str) -> Route:
        route = self.current()
        if route is not None:
            return route
        raise RuntimeError(
            f"layer {layer!r} is specialised per stage but ran without a stage: call the specialised "
            f"model with {self.stage_arg}=<LongTensor [B]>, or wrap the call in `handle.route(stage)`"
        )


#: (context, route) of every routed forward (or ``route()`` block) in progress, innermost last.
_ACTIVE: list[tuple[StageContext, Route | None]] = []


def routing_active() -> bool:
    """Whether a specialised model's forward is running now (its per-sample stage routing is set)."""
    return any(route is not None for _, route in _ACTIVE)


@contextlib.contextmanager
def _replaying(routes: dict[StageContext, Route]) -> Iterator[None]:
    for ctx, route in routes.items():
        ctx._replay.append(route)
        ctx.refresh()
    try:
        yield
    finally:
        for ctx in routes:
            ctx._replay.pop()
            ctx.refresh()


def _stage_context_fn() -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
    # Called when the checkpointed segment first runs: remember each specialised model's route
    # then, and re-install it while the segment is recomputed in backward, when the model's
    # forward (and its stage pre-hook) is long over.
    routes: dict[StageContext, Route] = {}
    for ctx, route in _ACTIVE:
        if route is not None:
            routes[ctx] = route
    return contextlib.nullcontext(), _replaying(routes)


def checkpoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` under activation checkpointing (``torch.utils.checkpoint``, non-reentrant).

    The activations inside ``fn`` are freed after the forward and recomputed in backward; the
    gradients are those of the plain call. Inside a specialised model's forward (:func:`specialize`)
    the stage routing of the forward is re-installed for the recompute, which plain
    ``torch.utils.checkpoint`` cannot know of; outside one this is the plain call.
    """
    # Under torch.compile the segment is traced with the route in place (its index tensors are graph
    # inputs) and the recompute replays the traced graph: nothing to re-install, and a context_fn
    # that is not a pair of dispatch modes is refused there.
    if _ACTIVE and not torch.compiler.is_compiling():
        kwargs = {"context_fn": _stage_context_fn, **kwargs}
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)

