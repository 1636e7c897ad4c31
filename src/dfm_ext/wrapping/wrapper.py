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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dfm_ext.decompositions.base import Decomposition, check_stages
from dfm_ext.process.conventions import TimeConvention
from dfm_ext.wrapping import record as files
from dfm_ext.wrapping.adapter import DiTAdapter, adapter_for_record, resolve_adapter
from dfm_ext.wrapping.checks import check_decomposition, check_stage_dtypes, check_times, native_grid_hint
from dfm_ext.wrapping.embeddings import Init
from dfm_ext.wrapping.packing import ScalePacker, patch_sizes_for_grid

__all__ = ["DFMTransformer", "load_wrapped", "wrap_dit"]


@dataclass(frozen=True)
class _WrapSpec:
    sample_shape: tuple[int, ...]
    init: Init
    stage_embedding: bool
    any_sample_shape: bool = False


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

    With ``any_sample_shape`` (``wrap_dit(..., any_sample_shape=True)``, for RoPE models such as
    FLUX) ``stages`` may have the shapes of any sample shape the decomposition and the patch
    sizes allow: the token grid follows the sample (one packer per shape, shared parameters).

    Attributes:
        base: the (modified) base model. decomposition, packer, adapter, sample_shape.
        stage_scales: ``[S]`` standardisation scales (buffer) or ``None`` (off).
        specialization: the handle of a specialisation re-applied by :func:`load_wrapped`.

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
        decomposition: Decomposition,
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
        self.any_sample_shape = spec.any_sample_shape
        self._spec = spec
        self._packers: dict[tuple[tuple[int, ...], ...], ScalePacker] = {}
        #: The specialisation handle when :func:`load_wrapped` re-applied one, else ``None``.
        self.specialization: Any = None
        self.register_buffer("stage_scales", None)

    def set_stage_scales(self, scales: Sequence[float] | Tensor | None) -> None:
        """Set (or, with ``None``, drop) the per-stage standardisation scales ``c_s`` ``[S]``.

        ``DFMObjective`` and ``DFMSampler`` built without ``scales=`` use them; they are a buffer
        (``.to()``, ``state_dict``, EMA, checkpoints) and ``save_pretrained`` records them.
        """
        if scales is None:
            self.stage_scales = None
            return
        from dfm_ext.process.objective import per_stage_vector  # noqa: PLC0415

        device = next(iter(self.parameters()), torch.empty(0)).device
        self.stage_scales = per_stage_vector(scales, self.num_stages, "stage_scales", positive=True).to(device)

    def _packer_for(self, stages: Sequence[Tensor]) -> ScalePacker:
        """The packer of the wrapped shapes, or (``any_sample_shape``) one for the stages' sample shape."""
        if not self.any_sample_shape or not isinstance(stages, (list, tuple)) or not stages:
            return self.packer
        shapes = tuple(tuple(x.shape[1:]) if isinstance(x, Tensor) else () for x in stages)
        if list(shapes) == self.packer.stage_shapes or len(shapes) != self.num_stages:
            return self.packer  # check_stages reports a wrong count
        if shapes not in self._packers:
            sample = shapes[-1]  # the finest stage has the sample's resolution
            expected = tuple(tuple(s[1:]) for s in self.decomposition.stage_shapes((1, *sample)))
            if expected != shapes:
                raise ValueError(
                    f"stage shapes {[list(s) for s in shapes]} are not what {self.decomposition!r} gives for a sample "
                    f"of shape {list(sample)}: {[list(s) for s in expected]}"
                )
            try:
                packer = ScalePacker(shapes, self.packer.patch_sizes)
            except ValueError as err:
                raise ValueError(
                    f"samples of shape {list(sample)} do not tile with the patch sizes {self.packer.patch_sizes}: {err}"
                ) from None
            if torch.compiler.is_compiling():  # a graph per shape, not a cache write: a guard on the
                return packer  # cache's size would send every earlier shape's graph to recompile
            self._packers[shapes] = packer
        return self._packers[shapes]

    @property
    def num_stages(self) -> int:
        return self.packer.num_stages

    @property
    def stage_embedding(self) -> bool:
        """Whether the timestep embedder adds a stage-index embedding (recorded by ``save_pretrained``)."""
        return self._spec.stage_embedding

    @property
    def stage_shapes(self) -> list[tuple[int, ...]]:
        """Per-stage shapes without the batch dimension."""
        return list(self.packer.stage_shapes)

    def forward(
        self, stages: Sequence[Tensor], t: Tensor, stage: Tensor, mask: Tensor | None = None, **cond: Any
    ) -> list[Tensor]:
        packer = self._packer_for(stages)
        stages = check_stages(stages, packer.stage_shapes, self.num_stages)
        x0 = stages[0]
        check_stage_dtypes(stages, self.base)
        mask = check_times(t, stage, mask, x0.shape[0], self.num_stages, x0.device)
        # Selection, not multiplication by the mask: inf/NaN in a masked stage must not leak
        # (0 * NaN is NaN) into the packed input, which every token of the trunk sees.
        stages = [torch.where(mask[:, s].view(-1, *([1] * (x.ndim - 1))), x, 0.0) for s, x in enumerate(stages)]
        # t stays in its own (float32) precision: 1000 t in bfloat16 would be off by up to 4.
        t = torch.where(mask.to(t.device), t, 0.0)
        out = self.adapter.forward(self.base, packer.pack(stages), t, stage.long(), **cond)
        velocities = packer.unpack(out)
        return [torch.where(mask[:, s].view(-1, *([1] * (v.ndim - 1))), v, 0.0) for s, v in enumerate(velocities)]

    def permute_batch(self, args: tuple, kwargs: dict[str, Any], index: Tensor) -> tuple[tuple, dict[str, Any]] | None:
        """A call's inputs with the samples in the order ``index`` ``[B]``, or ``None`` when unknown.

        ``forward``'s own inputs are per sample (``stages``, ``t``, ``stage``, ``mask``), and so is
        every tensor of ``cond`` (batch first, the rule :class:`~dfm_ext.process.sampler.DFMSampler`
        already applies to batch guidance). ``None`` (leave the order) for a ``cond`` value whose
        per-sample layout is not known: a tensor without the batch first, or a container.
        Used by stage routing (:mod:`dfm_ext.specialization.routing`) to group samples by stage.
        """
        if len(args) > 4:
            return None
        named: dict[str, Any] = dict(zip(("stages", "t", "stage", "mask"), args)) | kwargs
        b = index.shape[0]

        def take(v: Tensor) -> Tensor:
            return v.index_select(0, index.to(v.device, non_blocking=True))

        out: dict[str, Any] = {}
        for name, v in named.items():
            if name == "stages":
                if not isinstance(v, (list, tuple)) or not all(isinstance(x, Tensor) and x.ndim >= 1 and x.shape[0] == b for x in v):
                    return None
                out[name] = [take(x) for x in v]
            elif isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == b:
                out[name] = take(v)
            elif v is None or isinstance(v, (bool, int, float, str)):
                out[name] = v
            else:
                return None
        return (), out

    @staticmethod
    def permute_output(output: list[Tensor], index: Tensor) -> list[Tensor]:
        """``forward``'s output (per-stage ``[B, ...]``) with its samples in the order ``index``."""
        return [v.index_select(0, index.to(v.device, non_blocking=True)) for v in output]

    def null_condition(self, **cond: Any) -> dict[str, Any]:
        """The unconditional counterpart of ``cond`` for classifier-free guidance."""
        return self.adapter.null_condition(self.base, **cond)

    # ----------------------------------------------------------------- save / load

    def save_pretrained(self, directory: str | Path, *, extra_files: Mapping[str, bytes] | None = None) -> Path:
        """Write the model into ``directory`` atomically (:func:`dfm_ext.wrapping.record.save_pretrained`).

        One folder: ``dfm_config.json`` (format, decomposition, adapter with its time convention,
        base model class and config, stage scales, specialisation record), ``model.safetensors``
        (shared weights) and, when specialised, ``stage_parameters.safetensors``. Reload with
        :meth:`from_pretrained` (alias :func:`dfm_ext.load_wrapped`), which re-applies the
        specialisation and the scales.
        """
        return files.save_pretrained(self, directory, extra_files=extra_files)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, base_model: nn.Module | None = None, *, adapter: str | DiTAdapter | type | None = None,
        decomposition: Decomposition | None = None, device: str | torch.device = "cpu",
    ) -> DFMTransformer:
        """Rebuild a saved model (this layout or an older one): :func:`load_wrapped`."""
        return load_wrapped(directory, base_model, adapter=adapter, decomposition=decomposition, device=device)


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
    decomposition: Decomposition,
    *,
    adapter: str | DiTAdapter | type = "auto",
    time_convention: str | Mapping[str, Any] | TimeConvention | None = None,
    sample_shape: Sequence[int] | None = None,
    patch_sizes: Sequence[int | Sequence[int]] | None = None,
    init: Init = "pretrained",
    stage_embedding: bool = True,
    any_sample_shape: bool = False,
    stage_scales: Sequence[float] | Tensor | None = None,
) -> DFMTransformer:
    """Wrap a DiT so that it generates the stages of ``decomposition`` (in place; returns the wrapper).

    Args:
        model: the base DiT; modified in place (patch embedding, timestep embedder and output
            projection are replaced) and kept as ``.base``.
        decomposition: a :class:`dfm_ext.Decomposition`.
        adapter: ``"auto"`` (first registered adapter whose ``matches`` is true), an adapter name,
            or an adapter class/instance (:class:`dfm_ext.wrapping.adapter.DiTAdapter`).
        time_convention: how the base model reads time, a time convention (a name, a
            ``{"name": ..., **params}`` mapping or a :class:`~dfm_ext.process.conventions.TimeConvention`):
            ``"discrete"`` (facebookresearch DiT, ``999 (1 - t)``), ``"unit"`` (SiT, LightningDiT:
            ``t``), ``"x1000"`` (``1000 t``), ``"timestep"`` (``1000 (1 - t)``), ``"sigma"``
            (``1 - t``), ``"shifted_timestep"`` (CogView4's resolution-dependent map, which reads
            the token grid), each with a ``scale``. Required for models with
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
        any_sample_shape: ``forward`` also accepts stages of other sample shapes (the token grid
            follows the sample; same patch sizes, same parameters). Only for models without a
            fixed position table (FLUX and other RoPE models); ``sample_shape`` is then the
            shape the patch sizes were chosen for. Saved by ``save_pretrained``.
        stage_scales: ``[S]`` per-stage standardisation scales ``c_s`` kept as the
            ``stage_scales`` buffer (default ``None``: off); ``DFMObjective`` and ``DFMSampler``
            built without ``scales=`` use them. See :meth:`DFMTransformer.set_stage_scales`.

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
    check_decomposition(decomposition)
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
                + native_grid_hint(ad, model, decomposition, shape)
            ) from None
    if any_sample_shape and (isinstance(getattr(model, "pos_embed", None), Tensor) or getattr(getattr(ad, "spec", None), "positions", "") == "fixed"):
        raise ValueError(
            f"any_sample_shape=True needs positions that follow the token grid (RoPE, or computed per grid); "
            f"{type(model).__name__} has a fixed position table, so it runs only on the grid it was built for"
        )
    packer = ScalePacker(stage_shapes, patch_sizes)
    ad.install(model, packer, init=init, stage_embedding=stage_embedding)
    wrapped = DFMTransformer(model, decomposition, packer, ad, _WrapSpec(shape, init, stage_embedding, bool(any_sample_shape)))
    wrapped.set_stage_scales(stage_scales)
    return wrapped


def _check_base(base_model: nn.Module, saved_class: str) -> None:
    """The saved base class is matched by name and module; a different module (``__main__``, a renamed
    package) is accepted when the class names agree, the structure is checked by the weights."""
    here = files.class_path(base_model)
    if here != saved_class and here.partition(":")[2] != saved_class.partition(":")[2]:
        raise ValueError(
            f"base_model is a {here}, the saved base is {saved_class}; pass an unwrapped instance of the saved "
            "architecture (its weights are checked tensor by tensor against the file)"
        )


def load_wrapped(
    directory: str | Path,
    base_model: nn.Module | None = None,
    *,
    adapter: str | DiTAdapter | type | None = None,
    decomposition: Decomposition | None = None,
    device: str | torch.device = "cpu",
) -> DFMTransformer:
    """Rebuild a ``DFMTransformer`` written by ``save_pretrained`` (this or an older layout).

    Args:
        directory: the saved folder.
        base_model: an unwrapped base model of the same architecture (its weights are replaced).
            Not needed for :class:`dfm_ext.DiT`, which is rebuilt from the recorded config. Its
            class is identified by structure: the same class name from another module (a class
            defined in ``__main__``, a moved module) is accepted when every tensor of the file
            fits it by name and shape.
        adapter: the adapter the model was wrapped with (a name, class or instance), for an
            adapter that is not registered and cannot be imported from its recorded class (one
            defined in ``__main__``); default: the registered one of the saved name, else the
            recorded class. The saved config (time convention included) rebuilds it.
        decomposition: overrides the recorded decomposition (needed when it cannot be rebuilt
            from its recorded constructor parameters).
        device: where to load the weights.

    A saved specialisation is re-applied (``model.specialization`` holds its handle) and the
    stage scales are restored (``model.stage_scales``). Weights are read with safetensors only.

    Raises:
        FileNotFoundError, ValueError: a missing or unreadable folder, record or weights file; a
            base model or adapter that does not fit (the message says what to pass).
    """
    directory = Path(directory)
    record = files.read_record(directory)
    # The weights file's header is read before any model is built: a damaged file fails here, naming it.
    found = files.weight_shapes(directory / files.WEIGHTS_FILE)
    scales = record.get("stage_scales")
    if decomposition is None:
        decomposition = files.rebuild_decomposition(record["decomposition"])
    base_class = str(record["base"]["class"])
    if base_model is None:
        if base_class != "dfm_ext.models.dit:DiT":
            raise ValueError(f"the saved base model is a {base_class}; pass base_model= (an unwrapped instance)")
        from dfm_ext.models.dit import DiT, DiTConfig  # noqa: PLC0415  (only for this case)

        try:
            base_model = DiT(DiTConfig.from_dict(record["base"]["config"]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{directory / files.CONFIG_FILE}: base.config cannot build a DiT: {e}") from None
    else:
        _check_base(base_model, base_class)
    ad = adapter_for_record(record["adapter"], base_model, adapter)
    wrapped = wrap_dit(
        base_model,
        decomposition,
        adapter=ad,
        sample_shape=record["sample_shape"],
        patch_sizes=[tuple(p) for p in record["patch_sizes"]],
        init="scratch",
        stage_embedding=record["stage_embedding"],
        any_sample_shape=bool(record.get("any_sample_shape", False)),
        stage_scales=scales,
    )
    if [list(s) for s in wrapped.packer.stage_shapes] != record["stage_shapes"]:
        raise ValueError(f"the decomposition gives stages {wrapped.packer.stage_shapes}, the saved model has {record['stage_shapes']}")
    files.load_weights(wrapped, record, directory, found, device)
    files.restore_specialization(wrapped, record, directory)
    return wrapped
