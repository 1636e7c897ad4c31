"""The per-stage layer types and the class swap that makes a layer one.

:class:`StageLinear`, :class:`StageConv` and :class:`StageEmbedding` give the
:class:`~dfm_ext.specialization.layers.StageLayer` mixin each layer type's maths (apply weights,
the LoRA pair's layout, its cost); a LoRA :class:`StageLinear` whose batch's stage counts are on
the host runs one fused op of :mod:`~dfm_ext.specialization.lora_ops` and builds its plan here.
:func:`layer_base` says which mixin fits a module and whether its forward is the plain one;
:func:`stage_class` makes ``Stage<Class>``, the mixin over the module's own class, which
:func:`~dfm_ext.specialization.specialize` swaps in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfm_ext.specialization.layers import StageLayer
from dfm_ext.specialization.lora_ops import StageLoRABlocks, StageLoRARows
from dfm_ext.specialization.routing import Route

__all__ = ["StageConv", "StageEmbedding", "StageLinear", "layer_base", "stage_class"]


class StageLinear(StageLayer):
    """``nn.Linear`` per stage: ``x`` ``[..., in]`` -> ``[..., out]``; LoRA ``A_s`` ``[r, in]``, ``B_s`` ``[out, r]``.

    With host-read stage counts a LoRA layer runs one fused op (:mod:`~dfm_ext.specialization.lora_ops`).
    """

    def _blocks(self, x2: Tensor, route: Route, index: dict[int, int], ab: list[Tensor]) -> tuple:
        """:class:`~dfm_ext.specialization.lora_ops.StageLoRABlocks`' plan for a batch grouped by stage (``route.ordered``)."""
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
        # LoRA: one fused op (StageLoRABlocks, StageLoRARows); full, autocast or mixed dtypes: the generic path
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
            y = StageLoRABlocks.apply(x2, weight, self.bias, self._blocks(x2, route, index, ab), *ab)  # type: ignore[attr-defined]
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
        y = StageLoRARows.apply(x2, weight, self.bias, plan, *ab)  # type: ignore[attr-defined]
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
    """``nn.Conv1d/2d/3d`` per stage (``groups=1``); LoRA ``A_s`` a conv into ``r`` channels, ``B_s`` a 1x1 conv."""

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
    """``nn.Embedding`` per stage: LoRA ``A_s`` ``[r, num_embeddings]``, ``B_s`` ``[embedding_dim, r]``."""

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

