"""Run configuration: one pydantic model built from YAML plus ``key.path=value`` overrides.

Validation runs in two stages before any work starts: the structure, and then each plug-in
section (``algorithm``, ``model``, ``data``) against the ``Config`` of the plug-in its ``name``
selects. Every error names the dotted field path, the bad value and what is allowed.
"""
from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model

from lightmeta.dashboard import DashboardConfig
from lightmeta.errors import ConfigError, PluginError
from lightmeta.registry import ALGORITHMS, DATAMODULES, MODELS, Registry, did_you_mean

DEFAULT_CONFIG = "maml/sinusoid"
PLUGIN_SECTIONS: dict[str, Registry] = {"algorithm": ALGORITHMS, "model": MODELS, "data": DATAMODULES}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainerConfig(_Strict):
    """The Lightning ``Trainer`` arguments a run may set."""

    max_steps: int = Field(default=2000, ge=-1, description="meta-steps in total (-1: use max_epochs)")
    max_epochs: int | None = Field(default=None, ge=-1)
    accelerator: str = Field(default="auto", description="cpu, gpu, auto, ...")
    devices: int | str | list[int] = Field(default=1, description="devices per node, or 'auto'")
    num_nodes: int = Field(default=1, ge=1)
    strategy: str = Field(default="auto", description="auto, ddp, ddp_spawn, ...")
    precision: Literal["32-true", "32", "64-true", "64", "bf16-mixed", "16-mixed", "bf16-true", "16-true"] = "32-true"
    check_val_every_n_epoch: int = Field(default=1, ge=1, description="validate every n epochs of data.train_batches_per_epoch steps")
    num_sanity_val_steps: int = Field(default=1, ge=-1)
    log_every_n_steps: int = Field(default=10, ge=1)
    gradient_clip_val: float | None = Field(default=None, gt=0, description="clip the outer gradient norm")
    on_nonfinite: Literal["stop", "skip"] = Field(
        default="stop", description="a NaN/inf meta-loss: stop naming step, task and loss; or skip the meta-batch")
    deterministic: bool | Literal["warn"] = False
    enable_progress_bar: bool = True


class LoggerConfig(_Strict):
    """Where metrics go: CSV files in the run directory, Weights & Biases, or nowhere."""

    name: Literal["csv", "wandb", "none"] = "csv"
    project: str = Field(default="lightmeta", description="W&B project")
    entity: str | None = Field(default=None, description="W&B entity (team or user)")
    offline: bool | None = Field(default=None, description="W&B offline mode; default: offline when no credentials")
    log_model: bool = Field(default=False, description="upload checkpoints as W&B artifacts")
    tags: list[str] = Field(default_factory=list)


class CheckpointConfig(_Strict):
    """Model checkpointing; the best checkpoint is chosen on meta-validation only."""

    enabled: bool = True
    save_top_k: int = Field(default=1, ge=-1)
    save_last: bool = True
    every_n_train_steps: int | None = Field(default=None, ge=1)


class RunConfigBase(_Strict):
    """The plug-in independent part of a run config."""

    experiment: str = Field(default="default", min_length=1, description="groups runs under output_dir/experiment")
    seed: int = Field(default=0, ge=0, description="seed of initialisation and of the training task stream")
    output_dir: str = Field(default="runs", min_length=1)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    logger: LoggerConfig = Field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)


class RunConfig(RunConfigBase):
    """A resolved run: plug-in sections are validated models whose ``name`` is the plug-in."""

    algorithm: Any
    model: Any
    data: Any
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        """The YAML file the config was loaded from (``None``: from a checkpoint or a dict); its
        header's ``# paper:`` lines are the figures the run is compared with (lightmeta.paper)."""
        return self._source

    def params(self, section: str) -> dict[str, Any]:
        """A plug-in section's parameters without ``name``."""
        return getattr(self, section).model_dump(exclude={"name"})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------- loading
def config_dir() -> Path:
    """The shipped ``configs/`` folder (installed as ``lightmeta.configs``)."""
    return Path(str(resources.files("lightmeta.configs")))


