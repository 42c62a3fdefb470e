"""Batches on the training device, the next one already on its way."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from .errors import SimmimError
from .log_window import LogWindow


class DevicePrefetcher:
    """Batches on the training device, the next one already on its way: on a GPU it is copied from pinned
    memory on a side stream while the current batch computes. Time spent waiting for the loader is added to
    the window (``data_wait``)."""

    def __init__(self, batches: Any, device: torch.device, window: LogWindow):
        self.batches, self.device, self.window = batches, device, window
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ready: dict[str, Any] | None = None
        self.started = False  # the first batch is asked for at the first __next__, inside the caller's try

    def _load(self) -> dict[str, Any] | None:
        started = time.perf_counter()
        try:
            batch = next(self.batches)
        except StopIteration:
            return None
        except RuntimeError as error:
            if "shared memory" in str(error) or "shm" in str(error):
                raise SimmimError("the data loader ran out of shared memory (/dev/shm); lower --workers or "
                                  "--batch-size, or give the container more (docker run --shm-size=16g)") from error
            raise
        finally:
            self.window.waited += time.perf_counter() - started
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def close(self) -> None:
        """Stops the loader's worker processes now (not whenever the iterator is collected)."""
        shutdown = getattr(self.batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __next__(self) -> dict[str, Any]:
        if not self.started:
            self.ready, self.started = self._load(), True
        batch = self.ready
        if batch is None:
            raise StopIteration
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)  # the copy is done before the step uses it
            for value in batch.values():
                if torch.is_tensor(value):
                    value.record_stream(current)  # its memory is not reused before the step is done with it
        self.ready = self._load()
        return batch
