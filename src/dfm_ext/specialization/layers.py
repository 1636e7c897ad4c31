"""Per-stage layers: the :class:`StageLayer` mixin that routes a Linear/ConvNd/Embedding by stage.

:func:`dfm_ext.specialization.specialize` swaps a targeted layer's class for ``Stage<Class>``
(:func:`~dfm_ext.specialization.layer_types.stage_class`: the :class:`StageLayer` mixin, through
its per-type subclass in :mod:`~dfm_ext.specialization.layer_types`, over the original class, so
subclasses keep their helpers) and gives it ``stage_params``, one :class:`StageParams` per stage
that owns parameters. The forward reads the stage route of the forward in progress
(:class:`~dfm_ext.specialization.routing.Route`):

* an int ``stage`` ``s``: one call with stage ``s``'s parameters (:meth:`StageLayer._stage_forward`);
* a ``[B]`` ``stage`` whose counts were read on the host, the batch in stage order (a CPU
  tensor outside ``torch.compile``; ``DFMTransformer`` inputs are reordered by the routing):
  ``kind="lora"`` Linear layers run each stage's block of rows on its own
  (:class:`~dfm_ext.specialization.lora_ops.StageLoRABlocks`): the stage with the most samples,
  ``k``, as the merged weight, every other stage as ``W x + (alpha / r) B_j A_j x`` (rank ``r``,
  on its rows only);
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

This module holds what every layer type shares (the routes, the merge, :class:`StageParams`);
:mod:`~dfm_ext.specialization.layer_types` each type's maths, :mod:`~dfm_ext.specialization.lora_ops`
the fused LoRA ops of a Linear.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from dfm_ext.specialization.routing import Route, StageContext

__all__ = ["StageLayer", "StageParams"]


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
        if torch.compiler.is_compiling():  # a compiled layer (e.g. a block compiled on its own under FSDP2)
            return self._device_routed(x, route)  # routes on the device: one graph whatever the stage mix
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
        return self._device_routed(x, route)

    def _device_routed(self, x: Tensor, route: Route) -> Tensor:
        """Every sample routed by the ``[B]`` stage on the device (no host value read, no data-dependent branch)."""
        if self._stage_kind == "lora":
            return super().forward(x) + self._stage_scaling * self._lora_mixed(x, route)  # type: ignore[misc]
        return self._full_masked(x, route)

    def _full_masked(self, x: Tensor, route: Route) -> Tensor:
        """Full copies with the stages on the device (or under ``torch.compile``): every stage's layer
        on every sample, each output kept where ``stage[b] == s``. ``S`` times the layer's compute, but no
        host read (splitting by stage would need the counts: a sync per forward, a graph break) and one
        graph whatever the batch's stage mix; an absent stage gets exact zero gradients."""
        onehot = route.onehot  # [B, S]
        y: Tensor | None = None
        for s in range(route.num_stages):
            ys = self._stage_forward(x, s)
            keep = onehot[:, s].to(ys.dtype).reshape(-1, *([1] * (ys.ndim - 1)))
            y = ys * keep if y is None else y + ys * keep
        assert y is not None
        return y

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
            if self._stage_kind == "full":  # (under autocast the stages' outputs may differ in dtype from y's)
                y = y.index_copy_(0, rows, self._stage_forward(xs, j).to(y.dtype))
                continue
            pair = self._correction(j, k)
            if pair is None:  # both stages run the base weights
                continue
            a, b = pair
            # in place: y is this layer's own fresh output (not a view: no copy in backward), and
            # no backward formula reads it
            y = y.index_add_(0, rows, self._lora(xs, a, b).to(y.dtype), alpha=self._stage_scaling)
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
