"""The paused source VM read in the background while its first vCPUs are already streaming (real KVM only).

Worker threads (as many as worker_threads(): the batch ioctls release the GIL) take the vCPUs in index order and
read each one whole; the trio side awaits a prefix of that order (`take`) and sends its chunks while the threads
read on. On two hosts the destination then applies the first vCPUs while the source reads the last ones: the
blackout becomes about the slower side's work instead of the sum of both (bench_stream --real --pin: two one-CPU
hosts, 256 vCPUs, 179 -> ~131 ms).

Started with trio.lowlevel.start_thread_soon (no nursery: a read error reaches the caller as the KvmError it is,
from `take`); `close()` stops handing out vCPUs and waits until no thread still uses the VM's descriptors.
"""
from __future__ import annotations

import threading
from typing import Mapping, Sequence

import trio

from ..kvm.backend import Vcpu
from ..readback import read_vm
from ...protocol.regset import RegisterSet


class BackgroundRead:
    def __init__(self, vcpus: Mapping[int, Vcpu], order: Sequence[int], threads: int) -> None:
        self.vcpus, self.order = vcpus, list(order)
        self.got: dict[int, RegisterSet | BaseException] = {}
        self._next = 0
        self._stop = False
        self._lock = threading.Lock()
        self._token = trio.lowlevel.current_trio_token()
        self._changed = trio.Event()
        self._running = max(1, min(threads, len(self.order)))
        self._idle = trio.Event()
        for _ in range(self._running):
            trio.lowlevel.start_thread_soon(self._work, self._deliver)

    def _work(self) -> None:                    # a worker thread: the next vCPU in order until none is left
        while True:
            with self._lock:
                if self._stop or self._next >= len(self.order):
                    return
                i = self.order[self._next]
                self._next += 1
            try:
                got: RegisterSet | BaseException = read_vm({i: self.vcpus[i]})[i]
            except Exception as e:              # KvmError: raised by take() for this vCPU
                got = e
            with self._lock:
                self.got[i] = got
                if isinstance(got, BaseException):
                    self._stop = True
            self._wake()

    def _wake(self) -> None:
        try:
            self._token.run_sync_soon(self._changed.set)
        except trio.RunFinishedError:
            pass

    def _deliver(self, outcome) -> None:        # in the worker thread, its work done (_work never raises)
        try:
            self._token.run_sync_soon(self._left)
        except trio.RunFinishedError:
            pass

    def _left(self) -> None:                    # back in the trio thread
        self._running -= 1
        if not self._running:
            self._idle.set()
        self._changed.set()

    async def take(self, indices: Sequence[int]) -> dict[int, RegisterSet]:
        """These vCPUs' register sets, once all are read; raises the first vCPU's read error among them."""
        while True:
            with self._lock:
                missing = [i for i in indices if i not in self.got]
                failed = next((self.got[i] for i in indices if isinstance(self.got.get(i), BaseException)), None)
            if failed is not None:
                raise failed
            if not missing:
                return {i: self.got[i] for i in indices}
            if not self._running and self._idle.is_set():
                raise RuntimeError(f"vCPU(s) {missing[:4]} were never read (the reader stopped)")
            await self._changed.wait()
            self._changed = trio.Event()

    async def close(self) -> None:
        """No vCPU is handed out any more; returns once every thread left."""
        with self._lock:
            self._stop = True
        with trio.CancelScope(shield=True):
            await self._idle.wait()
