"""Name -> class registries for algorithms, datamodules and backbones (timm style).

Built-ins register with a decorator when their module is imported; third-party packages
register through the entry-point groups ``lightmeta.algorithms``, ``lightmeta.datamodules``
and ``lightmeta.models``. Both are loaded once, on the first lookup.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
import warnings
from importlib.metadata import EntryPoint, entry_points
from typing import Callable, Generic, TypeVar

from lightmeta.errors import PluginError

T = TypeVar("T", bound=type)


def did_you_mean(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def import_submodules(package: str) -> None:
    """Import every module of ``package`` so that their decorators register."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


class Registry(Generic[T]):
    """A registry of plug-in classes of one kind."""

    def __init__(self, kind: str, group: str, builtin_package: str) -> None:
        self.kind = kind
        self.group = group
        self.builtin_package = builtin_package
        self._items: dict[str, T] = {}
        self._broken: dict[str, str] = {}
        self._loaded = False
        self._loading = False

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Class decorator: ``@ALGORITHMS.register("maml")``."""

        def decorator(cls: T) -> T:
            key = name or cls.__name__.lower()
            existing = self._items.get(key)
            if existing is not None and existing is not cls:
                raise PluginError(
                    f"{self.kind} '{key}' is registered twice: by {existing.__module__}."
                    f"{existing.__qualname__} and by {cls.__module__}.{cls.__qualname__}; "
                    "rename one (or import modules only as lightmeta.*)"
                )
            self._items[key] = cls
            cls.registered_name = key
            return cls

        return decorator

    def _load(self) -> None:
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            import_submodules(self.builtin_package)
            for ep in entry_points(group=self.group):
                self._load_entry_point(ep)
            self._loaded = True
        finally:
            self._loading = False

    def _load_entry_point(self, ep: EntryPoint) -> None:
        dist = ep.dist.name if ep.dist is not None else "an unknown distribution"
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plug-in must not take the others down
            msg = (
                f"{self.kind} plug-in '{ep.name}' from distribution '{dist}' failed to import "
                f"({type(exc).__name__}: {exc}); reinstall or fix that package"
            )
            self._broken[ep.name] = msg
            warnings.warn(msg, stacklevel=2)
            return
        if isinstance(obj, type) and ep.name not in self._items:
            self.register(ep.name)(obj)  # type: ignore[arg-type]
        # a module entry point registers its classes itself on import

    def get(self, name: str) -> T:
        """The class registered as ``name``, or a class given as ``package.module:Class``."""
        if ":" in name:
            return self._import_dotted(name)
        self._load()
        if name in self._items:
            return self._items[name]
        if name in self._broken:
            raise PluginError(self._broken[name])
        raise PluginError(
            f"unknown {self.kind} '{name}'{did_you_mean(name, self.names())}; "
            f"available: {', '.join(self.names())}"
        )

    def _import_dotted(self, path: str) -> T:
        module_name, _, attr = path.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise PluginError(
                f"cannot import {self.kind} '{path}' ({exc}); use 'package.module:Class' "
                "with the package importable"
            ) from exc

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._items.items())

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def unregister(self, name: str) -> None:
        """Remove a plug-in (tests and interactive sessions)."""
        self._items.pop(name, None)
        self._broken.pop(name, None)

    def reload_entry_points(self) -> None:
        """Load the entry-point group again (after installing a plug-in at run time)."""
        self._load()
        for ep in entry_points(group=self.group):
            if ep.name not in self._items:
                self._load_entry_point(ep)


ALGORITHMS: Registry = Registry("algorithm", "lightmeta.algorithms", "lightmeta.algorithms")
DATAMODULES: Registry = Registry("datamodule", "lightmeta.datamodules", "lightmeta.datamodules")
MODELS: Registry = Registry("model", "lightmeta.models", "lightmeta.models")

register_algorithm = ALGORITHMS.register
register_datamodule = DATAMODULES.register
register_model = MODELS.register
