"""Episodic datamodules, one module per task source; importing the package registers them all."""
from lightmeta.registry import import_submodules as _import_submodules

_import_submodules(__name__)
