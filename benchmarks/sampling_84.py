"""Episode sampling throughput at benchmark size: lightmeta's engine vs learn2learn's TaskDataset.

The data is a mini-ImageNet-sized fixture: 100 classes x 600 images of 3x84x84 ``uint8``
(1.27 GB, random pixels), classes 0-63 for meta-training. Both samplers draw 5-way 1-shot
15-query training episodes from those 64 classes, in the same process, on the same tensor:

* **lightmeta**: :class:`lightmeta.classification.ClassificationTasks` (``ClassImages`` built
  with ``from_counts``), ``sample("train", task_ids, seed)``: one call per meta-batch returns
  support and query sets as ``float32`` in [0, 1] (at this size the cache stays ``uint8``, so
  the conversion happens per batch, as it does on the real mini-ImageNet);
* **learn2learn**: ``TaskDataset(MetaDataset(ds), [NWays(5), KShots(16), LoadData, RemapLabels])``
  with ``ds[i]`` returning ``(images[i].float() / 255, label)``, the same conversion; one
  ``sample()`` per episode (``MetaDataset`` gets the label index precomputed, so its setup scan
  is not timed, and the support/query split it leaves to the caller is not charged to it).

``torch.set_num_threads(1)`` for both: one core each, so the comparison does not depend on how
many cores the machine has or what else runs on it, and repeated runs agree. Throughput is
episodes per second over ``--seconds`` of sampling per sampler after a warm-up, measured in
``--rounds`` alternating slices so that load changes on the machine hit every sampler alike.
Prints a table and writes
``benchmarks/results/sampling_84.json``.

    python benchmarks/sampling_84.py            # about half a minute and 1.3 GB of memory
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from lightmeta.classification import ClassificationTasks, ClassImages
from lightmeta.episodes import EpisodeSpec

RESULTS = Path(__file__).resolve().parent / "results" / "sampling_84.json"
TARGET = 10.0  # the acceptance target: lightmeta >= 10x learn2learn's episodes/s


def fixture(classes: int, per_class: int, size: int, seed: int = 0) -> torch.Tensor:
    """``uint8 [classes * per_class, 3, size, size]`` random images, class after class."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (classes * per_class, 3, size, size), dtype=torch.uint8, generator=g)


def interleaved(draws: dict[str, Callable[[int], int]], seconds: float, rounds: int, warmup: int = 3) -> dict[str, tuple[float, int]]:
    """Episodes per second of each ``draw(i) -> episodes drawn``, measured in ``rounds``
    alternating slices of ``seconds / rounds`` each, so a change in machine load during the
    run affects every sampler alike. Returns ``{name: (episodes per second, episodes)}``."""
    counters = {name: [0, 0.0, warmup] for name in draws}  # episodes, seconds, next call index
    for name, draw in draws.items():
        for i in range(warmup):
            draw(i)
    for _ in range(rounds):
        for name, draw in draws.items():
            c = counters[name]
            start = time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                c[0] += draw(c[2])
                c[2] += 1
            c[1] += time.perf_counter() - start
    return {name: (c[0] / c[1], c[0]) for name, c in counters.items()}


