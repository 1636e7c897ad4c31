"""The saved folder of a :class:`~dfm_ext.wrapping.wrapper.DFMTransformer`: its record and weight files.

Writing (:func:`save_pretrained`) and reading the pieces back (:func:`read_record`,
:func:`weight_shapes`, :func:`load_weights`, :func:`restore_specialization`);
:func:`dfm_ext.wrapping.wrapper.load_wrapped` rebuilds a model from them. This module never
imports the wrapper (the model is only an argument), so the two have no import loop.

The format (``dfm_ext.wrapped/2``), written atomically (:func:`dfm_ext.fileio.atomic_directory`:
a crash never leaves a half-written folder)::

    <dir>/dfm_config.json               format, decomposition (factory config), adapter (name +
                                        config incl. time_convention), base model (class + config),
                                        sample/stage shapes, patch sizes, stage scales, whether
                                        any sample shape is accepted, specialisation record
    <dir>/model.safetensors             every shared weight (and the stage_scales buffer)
    <dir>/stage_parameters.safetensors  only for a specialised model (named in the config)
    <dir>/<extra files>                 named in the config (``extra_files=``, e.g. a recipe's
                                        label-token weights)

It is the one format (no release wrote another). Weights are read with safetensors only (no pickle).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfm_ext.fileio import atomic_directory, atomic_write_bytes

__all__ = [
    "FORMAT", "CONFIG_FILE", "WEIGHTS_FILE", "STAGE_FILE", "class_path", "describe_mismatch",
    "load_weights", "model_record", "peft_merged", "read_json_file", "read_record",
    "rebuild_decomposition", "restore_specialization", "save_pretrained", "weight_shapes",
]  # fmt: skip

FORMAT = "dfm_ext.wrapped/2"
CONFIG_FILE = "dfm_config.json"
WEIGHTS_FILE = "model.safetensors"
STAGE_FILE = "stage_parameters.safetensors"


def class_path(obj: Any) -> str:
    return f"{type(obj).__module__}:{type(obj).__qualname__}"




def _describe(decomposition: Any) -> dict[str, Any]:
    """The decomposition record: class, repr and the factory config (``None`` for a custom one)."""
    from dfm_ext.decompositions.factory import decomposition_config  # noqa: PLC0415

    try:
        config = decomposition_config(decomposition)
    except TypeError:
        config = None
    return {"class": class_path(decomposition), "repr": repr(decomposition), "config": config}


def rebuild_decomposition(record: dict[str, Any]) -> Any:
    """Rebuild a recorded decomposition through the factory (new records and ones with ``params``)."""
    from dfm_ext.decompositions.factory import config_from_record, decomposition_from_config  # noqa: PLC0415

    config = config_from_record(record)
    if config is None:
        raise ValueError(
            f"cannot rebuild the decomposition {record['repr']} from the saved config; pass decomposition= to load_wrapped"
        )
    decomposition = decomposition_from_config(config)
    if repr(decomposition) != record["repr"]:
        raise ValueError(
            f"rebuilt decomposition {decomposition!r} differs from the saved {record['repr']}; pass decomposition= to load_wrapped"
        )
    return decomposition


#: A :class:`~dfm_ext.wrapping.wrapper.DFMTransformer` (this module never imports the wrapper, so the type stays open).
WrappedModel = Any


def model_record(model: WrappedModel) -> dict[str, Any]:
    """The ``dfm_config.json`` record of a wrapped model (without specialisation and extra files)."""
    base_cfg: Any = getattr(model.base, "config", None)
    if hasattr(base_cfg, "to_dict"):
        base_cfg = base_cfg.to_dict()
    try:
        json.dumps(base_cfg)
    except (TypeError, ValueError):
        base_cfg = None
    adapter = model.adapter
    config_fn = getattr(adapter, "config", None)  # optional extra of the adapter protocol
    adapter_cfg = config_fn() if callable(config_fn) else None
    scales = model.stage_scales
    return {
        "format": FORMAT,
        # The class too: load_wrapped imports it when no adapter of that name is registered.
        "adapter": {"name": adapter.name, "config": adapter_cfg, "class": class_path(adapter)},
        "sample_shape": list(model.sample_shape),
        "any_sample_shape": bool(model.any_sample_shape),
        "stage_shapes": [list(s) for s in model.packer.stage_shapes],
        "patch_sizes": [list(p) for p in model.packer.patch_sizes],
        "stage_embedding": model.stage_embedding,
        "stage_scales": None if scales is None else [float(v) for v in scales.detach().cpu().tolist()],
        "decomposition": _describe(model.decomposition),
        "base": {"class": class_path(model.base), "config": base_cfg},
        "specialization": None,
        "extra_files": [],
    }


@contextlib.contextmanager
def peft_merged(root: nn.Module) -> Iterator[None]:
    """Within the block, peft LoRA layers are merged into and replaced by their base layers (restored after).

    ``save_pretrained`` saves under it, so a model with peft LoRA injected (``inject_adapter_in_model``)
    is written with plain weight names a fresh wrapper loads strictly. A no-op without peft.
    """
    try:
        from peft.tuners.lora import LoraLayer  # noqa: PLC0415
    except ImportError:  # peft is optional: without it no model holds its layers
        yield
        return
    swaps = []
    modules = dict(root.named_modules())
    for name, m in modules.items():
        if isinstance(m, LoraLayer):
            parent_name, _, attr = name.rpartition(".")
            parent = modules[parent_name] if parent_name else root
            m.merge()
            setattr(parent, attr, m.get_base_layer())
            swaps.append((parent, attr, m))
    try:
        yield
    finally:
        for parent, attr, m in reversed(swaps):
            setattr(parent, attr, m)
            m.unmerge()


def _check_replaceable(directory: Path) -> None:
    """Refuse to replace a folder holding files ``save_pretrained`` did not write (it is replaced whole)."""
    if not directory.is_dir():
        return
    ours = {CONFIG_FILE, WEIGHTS_FILE, STAGE_FILE}
    record_path = directory / CONFIG_FILE
    if record_path.is_file():
        try:
            ours.update(json.loads(record_path.read_text()).get("extra_files") or [])
        except (ValueError, AttributeError, TypeError):
            pass
    foreign = sorted(p.name for p in directory.iterdir() if p.name not in ours)
    if foreign:
        raise ValueError(
            f"{directory} holds files save_pretrained did not write ({foreign[:5]}); the folder is replaced as a "
            "whole, so save into a new or empty folder"
        )


def save_pretrained(model: WrappedModel, directory: str | Path, *, extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write ``model`` (a ``nn.Module``) into ``directory`` atomically; returns the folder.

    Args:
        model: the wrapped model (specialised or not; its ``stage_scales`` are kept; peft LoRA
            layers are merged into the saved weights, :func:`peft_merged`).
        directory: the folder; an existing one written by ``save_pretrained`` is replaced whole.
        extra_files: file name -> bytes written into the same folder (and listed in the config),
            for what a recipe keeps beside the model.

    Raises:
        ValueError: ``directory`` exists and holds other files, or an extra file name clashes.
    """
    from safetensors.torch import save_model  # noqa: PLC0415

    from dfm_ext.specialization import (  # noqa: PLC0415
        is_specialized,
        save_stage_parameters,
        specialization_record,
        stage_parameters_detached,
    )

    directory = Path(directory)
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if name in (CONFIG_FILE, WEIGHTS_FILE, STAGE_FILE) or Path(name).name != name or name.startswith("."):
            raise ValueError(f"extra file name {name!r} must be a plain file name other than the model's own files")
    _check_replaceable(directory)
    record = model_record(model)
    record["extra_files"] = sorted(extra_files)
    with atomic_directory(directory) as tmp, peft_merged(model):
        if is_specialized(model):
            # Stage parameters apart, so that the shared weights load strictly into a fresh wrapper.
            with stage_parameters_detached(model):
                save_model(model, str(tmp / WEIGHTS_FILE))
            save_stage_parameters(model, tmp / STAGE_FILE)
            record["specialization"] = {**specialization_record(model), "weights": STAGE_FILE}
        else:
            save_model(model, str(tmp / WEIGHTS_FILE))
        for name, data in extra_files.items():
            atomic_write_bytes(tmp / name, data)
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2))
    return directory


