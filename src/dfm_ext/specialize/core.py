"""Per-stage parameter specialisation: stage experts inside one model (paper 4.2, Table 1d, F).

:func:`specialize` gives chosen layers extra parameters per stage and routes every sample to
the parameters of the stage it is generating, read from the ``stage`` ``[B]`` argument the
model already receives. Two kinds:

* ``kind="full"``: stage ``s`` of a layer with base weight ``W`` owns a full copy ``W_s``
  (initialised to ``W``) and runs with the average ``(W + W_s) / 2`` ("stage weights averaged
  with the base weights"); likewise the bias.
* ``kind="lora"``: stage ``s`` owns a low-rank pair ``A_s`` ``[r, in]``, ``B_s`` ``[out, r]``
  (``A_s`` Kaiming-uniform, ``B_s = 0``) and runs with ``W + (alpha / r) * B_s @ A_s``.

Both start as the unchanged function. Layers are chosen by *group*, with the paper's groups
``mod`` (adaLN modulation), ``proj`` (patch embedding and output projection), ``cond`` (timestep,
class and text conditioning), ``attn``, ``mlp``, and ``all`` (their union); the module-name
patterns in :data:`GROUP_PATTERNS` cover the reference DiT and the diffusers DiT, PixArt, SD3,
Flux and CogVideoX transformers, wrapped or not. Other models pass ``patterns`` or a predicate.

Routing: a forward pre-hook on the top model reads ``stage`` and the specialised layers split
their input by stage (one matmul per stage present, no loop over samples), so a batch that mixes
stages, the normal case in DFM training, runs every sample with its own stage's parameters.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Tiny(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    ...     def forward(self, x, stage):
    ...         return self.mlp(x)
    >>> model = Tiny()
    >>> x, stage = torch.randn(3, 5, 4), torch.tensor([0, 1, 1])
    >>> before = model(x, stage)
    >>> spec = specialize(model, kind="lora", targets="mlp", rank=2, num_stages=2)
    >>> spec.parameters_per_group
    {'mlp': 96}
    >>> torch.allclose(model(x, stage), before)
    True
    >>> expert = spec.merge(1)  # a plain model for stage 1
    >>> type(expert.mlp[0]).__name__
    'Linear'
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

__all__ = [
    "GROUPS",
    "GROUP_PATTERNS",
    "StageSpecialization",
    "specialize",
    "merge",
    "save_stage_parameters",
    "load_stage_parameters",
    "save_specialization",
    "load_specialization",
    "restore_specialization",
    "specialization_record",
    "export_peft_lora",
    "checkpoint",
    "is_specialized",
    "routing_active",
    "stage_parameters_detached",
]

Kind = Literal["lora", "full"]
Train = Literal["all", "stage"]
Predicate = Callable[[str, nn.Module], bool]

#: The paper's layer groups, in the order a layer is assigned (first match wins).
GROUPS: tuple[str, ...] = ("cond", "mod", "attn", "mlp", "proj")

#: Regular expressions (``re.search`` on the full module name) per group. Covered names:
#: reference DiT/SiT (``x_embedder``, ``t_embedder``, ``y_embedder``, ``blocks.i.attn``,
#: ``blocks.i.mlp``, ``adaLN_modulation``, ``final_layer``) and diffusers DiT/PixArt/SD3/Flux/
#: CogVideoX (``pos_embed.proj``, ``time_text_embed``, ``norm1.linear``, ``attn1.to_q``,
#: ``ff.net``, ``proj_out``, ...). Flux's single blocks fuse the attention output with the MLP
#: in ``proj_out``; it counts as ``mlp`` together with ``proj_mlp``.
GROUP_PATTERNS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "cond": (
            r"(^|\.)t_embedder(\.|$)",
            r"(^|\.)y_embedder(\.|$)",
            r"(^|\.)time_text_embed\.",
            r"(^|\.)timestep_embedder\.",
            r"(^|\.)class_embedder\.",
            r"(^|\.)adaln_single\.emb\.",
            r"(^|\.)caption_projection\.",
            r"(^|\.)context_embedder$",
            r"(^|\.)time_embedding\.",
            r"(^|\.)patch_embed\.text_proj$",
        ),
        "mod": (
            r"(^|\.)adaLN_modulation\.",
            r"(^|\.)norm[^.]*\.linear$",
            r"(^|\.)adaln_single\.linear$",
            r"(^|\.)proj_out_1$",
        ),
        "attn": (r"(^|\.)attn\d*\.",),
        "mlp": (
            r"(^|\.)mlp\.",
            r"(^|\.)ff(_context)?\.",
            r"(^|\.)single_transformer_blocks\.\d+\.proj_(mlp|out)$",
        ),
        "proj": (
            r"(^|\.)x_embedder(\.|$)",
            r"(^|\.)final_layer\.linear$",
            r"(^|\.)(pos_embed|patch_embed)\.proj(\.proj)?$",
            r"(^|\.)proj_out(_2)?$",
        ),
    }
)

_CONTEXT_ATTR = "_dfm_stage_context"
_PARAMS_ATTR = "stage_params"
_META_PREFIX = "dfm_ext."

#: File names of :func:`save_specialization` (kept from the FLUX recipe's first exports, which
#: used them for per-stage LoRA only; they hold ``kind="full"`` records too).
STAGE_WEIGHTS_FILE = "stage_parameters.safetensors"
STAGE_RECORD_FILE = "stage_lora.json"


# --------------------------------------------------------------------------------------------
# routing context


class _Route:
    """How one forward's batch splits by stage; computed once per forward, read by every layer.

    Built without a device-to-host sync: a tensor ``stage`` keeps its values on its device
    (``index`` ``[B]``, ``onehot`` ``[B, S]``) and the LoRA layers route by masking per sample. Only ``kind="full"`` layers need the per-stage counts on the host (:meth:`split`,
    computed once per forward and shared by all such layers).
    """

    def __init__(self, batch: int, uniform: int | None, index: Tensor | None = None, num_stages: int = 0) -> None:
        self.batch = batch
        self.uniform = uniform  # the stage of every sample when known on the host (an int stage)
        self.index = index  # [B] long, stage[b]
        self.num_stages = num_stages
        self._onehot: Tensor | None = None
        self._split: tuple[Tensor, Tensor, tuple[int, ...]] | None = None

    @property
    def onehot(self) -> Tensor:
        """``[B, S]`` bool, ``stage[b] == s``."""
        if self._onehot is None:
            idx = self.index
            self._onehot = idx[:, None] == torch.arange(self.num_stages, device=idx.device)[None, :]  # type: ignore[index]
        return self._onehot

    def split(self) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        """``(perm, inverse, counts)``: sample order grouped by stage, its inverse, samples per stage.

        ``counts`` is read on the host (one sync for a device ``stage``, once per forward).
        """
        if self._split is None:
            idx = self.index
            counts = tuple(int(c) for c in torch.bincount(idx, minlength=self.num_stages).tolist())  # type: ignore[arg-type]
            perm = torch.argsort(idx, stable=True)  # type: ignore[arg-type]
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(self.batch, device=perm.device)
            self._split = (perm, inverse, counts)
        return self._split


class _StageContext:
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
        self._calls: list[_Route | None] = []
        self._manual: list[_Route] = []
        self._replay: list[_Route] = []  # routes re-installed by an activation-checkpoint recompute

    def make_route(self, stage: object) -> _Route:
        s = self.num_stages
        if isinstance(stage, bool) or not isinstance(stage, (int, Tensor)):
            raise TypeError(f"stage must be an int or an integer tensor [B], got {type(stage).__name__}")
        if isinstance(stage, int):
            if not 0 <= stage < s:
                raise ValueError(f"stage must be in [0, {s - 1}], got {stage}")
            return _Route(batch=-1, uniform=stage)
        if stage.dtype.is_floating_point or stage.dtype.is_complex or stage.dtype == torch.bool:
            raise TypeError(f"stage must be an integer tensor, got dtype {stage.dtype}")
        if stage.ndim != 1 or stage.shape[0] == 0:
            raise ValueError(f"stage must have shape [B] with B >= 1, got {tuple(stage.shape)}")
        # Values are read where they already are on the host (a CPU tensor, outside
        # torch.compile): checked, and a single-stage batch takes the plain path. A device tensor
        # is not read back (no sync per training step): every batch takes the mixed path, and
        # the range is asserted on the device (asynchronously; it fails at the next sync).
        batch = stage.shape[0]
        if stage.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = (int(v) for v in torch.stack([stage.min(), stage.max()]).tolist())
            if lo < 0 or hi >= s:
                raise ValueError(f"stage values must be in [0, {s - 1}], got min {lo} max {hi}")
            if lo == hi:
                return _Route(batch=batch, uniform=lo)
        elif not torch.compiler.is_compiling():
            torch._assert_async(((stage >= 0) & (stage < s)).all(), f"stage values must be in [0, {s - 1}]")
        return _Route(batch=batch, uniform=None, index=stage.long(), num_stages=s)

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
        self._calls.append(route)
        _ACTIVE.append((self, route))
        return (args, kwargs) if self.consume else None

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._calls:
            self._calls.pop()
            _ACTIVE.pop()

    @contextlib.contextmanager
    def manual(self, stage: int | Tensor) -> Iterator[None]:
        route = self.make_route(stage)
        self._manual.append(route)
        _ACTIVE.append((self, route))
        try:
            yield
        finally:
            self._manual.pop()
            _ACTIVE.pop()

    def current(self) -> _Route | None:
        """The route of the forward in progress (None when the model runs no routed forward)."""
        if self._replay:
            return self._replay[-1]
        if self._calls and self._calls[-1] is not None:
            return self._calls[-1]
        return self._manual[-1] if self._manual else None

    def route(self, layer: str) -> _Route:
        route = self.current()
        if route is not None:
            return route
        raise RuntimeError(
            f"layer {layer!r} is specialised per stage but ran without a stage: call the specialised "
            f"model with {self.stage_arg}=<LongTensor [B]>, or wrap the call in `handle.route(stage)`"
        )


#: (context, route) of every routed forward (or ``route()`` block) in progress, innermost last.
_ACTIVE: list[tuple[_StageContext, _Route | None]] = []


def routing_active() -> bool:
    """Whether a specialised model's forward is running now (its per-sample stage routing is set)."""
    return any(route is not None for _, route in _ACTIVE)


