"""Read an offline W&B run file (`run-*.wandb`) back: history rows, config and summary, with W&B's own record schema.

The file is a LevelDB-style log: a 7-byte header (":W&B", a 2-byte magic, a version byte), then 32 KiB blocks of
chunks, each with a 7-byte header (CRC-32 uint32, length uint16, type uint8: 1 full, 2 first, 3 middle, 4 last).
Whole records are `wandb_internal_pb2.Record` protobufs. wandb itself no longer ships a Python reader for it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK_SIZE = 32 * 1024
FILE_HEADER_SIZE = 7
CHUNK_HEADER_SIZE = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[Any]:
    """Every `Record` in the file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (header {data[:4]!r})")
    position, pending = FILE_HEADER_SIZE, b""
    while position + CHUNK_HEADER_SIZE <= len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER_SIZE:  # block trailer padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + CHUNK_HEADER_SIZE])
        payload = data[position + CHUNK_HEADER_SIZE : position + CHUNK_HEADER_SIZE + length]
        position += CHUNK_HEADER_SIZE + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            position += BLOCK_SIZE - position % BLOCK_SIZE if position % BLOCK_SIZE else 0
            continue
        if kind in (FULL, FIRST):
            pending = payload
        elif kind in (MIDDLE, LAST):
            pending += payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@dataclass
class WandbRun:
    """What one offline run logged: history rows (key → decoded value), the config, the summary and run metadata."""

    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)

    def values(self, key: str) -> list[Any]:
        return [row[key] for row in self.history if key in row]


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run(path: str | Path) -> WandbRun:
    """Decode the history, config, summary and run records of one `run-*.wandb` file."""
    run = WandbRun()
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "run":
            run.run = {
                "id": record.run.run_id,
                "name": record.run.display_name,
                "group": record.run.run_group,
                "tags": list(record.run.tags),
                "job_type": record.run.job_type,
            }
    return run


def run_files(directory: str | Path) -> list[Path]:
    """Every offline run file under `directory` (a run dir, or a sweep dir holding several)."""
    return sorted(Path(directory).rglob("offline-run-*/run-*.wandb"))
