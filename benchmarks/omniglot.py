"""Omniglot benchmark (issue 3): episode sampling and MAML meta-step, lightmeta vs learn2learn.

(a) Episodes/s of our sampler vs learn2learn's ``TaskDataset`` with
    ``NWays, KShots, LoadData, RemapLabels`` over the same in-memory Omniglot tensors
    (5w1s15q and 20w5s15q), side by side in one process.
(b) Seconds per second-order MAML meta-step (Conv4, 5w1s15q, meta-batch 32): ours vs
    learn2learn's ``MAML`` on the same model and episodes (gradients compared), and a plain
    supervised forward/backward of the same images (the floor).

Usage: python benchmarks/omniglot.py [--data ../shared/data/omniglot] [--device cpu|cuda] [--threads N]
Prints a table and writes benchmarks/results/omniglot_<device>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from lightmeta import ALGORITHMS, EpisodeSpec
from lightmeta.classification import ClassificationTasks
from lightmeta.datamodules.omniglot import OmniglotDataModule

from _common import batch_to, hardware as describe_hardware, timed


def sampling(data, l2l, ways: int, shots: int, queries: int, episodes: int) -> dict:
    spec = EpisodeSpec(ways, shots, queries)
    ours = ClassificationTasks(data, spec, spec, rotations="none")
    batch = 32
    counter = iter(range(10**9))

    def ours_batch():
        start = next(counter) * batch
        ours.sample("train", list(range(start, start + batch)), seed=0)

    def ours_single():
        ours.sample("train", [next(counter)], seed=0)

    train = data.splits["train"]
    index = torch.cat([data.members[c] for c in train.tolist()])
    labels = torch.cat([torch.full((len(data.members[c]),), i) for i, c in enumerate(train.tolist())])
    images = data.images[index].float() / 255.0 if data.images.dtype == torch.uint8 else data.images[index]
    meta = l2l.data.MetaDataset(torch.utils.data.TensorDataset(images, labels))
    tasks = l2l.data.TaskDataset(meta, task_transforms=[
        l2l.data.transforms.NWays(meta, ways), l2l.data.transforms.KShots(meta, shots + queries),
        l2l.data.transforms.LoadData(meta), l2l.data.transforms.RemapLabels(meta)], num_tasks=-1)

    reps = max(1, episodes // batch)
    t_ours = timed(ours_batch, reps) / batch
    t_single = timed(ours_single, episodes // 4)
    t_l2l = timed(lambda: tasks.sample(), max(5, episodes // 8))
    return {"setting": f"{ways}w{shots}s{queries}q", "ours_episodes_per_s": 1 / t_ours,
            "ours_single_task_episodes_per_s": 1 / t_single, "learn2learn_episodes_per_s": 1 / t_l2l,
            "speedup": t_l2l / t_ours}


def maml_step(data, l2l, device: str, meta_batch: int, repeats: int) -> dict:
    spec = EpisodeSpec(5, 1, 15)
    sampler = ClassificationTasks(data, spec, spec, rotations="train")
    batch = sampler.sample("train", list(range(meta_batch)), seed=0)
    batch = batch_to(batch, device)
    task = {"problem": "classification", "in_shape": list(batch.support_x.shape[2:]), "train_ways": 5, "eval_ways": 5}
    learner = ALGORITHMS.get("maml")({"inner_lr": 0.4, "inner_steps": 1}, model={"name": "conv4"}, task=task).to(device)
    learner.train()
    ref_model = copy.deepcopy(learner.model)
    maml = l2l.algorithms.MAML(ref_model, lr=0.4, first_order=False)

    def ours():
        learner.zero_grad(set_to_none=True)
        learner.meta_loss(batch)[0].backward()

    def theirs():
        maml.zero_grad(set_to_none=True)
        total = 0.0
        for t in batch.tasks():
            clone = maml.clone()
            clone.adapt(F.cross_entropy(clone(t.support_x), t.support_y))
            total = total + F.cross_entropy(clone(t.query_x), t.query_y)
        (total / len(batch)).backward()

    images = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
    targets = torch.cat([batch.support_y.flatten(), batch.query_y.flatten()])
    floor_model = copy.deepcopy(learner.model)

    def floor():
        floor_model.zero_grad(set_to_none=True)
        F.cross_entropy(floor_model(images), targets).backward()

    t_ours = timed(ours, repeats, device=device)
    t_l2l = timed(theirs, repeats, device=device)
    t_floor = timed(floor, repeats, device=device)
    ours()
    theirs()
    rel = max(((p.grad - q.grad).norm() / q.grad.norm()).item()
              for p, q in zip(learner.model.parameters(), ref_model.parameters()))
    return {"setting": f"MAML 2nd order, Conv4, 5w1s15q, meta-batch {meta_batch}",
            "ours_s_per_step": t_ours, "learn2learn_s_per_step": t_l2l, "supervised_floor_s": t_floor,
            "ratio_ours_over_l2l": t_ours / t_l2l, "max_rel_grad_diff": rel}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/omniglot")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--episodes", type=int, default=512)
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import learn2learn as l2l

    params = {"root": args.data}
    if args.cache_dir:
        params["cache_dir"] = args.cache_dir
    data = OmniglotDataModule(params).load_classes()
    rows = [sampling(data, l2l, 5, 1, 15, args.episodes), sampling(data, l2l, 20, 5, 15, args.episodes)]
    step = maml_step(data, l2l, args.device, args.meta_batch, args.repeats)
    hardware = describe_hardware(args.device)
    print(f"\nOmniglot benchmark on {hardware} (torch {torch.__version__})\n")
    print("| sampling | ours (episodes/s, meta-batch 32 per call) | ours (1 task per call) | learn2learn TaskDataset | speedup |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['ours_episodes_per_s']:,.0f} | {r['ours_single_task_episodes_per_s']:,.0f} | "
              f"{r['learn2learn_episodes_per_s']:,.0f} | {r['speedup']:.1f}x |")
    print("\n| meta-step | ours (s) | learn2learn (s) | supervised floor (s) | ours / l2l | max rel. grad diff |")
    print("|---|---|---|---|---|---|")
    print(f"| {step['setting']} | {step['ours_s_per_step']:.3f} | {step['learn2learn_s_per_step']:.3f} | "
          f"{step['supervised_floor_s']:.3f} | {step['ratio_ours_over_l2l']:.2f} | {step['max_rel_grad_diff']:.1e} |")
    out = Path(__file__).parent / "results" / f"omniglot_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"hardware": hardware, "torch": torch.__version__, "sampling": rows, "maml_step": step}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