@contextlib.contextmanager
def _replaying(routes: dict[_StageContext, _Route]) -> Iterator[None]:
    for ctx, route in routes.items():
        ctx._replay.append(route)
    try:
        yield
    finally:
        for ctx in routes:
            ctx._replay.pop()


def _stage_context_fn() -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
    # Called when the checkpointed segment first runs: remember each specialised model's route
    # then, and re-install it while the segment is recomputed in backward, when the model's
    # forward (and its stage pre-hook) is long over.
    routes: dict[_StageContext, _Route] = {}
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
    if _ACTIVE:
        kwargs = {"context_fn": _stage_context_fn, **kwargs}
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)


# --------------------------------------------------------------------------------------------
# specialised layers (the original layer's class, swapped for a subclass that routes by stage)


class _StageParams(nn.Module):
    """The parameters of one stage of one layer (``lora_A``/``lora_B`` or ``weight``/``bias``)."""


class _StageLayer:
    """Mixin over ``nn.Linear``/``nn.ConvNd``/``nn.Embedding``: per-stage forward and merge."""

    stage_params: nn.ModuleDict
    _stage_ctx: _StageContext
    _stage_name: str
    _stage_kind: str
    _stage_scaling: float
    _stage_base_cls: type

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        route = self._stage_ctx.route(self._stage_name)
        if route.uniform is not None:
            return self._stage_forward(x, route.uniform)
        if x.ndim == 0 or x.shape[0] != route.batch:
            raise ValueError(
                f"specialised layer {self._stage_name!r} got input of shape {tuple(x.shape)} but the batch "
                f"mixes stages over B={route.batch} samples: the layer input's leading dimension must be B "
                "(this model reshapes the batch before the layer; do not specialise this layer, or run "
                "one stage per batch)"
            )
        if self._stage_kind == "lora":
            return super().forward(x) + self._stage_scaling * self._lora_mixed(x, route)  # type: ignore[misc]
        perm, inverse, counts = route.split()
        chunks = x.index_select(0, perm).split(list(counts))
        outs = [self._stage_forward(c, s) for s, c in enumerate(chunks) if c.shape[0] > 0]
        return torch.cat(outs).index_select(0, inverse)

    def _lora_stack(self) -> tuple[Tensor, Tensor]:
        """``A`` ``[S, *A_s.shape]`` and ``B`` ``[S, *B_s.shape]``; zeros for a stage without LoRA."""
        a, b = [], []
        for s in range(self._stage_ctx.num_stages):
            p = self.stage_params[str(s)] if str(s) in self.stage_params else None
            if p is None:  # a stage left out of ``stages=`` runs the base weights: a zero LoRA
                ref = next(iter(self.stage_params.values()))
                a.append(torch.zeros_like(ref.lora_A))
                b.append(torch.zeros_like(ref.lora_B))
            else:
                a.append(p.lora_A)
                b.append(p.lora_B)
        return torch.stack(a), torch.stack(b)

    def _lora_mixed(self, x: Tensor, route: _Route) -> Tensor:
        # Every sample runs the rank-r LoRA of its own stage, without a host sync or a
        # data-dependent branch (torch.compile traces one graph): the stage LoRAs are masked per
        # sample, as one LoRA of rank S r whose hidden units outside the sample's stage block are
        # zeroed: two matmuls per layer. A per-sample gather of A_s, B_s with torch.bmm (rank r
        # compute) measured slower on CPU (rank 16: 1.34x vs 1.32x of none; rank 64: 1.97x vs
        # ~1.45x). Every stage's parameters are in the graph; an absent stage gets zero gradients.
        a, b = self._lora_stack()
        s, r = a.shape[0], a.shape[1]
        h = self._lora_hidden(x, a.flatten(0, 1))
        mask = route.onehot.repeat_interleave(r, dim=1).to(h.dtype)
        return self._lora_out(h * self._mask_view(mask, h), b.transpose(0, 1).flatten(1, 2))

    def _stage_forward(self, x: Tensor, s: int) -> Tensor:
        p = self.stage_params[str(s)] if str(s) in self.stage_params else None
        if p is None:
            return super().forward(x)  # type: ignore[misc]
        if self._stage_kind == "full":
            base_bias = getattr(self, "bias", None)
            bias = None if base_bias is None else 0.5 * (base_bias + p.bias)
            return self._apply_weights(x, 0.5 * (self.weight + p.weight), bias)  # type: ignore[attr-defined]
        return super().forward(x) + self._stage_scaling * self._lora(x, p.lora_A, p.lora_B)  # type: ignore[misc]

    def merged_parameters(self, s: int) -> tuple[Tensor, Tensor | None]:
        """The plain layer's ``(weight, bias)`` for stage ``s``."""
        weight, bias = self.weight, getattr(self, "bias", None)  # type: ignore[attr-defined]
        if str(s) not in self.stage_params:
            return weight.detach().clone(), None if bias is None else bias.detach().clone()
        p = self.stage_params[str(s)]
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


