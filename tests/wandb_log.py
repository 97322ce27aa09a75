"""Read a W&B offline transaction log (``run-<id>.wandb``) back into protobuf records.

wandb ships no reader for it. The format is a LevelDB-style log: a 7-byte header
(``:W&B``, magic 0xBEE1, version), then 32 KiB blocks of records framed as
crc32 (4 bytes) / length (2) / type (1: full, 2: first, 3: middle, 4: last); a block tail
shorter than a frame header is padding. Payloads are ``wandb_internal_pb2.Record``.
"""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[Any]:
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left
            continue
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            pending = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        elif kind == LAST:
            pending += payload
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        yield record


def wait_for_exit(path: Path, timeout: float = 30.0) -> None:
    """Wait until the log holds the run's ``exit`` record: ``run.finish()`` can return before the
    W&B service has flushed the transaction log to disk."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in read_records(path)):
                return
        except Exception:  # a record cut off mid-write: read again
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} has no exit record after {timeout:.0f} s: the W&B run did not finish")
        time.sleep(0.2)


def _set_nested(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value


def summarize(path: Path) -> dict[str, Any]:
    """Config, history keys, summary and logged media of an offline run.

    Media (tables, charts' tables, images) are history items with nested keys
    (``[key, "_type"]``, ``[key, "path"]``...); ``media[key]`` is the list of their dicts in
    logging order, each ``path`` relative to the run's ``files/`` folder. Charts such as
    ``wandb.plot.line`` keep their spec in the config under ``_wandb.visualize.<key>``.
    Artifacts (checkpoints with ``logger.log_model``) are listed by name and type.
    """
    wait_for_exit(path)
    config: dict[str, Any] = {}
    history_keys: set[str] = set()
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    media: dict[str, list[dict[str, Any]]] = {}
    artifacts: list[dict[str, Any]] = []
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("config", "run"):
            for item in (record.config if kind == "config" else record.run.config).update:
                if item.nested_key:
                    _set_nested(config, list(item.nested_key), json.loads(item.value_json))
                else:
                    config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            row: dict[str, Any] = {}
            logged: dict[str, dict[str, Any]] = {}
            for item in record.history.item:
                key = item.key or ".".join(item.nested_key)
                history_keys.add(key)
                row[key] = json.loads(item.value_json)
                if not item.key and len(item.nested_key) >= 2:
                    _set_nested(logged.setdefault(item.nested_key[0], {}), list(item.nested_key[1:]),
                                json.loads(item.value_json))
            history.append(row)
            for key, value in logged.items():
                media.setdefault(key, []).append(value)
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or ".".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
        elif kind == "artifact":
            artifacts.append({"name": record.artifact.name, "type": record.artifact.type,
                              "files": [entry.path for entry in record.artifact.manifest.contents]})
    return {"config": config, "history_keys": history_keys, "history": history, "summary": summary,
            "media": media, "artifacts": artifacts}
