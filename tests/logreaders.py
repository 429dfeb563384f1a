"""Readers of what the loggers write, with the tools' own code: TensorBoard event files through
tensorboard's ``EventAccumulator``, a W&B offline run file through W&B's record protobuf."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path


def read_events(folder):
    """TensorBoard's own reader of the event files in ``folder``, every event kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        str(folder), size_guidance={"scalars": 0, "histograms": 0, "images": 0}
    )
    events.Reload()
    return events


def wandb_records(run_file: Path):
    """The records of a W&B run file (a LevelDB-style log: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, position, parts, records = 32768, 7, [], []
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            position += room
            continue
        parts.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def wandb_history(folder: Path, timeout: float = 60.0):
    """The logged rows of the one offline run under ``folder``: [{key: value}] in order.

    W&B's service writes the run file in the background, also after ``run.finish()`` has
    returned: the file is read until it ends with the run's exit record.
    """
    runs = sorted(folder.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(runs[0])
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            break
        assert time.monotonic() < deadline, f"{runs[0]} has no exit record after {timeout} s"
        time.sleep(0.05)
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def isolate_wandb(monkeypatch, folder: Path) -> None:
    """W&B's environment of one test: offline by the logger's default, files under ``folder``.

    Call ``wandb.teardown()`` after the test: W&B reads its environment once per process (at
    its first run), so the next test's ``WANDB_DIR`` counts only after a teardown.
    """
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the loggers' own default: offline
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(folder))
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing in ~/
        monkeypatch.setenv(name, str(folder / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