class _StageLinear(_StageLayer):
    def _apply_weights(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def _lora_hidden(self, x: Tensor, a: Tensor) -> Tensor:
        return F.linear(x, a)

    def _lora_out(self, h: Tensor, b: Tensor) -> Tensor:
        return F.linear(h, b)

    def _lora_weight(self, a: Tensor, b: Tensor) -> Tensor:
        return b @ a

    def _lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, self.in_features), (self.out_features, rank)  # type: ignore[attr-defined]


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _StageConv(_StageLayer):
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


class _StageEmbedding(_StageLayer):
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


_MIXINS: tuple[tuple[type[nn.Module], type[_StageLayer], Callable[[nn.Module], bool]], ...] = (
    (nn.Linear, _StageLinear, lambda m: type(m).forward is nn.Linear.forward),
    (nn.Conv1d, _StageConv, lambda m: type(m).forward is nn.Conv1d.forward and m.groups == 1),
    (nn.Conv2d, _StageConv, lambda m: type(m).forward is nn.Conv2d.forward and m.groups == 1),
    (nn.Conv3d, _StageConv, lambda m: type(m).forward is nn.Conv3d.forward and m.groups == 1),
    (nn.Embedding, _StageEmbedding, lambda m: type(m).forward is nn.Embedding.forward and m.max_norm is None),
)
_SWAPPED: dict[type, type] = {}


def _layer_base(module: nn.Module) -> tuple[type[_StageLayer], bool] | None:
    for base, mixin, ok in _MIXINS:
        if isinstance(module, base):
            return mixin, ok(module)
    return None


def _stage_class(cls: type, mixin: type[_StageLayer]) -> type:
    # Subclasses keep the original class (MultiScaleHead stays a MultiScaleHead with its helpers).
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"Stage{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _SWAPPED[cls]


# --------------------------------------------------------------------------------------------
# the handle


