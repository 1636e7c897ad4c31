"""Public helpers for writing a :class:`dfm_ext.wrapping.adapter.DiTAdapter`, shared by the built-in adapters.

An adapter's ``forward(model, packed, t, stage, **cond)`` usually does the same few things
around its family's own code: read the conditioning keywords it declares as a
:class:`typing.NamedTuple` and refuse any other (:func:`parse_conditioning`), refuse a model
``install`` has not converted (:func:`check_installed`), check conditioning tensors
(:func:`check_tensor`), run the blocks through the model's gradient checkpointing
(:func:`call_block`) and turn the head's tokens into the packed output (:func:`scaled_output`).
``install`` checks stage 0 against the pretrained patch kernel (:func:`check_stage0_channels`);
``null_condition`` often zeroes tensors (:func:`zeroed_condition`). The built-in adapters
(``dit``, ``video_dit`` and the diffusers families) are written with them.

For the modules an adapter swaps or reads: :class:`TimeMLP` bundles a parameter-free sinusoid
with its MLP into the one embedder :func:`dfm_ext.wrapping.adapter.multiscale_time_embed` copies
per stage; :func:`sincos_positions` gives the positions a diffusers ``PatchEmbed`` adds for any
token grid; :func:`shape_probe` stands in for the unpatchified input where a RoPE module only
reads its shape; :func:`get_submodule_path` / :func:`set_submodule_path` read and replace a
module by dotted name (what :class:`dfm_ext.adapters.spec.SpecAdapter` does with its spec).
A guide with a complete example: ``docs/guides/adapters.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from dfm_ext.specialization import checkpoint, routing_active
from dfm_ext.wrapping.embeddings import MultiScaleHead, MultiScalePatchEmbed
from dfm_ext.wrapping.packing import patch_sizes_for_grid

__all__ = [
    "TimeMLP",
    "call_block",
    "check_installed",
    "check_no_extra_conditioning",
    "check_stage0_channels",
    "check_tensor",
    "checkpointing_enabled",
    "first_linear_dtype",
    "fixed_grid_hint",
    "get_submodule_path",
    "parse_conditioning",
    "scaled_output",
    "set_submodule_path",
    "shape_probe",
    "sincos_positions",
    "zeroed_condition",
]


def first_linear_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first parameter (``float32`` for a module without any)."""
    for p in module.parameters():
        return p.dtype
    return torch.float32


def check_tensor(
    value: Any, name: str, shape: tuple[int | None, ...], *, floating: bool = True, hint: str = ""
) -> Tensor:
    """Check a conditioning tensor's type, rank and sizes (``None`` = any size); returns ``value``.

    Raises:
        TypeError: not a tensor, or not floating point when ``floating``.
        ValueError: the shape does not match.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor {_fmt(shape)}, got {type(value).__name__}{hint}")
    if floating and not torch.is_floating_point(value):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.ndim != len(shape) or any(s is not None and v != s for v, s in zip(value.shape, shape)):
        raise ValueError(f"{name} must have shape {_fmt(shape)}, got {tuple(value.shape)}{hint}")
    return value


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def _stage_routing_active() -> bool:
    return routing_active()


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether the model asks for activation checkpointing: diffusers' and dfm_ext's ``gradient_checkpointing``
    flag, or LightningDiT's ``use_checkpoint`` (its constructor argument, kept as an attribute)."""
    return getattr(model, "gradient_checkpointing", False) is True or getattr(model, "use_checkpoint", False) is True


def call_block(model: nn.Module, block: nn.Module, *args: Any) -> Any:
    """``block(*args)``, checkpointed when the model asks for it (:func:`checkpointing_enabled`) and gradients are needed.

    ``args`` are positional, in the block's ``forward`` order; one argument list serves both
    paths, so they cannot disagree. A diffusers model's own checkpoint function
    (``model._gradient_checkpointing_func``) is used where it has one, except inside a forward of
    a per-stage specialised model; otherwise (and for models without one, e.g. the original DiT
    family) :func:`dfm_ext.specialization.checkpoint`.
    """
    if torch.is_grad_enabled() and checkpointing_enabled(model):
        func = getattr(model, "_gradient_checkpointing_func", None)
        if _stage_routing_active() or func is None:
            # A per-stage specialised model (dfm_ext.specialization) must get its stage routing
            # back for the recompute in backward, which diffusers' checkpoint function cannot do.
            return checkpoint(block, *args)
        return func(block, *args)
    return block(*args)


