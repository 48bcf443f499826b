"""How the prepared cache stores its arrays: plain ``.npy`` (default) or blosc2-compressed ``.b2nd``.

``npy`` memory-maps with no decode and no extra dependency. ``blosc2`` stores each array as a chunked,
compressed NDArray (about 3x smaller on CT, 1.6x on MR; ``docs/results/scale``) for pools too large to keep
uncompressed on shared storage. The choice is made once, at ``prepare --cache-format``, and recorded in
``manifest.json`` (``array_format``); readers pick the decoder from there, so nothing downstream names a format.

Both formats are read through :func:`open_array`: ``npy`` gives a read-only ``np.memmap``; ``blosc2`` gives a
:class:`CompressedArray`, which slices like a numpy array and decodes only the blocks a slice touches, so a
random crop costs a few blocks, never the volume.

Chunk and block shapes (``blosc2_layout``) are chosen without knowing the patch size, which is decided after
preparation (``plan``, ``finetune --patch``, a pretraining preset): blocks are 32-voxel cubes (128 KiB of
float32, small enough to decode from the CPU's L2 cache; a 64^3 crop decodes at most 27 of them, 3.4x its own
volume, a 128^3 crop 125, 2x), chunks grow from the block to about 4 MiB of payload. The channel axis is always 1 in
both, so a channel decodes alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medpretrain.atomic import atomic_path, atomic_save_npy
from medpretrain.errors import CacheError, ConfigError

ARRAY_FORMATS = ("npy", "blosc2")
DEFAULT_FORMAT = "npy"
SUFFIX = {"npy": ".npy", "blosc2": ".b2nd"}
INSTALL_HINT = "pip install blosc2"

BLOCK_BYTES = 128 * 1024
CHUNK_BYTES = 4 * 1024 * 1024
# zstd level 1 with byte shuffle: on a BTCV case prepared at 1.5 mm the best ratio of the codecs tried (2.7x; LZ4HC
# level 5 2.6x, LZ4 2.4x, zstd 3 2.7x at half the speed), compressing ~3x faster than LZ4HC and decoding a 64^3 crop
# about as fast as LZ4 (one measurement on the 2-core EPYC beside other work; nnU-Net v2 uses LZ4HC).
CODEC = "zstd"
CLEVEL = 1


def array_settings(fmt: str) -> dict[str, Any]:
    """What the manifest records about how arrays are stored (readers need only ``format``)."""
    if fmt == "npy":
        return {"format": "npy"}
    return {"format": "blosc2", "codec": CODEC, "clevel": CLEVEL, "filter": "shuffle (float) / none (labels)",
            "block_bytes": BLOCK_BYTES, "chunk_bytes": CHUNK_BYTES}


def check_format(fmt: str) -> str:
    """``fmt`` if it is a known array format, else ConfigError; for ``blosc2``, also that the package imports."""
    if fmt not in ARRAY_FORMATS:
        raise ConfigError(f"--cache-format {fmt!r} is not an array format; use one of {', '.join(ARRAY_FORMATS)}")
    if fmt == "blosc2":
        _blosc2(f"--cache-format blosc2 needs the blosc2 package, which is not installed; {INSTALL_HINT} "
                "(or pip install 'medpretrain[compressed]'), or use --cache-format npy", ConfigError)
    return fmt


def _blosc2(message: str, error=CacheError):
    """The blosc2 module, imported on first use (an optional dependency); ``error(message)`` without it."""
    try:
        import blosc2
    except ImportError:
        raise error(message) from None
    return blosc2


def require_blosc2(root) -> Any:
    """The blosc2 module for reading the cache at ``root``; a one-line CacheError naming the fix without it."""
    return _blosc2(f"{root}: the prepared arrays are blosc2-compressed (manifest.json: array_format blosc2) and the "
                   f"blosc2 package is not installed; {INSTALL_HINT} (or pip install 'medpretrain[compressed]')")


def blosc2_layout(shape: Sequence[int], itemsize: int, block_bytes: int | None = None,
                  chunk_bytes: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(chunks, blocks)`` for an array whose last three axes are spatial (a leading channel axis gets 1).

    Blocks: the largest power-of-two cube within ``block_bytes``, cut to the volume. Chunks: start at the block
    and double the shortest side (ties: the longer axis of the volume) while the payload stays within
    ``chunk_bytes`` and the side is short of the volume (rounded up to whole blocks).
    """
    block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    lead = tuple(1 for _ in shape[:-3])
    spatial = [int(s) for s in shape[-3:]]
    side = 1
    while (2 * side) ** 3 * itemsize <= block_bytes:
        side *= 2
    block = [max(1, min(side, s)) for s in spatial]
    limit = [math.ceil(s / b) * b for s, b in zip(spatial, block)]
    chunk = list(block)
    while True:
        grow = [a for a in range(3) if chunk[a] < limit[a]
                and math.prod(chunk) // chunk[a] * min(2 * chunk[a], limit[a]) * itemsize <= chunk_bytes]
        if not grow:
            break
        a = min(grow, key=lambda ax: (chunk[ax], -spatial[ax], ax))
        chunk[a] = min(2 * chunk[a], limit[a])
    return lead + tuple(chunk), lead + tuple(block)


def save_array(path: Path, array: np.ndarray, fmt: str) -> Path:
    """Write ``array`` to ``path`` (whose suffix is ``SUFFIX[fmt]``) atomically."""
    if fmt == "npy":
        return atomic_save_npy(path, array)
    blosc2 = _blosc2(f"{path}: cannot write a blosc2 array, the blosc2 package is not installed; {INSTALL_HINT}")
    array = np.ascontiguousarray(array)
    chunks, blocks = blosc2_layout(array.shape, array.itemsize)
    # One thread: prepare runs one process per core (--workers), and a DataLoader worker per core reads.
    cparams = blosc2.CParams(codec=blosc2.Codec.ZSTD, clevel=CLEVEL, nthreads=1,
                             filters=[blosc2.Filter.SHUFFLE if array.itemsize > 1 else blosc2.Filter.NOFILTER])
    with atomic_path(path, keep_suffix=SUFFIX["blosc2"]) as tmp:
        written = blosc2.asarray(array, urlpath=str(tmp), mode="w", chunks=chunks, blocks=blocks, cparams=cparams)
        del written  # closes the file before it is renamed into place
    return Path(path)


def open_array(path: Path, fmt: str, mmap: bool = True):
    """Open a cache array read-only: ``np.memmap`` / ``CompressedArray`` with ``mmap``, else a decoded ndarray."""
    if fmt == "npy":
        return np.load(path, mmap_mode="r" if mmap else None)
    array = CompressedArray(path)
    return array if mmap else np.asarray(array)


class CompressedArray:
    """A read-only blosc2 ``.b2nd`` array that slices like a numpy array.

    ``array[...]`` with slices, integers and ``...`` returns a numpy array (or a 0-d array for one voxel) and
    decodes only the blocks the region touches; ``np.asarray(array)`` decodes all of it. The file is
    memory-mapped, so the compressed bytes are read from the page cache that every process (DataLoader
    workers, DDP ranks) on a machine shares. Picklable: a copy reopens the file.

    Attributes:
        path: the file.
        shape, dtype, ndim: as a numpy array's.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._open()

    def _open(self) -> None:
        blosc2 = require_blosc2(self.path.parent)
        # One decoding thread: the parallelism is the DataLoader workers and ranks already.
        self._nd = blosc2.open(str(self.path), mode="r", mmap_mode="r", dparams=blosc2.DParams(nthreads=1))
        self.shape: tuple[int, ...] = tuple(int(s) for s in self._nd.shape)
        self.dtype = np.dtype(self._nd.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Decoded size in bytes."""
        return self.size * self.dtype.itemsize

    @property
    def cbytes(self) -> int:
        """Compressed size in bytes."""
        return int(self._nd.schunk.cbytes)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        return self._nd[key]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._nd[...]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._open()

    def __repr__(self) -> str:
        return f"CompressedArray({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"
