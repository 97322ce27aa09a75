"""CIFAR-FS and the CIFAR-100 archive handling it shares with FC100: download, checksum,
safe tar extraction, restricted unpickling, decoding, cache, split sizes, episodes."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lightmeta.datamodule import EvalEpisodes
from lightmeta.datamodules import _cifar100 as cifar
from lightmeta.datamodules.cifarfs import CifarFSDataModule
from lightmeta.download import ChecksumError, safe_extract
from lightmeta.errors import DataError


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official-format archive: all 100 classes, 2 train + 1 test image each."""
    return cifar.write_example(tmp_path_factory.mktemp("cifar_src"))


@pytest.fixture()
def served(monkeypatch: pytest.MonkeyPatch, archive: Path) -> Path:
    """The official URL pointed at the fixture archive (file://) with its real checksum."""
    monkeypatch.setattr(cifar, "SOURCES", {cifar.ARCHIVE: (archive.as_uri(), md5(archive))})
    return archive


def datamodule(root: Path, cache: Path, seed: int = 0, **cfg: object) -> CifarFSDataModule:
    dm = CifarFSDataModule({"root": str(root), "cache_dir": str(cache), "ways": 5, "shots": 1, "queries": 2,
                            "meta_batch_size": 2, **cfg}, seed=seed)
    dm.setup("fit")
    return dm


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".part", ".tmp", ".extracting")))


def test_fixture_has_the_official_layout_and_keys(archive: Path) -> None:
    with tarfile.open(archive) as tf:
        assert sorted(tf.getnames()) == ["cifar-100-python/file.txt~", "cifar-100-python/meta",
                                         "cifar-100-python/test", "cifar-100-python/train"]
        train = pickle.loads(tf.extractfile("cifar-100-python/train").read())  # type: ignore[union-attr]
        meta = pickle.loads(tf.extractfile("cifar-100-python/meta").read())  # type: ignore[union-attr]
    assert {b"data", b"fine_labels", b"coarse_labels", b"filenames", b"batch_label"} == set(train)
    assert train[b"data"].dtype == np.uint8 and train[b"data"].shape == (200, 3072)
    assert set(meta) == {b"fine_label_names", b"coarse_label_names"}
    assert len(meta[b"fine_label_names"]) == 100 and len(meta[b"coarse_label_names"]) == 20


def test_download_verify_extract_decode_and_cache(served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = tmp_path / "root", tmp_path / "cache"
    dm = datamodule(root, cache)
    assert sorted(p.name for p in root.iterdir()) == sorted([cifar.ARCHIVE, cifar.FOLDER])
    assert leftovers(root) == [] and leftovers(cache) == []
    data = dm.decoded()
    assert data.images.shape == (300, 3, 32, 32) and data.images.dtype == torch.uint8 and data.counts == [3] * 100
    # pixels: class k's images are its train rows then its test row, each row the R, G, B planes
    with tarfile.open(served) as tf:
        parts = [pickle.loads(tf.extractfile(f"cifar-100-python/{p}").read()) for p in ("train", "test")]  # type: ignore[union-attr]
        names = [n.decode() for n in pickle.loads(tf.extractfile("cifar-100-python/meta").read())[b"fine_label_names"]]  # type: ignore[union-attr]
    assert data.names == names
    k = names.index("otter")
    expected = [row for p in parts for row, f in zip(p[b"data"], p[b"fine_labels"]) if f == k]
    got = data.images[sum(data.counts[:k]) : sum(data.counts[: k + 1])]
    assert torch.equal(got, torch.from_numpy(np.stack(expected)).view(3, 3, 32, 32))
    # a second build maps the cache instead of decoding again
    monkeypatch.setattr(cifar, "read_archive", lambda *a: pytest.fail("decoded again although the cache exists"))
    again = datamodule(root, cache)
    assert torch.equal(again.tasks.sample("train", [3], 0).support_x, dm.tasks.sample("train", [3], 0).support_x)


def test_checksum_mismatch_leaves_nothing_behind(served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cifar.SOURCES, cifar.ARCHIVE, (served.as_uri(), "0" * 32))
    with pytest.raises(ChecksumError, match="checksum mismatch for cifar-100-python.tar.gz") as err:
        datamodule(tmp_path / "root", tmp_path / "cache")
    assert "\n" not in str(err.value)
    assert list((tmp_path / "root").iterdir()) == [] and not (tmp_path / "cache").exists()


def test_offline_fails_in_one_line_naming_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cifar.SOURCES, cifar.ARCHIVE, ("http://127.0.0.1:9/cifar-100-python.tar.gz", "0" * 32))
    with pytest.raises(DataError, match=r"CIFAR-100 not found in .*cannot download.*put cifar-100-python\.tar\.gz .* or "
                                        r"the cifar-100-python/ folder .* train, test and meta") as err:
        datamodule(tmp_path / "root", tmp_path / "cache")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="cifar-100-python.tar.gz missing and data.download=false"):
        datamodule(tmp_path / "empty", tmp_path / "cache", download=False)


