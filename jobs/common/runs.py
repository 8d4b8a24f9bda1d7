"""Run directories: the scaffolding every stage shares.

- Datasets are folders of Parquet part files (`PartWriter`, `check_dataset`); every file is written
  to a temporary name and renamed, so a reader (and a resumed run) only ever sees complete files,
  and a stage that is interrupted resumes by reading which keys its parts already hold.
- A stage claims its run directory with the fingerprint of what it produces (`claim_run_dir`): a
  run that would resume under another setup is refused before it mixes two.
- Every stage ends with a manifest of the same envelope (`write_manifest`), and publishes finished
  folders by renaming them into place (`publish`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common.errors import CotdError, DataError

TMP_SUFFIX = ".tmp"
RUN_FILE = "run.json"        # a run directory's claim: the stage and the fingerprint of its outputs
MANIFEST = "manifest.json"   # a stage's record of its last finished run (write_manifest)


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` under a temporary name, then rename: readers see all of it or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


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


def write_lines(path: str | Path, rows: Iterable[dict]) -> None:
    """A JSON-lines file, written atomically."""
    write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def check_run_dir(run_dir: Path, stage: str, fingerprint: dict[str, Any], has_outputs: bool,
                  overwrite: bool, redo: str = "overwrite=true") -> None:
    """Refuse to resume into `run_dir` when it holds `stage` outputs made under another fingerprint
    (resuming would mix the two), naming what differs; `overwrite`: the caller deletes them."""
    marker = run_dir / RUN_FILE
    if has_outputs and not overwrite and marker.is_file():
        before = read_json(marker)
        old = before.get("fingerprint") or {}
        if before.get("stage") not in (None, stage):
            raise CotdError(f"{run_dir} holds the outputs of the {before.get('stage')} stage; use another out_dir")
        if old != fingerprint:
            diff = sorted(k for k in set(fingerprint) | set(old) if old.get(k) != fingerprint.get(k))
            raise CotdError(f"{run_dir} holds {stage} outputs made with a different {', '.join(diff)}; resuming "
                            f"would mix them. Use another out_dir, or {redo} to start over.")


def claim_run_dir(run_dir: Path, stage: str, fingerprint: dict[str, Any]) -> None:
    """Mark `run_dir` as holding `stage`'s outputs made under `fingerprint` (after check_run_dir)."""
    write_json(run_dir / RUN_FILE, {"stage": stage, "fingerprint": fingerprint})


def write_manifest(run_dir: Path, stage: str, config: Any, fingerprint: dict[str, Any], started: float,
                   **fields: Any) -> dict[str, Any]:
    """The manifest every stage ends with: its envelope (stage, config, fingerprint, the digests
    of its inputs where it passes `inputs`, wall time, finish time) and the stage's own fields."""
    from jobs.common.config import to_dict

    manifest = {"stage": stage, "config": to_dict(config), "fingerprint": fingerprint, **fields,
                "wall_seconds": round(time.time() - started, 2), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(run_dir / MANIFEST, manifest)
    return manifest


def is_current(run_dir: Path, stage: str, fingerprint: dict[str, Any], inputs: dict[str, str] | None = None) -> bool:
    """Whether `run_dir` holds a finished `stage` run made under `fingerprint` from `inputs`
    (dataset digests): what a pipeline may skip."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return False
    m = read_json(path)
    return (m.get("stage") == stage and m.get("fingerprint") == json.loads(json.dumps(fingerprint, default=str))
            and (inputs is None or m.get("inputs") == inputs))


def publish(staging: Path, out: Path, names: Iterable[str]) -> None:
    """Move each finished folder (or file) `staging/name` to `out/name`, replacing what was there
    with one rename (the old one is moved aside first and then deleted)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        src, target = staging / name, out / name
        if not src.exists():
            continue
        if target.exists():
            old = out / f".old-{name}-{uuid.uuid4().hex[:6]}"
            target.rename(old)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        src.rename(target)


def check_dataset(path: str | Path, needed: Iterable[str], what: str, made_by: str) -> list[Path]:
    """The part files of the dataset folder `path`, each readable and holding the `needed` columns;
    DataError naming `what` (the config key) when the folder is missing, empty, damaged or another
    dataset. `made_by` says which command writes it."""
    folder = Path(path)
    if not folder.exists():
        raise DataError(f"{what}: {path} does not exist (expected the folder `{made_by}` writes)")
    if not folder.is_dir():
        raise DataError(f"{what}: {path} is a file; expected the folder `{made_by}` writes")
    files = part_files(folder)
    if not files:
        raise DataError(f"{what}: {folder} holds no part-*.parquet files (has `{made_by}` written any?)")
    needed = set(needed)
    for f in files:
        try:
            names = set(pq.read_schema(f).names)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataError(f"{what}: {f} is not a readable Parquet file: {e}") from None
        missing = sorted(needed - names)
        if missing:
            raise DataError(f"{what}: {f} lacks column(s) {', '.join(missing)}; is it a dataset `{made_by}` wrote "
                            "(docs/schema.md)?")
    return files


def dataset_digest(files: Iterable[Path]) -> str:
    """A short digest of a dataset's part files (names and sizes): a later stage's manifest records
    it, so a changed input is seen without reading it."""
    h = hashlib.sha256()
    for f in sorted(Path(f) for f in files):
        h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


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


def drop_rows(folder: str | Path, column: str, value: Any) -> int:
    """Remove the rows whose `column` equals `value` from a dataset folder, one part file at a time
    (each rewritten under a temporary name and renamed; a part left empty is deleted), so a re-run
    produces them again. Returns how many rows were removed."""
    import pyarrow.compute as pc

    removed = 0
    for f in part_files(folder):
        table = pq.read_table(f)
        hit = pc.equal(table.column(column), value)
        n = pc.sum(hit).as_py() or 0
        if not n:
            continue
        kept = table.filter(pc.invert(pc.fill_null(hit, False)))
        if kept.num_rows:
            tmp = f.with_name(f".{f.name}{TMP_SUFFIX}")
            pq.write_table(kept, tmp)
            os.replace(tmp, f)
        else:
            f.unlink()
        removed += n
    return removed


def existing_keys(folder: str | Path, key_columns: Iterable[str], failed: str | None = None) -> set[tuple]:
    """Keys already written: what a resumed run must not produce again. Rows whose `status` is
    `failed` do not count (a re-run produces them again)."""
    cols = list(key_columns)
    table = read_dataset(folder, columns=cols + (["status"] if failed is not None else []))
    if table is None:
        return set()
    if failed is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.fill_null(pc.not_equal(table.column("status"), failed), True))
    return set(zip(*(table.column(c).to_pylist() for c in cols)))
