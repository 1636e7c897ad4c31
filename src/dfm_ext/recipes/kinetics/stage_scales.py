"""Per-stage standardisation scales of a run (paper A.5): fixed, saved with the run, or estimated once.

A new estimate is written to ``<run>/stage_scales.json`` with a key of the config parts it depends
on, so a resumed run reuses it and a changed config estimates again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dfm_ext.recipes.engine.config import config_to_dict

__all__ = ["SCALES_FILE", "StageScalesMixin"]

SCALES_FILE = "stage_scales.json"


class StageScalesMixin:
    """``stage_scales()`` for a task with ``cfg``, ``dataset``, ``decomposition``, ``name`` and ``codec(device)``."""

    cfg: Any
    dataset: Any
    decomposition: Any
    name: str
    codec: Any  # device -> the task's latent codec

    def _scales_key(self) -> str:
        relevant = {k: config_to_dict(self.cfg)[k] for k in ("data", "vae", "decomposition")}
        relevant["clips"] = self.cfg.dfm.scale_estimation_clips
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def estimate_scales(self, device: torch.device | str = "cpu", *, batch_size: int = 8) -> Tensor:
        """Per-stage std of the latents of ``dfm.scale_estimation_clips`` clips spread evenly over the data."""
        from dfm_ext.process.objective import estimate_stage_scales

        if self.dataset is None:
            raise ValueError("estimating stage scales needs the dataset; pass dataset= or set dfm.scales")
        n = len(self.dataset)
        k = min(n, self.cfg.dfm.scale_estimation_clips)
        picks = sorted({int(i) for i in np.linspace(0, n - 1, k).round()})
        device = torch.device(device)
        g = torch.Generator(device=device).manual_seed(self.cfg.train.seed)

        def batches():
            for start in range(0, len(picks), batch_size):
                items = [self.dataset[(i, False)] for i in picks[start : start + batch_size]]
                if "latents" in items[0]:
                    yield torch.stack([it["latents"] for it in items]).to(device)
                else:
                    pixels = torch.stack([it["pixels"] for it in items]).to(device)
                    yield self.codec(device).encode(pixels, generator=g)

        return estimate_stage_scales(self.decomposition, batches())

    def stage_scales(self) -> Tensor:
        """Ones, ``dfm.scales``, the run folder's saved estimate, or a new one (the main process's, broadcast:
        every rank trains with bitwise the same scales)."""
        s = self.decomposition.num_stages
        if not self.cfg.dfm.standardize:
            return torch.ones(s)
        if self.cfg.dfm.scales is not None:
            return torch.tensor(self.cfg.dfm.scales, dtype=torch.float32)
        from accelerate import PartialState

        state = PartialState()
        path = Path(self.cfg.train.output_dir.format(name=self.name)).expanduser() / SCALES_FILE
        key = self._scales_key()
        scales, fresh = torch.zeros(s, dtype=torch.float32), False
        if state.is_main_process:
            saved = json.loads(path.read_text()) if path.is_file() else {}
            if saved.get("key") == key and len(saved.get("scales", [])) == s:
                scales = torch.tensor(saved["scales"], dtype=torch.float32)
            else:
                scales, fresh = self.estimate_scales(state.device), True
        if state.num_processes > 1:
            from accelerate.utils import broadcast

            scales = broadcast(scales.to(state.device), from_process=0).cpu()
        if fresh:
            from dfm_ext.fileio import atomic_write_text

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"key": key, "scales": scales.tolist()}, indent=2))
        return scales
