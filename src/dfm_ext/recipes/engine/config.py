"""Typed run configs: nested dataclasses, YAML files (``base: other`` inherits) and ``key.sub=value`` overrides.

Every key and value is checked against the field types before any compute: an unknown key or a
value of the wrong type raises :class:`ConfigError` naming it.

Example:
    >>> @dataclass
    ... class Run:
    ...     optim: OptimConfig = field(default_factory=OptimConfig)
    ...     steps: int = 10
    >>> cfg = apply_overrides(Run(), ["optim.lr=3e-4", "steps=20", "optim.betas=[0.9, 0.95]"])
    >>> cfg.optim.lr, cfg.steps, cfg.optim.betas
    (0.0003, 20, (0.9, 0.95))
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "RESUMABLE_CHANGES", "ConfigError", "OptimConfig", "TrainConfig", "apply_overrides", "check_fields",
    "check_resume_config", "config_diff", "config_dir", "config_to_dict", "flatten_config", "from_dict", "load_config",
    "resolve_config_path", "save_config", "yaml_value",
]  # fmt: skip

T = TypeVar("T")


def config_dir(cls: type) -> Path:
    """The ``configs/`` folder beside the module that defines the config class ``cls`` (its recipe's)."""
    return Path(sys.modules[cls.__module__].__file__ or ".").resolve().parent / "configs"


class ConfigError(ValueError):
    """An unknown config key, a value of the wrong type, or a missing config file."""


def _hints(cls: type) -> dict[str, Any]:
    # Sections declared in a local scope (tests, notebooks) resolve through their default factories.
    factories: list[Any] = [f.default_factory for f in dataclasses.fields(cls)]
    return typing.get_type_hints(cls, localns={t.__name__: t for t in factories if isinstance(t, type)})


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the type ``tp`` and convert lists to tuples where declared."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not match {_describe(tp)}")
    if origin is Literal:
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
            # YAML 1.1 reads an unquoted no/off (yes/on) as false (true): take the word the field knows.
            words = ("no", "off", "false") if not value else ("yes", "on", "true")
            value = next((a for a in args if a in words), value)
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (tuple, Sequence, list) or tp in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list for {_describe(tp)}, got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values for {_describe(tp)}, got {list(value)!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp)
    if expected is not None:
        if tp is float and isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float) if tp is float else tp) and (tp is bool or not isinstance(value, bool)):
            return float(value) if tp is float else value
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_describe(tp)}")


def _unknown(key: str, prefix: str, valid: Sequence[str]) -> ConfigError:
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
    where = f"under '{prefix}'" if prefix else "at the top level"
    return ConfigError(f"unknown config key '{full}'{hint}; valid keys {where}: {', '.join(sorted(valid))}")


def from_dict(cls: type[T], data: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a nested mapping, checking every key and value."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(str(key), prefix, list(fields))
        factory = fields[key].default_factory
        if isinstance(value, Mapping) and callable(factory) and not isinstance(factory, type):
            # A section whose recipe sets other defaults (``functools.partial(DFMConfig, standardize=True)``):
            # the keys the file leaves out take the recipe's defaults, not the section class's.
            value = _merge(config_to_dict(factory()), value)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}" if prefix else key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) of a config dataclass: what ``config.yaml`` holds."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """A copy of ``cfg`` with ``key.sub=value`` overrides applied and type-checked."""
    data = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, text = item.split("=", 1)
        parts = key.strip().removeprefix("--").split(".")
        node: Any = data
        cls: Any = type(cfg)
        for depth, part in enumerate(parts):
            prefix = ".".join(parts[:depth])
            names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else None
            if names is not None and part not in names:
                raise _unknown(part, prefix, names)
            if depth == len(parts) - 1:
                try:  # YAML scalars give typed values for free: 1e-4, true, [1, 2], null; plain words stay strings
                    value = yaml.safe_load(text) if text.strip() else ""
                except yaml.YAMLError:
                    value = text
                args = typing.get_args(hint := _hints(cls)[part] if names is not None else None)
                text_field = hint is str or (typing.get_origin(hint) in (Union, types.UnionType) and str in args and len(args) <= 2)
                if text_field and not isinstance(value, str):
                    # A string field keeps the text as typed ('tag=001' stays '001'); null still clears it.
                    value = None if value is None and text.strip() in ("null", "~") else text
                node[part] = value
                break
            if names is None:
                node = node.setdefault(part, {})
                continue
            sub = _hints(cls)[part]
            if not dataclasses.is_dataclass(sub) and typing.get_origin(sub) not in (dict, Mapping):
                raise ConfigError(f"config key '{'.'.join(parts[: depth + 1])}' is a value, not a section")
            node = node[part]
            cls = sub if dataclasses.is_dataclass(sub) else None
    return from_dict(type(cfg), data)


def resolve_config_path(name: str | Path, folder: Path) -> Path:
    """A config name (``imagenet_512``) in the recipe's ``folder`` (its ``configs/``) or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    if (candidate := folder / f"{name}.yaml").is_file():
        return candidate
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    raise ConfigError(f"config {str(name)!r} not found: not a YAML file and not one of {known}")


def _read_yaml(path: Path, folder: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise ConfigError(f"config inheritance loop through {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        # One line: where it broke (PyYAML's marks are 0-based) and what the parser expected.
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where}: YAML syntax error: {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = resolve_config_path(base, folder)
    if not Path(str(base)).is_absolute() and (path.parent / str(base)).is_file():
        parent = path.parent / str(base)
    return _merge(_read_yaml(parent, folder, (*seen, path)), data)


def _merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], name: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls`` <- YAML file ``name`` (with ``base:`` inheritance) <- ``overrides``."""
    folder = config_dir(cls)
    data = _read_yaml(resolve_config_path(name, folder), folder) if name is not None else {}
    return apply_overrides(from_dict(cls, data), overrides)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def check_fields(obj: Any, prefix: str, rules: Sequence[tuple[str, bool, str]]) -> None:
    """``ValueError("<prefix><name> must be <want>, got <value>")`` for the first ``(name, ok, want)`` not ``ok``."""
    for name, ok, want in rules:
        if not ok:
            raise ValueError(f"{prefix}{name} must be {want}, got {getattr(obj, name)}")


