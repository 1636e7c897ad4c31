"""``wrap_dit``: turn an existing DiT into a DFM model over the stages of a decomposition.

``wrap_dit(model, decomposition)`` picks an adapter for the model's family
(:mod:`dfm_ext.wrapping.adapter`), chooses per-stage patch sizes so that every stage lands on the model's
own token grid, lets the adapter swap in the widened patch embedding, the multi-scale timestep
embedder and the widened head, and returns a :class:`DFMTransformer` that follows the model
contract of the DFM process::

    model(stages: list[Tensor], t [B, S], stage [B], mask [B, S] | None, **cond) -> list[Tensor]

The base model is modified in place and kept as ``DFMTransformer.base``; its transformer trunk,
positions and conditioning are untouched, so the token count (and cost) is the base model's.

Checks in ``forward``: types, dtypes and shapes always; values (``stage`` in range, ``t`` finite
and in ``[0, 1]``) are read on the host only for CPU tensors in eager mode. On an accelerator or
under ``torch.compile`` they become ``torch._assert_async`` device-side asserts: no
device-to-host sync and no graph break, so ``torch.compile(model, fullgraph=True)`` works
(:mod:`dfm_ext.validation`, ``tests/test_compile.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dfm_ext.validation import check_value
from dfm_ext.wrapping.adapter import DiTAdapter, resolve_adapter
from dfm_ext.decompositions.base import check_stages
from dfm_ext.wrapping.packing import ScalePacker, patch_sizes_for_grid

__all__ = ["DFMTransformer", "wrap_dit", "load_wrapped"]

_FORMAT = "dfm_ext.wrapped/1"
_WEIGHTS = "model.safetensors"
_CONFIG = "dfm_config.json"


def _check_decomposition(decomposition: Any) -> None:
    for attr in ("num_stages", "decompose", "recompose", "stage_shapes"):
        if not hasattr(decomposition, attr):
            raise TypeError(f"decomposition must follow dfm_ext.Decomposition; {type(decomposition).__name__} lacks {attr}")


@dataclass(frozen=True)
class _WrapSpec:
    sample_shape: tuple[int, ...]
    init: str
    stage_embedding: bool


class DFMTransformer(nn.Module):
    """A DiT wrapped for DFM: per-stage inputs, times and outputs, one shared trunk.

    Build it with :func:`wrap_dit`. ``forward(stages, t, stage, mask=None, **cond)``:

    * ``stages``: list of ``S`` tensors ``[B, C_s, H_s, W_s]`` (the decomposition's stage shapes);
    * ``t``: ``[B, S]`` flow times (0 = noise, 1 = data);
    * ``stage``: long ``[B]``, the stage being generated, ``0 <= stage < S``;
    * ``mask``: bool ``[B, S]``, True where a stage is active; default ``s <= stage[b]``;
    * ``cond``: the base model's conditioning (``y=`` labels for the DiT family).

    Masked stages get zero inputs and ``t = 0`` (pure noise, as in the paper), so the model is
    safe to call without the objective; their returned velocities are zero.

    Attributes:
        base: the (modified) base model. decomposition, packer, adapter, sample_shape.

    Example:
        >>> import torch
        >>> from dfm_ext import DiT, DiTConfig, IdentityDecomposition, wrap_dit
        >>> model = wrap_dit(DiT(DiTConfig.preset("tiny")), IdentityDecomposition())
        >>> v = model([torch.randn(2, 4, 16, 16)], torch.rand(2, 1), torch.zeros(2, dtype=torch.long),
        ...           y=torch.tensor([1, 2]))
        >>> [tuple(x.shape) for x in v]
        [(2, 4, 16, 16)]
    """

    def __init__(
        self,
        base: nn.Module,
        decomposition: Any,
        packer: ScalePacker,
        adapter: DiTAdapter,
        spec: _WrapSpec,
    ) -> None:
        super().__init__()
        self.base = base
        self.decomposition = decomposition
        self.packer = packer
        self.adapter = adapter
        self.sample_shape = spec.sample_shape
        self._spec = spec

    @property
    def num_stages(self) -> int:
        return self.packer.num_stages

    @property
    def stage_shapes(self) -> list[tuple[int, ...]]:
        """Per-stage shapes without the batch dimension."""
        return list(self.packer.stage_shapes)

    def _check_times(self, t: Any, stage: Any, mask: Any, batch: int, device: torch.device) -> Tensor:
        s = self.num_stages
        if not isinstance(t, Tensor) or not torch.is_floating_point(t):
            raise TypeError(f"t must be a floating-point tensor [B, S], got {type(t).__name__}")
        if t.shape != (batch, s):
            raise ValueError(f"t must have shape [B, S] = [{batch}, {s}], got {tuple(t.shape)}")
        if not isinstance(stage, Tensor) or stage.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"stage must be an integer tensor [B], got {getattr(stage, 'dtype', type(stage).__name__)}")
        if stage.shape != (batch,):
            raise ValueError(f"stage must have shape [B] = [{batch}], got {tuple(stage.shape)}")
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor [B, S], got {getattr(mask, 'dtype', type(mask).__name__)}")
            if mask.shape != (batch, s):
                raise ValueError(f"mask must have shape [B, S] = [{batch}, {s}], got {tuple(mask.shape)}")
        # Values: read on the host only for CPU tensors in eager mode; otherwise device-side
        # asserts, so the step neither syncs nor breaks a torch.compile graph (dfm_ext.validation).
        if batch:
            check_value(((stage >= 0) & (stage < s)).all(), f"stage values must be in [0, {s - 1}]", stage.tolist)
            check_value(torch.isfinite(t).all(), "t must be finite", t.tolist)
            check_value(((t >= 0) & (t <= 1)).all(), "t must lie in [0, 1] (0 = noise, 1 = data)", t.tolist)
        if mask is None:
            return torch.arange(s, device=device)[None, :] <= stage.to(device)[:, None]
        return mask

    def forward(
        self, stages: Sequence[Tensor], t: Tensor, stage: Tensor, mask: Tensor | None = None, **cond: Any
    ) -> list[Tensor]:
        stages = check_stages(stages, self.packer.stage_shapes, self.num_stages)
        x0 = stages[0]
        mask = self._check_times(t, stage, mask, x0.shape[0], x0.device)
        # Selection, not multiplication by the mask: inf/NaN in a masked stage must not leak
        # (0 * NaN is NaN) into the packed input, which every token of the trunk sees.
        stages = [torch.where(mask[:, s].view(-1, *([1] * (x.ndim - 1))), x, 0.0) for s, x in enumerate(stages)]
        # t stays in its own (float32) precision: 1000 t in bfloat16 would be off by up to 4.
        t = torch.where(mask.to(t.device), t, 0.0)
        out = self.adapter.forward(self.base, self.packer.pack(stages), t, stage.long(), **cond)
        velocities = self.packer.unpack(out)
        return [torch.where(mask[:, s].view(-1, *([1] * (v.ndim - 1))), v, 0.0) for s, v in enumerate(velocities)]

    def null_condition(self, **cond: Any) -> dict[str, Any]:
        """The unconditional counterpart of ``cond`` for classifier-free guidance."""
        return self.adapter.null_condition(self.base, **cond)

    # ----------------------------------------------------------------- save / load

    def _record(self) -> dict[str, Any]:
        base_cfg = getattr(self.base, "config", None)
        if hasattr(base_cfg, "to_dict"):
            base_cfg = base_cfg.to_dict()
        try:
            json.dumps(base_cfg)
        except (TypeError, ValueError):
            base_cfg = None
        adapter_cfg = self.adapter.config() if callable(getattr(self.adapter, "config", None)) else None
        return {
            "format": _FORMAT,
            "adapter": {"name": self.adapter.name, "config": adapter_cfg},
            "sample_shape": list(self.sample_shape),
            "stage_shapes": [list(s) for s in self.packer.stage_shapes],
            "patch_sizes": [list(p) for p in self.packer.patch_sizes],
            "stage_embedding": self._spec.stage_embedding,
            "decomposition": _describe(self.decomposition),
            "base": {"class": f"{type(self.base).__module__}:{type(self.base).__qualname__}", "config": base_cfg},
        }

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``model.safetensors`` (all weights) and ``dfm_config.json`` into ``directory``.

        The JSON records the decomposition (class, repr, constructor parameters), the patch
        sizes, sample shape, adapter name and options, and the base model's class and config.
        A model specialised with :func:`dfm_ext.specialize` writes its shared weights to
        ``model.safetensors`` and its stage parameters and their record beside them
        (:func:`dfm_ext.save_specialization`); reload with :func:`load_wrapped` followed by
        :func:`dfm_ext.load_specialization`.
        """
        from safetensors.torch import save_model  # noqa: PLC0415

        from dfm_ext.specialization import is_specialized, stage_parameters_detached, save_specialization  # noqa: PLC0415

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if is_specialized(self):
            # Stage parameters apart, so load_wrapped's strict load of the shared weights works.
            with stage_parameters_detached(self):
                save_model(self, str(directory / _WEIGHTS))
            save_specialization(self, directory)
        else:
            save_model(self, str(directory / _WEIGHTS))
        (directory / _CONFIG).write_text(json.dumps(self._record(), indent=2))


#: Where classes named in records written before the library's subpackages lived then.
_MOVED_MODULES = {"dfm_ext.models": "dfm_ext.models.dit", "dfm_ext.video_models": "dfm_ext.models.video_dit"}


def _current_class_path(path: str) -> str:
    """``"module:Class"`` from a saved record, with modules renamed since then mapped to today's."""
    module, _, name = str(path).partition(":")
    return f"{_MOVED_MODULES.get(module, module)}:{name}"


def _describe(decomposition: Any) -> dict[str, Any]:
    """The decomposition record of ``dfm_config.json``: class, repr and the factory config.

    ``config`` is :func:`dfm_ext.decompositions.factory.decomposition_config` (``None`` for a
    custom decomposition, which then has to be passed to :func:`load_wrapped`).
    """
    from dfm_ext.decompositions.factory import decomposition_config  # noqa: PLC0415

    cls = type(decomposition)
    try:
        config = decomposition_config(decomposition)
    except TypeError:
        config = None
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "repr": repr(decomposition), "config": config}


