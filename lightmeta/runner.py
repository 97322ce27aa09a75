"""Builds a run from a validated :class:`RunConfig`: datamodule, learner, loggers, trainer.

The CLI subcommands ``fit``, ``validate`` and ``test`` are thin wrappers around the
functions here, so a Python user gets the same behaviour without the command line.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightmeta.checkpointing import GracefulStop, LastCheckpoint, SafeCheckpointIO, resolve_checkpoint, safe_load
from lightmeta.config import RunConfig, config_to_yaml
from lightmeta.dashboard import dashboard_callbacks
from lightmeta.datamodule import EpisodicDataModule
from lightmeta.errors import ConfigError, LightmetaError
from lightmeta.meta_learner import MetaLearner
from lightmeta.registry import ALGORITHMS, DATAMODULES
from lightmeta.results import Results


@dataclass
class Run:
    """Everything a fit/validate/test needs, built from one config."""

    config: RunConfig
    datamodule: EpisodicDataModule
    learner: MetaLearner
    trainer: L.Trainer
    run_dir: Path
    wandb_sync_dir: Path | None = None
    published_run_dir: bool = False  # this process set RUN_DIR_ENV for its DDP processes

    @property
    def stopped_at(self) -> Path | None:
        """The resumable checkpoint written when SIGTERM or Ctrl-C stopped training, if any."""
        for cb in self.trainer.callbacks:
            if isinstance(cb, GracefulStop):
                return cb.stopped_at
        return None

    def finish(self) -> None:
        """Close loggers that hold a process or file open (W&B), remembering where offline runs are;
        unpublish the run directory so a later run in this process gets its own."""
        if self.published_run_dir:
            os.environ.pop(RUN_DIR_ENV, None)
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                experiment = logger.experiment
                if experiment.settings.mode in ("offline", "dryrun"):  # `wandb sync` takes the run folder
                    self.wandb_sync_dir = Path(experiment.dir).parent
                experiment.finish()


def build_datamodule(cfg: RunConfig) -> EpisodicDataModule:
    cls = DATAMODULES.get(cfg.data.name)
    return cls(cls.Config.model_validate(cfg.params("data")), seed=cfg.seed)


def build_learner(cfg: RunConfig, datamodule: EpisodicDataModule) -> MetaLearner:
    cls = ALGORITHMS.get(cfg.algorithm.name)
    info = datamodule.task_info()
    if info.problem not in cls.problems:
        raise ConfigError(
            f"algorithm '{cfg.algorithm.name}' supports {' and '.join(cls.problems)} tasks, but data "
            f"'{cfg.data.name}' is {info.problem}; choose another algorithm or datamodule"
        )
    if cls.uses_head and info.problem == "classification" and info.train_ways != info.eval_ways:
        raise ConfigError(
            f"algorithm '{cfg.algorithm.name}' has a {info.train_ways}-way classifier head but evaluation "
            f"episodes are {info.eval_ways}-way; set the data's evaluation ways equal to its training ways"
        )
    if cls.training_data == "flat":  # pre-training head: one output per meta-training class
        datamodule.setup("fit")
        info = info.model_copy(update={"train_classes": datamodule.flat_train_dataset().num_classes})
    learner = cls(cfg.params("algorithm"), model=cfg.model.model_dump(), task=info)
    learner.run_config = cfg.to_dict()
    learner.on_nonfinite = cfg.trainer.on_nonfinite
    return learner


# The run directory holds config.yaml before the CSV logger starts; its warning about that is noise.
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")

RUN_DIR_ENV = "LIGHTMETA_RUN_DIR"
#: Ids shared by all processes of one job started by an external launcher (torchrun, SLURM).
_JOB_ID_ENVS = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")


def next_run_dir(cfg: RunConfig) -> Path:
    """The run directory, the same for every process of a distributed run (created).

    ``$LIGHTMETA_RUN_DIR`` if set (Lightning's DDP child processes inherit it from rank 0);
    ``output_dir/experiment/job_<id>`` under torchrun or SLURM; else ``version_N`` with the
    first free N.
    """
    if os.environ.get(RUN_DIR_ENV):
        run_dir = Path(os.environ[RUN_DIR_ENV])
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    root = Path(cfg.output_dir) / cfg.experiment
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output_dir={cfg.output_dir!r} is not writable ({exc.strerror}); choose another output_dir") from None
    job = next((os.environ[k] for k in _JOB_ID_ENVS if os.environ.get(k) and os.environ.get("WORLD_SIZE", "1") != "1"), None)
    if job is not None:
        run_dir = root / f"job_{job}"
        run_dir.mkdir(exist_ok=True)
        return run_dir
    n = 0
    while (root / f"version_{n}").exists():
        n += 1
    run_dir = root / f"version_{n}"
    try:
        run_dir.mkdir()
    except OSError as exc:
        raise ConfigError(f"cannot create the run directory {run_dir} ({exc.strerror}); "
                          "choose a writable output_dir") from None
    return run_dir


def wandb_has_credentials() -> bool:
    """True when a W&B API key is configured (env var or netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def build_loggers(cfg: RunConfig, run_dir: Path) -> list[Logger]:
    lc = cfg.logger
    if lc.name == "none":
        return []
    csv = CSVLogger(save_dir=str(run_dir.parent.parent), name=cfg.experiment, version=run_dir.name)
    if lc.name == "csv":
        return [csv]
    offline = lc.offline if lc.offline is not None else not wandb_has_credentials()
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
    data = cfg.data
    tags = [cfg.algorithm.name, data.name, *lc.tags]
    if hasattr(data, "ways"):
        tags.append(f"{data.ways}-way")
    if hasattr(data, "shots"):
        tags.append(f"{data.shots}-shot")
    wandb_logger = WandbLogger(
        project=lc.project,
        entity=lc.entity,
        name=f"{cfg.experiment}/{run_dir.name}",
        group=cfg.experiment,
        save_dir=str(run_dir),
        # WandbLogger refuses log_model with offline=True; wandb.init's mode keeps the run offline
        # and `wandb sync` uploads its checkpoint artifacts later
        offline=offline and not lc.log_model,
        mode="offline" if offline else None,
        log_model=lc.log_model,
        tags=tags,
        config=cfg.to_dict(),
    )
    return [csv, wandb_logger]


def check_precision(cfg: RunConfig, learner: MetaLearner) -> None:
    """Refuse fp16 mixed precision where inner-loop gradients would go unscaled."""
    if cfg.trainer.precision in ("16-mixed", "16-true") and learner.needs_grad_at_eval:
        raise ConfigError(
            f"trainer.precision={cfg.trainer.precision} is not supported by '{cfg.algorithm.name}': its inner-loop "
            "gradients are taken inside the step, outside the GradScaler's loss scaling, and can underflow in "
            "float16; use trainer.precision=bf16-mixed (same speed on Ampere+ GPUs, no scaling needed)"
        )


def build_trainer(cfg: RunConfig, learner: MetaLearner, run_dir: Path, loggers: list[Logger]) -> L.Trainer:
    t = cfg.trainer
    callbacks: list[Any] = []
    if cfg.checkpoint.enabled:
        metric, mode = learner.monitor
        callbacks.append(
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints",
                filename="best-{step}",
                monitor=metric,
                mode=mode,
                save_top_k=cfg.checkpoint.save_top_k,
                every_n_train_steps=cfg.checkpoint.every_n_train_steps,
                auto_insert_metric_name=False,
            )
        )
        if cfg.checkpoint.save_last:
            callbacks.append(LastCheckpoint(run_dir / "checkpoints", cfg.checkpoint.every_n_train_steps))
    callbacks.append(GracefulStop(run_dir / "checkpoints"))  # SIGTERM / Ctrl-C -> resumable last.ckpt
    callbacks.extend(dashboard_callbacks(cfg, run_dir))  # W&B media, PNG figures, overfitting monitor
    return L.Trainer(
        max_steps=t.max_steps,
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        num_sanity_val_steps=t.num_sanity_val_steps,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val,
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar,
        enable_checkpointing=cfg.checkpoint.enabled,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[SafeCheckpointIO()],  # atomic saves, weights-only loads
        default_root_dir=str(run_dir),
        # gradient-based learners adapt (take gradients) during validation and test
        inference_mode=not learner.needs_grad_at_eval,
        # episodes are already split across ranks by the datamodule
        use_distributed_sampler=False,
    )


def build_run(cfg: RunConfig, learner: MetaLearner | None = None) -> Run:
    """Seed everything, then build the datamodule, learner, run directory and trainer."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    learner = learner or build_learner(cfg, datamodule)
    check_precision(cfg, learner)  # before anything is written
    child = bool(os.environ.get(RUN_DIR_ENV))
    run_dir = next_run_dir(cfg)
    if not child:
        (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    trainer = build_trainer(cfg, learner, run_dir, build_loggers(cfg, run_dir))
    published = trainer.world_size > 1 and not child
    if published:
        os.environ[RUN_DIR_ENV] = str(run_dir)  # the DDP processes Lightning launches write here too
    return Run(cfg, datamodule, learner, trainer, run_dir, published_run_dir=published)


def _test_results(run: Run, n_tasks: int) -> Results:
    results = Results.from_metrics(run.learner.last_results.get("test", {}), run.config, n_tasks)
    if run.trainer.is_global_zero:
        results.save(run.run_dir)
    return results


def fit(cfg: RunConfig, ckpt_path: str | None = None, test: bool = True) -> tuple[Run, Results | None]:
    """Train; then evaluate the best (meta-validation) checkpoint on the meta-test tasks."""
    if ckpt_path is not None:
        ckpt_path = resolve_checkpoint(ckpt_path, cfg.output_dir, cfg.experiment)
        check_resumable(read_checkpoint_meta(ckpt_path), cfg, ckpt_path)
    run = build_run(cfg)
    try:
        try:
            run.trainer.fit(run.learner, datamodule=run.datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:
            if run.stopped_at is None:
                raise
            return run, None  # pre-empted: resume with fit --ckpt last
        if not test:
            return run, None
        best = _best_checkpoint(run)
        run.trainer.test(run.learner, datamodule=run.datamodule, ckpt_path=best, verbose=False)
        return run, _test_results(run, run.datamodule.config.test_tasks)
    finally:
        run.finish()


def _best_checkpoint(run: Run) -> str | None:
    for cb in run.trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.best_model_path:
            return cb.best_model_path
    return None


def load_learner(ckpt_path: str | Path) -> MetaLearner:
    """Rebuild the learner stored in a lightmeta checkpoint (weights-only loading)."""
    meta = read_checkpoint_meta(ckpt_path)
    cls = ALGORITHMS.get(meta["algorithm"])
    return cls.load_from_checkpoint(str(ckpt_path), map_location="cpu", weights_only=True)


def check_resumable(meta: dict[str, Any], cfg: RunConfig, ckpt_path: str | Path) -> None:
    """Refuse to resume a checkpoint whose algorithm or model differs from the config's."""
    stored = meta.get("run_config") or {}
    if meta["algorithm"] != cfg.algorithm.name:
        raise ConfigError(f"checkpoint '{ckpt_path}' holds algorithm '{meta['algorithm']}' but the config asks for "
                          f"'{cfg.algorithm.name}'; resume with algorithm={meta['algorithm']} or start a new run")
    for section in ("model", "data"):
        theirs, ours = stored.get(section), getattr(cfg, section).model_dump(mode="json")
        if theirs is not None and section == "model" and theirs != ours:
            raise ConfigError(f"checkpoint '{ckpt_path}' was trained with model {theirs} but the config has {ours}; "
                              "resume with the checkpoint's model settings or start a new run")
        if theirs is not None and section == "data" and theirs.get("name") != ours.get("name"):
            raise ConfigError(f"checkpoint '{ckpt_path}' was trained on data '{theirs.get('name')}' but the config "
                              f"has '{ours.get('name')}'; resume on the same datamodule or start a new run")


def read_checkpoint_meta(ckpt_path: str | Path) -> dict[str, Any]:
    """The ``lightmeta`` block of a checkpoint (algorithm name, run config); never runs pickled code."""
    path = Path(ckpt_path)
    ckpt = safe_load(path)
    meta = ckpt.get("lightmeta") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "algorithm" not in meta:
        raise LightmetaError(f"checkpoint '{path}' was not written by lightmeta (no 'lightmeta' block)")
    return meta


def evaluate(cfg: RunConfig, stage: Literal["validate", "test"], ckpt_path: str) -> tuple[Run, Results]:
    """Evaluate a checkpoint on the fixed meta-validation or meta-test tasks."""
    meta = read_checkpoint_meta(ckpt_path)
    if meta["algorithm"] != cfg.algorithm.name:
        raise ConfigError(
            f"checkpoint '{ckpt_path}' holds algorithm '{meta['algorithm']}' but the config asks for "
            f"'{cfg.algorithm.name}'; pass algorithm={meta['algorithm']} or another checkpoint"
        )
    learner = load_learner(ckpt_path)
    info = build_datamodule(cfg).task_info()
    if info.problem != learner.task_info.problem:
        raise ConfigError(f"checkpoint '{ckpt_path}' was trained on {learner.task_info.problem} tasks but data "
                          f"'{cfg.data.name}' is {info.problem}; evaluate it on a {learner.task_info.problem} datamodule")
    if learner.uses_head and info.problem == "classification" and learner.task_info.train_ways != info.eval_ways:
        raise ConfigError(f"checkpoint '{ckpt_path}' has a {learner.task_info.train_ways}-way classifier head but the "
                          f"config's evaluation episodes are {info.eval_ways}-way; set data.eval_ways="
                          f"{learner.task_info.train_ways}")
    run = build_run(cfg, learner=learner)
    try:
        if stage == "validate":
            run.trainer.validate(run.learner, datamodule=run.datamodule, verbose=False)
            split, n = "val", run.datamodule.config.val_tasks
        else:
            run.trainer.test(run.learner, datamodule=run.datamodule, verbose=False)
            split, n = "test", run.datamodule.config.test_tasks
    finally:
        run.finish()
    results = Results.from_metrics(run.learner.last_results.get(split, {}), cfg, n, split=split)
    if run.trainer.is_global_zero:
        results.save(run.run_dir)
    return run, results
