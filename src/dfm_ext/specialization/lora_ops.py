"""Fused autograd ops of a per-stage LoRA ``nn.Linear`` whose batch's stage counts are on the host.

:class:`~dfm_ext.specialization.layer_types.StageLinear` (``kind="lora"``) runs one of these per
forward instead of ~15 plain autograd nodes, when the ``[B]`` ``stage`` route's counts were read
on the host (:class:`~dfm_ext.specialization.routing.Route`):

* :class:`StageLoRABlocks`: the batch is grouped by stage (contiguous blocks of rows, the
  ``DFMTransformer`` default): each block runs its own stage's LoRA (or the merged weight);
* :class:`StageLoRARows`: the batch is in the caller's order: each stage's rows are gathered by
  index and corrected on their own.

Both are the maths of the plain ops (``addmm``, ``linear``, ``index_select``, ``index_add``) with
a hand-written backward; every stage's LoRA pair is an input, so a stage with no row in the batch
gets exact zero gradients. The layer builds the ``plan`` (see each op); this module knows nothing
of layers or routes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["StageLoRABlocks", "StageLoRARows"]


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


class StageLoRARows(torch.autograd.Function):
    """A per-stage LoRA ``nn.Linear`` over a batch whose stage counts are on the host, as one op.

    The batch is in the caller's order: a stage's rows are scattered over it, picked by index.
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


class StageLoRABlocks(torch.autograd.Function):
    """A per-stage LoRA ``nn.Linear`` over rows grouped by stage in contiguous blocks, as one op.

    ``x`` ``[M, in]``, ``W`` ``[out, in]``, ``ab = (A_0, B_0, A_1, B_1, ...)`` over the stages that
    own LoRA, ``s = alpha / r``. ``plan = (s, blocks)``, ``blocks`` ``(start, stop, i, merged)``
    covering the rows in order: rows ``start:stop`` run LoRA pair ``i`` (``None``: the base
    weights only), either as the merged weight ``W + s B_i A_i`` (``merged``, one matmul; at most
    one block) or as ``W x + s B_i (A_i x)`` (rank ``r`` on these rows only). Against
    :class:`StageLoRARows` (rows scattered over the batch) nothing is gathered or scattered, and
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