def _int_fields(config: Any, prefix: str = "") -> list[tuple[str, int]]:
    """``(dotted key, value)`` of every integer in a nested JSON config (lists of ints included)."""
    out: list[tuple[str, int]] = []
    if isinstance(config, Mapping):
        for k, v in config.items():
            out += _int_fields(v, f"{prefix}{k}.")
    elif isinstance(config, (list, tuple)):
        for i, v in enumerate(config):
            out += _int_fields(v, f"{prefix[:-1]}[{i}].")
    elif isinstance(config, int) and not isinstance(config, bool):
        out.append((prefix[:-1], config))
    return out


def describe_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any], config: Mapping[str, Any], *, limit: int = 3) -> str:
    """Which tensors of a weights file disagree with the model a config builds, and which config
    fields the disagreeing sizes come from.

    Args:
        expected: name -> shape of the model built from ``config`` (``state_dict`` shapes).
        found: name -> shape in the file.
        config: the config the model was built from (searched for the sizes that differ).

    Returns:
        One line, e.g. ``tensor 'x.weight' is [64, 3] in the file but [32, 3] from the config
        (dit.hidden_size=32; the file fits 64)``, plus the missing/unexpected names, if any.
    """
    fields = _int_fields(config)
    parts: list[str] = []
    shaped = [n for n in expected if n in found and tuple(expected[n]) != tuple(found[n])]
    for name in shaped[:limit]:
        e, f = list(expected[name]), list(found[name])
        culprits: list[str] = []
        if len(e) == len(f):
            for a, b in zip(e, f):
                if a != b:
                    culprits += [f"{k}={v}" for k, v in fields if v == a and f"{k}={v}" not in culprits]
                    culprits.append(f"the file fits {b}")
        why = f" ({'; '.join(culprits)})" if culprits else ""
        parts.append(f"tensor {name!r} is {f} in the file but {e} from the config{why}")
    if len(shaped) > limit:
        parts.append(f"{len(shaped) - limit} more tensors differ in shape")
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing from the file, e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s) in the file, e.g. {unexpected[:3]}")
    return "; ".join(parts) or "the tensors match"