def check_no_extra_conditioning(model: nn.Module, cond: dict[str, Any]) -> None:
    """Refuse conditioning keywords the family's forward does not take.

    Raises:
        TypeError: ``cond`` is not empty.
    """
    if cond:
        raise TypeError(f"unexpected conditioning for {type(model).__name__}: {sorted(cond)}")


C = TypeVar("C", bound=tuple)


def parse_conditioning(model: nn.Module, kind: type[C], cond: Mapping[str, Any]) -> C:
    """``kind(**cond)``: the conditioning keywords of a forward, as the family's declared :class:`typing.NamedTuple`.

    ``kind`` lists every keyword the family's forward takes, each with its default (keywords
    left out get it). Declaring them once as a type keeps the adapter's ``forward`` the
    protocol's ``forward(model, packed, t, stage, **cond)`` and documents the conditioning in
    one place (``kind._fields``).

    Raises:
        TypeError: ``"unexpected conditioning for {model class}: [names]"`` for a keyword
            ``kind`` does not declare.
    """
    check_no_extra_conditioning(model, {k: v for k, v in cond.items() if k not in kind._fields})
    return kind(**cond)


def check_installed(patch_embed: nn.Module) -> None:
    """Refuse a forward through a model whose patch embedding ``install`` has not replaced.

    Raises:
        RuntimeError: ``patch_embed`` is not a :class:`~dfm_ext.wrapping.embeddings.MultiScalePatchEmbed`.
    """
    if not isinstance(patch_embed, MultiScalePatchEmbed):
        raise RuntimeError("the model has not been installed by this adapter; use dfm_ext.wrap_dit")


def check_stage0_channels(packer: Any, init: str, expected: int, what: str = "the model takes") -> None:
    """With ``init="pretrained"``, stage 0 must have the channels the pretrained patch kernel reads.

    Raises:
        ValueError: ``"stage 0 has {c} channels but {what} {expected}"``.
    """
    c0 = packer.stage_shapes[0][0]
    if init == "pretrained" and c0 != expected:
        raise ValueError(f"stage 0 has {c0} channels but {what} {expected}")


def scaled_output(head_out: Tensor, grid: tuple[int, ...], output_scale: float) -> Tensor:
    """Head tokens ``[B, N, C']`` -> packed output ``[B, C', *grid]`` times ``output_scale``.

    ``output_scale`` is ``-1`` for a model trained on ``noise - x`` (1 multiplies nothing).

    Example:
        >>> import torch
        >>> scaled_output(torch.ones(1, 6, 3), (2, 3), -1.0).shape
        torch.Size([1, 3, 2, 3])
    """
    out = MultiScaleHead.to_grid(head_out, grid)
    return out if output_scale == 1.0 else out * output_scale


def zeroed_condition(cond: dict[str, Any], keys: tuple[str, ...], pronoun: str = "its") -> dict[str, Any]:
    """``cond`` with the tensors under ``keys`` replaced by zeros (a stand-in unconditional input).

    ``pronoun`` only words the error (``"their"`` for a plural-sounding single key).

    Raises:
        TypeError: a key is missing or not a tensor (its shape is needed).
    """
    out = dict(cond)
    for key in keys:
        value = cond.get(key)
        if not isinstance(value, Tensor):
            raise TypeError(f"null_condition needs the conditional {key} to know {pronoun} shape")
        out[key] = torch.zeros_like(value)
    return out


