"""Meta-learning algorithms, one module each; importing the package registers them all."""
from lightmeta.registry import import_submodules as _import_submodules

_import_submodules(__name__)
