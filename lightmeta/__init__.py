"""lightmeta: meta-learning (learning to learn) as a first-class citizen of PyTorch Lightning.

Public API: subclass :class:`MetaLearner` (or :class:`GradientMetaLearner`) and register it
with :func:`register_algorithm`; datamodules subclass :class:`EpisodicDataModule`.
"""
from lightmeta.config import RunConfig, load_config, validate_config
from lightmeta.datamodule import DataConfig, EpisodicDataModule, TaskSampler
from lightmeta.episodes import EpisodeSpec, Task, TaskBatch
from lightmeta.errors import ConfigError, DataError, LightmetaError, PluginError
from lightmeta.gradient import GradientConfig, GradientMetaLearner
from lightmeta.meta_learner import AlgorithmConfig, MetaLearner
from lightmeta.metrics import MeanCI, mean_ci
from lightmeta.models import Backbone, build_model
from lightmeta.plugin import PluginConfig
from lightmeta.registry import (
    ALGORITHMS,
    DATAMODULES,
    MODELS,
    register_algorithm,
    register_datamodule,
    register_model,
)
from lightmeta.results import Results
from lightmeta.seeding import derive_seed, generator_for
from lightmeta.task_info import TaskInfo

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "DATAMODULES", "MODELS", "AlgorithmConfig", "Backbone", "ConfigError", "DataConfig",
    "DataError", "EpisodeSpec", "EpisodicDataModule", "GradientConfig", "GradientMetaLearner",
    "LightmetaError", "MeanCI", "MetaLearner", "PluginConfig", "PluginError", "Results", "RunConfig",
    "Task", "TaskBatch", "TaskInfo", "TaskSampler", "build_model", "derive_seed", "generator_for",
    "load_config", "mean_ci", "register_algorithm", "register_datamodule", "register_model",
    "validate_config", "__version__",
]