class TimeMLP(nn.Module):
    """``mlp(proj(timestep))``: a sinusoidal projection (e.g. diffusers ``Timesteps``) and its MLP.

    ``proj`` has no parameters; the MLP's input is cast to the MLP's dtype, as the diffusers
    models cast it to the hidden dtype. Bundling the two gives
    :func:`dfm_ext.wrapping.adapter.multiscale_time_embed` one embedder to copy per stage (the
    copies' last layer is zeroed, so at a pretrained initialisation only stage 0 contributes).

    Shapes:
        ``[B]`` timesteps (the model's convention) -> ``[B, D]``.

    Example:
        >>> import torch
        >>> from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        >>> proj, mlp = Timesteps(32, True, 0), TimestepEmbedding(32, 16)
        >>> t = torch.tensor([0.0, 500.0])
        >>> torch.equal(TimeMLP(proj, mlp)(t), mlp(proj(t)))
        True
    """

    def __init__(self, proj: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.proj = proj
        self.mlp = mlp

    def forward(self, timestep: Tensor) -> Tensor:
        return self.mlp(self.proj(timestep).to(first_linear_dtype(self.mlp)))


def sincos_positions(patch_embed: nn.Module, grid: tuple[int, int], device: torch.device) -> Tensor | None:
    """The positional embedding a diffusers ``PatchEmbed`` adds for a token grid ``(Gh, Gw)``.

    Same rules as ``PatchEmbed.forward``: SD3-style models crop a ``pos_embed_max_size``
    table around its centre; others use the stored table when the grid is the one they were
    built for and recompute the 2-D sincos table (with their ``base_size`` and
    ``interpolation_scale``) otherwise. Returns ``[1, Gh * Gw, D]`` or ``None`` (no positions).
    """
    from diffusers.models.embeddings import get_2d_sincos_pos_embed  # noqa: PLC0415

    table = getattr(patch_embed, "pos_embed", None)
    if table is None:
        return None
    gh, gw = grid
    if patch_embed.pos_embed_max_size:
        p = patch_embed.patch_size
        # cropped_pos_embed takes pixel sizes and raises a clear error past the table.
        return patch_embed.cropped_pos_embed(gh * p, gw * p)
    if (patch_embed.height, patch_embed.width) == (gh, gw):
        return table
    pos = get_2d_sincos_pos_embed(
        embed_dim=table.shape[-1],
        grid_size=(gh, gw),
        base_size=patch_embed.base_size,
        interpolation_scale=patch_embed.interpolation_scale,
        device=device,
        output_type="pt",
    )
    return pos.float().unsqueeze(0)


def shape_probe(batch: int, channels: int, grid: tuple[int, ...], patch: tuple[int, ...]) -> Tensor:
    """A ``meta`` tensor ``[B, C, *(grid * patch)]``: the unpatchified input's shape, without memory.

    For RoPE modules that take the model's input only to read its size (Wan's ``rope``, ...):
    the adapter's input is the packed grid, so it hands them this stand-in instead.

    Example:
        >>> shape_probe(2, 16, (3, 4, 4), (1, 2, 2)).shape
        torch.Size([2, 16, 3, 8, 8])
    """
    return torch.empty((batch, channels, *(g * p for g, p in zip(grid, patch))), device="meta")


def get_submodule_path(model: nn.Module, path: str) -> nn.Module:
    """``model.a.b.c`` for ``path="a.b.c"``, with an error naming the model class and the path.

    Raises:
        AttributeError: a part of ``path`` is missing.
    """
    obj: Any = model
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{type(model).__name__} has no submodule {path!r} (missing {part!r})")
        obj = getattr(obj, part)
    return obj


def set_submodule_path(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace ``model.<path>`` (dotted) by ``module``."""
    parent, _, leaf = path.rpartition(".")
    setattr(get_submodule_path(model, parent) if parent else model, leaf, module)


def fixed_grid_hint(packer: Any, native: tuple[int, ...]) -> str:
    """What fits a model whose positions are fixed at the token grid ``native``, for an error message.

    Every stage shares the packer's token grid; a fixed position table needs it to be ``native``.
    Either the same stages with other patch sizes (stage 0 must still cover the grid), or the same
    patch sizes with a sample scaled by ``native / grid``.

    Example:
        >>> from dfm_ext.wrapping.packing import ScalePacker
        >>> packer = ScalePacker([(4, 8, 8), (4, 16, 16), (4, 32, 32)], [2, 4, 8])  # grid (4, 4)
        >>> fixed_grid_hint(packer, (8, 8))
        'keep these stages with patch_sizes=[1, 2, 4], or keep the patch sizes with a sample_shape 2 times as large'
    """
    grid = tuple(int(g) for g in packer.grid)
    options = []
    try:
        sizes = patch_sizes_for_grid(packer.stage_shapes, native)
        options.append(f"keep these stages with patch_sizes={[p[0] if len(set(p)) == 1 else list(p) for p in sizes]}")
    except ValueError:
        pass
    ratios = {n / g for n, g in zip(native, grid)}
    if len(ratios) == 1:
        r = ratios.pop()
        options.append(f"keep the patch sizes with a sample_shape {int(r) if r.is_integer() else r} times as large")
    return ", or ".join(options) or f"choose stages and patch sizes whose token grid is {native}"
