"""Progress lines for long stages: rows/s and tokens/s, at most one line every `every` seconds."""

from __future__ import annotations

import time


class Progress:
    def __init__(self, total: int, label: str, every: float = 10.0, log=print):
        self.total, self.label, self.every, self.log = total, label, every, log
        self.start = self.last = time.monotonic()
        self.rows = self.tokens = 0
        self.extra: dict[str, int] = {}

    def update(self, rows: int, tokens: int = 0, **counts: int) -> None:
        self.rows += rows
        self.tokens += tokens
        for k, v in counts.items():
            self.extra[k] = self.extra.get(k, 0) + v
        now = time.monotonic()
        if now - self.last >= self.every or self.rows >= self.total:
            self.last = now
            self.log(self.line())

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def line(self) -> str:
        t = max(self.elapsed(), 1e-9)
        pct = 100.0 * self.rows / self.total if self.total else 100.0
        rate = self.rows / t
        eta = (self.total - self.rows) / rate if rate > 0 else float("inf")
        extra = "".join(f" | {k} {v}" for k, v in self.extra.items())
        eta_s = f"{eta:.0f}s" if eta != float("inf") else "?"
        return (f"[{self.label}] {self.rows}/{self.total} ({pct:.0f}%) | {rate:.2f} rows/s | "
                f"{self.tokens / t:.0f} tok/s{extra} | elapsed {t:.0f}s | eta {eta_s}")
