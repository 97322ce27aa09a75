"""Dashboards: a real offline W&B run read back from its transaction log, PNG figures without W&B,
the meta-overfitting monitor, and the MetaLearner hooks the dashboard relies on."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from figure_checks import assert_png_shows_something
from wandb_log import summarize

from lightmeta.callbacks import OverfittingMonitor, RunHistory, learned_inner_rates, pre_adaptation_metrics
from lightmeta.cli import main
from lightmeta.config import load_config
from lightmeta.dashboard import OverfittingConfig
from lightmeta.errors import ConfigError
from lightmeta.plots import Curve
from lightmeta.registry import ALGORITHMS, DATAMODULES

SHORT = ["trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
         "data.val_tasks=4", "data.test_tasks=4", "data.eval_batch_size=4"]
SYNTHETIC = ["data=synthetic", "data.image_shape=[1,12,12]", "data.meta_batch_size=2", "data.queries=2",
             "data.classes={train: 10, val: 6, test: 6}", "model.hidden=[16]", "algorithm.eval_inner_steps=2",
             "trainer.max_steps=2", "data.train_batches_per_epoch=2"]
HEADER = "# paper: test/acc = 98.7 ± 0.4 % (Finn, Abbeel & Levine 2017, Table 1)\n"


def _run_dir(stdout: str) -> Path:
    return Path(stdout.split("run directory: ")[1].split()[0])


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no cached login: W&B runs offline
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_offline_wandb_run_shows_the_dashboard(tmp_path: Path, offline_wandb: None,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "maml_synthetic.yaml"
    config.write_text("# MAML on synthetic 5-way 1-shot episodes (test config).\n" + HEADER
                      + "algorithm: {name: maml, inner_lr: 0.4}\nmodel: {name: mlp}\n"
                      + "data: {name: synthetic, ways: 5, shots: 1}\n")
    argv = ["fit", "-c", str(config), *SYNTHETIC, *SHORT, "logger=wandb", "logger.log_model=true",
            "experiment=dash", f"output_dir={tmp_path / 'runs'}"]
    assert main(argv) == 0
    run_dir = _run_dir(capsys.readouterr().out)
    offline = next((run_dir / "wandb").glob("offline-run-*"))
    logged = summarize(next(offline.glob("*.wandb")))
    files = offline / "files"

    # the resolved config, including the dashboard section, is the W&B config
    assert logged["config"]["algorithm"]["name"] == "maml", sorted(logged["config"])
    assert logged["config"]["dashboard"]["overfitting"]["enabled"] is False
    # scalars with stable names
    expected = {"train/loss", "train/acc", "train/loss_step0", "train/acc_step0", "train/grad_norm", "lr/outer",
                "perf/episodes_per_sec", "val/acc", "val/acc_ci95", "val/acc_step0", "gap/acc", "gap/loss",
                "test/acc", "test/acc_ci95", "trainer/global_step"}
    assert expected <= logged["history_keys"], expected - logged["history_keys"]
    lrs = [row["lr/outer"] for row in logged["history"] if "lr/outer" in row]
    assert lrs and all(lr == pytest.approx(1e-3) for lr in lrs)

    # the adaptation curve: a line chart over a table whose rows are the logged step metrics
    chart = logged["config"]["_wandb"]["visualize"]["val/adaptation_acc"]
    assert chart["panel_config"]["panelDefId"] == "wandb/line/v0"
    assert chart["panel_config"]["fieldSettings"] == {"x": "inner_step", "y": "acc", "stroke": None}
    (table_ref,) = logged["media"]["val/adaptation_acc_table"]
    assert table_ref["_type"] == "table-file"
    table = json.loads((files / table_ref["path"]).read_text())
    assert table["columns"] == ["inner_step", "acc", "acc_ci95"]
    val_row = next(row for row in logged["history"] if "val/acc_step2" in row)
    assert [r[0] for r in table["data"]] == [0, 1, 2]
    assert [r[1] for r in table["data"]] == pytest.approx([val_row[f"val/acc_step{k}"] for k in range(3)])

    # the episode gallery: an image of the first validation task
    (gallery,) = logged["media"]["val/episode_gallery"]
    assert gallery["_type"] == "image-file" and gallery["format"] == "png"
    assert_png_shows_something(files / gallery["path"])

    # the results table next to the paper's figure from the config header
    (results_ref,) = logged["media"]["test/results_table"]
    results = json.loads((files / results_ref["path"]).read_text())
    rows = [dict(zip(results["columns"], r)) for r in results["data"]]
    acc = next(r for r in rows if r["metric"] == "acc")
    test_row = next(row for row in logged["history"] if "test/acc" in row)
    assert acc["setting"] == "5-way 1-shot" and acc["tasks"] == 4
    assert acc["mean"] == pytest.approx(test_row["test/acc"]) and acc["ci95"] == pytest.approx(test_row["test/acc_ci95"])
    assert acc["paper"] == pytest.approx(0.987) and acc["paper_ci95"] == pytest.approx(0.004)
    assert "Finn" in acc["paper_source"]
    assert json.loads((run_dir / "paper.json").read_text())[0]["metric"] == "test/acc"

    # logger.log_model: the checkpoint is an artifact of the offline run (uploaded by `wandb sync`)
    models = [a for a in logged["artifacts"] if a["type"] == "model"]
    assert models and models[0]["files"] == ["model.ckpt"]

    # the same figures as PNG files in the run directory
    for name in ("learning_curves", "adaptation_val", "gallery_val", "adaptation_test", "gallery_test"):
        assert_png_shows_something(run_dir / "plots" / f"{name}.png")


def test_regression_run_without_wandb_writes_figures_and_scalars(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["fit", *SHORT, "trainer.max_steps=4", "data.train_batches_per_epoch=2", "data.meta_batch_size=4",
            "algorithm.eval_inner_steps=3", "experiment=sin", f"output_dir={tmp_path / 'runs'}"]
    assert main(argv) == 0
    run_dir = _run_dir(capsys.readouterr().out)
    for name in ("learning_curves", "adaptation_val", "fits_val", "adaptation_test", "fits_test"):
        assert_png_shows_something(run_dir / "plots" / f"{name}.png")
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"train/loss_step0", "train/grad_norm", "lr/outer", "perf/episodes_per_sec", "gap/loss"} <= set(rows[0])
    gaps = [(int(r["step"]), float(r["gap/loss"])) for r in rows if r["gap/loss"]]
    val_losses = [float(r["val/loss"]) for r in rows if r["val/loss"]]
    assert [s for s, _ in gaps] == [2, 4] and len(val_losses) == 2
    # gap/loss = val loss - mean train loss over the steps since the previous validation
    train = [(int(r["step"]), float(r["train/loss"])) for r in rows if r["train/loss"]]
    first_window = [v for s, v in train if s < 2]
    assert gaps[0][1] == pytest.approx(val_losses[0] - sum(first_window) / len(first_window), rel=1e-5)
    assert not (run_dir / "paper.json").exists()  # the default config's header states no figure


def test_dashboard_can_be_switched_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["fit", *SHORT, "trainer.max_steps=2", "data.train_batches_per_epoch=2", "data.meta_batch_size=2",
            "algorithm.eval_inner_steps=1", "dashboard.enabled=false", f"output_dir={tmp_path / 'runs'}"]
    assert main(argv) == 0
    run_dir = _run_dir(capsys.readouterr().out)
    assert not (run_dir / "plots").exists()
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/loss" in header and "train/loss_step0" not in header and "gap/loss" not in header


# ---------------------------------------------------------------------- config
def test_dashboard_config_is_validated() -> None:
    cfg = load_config(None, ["dashboard.overfitting.enabled=true", "dashboard.overfitting.action=stop"])
    assert cfg.dashboard.overfitting.action == "stop" and cfg.to_dict()["dashboard"]["plots"] is True
    with pytest.raises(ConfigError, match=r"dashboard\.overfitting\.patience=0"):
        load_config(None, ["dashboard.overfitting.patience=0"])
    with pytest.raises(ConfigError, match=r"dashboard\.overfitting\.action=\"halt\""):
        load_config(None, ["dashboard.overfitting.action=halt"])
    with pytest.raises(ConfigError, match=r"unknown key 'dashboard\.plot' \(did you mean 'plots'\?\)"):
        load_config(None, ["dashboard.plot=false"])


# ---------------------------------------------------------------------- overfitting monitor
class _Strategy:
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision


def _validate(monitor: OverfittingMonitor, trainer: SimpleNamespace, learner: SimpleNamespace,
              train: float, val: float) -> dict[str, float]:
    history = monitor.history
    history.window = {"acc": train}
    history.val.setdefault("acc", Curve()).values.append(val)
    trainer.global_step += 10
    return monitor._check(trainer, learner)  # type: ignore[arg-type]


@pytest.mark.parametrize("action", ["alarm", "stop"])
def test_overfitting_monitor_fires_when_val_stalls_while_train_improves(action: str) -> None:
    monitor = OverfittingMonitor(OverfittingConfig(enabled=True, patience=2, min_delta=0.01, action=action), RunHistory())
    trainer = SimpleNamespace(strategy=_Strategy(), global_step=0, should_stop=False)
    learner = SimpleNamespace(monitor=("val/acc", "max"))
    # validation improves, then stalls for two validations while training keeps improving
    outcomes = [_validate(monitor, trainer, learner, train, val) for train, val in [(0.5, 0.50), (0.6, 0.60), (0.7, 0.605)]]
    with pytest.warns(UserWarning, match=r"meta-overfitting: val/acc has not improved for 2 validations"):
        outcomes.append(_validate(monitor, trainer, learner, 0.8, 0.60))
    assert [o["overfit/alarm"] for o in outcomes] == [0.0, 0.0, 0.0, 1.0]
    assert [o["overfit/validations_without_improvement"] for o in outcomes] == [0, 0, 1, 2]
    assert trainer.should_stop is (action == "stop")


def test_overfitting_monitor_stays_quiet_when_training_stalls_too() -> None:
    monitor = OverfittingMonitor(OverfittingConfig(enabled=True, patience=1, action="stop"), RunHistory())
    trainer = SimpleNamespace(strategy=_Strategy(), global_step=0, should_stop=False)
    learner = SimpleNamespace(monitor=("val/loss", "min"))
    monitor.history.val["loss"] = Curve()
    alarms = []
    for train, val in [(1.0, 1.0), (1.0, 1.1), (1.05, 1.2)]:  # a plateau, not meta-overfitting
        monitor.history.window = {"loss": train}
        monitor.history.val["loss"].values.append(val)
        alarms.append(monitor._check(trainer, learner)["overfit/alarm"])  # type: ignore[arg-type]
    assert alarms == [0.0, 0.0, 0.0] and not trainer.should_stop
    state = monitor.state_dict()
    restored = OverfittingMonitor(monitor.config, RunHistory())
    restored.load_state_dict(state)
    assert restored.state_dict() == state == {"best": 1.0, "train_at_best": 1.0, "wait": 2, "fired": False}


# ---------------------------------------------------------------------- MetaLearner hooks
def _learner(algorithm: str, model: dict, data: dict, **params: object) -> tuple[object, object]:
    dm_cls = DATAMODULES.get(data["name"])
    dm = dm_cls(dm_cls.Config.model_validate({k: v for k, v in data.items() if k != "name"}), seed=0)
    learner = ALGORITHMS.get(algorithm)(params, model=model, task=dm.task_info())
    batch = dm.build_sampler().sample("train", [0, 1, 2], seed=0)
    return learner, batch


def test_pre_adaptation_metrics_are_the_step0_query_metrics() -> None:
    learner, batch = _learner("maml", {"name": "mlp", "hidden": [16]}, {"name": "synthetic", "image_shape": [1, 8, 8]},
                              eval_inner_steps=1)
    learner.train()
    pre = pre_adaptation_metrics(learner, batch)
    learner.eval()
    step0 = [learner.evaluate_task(task) for task in batch.tasks()]
    assert set(pre) == {"loss", "acc"}
    for k in pre:
        assert pre[k].item() == pytest.approx(torch.stack([s[f"{k}_step0"] for s in step0]).mean().item(), rel=1e-6)


def test_predict_unadapted_leaves_batch_norm_statistics_alone() -> None:
    learner, batch = _learner("maml", {"name": "conv4", "filters": 4}, {"name": "synthetic", "image_shape": [1, 16, 16]},
                              batch_norm="inductive")
    learner.train()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    preds = learner.predict_unadapted(batch.query_x[0])
    assert preds is not None and preds.shape == (batch.query_x.shape[1], 5) and not preds.requires_grad
    after = learner.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "running statistics changed"
    protonet, _ = _learner("protonet", {"name": "mlp", "hidden": [16]}, {"name": "synthetic", "image_shape": [1, 8, 8]})
    assert protonet.predict_unadapted(batch.query_x[0]) is None  # metric learners report nothing
    assert pre_adaptation_metrics(protonet, batch) == {}


def test_learned_inner_rates_follow_the_inner_lrs_convention() -> None:
    from lightmeta.algorithms.maml import MAML
    from lightmeta.gradient import param_key

    class LearnedRates(MAML):  # Meta-SGD's layout: one rate tensor per adapted parameter
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.inner_lrs = torch.nn.ParameterDict({
                param_key(n): torch.nn.Parameter(torch.full_like(p, 0.05 * (i + 1)))
                for i, (n, p) in enumerate(self.model.named_parameters())})

    learner, _ = _learner("maml", {"name": "mlp", "hidden": [16]}, {"name": "sinusoid"})
    assert learned_inner_rates(learner) == {}  # plain MAML learns no rates
    rates = learned_inner_rates(LearnedRates(model={"name": "mlp", "hidden": [16]}, task=learner.task_info))
    expected = {f"lr/inner/{n}": 0.05 * (i + 1) for i, (n, _) in enumerate(learner.model.named_parameters())}
    assert {k: v.item() for k, v in rates.items()} == pytest.approx(expected)


@pytest.mark.parametrize("algorithm", [n for n in ALGORITHMS.names() if getattr(ALGORITHMS.get(n), "needs_grad_at_eval", False)])
def test_registered_learned_rates_cover_every_adapted_tensor(algorithm: str) -> None:
    learner, _ = _learner(algorithm, {"name": "mlp", "hidden": [16]}, {"name": "sinusoid"}, inner_lr=0.05)
    rates = learned_inner_rates(learner)
    if isinstance(getattr(learner, "inner_lrs", None), torch.nn.ParameterDict) and len(learner.inner_lrs):
        assert set(rates) == {f"lr/inner/{n}" for n in learner.inner_param_names()}
        assert all(v.item() == pytest.approx(0.05) for v in rates.values())  # initialised to inner_lr
    else:
        assert rates == {}


def test_run_history_moves_metrics_to_the_host_in_chunks_and_windows_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightmeta.callbacks as callbacks

    monkeypatch.setattr(callbacks, "PENDING_LIMIT", 2)
    history = RunHistory()
    for step, loss in enumerate([4.0, 2.0, 3.0], start=1):
        history.add_train(step, {"loss": torch.tensor(loss)})
    assert history.train["loss"].values == [4.0, 2.0] and len(history._pending) == 1  # one chunk moved
    history.end_window()
    assert history.train["loss"].steps == [1, 2, 3] and history.window == {"loss": 3.0}
    history.add_train(4, {"loss": torch.tensor(1.0), "acc": torch.tensor(0.5)})
    history.end_window()  # the next window holds only the steps since the previous validation
    assert history.window == {"loss": 1.0, "acc": 0.5}
    history.add_eval(4, {"loss": {"mean": 0.7, "ci95": 0.1, "n": 10}, "loss_step0": {"mean": 2.0, "ci95": 0.1, "n": 10}})
    assert list(history.val) == ["loss"] and history.val["loss"].ci95 == [0.1]
