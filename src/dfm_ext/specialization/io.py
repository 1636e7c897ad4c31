"""A specialisation saved next to a model: its stage parameters and the record to re-apply it.

:func:`save_specialization` writes ``stage_parameters.safetensors`` (the stage-parameter file,
:mod:`dfm_ext.specialization.params_io`) and ``stage_lora.json`` (kind, rank, alpha, stages, layers);
:func:`load_specialization` re-applies :func:`~dfm_ext.specialization.specialize` to a fresh model
with exactly the recorded layers and loads the parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from dfm_ext.specialization.attach import StageSpecialization, specialize
from dfm_ext.specialization.params_io import save_stage_parameters
from dfm_ext.specialization.state import is_specialized
from dfm_ext.specialization.state import stage_context as _context
from dfm_ext.specialization.state import stage_layers as _stage_layers

__all__ = [
    "STAGE_WEIGHTS_FILE", "STAGE_RECORD_FILE", "save_specialization", "load_specialization", "restore_specialization",
    "specialization_record",
]

#: File names of :func:`save_specialization` (kept from the FLUX recipe's first exports, which
#: used them for per-stage LoRA only; they hold ``kind="full"`` records too).
STAGE_WEIGHTS_FILE = "stage_parameters.safetensors"
STAGE_RECORD_FILE = "stage_lora.json"


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
        ...     _ = model.save_pretrained(d)  # shared weights + the specialisation (returns the folder)
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
