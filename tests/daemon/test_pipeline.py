"""peer/pipeline.BackgroundRead: the paused source VM read in worker threads while its first vCPUs stream."""
from __future__ import annotations

import pytest
import trio

from invariantd.daemon.kvm.errors import KvmError
from invariantd.daemon.peer.link import same_host
from invariantd.daemon.peer.pipeline import BackgroundRead
from invariantd.daemon.readback import read_vm
from support.faultkvm import sim_vcpus


async def test_parts_taken_in_order_equal_a_whole_read():
    vcpus = sim_vcpus(n=7)
    reader = BackgroundRead(vcpus, sorted(vcpus), threads=3)
    got = {}
    try:
        for k in range(0, 7, 3):
            part = await reader.take(list(range(k, min(k + 3, 7))))
            assert sorted(part) == list(range(k, min(k + 3, 7)))
            got.update(part)
    finally:
        await reader.close()
    assert got == read_vm(vcpus)


class _Broken:
    """A vCPU whose registers cannot be read (KVM_GET_ONE_REG fails)."""

    def __init__(self, inner):
        self._inner = inner

    def reg_list(self):
        return self._inner.reg_list()

    def get_regs(self, ids):
        raise KvmError("KVM_GET_ONE_REG", 5, ids[0], "vCPU gone")


async def test_a_read_error_is_raised_by_the_take_that_needs_it_and_stops_the_readers():
    vcpus = sim_vcpus(n=6)
    vcpus[4] = _Broken(vcpus[4])
    reader = BackgroundRead(vcpus, sorted(vcpus), threads=2)
    try:
        assert sorted(await reader.take([0, 1, 2, 3])) == [0, 1, 2, 3]
        with pytest.raises(KvmError) as ei:
            await reader.take([4, 5])
        assert ei.value.errno_name == "EIO"
    finally:
        await reader.close()
    assert reader._running == 0                 # close() returned: no thread uses the vCPUs any more


async def test_same_host_knows_a_loopback_peer():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        assert same_host(stream) and same_host(trio.SSLStream(stream, __import__("ssl").create_default_context()))
        assert not same_host(object())
    finally:
        await stream.aclose()
        for lst in listeners:
            await lst.aclose()
