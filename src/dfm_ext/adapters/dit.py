"""Adapter for the original DiT family: facebookresearch DiT, SiT, LightningDiT and :class:`dfm_ext.DiT`.

It matches any model with the original attribute names: ``x_embedder.proj`` (a ``Conv2d`` with
kernel = stride), ``t_embedder``, ``y_embedder`` (with ``num_classes``), ``blocks`` and
``final_layer.linear``, with an optional fixed ``pos_embed`` ``[1, N, D]``.

``install`` swaps ``x_embedder`` for a :class:`~dfm_ext.wrapping.embeddings.MultiScalePatchEmbed`
(its ``.proj`` is the widened ``nn.Linear``), ``t_embedder`` for a
:class:`~dfm_ext.wrapping.embeddings.MultiScaleTimestepEmbed` (stage 0's embedder is the original,
``t_embedder.embedders[0]``) and ``final_layer.linear`` for a widened
:class:`~dfm_ext.wrapping.embeddings.MultiScaleHead` (rows reordered from DiT's ``(p, q, c)`` unpatchify
order; with ``learn_sigma`` only the velocity half is kept). ``forward`` then runs the model's
own positions, label embedder, blocks and final layer.

Time conventions (``time_convention``). DiT, SiT and LightningDiT share these module names
but read time differently, so names alone prove nothing and the adapter never guesses:

=====================  =============================================  =====================================
codebase               what the model reads / predicts                ``time_convention``
=====================  =============================================  =====================================
facebookresearch DiT   integer step ``999 (1 - t)`` (999 = noise);     ``"discrete"``
                       epsilon (+ sigma channels, dropped)
SiT, LightningDiT      ``t`` in ``[0, 1]``, ``t = 1`` data (SiT's      ``"unit"``
                       linear transport); velocity ``x - noise``
:class:`dfm_ext.DiT`,  ``1000 t``; velocity ``x - noise``              ``"x1000"`` (declared by the class)
``VideoDiT``
=====================  =============================================  =====================================

The convention comes from ``wrap_dit(..., time_convention=)`` (or
``DiTFamilyAdapter(time_convention=)``), else from the model's own declaration
``dfm_time_convention`` (a class or instance attribute, e.g. ``dfm_ext.DiT.dfm_time_convention
== "x1000"``); with neither, :meth:`DiTFamilyAdapter.bind` raises a ``ValueError`` listing the
choices, before the model is touched.

What "converted" means: the adapter converts *time*, and the output's sign. The wrapped stage-0
output with ``init="pretrained"`` is the base model's own output (first ``C`` channels) times
``output_scale``: a velocity ``x - noise`` for SiT, LightningDiT and ``dfm_ext.DiT``; for the
original DiT (``"discrete"``, an epsilon model) ``-epsilon``, which DFM finetuning then turns into
a velocity. ``-epsilon`` is the default for ``"discrete"`` because it starts closest among the
treatments that keep a velocity output (``benchmarks/epsilon_init.py``: DFM loss 1.31 at the
pretrained init against 3.00 for the raw epsilon, 0.318 against 0.564 after 500 steps; the exact
epsilon-to-velocity conversion starts lower, 0.35, but ends level by 500 steps and divides by
``t`` near noise). ``output_scale`` overrides it (``1``: the raw output; ``-1`` also for models
trained to predict ``noise - x``).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from dfm_ext.adapters.spec import check_output_scale
from dfm_ext.process.conventions import check_time_convention, time_convention_names
from dfm_ext.validation import check_value
from dfm_ext.wrapping.adapter import multiscale_time_embed, widen_head, widen_patch_embed
from dfm_ext.wrapping.embeddings import MultiScaleHead

from .common import call_block, check_installed, check_stage0_channels, fixed_grid_hint, parse_conditioning, scaled_output

__all__ = ["DiTFamilyAdapter", "LabelConditioning", "check_labels", "default_output_scale", "embed_labels", "ADAPTER"]


def default_output_scale(time_convention: Any) -> float:
    """``-1`` for ``"discrete"`` (DDPM's integer time: an epsilon model, taken as ``-epsilon``), else ``1``.

    ``-epsilon`` is what an epsilon model's output is closest to as a velocity ``x - noise`` near
    noise, and it keeps the output a velocity for DFM finetuning (``benchmarks/epsilon_init.py``).
    """
    return -1.0 if time_convention == "discrete" else 1.0


def check_labels(model: nn.Module, y: Any, batch: int) -> Tensor:
    """``y``: a torch integer tensor ``[B]`` with values in ``[0, num_classes]`` (``num_classes`` is the null class).

    Raises:
        TypeError: ``y`` is missing, a numpy array or list, or not an integer tensor.
        ValueError: wrong shape, or a label out of range (read on the host for CPU tensors in eager
            mode, a device-side assert otherwise; :mod:`dfm_ext.validation`).
    """
    if y is None:
        raise TypeError(f"{type(model).__name__} needs class labels: pass y=torch.LongTensor [B]")
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch integer tensor [B], got {type(y).__module__}.{type(y).__name__} (use torch.as_tensor(y))")
    if y.dtype not in (torch.long, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"y must be a torch integer tensor [B] of class labels, got dtype {y.dtype}")
    if y.shape != (batch,):
        raise ValueError(f"y must have shape [{batch}], got {tuple(y.shape)}")
    n = int(model.y_embedder.num_classes)
    if batch:
        check_value(((y >= 0) & (y <= n)).all(), f"y: class labels must lie in [0, {n - 1}] (or {n}, the null class)", y.tolist)
    return y


def _takes_drop_ids(embedder: nn.Module) -> bool:
    """Whether ``embedder.forward`` takes a third argument (``force_drop_ids``) after ``labels, train``."""
    try:
        params = list(inspect.signature(embedder.forward).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 3


def embed_labels(embedder: nn.Module, y: Tensor, train: bool, force_drop_ids: Tensor | None) -> Tensor:
    """``embedder(y, train, force_drop_ids)``, DiT's label-embedder call.

    An embedder whose ``forward`` takes only ``(labels, train)`` gets the dropped labels replaced
    by the null class ``num_classes`` here (what DiT's ``token_drop`` does) and ``(labels, train)``.
    """
    if _takes_drop_ids(embedder):
        return embedder(y, train, force_drop_ids)
    if force_drop_ids is not None:
        y = torch.where(force_drop_ids.to(y.device) == 1, torch.full_like(y, int(embedder.num_classes)), y)
    return embedder(y, train)


_CHOICES = (
    ("facebookresearch DiT", "discrete", "integer step 999 (1 - t); epsilon output, taken as -epsilon"),
    ("SiT, LightningDiT", "unit", "t itself, t = 1 data; output velocity x - noise"),
    ("1000 t (dfm_ext.DiT)", "x1000", "1000 t, 1000 = data"),
)


def _refusal(model: nn.Module) -> str:
    cls = type(model)
    lines = "\n".join(
        f'  {who + ":":<22} wrap_dit(model, decomposition, time_convention="{name}")   # {what}'
        for who, name, what in _CHOICES
    )
    return (
        f"cannot tell how {cls.__qualname__} (module {cls.__module__}) reads time: it has DiT's module "
        "names (x_embedder, t_embedder, y_embedder, blocks, final_layer), which facebookresearch DiT, "
        "SiT and LightningDiT all share while reading time differently, and it declares no "
        f"dfm_time_convention. Say which it is:\n{lines}\n"
        f"Other choices: {time_convention_names()} ('sigma' = 1 - t, 'timestep' = 1000 (1 - t)). Or declare it once "
        f'on the model class: {cls.__qualname__}.dfm_time_convention = "<name>". A model trained to predict '
        "noise - x also needs adapter=DiTFamilyAdapter(time_convention=..., output_scale=-1) "
        "(from dfm_ext.adapters)."
    )


class LabelConditioning(NamedTuple):
    """The conditioning keywords :meth:`DiTFamilyAdapter.forward` takes.

    ``y`` (long ``[B]`` class labels) is required; ``force_drop_ids`` (``[B]``, 1 = drop the
    label) or a ``generator`` make label dropout in training reproducible.
    """

    y: Tensor | None = None
    force_drop_ids: Tensor | None = None
    generator: torch.Generator | None = None


class DiTFamilyAdapter:
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for models with DiT's module names.

    Args:
        time_convention: how the model's timestep embedder reads time (see the module
            docstring); ``None`` (default): the model must declare it as ``dfm_time_convention``.
        output_scale: multiplies the model output (``-1`` for models predicting ``noise - x``);
            default (``None``): ``-1`` for ``"discrete"`` (an epsilon model, taken as ``-epsilon``),
            ``1`` for the other conventions.

    Conditioning: ``y`` (long ``[B]`` class labels, required); optional ``force_drop_ids``
    (``[B]``, 1 = drop the label) or ``generator`` for reproducible label dropout in training.
    ``null_condition`` sets ``y`` to the null class ``num_classes``. Blocks get the model's RoPE
    when it has one: ``rope_for_grid(grid, device, dtype)`` (:class:`dfm_ext.DiT`) or a
    ``feat_rope`` module (LightningDiT, called as ``block(x, c, feat_rope)``).

    Example:
        >>> from dfm_ext.adapters import DiTFamilyAdapter
        >>> DiTFamilyAdapter(time_convention="unit").config()
        {'time_convention': 'unit', 'output_scale': 1.0}
    """

    name = "dit"
    #: ``dfm_ext.specialization`` layer groups, on DiT's module names (``x_embedder``, ``t_embedder``,
    #: ``y_embedder``, ``blocks.i.attn``, ``blocks.i.mlp``, ``adaLN_modulation``, ``final_layer``).
    layer_groups: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType(
        {
            "cond": (r"(^|\.)t_embedder(\.|$)", r"(^|\.)y_embedder(\.|$)"),
            "mod": (r"(^|\.)adaLN_modulation\.",),
            "attn": (r"(^|\.)attn\d*\.",),
            "mlp": (r"(^|\.)mlp\.",),
            "proj": (r"(^|\.)x_embedder(\.|$)", r"(^|\.)final_layer\.linear$"),
        }
    )

    def __init__(self, time_convention: Any = None, output_scale: float | None = None):
        self.time_convention = check_time_convention(time_convention, allow_none=True)
        if output_scale is None and self.time_convention is not None:
            output_scale = default_output_scale(self.time_convention)
        #: ``None`` until the convention is settled (``bind``)
        self.output_scale: float | None = None if output_scale is None else check_output_scale(output_scale)

    def config(self) -> dict[str, Any]:
        return {"time_convention": self.time_convention, "output_scale": self.output_scale}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(time_convention={self.time_convention!r}, output_scale={self.output_scale})"

    def bind(self, model: nn.Module, time_convention: str | None = None) -> DiTFamilyAdapter:
        """This adapter with the time convention for ``model`` settled (a new instance if it changes).

        The convention is ``time_convention``, else this adapter's, else the model's
        ``dfm_time_convention``; those that are given must agree.

        Raises:
            ValueError: none is given (the message lists the choices and which codebase uses
                which), one is unknown, or two disagree.
        """
        declared = getattr(model, "dfm_time_convention", None)
        if declared is not None:
            check_time_convention(declared)
        check_time_convention(time_convention, allow_none=True)
        given = {
            "time_convention=": time_convention,
            f"{type(self).__name__}(time_convention=)": self.time_convention,
            f"{type(model).__qualname__}.dfm_time_convention": declared,
        }
        named = {k: v for k, v in given.items() if v is not None}
        if len({json.dumps(v, sort_keys=True) for v in named.values()}) > 1:
            raise ValueError(
                f"conflicting time conventions for {type(model).__qualname__}: "
                + ", ".join(f"{k} {v!r}" for k, v in named.items())
                + "; give one (a model's dfm_time_convention declares how its forward reads time)"
            )
        if not named:
            raise ValueError(_refusal(model))
        convention = next(iter(named.values()))
        if convention == self.time_convention and self.output_scale is not None:
            return self
        return type(self)(**{**self.config(), "time_convention": convention})

    @staticmethod
    def _matches_proj(proj: Any) -> bool:
        """Whether ``x_embedder.proj`` is this adapter's patch embedding (a ``Conv2d``)."""
        return isinstance(proj, nn.Conv2d)

    def matches(self, model: nn.Module) -> bool:
        proj = getattr(getattr(model, "x_embedder", None), "proj", None)
        final = getattr(getattr(model, "final_layer", None), "linear", None)
        return (
            self._matches_proj(proj)
            and isinstance(getattr(model, "t_embedder", None), nn.Module)
            and hasattr(getattr(model, "y_embedder", None), "num_classes")
            and isinstance(getattr(model, "blocks", None), nn.ModuleList)
            and isinstance(final, nn.Linear)
            and not isinstance(final, MultiScaleHead)
        )

    #: what the family's forward reads, each with the check that it is there
    _REQUIRED: ClassVar[tuple[tuple[str, str], ...]] = (
        ("x_embedder.proj", "a patch embedding x_embedder.proj (nn.Conv2d, kernel = stride)"),
        ("t_embedder", "a timestep embedder t_embedder (nn.Module, [B] -> [B, D])"),
        ("y_embedder", "a label embedder y_embedder with num_classes (and dropout_prob)"),
        ("blocks", "blocks (nn.ModuleList, each called as block(x, c))"),
        ("final_layer.linear", "final_layer with an output nn.Linear final_layer.linear"),
    )

    def missing(self, model: nn.Module) -> list[str] | None:
        """What ``model`` lacks of the DiT layout (``None`` when it has none of DiT's names: not a near miss)."""
        checks = {
            "x_embedder.proj": self._matches_proj(getattr(getattr(model, "x_embedder", None), "proj", None)),
            "t_embedder": isinstance(getattr(model, "t_embedder", None), nn.Module),
            "y_embedder": hasattr(getattr(model, "y_embedder", None), "num_classes"),
            "blocks": isinstance(getattr(model, "blocks", None), nn.ModuleList),
            "final_layer.linear": isinstance(getattr(getattr(model, "final_layer", None), "linear", None), nn.Linear),
        }
        if not any(checks.values()):
            return None
        return [what for key, what in self._REQUIRED if not checks[key]]

    @staticmethod
    def _proj(model: nn.Module) -> nn.Conv2d:
        proj = getattr(model.x_embedder, "proj", None)
        if not isinstance(proj, nn.Conv2d):
            raise TypeError(f"{type(model).__name__}.x_embedder has no Conv2d .proj (already wrapped?)")
        return proj

    def _grid(self, model: nn.Module) -> tuple[int, int] | None:
        grid = getattr(model.x_embedder, "grid_size", None)
        if grid is not None:
            return (int(grid[0]), int(grid[1])) if not isinstance(grid, int) else (grid, grid)
        pos = getattr(model, "pos_embed", None)
        if isinstance(pos, Tensor):
            side = math.isqrt(pos.shape[-2])
            if side * side == pos.shape[-2]:
                return (side, side)
        return None

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        proj = self._proj(model)
        grid = self._grid(model)
        if grid is None:
            raise ValueError(f"cannot tell the input size of {type(model).__name__}; pass sample_shape=(C, H, W)")
        p = proj.kernel_size
        return (proj.in_channels, grid[0] * p[0], grid[1] * p[1])

    def token_grid(self, model: nn.Module, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(sample_shape) != 3:
            raise ValueError(f"DiT-family models take images; sample_shape must be (C, H, W), got {sample_shape}")
        grid = self._grid(model)
        if grid is None:  # e.g. RoPE models without a fixed grid: the model's patch at full resolution
            p = self._proj(model).kernel_size
            if sample_shape[1] % p[0] or sample_shape[2] % p[1]:
                raise ValueError(f"sample_shape {sample_shape} is not divisible by the model's patch {tuple(p)}")
            grid = (sample_shape[1] // p[0], sample_shape[2] // p[1])
        return grid

    def install(self, model: nn.Module, packer: Any, *, init: str, stage_embedding: bool) -> None:
        convention = self.bind(model).time_convention  # refuses before touching the model
        proj = self._proj(model)
        if len(packer.grid) != 2:
            raise ValueError(f"DiT-family models take images; got a token grid {packer.grid}")
        pos = getattr(model, "pos_embed", None)
        if isinstance(pos, Tensor) and pos.shape[-2] != packer.num_tokens:
            native = self._grid(model)
            hint = f": {fixed_grid_hint(packer, native)} (docs/guides/adapters.md, 'Fixed positions')" if native else ""
            raise ValueError(
                f"the stages map onto a token grid {packer.grid} ({packer.num_tokens} tokens) but "
                f"{type(model).__name__} has fixed positions for {pos.shape[-2]} tokens{hint}"
            )
        check_stage0_channels(packer, init, proj.in_channels)
        self._install_modules(model, proj, packer, convention, init=init, stage_embedding=stage_embedding)

    @staticmethod
    def _install_modules(
        model: nn.Module, proj: nn.Module, packer: Any, convention: str, *, init: str, stage_embedding: bool
    ) -> None:
        """Swap ``x_embedder``, ``t_embedder`` and ``final_layer.linear`` (after the family's checks).

        The patch kernel ``proj`` (``Conv2d``, or per-frame ``Conv3d`` for video) sets the hidden
        width and the head's base patch; the head unpatchifies in DiT's ``(p, q, c)`` order.
        """
        linear = model.final_layer.linear
        model.x_embedder = widen_patch_embed(proj, packer, init=init)
        model.t_embedder = multiscale_time_embed(
            model.t_embedder,
            proj.out_channels,
            packer.num_stages,
            init=init,
            stage_embedding=stage_embedding,
            time_transform=convention,
        )
        base_patch = tuple(proj.kernel_size)
        model.final_layer.linear = widen_head(linear, packer, base_patch=base_patch, order="pqc", init=init)

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`LabelConditioning`."""
        y, force_drop_ids, generator = parse_conditioning(model, LabelConditioning, cond)
        check_installed(model.x_embedder)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        check_labels(model, y, b)
        x = model.x_embedder(packed)
        pos = getattr(model, "pos_embed", None)
        if isinstance(pos, Tensor):
            x = x + pos
        emb = model.y_embedder
        if force_drop_ids is None and generator is not None and model.training and emb.dropout_prob > 0:
            draw = torch.rand(b, generator=generator, device=generator.device)
            force_drop_ids = (draw < emb.dropout_prob).long().to(y.device)
        c = model.t_embedder(t, stage) + embed_labels(emb, y, model.training, force_drop_ids)
        rope_fn = getattr(model, "rope_for_grid", None)
        # LightningDiT keeps its RoPE (built for the model's own grid, which the stages map onto)
        # as `feat_rope` and passes it to every block; dropping it would silently change the model.
        rope = rope_fn(grid, x.device, x.dtype) if callable(rope_fn) else getattr(model, "feat_rope", None)
        for block in model.blocks:
            args = (x, c) if rope is None else (x, c, rope)
            x = call_block(model, block, *args)
        return scaled_output(model.final_layer(x, c), grid, self.output_scale)

    def null_condition(self, model: nn.Module, **cond: Any) -> dict[str, Any]:
        y = cond.get("y")
        if y is None:
            raise TypeError("null_condition needs the conditional labels y to know the batch size")
        emb = model.y_embedder
        table = getattr(emb, "embedding_table", None)
        if isinstance(table, nn.Embedding) and table.num_embeddings <= emb.num_classes:
            raise ValueError(f"{type(model).__name__} has no null class (built without label dropout)")
        out = dict(cond)
        out["y"] = torch.full_like(y, emb.num_classes)
        out.pop("force_drop_ids", None)
        return out


ADAPTER = DiTFamilyAdapter()
