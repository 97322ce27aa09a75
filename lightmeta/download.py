"""Getting dataset files onto disk safely: checksummed downloads, safe zip and tar extraction
and atomic writes.

* :func:`download` streams a URL to ``<dest>.part`` while hashing it, resumes a partial file
  with an HTTP range request, and renames to ``dest`` only when the MD5 matches, so a failed
  or tampered download never looks like a finished one (a checksum failure leaves nothing).
* :func:`safe_extract` (zip, tar, tar.gz/bz2/xz) refuses members that would land outside the
  target folder (absolute paths, ``..``, drive letters, symbolic and hard links, device files:
  the "zip slip" / "tar slip" attacks) and publishes the extracted tree only once every member
  is out.
* :func:`atomic_write` writes caches through a temporary file and a rename, so a crash
  leaves the old file or none, never a truncated one.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator, Sequence

from lightmeta.errors import DataError

CHUNK = 1 << 20


class ChecksumError(DataError):
    """A download finished but its MD5 differs from the expected one (the file was deleted)."""


def md5sum(path: Path, chunk: int = CHUNK) -> str:
    """Hex MD5 of a file."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _open(url: str, start: int, timeout: float) -> tuple[BinaryIO, bool]:
    """Open ``url`` from byte ``start``; returns the response and whether it honoured the range."""
    request = urllib.request.Request(url, headers={"User-Agent": "lightmeta"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (URLs come from our own tables)
    return response, bool(start) and getattr(response, "status", None) == 206


def download(url: str, dest: Path, md5: str, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` and verify its MD5; returns ``dest``.

    A partial ``dest.part`` from an interrupted run is resumed when the server honours range
    requests (otherwise the download restarts). Raises :class:`DataError` when the server
    cannot be reached (the ``.part`` file is kept for resuming) and :class:`ChecksumError` when
    the checksum differs (the download is deleted).
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    try:
        try:
            response, resumed = _open(url, start, timeout)
        except urllib.error.HTTPError as exc:
            if not (start and exc.code == 416):  # 416: the partial file is not a prefix we can extend
                raise
            part.unlink()
            response, resumed = _open(url, 0, timeout)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"cannot download {url} ({reason})") from None
    h = hashlib.md5()
    with response:
        if resumed:
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(CHUNK), b""):
                    h.update(block)
        try:
            with open(part, "ab" if resumed else "wb") as out:
                for block in iter(lambda: response.read(CHUNK), b""):
                    h.update(block)
                    out.write(block)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise DataError(f"download of {url} was interrupted ({exc}); run again to resume") from None
    got = h.hexdigest()
    if got != md5:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"checksum mismatch for {dest.name} downloaded from {url}: md5 {got}, expected {md5}; "
            "the download was deleted, try again or fetch the file by hand"
        )
    os.replace(part, dest)
    return dest


def _safe_target(root: Path, member: str, archive: Path, is_link: bool) -> Path:
    """Where ``member`` may be extracted under ``root``; raises :class:`DataError` if it escapes."""
    name = member.replace("\\", "/")
    parts = PurePosixPath(name).parts
    bad = name.startswith("/") or ".." in parts or (parts and ":" in parts[0]) or is_link
    target = root.joinpath(*parts) if parts else root
    if bad or not target.resolve().is_relative_to(root.resolve()):
        raise DataError(
            f"{archive} holds an unsafe member '{member}' (absolute path, '..', drive, link or "
            "device file); refusing to extract it, the archive is corrupt or malicious"
        )
    return target


def _member_target(root: Path, info: zipfile.ZipInfo, archive: Path) -> Path:
    """Where zip member ``info`` may be extracted under ``root``."""
    return _safe_target(root, info.filename, archive, stat.S_ISLNK(info.external_attr >> 16))


def _extract_zip(archive: Path, tmp: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                target = _member_target(tmp, info, archive)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise DataError(f"{archive} is not a readable zip archive ({exc}); delete it and download again") from None


def _extract_tar(archive: Path, tmp: Path) -> None:
    """Regular files and folders only, streamed member by member (``tarfile.extractall`` would
    follow links and trust member paths)."""
    try:
        with tarfile.open(archive, "r:*") as tf:
            for info in tf:
                unsafe = not (info.isfile() or info.isdir())  # links, devices, fifos
                target = _safe_target(tmp, info.name, archive, unsafe)
                if info.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(info)
                assert src is not None  # regular file
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, EOFError) and exc.errno is not None:
            raise DataError(f"cannot extract {archive} into {tmp.parent} ({exc.strerror})") from None
        raise DataError(f"{archive} is not a readable tar archive ({exc}); delete it and download again") from None


def safe_extract(archive: Path, dest: Path) -> list[Path]:
    """Extract a zip or tar archive into ``dest`` with no path escapes; returns the top-level
    entries made.

    The format is recognised from the content (zip, or tar with any compression ``tarfile``
    reads). Members are written to a temporary folder inside ``dest`` and each top-level entry
    is then renamed into place, so an interrupted or refused extraction leaves nothing behind.
    Existing top-level entries of the same name are not overwritten (:class:`DataError`).
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.stem}.", suffix=".extracting", dir=dest))
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp)
        elif archive.is_file() and _is_tar(archive):
            _extract_tar(archive, tmp)
        else:
            raise DataError(f"{archive} is neither a zip nor a tar archive; delete it and download again")
        made = []
        for entry in sorted(tmp.iterdir()):
            final = dest / entry.name
            if final.exists():
                raise DataError(f"cannot extract {archive}: {final} already exists; remove it or use the existing copy")
            os.replace(entry, final)
            made.append(final)
        return made
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_archive(root: Path, folder: str, archive: str, source: tuple[str, str], required: Sequence[str],
                  missing: Callable[[str], DataError], allow_download: bool, what: str) -> Path:
    """``root/folder`` holding ``required``: as found, else extracted from ``root/archive``,
    downloaded from ``source`` (url, md5) first when absent and ``allow_download``.

    ``missing(reason)`` builds the one-line "where to put the files" error of the dataset.
    """
    folder_path, archive_path = root / folder, root / archive

    def lacking() -> list[str]:
        return [f for f in required if not (folder_path / f).exists()]

    if folder_path.is_dir():
        if lacking():
            raise missing(f"{folder_path} lacks {', '.join(lacking())}")
        return folder_path
    if not archive_path.is_file():
        if not allow_download:
            raise missing(f"{archive} missing and data.download=false")
        url, md5 = source
        try:
            root.mkdir(parents=True, exist_ok=True)
            download(url, archive_path, md5)
        except ChecksumError:
            raise
        except DataError as exc:
            raise missing(str(exc)) from None
        except OSError as exc:
            raise missing(f"cannot create the folder: {exc.strerror}") from None
    safe_extract(archive_path, root)
    if lacking():
        raise DataError(f"{archive_path} did not contain {folder}/ with {', '.join(required)}; "
                        f"it is not the official {what} archive")
    return folder_path


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed to ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should be an ordinary file
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
