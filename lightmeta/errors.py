"""User-facing errors: one line that names the culprit and the fix.

The CLI prints these without a traceback and exits with ``exit_code``.
"""
from __future__ import annotations


class LightmetaError(Exception):
    """Base for errors caused by user input (config, data, checkpoints)."""

    exit_code = 1


class ConfigError(LightmetaError, ValueError):
    """A run config or CLI override is invalid; CLI misuse, so exit code 2."""

    exit_code = 2


class PluginError(ConfigError, KeyError):
    """A plug-in name is unknown or its module failed to import."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(LightmetaError):
    """Data is missing, corrupt or inconsistent with the requested episodes."""

    exit_code = 2