def _rebuild_decomposition(record: dict[str, Any]) -> Any:
    """Rebuild a recorded decomposition through the factory (new records and ones with ``params``)."""
    from dfm_ext.decompositions.factory import config_from_record, decomposition_from_config  # noqa: PLC0415

    config = config_from_record(record)
    if config is None:
        raise ValueError(
            f"cannot rebuild the decomposition {record['repr']} from the saved config; "
            "pass decomposition= to load_wrapped"
        )
    decomposition = decomposition_from_config(config)
    if repr(decomposition) != record["repr"]:
        raise ValueError(
            f"rebuilt decomposition {decomposition!r} differs from the saved {record['repr']}; "
            "pass decomposition= to load_wrapped"
        )
    return decomposition


def _check_not_wrapped(model: nn.Module) -> None:
    """Refuse a model that ``wrap_dit`` already modified: wrapping twice would widen the widened layers."""
    from dfm_ext.wrapping.embeddings import MultiScaleHead, MultiScalePatchEmbed, MultiScaleTimestepEmbed  # noqa: PLC0415

    if isinstance(model, DFMTransformer):
        raise TypeError(
            f"model is already wrapped (a DFMTransformer over {model.num_stages} stages of "
            f"{model.decomposition!r}); pass an unwrapped base model, or use it as it is"
        )
    for name, module in model.named_modules():
        if isinstance(module, (MultiScalePatchEmbed, MultiScaleTimestepEmbed, MultiScaleHead)):
            raise TypeError(
                f"{type(model).__name__} was already modified by wrap_dit ({name} is a {type(module).__name__}); "
                "it is the .base of a DFMTransformer: use that wrapper, or wrap a fresh base model"
            )


