"""Reading benchmark source files without trusting them.

The standard few-shot benchmarks are distributed as Python pickles (mini-ImageNet's
``mini-imagenet-cache-*.pkl``, tiered-ImageNet's ``*_labels.pkl`` and ``*_images_png.pkl``,
CIFAR-100's ``train``/``test``/``meta``) and NumPy archives. A plain ``pickle.load`` runs
whatever code a file names, so :func:`load_pickle` only lets a pickle rebuild NumPy arrays,
NumPy scalars and plain containers; anything else fails with one line naming the file and the
refused global. :func:`npz_rows` streams the rows of an array inside an ``.npz`` chunk by
chunk, so a 10 GB member is never held in memory at once.
"""
from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from lightmeta.errors import DataError

#: the globals a data pickle may name: NumPy array/scalar reconstruction (NumPy 1 and 2 paths)
ALLOWED_GLOBALS = frozenset(
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
) | frozenset(
    (module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")
) | {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("builtins", "set"),
     ("builtins", "frozenset")}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names the global '{module}.{name}', which a data file has no need for")


def load_pickle(path: Path, what: str) -> Any:
    """Unpickle ``path`` allowing only arrays, NumPy scalars and containers.

    Python 2 pickles (CIFAR-100, tiered-ImageNet) load with ``encoding="latin1"``, which keeps
    their byte strings as ``str`` and their NumPy arrays intact. ``what`` names the file's role
    in error messages.
    """
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, encoding="latin1").load()
    except OSError as exc:
        raise DataError(f"cannot read {what} {path} ({exc.strerror})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, MemoryError) as exc:
        raise DataError(f"{path} is not a readable {what} ({type(exc).__name__}: {exc}); replace it with the original file") from None


def files_fingerprint(paths: Iterable[Path], root: Path | None = None, sample: int = 1 << 16) -> str:
    """Digest of files by name, size and the hash of their first and last ``sample`` bytes.

    Cheap enough to run on every setup for multi-GB pickles, yet it changes when a file is
    replaced by another copy; ``root`` makes names relative (moving the folder keeps the digest).
    """
    h = hashlib.sha1()
    for path in paths:
        path = Path(path)
        name = path.relative_to(root).as_posix() if root else path.name
        size = path.stat().st_size
        h.update(f"{name}:{size}:".encode())
        with open(path, "rb") as f:
            h.update(f.read(sample))
            if size > sample:
                f.seek(max(sample, size - sample))
                h.update(f.read(sample))
    return h.hexdigest()[:16]


def field(blob: Any, key: str, path: Path, what: str) -> Any:
    """``blob[key]`` of an unpickled dict whose keys may be ``str`` or ``bytes`` (Python 2 files)."""
    if isinstance(blob, dict):
        for k in (key, key.encode()):
            if k in blob:
                return blob[k]
    keys = sorted(str(k) for k in blob) if isinstance(blob, dict) else type(blob).__name__
    raise DataError(f"{path} has no '{key}' entry (found {keys}); it is not the expected {what}")


def npz_shape(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of array ``key`` in an ``.npz`` without reading its data."""
    with _npz_member(path, key) as (shape, dtype, _):
        return shape, dtype


def npz_rows(path: Path, key: str, rows: int = 4096) -> Iterator[np.ndarray]:
    """The array ``key`` of an ``.npz`` (stored or deflated), ``rows`` leading rows at a time."""
    with _npz_member(path, key) as (shape, dtype, stream):
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        left = shape[0] if shape else 0
        while left:
            n = min(rows, left)
            data = stream.read(n * row_bytes)
            if len(data) != n * row_bytes:
                raise DataError(f"{path}: array '{key}' is truncated; replace the file with the original")
            yield np.frombuffer(data, dtype=dtype).reshape(n, *shape[1:])
            left -= n


class _npz_member:  # noqa: N801 (used as a context manager, like open())
    """Open member ``<key>.npy`` of an npz: yields ``(shape, dtype, stream at the data)``."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = Path(path), key
        self.zf: zipfile.ZipFile | None = None

    def __enter__(self) -> tuple[tuple[int, ...], np.dtype, Any]:
        try:
            self.zf = zipfile.ZipFile(self.path)
            member = f"{self.key}.npy"
            if member not in self.zf.namelist():
                raise DataError(f"{self.path} holds no array '{self.key}' (found {sorted(n.removesuffix('.npy') for n in self.zf.namelist())})")
            stream = self.zf.open(member)
            version = np.lib.format.read_magic(stream)
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                raise ValueError(f".npy format version {version} is not supported")
            shape, fortran, dtype = readers[version](stream)
        except (OSError, zipfile.BadZipFile, ValueError) as exc:
            self.__exit__()
            raise DataError(f"{self.path} is not a readable .npz archive ({type(exc).__name__}: {exc}); replace it with the original") from None
        except DataError:
            self.__exit__()
            raise
        if fortran or dtype.hasobject:
            self.__exit__()
            raise DataError(f"{self.path}: array '{self.key}' must be a C-ordered numeric array")
        return tuple(shape), dtype, stream

    def __exit__(self, *exc: object) -> None:
        if self.zf is not None:
            self.zf.close()
            self.zf = None
