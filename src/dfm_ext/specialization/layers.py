"""Per-stage layers: ``nn.Linear``/``nn.ConvNd``/``nn.Embedding`` subclasses that route by stage.

:func:`dfm_ext.specialization.specialize` swaps a targeted layer's class for ``Stage<Class>``
(:func:`stage_class`: the :class:`StageLayer` mixin over the original class, so subclasses keep
their helpers) and gives it ``stage_params``, one :class:`StageParams` per stage that owns
parameters. The forward reads the stage route of the forward in progress
(:class:`~dfm_ext.specialization.routing.Route`):

* an int ``stage`` ``s``: one call with stage ``s``'s parameters (:meth:`StageLayer._stage_forward`);
* a ``[B]`` ``stage`` whose counts were read on the host, the batch in stage order (a CPU
  tensor outside ``torch.compile``; ``DFMTransformer`` inputs are reordered by the routing):
  ``kind="lora"`` Linear layers run each stage's block of rows on its own
  (:class:`_StageLoRABlocks`): the stage with the most samples, ``k``, as the merged weight, every
  other stage as ``W x + (alpha / r) B_j A_j x`` (rank ``r``, on its rows only);
* a ``[B]`` ``stage`` whose counts were read on the host, the batch in the caller's order (and
  every other layer type): every sample first runs the majority stage ``k``, then the samples of each other
  stage ``j`` are corrected on those rows only: ``kind="lora"`` adds
  ``(alpha / r) (B_j A_j - B_k A_k) x`` (rank ``2 r``, on ``count_j`` samples),
  ``kind="full"`` overwrites them with ``((W + W_j) / 2) x + (b + b_j) / 2``;
* ``kind="lora"``, a ``[B]`` ``stage`` on a device (or under ``torch.compile``, no host read):
  ``y = W x + (alpha / r) * B_{stage[b]} A_{stage[b]} x`` for every sample ``b`` at once, as one
  rank ``S r`` LoRA whose hidden units outside the sample's stage are masked (no host sync, one
  graph under ``torch.compile``);
* ``kind="full"``, a ``[B]`` device ``stage``: the batch is sorted by stage (one host read of the
  counts), each chunk runs ``((W + W_s) / 2) x + (b + b_s) / 2``, and the outputs are put back.

Where it pays (many rows per weight, a trainable base weight), a LoRA stage runs as the merged
weight ``W + (alpha / r) B_s A_s`` in one matmul instead of the base matmul plus two thin
rank-``r`` ones: equal to float32 rounding, and exactly the base layer while ``B_s = 0``.
With a ``[B]`` ``stage`` every stage's parameters take part in every forward (zero gradients for
a stage absent from the batch), so the parameters a step uses do not depend on the stage values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfm_ext.specialization.routing import Route, StageContext

__all__ = [
    "StageParams",
    "StageLayer",
    "StageLinear",
    "StageConv",
    "StageEmbedding",
    "layer_base",
    "stage_class",
]


class StageParams(nn.Module):
    """The parameters of one stage of one layer (``lora_A``/``lora_B`` or ``weight``/``bias``)."""

    # Declared for type checkers (nn.Module attribute access is typed as Tensor | Module);
    # a stage holds either the LoRA pair or the full copies.
    lora_A: Tensor
    lora_B: Tensor
    weight: Tensor
    bias: Tensor | None


class StageLayer:
    """Mixin over ``nn.Linear``/``nn.ConvNd``/``nn.Embedding``: per-stage forward and merge."""

    stage_params: nn.ModuleDict
    _stage_ctx: StageContext
    _stage_name: str
    _stage_kind: str
    _stage_scaling: float
    _stage_base_cls: type
    _modules: dict[str, nn.Module | None]  # nn.Module's, in the classes this mixes into

    def stage_params_of(self, s: int | str) -> StageParams | None:
        """Stage ``s``'s parameters, or ``None`` for a stage left out of ``stages=``."""
        return cast("StageParams | None", self.stage_params[str(s)] if str(s) in self.stage_params else None)

    def forward(self, x: Tensor) -> Tensor:
        route = self._stage_ctx.route(self._stage_name)
        if route.uniform is not None:
            return self._stage_forward(x, route.uniform)
        single = route.counts is not None and max(route.counts) == route.batch  # any layout: no row to pick
        if not single and (x.ndim == 0 or x.shape[0] != route.batch):
            raise ValueError(
                f"specialised layer {self._stage_name!r} got input of shape {tuple(x.shape)} but the batch "
                f"mixes stages over B={route.batch} samples: the layer input's leading dimension must be B "
                "(this model reshapes the batch before the layer; do not specialise this layer, or run "
                "one stage per batch)"
            )
        if route.counts is not None:
            return self._grouped(x, route)
        if self._stage_kind == "lora":
            return super().forward(x) + self._stage_scaling * self._lora_mixed(x, route)  # type: ignore[misc]
        perm, inverse, counts = route.split()
        chunks = x.index_select(0, perm).split(list(counts))
        # empty chunks too: every stage's parameters take part (zero gradients when absent)
        outs = [self._stage_forward(c, s) for s, c in enumerate(chunks)]
        return torch.cat(outs).index_select(0, inverse)

    def _grouped(self, x: Tensor, route: Route) -> Tensor:
        """Stage counts known on the host: the majority stage on all rows, the others on their rows.

        Rows of another stage ``j`` get ``(alpha / r) (B_j A_j - B_k A_k) x`` added (LoRA: two
        rank-``2 r`` matmuls on ``count_j`` samples; the majority stage's merged weight made the
        rest one full matmul) or are overwritten with stage ``j``'s output (full). A stage with no
        sample still runs on zero rows: its parameters join the graph with zero gradients.
        """
        k = route.major
        shape = x.shape
        x = self._grouped_rows(x)  # a Linear's input as [B * N, in]: rows of the matmul
        y = self._stage_forward(x, k)
        per = x.shape[0] // route.batch
        for j in range(route.num_stages):
            if j == k:
                continue
            rows = route.token_rows(j, per, x.device)
            # A stage without samples runs on zero rows cut from x detached: its parameters join
            # the graph (zero gradients) at no cost to x's gradient (no full-size zeros to add).
            xs = x.index_select(0, rows) if rows.numel() else x.detach()[:0]
            if self._stage_kind == "full":
                y = y.index_copy_(0, rows, self._stage_forward(xs, j))
                continue
            pair = self._correction(j, k)
            if pair is None:  # both stages run the base weights
                continue
            a, b = pair
            # in place: y is this layer's own fresh output (not a view: no copy in backward), and
            # no backward formula reads it
            y = y.index_add_(0, rows, self._lora(xs, a, b), alpha=self._stage_scaling)
        return self._grouped_out(y, shape)

    def _correction(self, j: int, k: int) -> tuple[Tensor, Tensor] | None:
        """``B_j A_j - B_k A_k`` as one rank-``2 r`` pair ``[A_j; A_k]``, ``[B_j, -B_k]`` (``None``: both plain)."""
        pj, pk = self.stage_params_of(j), self.stage_params_of(k)
        pairs = [(p.lora_A, sign * p.lora_B) for p, sign in ((pj, 1.0), (pk, -1.0)) if p is not None]
        if not pairs:
            return None
        if len(pairs) == 1:
            return pairs[0]
        return torch.cat([pa for pa, _ in pairs]), torch.cat([pb for _, pb in pairs], dim=1)

    def _grouped_rows(self, x: Tensor) -> Tensor:
        """``x`` as the rows the layer's matmul runs on, sample-major (identity but for a Linear)."""
        return x

    def _grouped_out(self, y: Tensor, shape: torch.Size) -> Tensor:
        """The output of :meth:`_grouped_rows`' rows in the layer's output layout (input ``shape``)."""
        return y

    def _lora_stack(self) -> tuple[Tensor, Tensor]:
        """``A`` ``[S, *A_s.shape]`` and ``B`` ``[S, *B_s.shape]``; zeros for a stage without LoRA."""
        a, b = [], []
        for s in range(self._stage_ctx.num_stages):
            p = self.stage_params_of(s)
            if p is None:  # a stage left out of ``stages=`` runs the base weights: a zero LoRA
                ref = cast(StageParams, next(iter(self.stage_params.values())))
                a.append(torch.zeros_like(ref.lora_A))
                b.append(torch.zeros_like(ref.lora_B))
            else:
                a.append(p.lora_A)
                b.append(p.lora_B)
        return torch.stack(a), torch.stack(b)

    def _lora_mixed(self, x: Tensor, route: Route) -> Tensor:
        # Every sample runs the rank-r LoRA of its own stage, without a host sync or a
        # data-dependent branch (torch.compile traces one graph): the stage LoRAs are masked per
        # sample, as one LoRA of rank S r whose hidden units outside the sample's stage block are
        # zeroed: two matmuls per layer. A per-sample gather of A_s, B_s with torch.bmm (rank r
        # compute) measured slower on CPU (rank 16: 1.34x vs 1.32x of none; rank 64: 1.97x vs
        # ~1.45x). Every stage's parameters are in the graph; an absent stage gets zero gradients.
        a, b = self._lora_stack()
        r = a.shape[1]
        h = self._lora_hidden(x, a.flatten(0, 1))
        mask = route.rank_mask(r, h.dtype)
        return self._lora_out(h * self._mask_view(mask, h), b.transpose(0, 1).flatten(1, 2))

    def _stage_forward(self, x: Tensor, s: int) -> Tensor:
        p = self.stage_params_of(s)
        if p is None:
            return super().forward(x)  # type: ignore[misc]
        if self._stage_kind == "full":
            base_bias = getattr(self, "bias", None)
            bias = None if base_bias is None else 0.5 * (base_bias + p.bias)
            return self._apply_weights(x, 0.5 * (self.weight + p.weight), bias)  # type: ignore[attr-defined]
        if self._merge_pays(x, p.lora_A):
            return self._apply_weights(x, self._merged_weight(p.lora_A, p.lora_B), getattr(self, "bias", None))
        return super().forward(x) + self._stage_scaling * self._lora(x, p.lora_A, p.lora_B)  # type: ignore[misc]

    def _merge_pays(self, x: Tensor, a: Tensor) -> bool:
        """Whether ``x`` runs cheaper through the merged weight than through the base + LoRA pair.

        Merging costs ``r`` multiply-adds per weight entry, the LoRA pair ``r`` per input and output
        feature of every row: merge when rows x (fan-in + fan-out) > fan-in x fan-out. Not when
        only the LoRA trains: the merged weight's gradient would be a full-size matmul the frozen
        base layer never computes. Decided on shapes and flags only (no tensor values).
        """
        if torch.is_grad_enabled() and a.requires_grad and not self.weight.requires_grad:  # type: ignore[attr-defined]
            return False
        rows, fan_in, fan_out = self._lora_fans(x)
        return rows * (fan_in + fan_out) > fan_in * fan_out

    def _merged_weight(self, a: Tensor, b: Tensor) -> Tensor:
        """``W + (alpha / r) B A`` in the layer's weight layout (``W`` itself, bit for bit, while ``B = 0``)."""
        return self.weight + self._stage_scaling * self._lora_weight(a, b)  # type: ignore[attr-defined]

    def merged_parameters(self, s: int) -> tuple[Tensor, Tensor | None]:
        """The plain layer's ``(weight, bias)`` for stage ``s``."""
        weight, bias = self.weight, getattr(self, "bias", None)  # type: ignore[attr-defined]
        p = self.stage_params_of(s)
        if p is None:
            return weight.detach().clone(), None if bias is None else bias.detach().clone()
        if self._stage_kind == "full":
            return 0.5 * (weight + p.weight).detach(), None if bias is None else 0.5 * (bias + p.bias).detach()
        delta = self._stage_scaling * self._lora_weight(p.lora_A, p.lora_B)
        return (weight + delta).detach(), None if bias is None else bias.detach().clone()

    # per layer type
    def _apply_weights(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _lora(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return self._lora_out(self._lora_hidden(x, a), b)

    def _lora_hidden(self, x: Tensor, a: Tensor) -> Tensor:
        raise NotImplementedError

    def _lora_out(self, h: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def _mask_view(self, mask: Tensor, h: Tensor) -> Tensor:
        """``mask`` ``[B, k r]`` shaped to broadcast against the hidden ``h``."""
        return mask.view(mask.shape[0], *([1] * (h.ndim - 2)), mask.shape[1])

    def _lora_weight(self, a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def _lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def _lora_fans(self, x: Tensor) -> tuple[int, int, int]:
        """``(rows, fan_in, fan_out)`` of the matmul this layer runs on ``x`` (rows approximate for convs)."""
        raise NotImplementedError


def _scaled_(t: Tensor, s: float) -> Tensor:
    """``t * s`` in place; no op for the default LoRA scale ``s = alpha / r = 1`` (exact either way)."""
    return t if s == 1.0 else t.mul_(s)


def _signed_(h: Tensor, terms: tuple[tuple[int, float], ...], ab: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    """``h`` ``[n, sum r]`` with the columns of each negative term negated, in place."""
    off = 0
    for i, sign in terms:
        r = ab[2 * i].shape[0]
        if sign < 0:
            h[:, off : off + r].neg_()
        off += r
    return h


def _stage_grads(ab: tuple[Tensor, ...] | list[Tensor], dab: list[Tensor | None], need: tuple[bool, ...]) -> list[Tensor | None]:
    """The LoRA pairs' gradients; a stage with no row in the batch gets exact zeros (its
    parameters still take part in the step)."""
    return [(torch.zeros_like(t) if d is None else d) if n else None for t, d, n in zip(ab, dab, need)]


class _StageLoRALinear(torch.autograd.Function):
    """A per-stage LoRA ``nn.Linear`` over a batch whose stage counts are on the host, as one op.

    ``x`` ``[M, in]`` (rows grouped by sample), ``W`` ``[out, in]``, stage ``i``'s ``A_i`` ``[r, in]``
    and ``B_i`` ``[out, r]`` (``ab = (A_0, B_0, A_1, B_1, ...)`` over the stages that own LoRA),
    ``s = alpha / r``. ``plan = (s, merged, groups)``:

    * ``merged``: the index ``i`` whose update is merged into the weight, ``W_m = W + s B_i A_i``
      (one full matmul for every row), or ``None`` (``W_m = W``);
    * ``groups``: ``(rows, terms)`` pairs; ``rows`` ``[n]`` (``None``: every row) get
      ``s * sum_(i, sign) sign * (x[rows] A_i^T) B_i^T`` added, the terms stacked into one rank
      ``sum r`` pair.

    The maths of the plain autograd ops ``addmm``, ``linear``, ``index_select``, ``index_add``;
    one graph node instead of ~15 per layer, and backward adds the row terms' input gradient
    into ``dx`` in place instead of building a full-size zero gradient per row gather.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, plan: tuple, *ab: Tensor) -> Tensor:
        s, merged, groups = plan
        w = weight if merged is None else torch.addmm(weight, ab[2 * merged + 1], ab[2 * merged], alpha=s)
        y = F.linear(x, w, bias)  # x is 2-D: a fresh tensor (not a view), updated in place below
        saved: list[Tensor] = []
        for rows, terms in groups:
            if len(terms) == 1:
                a, b = ab[2 * terms[0][0]], ab[2 * terms[0][0] + 1]
            else:
                a = torch.cat([ab[2 * i] for i, _ in terms])
                b = torch.cat([ab[2 * i + 1] for i, _ in terms], dim=1)
            xs = x if rows is None else x.index_select(0, rows)
            h = xs.mm(a.t())
            # a term's sign goes on its hidden units ([n, r], few rows) rather than on B ([out, r]):
            # negation is exact, so the output is the same bit for bit, and backward reads the
            # signed B gradient straight off dys^T h
            _signed_(h, terms, ab)
            if rows is None:
                y.addmm_(h, b.t(), alpha=s)
            else:
                y.index_add_(0, rows, h.mm(b.t()), alpha=s)
            saved += [xs, h, a, b]
        ctx.save_for_backward(x, w, *ab, *saved)
        ctx.plan, ctx.n_ab, ctx.has_bias = plan, len(ab), bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        s, merged, groups = ctx.plan
        x, w, *rest = ctx.saved_tensors
        ab, saved = rest[: ctx.n_ab], rest[ctx.n_ab :]
        need = ctx.needs_input_grad
        need_ab = need[4:]
        dy = dy.contiguous()
        dx = dy.mm(w) if need[0] else None
        dab: list[Tensor | None] = [None] * len(ab)
        dw = None
        if need[1] or (merged is not None and (need_ab[2 * merged] or need_ab[2 * merged + 1])):
            dw = dy.t().mm(x)
        db = dy.sum(0) if ctx.has_bias and need[2] else None
        for g, (rows, terms) in enumerate(groups):
            xs, h, a, b = saved[4 * g : 4 * g + 4]
            dys = dy if rows is None else dy.index_select(0, rows)
            dh = _signed_(_scaled_(dys.mm(b), s), terms, ab)  # [n, sum r]: the unsigned hidden units' gradient
            if dx is not None:
                if rows is None:
                    dx.addmm_(dh, a)
                else:
                    dx.index_add_(0, rows, dh.mm(a))
            da = dh.t().mm(xs)  # [sum r, in]: the stacked A's gradient
            dbs = _scaled_(dys.t().mm(h), s)  # [out, sum r]: the stacked B's gradient (h is signed)
            off = 0
            for i, _ in terms:
                r = ab[2 * i].shape[0]
                parts = (da[off : off + r], dbs[:, off : off + r])
                for j, part in zip((2 * i, 2 * i + 1), parts):
                    dab[j] = part if dab[j] is None else dab[j] + part
                off += r
        if merged is not None and dw is not None:
            # W_m = W + s B A: dA = s B^T dW_m, dB = s dW_m A^T, added (one addmm) to the merged
            # stage's correction gradient when its rows also ran a correction (contiguous results)
            a, b = ab[2 * merged], ab[2 * merged + 1]
            for j, left, right in ((2 * merged, b.t(), dw), (2 * merged + 1, dw, a.t())):
                prev = dab[j]
                dab[j] = _scaled_(left.mm(right), s) if prev is None else torch.addmm(prev, left, right, alpha=s)
        return (dx, dw if need[1] else None, db, None, *_stage_grads(ab, dab, need_ab))


class _StageLoRABlocks(torch.autograd.Function):
    """A per-stage LoRA ``nn.Linear`` over rows grouped by stage in contiguous blocks, as one op.

    ``x`` ``[M, in]``, ``W`` ``[out, in]``, ``ab = (A_0, B_0, A_1, B_1, ...)`` over the stages that
    own LoRA, ``s = alpha / r``. ``plan = (s, blocks)``, ``blocks`` ``(start, stop, i, merged)``
    covering the rows in order: rows ``start:stop`` run LoRA pair ``i`` (``None``: the base
    weights only), either as the merged weight ``W + s B_i A_i`` (``merged``, one matmul; at most
    one block) or as ``W x + s B_i (A_i x)`` (rank ``r`` on these rows only). Against
    :class:`_StageLoRALinear` (rows scattered over the batch) nothing is gathered or scattered, and
    a minority stage's rows run their own rank-``r`` update instead of a rank-``2 r`` correction
    of the merged weight. The merged pair's gradient comes from its block's weight gradient,
    ``dA = s B^T dW_blk``, ``dB = s dW_blk A^T``; ``dW`` is the sum over the blocks.

    Without a merged block (few rows per weight entry, e.g. adaLN modulation or the timestep MLP
    with one row per sample) the base weight runs once over all rows, forward and backward (``y``,
    ``dx``, ``dW``: one matmul each), and each block adds its own rank-``r`` term: such a layer's
    cost is reading and writing the ``[out, in]`` matrices, which a matmul per block would repeat.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, plan: tuple, *ab: Tensor) -> Tensor:
        s, blocks = plan
        whole = not any(merged for *_, merged in blocks)  # every row runs the base weight W
        y = F.linear(x, weight, bias) if whole else x.new_empty(x.shape[0], weight.shape[0])
        w_m = None
        hidden: list[Tensor | None] = []
        for start, stop, i, merged in blocks:
            xs, ys = x[start:stop], y[start:stop]
            if not whole:
                w = weight
                if merged:
                    w = w_m = torch.addmm(weight, ab[2 * i + 1], ab[2 * i], alpha=s)
                if bias is None:
                    torch.mm(xs, w.t(), out=ys)
                else:
                    torch.addmm(bias, xs, w.t(), out=ys)
            h = None
            if i is not None and not merged:
                h = xs.mm(ab[2 * i].t())
                ys.addmm_(h, ab[2 * i + 1].t(), alpha=s)
            hidden.append(h)
        ctx.save_for_backward(x, weight, w_m, *ab, *[h for h in hidden if h is not None])
        ctx.plan, ctx.n_ab, ctx.has_bias, ctx.whole = plan, len(ab), bias is not None, whole
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        s, blocks = ctx.plan
        whole = ctx.whole
        x, weight, w_m, *rest = ctx.saved_tensors
        ab, hidden = rest[: ctx.n_ab], iter(rest[ctx.n_ab :])
        need = ctx.needs_input_grad
        need_ab = need[4:]
        dy = dy.contiguous()
        dx = None
        if need[0]:
            dx = dy.mm(weight) if whole else torch.empty_like(x)
        dab: list[Tensor | None] = [None] * len(ab)
        dw = dy.t().mm(x) if whole and need[1] else None
        # the merged block first: its weight gradient gives its pair's gradient, then takes the
        # other blocks' weight gradients in place
        for start, stop, i, merged in sorted(blocks, key=lambda blk: not blk[3]):
            xs, dys = x[start:stop], dy[start:stop]
            if dx is not None and not whole:
                torch.mm(dys, w_m if merged else weight, out=dx[start:stop])
            if merged and (need[1] or need_ab[2 * i] or need_ab[2 * i + 1]):
                dw_blk = dys.t().mm(xs)
                if need_ab[2 * i]:
                    dab[2 * i] = _scaled_(ab[2 * i + 1].t().mm(dw_blk), s)
                if need_ab[2 * i + 1]:
                    dab[2 * i + 1] = _scaled_(dw_blk.mm(ab[2 * i].t()), s)
                dw = dw_blk if dw is None else dw.add_(dw_blk)
            elif need[1] and not whole:
                dw = dys.t().mm(xs) if dw is None else dw.addmm_(dys.t(), xs)
            if i is not None and not merged:
                h = next(hidden)
                dh = _scaled_(dys.mm(ab[2 * i + 1]), s)  # [n, r]
                if dx is not None:
                    dx[start:stop].addmm_(dh, ab[2 * i])
                dab[2 * i] = dh.t().mm(xs)
                dab[2 * i + 1] = _scaled_(dys.t().mm(h), s)
        db = dy.sum(0) if ctx.has_bias and need[2] else None
        return (dx, dw if need[1] else None, db, None, *_stage_grads(ab, dab, need_ab))


class StageLinear(StageLayer):
    def _blocks(self, x2: Tensor, route: Route, index: dict[int, int], ab: list[Tensor]) -> tuple:
        """``_StageLoRABlocks``' plan for a batch grouped by stage (``route.ordered``)."""
        per = x2.shape[0] // route.batch
        k = route.major
        merge = k in index and self._merge_pays(x2, ab[2 * index[k]])
        blocks = []
        for j in range(route.num_stages):
            start, stop = route.block(j, per)
            if stop > start:
                blocks.append((start, stop, index.get(j), merge and j == k))
        return (self._stage_scaling, tuple(blocks))

    def _grouped(self, x: Tensor, route: Route) -> Tensor:
        # LoRA: one fused op (_StageLoRALinear); full, autocast or mixed dtypes: the generic path
        # (the same maths in plain autograd ops).
        if self._stage_kind != "lora" or torch.is_autocast_enabled(x.device.type):
            return super()._grouped(x, route)
        # one pass over the stage modules (this runs for every layer of every step)
        stage_mods = self.stage_params._modules
        index: dict[int, int] = {}
        ab: list[Tensor] = []
        for j in range(route.num_stages):
            p = stage_mods.get(str(j))
            if p is not None:
                index[j] = len(index)
                ab += [p.lora_A, p.lora_B]  # type: ignore[list-item]
        weight = self.weight  # type: ignore[attr-defined]
        dtype = x.dtype
        if weight.dtype != dtype or any(t.dtype != dtype for t in ab):
            return super()._grouped(x, route)
        x2 = x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x
        if route.ordered:
            y = _StageLoRABlocks.apply(x2, weight, self.bias, self._blocks(x2, route, index, ab), *ab)  # type: ignore[attr-defined]
            return y.view(*x.shape[:-1], y.shape[-1])
        per = x2.shape[0] // route.batch
        k, counts = route.major, cast("tuple[int, ...]", route.counts)
        # Every stage's A, B are inputs of the op, also a stage with no sample in the batch (no
        # group: nothing computed, zero gradients), so every step uses the same parameters.
        groups: list[tuple[Tensor | None, tuple[tuple[int, float], ...]]] = []
        merged = index[k] if k in index and self._merge_pays(x2, ab[2 * index[k]]) else None
        for j in range(route.num_stages):
            if merged is not None:
                # the majority stage is merged into every row: stage j's rows get + its own LoRA
                # - the majority stage's
                terms = tuple((index[i], sign) for i, sign in ((j, 1.0), (k, -1.0)) if i in index)
                if j != k and terms and counts[j]:
                    groups.append((route.token_rows(j, per, x.device), terms))
            elif j in index and counts[j]:  # each stage's LoRA on its own rows (all rows: no gather)
                rows = None if counts[j] == route.batch else route.token_rows(j, per, x.device)
                groups.append((rows, ((index[j], 1.0),)))
        plan = (self._stage_scaling, merged, tuple(groups))
        y = _StageLoRALinear.apply(x2, weight, self.bias, plan, *ab)  # type: ignore[attr-defined]
        return y.view(*x.shape[:-1], y.shape[-1])

    def _apply_weights(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def _lora_hidden(self, x: Tensor, a: Tensor) -> Tensor:
        return F.linear(x, a)

    def _lora_out(self, h: Tensor, b: Tensor) -> Tensor:
        return F.linear(h, b)

    def _lora_weight(self, a: Tensor, b: Tensor) -> Tensor:
        return b @ a

    def _grouped_rows(self, x: Tensor) -> Tensor:
        # 2-D, so that the matmul's output is not a view (an in-place update of a view costs a
        # full copy of the gradient in backward)
        return x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x

    def _grouped_out(self, y: Tensor, shape: torch.Size) -> Tensor:
        return y.view(*shape[:-1], y.shape[-1])

    def _merged_weight(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.addmm(self.weight, b, a, alpha=self._stage_scaling)  # type: ignore[attr-defined]

    def _lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, self.in_features), (self.out_features, rank)  # type: ignore[attr-defined]

    def _lora_fans(self, x: Tensor) -> tuple[int, int, int]:
        n_in, n_out = self.in_features, self.out_features  # type: ignore[attr-defined]
        return x.numel() // max(n_in, 1), n_in, n_out


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class StageConv(StageLayer):
    def _apply_weights(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv_forward(x, weight, bias)  # type: ignore[attr-defined]

    # A is a conv with the layer's kernel/stride/padding into r channels, B a 1x1 conv (peft's layout)
    def _lora_hidden(self, x: Tensor, a: Tensor) -> Tensor:
        return self._conv_forward(x, a, None)  # type: ignore[attr-defined]

    def _lora_out(self, h: Tensor, b: Tensor) -> Tensor:
        return _CONV_FN[b.ndim - 2](h, b)

    def _mask_view(self, mask: Tensor, h: Tensor) -> Tensor:
        return mask.view(*mask.shape, *([1] * (h.ndim - 2)))  # channels first

    def _lora_weight(self, a: Tensor, b: Tensor) -> Tensor:
        return (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])

    def _lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        k = tuple(self.kernel_size)  # type: ignore[attr-defined]
        return (rank, self.in_channels, *k), (self.out_channels, rank, *(1,) * len(k))  # type: ignore[attr-defined]

    def _lora_fans(self, x: Tensor) -> tuple[int, int, int]:
        taps = math.prod(self.kernel_size)  # type: ignore[attr-defined]
        # output positions ~ input positions / stride (padding and dilation aside)
        rows = x.numel() // max(self.in_channels * math.prod(self.stride), 1)  # type: ignore[attr-defined]
        return rows, self.in_channels * taps, self.out_channels  # type: ignore[attr-defined]


class StageEmbedding(StageLayer):
    def _apply_weights(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.embedding(x, weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)  # type: ignore[attr-defined]

    def _lora_hidden(self, x: Tensor, a: Tensor) -> Tensor:
        return F.embedding(x, a.t())

    def _lora_out(self, h: Tensor, b: Tensor) -> Tensor:
        return h @ b.t()

    def _lora_weight(self, a: Tensor, b: Tensor) -> Tensor:
        return (b @ a).t()

    def _lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, self.num_embeddings), (self.embedding_dim, rank)  # type: ignore[attr-defined]

    def _lora_fans(self, x: Tensor) -> tuple[int, int, int]:
        # a lookup: the LoRA pair costs ~r per output feature and row, the merge r per table entry
        return x.numel(), self.num_embeddings, self.embedding_dim  # type: ignore[attr-defined]


def _plain_conv(m: nn.Module, cls: type[nn.Module]) -> bool:
    return type(m).forward is cls.forward and getattr(m, "groups", None) == 1


_MIXINS: tuple[tuple[type[nn.Module], type[StageLayer], Callable[[nn.Module], bool]], ...] = (
    (nn.Linear, StageLinear, lambda m: type(m).forward is nn.Linear.forward),
    (nn.Conv1d, StageConv, lambda m: _plain_conv(m, nn.Conv1d)),
    (nn.Conv2d, StageConv, lambda m: _plain_conv(m, nn.Conv2d)),
    (nn.Conv3d, StageConv, lambda m: _plain_conv(m, nn.Conv3d)),
    (nn.Embedding, StageEmbedding, lambda m: type(m).forward is nn.Embedding.forward and getattr(m, "max_norm", None) is None),
)
_SWAPPED: dict[type, type] = {}


def layer_base(module: nn.Module) -> tuple[type[StageLayer], bool] | None:
    """``(mixin, supported)`` for a Linear/ConvNd/Embedding ``module`` (``None`` for any other module).

    ``supported`` is false for a subclass that overrides ``forward``, a grouped convolution or an
    Embedding with ``max_norm``: their forward is not the plain ``F.linear``/``conv``/``embedding``.
    """
    for base, mixin, ok in _MIXINS:
        if isinstance(module, base):
            return mixin, ok(module)
    return None


def stage_class(cls: type, mixin: type[StageLayer]) -> type:
    """The class ``Stage<cls>`` (``mixin`` over ``cls``), made once per ``cls``."""
    # Subclasses keep the original class (MultiScaleHead stays a MultiScaleHead with its helpers).
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"Stage{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _SWAPPED[cls]

