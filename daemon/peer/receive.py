"""The destination's stream: chunks received, and each vCPU applied as soon as all its registers arrived.

Chunks come in vCPU order (chunks._chunks): when a chunk arrives, every vCPU below the highest one it carries is
complete (a vCPU is split over chunks only when it has more registers than a chunk holds), and at StreamEnd all
are. A complete vCPU is checked against the VM profile the plan was computed from (its VM-wide registers must be
the profile's: the staged apply wrote those in pre-flight) and handed to StagedApply.state - in worker threads on
the real backend (its batch ioctls release the GIL while the next chunk is read), in line after StreamEnd on the
simulated host (pure Python: a thread would only add hand-offs, and applying between chunks would only slow the
read). A failure does not stop the stream: the first one is kept and raised by `wait`, after StreamEnd (an EBUSY
replay, NeedsFullApply, lets the caller apply everything anew).
"""
from __future__ import annotations

from collections import deque
from typing import Sequence

import trio

from ...protocol import schemas as S
from ...protocol import session as ps
from ...protocol.regset import RegisterSet
from ..kvm.backend import threaded, worker_threads
from ..staged import StagedApply
from ..vmprofile import stream_deviations
from .chunks import _regsets
from .link import PeerError


class StreamApplier:
    """Runs the state phase of each vCPU as it completes; `received` keeps every chunk (the fallback's input).

    Worker threads are started with trio.lowlevel.start_thread_soon, at most `threads_max` at once, each taking
    the next queued vCPU until none is left (one hand-off per worker, not per vCPU), and report back to the trio
    thread: no nursery, so the receive loop's own errors reach the caller as they are. The VM is
    never closed while a thread may still use its file descriptors: `drain()` first (a descriptor closed under a
    running ioctl loop could be reused by another VM's)."""

    def __init__(self, staged: StagedApply | None, vm: S.VmProfile, threads_max: int | None = None) -> None:
        self.staged, self.vm = staged, vm
        self.threads = staged is not None and threaded(staged.backend)
        self.threads_max = threads_max or worker_threads()
        self.received: list[ps.VcpuChunk] = []
        self._pending: dict[int, list[RegisterSet]] = {}
        self.failure: BaseException | None = None
        self._queue: deque = deque()
        self._deferred: list = []
        self._running = 0
        self._idle = trio.Event()
        self._idle.set()
        self._token = trio.lowlevel.current_trio_token()

    def chunk(self, c: ps.VcpuChunk) -> None:
        self.received.append(c)
        if not self.threads:                   # split at StreamEnd (nothing is applied before it here)
            return
        per = c.per_vcpu()
        top = max(per)
        for i, rs in per.items():
            self._pending.setdefault(i, []).append(rs)
        ready = [i for i in self._pending if i < top]
        if ready:
            self._dispatch(sorted(ready))

    def end(self) -> None:
        """StreamEnd: every vCPU still pending is complete."""
        if not self.threads:
            self._pending = {i: [rs] for i, rs in _regsets(self.received).items()}
        self._dispatch(sorted(self._pending))

    def _dispatch(self, ready: Sequence[int]) -> None:
        batch = [(i, RegisterSet.concat(self._pending.pop(i))) for i in ready]
        if self.staged is None or self.failure is not None:
            return
        if not self.threads:                   # the simulated host: applied at StreamEnd, in line (pure Python: the
            self._deferred.extend(batch)       # total is the same, and the stream is read without pauses)
            return
        self._queue.extend(batch)              # one vCPU per item: the workers share a chunk's vCPUs
        if self._idle.is_set():
            self._idle = trio.Event()
        self._pump()

    def _pump(self) -> None:
        while self._queue and self._running < min(self.threads_max, len(self._queue) + self._running):
            self._running += 1
            trio.lowlevel.start_thread_soon(self._worker, self._deliver)

    def _worker(self) -> None:                 # a worker thread: the next vCPU until none is left
        while True:
            try:
                item = self._queue.popleft()   # deque: safe between threads
            except IndexError:
                return
            self._apply(item)

    def _deliver(self, outcome) -> None:       # in the worker thread, its work done (_worker never raises)
        try:
            self._token.run_sync_soon(self._finished)
        except trio.RunFinishedError:
            pass

    def _finished(self) -> None:               # back in the trio thread
        self._running -= 1
        self._pump()                           # a vCPU queued while this worker was leaving
        if not self._running and not self._queue:
            self._idle.set()

    def _apply(self, item) -> None:
        if self.failure is not None:
            return
        i, rs = item
        try:
            bad = stream_deviations(self.vm, {i: rs})
            if bad:
                raise PeerError("apply", "the streamed registers are not the VM the plan was computed for: "
                                + "; ".join(bad))
            self.staged.state(i, rs)
        except Exception as e:          # kept for wait(): the stream goes on to its end (see the module doc)
            if self.failure is None:
                self.failure = e

    async def drain(self, stop: bool = False) -> None:
        """Every started thread finished. stop (the migration is over): the vCPUs still queued are not applied;
        neither are they once a failure was kept."""
        if stop:
            self._deferred.clear()
        if self.failure is not None or stop:
            self._queue.clear()
            if not self._running:
                self._idle.set()
        await self._idle.wait()

    async def wait(self) -> None:
        """Every dispatched vCPU applied; raises the first failure."""
        for item in self._deferred:
            self._apply(item)
        self._deferred.clear()
        await self.drain()
        if self.failure is not None:
            raise self.failure
