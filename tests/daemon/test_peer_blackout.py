"""Blackout: the source VM runs through handshake, plan agreement and the destination's pre-flight; it is
paused only to read and stream its registers. After the pause the VM profile the plan was computed from is
read again: any change aborts cleanly (VM resumed, nothing moved)."""
from __future__ import annotations

import pytest
import trio

from support.fixtures import Passthrough

from invariantd.daemon.readback import read_vm
from invariantd.daemon.peer import profile_changes, profile_regsets, profile_view, vm_profile
from invariantd.daemon.sim.host import SimHost
from invariantd.daemon.vms import VmRegistry, VmState
from invariantd.protocol.catalog import catalog
from invariantd.protocol.policy import default_policy
from invariantd.daemon import tls
from invariantd.daemon.peer import PeerError, migrate_out
from support.peers import CFG, Node, Recording

CAT = catalog()
ISAR0, TCR2 = CAT.id_of("ID_AA64ISAR0_EL1"), CAT.id_of("TCR2_EL1")


class StateAtSend(Passthrough, trio.abc.Stream):
    """Records the source VM's state whenever a frame goes out (kind of the first message in the write)."""

    def __init__(self, inner, registry):
        self.inner, self.registry, self.seen = inner, registry, []

    async def send_all(self, data):
        self.seen.append(self.registry.get("vm-1").state)
        await self.inner.send_all(data)


async def source_and_destination(nursery, pki, src="cortex-a72-r0p3@6.12", dst="cortex-a72-r0p4@7.3", vcpus=2):
    a = Node(SimHost(src), pki, "node-a")
    a.registry.create("vm-1", vcpus)
    b = Node(SimHost(dst), pki)
    _, port = await b.listen(nursery)
    return a, b, await tls.connect("127.0.0.1", port, a.client_ctx, server_hostname="localhost")


async def test_vm_runs_until_preflight_then_pauses_for_the_stream(nursery, pki):
    """Hello and PlanProposal leave while the VM runs; chunks and StreamEnd while it is paused; the source's
    Commit after it released the VM."""
    a, b, stream = await source_and_destination(nursery, pki, vcpus=3)
    rec = StateAtSend(Recording(stream), a.registry)
    res = await migrate_out(rec, a.registry, "vm-1", cfg=CFG, metrics=a.metrics)
    with trio.fail_after(5):
        await b.done.wait()
    assert res.result == "committed"
    assert a.registry.get("vm-1").history == ["running->paused", "paused->released"]
    sent = rec.inner.sent
    assert sent[:2] == ["Hello", "PlanProposal"] and sent[-2:] == ["StreamEnd", "Commit"]
    seen = rec.seen                                   # one entry per write (chunks are coalesced)
    assert seen[:2] == [VmState.RUNNING, VmState.RUNNING]
    assert set(seen[2:-1]) == {VmState.PAUSED} and seen[-1] is VmState.RELEASED
    assert a.metrics.phase_seconds.labels("read")._sum.get() > 0     # pause -> read, checked, encoded


async def test_drift_register_changed_after_the_plan_aborts_cleanly(nursery, pki):
    """The guest writes TCR2_EL1 (a drift register the plan depends on) after the plan was computed: the
    check after the pause catches it, the source aborts before any chunk, the VM runs again here."""
    a, b, stream = await source_and_destination(nursery, pki)
    rec = Recording(stream)

    def guest_writes(plan):
        a.registry.get("vm-1").vcpus[1].set_reg(TCR2, 0x1)
    with pytest.raises(PeerError) as ei:
        await migrate_out(rec, a.registry, "vm-1", cfg=CFG, on_plan=guest_writes)
    with trio.fail_after(5):
        await b.done.wait()
    err = ei.value
    assert err.kind == "vm" and "changed between plan and pause" in str(err)
    assert "TCR2_EL1: 0x0 at plan time, 0x1 after the pause" in str(err)
    assert a.registry.get("vm-1").history == ["running->paused", "paused->running"]
    assert "VcpuChunk" not in rec.sent and "StreamEnd" not in rec.sent and rec.sent[-1] == "Abort"
    assert b.results == [None] and b.registry.vms == {}


def test_profile_regsets_reads_what_the_profile_needs():
    pol = default_policy()
    reg = VmRegistry(SimHost("cortex-a72-r0p3@6.12"))
    mvm = reg.create("vm", 3, regs={2: [(TCR2, 0x5)]})
    full = read_vm(mvm.vcpus)
    part = profile_regsets(mvm.vcpus, pol)
    assert part == profile_view(full, pol)
    assert len(part[1]) < len(full[1]) and part[0] == full[0]
    a = vm_profile("vm", mvm.init, part, reg.backend, pol)
    assert a == vm_profile("vm", mvm.init, full, reg.backend, pol)
    assert profile_changes(a, a) == []
    mvm.vcpus[2].set_reg(TCR2, 0x7)
    b = vm_profile("vm", mvm.init, profile_regsets(mvm.vcpus, pol), reg.backend, pol)
    [msg] = profile_changes(a, b)
    assert msg == "TCR2_EL1: 0x5 at plan time, 0x7 after the pause"


def test_profile_changes_names_an_id_register():
    pol = default_policy()
    reg = VmRegistry(SimHost("cortex-a72-r0p3@6.12"))
    mvm = reg.create("vm", 1)
    a = vm_profile("vm", mvm.init, profile_regsets(mvm.vcpus, pol), reg.backend, pol)
    vals = dict(a.values)
    from dataclasses import replace
    b = replace(a, values=tuple(sorted({**vals, ISAR0: vals[ISAR0] ^ 0x10}.items())))
    [msg] = profile_changes(a, b)
    assert msg.startswith("ID_AA64ISAR0_EL1: ") and "after the pause" in msg
