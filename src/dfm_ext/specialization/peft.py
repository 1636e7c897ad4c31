"""Export one stage's LoRA in the peft/diffusers format (``load_lora_adapter`` loads it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from torch import Tensor, nn

from dfm_ext.specialization.layer_types import StageEmbedding
from dfm_ext.specialization.state import check_stage, stage_context, stage_layers

__all__ = ["export_peft_lora"]


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

    ctx = stage_context(model)
    check_stage(stage, ctx.num_stages)
    state: dict[str, Tensor] = {}
    targets: list[str] = []
    rank = alpha = None
    for name, layer in stage_layers(model):
        if layer._stage_kind != "lora":
            raise ValueError("only kind='lora' specialisations can be exported as LoRA; use merge() for 'full'")
        if isinstance(layer, StageEmbedding):
            raise ValueError(f"export of Embedding layers is not supported ({name!r}); exclude it from targets")
        if str(stage) not in layer.stage_params:
            raise ValueError(f"stage {stage} owns no parameters (specialised stages: {list(layer.stage_params)})")
        if strip:
            if not name.startswith(strip):
                raise ValueError(f"module {name!r} does not start with strip={strip!r}")
            name = name[len(strip) :]
        p = layer.stage_params_of(stage)
        assert p is not None  # checked above
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

