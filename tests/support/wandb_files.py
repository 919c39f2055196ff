"""Readers of what an offline W&B run leaves behind: its run-<id>.wandb transaction log."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

# An offline W&B run's run-<id>.wandb file: a LevelDB-style log of protobuf Records.
LOG_BLOCK_SIZE = 32768


LOG_HEADER = struct.Struct("<IHB")  # crc32c, payload length, chunk type


FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    """All protobuf Records of a run-<id>.wandb file, in write order."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pending, position = [], b"", 7  # after the file header ":W&B", magic (2 bytes), version
    while position + LOG_HEADER.size <= len(data):
        left_in_block = LOG_BLOCK_SIZE - position % LOG_BLOCK_SIZE
        if left_in_block < LOG_HEADER.size:  # too short for a chunk header: zero padding
            position += left_in_block
            continue
        _, length, chunk_type = LOG_HEADER.unpack_from(data, position)
        if chunk_type == 0:  # zero padding up to the end of the block
            position += left_in_block
            continue
        payload = data[position + LOG_HEADER.size : position + LOG_HEADER.size + length]
        position += LOG_HEADER.size + length
        pending = payload if chunk_type in (FULL, FIRST) else pending + payload
        if chunk_type in (FULL, LAST):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def read_wandb_records_so_far(run_file: Path) -> list:
    """The records of a run file that a kill may have cut off mid-record (then none: the framing cannot be
    trusted)."""
    from google.protobuf.message import DecodeError

    try:
        return read_wandb_records(run_file)
    except DecodeError:
        return []


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_file: Path, wait_s: float = 0.0) -> dict:
    """The run id, history rows by step, summary updates, config keys, metric definitions (by name or
    glob) and exit code of one offline run; waits up to wait_s for its exit record (see offline_runs)."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            run = _read_offline_run(run_file)
        except DecodeError:  # a record cut off mid-write
            run = {"exit_code": None}
        if run["exit_code"] is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.1)


def _read_offline_run(run_file: Path) -> dict:
    run = {"id": None, "init": {}, "history": {}, "summary": {}, "config": set(), "metrics": {}, "exit_code": None}
    for record in read_wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["init"] = {
                "project": record.run.project,
                "name": record.run.display_name,
                "group": record.run.run_group,
                "tags": list(record.run.tags),
            }
        elif kind == "history":
            row = run["history"].setdefault(record.history.step.num, {})
            row.update({_item_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            run["summary"].update({_item_key(item): json.loads(item.value_json) for item in record.summary.update})
        elif kind == "config":
            run["config"].update(_item_key(item) for item in record.config.update)
        elif kind == "metric":
            run["metrics"][record.metric.name or record.metric.glob_name] = record.metric
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def offline_runs(output_dir: Path, count: int, timeout_s: float = 20.0) -> list[dict]:
    """The `count` offline runs under output_dir, oldest first (by the first step each one logged).

    wandb-core writes the file in the background and can return from run.finish() before it is
    all on disk, so wait until every run ends with its exit record.
    """
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout_s
    while True:
        paths = sorted(output_dir.glob("wandb/offline-run-*/run-*.wandb"))
        try:
            runs = [read_offline_run(path) for path in paths]
        except DecodeError:  # a record cut off mid-write
            runs = []
        if len(runs) == count and all(run["exit_code"] is not None for run in runs):
            return sorted(runs, key=lambda run: min(run["history"], default=0))
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} finished offline runs in {output_dir}, found {len(paths)} files")
        time.sleep(0.1)