@dataclass(frozen=True)
class StageSpecialization:
    """What :func:`specialize` attached; also the handle to merge, save, load and export.

    Attributes:
        kind: ``"lora"`` or ``"full"``.
        rank: LoRA rank ``r`` (``None`` for ``"full"``).
        alpha: LoRA alpha; the update is scaled by ``alpha / rank`` (``None`` for ``"full"``).
        num_stages: ``S``, the number of stages the model routes.
        stages: the stages that own parameters; other stages run the base weights.
        train: ``"all"`` (everything trainable) or ``"stage"`` (only stage parameters).
        layers: specialised module name -> group.
        parameters_per_group: group -> number of stage parameters, all stages together.
        model: the specialised model.
    """

    kind: str
    rank: int | None
    alpha: float | None
    num_stages: int
    stages: tuple[int, ...]
    train: str
    layers: Mapping[str, str]
    parameters_per_group: dict[str, int]
    model: nn.Module = field(repr=False, compare=False)

    @property
    def num_parameters(self) -> int:
        """Stage parameters in total (all groups and stages)."""
        return sum(self.parameters_per_group.values())

    @property
    def parameters_per_stage(self) -> int:
        """Stage parameters owned by one stage."""
        return self.num_parameters // len(self.stages)

    def stage_parameters(self, stage: int | None = None) -> list[nn.Parameter]:
        """The parameters of ``stage`` (or of every stage), e.g. for an optimiser param group."""
        return _stage_parameters(self.model, stage)

    def route(self, stage: int | Tensor) -> contextlib.AbstractContextManager[None]:
        """Route calls that carry no ``stage`` (e.g. a plain diffusers model) to ``stage``."""
        return _context(self.model).manual(stage)

    def merge(self, stage: int, *, inplace: bool = False) -> nn.Module:
        """See :func:`merge`."""
        return merge(self.model, stage, inplace=inplace)

    def save(self, path: str | Path) -> None:
        """See :func:`save_stage_parameters`."""
        save_stage_parameters(self.model, path)

    def load(self, path: str | Path) -> None:
        """See :func:`load_stage_parameters`."""
        load_stage_parameters(self.model, path)

    def export_peft(self, stage: int, directory: str | Path, **kwargs: Any) -> Path:
        """See :func:`export_peft_lora`."""
        return export_peft_lora(self.model, stage, directory, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> StageSpecialization:
        # A handle kept on its model (``model.stage_specialization``) must survive the model's
        # deepcopy (EMA, merge); the default fails on the read-only ``layers`` mapping.
        model = copy.deepcopy(self.model, memo)
        if id(self) in memo:  # reached again through ``model`` while it was being copied
            return memo[id(self)]
        out = StageSpecialization(
            kind=self.kind,
            rank=self.rank,
            alpha=self.alpha,
            num_stages=self.num_stages,
            stages=self.stages,
            train=self.train,
            layers=MappingProxyType(dict(self.layers)),
            parameters_per_group=dict(self.parameters_per_group),
            model=model,
        )
        memo[id(self)] = out
        return out


# --------------------------------------------------------------------------------------------
# attach


def _infer_num_stages(model: nn.Module) -> int | None:
    for obj in (model, getattr(model, "decomposition", None)):
        n = getattr(obj, "num_stages", None)
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _select_layers(
    model: nn.Module,
    targets: str | Sequence[str] | Predicate,
    patterns: Mapping[str, Sequence[str]] | None,
) -> dict[str, str]:
    table: dict[str, tuple[str, ...]] = dict(GROUP_PATTERNS)
    if patterns is not None:
        if not isinstance(patterns, Mapping):
            raise TypeError(f"patterns must map group names to regular expressions, got {type(patterns).__name__}")
        for g, pats in patterns.items():
            if g == "all" or not isinstance(g, str):
                raise ValueError(f"pattern group name must be a string other than 'all', got {g!r}")
            pats = (pats,) if isinstance(pats, str) else tuple(pats)
            for p in pats:
                re.compile(p)
            table[g] = pats
    if callable(targets):
        chosen = None
    else:
        names = [targets] if isinstance(targets, str) else list(targets)
        if not names:
            raise ValueError("targets is empty")
        unknown = [g for g in names if g != "all" and g not in table]
        if unknown:
            raise ValueError(f"unknown target group(s) {unknown}; known: {['all', *table]} (or pass patterns=)")
        chosen = set(table) if "all" in names else set(names)
    # groups given in ``patterns`` are tried first, so a user's pattern wins over a built-in one
    user = list(patterns) if patterns is not None else []
    order = user + [g for g in GROUPS if g not in user]
    compiled = {g: [re.compile(p) for p in table[g]] for g in order}

    layers: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if callable(targets):
            if not targets(name, module):
                continue
            group = "custom"
        else:
            group = next((g for g in order if any(p.search(name) for p in compiled[g])), None)
            if group is None or group not in chosen:  # type: ignore[operator]
                continue
        kind = _layer_base(module)
        if kind is None:
            if callable(targets):
                raise TypeError(
                    f"the predicate selected {name!r} ({type(module).__name__}); only nn.Linear, nn.Conv1d/2d/3d "
                    "and nn.Embedding can be specialised"
                )
            continue  # a container or norm inside a matched group: its leaf layers are matched
        if not kind[1]:
            raise TypeError(
                f"cannot specialise {name!r} ({type(module).__name__}): it overrides forward, uses grouped "
                "convolution or an Embedding max_norm; exclude it with patterns= or a predicate"
            )
        if isinstance(module, _StageLayer):
            raise ValueError(f"{name!r} is already specialised")
        layers[name] = group
    if not layers:
        raise ValueError(
            f"targets {targets!r} matched no nn.Linear/Conv/Embedding layer in {type(model).__name__}; "
            "pass patterns={group: [regex, ...]} or a predicate(name, module) for this model"
        )
    return layers


def _stage_position(model: nn.Module, stage_arg: str, consume: bool) -> int | None:
    sig = inspect.signature(model.forward)
    params = list(sig.parameters.values())
    if consume:
        if stage_arg in sig.parameters:
            raise ValueError(f"consume_stage=True but {type(model).__name__}.forward takes {stage_arg!r} itself")
        return None
    if stage_arg not in sig.parameters:
        raise ValueError(
            f"{type(model).__name__}.forward has no {stage_arg!r} argument to route by: wrap the model with "
            f"dfm_ext.wrap_dit, pass consume_stage=True (the {stage_arg}= keyword is taken out of the call "
            "before forward), or name the argument with stage_arg="
        )
    p = sig.parameters[stage_arg]
    if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return params.index(p)
    return None


def specialize(
    model: nn.Module,
    *,
    kind: Kind = "lora",
    targets: str | Sequence[str] | Predicate = "all",
    rank: int | None = None,
    alpha: float | None = None,
    stages: Sequence[int] | None = None,
    num_stages: int | None = None,
    train: Train = "all",
    patterns: Mapping[str, Sequence[str]] | None = None,
    stage_arg: str = "stage",
    consume_stage: bool = False,
    generator: torch.Generator | None = None,
) -> StageSpecialization:
    """Give the targeted layers per-stage parameters, routed by the model's ``stage`` argument.

    The model is changed in place: each targeted ``nn.Linear``/``nn.ConvNd``/``nn.Embedding``
    keeps its parameters and names (``fc1.weight``) and gains ``fc1.stage_params.<s>.*``. At
    attach time the function is unchanged. Each sample ``b`` runs stage ``stage[b]``'s parameters.

    Args:
        model: the model; its ``forward`` takes ``stage`` (a ``DFMTransformer`` does), unless
            ``consume_stage``.
        kind: ``"lora"``: ``W + (alpha / rank) B_s A_s``; ``"full"``: ``(W + W_s) / 2``.
        targets: group name(s) among ``mod``, ``proj``, ``cond``, ``attn``, ``mlp``, ``all`` (and
            any group in ``patterns``), or ``predicate(name, module) -> bool``.
        rank: LoRA rank (default 16); must be ``None`` for ``"full"``.
        alpha: LoRA alpha (default ``rank``, i.e. scale 1); must be ``None`` for ``"full"``.
        stages: stages that get parameters (default all); the others run the base weights.
        num_stages: ``S``; default ``model.num_stages`` or ``model.decomposition.num_stages``.
        train: ``"all"`` leaves every parameter trainable; ``"stage"`` freezes all but the stage
            parameters (expert finetuning).
        patterns: group name -> regular expressions searched in module names; replaces or adds
            groups of :data:`GROUP_PATTERNS`. A layer joins the first group that matches, trying
            the groups of ``patterns`` first, then ``GROUPS`` in order.
        stage_arg: name of the forward argument carrying ``stage`` ``[B]`` (or an int).
        consume_stage: for a model whose forward has no such argument (a plain diffusers
            transformer): accept ``stage=`` as an extra keyword and remove it before forward.
        generator: for the LoRA ``A`` initialisation.

    Returns:
        A :class:`StageSpecialization` with the layers, groups and parameter counts.

    Raises:
        ValueError: unknown group, nothing matched, ``rank <= 0``, a stage out of range, a model
            without a stage input, or a model that is already specialised.
        TypeError: a selected layer cannot be specialised, or an argument has the wrong type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if hasattr(model, _CONTEXT_ATTR):
        raise ValueError(f"{type(model).__name__} is already specialised; merge it or use a fresh model")
    if kind not in ("lora", "full"):
        raise ValueError(f"kind must be 'lora' or 'full', got {kind!r}")
    if train not in ("all", "stage"):
        raise ValueError(f"train must be 'all' or 'stage', got {train!r}")
    if kind == "full":
        if rank is not None or alpha is not None:
            raise ValueError(f"rank and alpha apply to kind='lora' only, got rank={rank!r} alpha={alpha!r}")
    else:
        rank = _check_int("rank", 16 if rank is None else rank, 1)
        if alpha is None:
            alpha = float(rank)
        elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        alpha = float(alpha)
    if num_stages is None:
        num_stages = _infer_num_stages(model)
        if num_stages is None:
            raise ValueError(f"cannot infer num_stages from {type(model).__name__}; pass num_stages=")
    num_stages = _check_int("num_stages", num_stages, 1)
    if stages is None:
        stage_list = tuple(range(num_stages))
    else:
        stage_list = tuple(_check_int("stages[i]", s, 0) for s in stages)
        bad = [s for s in stage_list if s >= num_stages]
        if bad or not stage_list or len(set(stage_list)) != len(stage_list):
            raise ValueError(f"stages must be distinct indices in [0, {num_stages - 1}], got {list(stages)}")
        stage_list = tuple(sorted(stage_list))
    position = _stage_position(model, stage_arg, consume_stage)
    layers = _select_layers(model, targets, patterns)

    ctx = _StageContext(num_stages, stage_arg, position, consume_stage)
    ctx.settings = {"kind": kind, "rank": rank, "alpha": alpha, "num_stages": num_stages, "stages": list(stage_list)}
    ctx.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    counts: dict[str, int] = {}
    for name, group in layers.items():
        module = modules[name]
        mixin, _ = _layer_base(module)  # type: ignore[misc]
        original = type(module)
        module.__class__ = _stage_class(original, mixin)
        module._stage_base_cls = original  # type: ignore[assignment]
        _attach(module, name, kind, rank, alpha, stage_list, ctx, generator)
        n = sum(p.numel() for p in module.stage_params.parameters())
        counts[group] = counts.get(group, 0) + n
    object.__setattr__(model, _CONTEXT_ATTR, ctx)  # a plain attribute, not a submodule
    pre = model.register_forward_pre_hook(ctx.pre_hook, with_kwargs=True)
    post = model.register_forward_hook(ctx.post_hook, with_kwargs=True, always_call=True)
    ctx.hook_ids = (pre.id, post.id)
    if train == "stage":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in _stage_parameters(model, None):
            p.requires_grad_(True)
    return StageSpecialization(
        kind=kind,
        rank=rank,
        alpha=alpha,
        num_stages=num_stages,
        stages=stage_list,
        train=train,
        layers=MappingProxyType(dict(layers)),
        parameters_per_group={g: counts[g] for g in sorted(counts, key=_group_rank)},
        model=model,
    )


def _attach(
    module: nn.Module,
    name: str,
    kind: str,
    rank: int | None,
    alpha: float | None,
    stages: tuple[int, ...],
    ctx: _StageContext,
    generator: torch.Generator | None,
) -> None:
    layer: Any = module
    w = layer.weight
    params = nn.ModuleDict()
    for s in stages:
        p = _StageParams()
        if kind == "full":
            p.weight = nn.Parameter(w.detach().clone())
            bias = getattr(layer, "bias", None)
            p.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        else:
            a_shape, b_shape = layer._lora_shapes(rank)
            a = torch.empty(a_shape, device=w.device, dtype=w.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            p.lora_A = nn.Parameter(a)
            p.lora_B = nn.Parameter(torch.zeros(b_shape, device=w.device, dtype=w.dtype))
        params[str(s)] = p
    layer.stage_params = params
    layer._stage_ctx = ctx
    layer._stage_name = name
    layer._stage_kind = kind
    layer._stage_scaling = 1.0 if kind == "full" else float(alpha) / float(rank)  # type: ignore[arg-type]


def _group_rank(group: str) -> tuple[int, str]:
    return (GROUPS.index(group), "") if group in GROUPS else (len(GROUPS), group)


def _context(model: nn.Module) -> _StageContext:
    ctx = getattr(model, _CONTEXT_ATTR, None)
    if ctx is None:
        raise ValueError(f"{type(model).__name__} is not specialised (call dfm_ext.specialize first)")
    return ctx


def _stage_layers(model: nn.Module) -> Iterator[tuple[str, _StageLayer]]:
    for name, m in model.named_modules():
        if isinstance(m, _StageLayer):
            yield name, m


def _stage_parameters(model: nn.Module, stage: int | None) -> list[nn.Parameter]:
    ctx = _context(model)
    if stage is not None:
        _check_stage(stage, ctx.num_stages)
    out = []
    for _, layer in _stage_layers(model):
        for s, p in layer.stage_params.items():
            if stage is None or s == str(stage):
                out.extend(p.parameters())
    return out


def _check_stage(stage: object, num_stages: int) -> int:
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise TypeError(f"stage must be an int, got {type(stage).__name__}")
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in [0, {num_stages - 1}], got {stage}")
    return stage


# --------------------------------------------------------------------------------------------
# merge, save, load, export


def merge(model: nn.Module, stage: int, *, inplace: bool = False) -> nn.Module:
    """The plain model that computes what the specialised ``model`` computes on ``stage``.

    Every specialised layer becomes its original class again with the merged weight
    (``(W + W_s) / 2`` or ``W + (alpha / r) B_s A_s``); the routing hooks are removed and the
    parameters' ``requires_grad`` restored to what they were before :func:`specialize`. The result
    is a stage expert for deployment: ``merge(model, s)(..., stage=s)`` equals ``model(..., stage=s)``.

    Args:
        model: a specialised model.
        stage: the stage to merge.
        inplace: convert ``model`` itself (saves memory; the specialisation is gone) instead of a copy.
    """
    ctx = _context(model)
    _check_stage(stage, ctx.num_stages)
    out = model if inplace else copy.deepcopy(model)
    out_ctx = _context(out)
    for _, layer in list(_stage_layers(out)):
        weight, bias = layer.merged_parameters(stage)
        module: Any = layer
        del module._modules[_PARAMS_ATTR]
        for attr in ("_stage_ctx", "_stage_name", "_stage_kind", "_stage_scaling"):
            module.__dict__.pop(attr, None)
        module.__class__ = module.__dict__.pop("_stage_base_cls")
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
    for hooks in (
        out._forward_pre_hooks,
        out._forward_pre_hooks_with_kwargs,
        out._forward_hooks,
        out._forward_hooks_with_kwargs,
        out._forward_hooks_always_called,
    ):
        for i in out_ctx.hook_ids:
            hooks.pop(i, None)
    object.__delattr__(out, _CONTEXT_ATTR)
    for n, p in out.named_parameters():
        p.requires_grad_(out_ctx.requires_grad.get(n, True))
    return out


def _metadata(model: nn.Module) -> dict[str, str]:
    ctx = _context(model)
    layers = list(_stage_layers(model))
    first = layers[0][1]
    meta = {
        "kind": first._stage_kind,
        "num_stages": str(ctx.num_stages),
        "stages": ",".join(first.stage_params.keys()),
    }
    if first._stage_kind == "lora":
        p = next(iter(first.stage_params.values()))
        meta["rank"] = str(p.lora_A.shape[0])
        meta["scaling"] = repr(first._stage_scaling)
    return {_META_PREFIX + k: v for k, v in meta.items()}


def _stage_state(model: nn.Module) -> dict[str, Tensor]:
    _context(model)
    return {
        f"{name}.{_PARAMS_ATTR}.{k}": v
        for name, layer in _stage_layers(model)
        for k, v in layer.stage_params.state_dict().items()
    }


def save_stage_parameters(model: nn.Module, path: str | Path) -> None:
    """Write only the stage parameters of a specialised model to a safetensors file.

    Keys are the parameters' names in ``model`` (``blocks.0.mlp.fc1.stage_params.1.lora_A``);
    the kind, rank, scaling and stages are stored as metadata and checked on load.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in _stage_state(model).items()}
    save_file(state, str(path), metadata=_metadata(model))