def test_split_sizes_and_classes(served: Path, tmp_path: Path) -> None:
    dm = datamodule(tmp_path / "root", tmp_path / "cache")
    split = dm.splits(dm.decoded().names)
    assert {s: len(v) for s, v in split.items()} == {"train": 64, "val": 16, "test": 20}
    assert {s: len(c) for s, c in dm.tasks.classes.items()} == {"train": 64, "val": 16, "test": 20}
    assert {"otter", "motorcycle"} <= set(split["val"]) and {"baby", "rocket"} <= set(split["test"])
    names = dm.tasks.class_names
    ids = dm.tasks.episode_classes("test", list(range(20)), 0)
    assert {names[c // 4] for c in ids.flatten().tolist()} <= set(split["test"])


def test_episode_shapes_and_determinism(served: Path, tmp_path: Path) -> None:
    root, cache = tmp_path / "root", tmp_path / "cache"
    dm = datamodule(root, cache)
    batch = dm.tasks.sample("train", [0, 1], seed=0)
    assert batch.support_x.shape == (2, 5, 3, 32, 32) and batch.query_x.shape == (2, 10, 3, 32, 32)
    assert batch.support_y.tolist() == [[0, 1, 2, 3, 4]] * 2 and batch.query_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert float(batch.support_x.min()) >= 0 and float(batch.support_x.max()) <= 1
    same, other = datamodule(root, cache), datamodule(root, cache, seed=1)
    first = next(iter(dm.train_dataloader()))
    assert torch.equal(first.query_x, next(iter(same.train_dataloader())).query_x)
    assert not torch.equal(first.query_x, next(iter(other.train_dataloader())).query_x)
    fixed = [EvalEpisodes(d.sampler, "test", 8, 0, 4, 0, 1)[1].support_x for d in (dm, other)]
    assert torch.equal(*fixed)


@pytest.mark.parametrize("member, kind", [("../escaped.txt", tarfile.REGTYPE), ("/tmp/lightmeta_abs_escape.txt", tarfile.REGTYPE),
                                          ("cifar-100-python/link", tarfile.SYMTYPE), ("cifar-100-python/hard", tarfile.LNKTYPE),
                                          ("cifar-100-python/dev", tarfile.CHRTYPE)])
def test_tar_slip_is_refused_and_nothing_is_written(tmp_path: Path, member: str, kind: bytes) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        ok = tarfile.TarInfo("cifar-100-python/meta")
        ok.size = 4
        tf.addfile(ok, io.BytesIO(b"fine"))
        bad = tarfile.TarInfo(member)
        bad.type = kind
        bad.linkname = "/etc/passwd"
        bad.size = 7 if kind == tarfile.REGTYPE else 0
        tf.addfile(bad, io.BytesIO(b"escaped") if kind == tarfile.REGTYPE else None)
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="unsafe member"):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/lightmeta_abs_escape.txt").exists()


def test_truncated_archive_is_a_clear_error(archive: Path, tmp_path: Path) -> None:
    broken = tmp_path / cifar.ARCHIVE
    broken.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="not a readable tar archive"):
        safe_extract(broken, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


class Exploit:
    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, ("echo pwned > /tmp/lightmeta_pickle_exploit",))


def test_pickles_that_name_code_are_refused(archive: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    safe_extract(archive, root)
    (root / cifar.FOLDER / "meta").write_bytes(pickle.dumps({b"fine_label_names": Exploit()}))
    with pytest.raises(DataError, match=r"meta is not a readable CIFAR-100 meta pickle .*global 'posix\.system'"):
        datamodule(root, tmp_path / "cache", download=False)
    assert not Path("/tmp/lightmeta_pickle_exploit").exists()


def test_damaged_archive_contents_are_named(archive: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    safe_extract(archive, root)
    train = root / cifar.FOLDER / "train"
    blob = pickle.loads(train.read_bytes())
    blob[b"fine_labels"] = blob[b"fine_labels"][:-1]
    train.write_bytes(pickle.dumps(blob))
    with pytest.raises(DataError, match="train has 200 images but 199 fine and 200 coarse labels"):
        datamodule(root, tmp_path / "cache", download=False)
    (root / cifar.FOLDER / "test").unlink()
    with pytest.raises(DataError, match="cifar-100-python lacks test"):
        datamodule(root, tmp_path / "cache", download=False)