def resolve_config_path(name: str) -> Path:
    """A YAML path, or a shipped config name such as ``maml/sinusoid``."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = config_dir() / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    names = shipped_config_names()
    raise ConfigError(f"config file '{name}' not found{did_you_mean(name, names)}; give a YAML path or one of: {', '.join(names)}")


def shipped_config_names() -> list[str]:
    root = config_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}; fix the syntax") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (algorithm, data, ...), got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=1`` -> (['a', 'b'], 1); values are read as YAML (numbers, booleans, lists, null)."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' must look like key.path=value, e.g. algorithm.inner_lr=0.01")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a raw config.

    ``algorithm=protonet`` is short for ``algorithm.name=protonet``; switching a plug-in
    section to another plug-in drops the old plug-in's parameters. Switching the data plug-in
    to one that declares a ``default_model`` (image datamodules: Conv4) also switches the model
    to it, unless an override sets the model or the model already has that name: so
    ``data=imagefolder`` works from the default (MLP) config.
    """
    out = copy.deepcopy(raw)
    data_switched, model_set = False, False
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1 and path[0] in (*PLUGIN_SECTIONS, "logger") and isinstance(value, str):
            path = [path[0], "name"]
        model_set = model_set or path[0] == "model"
        if path == ["data", "name"] and (out.get("data") or {}).get("name") != value:
            data_switched = True
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': {'.'.join(path[: i + 1])} is {child!r}, not a section")
            node = child
        leaf = path[-1]
        if leaf == "name" and len(path) == 2 and path[0] in PLUGIN_SECTIONS and node.get("name") != value:
            node.clear()
        node[leaf] = value
    if data_switched and not model_set:
        _apply_default_model(out)
    return out


def _apply_default_model(raw: dict[str, Any]) -> None:
    """Replace the model section by the data plug-in's ``default_model`` (if it has one)."""
    try:
        default = getattr(DATAMODULES.get(str(raw["data"]["name"])), "default_model", None)
    except PluginError:
        return  # validation reports the unknown name
    model = raw.get("model")
    if default and not (isinstance(model, dict) and model.get("name") == default.get("name")):
        raw["model"] = copy.deepcopy(dict(default))


# ---------------------------------------------------------------------- validation
def _format_error(err: dict[str, Any], prefix: tuple[Any, ...] = ()) -> str:
    loc = ".".join(str(p) for p in (*prefix, *err["loc"]))
    if err["type"] == "extra_forbidden":
        return f"unknown key '{loc}'"
    value = err.get("input")
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    return f"{loc}={shown}: {err['msg']}"


def _plugin_section_model(section: str, registry: Registry, name: str) -> type[BaseModel]:
    cls = registry.get(name)
    return create_model(f"{cls.__name__}Section", __base__=cls.Config, name=(str, name))


def _suggest_unknown(err: dict[str, Any], model: type[BaseModel]) -> str:
    """`` (did you mean 'x'?)`` for an unknown key, looked up among its siblings."""
    node: Any = model
    for part in err["loc"][:-1]:
        field = getattr(node, "model_fields", {}).get(part)
        node = field.annotation if field is not None else None
        if not isinstance(node, type) or not issubclass(node, BaseModel):
            return ""
    return did_you_mean(str(err["loc"][-1]), list(node.model_fields))


def validate_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a raw config (YAML plus overrides) into a :class:`RunConfig`.

    Raises :class:`ConfigError` with one line naming every bad field.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"a run config must be a mapping, got {type(raw).__name__}")
    fields: dict[str, Any] = {}
    for section, registry in PLUGIN_SECTIONS.items():
        body = raw.get(section)
        if not isinstance(body, dict) or not body.get("name"):
            raise ConfigError(
                f"{section}.name is required; available: {', '.join(registry.names())} "
                f"(set it with {section}=NAME)"
            )
        if not isinstance(body["name"], str):
            raise ConfigError(f"{section}.name={body['name']!r}: must be a string naming a registered {registry.kind}")
        try:
            fields[section] = (_plugin_section_model(section, registry, body["name"]), ...)
        except PluginError as exc:
            raise ConfigError(f"{section}.name: {exc}") from None
    model = create_model("ResolvedRunConfig", __base__=RunConfig, **fields)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        parts = [_format_error(e) + (_suggest_unknown(e, model) if e["type"] == "extra_forbidden" else "") for e in errors]
        raise ConfigError("invalid config: " + "; ".join(parts)) from None


def load_config(config: str | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML file (or a shipped config name, default ``maml/sinusoid``), apply overrides, validate.

    ``base`` replaces the file as the starting point (a checkpoint's stored config).
    """
    source = None if base is not None and config is None else resolve_config_path(config or DEFAULT_CONFIG)
    raw = base if source is None else load_yaml(source)
    cfg = validate_config(apply_overrides(raw, overrides or []))
    cfg._source = source
    return cfg


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------- JSON schema
def json_schema() -> dict[str, Any]:
    """JSON schema of run configs over every registered plug-in (for editor validation)."""
    fields: dict[str, Any] = {}
    for section, registry in PLUGIN_SECTIONS.items():
        variants = [
            create_model(f"{section}_{name}", __base__=cls.Config, name=(Literal[name], ...))  # type: ignore[valid-type]
            for name, cls in registry.items()
        ]
        union = variants[0] if len(variants) == 1 else Annotated[Union[tuple(variants)], Field(discriminator="name")]
        fields[section] = (union, ...)
    model = create_model("RunConfig", __base__=RunConfigBase, **fields)
    return model.model_json_schema()
