"""Omniglot: download/extract/decode against small fixtures served from disk, and the
datamodule on the real data (``require_data("omniglot")``)."""
from __future__ import annotations

import hashlib
import http.server
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import require_data
from lightmeta.datamodule import TrainEpisodes
from lightmeta.datamodules import omniglot
from lightmeta.download import atomic_write, download, safe_extract
from lightmeta.errors import ConfigError, DataError

# ---------------------------------------------------------------------- a small copy in the official layout
def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``write_example``'s zips (12 characters) and split file."""
    root, split_file = omniglot.write_example(tmp_path_factory.mktemp("omniglot_example"))
    return {"root": root, "split_file": split_file}


@pytest.fixture(scope="module")
def characters(example: dict[str, Path]) -> list[str]:
    return [c for names in omniglot.read_split(example["split_file"]).values() for c in names]


@pytest.fixture()
def served(monkeypatch: pytest.MonkeyPatch, example: dict[str, Path]) -> dict[str, Path]:
    """Point the official URLs at the example zips (file:// URLs) with their real checksums."""
    zips = {n: example["root"] / f"{n}.zip" for n in omniglot.SOURCES}
    monkeypatch.setattr(omniglot, "SOURCES", {n: (p.as_uri(), md5(p)) for n, p in zips.items()})
    return zips


def extracted(example: dict[str, Path], folder: Path) -> Path:
    for name in omniglot.SOURCES:
        safe_extract(example["root"] / f"{name}.zip", folder)
    return folder


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".part", ".tmp", ".extracting")))


