"""peer/receive.StreamApplier: vCPUs applied as their chunks complete, in worker threads on the real backend; a
failure kept for after StreamEnd; an abort applies nothing more and returns only once no thread is running."""
from __future__ import annotations

import threading

import pytest
import trio

from invariantd.daemon.peer.receive import StreamApplier
from invariantd.protocol import session as ps
from invariantd.protocol.regset import RegisterSet
from invariantd.protocol.schemas import VmProfile

IDS = (0x6030000000100000, 0x6030000000100002)          # two arm64 core registers
VM = VmProfile("vm", 1, (), ())


class Staged:
    """StagedApply's interface as StreamApplier uses it, on a backend that counts as real KVM (threads)."""
    backend = type("Kvm", (), {"kind": "kvm"})()

    def __init__(self, fail_on=None):
        self.done, self.threads, self.fail_on = [], set(), fail_on
        self.gate = threading.Event()
        self.gate.set()

    def state(self, i, rs):
        self.threads.add(threading.get_ident())
        assert self.gate.wait(5)
        if i == self.fail_on:
            raise RuntimeError(f"vCPU {i} refused")
        self.done.append((i, rs.values()))


def chunk(first: int, n: int) -> ps.VcpuChunk:
    return ps.VcpuChunk.build_multi("vm", first, 0, IDS, [RegisterSet.from_values(IDS, [i, i + 1])
                                                         for i in range(first, first + n)])


async def test_each_vcpu_applied_once_in_worker_threads():
    st = Staged()
    rx = StreamApplier(st, VM, threads_max=2)
    rx.chunk(chunk(0, 4))
    rx.chunk(chunk(4, 3))
    rx.end()
    await rx.wait()
    assert sorted(st.done) == [(i, [i, i + 1]) for i in range(7)]
    assert threading.get_ident() not in st.threads


async def test_a_failure_is_raised_after_the_stream_and_the_rest_is_not_applied():
    st = Staged(fail_on=2)
    rx = StreamApplier(st, VM, threads_max=1)
    rx.chunk(chunk(0, 5))
    rx.end()
    with pytest.raises(RuntimeError, match="vCPU 2 refused"):
        await rx.wait()
    assert [i for i, _ in st.done] == [0, 1]


async def test_stop_applies_nothing_more_and_waits_for_the_running_thread():
    st = Staged()
    st.gate.clear()                                       # the first vCPU's ioctls "take long"
    rx = StreamApplier(st, VM, threads_max=1)
    rx.chunk(chunk(0, 8))                                 # vCPUs 0..6 complete, 7 pending
    with trio.fail_after(5):
        while not st.threads:                             # the worker is inside vCPU 0's state phase
            await trio.sleep(0.001)
    stopped = trio.Event()

    async def stop():
        await rx.drain(stop=True)
        stopped.set()
    async with trio.open_nursery() as n:
        n.start_soon(stop)
        await trio.sleep(0.05)
        assert not stopped.is_set()                       # vCPU 0's thread still runs: the VM must stay open
        st.gate.set()
    assert [i for i, _ in st.done] == [0]
