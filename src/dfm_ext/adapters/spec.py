"""A declarative adapter: a small spec names the modules and conventions, one class does the rest.

Most DiT families differ in *where* their patch embedding, timestep embedder and output head
live, in their conventions (time scale, sigma or t, prediction, head order), and in their trunk's
forward. :class:`AdapterSpec` declares the first two; :class:`SpecAdapter` turns a spec into a
complete :class:`dfm_ext.wrapping.adapter.DiTAdapter` (``matches``, geometry, ``install``,
``config``, ``null_condition``, layer groups), so a family only writes its ``forward`` (the part
that genuinely differs), with the helpers :meth:`SpecAdapter.embed_time`,
:meth:`SpecAdapter.velocity` and :func:`dfm_ext.adapters.common.call_block`.

The built-in Sana, AuraFlow and Wan adapters are written this way; ``docs/guides/adapters.md``
shows one for a model the library does not ship (``examples/write_your_own_adapter.py``).

What ``install`` does with a spec (``init="pretrained"``: stage 0 = the pretrained model):

* ``patch_embed`` (``Conv2d``/``Conv3d`` with kernel = stride, or a ``Linear`` over flattened
  patches in ``patch_in_order``) -> :class:`~dfm_ext.wrapping.embeddings.MultiScalePatchEmbed`
  over the packed stages; it returns tokens ``[B, N, D]``;
* ``time_embedder`` (with the parameter-free ``time_proj`` sinusoid before it, bundled as a
  :class:`~dfm_ext.adapters.common.TimeMLP`) -> :class:`~dfm_ext.wrapping.embeddings.MultiScaleTimestepEmbed`
  reading the model's own time ``scale * convention(t)``;
* ``head`` (``Linear``, unpatchified in ``patch_order``) -> widened
  :class:`~dfm_ext.wrapping.embeddings.MultiScaleHead`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from torch import Tensor, nn

from dfm_ext.process.conventions import check_time_convention, time_transform
from dfm_ext.wrapping.adapter import multiscale_time_embed, stage_input_time_embed, widen_head, widen_patch_embed
from dfm_ext.wrapping.embeddings import Init, MultiScalePatchEmbed

from .common import TimeMLP, check_installed, check_stage0_channels, get_submodule_path, scaled_output
from .common import set_submodule_path, zeroed_condition
from .diffusers_common import DIFFUSERS_LAYER_GROUPS

__all__ = ["AdapterSpec", "NoConditioning", "PredictionSpecAdapter", "SpecAdapter", "check_output_scale"]

#: how a family places its tokens: learned or sin-cos positions at a fixed grid ("fixed"), sin-cos
#: recomputed for any grid ("sincos"), rotary ("rope") or none
POSITION_KINDS = ("fixed", "sincos", "rope", "none")


class NoConditioning(NamedTuple):
    """A family whose forward takes no conditioning keywords."""


@dataclass(frozen=True)
class AdapterSpec:
    """Where a DiT family keeps the three modules DFM replaces, and how it reads time.

    Args:
        name: the adapter's registry name (``wrap_dit(..., adapter=name)``).
        model_class: the model class, or its name in ``diffusers`` (looked up only when
            ``matches`` runs), or ``"module:Class"``.
        patch_embed: dotted path of the patch embedding (``Conv2d``/``Conv3d``/``Linear``).
        time_embedder: dotted path of the timestep MLP ``[B, F] -> [B, D]``.
        head: dotted path of the output ``Linear`` ``D -> prod(patch) * C``.
        time_proj: dotted path of the parameter-free sinusoid before ``time_embedder`` (``None``:
            the embedder reads the time itself).
        patch_order: the head's flattened order: ``"pqc"`` (channels fastest: DiT, PixArt,
            Sana, AuraFlow, Wan) or ``"cpq"`` (channel-major: Flux, CogVideoX).
        patch_in_order: flattened input order of a ``Linear`` patch embedding.
        time_convention: a time convention: a name of :func:`dfm_ext.process.conventions.time_transform`,
            or a ``{"name": ..., **params}`` mapping / :class:`~dfm_ext.process.conventions.TimeConvention`
            for a parameterised one (CogView4's ``"shifted_timestep"`` reads the token grid).
        time_scale: multiplies the convention's time: a number, or the name of the model config
            field holding it (Sana's ``"timestep_scale"``).
        output_scale: multiplies the head output (``-1`` for a model trained on ``noise - x``).
        positions: one of ``"fixed"`` (a position table for a fixed grid: the token grid must
            fit it, see :meth:`SpecAdapter.position_grid`), ``"sincos"``, ``"rope"``, ``"none"``.
        grid_ndim: 2 for images ``(C, H, W)``, 3 for videos ``(C, T, H, W)``.
        conditioning: the :class:`typing.NamedTuple` of the forward's keywords.
        null_keys: conditioning tensors ``null_condition`` zeroes (stand-in unconditional input).
        layer_groups: ``dfm_ext.specialization`` layer groups (default: diffusers' shared names).
        default_sample: ``(T, H, W)`` or ``(H, W)`` used when the model config has no
            ``sample_size`` (video models); channels come from ``in_channels``.
        time_input_layer: for a time network too large to copy per stage (a modulation
            approximator such as Chroma's, ``[B, M, F] -> [B, M, D]``): the dotted name of its first
            ``nn.Linear`` inside ``time_embedder``. The stages then share the one network, whose
            first layer is widened to read every stage's ``time_proj`` features
            (:class:`~dfm_ext.wrapping.timestep_embed.StageInputTimeEmbed`); ``None`` (default):
            one copy of ``time_embedder`` per stage, summed.
    """

    name: str
    model_class: str | type
    patch_embed: str
    time_embedder: str
    head: str
    time_proj: str | None = None
    patch_order: str = "pqc"
    patch_in_order: str = "cpq"
    time_convention: Any = "timestep"
    time_scale: float | str = 1.0
    output_scale: float = 1.0
    positions: str = "rope"
    grid_ndim: int = 2
    conditioning: type = NoConditioning
    null_keys: tuple[str, ...] = ()
    layer_groups: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: DIFFUSERS_LAYER_GROUPS)
    default_sample: tuple[int, ...] | None = None
    time_input_layer: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "time_convention", check_time_convention(self.time_convention))
        if self.patch_order not in ("pqc", "cpq") or self.patch_in_order not in ("pqc", "cpq"):
            raise ValueError(f"patch orders must be 'pqc' or 'cpq', got {self.patch_order!r}, {self.patch_in_order!r}")
        if self.positions not in POSITION_KINDS:
            raise ValueError(f"positions must be one of {POSITION_KINDS}, got {self.positions!r}")
        if self.grid_ndim not in (2, 3):
            raise ValueError(f"grid_ndim must be 2 (images) or 3 (videos), got {self.grid_ndim!r}")
        check_output_scale(self.output_scale)


def check_output_scale(value: object) -> float:
    """A finite, non-zero ``output_scale`` (0 would make every prediction zero and the model untrainable)."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
        raise ValueError(f"output_scale must be a finite non-zero number (1, or -1 for a model trained on noise - x), got {value!r}")
    return float(value)


def _has_path(model: nn.Module, path: str) -> bool:
    try:
        get_submodule_path(model, path)
    except AttributeError:
        return False
    return True


def _last_linear(module: nn.Module) -> nn.Linear:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"{type(module).__name__} has no Linear layer to take the embedding width from")
    return linears[-1]


class SpecAdapter:
    """A :class:`dfm_ext.wrapping.adapter.DiTAdapter` built from a class attribute ``spec`` (:class:`AdapterSpec`).

    A family subclasses it with ``spec = AdapterSpec(...)`` and a ``forward(model, packed, t,
    stage, **cond)``; inside, ``model.<patch_embed>(packed)`` gives the tokens ``[B, N, D]``,
    :meth:`embed_time` the time embedding and :meth:`velocity` the packed output. Subclasses may
    also override :meth:`check_model` (refuse variants whose convention cannot be proven) and
    :meth:`position_grid` (the grid a fixed position table covers).

    Args:
        time_convention: overrides the spec's (a name of :func:`~dfm_ext.process.conventions.time_transform`).
        output_scale: overrides the spec's.
        time_scale: overrides the spec's (a number).
    """

    spec: ClassVar[AdapterSpec]
    name: ClassVar[str]
    layer_groups: ClassVar[Mapping[str, tuple[str, ...]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("spec")
        if spec is not None:
            cls.name = spec.name
            cls.layer_groups = spec.layer_groups

    def __init__(
        self, time_convention: Any = None, output_scale: float | None = None, time_scale: float | None = None
    ) -> None:
        spec = self.spec
        self.time_convention: Any = check_time_convention(spec.time_convention if time_convention is None else time_convention)
        self.output_scale = check_output_scale(spec.output_scale if output_scale is None else output_scale)
        if time_scale is not None and (isinstance(time_scale, bool) or not isinstance(time_scale, (int, float))):
            raise TypeError(f"time_scale must be a number, got {time_scale!r}")
        self.time_scale = None if time_scale is None else float(time_scale)

    # ------------------------------------------------------------------ protocol: identity
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild this adapter (JSON-serialisable)."""
        return {"time_convention": self.time_convention, "output_scale": self.output_scale, "time_scale": self.time_scale}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"

    def _model_class(self) -> type:
        cls = self.spec.model_class
        if isinstance(cls, type):
            return cls
        if ":" in cls:
            module, _, attr = cls.partition(":")
            return getattr(importlib.import_module(module), attr)
        import diffusers  # noqa: PLC0415  (only when a diffusers model may match)

        return getattr(diffusers, cls)

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self._model_class())

    def missing(self, model: nn.Module) -> list[str] | None:
        """The spec's modules ``model`` lacks (``None`` when it is not of the spec's class at all)."""
        if not self.matches(model):
            return None
        paths = [self.spec.patch_embed, self.spec.time_embedder, self.spec.head, *([self.spec.time_proj] if self.spec.time_proj else [])]
        return [f"a submodule {path!r}" for path in paths if not _has_path(model, path)]

    def check_model(self, model: nn.Module) -> None:
        """Refuse model variants the adapter cannot handle (nothing by default); runs before ``install``."""

    # ------------------------------------------------------------------ geometry
    def patch(self, model: nn.Module) -> tuple[int, ...]:
        """The model's patch ``(p, q)`` or ``(pt, p, q)`` from ``config.patch_size``."""
        p = model.config.patch_size
        patch = tuple(int(v) for v in p) if isinstance(p, (tuple, list)) else (int(p),) * self.spec.grid_ndim
        if len(patch) != self.spec.grid_ndim:
            raise ValueError(f"{type(model).__name__} has patch_size {p}, expected {self.spec.grid_ndim} sizes")
        return patch

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        cfg = model.config
        size = getattr(cfg, "sample_size", None)
        if size is not None:
            return (int(cfg.in_channels), *((int(size),) * self.spec.grid_ndim))
        if self.spec.default_sample is None:
            raise ValueError(f"{type(model).__name__} has no sample_size; pass wrap_dit(..., sample_shape=)")
        return (int(cfg.in_channels), *self.spec.default_sample)

    def token_grid(self, model: nn.Module, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        patch = self.patch(model)
        if len(sample_shape) != 1 + self.spec.grid_ndim:
            want = "(C, T, H, W)" if self.spec.grid_ndim == 3 else "(C, H, W)"
            raise ValueError(f"{type(model).__name__}: sample_shape must be {want}, got {sample_shape}")
        if any(d % p for d, p in zip(sample_shape[1:], patch)):
            raise ValueError(f"sample_shape {sample_shape} is not divisible by the model's patch size {patch}")
        return tuple(d // p for d, p in zip(sample_shape[1:], patch))

    def position_grid(self, model: nn.Module) -> tuple[int, ...] | None:
        """The largest token grid a ``"fixed"`` position table covers (``None``: any grid)."""
        return None

    def _check_grid(self, model: nn.Module, grid: tuple[int, ...]) -> None:
        if len(grid) != self.spec.grid_ndim:
            kind = "videos" if self.spec.grid_ndim == 3 else "images"
            raise ValueError(f"{type(model).__name__} takes {kind}; got a token grid {grid}")
        limit = self.position_grid(model)
        if limit is not None and any(g > m for g, m in zip(grid, limit)):
            patch = self.patch(model)
            native = tuple(m * p for m, p in zip(limit, patch))
            raise ValueError(
                f"the token grid {grid} is larger than {type(model).__name__}'s fixed position table (grid {limit}). "
                f"Stage 0 and every other stage share one token grid: choose a sample_shape whose grid fits, "
                f"e.g. at most {native} for patch sizes equal to the model's {patch}, or give later stages larger "
                "patch_sizes (see docs/guides/adapters.md, 'Fixed positions')"
            )

    # ------------------------------------------------------------------ install
    def time_function(self, model: nn.Module) -> Any:
        """The picklable map from paper time to the model's time input (convention times scale)."""
        scale: Any = self.time_scale
        if scale is None:
            scale = self.spec.time_scale
            if isinstance(scale, str):
                scale = getattr(model.config, scale)
        return time_transform(self.time_convention, scale=float(scale))

    def install(self, model: nn.Module, packer: Any, *, init: Init, stage_embedding: bool) -> None:
        spec = self.spec
        self.check_model(model)
        proj = get_submodule_path(model, spec.patch_embed)
        if isinstance(proj, MultiScalePatchEmbed) or not isinstance(proj, (nn.Linear, nn.modules.conv._ConvNd)):
            raise TypeError(f"{type(model).__name__}.{spec.patch_embed} is a {type(proj).__name__}, not a conv/linear (already wrapped?)")
        self._check_grid(model, tuple(packer.grid))
        patch = self.patch(model)
        if isinstance(proj, nn.Linear):
            c_in, hidden = proj.in_features // math.prod(patch), proj.out_features
        else:
            c_in, hidden = proj.in_channels, proj.out_channels
        check_stage0_channels(packer, init, c_in)
        head = get_submodule_path(model, spec.head)
        if not isinstance(head, nn.Linear):
            raise TypeError(f"{type(model).__name__}.{spec.head} is a {type(head).__name__}, not a Linear (already wrapped?)")
        mlp = get_submodule_path(model, spec.time_embedder)
        proj_in = None if spec.time_proj is None else get_submodule_path(model, spec.time_proj)
        set_submodule_path(model, spec.patch_embed, widen_patch_embed(proj, packer, init=init, in_order=spec.patch_in_order))
        if spec.time_input_layer is not None:
            if proj_in is None:
                raise TypeError(f"{spec.name}: time_input_layer needs time_proj, the featuriser of the shared time network")
            time_embed: nn.Module = stage_input_time_embed(
                proj_in, mlp, spec.time_input_layer, packer.num_stages, init=init,
                stage_embedding=stage_embedding, time_transform=self.time_function(model),
            )  # fmt: skip
        else:
            time_embed = multiscale_time_embed(
                mlp if proj_in is None else TimeMLP(proj_in, mlp),
                _last_linear(mlp).out_features,
                packer.num_stages,
                init=init,
                stage_embedding=stage_embedding,
                time_transform=self.time_function(model),
            )
        set_submodule_path(model, spec.time_embedder, time_embed)
        widened = widen_head(
            head,
            packer,
            base_patch=patch,
            base_channels=head.out_features // math.prod(patch),
            order=spec.patch_order,
            init=init,
        )
        set_submodule_path(model, spec.head, widened)

    # ------------------------------------------------------------------ forward helpers
    def tokens(self, model: nn.Module, packed: Tensor) -> Tensor:
        """The widened patch embedding on packed stages: ``[B, C', *grid]`` -> ``[B, N, D]`` (no positions)."""
        embed = get_submodule_path(model, self.spec.patch_embed)
        check_installed(embed)
        return embed(packed)

    def embed_time(self, model: nn.Module, t: Tensor, stage: Tensor, grid: tuple[int, ...] | None = None) -> Tensor:
        """The multi-scale time embedding ``[B, *E]`` of ``t [B, S]`` (per-stage embedders + stage embedding).

        ``grid`` (the packed token grid) is needed by a time convention that reads it (CogView4's).
        """
        return get_submodule_path(model, self.spec.time_embedder)(t, stage, grid)

    def velocity(self, head_out: Tensor, grid: tuple[int, ...]) -> Tensor:
        """Head tokens ``[B, N, C']`` -> packed velocity ``[B, C', *grid]`` (times ``output_scale``)."""
        return scaled_output(head_out, grid, self.output_scale)

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define forward(model, packed, t, stage, **cond)")

    def null_condition(self, model: nn.Module, **cond: Any) -> dict[str, Any]:
        """The spec's ``null_keys`` zeroed (a stand-in; pass empty-prompt embeddings as ``uncond=`` for real models)."""
        return zeroed_condition(cond, self.spec.null_keys)


class PredictionSpecAdapter(SpecAdapter):
    """A :class:`SpecAdapter` for a model whose prediction type the installed code cannot prove, so the user names it:
    ``prediction`` is one of :attr:`predictions` (``None``: not chosen; ``check_model`` then asks with the choices).
    A choice mapped to a number sets the output scale it implies, unless ``output_scale`` is given."""

    predictions: ClassVar[Mapping[str, float | None]]

    def __init__(
        self, prediction: str | None = None, time_convention: Any = None, output_scale: float | None = None, time_scale: float | None = None
    ) -> None:
        if prediction is not None and prediction not in self.predictions:
            raise ValueError(f"prediction must be one of {list(self.predictions)}, got {prediction!r}")
        self.prediction = prediction
        if output_scale is None and prediction is not None:
            output_scale = self.predictions[prediction]
        super().__init__(time_convention, output_scale, time_scale)

    def config(self) -> dict[str, Any]:
        return {"prediction": self.prediction, **super().config()}