def test_download_verify_extract_decode_and_cache(served: dict[str, Path], characters: list[str], tmp_path: Path) -> None:
    root, cache_dir = tmp_path / "root", tmp_path / "cache"
    images, names = omniglot.load_omniglot(root, 28, cache_dir, characters=characters)
    assert sorted(p.name for p in root.iterdir()) == [
        "images_background", "images_background.zip", "images_evaluation", "images_evaluation.zip"]
    assert leftovers(root) == [] and leftovers(cache_dir) == []
    assert names == sorted(characters, key=lambda c: (c.split("/")[0], c.split("/")[1], c.split("/")[2]))
    assert images.shape == (12 * 20, 1, 28, 28) and images.dtype == torch.uint8
    # ink is 1 (255), background 0: the square of character 1, drawer 1 covers (9..39, 8..38) of 105
    first = images[0, 0].float() / 255
    ink = first[int(12 * 28 / 105) : int(36 * 28 / 105), int(12 * 28 / 105) : int(36 * 28 / 105)]
    assert float(ink.min()) > 0.9 and float(first[-5:, -5:].max()) == 0.0
    assert not torch.equal(images[0], images[1])  # drawings differ
    cached = sorted(cache_dir.iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("omniglot-28px-")


def test_checksum_mismatch_leaves_nothing_behind(served: dict[str, Path], characters: list[str],
                                                 monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url, _ = omniglot.SOURCES["images_background"]
    monkeypatch.setitem(omniglot.SOURCES, "images_background", (url, "0" * 32))
    root = tmp_path / "root"
    with pytest.raises(DataError, match="checksum mismatch for images_background.zip") as err:
        omniglot.omniglot_cache(root, 28, tmp_path / "cache", characters=characters)
    assert "\n" not in str(err.value)
    assert list(root.iterdir()) == []


def test_without_network_one_line_names_both_files_and_the_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(omniglot, "SOURCES", {n: (f"http://127.0.0.1:9/{n}.zip", "0" * 32) for n in omniglot.SOURCES})
    root = tmp_path / "nowhere"
    for allow in (True, False):
        with pytest.raises(DataError) as err:
            omniglot.omniglot_cache(root, 28, tmp_path / "cache", allow_download=allow)
        msg = str(err.value)
        assert "\n" not in msg and "images_background.zip" in msg and "images_evaluation.zip" in msg and str(root) in msg


def test_local_copies_are_accepted_by_content_not_archive_hash(example: dict[str, Path], characters: list[str],
                                                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for name in omniglot.SOURCES:  # re-packed copies: same PNGs, different archive bytes
        original = example["root"] / f"{name}.zip"
        with zipfile.ZipFile(original) as src, zipfile.ZipFile(root / original.name, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info))
        assert md5(root / original.name) != md5(original)
    monkeypatch.setattr(omniglot, "SOURCES", {n: ("http://127.0.0.1:9/unreachable", "0" * 32) for n in omniglot.SOURCES})
    images, names = omniglot.load_omniglot(root, 14, tmp_path / "cache", characters=characters)
    assert images.shape == (240, 1, 14, 14) and len(names) == 12
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip", "images_evaluation.zip"]  # read in place


def test_cache_is_reused_and_keyed_by_image_size(example: dict[str, Path], characters: list[str],
                                                 monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    first = omniglot.omniglot_cache(example["root"], 28, cache_dir, False, characters)

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again although the cache exists")

    monkeypatch.setattr(omniglot, "decode", no_decoding)
    assert omniglot.omniglot_cache(example["root"], 28, cache_dir, False, characters) == first
    with pytest.raises(AssertionError, match="decoded again"):
        omniglot.omniglot_cache(example["root"], 20, cache_dir, False, characters)  # another size, another cache


def test_corrupt_image_names_the_file(example: dict[str, Path], characters: list[str], tmp_path: Path) -> None:
    root = extracted(example, tmp_path / "root")
    bad = root / "images_evaluation" / "Gamma" / "character02" / "0011_07.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(DataError, match=r"corrupt or truncated image .*images_evaluation/Gamma/character02/0011_07\.png") as err:
        omniglot.omniglot_cache(root, 28, tmp_path / "cache", False, characters)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists()


def test_missing_drawing_names_the_file(example: dict[str, Path], characters: list[str], tmp_path: Path) -> None:
    root = extracted(example, tmp_path / "root")
    (root / "images_background" / "Beta" / "character01" / "0004_12.png").unlink()
    with pytest.raises(DataError, match=r"missing images_background/Beta/character01/0004_12\.png"):
        omniglot.omniglot_cache(root, 28, tmp_path / "cache", False, characters)


def test_missing_character_is_named(example: dict[str, Path], characters: list[str], tmp_path: Path) -> None:
    root = extracted(example, tmp_path / "root")
    shutil.rmtree(root / "images_background" / "Beta" / "character02")
    with pytest.raises(DataError, match=r"holds 5 characters in 2 alphabets, the split names 6 \(images_background/Beta/character02 is missing\)"):
        omniglot.omniglot_cache(root, 28, tmp_path / "cache", False, characters)


def test_example_datamodule_end_to_end(example: dict[str, Path], tmp_path: Path) -> None:
    dm = omniglot.OmniglotDataModule({"root": str(example["root"]), "split_file": str(example["split_file"]),
                                      "cache_dir": str(tmp_path / "cache"), "download": False,
                                      "ways": 3, "shots": 2, "queries": 3, "meta_batch_size": 2})
    dm.prepare_data()
    dm.setup("fit")
    assert {s: len(c) for s, c in dm.tasks.classes.items()} == {"train": 12, "val": 3, "test": 6}
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (2, 6, 1, 28, 28) and batch.query_x.shape == (2, 9, 1, 28, 28)
    with pytest.raises(DataError, match="split file .* is unreadable"):
        omniglot.OmniglotDataModule({"root": str(example["root"]), "split_file": str(tmp_path / "none.json")}).setup()


# ---------------------------------------------------------------------- download and extraction primitives
@pytest.mark.parametrize("member", ["../escaped.txt", "/tmp/absolute_escape.txt", "a/../../escaped.txt", "C:/escaped.txt"])
def test_zip_slip_is_refused_and_nothing_is_written(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("images_background/ok.txt", "fine")
        zf.writestr(member, "escaped")
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="unsafe member"):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/absolute_escape.txt").exists()


def test_symlink_members_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    info = zipfile.ZipInfo("images_background/link")
    info.external_attr = (0o120777 << 16)  # a symbolic link
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="unsafe member 'images_background/link'"):
        safe_extract(archive, tmp_path / "dest")


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files from ``directory`` and honours ``Range: bytes=N-`` (counts served bytes)."""

    served_bytes = 0

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])
        type(self).served_bytes += len(data) - start

    def log_message(self, *args: object) -> None:
        pass


def test_download_resumes_a_partial_file_over_http(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 400
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "blob.zip").write_bytes(payload)
    dest = tmp_path / "blob.zip"
    Path(str(dest) + ".part").write_bytes(payload[:70000])
    handler = lambda *a, **k: RangeHandler(*a, directory=str(tmp_path / "srv"), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        RangeHandler.served_bytes = 0
        download(f"http://127.0.0.1:{server.server_port}/blob.zip", dest, hashlib.md5(payload).hexdigest())
    finally:
        server.shutdown()
    assert dest.read_bytes() == payload and RangeHandler.served_bytes == len(payload) - 70000
    assert not Path(str(dest) + ".part").exists()


def test_download_restarts_when_the_server_ignores_ranges(tmp_path: Path) -> None:
    source = tmp_path / "blob.bin"
    source.write_bytes(b"omniglot" * 1000)
    dest = tmp_path / "out" / "blob.bin"
    dest.parent.mkdir()
    Path(str(dest) + ".part").write_bytes(b"garbage")  # file:// ignores Range: must start over
    download(source.as_uri(), dest, md5(source))
    assert dest.read_bytes() == source.read_bytes()


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "cache.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["cache.pt"]


# ---------------------------------------------------------------------- the real data
@pytest.fixture(scope="session")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Decode the real Omniglot once per session into a temporary cache."""
    root = require_data("omniglot")
    cache_dir = tmp_path_factory.mktemp("omniglot_cache")
    omniglot.omniglot_cache(root, 28, cache_dir, allow_download=False)
    return {"root": str(root), "cache_dir": str(cache_dir), "download": False}


def real_dm(real_cache: dict[str, str], seed: int = 0, **cfg: object) -> omniglot.OmniglotDataModule:
    dm = omniglot.OmniglotDataModule({**real_cache, **cfg}, seed=seed)
    dm.setup("fit")
    return dm


def test_real_counts_and_pixels(real_cache: dict[str, str]) -> None:
    images, characters = omniglot.load_omniglot(real_cache["root"], 28, real_cache["cache_dir"], False)
    assert images.shape == (32460, 1, 28, 28) and len(characters) == 1623
    assert sum(c.startswith("images_background/") for c in characters) == 964
    assert len({c.split("/")[1] for c in characters}) == 50
    x = images.float() / 255
    assert float(x.mean()) < 0.2 and float(x.amin(dim=(1, 2, 3)).max()) == 0.0 and float(x.amax()) == 1.0


@pytest.mark.parametrize("protocol, sizes", [("vinyals", (1028, 172, 423)), ("lake", (792, 172, 659))])
def test_real_splits_follow_the_documented_rule(real_cache: dict[str, str], protocol: str, sizes: tuple[int, int, int]) -> None:
    _, characters = omniglot.load_omniglot(real_cache["root"], 28, real_cache["cache_dir"], False)
    shipped = omniglot.read_split(omniglot.split_path(protocol))
    assert shipped == omniglot.split_rule(protocol, characters)
    assert tuple(len(shipped[s]) for s in ("train", "val", "test")) == sizes
    assert sorted(shipped["train"] + shipped["val"] + shipped["test"]) == sorted(characters)
    dm = real_dm(real_cache, protocol=protocol)
    tasks = dm.tasks
    assert len(tasks.classes["train"]) == 4 * sizes[0] and len(tasks.classes["val"]) == sizes[1]
    base = {s: set((tasks.classes[s] // 4).tolist()) for s in ("train", "val", "test")}
    assert base["train"].isdisjoint(base["val"]) and base["train"].isdisjoint(base["test"]) and base["val"].isdisjoint(base["test"])
    if protocol == "lake":
        assert all(characters[c].startswith("images_evaluation/") for c in base["test"])
    else:
        assert {characters[c].split("/")[1] for c in base["val"]} == set(omniglot.VAL_ALPHABETS)


def test_real_rotated_classes_hold_rotated_drawings(real_cache: dict[str, str]) -> None:
    dm = real_dm(real_cache, ways=20, shots=2, queries=1)
    tasks = dm.tasks
    images = tasks.images
    ids = tasks.episode_classes("train", [0, 1], seed=0)
    batch = tasks.sample("train", [0, 1], seed=0)
    turns = set()
    for t in range(2):
        for x, y in zip(batch.support_x[t], batch.support_y[t]):
            c, r = divmod(int(ids[t, y]), 4)
            members = images[c * 20 : (c + 1) * 20]
            assert any(torch.equal(torch.rot90(m, r, dims=(-2, -1)), x) for m in members)
            turns.add(r)
    assert turns == {0, 1, 2, 3}


def test_real_episodes_identical_across_builds_from_the_cache(real_cache: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    a = real_dm(real_cache)
    monkeypatch.setattr(omniglot, "decode", lambda *args, **kwargs: pytest.fail("the second build decoded again"))
    b = real_dm(real_cache)
    for split in ("train", "val", "test"):
        x, y = a.tasks.sample(split, [0, 7, 599], 3), b.tasks.sample(split, [0, 7, 599], 3)
        assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_x, y.query_x)


def test_real_ranks_draw_disjoint_tasks_and_eval_tasks_are_fixed(real_cache: dict[str, str]) -> None:
    dm = real_dm(real_cache, ways=5, shots=1, queries=5)
    whole = TrainEpisodes(dm.tasks, seed=0, meta_batch=8, rank=0, world_size=1)[2]
    ranks = [TrainEpisodes(dm.tasks, seed=0, meta_batch=8, rank=r, world_size=2)[2] for r in (0, 1)]
    assert set(ranks[0].task_ids.tolist()).isdisjoint(ranks[1].task_ids.tolist())
    assert not torch.equal(ranks[0].support_x, ranks[1].support_x)
    assert torch.equal(torch.cat([r.support_x for r in ranks]), whole.support_x)
    other_seed = real_dm(real_cache, seed=1, ways=5, shots=1, queries=5)
    assert torch.equal(next(iter(dm.test_dataloader())).query_x, next(iter(other_seed.test_dataloader())).query_x)
    assert not torch.equal(next(iter(dm.train_dataloader())).query_x, next(iter(other_seed.train_dataloader())).query_x)


def test_real_protonet_style_specs_and_impossible_ones(real_cache: dict[str, str]) -> None:
    dm = real_dm(real_cache, ways=60, shots=5, queries=5, eval_ways=20, eval_shots=1, eval_queries=15, meta_batch_size=2)
    info = dm.task_info()
    assert (info.in_shape, info.train_ways, info.eval_ways) == ((1, 28, 28), 60, 20)
    train, test = dm.tasks.sample("train", [0, 1], 0), dm.tasks.sample("test", [0], 0)
    assert train.support_x.shape == (2, 300, 1, 28, 28) and test.query_x.shape == (1, 300, 1, 28, 28)
    flat = dm.flat_train_dataset()
    assert flat.num_classes == 4112 and len(flat) == 4112 * 20
    with pytest.raises(ConfigError, match=r"data\.eval_ways=200 exceeds the 172 classes of the 'val' split"):
        real_dm(real_cache, ways=200)
    with pytest.raises(ConfigError, match=r"data\.shots \+ data\.queries = 5 \+ 16 = 21 exceeds the 20 images"):
        real_dm(real_cache, shots=5, queries=16, eval_queries=10)
