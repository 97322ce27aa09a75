"""``python -m lightmeta {fit,validate,test,list,config,report}``.

Bad input (config, names, paths) prints one ``error:`` line and exits with code 2 (1 for
other user-facing failures), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from lightmeta.errors import LightmetaError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML file or shipped config name (default: maml/sinusoid)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="config overrides, e.g. algorithm.inner_lr=0.4 trainer.max_steps=100 data=sinusoid")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lightmeta", description="Meta-learning on PyTorch Lightning.")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="meta-train, then evaluate the best checkpoint on meta-test")
    _add_config_args(fit)
    fit.add_argument("--ckpt", help="resume training from this checkpoint ('last': the experiment's newest last.ckpt)")
    fit.add_argument("--no-test", action="store_true", help="skip the final meta-test evaluation")
    for name, help_ in (("validate", "evaluate a checkpoint on the meta-validation tasks"),
                        ("test", "evaluate a checkpoint on the meta-test tasks")):
        p = sub.add_parser(name, help=help_)
        _add_config_args(p)
        p.add_argument("--ckpt", required=True, help="checkpoint written by fit")
    lst = sub.add_parser("list", help="registered plug-ins with their hyperparameters and defaults")
    lst.add_argument("kind", nargs="?", choices=["algorithms", "datamodules", "models", "configs"])
    cfg = sub.add_parser("config", help="print the resolved config as YAML")
    _add_config_args(cfg)
    cfg.add_argument("--schema", action="store_true", help="print the JSON schema of run configs instead")
    rep = sub.add_parser("report", help="compare the meta-test results of runs: markdown table and PNG bar chart")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by fit or test")
    rep.add_argument("--metric", help="metric to compare, e.g. acc, loss, acc_step0 (default: acc, or loss for regression)")
    rep.add_argument("--out", default=".", help="folder for report.md and report.png (default: current folder)")
    return parser


def _describe_field(name: str, field: FieldInfo) -> str:
    if field.default is not PydanticUndefined:
        default = field.default
    elif field.default_factory is not None:
        default = field.default_factory()  # type: ignore[call-arg]
    else:
        default = "(required)"
    ann = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
    line = f"    {name}: {ann} = {json.dumps(default, default=str)}"
    return line + (f"  # {field.description}" if field.description else "")


def cmd_list(kind: str | None) -> None:
    from lightmeta.config import shipped_config_names
    from lightmeta.registry import ALGORITHMS, DATAMODULES, MODELS

    for title, registry in (("algorithms", ALGORITHMS), ("datamodules", DATAMODULES), ("models", MODELS)):
        if kind not in (None, title):
            continue
        print(f"{title}:")
        for name, cls in registry.items():
            doc = (cls.__doc__ or "").strip().splitlines()
            print(f"  {name}  ({cls.__module__}.{cls.__qualname__})" + (f": {doc[0]}" if doc else ""))
            for fname, field in cls.Config.model_fields.items():
                print(_describe_field(fname, field))
        print()
    if kind in (None, "configs"):
        print("configs:")
        for name in shipped_config_names():
            print(f"  {name}")


def _resolve(args: argparse.Namespace, ckpt: str | None = None) -> Any:
    from lightmeta.config import load_config
    from lightmeta.runner import read_checkpoint_meta

    base = None
    if ckpt is not None and args.config is None:
        base = read_checkpoint_meta(ckpt).get("run_config")
    return load_config(args.config, args.overrides, base=base)


def _report(run: Any, results: Any) -> None:
    if not run.trainer.is_global_zero:
        return  # one table per run, from rank 0
    if run.stopped_at is not None:
        print(f"\nstopped at step {run.trainer.global_step}; resumable checkpoint: {run.stopped_at}")
        print(f"resume with: python -m lightmeta fit --ckpt {run.stopped_at} (or --ckpt last with the same config)")
    if results is not None:
        print()
        print(results.table())
    print(f"\nrun directory: {run.run_dir}")
    if run.wandb_sync_dir is not None:
        print(f"W&B ran offline; upload the run with: wandb sync {run.wandb_sync_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            cmd_list(args.kind)
        elif args.command == "config":
            from lightmeta.config import config_to_yaml, json_schema

            if args.schema:
                print(json.dumps(json_schema(), indent=2))
            else:
                print(config_to_yaml(_resolve(args)), end="")
        elif args.command == "report":
            from lightmeta.report import report

            text, md_path, png_path = report(args.run_dirs, args.out, args.metric)
            print(text)
            print(f"\nwritten: {md_path}, {png_path}")
        elif args.command == "fit":
            from lightmeta.runner import fit

            cfg = _resolve(args)
            run, results = fit(cfg, ckpt_path=args.ckpt, test=not args.no_test)
            _report(run, results)
        else:
            from lightmeta.runner import evaluate

            cfg = _resolve(args, ckpt=args.ckpt)
            run, results = evaluate(cfg, args.command, args.ckpt)
            _report(run, results)
    except LightmetaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
