"""A sample set drawn in shards, by any number of processes, resumably: :class:`SampleShards`.

Sample ``i`` of ``num`` belongs to shard ``i // shard_size``; shard ``k`` is complete when
``shards/shard-<k>.npz`` exists (written last, atomically, after the shard's PNG or video files),
so a crash leaves either a complete shard or none, and a rerun redraws exactly the missing ones,
writing over their partial files (same names: no duplicates, no gaps). Process ``r`` of ``W``
takes shards ``r, r + W, ...``: the split needs no communication, and whichever processes wrote a
shard, it holds the same samples when each sample depends on its global index only.

Layout of ``folder``::

    000000.png ...            images (or the caller's per-sample files, e.g. 000000.mp4)
    shards/shard-000000.npz   arr_0 uint8 [n, H, W, C] (videos [n, T, H, W, C]), arr_1 int [n]
    sampling.json             what the set is (count, shard size, the caller's settings)
    samples.npz               :meth:`SampleShards.merge`: all shards in one ADM-layout .npz

Example:
    >>> import tempfile
    >>> shards = SampleShards(tempfile.mkdtemp(), num=5, shard_size=2)
    >>> [list(shards.indices(k)) for k in shards.pending(rank=1, world=2)]
    [[2, 3]]
    >>> for k in shards.pending():
    ...     _ = shards.write(k, np.zeros((len(shards.indices(k)), 4, 4, 3), np.uint8), np.arange(len(shards.indices(k))))
    >>> np.load(shards.merge())["arr_0"].shape
    (5, 4, 4, 3)
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dfm_ext.fileio import atomic_write_text, fsync_directory
from .samples import save_samples

__all__ = ["SampleShards"]

_RECORD = "sampling.json"


@contextlib.contextmanager
def _replaced(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` (ending in ``.npz``), fsynced and renamed onto ``path`` when the block succeeds."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)


class SampleShards:
    """``num`` samples in shards of ``shard_size`` under ``folder``; ``settings``: what must not change on resume.

    Args:
        folder: the output folder (created).
        num: number of samples.
        shard_size: samples per shard (also the natural batch size).
        settings: JSON-able description of how the samples are drawn (model, sampler settings); a
            folder begun with other settings, count or shard size is refused, naming what differs.
    """

    def __init__(self, folder: str | os.PathLike, num: int, shard_size: int, *, settings: Mapping[str, Any] | None = None) -> None:
        if num < 1 or shard_size < 1:
            raise ValueError(f"num and shard_size must be >= 1, got {num} and {shard_size}")
        self.folder, self.num, self.shard_size = Path(folder), int(num), int(shard_size)
        record = json.loads(json.dumps({"num": self.num, "shard_size": self.shard_size, **(settings or {})}))
        file = self.folder / _RECORD
        if file.is_file():
            saved = json.loads(file.read_text())
            differ = sorted(k for k in set(saved) | set(record) if saved.get(k) != record.get(k))
            if differ:
                raise ValueError(
                    f"{self.folder} holds samples drawn with other settings ({', '.join(f'{k}: {saved.get(k)!r} -> {record.get(k)!r}' for k in differ)}); "
                    "use another output folder, or the same settings to resume"
                )
        else:
            (self.folder / "shards").mkdir(parents=True, exist_ok=True)
            atomic_write_text(file, json.dumps(record, indent=2, sort_keys=True) + "\n")  # every process writes the same

    @property
    def num_shards(self) -> int:
        return -(-self.num // self.shard_size)

    def indices(self, k: int) -> range:
        """The global sample indices of shard ``k``."""
        return range(k * self.shard_size, min(self.num, (k + 1) * self.shard_size))

    def path(self, k: int) -> Path:
        return self.folder / "shards" / f"shard-{k:06d}.npz"

    def done(self, k: int) -> bool:
        """Whether shard ``k`` is on disk with its full count (a damaged file counts as missing)."""
        try:
            with zipfile.ZipFile(self.path(k)) as z, z.open("arr_0.npy") as f, z.open("arr_1.npy") as g:
                shapes = [np.lib.format.read_array_header_2_0(h)[0] if np.lib.format.read_magic(h) == (2, 0)
                          else np.lib.format.read_array_header_1_0(h)[0] for h in (f, g)]
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            return False
        return shapes[0][0] == shapes[1][0] == len(self.indices(k))

    def pending(self, rank: int = 0, world: int = 1) -> list[int]:
        """The shards process ``rank`` of ``world`` still has to draw."""
        return [k for k in range(rank, self.num_shards, world) if not self.done(k)]

    def write(
        self, k: int, samples: np.ndarray, labels: np.ndarray, *, write_item: Callable[[np.ndarray, Path], Any] | None = None
    ) -> Path:
        """Write shard ``k``: uint8 images ``[n, H, W, C]`` (also as PNGs) or videos ``[n, T, H, W, C]`` (each given to
        ``write_item(video, folder / "000123")``, e.g. an MP4 writer), with an int per sample ``labels [n]``."""
        n = len(self.indices(k))
        if samples.dtype != np.uint8 or samples.ndim not in (4, 5) or samples.shape[0] != n:
            raise ValueError(f"shard {k} needs uint8 [{n}, H, W, C] or [{n}, T, H, W, C], got {samples.dtype} {samples.shape}")
        start = self.indices(k).start
        if samples.ndim == 4:
            save_samples(samples, folder=self.folder, start=start)
        elif write_item is not None:
            for i, video in enumerate(samples):
                write_item(video, self.folder / f"{start + i:06d}")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (n,):
            raise ValueError(f"shard {k} needs labels [{n}], got {labels.shape}")
        with _replaced(self.path(k)) as tmp:  # last: the file marks the shard complete
            np.savez(tmp, arr_0=samples, arr_1=labels)
        return self.path(k)

    def missing(self) -> list[int]:
        """Shards not yet complete (written by no process)."""
        return self.pending(0, 1)

    def merge(self, path: str | os.PathLike | None = None) -> Path:
        """All shards, in order, as one ADM ``.npz`` (``arr_0`` the samples, ``arr_1`` the labels), streamed shard by
        shard and renamed into place; default ``folder/samples.npz``. Refused while shards are missing."""
        missing = self.missing()
        if missing:
            raise ValueError(f"{len(missing)} of {self.num_shards} shards are not drawn yet (first: {self.path(missing[0]).name}); rerun the sample command")
        path = Path(path) if path is not None else self.folder / "samples.npz"
        with np.load(self.path(0)) as first:
            row, dtype = first["arr_0"].shape[1:], first["arr_0"].dtype
        with _replaced(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, shape, kind in (("arr_0", (self.num, *row), dtype), ("arr_1", (self.num,), np.dtype(np.int64))):
                with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                    header = {"descr": np.lib.format.dtype_to_descr(kind), "fortran_order": False, "shape": shape}
                    np.lib.format.write_array_header_2_0(f, header)
                    for k in range(self.num_shards):
                        with np.load(self.path(k)) as shard:
                            part = shard[name]
                        if part.shape[1:] != shape[1:] or part.dtype != kind:
                            raise ValueError(f"{self.path(k)}: {name} is {part.dtype} {part.shape}, shard 0 {kind} {shape[1:]}")
                        f.write(np.ascontiguousarray(part).tobytes())
        return path