def load_stage_parameters(model: nn.Module, path: str | Path) -> None:
    """Load stage parameters written by :func:`save_stage_parameters` into a specialised model.

    Raises:
        ValueError: the file's kind/rank/scaling/stages differ from the model's, or its names or
            shapes do not match the model's stage parameters (the differences are listed).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    expected_meta = _metadata(model)
    diff = {
        k[len(_META_PREFIX) :]: (meta.get(k), v) for k, v in expected_meta.items() if meta.get(k) != v
    }
    if diff:
        raise ValueError(f"{path}: stage specialisation differs from the model's (file, model): {diff}")
    loaded = load_file(str(path))
    state = _stage_state(model)
    missing = sorted(set(state) - set(loaded))
    unexpected = sorted(set(loaded) - set(state))
    shapes = {
        k: (tuple(loaded[k].shape), tuple(v.shape))
        for k, v in state.items()
        if k in loaded and loaded[k].shape != v.shape
    }
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not match the model's stage parameters: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), shape mismatches (file, model) "
            f"{dict(list(shapes.items())[:5])} ({len(shapes)})"
        )
    with torch.no_grad():
        for name, layer in _stage_layers(model):
            prefix = f"{name}.{_PARAMS_ATTR}."
            for k, v in layer.stage_params.state_dict(keep_vars=True).items():
                v.copy_(loaded[prefix + k])


def export_peft_lora(
    model: nn.Module,
    stage: int,
    directory: str | Path,
    *,
    prefix: str = "transformer",
    strip: str = "",
) -> Path:
    """Write stage ``stage``'s LoRA in the peft/diffusers format, loadable by ``load_lora_adapter``.

    Writes ``directory/pytorch_lora_weights.safetensors`` with keys
    ``<prefix>.<module>.lora_A.weight`` / ``lora_B.weight`` and the ``LoraConfig`` (``r``,
    ``lora_alpha``, exact ``target_modules``) as diffusers' ``lora_adapter_metadata``, and the same
    config as ``directory/adapter_config.json``. A diffusers transformer with the base weights then
    runs stage ``stage`` after ``transformer.load_lora_adapter(directory, prefix=prefix)``.

    Args:
        model: a model specialised with ``kind="lora"``.
        stage: the stage to export (it must own parameters).
        directory: output folder (created).
        prefix: the key prefix diffusers filters on (``"transformer"``; ``""`` for none).
        strip: a module-name prefix to remove (e.g. ``"model."`` when the specialised model wraps
            the diffusers transformer under ``model``).

    Returns:
        The path of the safetensors file.
    """
    from safetensors.torch import save_file

    ctx = _context(model)
    _check_stage(stage, ctx.num_stages)
    state: dict[str, Tensor] = {}
    targets: list[str] = []
    rank = alpha = None
    for name, layer in _stage_layers(model):
        if layer._stage_kind != "lora":
            raise ValueError("only kind='lora' specialisations can be exported as LoRA; use merge() for 'full'")
        if isinstance(layer, _StageEmbedding):
            raise ValueError(f"export of Embedding layers is not supported ({name!r}); exclude it from targets")
        if str(stage) not in layer.stage_params:
            raise ValueError(f"stage {stage} owns no parameters (specialised stages: {list(layer.stage_params)})")
        if strip:
            if not name.startswith(strip):
                raise ValueError(f"module {name!r} does not start with strip={strip!r}")
            name = name[len(strip) :]
        p = layer.stage_params[str(stage)]
        rank = p.lora_A.shape[0]
        alpha = layer._stage_scaling * rank
        key = f"{prefix}.{name}" if prefix else name
        state[f"{key}.lora_A.weight"] = p.lora_A.detach().contiguous().cpu()
        state[f"{key}.lora_B.weight"] = p.lora_B.detach().contiguous().cpu()
        targets.append(name)
    config = {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": "^(?:" + "|".join(re.escape(t) for t in targets) + ")$",
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    packed = {f"{prefix}.{k}" if prefix else k: v for k, v in config.items()}
    path = directory / "pytorch_lora_weights.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(packed, sort_keys=True)})
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}, indent=2, sort_keys=True))
    return path


# --------------------------------------------------------------------------------------------
# export next to a saved model: the stage parameters and the record to re-specialise with


def is_specialized(model: nn.Module) -> bool:
    return hasattr(model, _CONTEXT_ATTR)


@contextlib.contextmanager
def stage_parameters_detached(model: nn.Module) -> Iterator[None]:
    """Within the block, the stage parameters are out of ``model``'s module tree (put back after).

    For saving the shared weights alone in a file that an unspecialised model of the same
    architecture loads strictly.
    """
    taken = [(layer, layer._modules.pop(_PARAMS_ATTR)) for _, layer in _stage_layers(model)]
    try:
        yield
    finally:
        for layer, params in taken:
            layer._modules[_PARAMS_ATTR] = params


def save_specialization(
    spec: StageSpecialization | nn.Module, directory: str | Path, *, strip_prefix: str = ""
) -> tuple[Path, Path]:
    """Write a specialisation next to a saved model, for :func:`load_specialization`.

    Writes ``directory/stage_parameters.safetensors`` (:func:`save_stage_parameters`: the stage
    parameters under their names in the specialised model, kind/rank/stages as metadata) and
    ``directory/stage_lora.json``, the record to re-specialise a fresh model with: ``kind``,
    ``rank``, ``alpha``, ``num_stages``, ``stages`` and the specialised ``layers``. The shared
    weights are not written; save them with the model (``DFMTransformer.save_pretrained`` of a
    specialised model leaves the stage parameters out of ``model.safetensors`` and calls this).

    Args:
        spec: the handle :func:`specialize` returned, or the specialised model itself.
        directory: output folder (created).
        strip_prefix: removed from the recorded layer names, for a model saved as a part of the
            specialised one (``"wrapped."`` when ``specialize`` was applied to a module that holds
            the saved ``DFMTransformer`` as ``.wrapped``); :func:`load_specialization` adds it back.

    Returns:
        The paths of the weights file and of the record.

    Raises:
        ValueError: the model is not specialised, or a layer name lacks ``strip_prefix``.

    Example:
        >>> import tempfile, torch
        >>> from dfm_ext import DiT, DiTConfig, LaplacianPyramid, load_wrapped, wrap_dit
        >>> model = wrap_dit(DiT(DiTConfig.preset("tiny")), LaplacianPyramid(factors=(2, 1)))
        >>> spec = specialize(model, kind="full", targets="mlp")
        >>> with tempfile.TemporaryDirectory() as d:
        ...     model.save_pretrained(d)  # shared weights + the specialisation
        ...     fresh = load_wrapped(d)
        ...     loaded = load_specialization(fresh, d)
        ...     (loaded.kind, set(loaded.layers) == set(spec.layers))
        ('full', True)
    """
    from dfm_ext.fileio import atomic_write_text

    model = spec.model if isinstance(spec, StageSpecialization) else spec
    record = specialization_record(model, strip_prefix=strip_prefix)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, record_path = directory / STAGE_WEIGHTS_FILE, directory / STAGE_RECORD_FILE
    save_stage_parameters(model, weights)
    atomic_write_text(record_path, json.dumps(record, indent=2))
    return weights, record_path


def specialization_record(model: nn.Module, *, strip_prefix: str = "") -> dict[str, Any]:
    """The JSON record of a specialisation: kind, rank, alpha, num_stages, stages and layer names.

    What :func:`save_specialization` writes as ``stage_lora.json`` and ``save_pretrained`` keeps
    under ``"specialization"`` in its config; :func:`restore_specialization` re-applies it.
    """
    ctx = _context(model)
    layers = []
    for name, _ in _stage_layers(model):
        if not name.startswith(strip_prefix):
            raise ValueError(f"specialised layer {name!r} does not start with strip_prefix={strip_prefix!r}")
        layers.append(name[len(strip_prefix) :])
    return {**ctx.settings, "layers": sorted(layers)}


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the stage specialisation record ({e})") from e

    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: {what} (record: {record!r:.300})")

    if not isinstance(record, dict):
        raise bad("not a JSON object")
    missing = [k for k in ("kind", "rank", "alpha", "stages", "layers") if k not in record]
    if missing:
        raise bad(f"missing key(s) {missing}")
    if record["kind"] not in ("lora", "full"):
        raise bad(f"kind must be 'lora' or 'full', got {record['kind']!r}")
    layers, stages = record["layers"], record["stages"]
    if not isinstance(layers, list) or not layers or not all(isinstance(n, str) for n in layers):
        raise bad("layers must be a non-empty list of module names")
    if not isinstance(stages, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in stages):
        raise bad("stages must be a list of ints")
    for key in ("rank", "num_stages"):
        v = record.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise bad(f"{key} must be an int or null, got {v!r}")
    alpha = record["alpha"]
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        raise bad(f"alpha must be a number or null, got {alpha!r}")
    return record


def load_specialization(model: nn.Module, directory: str | Path, *, add_prefix: str = "") -> StageSpecialization | None:
    """Re-apply a specialisation written by :func:`save_specialization` and load its parameters.

    Reads ``directory/stage_lora.json``, calls :func:`specialize` on ``model`` with the recorded
    kind, rank, alpha, stages and exactly the recorded layers, then loads
    ``directory/stage_parameters.safetensors`` (safetensors only; names, shapes, kind, rank and
    stages checked). ``model`` must hold the shared weights already (``dfm_ext.load_wrapped``).

    Args:
        model: the unspecialised model, the same architecture as the one saved.
        directory: the folder the specialisation was saved in.
        add_prefix: prepended to the recorded layer names (the ``strip_prefix`` of the save).

    Returns:
        The handle (:class:`StageSpecialization`, trainable as ``train="all"``), or ``None`` when
        ``directory`` holds no specialisation (neither file).

    Raises:
        FileNotFoundError: one of the two files is there without the other.
        ValueError: the record is unreadable or malformed, names a layer ``model`` does not have,
            or the weights file does not match it (each message names the file).
    """
    restored = getattr(model, "specialization", None)
    if isinstance(restored, StageSpecialization) and is_specialized(model):
        return restored  # dfm_ext.load_wrapped re-applied it already (and set model.specialization)
    directory = Path(directory)
    record_path, weights = directory / STAGE_RECORD_FILE, directory / STAGE_WEIGHTS_FILE
    if not record_path.exists():
        if weights.exists():
            raise FileNotFoundError(f"{weights} exists but its record {record_path} is missing")
        return None
    if not weights.is_file():
        raise FileNotFoundError(f"{record_path} exists but the stage parameters {weights} are missing")
    return restore_specialization(model, _read_record(record_path), weights, record_path=record_path, add_prefix=add_prefix)


def restore_specialization(
    model: nn.Module, record: dict[str, Any], weights: str | Path, *, record_path: str | Path, add_prefix: str = ""
) -> StageSpecialization:
    """Re-apply a :func:`specialization_record` to ``model`` and load ``weights`` (a safetensors file).

    ``record_path`` names where the record came from, for the messages. Raises ``ValueError``
    as :func:`load_specialization`.
    """
    weights = Path(weights)
    names = {add_prefix + n for n in record["layers"]}
    modules = dict(model.named_modules())
    absent = sorted(n for n in names if n not in modules)
    if absent:
        raise ValueError(
            f"{record_path} names {len(absent)} layer(s) that {type(model).__name__} does not have, e.g. {absent[:5]} "
            f"(add_prefix={add_prefix!r}; is this the model the specialisation was saved from?)"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt"):
            pass
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from e
    try:
        spec = specialize(
            model,
            kind=record["kind"],
            targets=lambda name, _module: name in names,
            rank=record["rank"],
            alpha=record["alpha"],
            stages=record["stages"],
            num_stages=record.get("num_stages"),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{record_path}: cannot re-apply the recorded specialisation: {e}") from e
    spec.load(weights)
    return spec
