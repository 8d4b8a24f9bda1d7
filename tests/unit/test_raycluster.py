"""Starting Ray while other start-up work runs (jobs.common.raycluster.init_ray_while)."""

from __future__ import annotations

import threading

import pytest

from jobs.common import raycluster
from jobs.common.raycluster import RayConfig, init_ray_while


def test_work_runs_while_ray_starts_and_its_result_or_error_comes_back(monkeypatch):
    work_started = threading.Event()

    def starting_ray(cfg, log):  # returns only once the work has begun beside it
        assert work_started.wait(10), "the work did not start until Ray had started"

    monkeypatch.setattr(raycluster, "init_ray", starting_ray)

    def work():
        work_started.set()
        return "tokenizer"

    assert init_ray_while(RayConfig(), work) == "tokenizer"

    def broken():
        work_started.set()
        raise OSError("tokenizer.json: not valid JSON")

    with pytest.raises(OSError, match="tokenizer.json"):
        init_ray_while(RayConfig(), broken)


def test_an_error_starting_ray_is_raised_once_the_work_is_done(monkeypatch):
    finished = []

    def failing(cfg, log):
        raise ConnectionError("no Ray cluster at ray://head:10001")

    monkeypatch.setattr(raycluster, "init_ray", failing)

    def work():
        threading.Event().wait(0.2)
        finished.append(True)

    with pytest.raises(ConnectionError, match="ray://head:10001"):
        init_ray_while(RayConfig(), work)
    assert finished == [True]
