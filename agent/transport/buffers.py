"""Recycled memory for received payloads (push and state transfer alike)."""

from __future__ import annotations

import threading
from typing import Final

import numpy
import torch


class ReceiveBufferPool:
    """Recycles the memory of received payloads once nothing references it any more.

    A fresh multi-megabyte buffer per received vector costs one page fault per 4 KiB page the first
    time it is written (plus an munmap when it is freed): ~16k faults, 20+ ms per 64 MiB, about a
    quarter of the receiver's CPU per push. The pool hands out buffers whose memory is returned here
    only when the last tensor, view or storage using it has been garbage collected (the tensor's
    storage keeps a numpy array alive, whose base is a `_PooledBlock` that returns the memory from its
    `__del__`), so recycled memory can never alias a vector someone still holds. Buffers below
    `min_bytes` come from the allocator as before; at most `max_idle_bytes` are kept idle.
    """

    def __init__(self, *, min_bytes: int = 1 << 20, max_idle_bytes: int = 1 << 30) -> None:
        self._min_bytes = min_bytes
        self._max_idle_bytes = max_idle_bytes
        self._idle: dict[int, list[torch.Tensor]] = {}
        self._idle_bytes = 0
        # __del__ may run in any thread, even while this thread holds the lock (GC triggered by an
        # allocation inside it), so releases only try the lock and drop the memory if it is busy.
        self._lock = threading.Lock()

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 CPU tensor of `nbytes` with unspecified contents, private to the caller."""
        if nbytes < self._min_bytes:
            return torch.empty(nbytes, dtype=torch.uint8)
        memory = None
        with self._lock:
            idle = self._idle.get(nbytes)
            if idle:
                memory = idle.pop()
                self._idle_bytes -= nbytes
        if memory is None:
            memory = torch.empty(nbytes, dtype=torch.uint8)
        return torch.from_numpy(numpy.asarray(_PooledBlock(memory, self)))

    def _release(self, memory: torch.Tensor) -> None:
        nbytes = memory.numel()
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._idle_bytes + nbytes > self._max_idle_bytes:
                # Make room by dropping other sizes first: the size just released is the one in use.
                for size in [size for size in self._idle if size != nbytes]:
                    self._idle_bytes -= size * len(self._idle.pop(size))
            if self._idle_bytes + nbytes <= self._max_idle_bytes:
                self._idle.setdefault(nbytes, []).append(memory)
                self._idle_bytes += nbytes
        finally:
            self._lock.release()


class _PooledBlock:
    """numpy's view of pooled memory; returns the memory to its pool when the last user is gone."""

    __slots__ = ("__array_interface__", "_memory", "_pool")

    def __init__(self, memory: torch.Tensor, pool: ReceiveBufferPool) -> None:
        self._memory = memory
        self._pool = pool
        self.__array_interface__ = {
            "data": (memory.data_ptr(), False),
            "shape": (memory.numel(),),
            "typestr": "|u1",
            "version": 3,
        }

    def __del__(self) -> None:
        self._pool._release(self._memory)


# Shared by every receiver in the process (push and state transfer alike).
RECEIVE_BUFFERS: Final = ReceiveBufferPool()
