"""Progress output: a tqdm bar on a terminal, plain lines in a batch log.

A Slurm log or a file full of carriage-return bar redraws is unreadable, so when
stdout is not a terminal the same information comes as one line per report, at most
every ``every`` seconds.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """Reports samples processed against a total, with a few named figures."""

    def __init__(self, total: int, desc: str, every: float = 10.0, stream=None):
        self.stream = stream or sys.stdout
        self.total, self.desc, self.every = total, desc, every
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if self.stream.isatty():
            self.bar = tqdm(total=total, desc=desc, unit="sample", unit_scale=True,
                            file=self.stream, dynamic_ncols=True)

    def update(self, n: int, **figures) -> None:
        """Count ``n`` more samples; ``figures`` (e.g. ``test_acc=0.61``) are shown."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if figures:
                self.bar.set_postfix({k: _fmt(v) for k, v in figures.items()}, refresh=False)
            return
        # Plain lines only come with fresh figures (after an evaluation), rate-limited.
        now = time.perf_counter()
        if figures and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            self.line(figures)

    def line(self, figures: dict) -> None:
        elapsed = time.perf_counter() - self.start
        pct = 100.0 * self.done / max(self.total, 1)
        parts = " ".join(f"{k}={_fmt(v)}" for k, v in figures.items())
        print(f"{self.desc}: {pct:5.1f}% {self.done}/{self.total} samples "
              f"{elapsed:7.1f}s {parts}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
