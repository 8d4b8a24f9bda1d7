"""Run directories: datasets as folders of Parquet part files, plus JSON manifests.

Every file is written to a temporary name and renamed, so a reader (and a resumed run) only ever
sees complete files. A stage that is interrupted resumes by reading which keys its existing parts
already hold and producing only the rest.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

TMP_SUFFIX = ".tmp"


def write_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


class PartWriter:
    """Writes tables as `part-<attempt>-<n>.parquet` files into a dataset folder, atomically."""

    def __init__(self, folder: str | Path, schema: pa.Schema):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.attempt = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.count = 0

    def write(self, table: pa.Table) -> Path:
        table = table.select(self.schema.names).cast(self.schema)
        name = f"part-{self.attempt}-{self.count:05d}.parquet"
        tmp = self.folder / f".{name}{TMP_SUFFIX}"
        pq.write_table(table, tmp)
        os.replace(tmp, self.folder / name)
        self.count += 1
        return self.folder / name


def part_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


def clean_partial(folder: str | Path) -> int:
    """Remove temporary files an interrupted writer left behind; returns how many."""
    folder = Path(folder)
    removed = 0
    if folder.is_dir():
        for tmp in folder.glob(f".*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def read_dataset(folder: str | Path, columns: list[str] | None = None) -> pa.Table | None:
    """All parts of a dataset folder as one table (None when there are none)."""
    files = part_files(folder)
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files], promote_options="default")


def existing_keys(folder: str | Path, key_columns: Iterable[str]) -> set[tuple]:
    """Keys already written: what a resumed run must not produce again."""
    cols = list(key_columns)
    table = read_dataset(folder, columns=cols)
    if table is None:
        return set()
    return set(zip(*(table.column(c).to_pylist() for c in cols)))