def yaml_value(value: Any) -> str:
    """``value`` as a config file spells it, for messages: ``null``, ``[2, 1]``, ``0.1``.

    Example:
        >>> yaml_value(None), yaml_value((2, 1)), yaml_value(True)
        ('null', '[2, 1]', 'true')
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return str(list(value))
    return str(value)


@dataclass
class OptimConfig:
    """AdamW with linear warmup (paper A.2 defaults)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 10_000
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        check_fields(self, "optim.", [("lr", 0 < self.lr < math.inf, "> 0")])
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas {list(self.betas)} must both be in [0, 1)")
        check_fields(self, "optim.", [
            ("eps", 0 < self.eps < math.inf, "> 0"), ("weight_decay", 0 <= self.weight_decay < math.inf, ">= 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "> 0 or null"),
        ])  # fmt: skip


@dataclass
class TrainConfig:
    """Run length, batch, precision, cadence of checkpoints/logs/samples, output folder (the recipes guide describes
    ``sharding``, ``fsdp_*``, ``compile``, ``resume`` and ``timeout_minutes``).

    ``global_batch_size``: samples per optimiser step over all processes. ``output_dir`` may use ``{name}``.
    ``ema_warmup``: decay ``min(ema_decay, (1 + n) / (10 + n))`` after n updates. ``max_train_seconds``: stop after
    the step during which the training steps' own time reaches it (processes agree at the next log/checkpoint step).
    """

    steps: int = 1000
    global_batch_size: int = 256
    grad_accumulation: int = 1
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 0
    ema_decay: float | None = 0.9999
    output_dir: str = "runs/{name}"
    resume: str = "auto"
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    log_every: int = 50
    sample_every: int = 10_000
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    num_workers: int = 8
    cpu: bool = False
    progress: bool = True
    sharding: Literal["auto", "none", "fsdp2", "hsdp"] = "auto"
    hsdp_shard_size: int | None = None
    fsdp_reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    fsdp_accumulation: Literal["reduce_scatter", "unsharded"] = "reduce_scatter"
    timeout_minutes: float = 30.0
    compile: bool = False
    compile_backend: str = "inductor"
    ema_warmup: bool = False
    max_train_seconds: float | None = None

    def __post_init__(self) -> None:
        positive = ("steps", "global_batch_size", "grad_accumulation", "checkpoint_every", "keep_checkpoints", "log_every")
        check_fields(self, "train.", [
            *((name, getattr(self, name) >= 1, ">= 1") for name in positive),
            *((name, getattr(self, name) >= 0, ">= 0") for name in ("sample_every", "num_workers", "seed")),
        ])  # fmt: skip
        if self.mixed_precision == "fp16" and self.cpu:
            raise ValueError("train.mixed_precision=fp16 with train.cpu=true: fp16 autocast needs a CUDA device; use bf16 or no")
        check_fields(self, "train.", [
            ("timeout_minutes", 0 < self.timeout_minutes < math.inf, "> 0"),
            ("hsdp_shard_size", self.hsdp_shard_size is None or self.hsdp_shard_size >= 1, ">= 1 or null"),
            ("ema_decay", self.ema_decay is None or 0.0 <= self.ema_decay < 1.0, "in [0, 1) or null"),
            ("max_train_seconds", self.max_train_seconds is None or self.max_train_seconds > 0, "> 0 or null"),
        ])  # fmt: skip
        if self.compile:
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            if self.compile_backend not in backends:
                raise ValueError(f"train.compile_backend={self.compile_backend!r} is not a torch.compile backend; choose one of {backends}")


#: Key prefixes that may change between a run and its resumption (cadence, length, I/O; compiling changes speed, not
#: maths; the sharding layout: a checkpoint of another layout is refused by the parallelism with its own reason).
RESUMABLE_CHANGES = (
    "train.output_dir", "train.steps", "train.resume", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
    "train.sample_every", "train.trackers", "train.num_workers", "train.progress", "train.compile", "train.max_train_seconds",
    "train.timeout_minutes", "train.sharding", "train.hsdp_shard_size",
    "eval.", "sampling.",
)  # fmt: skip


def flatten_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; values other than numbers, strings and bools become strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> list[str]:
    """The flattened keys in which ``new`` differs from ``old``, except :data:`RESUMABLE_CHANGES`; a key missing from
    ``old`` (added to the config class after the run started) counts as its ``defaults`` value."""
    a, b = {**flatten_config(defaults or {}), **flatten_config(old)}, flatten_config(new)
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)]


def check_resume_config(stored: tuple[Mapping[str, Any], Path] | None, full_config: Any) -> None:
    """Refuse to resume when the ``stored`` config (and where it was read) differs from ``full_config`` outside
    :data:`RESUMABLE_CHANGES`; ``None``: nothing to compare (a new run)."""
    if stored is None:
        return
    old, source = stored
    new = config_to_dict(full_config)
    defaults: dict[str, Any] = {}
    if set(flatten_config(new)) - set(flatten_config(old)):  # keys added since the run started: their defaults
        try:
            defaults = config_to_dict(type(full_config)())
        except TypeError:  # a config class without defaults for every field
            pass
    if diff := config_diff(old, new, defaults):
        raise ConfigError(f"cannot resume from {source}: its config differs in {diff}; use another train.output_dir to start a new run")
