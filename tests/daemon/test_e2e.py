"""End to end on loopback with the shipped host profiles (measured on real kernels): two daemons' peer code
over mutual TLS, both running the negotiation engine, agreeing on the plan digest, pre-flight, stream,
apply with the errno-aware retry, commit. TLS refusals and malformed / oversized frames: tests/daemon/test_peer.py.
"""
from __future__ import annotations

import errno as E
from dataclasses import replace

import pytest
import trio

from support.fixtures import Passthrough

from invariantd.daemon import tls
from invariantd.daemon.readback import read_vm
from invariantd.daemon.peer import PeerError, migrate_out
from invariantd.daemon.sim.host import SimHost
from invariantd.daemon.vms import VmState
from invariantd.protocol import session as ps
from invariantd.protocol.catalog import catalog
from invariantd.protocol.framing import FrameDecoder
from invariantd.protocol.plandigest import plan_digest
from invariantd.protocol.policy import loads
from invariantd.protocol.schemas import Verdict
from support.faultkvm import FaultBackend
from support.peers import CFG, CutAfter, Node, Recording

CAT = catalog()
MIDR, ISAR0, SCTLR, TCR2 = (CAT.id_of(n) for n in ("MIDR_EL1", "ID_AA64ISAR0_EL1", "SCTLR_EL1", "TCR2_EL1"))
R0P3, R0P4 = 0x410FD083, 0x410FD084
UNKNOWN_FILL = 0x1DE7EC7EDBADC0DE




def snapshot(node, vm_id="vm-1"):
    """The VM's registers on `node`; for a VM released by a committed migration (its state is then freed), the
    registers it had when it left (taken by migrate())."""
    m = node.registry.get(vm_id)
    return node.left[vm_id] if m.freed else read_vm(m.vcpus)


async def migrate(nursery, pki, src_spec, dst, *, vcpus=2, regs=None, wrap=None, **kw):
    """Source VM on `src_spec`, destination `dst` (a spec or a Node). -> (a, b, result or PeerError, recording)."""
    a = Node(SimHost(src_spec), pki, "node-a")
    a.registry.create("vm-1", vcpus, regs=regs)
    a.left = {"vm-1": snapshot(a)}
    b = dst if isinstance(dst, Node) else Node(SimHost(dst), pki)
    a.plans = []
    _, port = await b.listen(nursery)
    stream = Recording(await tls.connect("127.0.0.1", port, a.client_ctx, server_hostname="localhost"))
    try:
        out = await migrate_out(wrap(stream) if wrap else stream, a.registry, "vm-1", cfg=CFG, metrics=a.metrics,
                                on_plan=a.plans.append, **kw)
    except PeerError as e:
        out = e
    with trio.fail_after(5):
        await b.done.wait()
    return a, b, out, stream


def events(result):
    return {(e.register, e.errno, e.action) for e in result.events}


def assert_moved(a, b, res, expect_events, vcpus=2, changed=()):
    """Committed; source released; destination running and every register as on the source except `changed`."""
    assert res.result == "committed", res
    [r] = b.results
    assert r.result == "committed" and r.digest == res.digest and events(r) == expect_events
    assert a.registry.get("vm-1").state is VmState.RELEASED
    vm_b = b.registry.get("vm-1")
    assert vm_b.state is VmState.RUNNING and sorted(vm_b.vcpus) == list(range(vcpus))
    src = snapshot(a)
    for i, regs in src.items():
        listed = set(vm_b.vcpus[i].reg_list())
        dst = {r: vm_b.vcpus[i].get_reg(r) for r, _ in regs if r in listed}
        assert {r: v for r, v in regs if r in listed and r not in changed} == \
               {r: v for r, v in dst.items() if r not in changed}
    return vm_b


def assert_nothing_moved(a, b, before, rec):
    assert a.registry.get("vm-1").state is VmState.RUNNING
    # plan and pre-flight happen while the VM runs: a migration refused there never paused it
    assert a.registry.get("vm-1").history == []
    assert snapshot(a) == before                              # source VM intact
    assert "VcpuChunk" not in rec.sent and "StreamEnd" not in rec.sent
    assert b.results == [None] and b.registry.vms == {}


