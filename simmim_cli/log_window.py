"""What the engine prints and logs every ``--log-every`` steps: loss, throughput, time waiting for data and
non-finite steps, accumulated on the device so that a training step never waits for the host."""

from __future__ import annotations

import contextlib
import time

import torch


class LogWindow:
    """Loss, throughput, time waiting for data and non-finite steps since the last log line, kept on the device
    until it is printed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.grad_norm: torch.Tensor | None = None
        self.nonfinite_total: torch.Tensor | None = None  # since the start of this process
        self.nonfinite_run = torch.zeros((), dtype=torch.int64, device=device)
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.count = 0
        self.images = 0
        self.waited = 0.0
        self.paused_seconds = 0.0
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is left out of the window's throughput (checkpoints, evaluation)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - started

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum += loss.float()
        self.count += 1
        self.images += images

    def count_step(self, nonfinite: torch.Tensor) -> None:
        nonfinite = nonfinite.to(torch.int64)
        self.nonfinite_total = nonfinite if self.nonfinite_total is None else self.nonfinite_total + nonfinite
        self.nonfinite_run = (self.nonfinite_run + 1) * nonfinite  # back to 0 at a finite step

    def nonfinite_counts(self, steps: int, in_a_row: int) -> tuple[int, int]:
        """(non-finite steps in the run, non-finite steps in a row up to now), given the counts last read
        (``steps``, ``in_a_row``)."""
        if self.nonfinite_total is None:
            return steps, in_a_row
        new, run = torch.stack([self.nonfinite_total, self.nonfinite_run]).tolist()
        self.nonfinite_total = None
        return steps + new, run

    def flush(self) -> tuple[float, int, int, float, float]:
        seconds = time.perf_counter() - self.started - self.paused_seconds
        result = (float(self.loss_sum), self.count, self.images, seconds, self.waited)
        self._reset()
        return result

    def last_grad_norm(self) -> float | None:
        return round(float(self.grad_norm), 4) if self.grad_norm is not None else None
