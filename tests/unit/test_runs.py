"""Run directories: atomic part files, partial-file cleanup, resume keys, manifests."""

from __future__ import annotations

import pyarrow as pa

from jobs.common.runs import PartWriter, clean_partial, existing_keys, read_dataset, read_json, write_json

SCHEMA = pa.schema([("k", pa.string()), ("i", pa.int32()), ("v", pa.float32())])


def test_parts_are_written_whole_and_read_back(tmp_path):
    w = PartWriter(tmp_path / "ds", SCHEMA)
    w.write(pa.table({"v": [1.0, 2.0], "k": ["a", "b"], "i": [0, 1], "extra": [1, 1]}))
    w.write(pa.table({"k": ["c"], "i": [0], "v": [3.0]}))
    files = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert len(files) == 2 and all(f.startswith("part-") and f.endswith(".parquet") for f in files)
    table = read_dataset(tmp_path / "ds")
    assert table.schema == SCHEMA and table.num_rows == 3
    assert existing_keys(tmp_path / "ds", ["k", "i"]) == {("a", 0), ("b", 1), ("c", 0)}


def test_partial_files_are_ignored_and_cleaned(tmp_path):
    ds = tmp_path / "ds"
    PartWriter(ds, SCHEMA).write(pa.table({"k": ["a"], "i": [0], "v": [1.0]}))
    (ds / ".part-x-00001.parquet.tmp").write_bytes(b"half a file")
    assert existing_keys(ds, ["k", "i"]) == {("a", 0)}
    assert clean_partial(ds) == 1 and not list(ds.glob(".*"))
    assert read_dataset(tmp_path / "absent") is None and existing_keys(tmp_path / "absent", ["k"]) == set()


def test_write_json_replaces_atomically(tmp_path):
    write_json(tmp_path / "m.json", {"a": 1})
    write_json(tmp_path / "m.json", {"a": 2})
    assert read_json(tmp_path / "m.json") == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