# --- the profile matrix ------------------------------------------------------------------------------------
async def test_identical_hosts(nursery, pki):
    a, b, res, rec = await migrate(nursery, pki, "cortex-a72-r0p3@6.12", "cortex-a72-r0p3@6.12")
    assert_moved(a, b, res, set())
    [plan] = a.plans
    assert plan.migratable and {e.verdict for e in plan.entries} == {Verdict.IDENTICAL}
    assert rec.sent.count("VcpuChunk") == 2 * -(-259 // CFG.chunk_registers)


async def test_next_revision_midr_override(nursery, pki):
    """6.12 without cap 239: MIDR is invariant; the plan allows r0p3 -> r0p4 (same part, errata check passed) and
    the apply writes the plan's value directly on each vCPU: an override, not a failed write."""
    a, b, res, _ = await migrate(nursery, pki, "cortex-a72-r0p3@6.12", "cortex-a72-r0p4@6.12")
    vm_b = assert_moved(a, b, res, {("MIDR_EL1", "-", "override-plan")}, changed={MIDR})
    assert all(v.get_reg(MIDR) == R0P4 for v in vm_b.vcpus.values())
    [plan] = a.plans
    assert [g.split(":")[0] for g in plan.guest_visible] == ["MIDR_EL1"]
    assert b.metrics.invariant_overrides.labels("MIDR_EL1", "override-plan")._value.get() == 2
    assert b.metrics.set_one_reg_failures.labels("MIDR_EL1", "EINVAL")._value.get() == 0


async def test_next_revision_on_7x_pins_midr_with_cap239(nursery, pki):
    a, b, res, _ = await migrate(nursery, pki, "cortex-a72-r0p3@7.3", "cortex-a72-r0p4@7.3")
    vm_b = assert_moved(a, b, res, set())
    assert vm_b.vm.cap239 and all(v.get_reg(MIDR) == R0P3 for v in vm_b.vcpus.values())
    [plan] = a.plans
    assert plan.enable_cap239 and plan.guest_visible == ()


async def test_older_kernel_to_newer_kernel_drops_drift_registers(nursery, pki):
    """6.12 lists TCR2/PIR/PIRE0 (PIR/PIRE0 at KVM's UNKNOWN fill), 7.3 does not: dropped on ENOENT at their
    reset values on every vCPU; MIDR pinned with cap 239; everything else as on the source."""
    a, b, res, _ = await migrate(nursery, pki, "cortex-a72-r0p3@6.12", "cortex-a72-r0p4@7.3")
    drops = {(n, "ENOENT", "drop-reset") for n in ("TCR2_EL1", "PIR_EL1", "PIRE0_EL1")}
    vm_b = assert_moved(a, b, res, drops)
    [plan] = a.plans
    assert sorted(e.register for e in plan.entries if e.verdict is Verdict.DROP) == ["PIRE0_EL1", "PIR_EL1",
                                                                                      "TCR2_EL1"]
    assert dict(snapshot(a)[0])[CAT.id_of("PIR_EL1")] == UNKNOWN_FILL
    assert plan.enable_cap239 and vm_b.vm.cap239 and vm_b.vcpus[1].get_reg(MIDR) == R0P3
    assert TCR2 not in vm_b.vcpus[0].reg_list()
    assert b.metrics.set_one_reg_failures.labels("PIR_EL1", "ENOENT")._value.get() == 2


async def test_refused_plan_moves_nothing(nursery, pki):
    """Cortex-A72 -> Neoverse-N1: a different part. The source's plan refuses; the Abort carries the plan's
    reasons; no chunk is sent; the source VM keeps running, unchanged; the destination holds nothing."""
    a = Node(SimHost("cortex-a72-r0p3@6.12"), pki, "node-a")
    a.registry.create("vm-1", 2)
    before = snapshot(a)
    b = Node(SimHost("neoverse-n1@6.12"), pki)
    aborts = []
    real = b.handler

    async def handler(stream, peer):            # record the Abort the destination received
        await real(Recording(stream), peer)
    b.handler = handler
    _, port = await b.listen(nursery)
    rec = Recording(await tls.connect("127.0.0.1", port, a.client_ctx, server_hostname="localhost"))
    with pytest.raises(PeerError) as ei:
        await migrate_out(rec, a.registry, "vm-1", cfg=CFG, on_plan=aborts.append)
    with trio.fail_after(5):
        await b.done.wait()
    e = ei.value
    assert e.kind == "plan" and "MIDR_EL1.PartNum: different PartNum" in str(e) and "errata" in str(e)
    assert rec.sent == ["Hello", "Abort"]
    assert_nothing_moved(a, b, before, rec)
    [plan] = aborts
    assert not plan.migratable
    assert b.metrics.migrations.labels("aborted")._value.get() == 1


async def test_drift_register_the_guest_cannot_reach_is_dropped_whatever_it_holds(nursery, pki):
    """TCR2_EL1 non-zero on vCPU 1 only, in a VM without FEAT_TCR2 (ID_AA64MMFR3_EL1.TCRX = 0): the guest cannot
    reach it, so the plan drops it by feature, not by value, and the destination kernel (7.3: not listed) never
    sees it."""
    a, b, res, _ = await migrate(nursery, pki, "cortex-a72-r0p3@6.12", "cortex-a72-r0p4@7.3", regs={1: [(TCR2, 0x1)]})
    assert res.result == "committed"
    [plan] = a.plans
    tcr2 = next(e for e in plan.entries if e.reg_id == TCR2 and not e.field)
    assert tcr2.verdict is Verdict.DROP and "FEAT_TCR2" in tcr2.reason


async def test_different_policies_disagree_on_the_digest(nursery, pki):
    """The destination recomputes the plan with its own policy: a source with another policy gets a digest
    mismatch naming the policies, before any state moves."""
    a = Node(SimHost("cortex-a72-r0p3@6.12"), pki, "node-a")
    a.registry.create("vm-1", 2)
    before = snapshot(a)
    b = Node(SimHost("cortex-a72-r0p4@6.12"), pki)
    _, port = await b.listen(nursery)
    rec = Recording(await tls.connect("127.0.0.1", port, a.client_ctx, server_hostname="localhost"))
    with pytest.raises(PeerError) as ei:
        await migrate_out(rec, a.registry, "vm-1", cfg=CFG, policy=loads('name = "lenient"'))
    with trio.fail_after(5):
        await b.done.wait()
    assert ei.value.kind == "aborted" and "plan digest mismatch" in str(ei.value)
    assert "different policies" in str(ei.value) and "lenient@1" in str(ei.value)
    assert_nothing_moved(a, b, before, rec)


async def test_tampered_plan_names_the_first_differing_entry(nursery, pki):
    """A source whose engine plans differently (here: claims MIDR is identical) is caught by the digest."""
    from invariantd.protocol.negotiate import negotiate

    def lying(vm, dest, pol):
        p = negotiate(vm, dest, pol)
        ents = tuple(replace(e, verdict=Verdict.IDENTICAL, planned=e.source, reason="same value")
                     if e.register == "MIDR_EL1" else e for e in p.entries)
        p = replace(p, entries=ents)
        return replace(p, digest=plan_digest(p))
    a, b, err, rec = await migrate(nursery, pki, "cortex-a72-r0p3@6.12", "cortex-a72-r0p4@6.12", planner=lying)
    assert isinstance(err, PeerError) and "first differing entry: source MIDR_EL1.Revision identical" in str(err)
    assert "VcpuChunk" not in rec.sent and b.registry.vms == {}


# --- retry classes through the daemons ---------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
async def test_einvariant_on_patched_destination(nursery, pki, kernel):
    """A kernel carrying the 2018 KVM_EINVARIANT proposal would refuse the source MIDR with EINVARIANT; the plan's
    override is written directly, so nothing is refused (pre-flight saw the same on its scratch vCPU)."""
    a, b, res, _ = await migrate(nursery, pki, f"cortex-a72-r0p3@{kernel}", f"cortex-a72-r0p4@{kernel}-patched")
    vm_b = assert_moved(a, b, res, {("MIDR_EL1", "-", "override-plan")}, changed={MIDR})
    assert vm_b.vcpus[0].get_reg(MIDR) == R0P4
    assert b.metrics.set_one_reg_failures.labels("MIDR_EL1", "EINVARIANT")._value.get() == 0


class FreezeNth(FaultBackend):
    """The n-th VM created (0 = the one the destination builds in pre-flight) behaves as if a vCPU had run: ID
    regs frozen."""

    def __init__(self, inner, frozen, **kw):
        super().__init__(inner, **kw)
        self.frozen, self.created = set(frozen), 0

    def create_vm(self, vm_type=0):
        vm = FaultBackend.create_vm(self, vm_type)
        if self.created in self.frozen:
            vm._inner.has_ran = True
        self.created += 1
        return vm


async def test_ebusy_replays_the_apply_once(nursery, pki):
    """The guest lowered ID_AA64ISAR0_EL1.CRC32 on the source (plan: set, writable and lower-safe). The
    destination's first VM (built in pre-flight) comes up frozen (something ran a vCPU): EBUSY -> recreate the VM,
    replay once."""
    b = Node(SimHost("cortex-a72-r0p4@6.12"), pki)
    b.host = FreezeNth(b.host, frozen={0})
    a, b, res, _ = await migrate(nursery, pki, "cortex-a72-r0p4@6.12", b, regs={0: [(ISAR0, 0x01120)]})
    vm_b = assert_moved(a, b, res, {("ID_AA64ISAR0_EL1", "EBUSY", "replay")})
    assert vm_b.vcpus[1].get_reg(ISAR0) == 0x01120
    assert b.host.created == 2 and b.host.vms[0].closed and not b.host.vms[1].closed


async def test_ebusy_twice_fails_the_preflight_and_the_source_never_pauses(nursery, pki):
    """Both VMs the destination builds in pre-flight come up frozen: the pre-flight says so (EBUSY, replayed
    once), before the source's VM was paused."""
    b = Node(SimHost("cortex-a72-r0p4@6.12"), pki)
    b.host = FreezeNth(b.host, frozen={0, 1})
    a, b, err, _ = await migrate(nursery, pki, "cortex-a72-r0p4@6.12", b, regs={0: [(ISAR0, 0x01120)]})
    assert isinstance(err, PeerError) and err.kind == "preflight" and "EBUSY" in str(err) and "once" in str(err)
    assert a.registry.get("vm-1").state is VmState.RUNNING and b.registry.vms == {}
    assert all(vm.closed for vm in b.host.vms)


@pytest.mark.parametrize("err", [E.EINTR, E.EAGAIN])
async def test_transient_errno_retried(nursery, pki, err):
    b = Node(SimHost("cortex-a72-r0p3@6.12"), pki)
    b.host = FaultBackend(b.host, faults={SCTLR: [err, err]})
    a, b, res, _ = await migrate(nursery, pki, "cortex-a72-r0p3@6.12", b)
    name = "EINTR" if err == E.EINTR else "EAGAIN"
    assert_moved(a, b, res, {("SCTLR_EL1", name, "retry-transient")})
    assert [e.action for e in b.results[0].events] == ["retry-transient"] * 2


async def test_transient_errno_bounded_source_resumes(nursery, pki):
    b = Node(SimHost("cortex-a72-r0p3@6.12"), pki)
    b.host = FaultBackend(b.host, faults={SCTLR: [E.EAGAIN] * 20})
    a, b, err, rec = await migrate(nursery, pki, "cortex-a72-r0p3@6.12", b)
    assert isinstance(err, PeerError) and err.kind == "aborted"
    assert "SCTLR_EL1" in str(err) and "EAGAIN" in str(err) and "retry-transient x3" in str(err)
    assert "StreamEnd" in rec.sent                     # it failed in the apply, after the stream
    assert a.registry.get("vm-1").state is VmState.RUNNING and b.registry.vms == {}
    assert all(vm.closed for vm in b.host.vms)


# --- the link -------------------------------------------------------------------------------------------------------
async def test_connection_cut_mid_stream(nursery, pki):
    """Hello, PlanProposal, chunks 0..2 pass; chunk 3 is cut half-way and the connection dropped: the source
    resumes its (unchanged) VM, the destination discards what it received."""
    a = Node(SimHost("cortex-a72-r0p3@6.12"), pki, "node-a")
    a.registry.create("vm-1", 2)
    before = snapshot(a)
    b = Node(SimHost("cortex-a72-r0p4@7.3"), pki)
    _, port = await b.listen(nursery)
    stream = await tls.connect("127.0.0.1", port, a.client_ctx, server_hostname="localhost")
    with pytest.raises(PeerError) as ei:
        await migrate_out(CutAfter(stream, 6), a.registry, "vm-1", cfg=replace(CFG, send_batch_bytes=1))
    with trio.fail_after(5):
        await b.done.wait()
    assert ei.value.kind == "closed"
    assert a.registry.get("vm-1").state is VmState.RUNNING and snapshot(a) == before
    assert b.results == [None] and b.registry.vms == {}
    assert b.metrics.migrations.labels("aborted")._value.get() == 1


class DeafAfterCommit(Passthrough, trio.abc.Stream):
    """The source's link goes deaf once the source sent its final Commit: the destination's acknowledgement (protocol
    4) never arrives, as when the link breaks at that byte."""

    def __init__(self, inner):
        super().__init__(inner)
        self.dec, self.commits = FrameDecoder(), 0

    async def send_all(self, data):
        self.dec.feed(data)
        while (f := self.dec.next_frame()) is not None:
            self.commits += isinstance(ps.decode(f), ps.Commit)
        await self.inner.send_all(data)

    async def receive_some(self, n=None):
        if self.commits:
            await trio.sleep_forever()
        return await self.inner.receive_some(n)


async def test_a_source_without_the_acknowledgement_says_in_doubt_not_committed(nursery, pki):
    """Protocol 4: the destination ran the VM and acknowledged, the acknowledgement was lost: the source reports the
    migration in doubt (its VM released, never runnable here again), never "committed"; the VM runs on the
    destination only."""
    a, b, err, _ = await migrate(nursery, pki, "cortex-a72-r0p3@6.12", "cortex-a72-r0p3@6.12", wrap=DeafAfterCommit)
    assert isinstance(err, PeerError) and err.kind == "in-doubt" and "no acknowledgement" in str(err)
    assert a.registry.get("vm-1").state is VmState.RELEASED
    assert b.registry.get("vm-1").state is VmState.RUNNING
    assert a.metrics.migrations.labels("in-doubt")._value.get() == 1
    assert a.metrics.migrations.labels("committed")._value.get() == 0


async def test_a_protocol_3_destination_is_committed_without_acknowledgement(nursery, pki):
    b = Node(SimHost("cortex-a72-r0p3@6.12"), pki, cfg=replace(CFG, versions=(1, 2, 3)))
    a, b, res, rec = await migrate(nursery, pki, "cortex-a72-r0p3@6.12", b)
    assert res.result == "committed" and rec.sent.count("Commit") == 1


async def test_ebusy_during_the_stream_applies_everything_anew_on_a_fresh_vm(nursery, pki):
    """The pre-flight VM took its VM-wide registers, then a state register answers EBUSY as the stream arrives
    (something ran a vCPU meanwhile): the streamed sets are applied from scratch on a fresh VM, in order."""
    b = Node(SimHost("cortex-a72-r0p3@6.12"), pki)
    b.host = FaultBackend(b.host, faults={SCTLR: [E.EBUSY]})
    a, b, res, _ = await migrate(nursery, pki, "cortex-a72-r0p3@6.12", b)
    vm_b = assert_moved(a, b, res, {("SCTLR_EL1", "EBUSY", "replay")})
    assert len(b.host.vms) == 2 and b.host.vms[0].closed and not b.host.vms[1].closed
    assert vm_b.state is VmState.RUNNING