def lightmeta_sampler(images: torch.Tensor, classes: int, per_class: int, train: int, spec: EpisodeSpec) -> ClassificationTasks:
    splits = {"train": range(train), "val": range(train, train + (classes - train) // 2),
              "test": range(train + (classes - train) // 2, classes)}
    data = ClassImages.from_counts(images, [per_class] * classes, {k: list(v) for k, v in splits.items()})
    return ClassificationTasks(data, spec, spec)


def learn2learn_taskset(images: torch.Tensor, per_class: int, train: int, spec: EpisodeSpec):  # noqa: ANN201 (peer type)
    import learn2learn as l2l
    from learn2learn.data.transforms import KShots, LoadData, NWays, RemapLabels

    class Images(torch.utils.data.Dataset):
        """The training classes' images as (float32 image in [0, 1], label) pairs."""

        def __len__(self) -> int:
            return train * per_class

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return images[i].float().div_(255), i // per_class

    labels_to_indices = {c: list(range(c * per_class, (c + 1) * per_class)) for c in range(train)}
    meta = l2l.data.MetaDataset(Images(), labels_to_indices=labels_to_indices)
    transforms = [NWays(meta, spec.ways), KShots(meta, spec.shots + spec.queries), LoadData(meta), RemapLabels(meta)]
    return l2l.data.TaskDataset(meta, task_transforms=transforms, num_tasks=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--size", type=int, default=84)
    parser.add_argument("--train-classes", type=int, default=64)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--meta-batch", type=int, default=4, help="tasks per lightmeta call in the batched row")
    parser.add_argument("--seconds", type=float, default=6.0, help="sampling time per row, over all rounds")
    parser.add_argument("--rounds", type=int, default=6, help="alternating measurement rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(1)  # one core for each sampler: fair and stable
    spec = EpisodeSpec(args.ways, args.shots, args.queries)
    images = fixture(args.classes, args.per_class, args.size)
    ours = lightmeta_sampler(images, args.classes, args.per_class, args.train_classes, spec)
    draws: dict[str, Callable[[int], int]] = {}
    for batch in (1, args.meta_batch):
        name = f"lightmeta ClassificationTasks ({batch} task{'s' if batch > 1 else ''} per call)"
        draws[name] = lambda i, b=batch: len(ours.sample("train", list(range(i * b, (i + 1) * b)), 0))
    peer = "learn2learn TaskDataset (NWays, KShots, LoadData, RemapLabels)"
    try:
        taskset = learn2learn_taskset(images, args.per_class, args.train_classes, spec)
        draws[peer] = lambda i: (taskset.sample(), 1)[1]
    except ImportError as exc:
        print(f"learn2learn is not importable ({exc}); only lightmeta was measured")
    load_before = os.getloadavg()[0]
    measured = interleaved(draws, args.seconds, args.rounds)
    rows: list[dict[str, object]] = [{"sampler": name, "episodes_per_s": rate, "episodes": n} for name, (rate, n) in measured.items()]
    baseline = measured[peer][0] if peer in measured else None
    for row in rows:
        row["speedup_vs_learn2learn"] = row["episodes_per_s"] / baseline if baseline else None
    width = max(len(str(r["sampler"])) for r in rows)
    print(f"\n{args.ways}-way {args.shots}-shot {args.queries}-query episodes from {args.train_classes} of {args.classes} classes "
          f"x {args.per_class} images of 3x{args.size}x{args.size} uint8; torch.set_num_threads(1)\n")
    print(f"{'sampler':<{width}}  {'episodes/s':>11}  {'vs learn2learn':>14}")
    for r in rows:
        speed = f"{r['speedup_vs_learn2learn']:.1f}x" if r["speedup_vs_learn2learn"] else "-"
        print(f"{r['sampler']:<{width}}  {r['episodes_per_s']:>11.1f}  {speed:>14}")
    best = max((r["speedup_vs_learn2learn"] or 0.0) for r in rows)
    if baseline:
        print(f"\nbest speed-up {best:.1f}x: {'meets' if best >= TARGET else 'MISSES'} the >= {TARGET:.0f}x target "
              f"(1-minute load average {load_before:.1f} on {os.cpu_count()} cores before the run)")
    result = {
        "benchmark": "sampling_84", "target_speedup": TARGET, "best_speedup": best if baseline else None,
        "load_average_before": load_before, "cpu_count": os.cpu_count(), "data": {"classes": args.classes, "images_per_class": args.per_class,
                                             "shape": [3, args.size, args.size], "dtype": "uint8", "train_classes": args.train_classes},
        "episode": {"ways": args.ways, "shots": args.shots, "queries": args.queries}, "threads": 1,
        "seconds_per_row": args.seconds, "rounds": args.rounds, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