def wrap_dit(
    model: nn.Module,
    decomposition: Any,
    *,
    adapter: str | DiTAdapter | type = "auto",
    time_convention: str | None = None,
    sample_shape: Sequence[int] | None = None,
    patch_sizes: Sequence[int | Sequence[int]] | None = None,
    init: str = "pretrained",
    stage_embedding: bool = True,
) -> DFMTransformer:
    """Wrap a DiT so that it generates the stages of ``decomposition`` (in place; returns the wrapper).

    Args:
        model: the base DiT; modified in place (patch embedding, timestep embedder and output
            projection are replaced) and kept as ``.base``.
        decomposition: a :class:`dfm_ext.Decomposition`.
        adapter: ``"auto"`` (first registered adapter whose ``matches`` is true), an adapter name,
            or an adapter class/instance (:class:`dfm_ext.wrapping.adapter.DiTAdapter`).
        time_convention: how the base model reads time, a name of
            :func:`dfm_ext.process.conventions.time_transform`: ``"discrete"`` (facebookresearch DiT,
            ``999 (1 - t)``), ``"unit"`` (SiT, LightningDiT: ``t``), ``"x1000"`` (``1000 t``),
            ``"timestep"`` (``1000 (1 - t)``), ``"sigma"`` (``1 - t``). Required for models with
            DiT's module names that do not declare ``dfm_time_convention`` (:class:`dfm_ext.DiT`
            does); default for the diffusers families: their own. Saved by ``save_pretrained``.
            Only time is converted: the output is the base model's own (epsilon stays epsilon).
        sample_shape: per-sample full-resolution shape ``(C, H, W)`` or ``(C, T, H, W)``;
            default: the shape the model was built for.
        patch_sizes: per-stage patch sizes; default: chosen so that every stage maps onto the
            model's token grid.
        init: ``"pretrained"`` (stage 0 reuses the model's patch embedding, time embedder and
            head; other stages start at zero, so the wrapped model's stage-0 prediction equals the
            model's) or ``"scratch"`` (every stage's new parameters freshly initialised).
        stage_embedding: add a learned (zero-initialised) embedding of the stage index.

    Raises:
        TypeError: no adapter recognises ``model``, or ``model`` is already wrapped (a
            :class:`DFMTransformer`, or a base model that ``wrap_dit`` already modified).
        ValueError: the time convention is unknown, contradicts the model's declaration, or cannot
            be proven (the message lists the choices); a stage cannot be patchified onto the model's token grid, or the stages do
            not fit the model.

    Example:
        >>> from dfm_ext import DiT, DiTConfig, IdentityDecomposition
        >>> wrapped = wrap_dit(DiT(DiTConfig.preset("tiny")), IdentityDecomposition())
        >>> wrapped.packer.patch_sizes, wrapped.packer.grid, wrapped.adapter.name
        ([(2, 2)], (8, 8), 'dit')
    """
    _check_decomposition(decomposition)
    if init not in ("pretrained", "scratch"):
        raise ValueError(f"init must be 'pretrained' or 'scratch', got {init!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_not_wrapped(model)
    ad = resolve_adapter(adapter, model, time_convention=time_convention)
    if sample_shape is not None and (isinstance(sample_shape, (str, bytes)) or not isinstance(sample_shape, Sequence)):
        raise TypeError(f"sample_shape must be a sequence (C, H, W) or (C, T, H, W), got {sample_shape!r}")
    if patch_sizes is not None and (isinstance(patch_sizes, (str, bytes)) or not isinstance(patch_sizes, Sequence)):
        raise TypeError(f"patch_sizes must be a sequence with one patch size per stage, got {patch_sizes!r}")
    shape = tuple(int(s) for s in (sample_shape if sample_shape is not None else ad.default_sample_shape(model)))
    if len(shape) not in (3, 4) or any(s < 1 for s in shape):
        raise ValueError(f"sample_shape must be (C, H, W) or (C, T, H, W) of positive ints, got {shape}")
    stage_shapes = [tuple(s[1:]) for s in decomposition.stage_shapes((1, *shape))]
    if len(stage_shapes) != decomposition.num_stages:
        raise ValueError(f"{decomposition!r} reports {decomposition.num_stages} stages but {len(stage_shapes)} shapes")
    if patch_sizes is None:
        grid = tuple(ad.token_grid(model, shape))
        try:
            patch_sizes = patch_sizes_for_grid(stage_shapes, grid)
        except ValueError as err:
            raise ValueError(
                f"{decomposition!r} on samples of shape {shape} gives stages {stage_shapes}, which cannot "
                f"all map onto {type(model).__name__}'s token grid {grid}: {err}. Choose stage "
                "resolutions that are multiples of the grid, or pass sample_shape / patch_sizes."
            ) from None
    packer = ScalePacker(stage_shapes, patch_sizes)
    ad.install(model, packer, init=init, stage_embedding=stage_embedding)
    return DFMTransformer(model, decomposition, packer, ad, _WrapSpec(shape, init, stage_embedding))


def load_wrapped(
    directory: str | Path,
    base_model: nn.Module | None = None,
    *,
    decomposition: Any = None,
    device: str | torch.device = "cpu",
) -> DFMTransformer:
    """Rebuild a :class:`DFMTransformer` written by :meth:`DFMTransformer.save_pretrained`.

    Args:
        directory: the saved directory.
        base_model: an unwrapped base model of the same architecture (its weights are replaced).
            Not needed for :class:`dfm_ext.DiT`, which is rebuilt from the recorded config.
        decomposition: overrides the recorded decomposition (needed when it cannot be rebuilt
            from its recorded constructor parameters).
        device: where to load the weights.

    Weights are read with safetensors only (no pickle).
    """
    from safetensors import safe_open  # noqa: PLC0415

    directory = Path(directory)
    config_path, weights_path = directory / _CONFIG, directory / _WEIGHTS
    if not directory.is_dir():
        raise FileNotFoundError(f"wrapped model folder {str(directory)!r} does not exist or is not a folder")
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing (save_pretrained writes {_CONFIG} and {_WEIGHTS})")
    try:
        record = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        fmt = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{config_path}: {directory} is not a dfm_ext wrapped model (format {fmt!r}, expected {_FORMAT!r})")
    needed = ("decomposition", "base", "adapter", "sample_shape", "patch_sizes", "stage_embedding", "stage_shapes")
    absent = [k for k in needed if k not in record] + [f"base.{k}" for k in ("class", "config") if k not in record.get("base", {})]
    if absent:
        raise ValueError(f"{config_path} is missing the key(s) {absent}")
    # The weights file is opened (header only) before any model is built: a truncated or
    # non-safetensors file fails here, naming the file.
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from None
    if decomposition is None:
        decomposition = _rebuild_decomposition(record["decomposition"])
    base_class = _current_class_path(record["base"]["class"])
    if base_model is None:
        if base_class != "dfm_ext.models.dit:DiT":
            raise ValueError(f"the saved base model is a {base_class}; pass base_model= (an unwrapped instance)")
        from dfm_ext.models.dit import DiT, DiTConfig  # noqa: PLC0415

        try:
            base_model = DiT(DiTConfig.from_dict(record["base"]["config"]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{config_path}: base.config cannot build a DiT: {e}") from None
    elif f"{type(base_model).__module__}:{type(base_model).__qualname__}" != base_class:
        raise ValueError(f"base_model is a {type(base_model).__qualname__}, the saved base is {base_class}")
    adapter_cfg = record["adapter"].get("config") or {}
    # The saved time convention settles it (wrap_dit below still refuses one the model contradicts).
    ad = resolve_adapter(record["adapter"]["name"], base_model, time_convention=adapter_cfg.get("time_convention"))
    if adapter_cfg:
        ad = type(ad)(**adapter_cfg)
    wrapped = wrap_dit(
        base_model,
        decomposition,
        adapter=ad,
        sample_shape=record["sample_shape"],
        patch_sizes=[tuple(p) for p in record["patch_sizes"]],
        init="scratch",
        stage_embedding=record["stage_embedding"],
    )
    if [list(s) for s in wrapped.packer.stage_shapes] != record["stage_shapes"]:
        raise ValueError(
            f"the decomposition gives stages {wrapped.packer.stage_shapes}, the saved model has {record['stage_shapes']}"
        )
    from safetensors.torch import load_model  # noqa: PLC0415

    from dfm_ext.recipes.demo_checkpoint import describe_mismatch  # noqa: PLC0415

    expected = {k: tuple(v.shape) for k, v in wrapped.state_dict().items()}
    # Names absent from the file may be tied weights save_model stored once; load_model knows.
    if any(k in found and found[k] != shape for k, shape in expected.items()):
        detail = describe_mismatch(expected, {k: v for k, v in found.items() if k in expected}, record)
        raise ValueError(f"{weights_path} does not fit the model {config_path} describes: {detail}")
    wrapped.to(device)
    try:
        load_model(wrapped, str(weights_path), strict=True, device=str(device))
    except RuntimeError as e:  # names missing from / unexpected in the file
        detail = describe_mismatch(expected, found, record)
        raise ValueError(f"{weights_path} does not fit the model {config_path} describes: {detail}") from e
    except Exception as e:  # a header that parses but data that does not (truncated file)
        raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from None
    return wrapped
