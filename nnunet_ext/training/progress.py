"""Progress of the training iterations of one epoch, for the console only (never nnU-Net's log file).

nnU-Net prints once per epoch; a full epoch (250 iterations) of a 3D network on a CPU takes many minutes, in which
nothing would appear. ``EpochProgress`` shows iterations done / total, the current loss and the time left in the epoch:

- on a terminal (``stream.isatty()``): a live ``tqdm`` bar, e.g. ``epoch 3/20: 40%|████  | 10/25 [00:31<00:47,
  loss=0.4123]``, removed when the epoch ends (nnU-Net's epoch summary follows);
- otherwise (a pipe or a file: ``nnunet_ext_demo``'s step log, ``nnUNetv2_train ... > log``): one plain line after
  the first iteration, then at most one every ``interval_s`` seconds, and one after the last iteration, e.g.
  ``epoch 3/20: 10/25 iterations, loss 0.4123, 31 s elapsed, 47 s left``.

The trainer creates one per epoch on rank 0 only (DDP: the other ranks print nothing).
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from tqdm import tqdm


def format_seconds(seconds: float) -> str:
    """``47 s``, ``3 min 05 s`` or ``1 h 02 min``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class EpochProgress:
    """Progress of ``total`` training iterations of epoch ``epoch`` (0-based) of ``num_epochs``."""

    def __init__(self, epoch: int, num_epochs: int, total: int, stream: Optional[TextIO] = None,
                 interval_s: float = 10.0, clock=time.perf_counter):
        if total < 1:
            raise ValueError(f"an epoch needs at least one iteration, got {total}")
        self.stream = sys.stderr if stream is None else stream
        self.label = f"epoch {epoch + 1}/{num_epochs}"
        self.total, self.interval_s, self.clock = total, interval_s, clock
        self.done = 0
        self.start = self.last_line = clock()
        # no dynamic_ncols: tqdm prints nothing on a terminal that reports 0 columns (a pty without a window size)
        self.bar = tqdm(total=total, desc=self.label, file=self.stream, leave=False) if self.stream.isatty() else None

    def update(self, loss: float) -> None:
        """One more iteration done, with its loss."""
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={loss:.4f}", refresh=False)
            self.bar.update(1)
            return
        now = self.clock()
        if self.done == 1 or self.done == self.total or now - self.last_line >= self.interval_s:
            self.last_line = now
            elapsed = now - self.start
            left = elapsed / self.done * (self.total - self.done)
            print(f"{self.label}: {self.done}/{self.total} iterations, loss {loss:.4f}, "
                  f"{format_seconds(elapsed)} elapsed, {format_seconds(left)} left", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
