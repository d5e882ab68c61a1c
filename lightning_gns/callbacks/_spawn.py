"""Carry the final readouts of a fit run in spawned processes back to the process that built the callback.

``strategy="ddp_spawn"`` (and ``"ddp_notebook"``, which forks) runs ``Trainer.fit`` in child processes; the
callback object of the main process never sees a hook, and Lightning brings back only the model's weights and
``trainer.callback_metrics``. The channel here is a small block of shared memory made when the callback is
built: torch.multiprocessing hands a shared tensor to a spawned child as a handle to the same memory, and a
forked child inherits the mapping. Rank 0 writes its readouts there at the end of fit; the main process reads
them when a readout is asked for.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

_HEADER = 2  # int64 words: how many results were written so far, the length of the last one in bytes


class SpawnedResult:
    """Shared memory for one JSON payload, written by a child process and read by the one that made it."""

    def __init__(self, size: int = 1 << 18) -> None:
        self.creator_pid = os.getpid()
        self._read_count = 0
        self.buffer: torch.Tensor | None
        try:
            self.buffer = torch.zeros(size, dtype=torch.uint8).share_memory_()
        except (RuntimeError, OSError):  # no shared memory on this system: nothing comes back
            self.buffer = None

    @property
    def in_child(self) -> bool:
        """Whether this process is not the one that built the callback (a spawned or forked worker)."""
        return os.getpid() != self.creator_pid

    def _header(self) -> torch.Tensor:
        assert self.buffer is not None
        return self.buffer[: 8 * _HEADER].view(torch.int64)

    def write(self, payload: dict[str, Any]) -> bool:
        """Store ``payload`` (JSON numbers, NaN included); False if there is no shared memory or it is too large."""
        if self.buffer is None:
            return False
        data = json.dumps(payload).encode()
        start = 8 * _HEADER
        if start + len(data) > self.buffer.numel():
            return False
        self.buffer[start : start + len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        header = self._header()
        header[1] = len(data)
        header[0] += 1  # last: a reader sees a new count only with the whole payload in place
        return True

    def read(self) -> dict[str, Any] | None:
        """The payload written since the last read in this process, or None."""
        if self.buffer is None:
            return None
        header = self._header()
        count, length = int(header[0]), int(header[1])
        if count == self._read_count:
            return None
        self._read_count = count
        start = 8 * _HEADER
        payload: dict[str, Any] = json.loads(bytes(self.buffer[start : start + length].numpy()).decode())
        return payload
