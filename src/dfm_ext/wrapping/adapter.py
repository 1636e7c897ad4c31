"""The adapter protocol that lets :func:`dfm_ext.wrap_dit` plug DFM into a DiT family.

An adapter knows one family of DiTs. ``wrap_dit`` asks it for the model's default sample shape
and token grid, lets it swap three modules inside the model (:meth:`DiTAdapter.install`), and
then calls :meth:`DiTAdapter.forward` with the stages packed onto the token grid:

1. patch embedding -> :class:`~dfm_ext.wrapping.embeddings.MultiScalePatchEmbed` over the packed channels;
2. timestep embedder -> :class:`~dfm_ext.wrapping.embeddings.MultiScaleTimestepEmbed` taking ``t [B, S]``
   (and the stage index), converting paper time to the model's own convention;
3. output projection -> :class:`~dfm_ext.wrapping.embeddings.MultiScaleHead`, packed channel order.

Why ``forward`` lives in the adapter rather than calling the model's own ``forward``: a base
forward takes a ``[B]`` timestep and unpatchifies with its own patch size, so at least two of its
lines change under DFM. Rewriting the (short) forward from the model's own submodules keeps the
trunk, positions and conditioning untouched, needs no hidden state on the replaced modules (no
context managers, thread- and ``torch.compile``-safe), and keeps each adapter readable. Adapters
receive and return the paper's convention (``t = 0`` noise, ``t = 1`` data, velocity
``x - noise``) and convert inside.

Registration: :func:`register_adapter` adds an adapter (tried before the built-in ones);
``wrap_dit(model, d, adapter="auto")`` takes the first whose :meth:`~DiTAdapter.matches` is
true. Built-in adapters live in :mod:`dfm_ext.adapters` (one module per family, each exposing a
module-level ``ADAPTER``) and are imported lazily, diffusers ones only for diffusers models.

Example (a complete adapter for a toy model; see also the guide docs/guides/wrap-dit.md):
    >>> import torch
    >>> from torch import nn
    >>> from dfm_ext.wrapping.adapter import multiscale_time_embed, widen_head, widen_patch_embed
    >>> class ToyDiT(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.patch = nn.Conv2d(3, 16, 2, stride=2)
    ...         self.temb = nn.Sequential(nn.Linear(1, 16), nn.SiLU(), nn.Linear(16, 16))
    ...         self.body = nn.Linear(16, 16)
    ...         self.out = nn.Linear(16, 2 * 2 * 3)
    >>> class ToyAdapter:
    ...     name = "toy"
    ...     def matches(self, model): return isinstance(model, ToyDiT)
    ...     def default_sample_shape(self, model): return (3, 16, 16)
    ...     def token_grid(self, model, sample_shape): return (sample_shape[1] // 2, sample_shape[2] // 2)
    ...     def install(self, model, packer, *, init, stage_embedding):
    ...         model.patch = widen_patch_embed(model.patch, packer, init=init)
    ...         model.temb = multiscale_time_embed(model.temb, 16, packer.num_stages, init=init,
    ...             stage_embedding=stage_embedding, time_transform=lambda t: t[:, None])
    ...         model.out = widen_head(model.out, packer, base_patch=2, order="pqc", init=init)
    ...     def forward(self, model, packed, t, stage, **cond):
    ...         h = model.patch(packed) + model.temb(t, stage)[:, None]
    ...         return model.out.to_grid(model.out(model.body(h)), packed.shape[2:])
    ...     def null_condition(self, model, **cond): return dict(cond)
    >>> isinstance(ToyAdapter(), DiTAdapter)
    True
    >>> from dfm_ext import IdentityDecomposition, wrap_dit
    >>> wrapped = wrap_dit(ToyDiT(), IdentityDecomposition(), adapter=ToyAdapter())
    >>> out = wrapped([torch.randn(2, 3, 16, 16)], torch.rand(2, 1), torch.zeros(2, dtype=torch.long))
    >>> out[0].shape
    torch.Size([2, 3, 16, 16])
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from dfm_ext.process.conventions import check_time_convention
from dfm_ext.wrapping.embeddings import Init

# The helpers adapters are written with live in dfm_ext.wrapping.install; importable from here too.
from dfm_ext.wrapping.install import multiscale_time_embed, stage_input_time_embed, widen_head, widen_patch_embed

__all__ = [
    "DiTAdapter",
    "LazyAdapter",
    "register_adapter",
    "unregister_adapter",
    "registered_adapters",
    "resolve_adapter",
    "adapter_for_record",
    "widen_patch_embed",
    "widen_head",
    "multiscale_time_embed",
    "stage_input_time_embed",
]


@runtime_checkable
class DiTAdapter(Protocol):
    """What :func:`dfm_ext.wrap_dit` needs to know about one DiT family.

    Every method receives the base model; adapters hold no per-model state, so one instance
    serves any number of models. Times ``t`` are the paper's (``t = 0`` noise, ``t = 1`` data) and
    ``forward`` returns velocities ``x - noise`` in that convention; conversions happen inside.

    Optional extras ``wrap_dit`` uses when present: ``config() -> dict`` (JSON-serialisable
    constructor kwargs, recorded by ``save_pretrained`` so ``load_wrapped`` rebuilds the adapter
    as ``type(adapter)(**config)``; an adapter whose config has a ``time_convention`` key accepts
    ``wrap_dit(..., time_convention=)``), and ``bind(model, time_convention) -> adapter`` (the
    adapter to use for this model, with its time convention settled; it raises ``ValueError``
    when the convention cannot be proven, see :class:`dfm_ext.adapters.DiTFamilyAdapter`).

    Optional for error messages: ``missing(model) -> list[str] | None``, what ``model`` lacks to be
    of this family (``None``: not recognisably of it). ``wrap_dit`` with an explicit adapter runs
    :meth:`matches` and reports it; ``adapter="auto"`` reports the nearest family's for a model no
    adapter recognises.

    Optional for :func:`dfm_ext.specialize`: ``layer_groups``, a mapping from group name
    (``cond``, ``mod``, ``attn``, ``mlp``, ``proj``, or the family's own) to regular expressions
    searched in module names, the layer groups of this family. ``specialize`` reads it from the
    wrapped model's ``adapter`` (without it: ``dfm_ext.specialization.DEFAULT_LAYER_GROUPS``); the
    built-in adapters declare theirs (the diffusers ones extend a shared table with
    :func:`dfm_ext.specialization.combine_layer_groups`).
    """

    name: str

    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter handles ``model`` (used by ``adapter="auto"``)."""
        ...

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        """Per-sample full-resolution shape ``(C, H, W)`` or ``(C, T, H, W)`` the model was built for."""
        ...

    def token_grid(self, model: nn.Module, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The token grid ``(Gh, Gw)`` (or ``(Gt, Gh, Gw)``) every stage is patchified onto."""
        ...

    def install(self, model: nn.Module, packer: Any, *, init: Init, stage_embedding: bool) -> None:
        """Swap in the widened patch embedding, multi-scale timestep embedder and widened head, in place.

        ``packer`` is the :class:`~dfm_ext.wrapping.packing.ScalePacker` of the stages; raise ``ValueError``
        if its grid or patch sizes cannot work with the model.
        """
        ...

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Packed stages ``[B, C', *grid]``, ``t [B, S]``, ``stage [B]`` -> packed velocity ``[B, C', *grid]``."""
        ...

    def null_condition(self, model: nn.Module, **cond: Any) -> dict[str, Any]:
        """The unconditional counterpart of ``cond`` (for classifier-free guidance)."""
        ...


class LazyAdapter:
    """An adapter imported from ``module`` (attribute ``attr``) the first time it is needed.

    ``module_prefix`` lets :meth:`matches` answer ``False`` without importing anything when no
    class in the model's MRO comes from a module with that prefix (e.g. ``"diffusers"``), so
    ``import dfm_ext`` and wrapping a plain PyTorch DiT never import diffusers. A module that does
    not exist (yet) simply matches nothing.
    """

    def __init__(self, name: str, module: str, attr: str = "ADAPTER", module_prefix: str | None = None):
        self.name = name
        self._module = module
        self._attr = attr
        self._prefix = module_prefix
        self._loaded: DiTAdapter | None = None
        self._missing = False

    def load(self) -> DiTAdapter | None:
        """The real adapter, or ``None`` if its module is not there."""
        if self._loaded is None and not self._missing:
            try:
                mod = importlib.import_module(self._module)
            except ModuleNotFoundError as err:
                if err.name is not None and self._module.startswith(err.name):
                    self._missing = True
                    return None
                raise
            self._loaded = getattr(mod, self._attr)
        return self._loaded

    def matches_prefix(self, model: nn.Module) -> bool:
        """Whether ``model`` may be of this adapter's package (no prefix: any model); imports nothing."""
        return self._prefix is None or any(c.__module__.split(".")[0] == self._prefix for c in type(model).__mro__)

    def matches(self, model: nn.Module) -> bool:
        if not self.matches_prefix(model):
            return False
        adapter = self.load()
        return adapter is not None and bool(adapter.matches(model))

    def __getattr__(self, item: str) -> Any:
        if item.startswith("_"):
            raise AttributeError(item)
        adapter = self.load()
        if adapter is None:
            raise AttributeError(f"adapter {self.name!r}: module {self._module} is not available")
        return getattr(adapter, item)

    def __repr__(self) -> str:
        return f"LazyAdapter({self.name!r}, {self._module!r})"


_REGISTERED: list[DiTAdapter] = []
_PROTOCOL = ("name", "matches", "default_sample_shape", "token_grid", "install", "forward", "null_condition")


def _check_adapter(adapter: Any) -> DiTAdapter:
    if isinstance(adapter, type):
        adapter = adapter()
    if isinstance(adapter, LazyAdapter):
        return adapter
    missing = [m for m in _PROTOCOL if not hasattr(adapter, m)]
    if missing:
        raise TypeError(f"{type(adapter).__name__} is not a DiTAdapter: it lacks {', '.join(sorted(missing))}")
    if not isinstance(adapter.name, str) or not adapter.name:
        raise TypeError(f"adapter name must be a non-empty string, got {adapter.name!r}")
    return adapter


def register_adapter(adapter: Any) -> Any:
    """Register an adapter class or instance; it is tried before earlier registrations and built-ins.

    Registering a second adapter with the same ``name`` replaces the first. Returns its argument,
    so it works as a class decorator.

    Raises:
        TypeError: ``adapter`` lacks a method of :class:`DiTAdapter`.
    """
    inst = _check_adapter(adapter)
    _REGISTERED[:] = [a for a in _REGISTERED if a.name != inst.name]
    _REGISTERED.insert(0, inst)
    return adapter


def unregister_adapter(name: str) -> None:
    """Remove a registered adapter by name (built-ins cannot be removed)."""
    _REGISTERED[:] = [a for a in _REGISTERED if a.name != name]


def registered_adapters() -> list[DiTAdapter]:
    """Adapters in the order ``adapter="auto"`` tries them: user-registered, then built-in."""
    from dfm_ext.adapters import builtin_adapters  # noqa: PLC0415  (lazy: keeps `import dfm_ext` light)

    return [*_REGISTERED, *builtin_adapters()]


_GUIDE = "docs/guides/adapters.md"


def _config_key(value: Any) -> str:
    """A time convention's JSON form as one comparable string (dicts are not hashable)."""
    return json.dumps(value, sort_keys=True)


def resolve_adapter(
    adapter: str | DiTAdapter | type, model: nn.Module, *, time_convention: Any = None
) -> DiTAdapter:
    """An adapter instance for ``model``: ``"auto"``, a registered name, or an adapter (class or instance).

    An explicitly named or given adapter must :meth:`~DiTAdapter.matches` the model (the error says
    what the model lacks, from the adapter's optional ``missing``). ``time_convention`` (a time
    convention: a name, a ``{"name": ..., **params}`` mapping or a
    :class:`~dfm_ext.process.conventions.TimeConvention`) overrides the adapter's: the adapter is
    rebuilt from its ``config()`` with it. An adapter with a ``bind(model, time_convention)``
    method settles the convention itself (the DiT family: from ``time_convention``, else from the
    model's ``dfm_time_convention`` declaration, else a ``ValueError`` listing the choices).

    Raises:
        TypeError: no adapter recognises ``model`` (the message points to ``AdapterSpec`` and the
            adapters guide, and names what a near miss lacks), the given adapter does not match it,
            or ``time_convention`` is given for an adapter that takes none.
        ValueError: no adapter has the given name; ``time_convention`` is unknown, contradicts the
            adapter instance passed or the model's declaration, or cannot be proven.
    """
    time_convention = check_time_convention(time_convention, allow_none=True)
    explicit = not isinstance(adapter, (str, type))
    inst = _find_adapter(adapter, model)
    if not (isinstance(adapter, str) and adapter == "auto"):
        _check_matches(inst, model)
    bind = getattr(inst, "bind", None)
    if callable(bind):
        return bind(model, time_convention)
    if time_convention is None:
        return inst
    config_fn = getattr(inst, "config", None)  # optional extra of the protocol
    config = config_fn() if callable(config_fn) else None
    if not isinstance(config, dict) or "time_convention" not in config:
        raise TypeError(f"adapter {inst.name!r} takes no time_convention; pass its own options instead")
    if explicit and _config_key(check_time_convention(config["time_convention"])) != _config_key(time_convention):
        raise ValueError(
            f"adapter {inst.name!r} was built with time_convention={config['time_convention']!r} but "
            f"wrap_dit got time_convention={time_convention!r}; give it once"
        )
    return type(inst)(**{**config, "time_convention": time_convention})


def _missing(adapter: Any, model: nn.Module) -> list[str] | None:
    fn = getattr(adapter, "missing", None)
    if not callable(fn):
        return None
    try:
        found = fn(model)
    except Exception:  # a diagnostic must not mask the real error
        return None
    return list(found) if found is not None else None


def _check_matches(adapter: DiTAdapter, model: nn.Module) -> None:
    """Refuse an explicitly chosen adapter that does not recognise ``model``, saying what is missing."""
    if adapter.matches(model):
        return
    cls = type(model)
    missing = _missing(adapter, model)
    why = f"it lacks {'; '.join(missing)}" if missing else "its matches(model) is False"
    raise TypeError(
        f"adapter {adapter.name!r} does not fit {cls.__module__}.{cls.__qualname__}: {why}. "
        f"Pass the adapter of the model's family, adapter='auto', or write one for this model "
        f"(dfm_ext.adapters.AdapterSpec; see {_GUIDE})"
    )


def _unknown_model(model: nn.Module, candidates: list[Any]) -> TypeError:
    cls = type(model)
    near = []
    for a in candidates:
        if isinstance(a, LazyAdapter):
            if not a.matches_prefix(model):
                continue  # e.g. the diffusers families, for a model that is not from diffusers
            a = a.load()
        missing = _missing(a, model) if a is not None else None
        if missing:
            near.append(f"adapter {a.name!r} would fit but the model lacks {'; '.join(missing)}")
    hint = (" Near misses: " + " | ".join(near) + ".") if near else ""
    return TypeError(
        f"no DiT adapter recognises {cls.__module__}.{cls.__qualname__}.{hint} Describe your model with "
        "dfm_ext.adapters.AdapterSpec (the dotted paths of its patch embedding, timestep embedder and output "
        "head, its time convention and sign) and a short forward, or write an adapter class with name, "
        "matches(model), default_sample_shape(model), token_grid(model, sample_shape), "
        "install(model, packer, *, init, stage_embedding), forward(model, packed, t, stage, **cond) and "
        f"null_condition(model, **cond) (dfm_ext.wrapping.adapter.DiTAdapter); {_GUIDE} walks through both "
        "and lists every call dfm_ext makes into your model. Then pass wrap_dit(model, decomposition, "
        "adapter=MyAdapter()) or register it with dfm_ext.register_adapter(MyAdapter)."
    )


def _find_adapter(adapter: str | DiTAdapter | type, model: nn.Module) -> DiTAdapter:
    if not isinstance(adapter, str):
        inst = _check_adapter(adapter)
        found = inst.load() if isinstance(inst, LazyAdapter) else inst
        if found is None:
            raise ValueError(f"adapter {inst.name!r}: its module is not available")
        return found
    candidates = registered_adapters()
    if adapter == "auto":
        for a in candidates:
            try:
                fits = a.matches(model)  # before load(): a LazyAdapter imports its module only when it may match
            except ImportError as e:  # a registered adapter for a package not installed must not break every model
                warnings.warn(f"adapter {a.name!r} was skipped: its matches() raised {type(e).__name__}: {e} (install what it "
                              f"needs, or dfm_ext.wrapping.adapter.unregister_adapter({a.name!r}))", stacklevel=4)  # fmt: skip
                continue
            if fits:
                found = a.load() if isinstance(a, LazyAdapter) else a
                if found is not None:
                    return found
        raise _unknown_model(model, candidates)
    found = _registered(adapter)
    if found is None:
        names = [a.name for a in candidates]
        raise ValueError(f"no adapter named {adapter!r}; registered adapters: {names}")
    return found


def _registered(name: str) -> DiTAdapter | None:
    for a in registered_adapters():
        if a.name == name:
            return a.load() if isinstance(a, LazyAdapter) else a
    return None


def _import_class(path: str) -> type | None:
    """The class at ``"module:Qualname"``, or ``None`` when it cannot be imported (``__main__``, renamed)."""
    module, _, qualname = str(path).partition(":")
    if not module or not qualname or module == "__main__":
        return None
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) else None


def adapter_for_record(
    record: Mapping[str, Any], model: nn.Module, adapter: str | DiTAdapter | type | None = None
) -> DiTAdapter:
    """The adapter a saved model was wrapped with (``record``: ``{"name", "config", "class"}``), for ``model``.

    ``adapter`` (a name, class or instance) is used when given; it must carry the saved name.
    Otherwise the saved name is looked up among the registered adapters, then the saved class is
    imported (not possible for a class defined in ``__main__``). The saved ``config`` (its time
    convention included) rebuilds the adapter, which must match ``model``.

    Raises:
        ValueError: the adapter cannot be found (the message says how to pass it), its name differs
            from the saved one, or the saved config does not rebuild it.
        TypeError: it does not match ``model`` (what is missing).
    """
    name, config, path = record.get("name"), record.get("config") or {}, record.get("class")
    if adapter is not None:
        inst = _find_adapter(adapter, model)
        if inst.name != name:
            raise ValueError(f"the model was saved with adapter {name!r}, but load_wrapped got adapter {inst.name!r}")
    else:
        found = _registered(str(name))
        if found is None and path:
            cls = _import_class(path)
            found = _check_adapter(cls) if cls is not None else None
        if found is None:
            where = f" (class {path})" if path else ""
            raise ValueError(
                f"the model was saved with adapter {name!r}{where}, which is not registered here and cannot be "
                f"imported; pass it: load_wrapped(path, adapter=MyAdapter) (the class, an instance or its "
                "registered name), or dfm_ext.register_adapter(MyAdapter) before loading"
            )
        inst = found
    if config:
        try:
            inst = type(inst)(**config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"adapter {name!r}: the saved config {config} does not rebuild {type(inst).__name__}: {e}") from None
    _check_matches(inst, model)
    bind = getattr(inst, "bind", None)
    return bind(model, config.get("time_convention")) if callable(bind) else inst
