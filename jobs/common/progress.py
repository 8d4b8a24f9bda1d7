"""Progress of long stages (generation, judging, training, evaluation) that a user can follow.

On a terminal, a live tqdm bar: rows, rate, ETA and the stage's own counts (tokens/s, correct so
far). Otherwise (a file, CI, `ray job logs`) a flushed log line every `every` seconds, also while
nothing completes, so a run that waits on its engine still shows that it is alive and for how long;
and a last line when the work is done.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

EVERY_S = 10.0  # seconds between log lines when the output is not a terminal


def emit(line: str) -> None:
    """The default `log` of every stage: one line on stdout, flushed, whatever stdout is (a pipe or a
    file is block-buffered by default, and a progress line would wait for the buffer to fill).
    Written to the stream, not through `print`: Ray Train's workers replace `print` with one that
    prints and also logs to the console, which showed every training progress line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Progress:
    """`with Progress(total, label) as p: ... p.update(rows, tokens, correct=n)`."""

    def __init__(self, total: int, label: str, every: float = EVERY_S, log: Callable[[str], None] = emit,
                 stream: TextIO | None = None, unit: str = "rows", done: int = 0):
        """`done`: work finished before this run (a resumed one); rates count this run's alone."""
        self.total, self.label, self.every, self.log, self.unit = total, label, every, log, unit
        self.start = self.last = time.monotonic()
        self.done, self.rows, self.tokens = done, 0, 0
        self.extra: dict[str, int] = {}
        self.note = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        stream = stream if stream is not None else sys.stderr
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=label, unit=unit, file=stream, dynamic_ncols=True,
                            smoothing=0.1)
            self._ticker = None
        else:
            self._ticker = threading.Thread(target=self._tick, name=f"cotd-progress-{label}", daemon=True)
            self._ticker.start()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, rows: int, tokens: int = 0, note: str | None = None, **counts: int) -> None:
        """`rows` more done, `tokens` more produced; `counts` add up (correct so far), `note` is the
        latest state (a loss)."""
        with self._lock:
            self.rows += rows
            self.tokens += tokens
            if note is not None:
                self.note = note
            for k, v in counts.items():
                self.extra[k] = self.extra.get(k, 0) + v
            if self.bar is not None:
                self.bar.update(rows)
                self.bar.set_postfix_str(self._counts(), refresh=False)
                return
            now = time.monotonic()
            # the first results show at once, then a line every `every` seconds, and the last
            if self.rows == rows or now - self.last >= self.every or self.done + self.rows >= self.total:
                self.last = now
                self.log(self.line())

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=1)
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                now = time.monotonic()
                if now - self.last >= self.every and self.done + self.rows < self.total:
                    self.last = now
                    self.log(self.line())

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def _counts(self) -> str:
        t = max(self.elapsed(), 1e-9)
        return " | ".join(([self.note] if self.note else []) + [f"{self.tokens / t:.0f} tok/s"]
                          + [f"{k} {v}" for k, v in self.extra.items()])

    def line(self) -> str:
        t = max(self.elapsed(), 1e-9)
        done = self.done + self.rows
        pct = 100.0 * done / self.total if self.total else 100.0
        if not self.rows:
            return f"[{self.label}] {done}/{self.total} {self.unit} | working, none finished yet | elapsed {t:.0f}s"
        rate = self.rows / t
        eta = (self.total - done) / rate
        return (f"[{self.label}] {done}/{self.total} ({pct:.0f}%) | {rate:.2f} {self.unit}/s | "
                f"{self._counts()} | elapsed {t:.0f}s | eta {eta:.0f}s")
