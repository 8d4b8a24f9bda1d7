"""A build lock left by a killed DeepSpeed op build is removed before training waits on it; a
build in progress keeps its lock."""

import os
import time

from jobs.train.loop import STALE_BUILD_LOCK_S, clear_stale_build_lock


def test_stale_lock_removed_and_live_build_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "deepspeed_shm_comm"
    folder.mkdir()
    lock, obj = folder / "lock", folder / "shm.o"
    lock.touch()
    obj.touch()
    said = []
    assert not clear_stale_build_lock(log=said.append)  # just written: a build in progress
    assert lock.exists() and not said

    old = time.time() - STALE_BUILD_LOCK_S - 60
    for f in (lock, obj):
        os.utime(f, (old, old))
    assert clear_stale_build_lock(log=said.append)
    assert not lock.exists() and obj.exists() and "stale build lock" in said[0]
    assert not clear_stale_build_lock(log=said.append)  # nothing left to remove
    assert not clear_stale_build_lock("never_built", log=said.append)
