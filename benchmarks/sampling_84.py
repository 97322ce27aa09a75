"""Episode sampling throughput at benchmark size: lightmeta's engine vs learn2learn's TaskDataset.

The data is a mini-ImageNet-sized fixture: 100 classes x 600 images of 3x84x84 ``uint8``
(1.27 GB, random pixels), classes 0-63 for meta-training. Every sampler draws 5-way 1-shot
15-query training episodes from those 64 classes, in the same process, on the same tensor:

* **lightmeta** :class:`lightmeta.classification.ClassificationTasks`, one call per meta-batch,
  in each ``data.episode_transfer`` mode, measured in two parts where the mode splits the work:

  - ``float``: ``sample("train", task_ids, seed)`` builds the episodes in the DataLoader as
    ``float32`` in [0, 1] (at this size the cache stays ``uint8``, so the conversion happens per
    batch, as on the real mini-ImageNet); what the loader delivers is what a step receives;
  - ``uint8``, *loader*: ``plan(...)``, what the DataLoader delivers: every draw made and the
    ``uint8`` pixels gathered (4x fewer bytes than float32 to move to an accelerator);
    *full*: ``build(plan(...))`` adds what the datamodule's ``on_after_batch_transfer`` does on
    the training device (float conversion), here on this CPU: what a CPU training step receives;
  - ``indices``, *loader*: ``plan(...)`` with the draws only (the dataset lives on the device);
    *full*: ``build(plan, images)`` adds the gather and the conversion, here on this CPU;
  - with ``--device cuda``, the full rows also move the loader's output to that device and
    build there (synchronised), as a training step on it would receive the episodes;

* **learn2learn**: ``TaskDataset(MetaDataset(ds), [NWays(5), KShots(16), LoadData, RemapLabels])``
  with ``ds[i]`` returning ``(images[i].float() / 255, label)``, the same conversion; one
  ``sample()`` per episode (``MetaDataset`` gets the label index precomputed, so its setup scan
  is not timed, and the support/query split it leaves to the caller is not charged to it). A
  second row has ``ds[i]`` return the ``uint8`` image, leaving the conversion to the caller as
  lightmeta's ``uint8`` loader row does, so loader rows can be compared like with like.

``torch.set_num_threads(1)`` for all: one core each, so the comparison does not depend on how
many cores the machine has or what else runs on it, and repeated runs agree. Throughput is
episodes per second over ``--seconds`` of sampling per sampler after a warm-up, measured in
``--rounds`` alternating slices so that load changes on the machine hit every sampler alike.
Prints a table and writes ``benchmarks/results/sampling_84.json``.

    python benchmarks/sampling_84.py            # about a minute and 1.3 GB of memory
    python benchmarks/sampling_84.py --device cuda   # full rows built on the GPU
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

from lightmeta.classification import ClassificationTasks, ClassImages, EpisodeTransfer
from lightmeta.episodes import EpisodeSpec

from _common import fixture

RESULTS = Path(__file__).resolve().parent / "results" / "sampling_84.json"
TARGET = 10.0  # the acceptance target: lightmeta >= 10x learn2learn's episodes/s
PEER = "learn2learn TaskDataset, float32 images"
PEER_UINT8 = "learn2learn TaskDataset, uint8 images (conversion left to the caller)"


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


def lightmeta_samplers(images: torch.Tensor, classes: int, per_class: int, train: int,
                       spec: EpisodeSpec) -> dict[EpisodeTransfer, ClassificationTasks]:
    """One sampler per ``data.episode_transfer`` mode, all on the same ``uint8`` tensor."""
    splits = {"train": range(train), "val": range(train, train + (classes - train) // 2),
              "test": range(train + (classes - train) // 2, classes)}
    data = ClassImages.from_counts(images, [per_class] * classes, {k: list(v) for k, v in splits.items()})
    return {mode: ClassificationTasks(data, spec, spec, transfer=mode) for mode in ("float", "uint8", "indices")}


def lightmeta_draws(samplers: dict[EpisodeTransfer, ClassificationTasks], meta_batch: int,
                    device: torch.device) -> dict[str, Callable[[int], int]]:
    """The lightmeta rows: ``float`` (1 and ``meta_batch`` tasks per call), then the loader and
    the full part of ``uint8`` and ``indices`` (``meta_batch`` tasks per call)."""
    cpu = device.type == "cpu"
    where = "this CPU" if cpu else str(device)
    resident = samplers["indices"].images.to(device)  # the datamodule's copy on the training device

    def ids(i: int, b: int) -> list[int]:
        return list(range(i * b, (i + 1) * b))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def full(mode: EpisodeTransfer, b: int) -> Callable[[int], int]:
        def draw(i: int) -> int:
            tasks = samplers[mode]
            plan = tasks.plan("train", ids(i, b), 0)
            batch = tasks.build(plan.to(device), resident if mode == "indices" else None)
            sync()
            return len(batch)
        return draw

    def float_episodes(b: int) -> Callable[[int], int]:
        def draw(i: int) -> int:
            batch = samplers["float"].sample("train", ids(i, b), 0)
            if not cpu:
                batch.support_x.to(device), batch.query_x.to(device)
                sync()
            return len(batch)
        return draw

    m = meta_batch
    rows: dict[str, Callable[[int], int]] = {}
    for b in (1, m):
        rows[f"float: loader builds float32 episodes{'' if cpu else f', moved to {where}'} ({b}/call)"] = float_episodes(b)
    rows[f"uint8, loader: draws + uint8 gather ({m}/call)"] = lambda i: len(samplers["uint8"].plan("train", ids(i, m), 0))
    rows[f"uint8, full: + float conversion on {where} ({m}/call)"] = full("uint8", m)
    rows[f"indices, loader: draws only ({m}/call)"] = lambda i: len(samplers["indices"].plan("train", ids(i, m), 0))
    rows[f"indices, full: + gather and conversion on {where} ({m}/call)"] = full("indices", m)
    return rows


def learn2learn_taskset(images: torch.Tensor, per_class: int, train: int, spec: EpisodeSpec, convert: bool = True):  # noqa: ANN201 (peer type)
    import learn2learn as l2l
    from learn2learn.data.transforms import KShots, LoadData, NWays, RemapLabels

    class Images(torch.utils.data.Dataset):
        """The training classes' images as (float32 image in [0, 1] or the uint8 image, label) pairs."""

        def __len__(self) -> int:
            return train * per_class

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return (images[i].float().div_(255) if convert else images[i]), i // per_class

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
    parser.add_argument("--meta-batch", type=int, default=4, help="tasks per lightmeta call in the batched rows")
    parser.add_argument("--device", default="cpu", help="where the full rows build the episodes (cpu, cuda, ...)")
    parser.add_argument("--seconds", type=float, default=6.0, help="sampling time per row, over all rounds")
    parser.add_argument("--rounds", type=int, default=6, help="alternating measurement rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(1)  # one core for each sampler: fair and stable
    device = torch.device(args.device)
    spec = EpisodeSpec(args.ways, args.shots, args.queries)
    images = fixture(args.classes, args.per_class, args.size)
    samplers = lightmeta_samplers(images, args.classes, args.per_class, args.train_classes, spec)
    draws = {f"lightmeta {name}": draw for name, draw in lightmeta_draws(samplers, args.meta_batch, device).items()}
    try:
        tasksets = {name: learn2learn_taskset(images, args.per_class, args.train_classes, spec, convert)
                    for name, convert in ((PEER, True), (PEER_UINT8, False))}
        for name, taskset in tasksets.items():
            draws[name] = lambda i, t=taskset: (t.sample(), 1)[1]
    except ImportError as exc:
        print(f"learn2learn is not importable ({exc}); only lightmeta was measured")
    load_before = os.getloadavg()[0]
    measured = interleaved(draws, args.seconds, args.rounds)
    rows: list[dict[str, object]] = [{"sampler": name, "episodes_per_s": rate, "episodes": n} for name, (rate, n) in measured.items()]
    baseline = measured[PEER][0] if PEER in measured else None
    for row in rows:
        row["speedup_vs_learn2learn"] = row["episodes_per_s"] / baseline if baseline else None
    width = max(len(str(r["sampler"])) for r in rows)
    print(f"\n{args.ways}-way {args.shots}-shot {args.queries}-query episodes from {args.train_classes} of {args.classes} classes "
          f"x {args.per_class} images of 3x{args.size}x{args.size} uint8; torch.set_num_threads(1); device {device}\n")
    print(f"{'sampler':<{width}}  {'episodes/s':>11}  {'vs learn2learn float32':>22}")
    for r in rows:
        speed = f"{r['speedup_vs_learn2learn']:.1f}x" if r["speedup_vs_learn2learn"] else "-"
        print(f"{r['sampler']:<{width}}  {r['episodes_per_s']:>11.1f}  {speed:>22}")

    def rate(prefix: str) -> float:
        return max(rate for name, (rate, _) in measured.items() if name.startswith(prefix))

    summary: dict[str, float | None] = {}
    if baseline:
        summary = {
            "float_episodes_vs_learn2learn": rate("lightmeta float") / baseline,
            "uint8_loader_vs_learn2learn": rate("lightmeta uint8, loader") / baseline,
            "uint8_loader_vs_learn2learn_uint8": rate("lightmeta uint8, loader") / measured[PEER_UINT8][0],
            "uint8_full_vs_learn2learn": rate("lightmeta uint8, full") / baseline,
            "indices_full_vs_learn2learn": rate("lightmeta indices, full") / baseline,
        }
        print(f"\nvs learn2learn (target >= {TARGET:.0f}x): float32 episodes from the loader {summary['float_episodes_vs_learn2learn']:.1f}x; "
              f"uint8 loader {summary['uint8_loader_vs_learn2learn']:.1f}x ({summary['uint8_loader_vs_learn2learn_uint8']:.1f}x "
              f"vs learn2learn on uint8 too); uint8 full path incl. conversion on {device} {summary['uint8_full_vs_learn2learn']:.1f}x; "
              f"indices full path on {device} {summary['indices_full_vs_learn2learn']:.1f}x")
        print(f"(1-minute load average {load_before:.1f} on {os.cpu_count()} cores before the run)")
    result = {
        "benchmark": "sampling_84", "target_speedup": TARGET, "summary": summary, "device": str(device),
        "load_average_before": load_before, "cpu_count": os.cpu_count(), "data": {"classes": args.classes, "images_per_class": args.per_class,
                                             "shape": [3, args.size, args.size], "dtype": "uint8", "train_classes": args.train_classes},
        "episode": {"ways": args.ways, "shots": args.shots, "queries": args.queries}, "threads": 1, "meta_batch": args.meta_batch,
        "seconds_per_row": args.seconds, "rounds": args.rounds, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