def read_json_file(path: Path, error: type[Exception] = ValueError) -> Any:
    """The JSON value in the file ``path``; ``error`` (``ValueError`` by default) naming the file and
    the parse error when it is not valid UTF-8 JSON. One definition for every record the tree reads."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None


def read_record(directory: Path) -> dict[str, Any]:
    """``dfm_config.json`` of a saved folder, checked: the files exist, the format is known, the keys are there.

    Raises:
        FileNotFoundError: the folder or one of its two files is missing.
        ValueError: not a wrapped model's record (a demo checkpoint or a diffusers folder is named as such).
    """
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"wrapped model folder {str(directory)!r} does not exist or is not a folder")
    if not config_path.is_file() and (directory / "config.json").is_file():
        raise ValueError(
            f"{directory} holds a config.json, not {CONFIG_FILE}: a diffusers (or other) model folder, not a wrapped "
            "model; save_pretrained of a wrap_dit model writes dfm_config.json"
        )
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing (save_pretrained writes {CONFIG_FILE} and {WEIGHTS_FILE})")
    record = read_json_file(config_path)
    fmt = record.get("format") if isinstance(record, dict) else type(record).__name__
    if fmt != FORMAT:
        raise ValueError(f"{config_path}: {directory} is not a dfm_ext wrapped model (format {fmt!r}, expected {FORMAT!r})")
    needed = ("decomposition", "base", "adapter", "sample_shape", "patch_sizes", "stage_embedding", "stage_shapes")
    absent = [k for k in needed if k not in record] + [f"base.{k}" for k in ("class", "config") if k not in record.get("base", {})]
    if absent:
        raise ValueError(f"{config_path} is missing the key(s) {absent}")
    return record


def weight_shapes(weights_path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, read from its header only.

    Raises:
        ValueError: the file is not a readable safetensors file (naming it).
    """
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(weights_path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from None


def load_weights(model: WrappedModel, record: Mapping[str, Any], directory: Path, found: Mapping[str, tuple[int, ...]], device: Any) -> None:
    """Load ``model.safetensors`` into the rebuilt ``model`` strictly, with errors that say which config field differs.

    ``found`` is :func:`weight_shapes` of the file.

    Raises:
        ValueError: a tensor's shape, a missing or an unexpected name (:func:`describe_mismatch`),
            or a file whose data does not parse.
    """
    from safetensors.torch import load_model  # noqa: PLC0415

    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # Names absent from the file may be tied weights save_model stored once; load_model knows.
    if any(k in found and found[k] != shape for k, shape in expected.items()):
        detail = describe_mismatch(expected, {k: v for k, v in found.items() if k in expected}, record)
        raise ValueError(f"{weights_path} does not fit the model {config_path} describes: {detail}")
    model.to(device)
    try:
        load_model(model, str(weights_path), strict=True, device=str(device))
    except RuntimeError as e:  # names missing from / unexpected in the file
        detail = describe_mismatch(expected, found, record)
        raise ValueError(f"{weights_path} does not fit the model {config_path} describes: {detail}") from e
    except Exception as e:  # a header that parses but data that does not (truncated file)
        raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from None


def restore_specialization(wrapped: WrappedModel, record: dict[str, Any], directory: Path) -> None:
    """Re-apply a saved specialisation to the rebuilt ``wrapped`` (``wrapped.specialization`` = its handle)."""
    from dfm_ext.specialization import restore_specialization  # noqa: PLC0415

    spec_record = record.get("specialization")
    if spec_record is not None:
        config_path = directory / CONFIG_FILE
        if not isinstance(spec_record, dict) or not isinstance(spec_record.get("weights"), str):
            raise ValueError(f"{config_path}: 'specialization' must be a record naming its weights file, got {spec_record!r:.200}")
        weights = directory / spec_record["weights"]
        if not weights.is_file():
            raise FileNotFoundError(f"{config_path} names the stage parameters {weights}, which is missing")
        body = {k: v for k, v in spec_record.items() if k != "weights"}
        missing = [k for k in ("kind", "rank", "alpha", "stages", "layers") if k not in body]
        if missing:
            raise ValueError(f"{config_path}: specialization is missing the key(s) {missing}")
        wrapped.specialization = restore_specialization(wrapped, body, weights, record_path=config_path)
