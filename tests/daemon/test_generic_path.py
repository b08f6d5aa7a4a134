"""The generic (non-arm64) path: x86 MSRs as ONE_REG registers, the generic plan, the apply rules for x86's
EINVAL and for registers KVM adjusts on write, and the "caps-only" capabilities fetch.

Pure cases always run; the real-/dev/kvm cases skip where /dev/kvm or x86 ONE_REG (Linux >= 6.18) is absent.
"""
from __future__ import annotations


import pytest
import trio
from invariantd.daemon.pki import make_pki

from support.fixtures import real_kvm, synthetic_doc
from invariantd.daemon import tls
from invariantd.daemon.apply import ApplyError, apply_vm, readback_events
from invariantd.daemon.readback import READBACK_MAY_DIFFER, Mismatch, ReadbackRule, adjusted
from invariantd.daemon.metrics import Metrics
from invariantd.protocol.program import ApplyProgram
from invariantd.daemon.peer import (CAPS_ONLY, PeerConfig, apply_report, handle_incoming, host_capabilities,
                                    migrate_out)
from invariantd.daemon.probe import probe
from invariantd.daemon.sim.host import SimHost
from invariantd.daemon.vms import VmRegistry, VmState
from invariantd.protocol import regid
from invariantd.protocol import schemas as S
from invariantd.protocol import session as ps
from invariantd.protocol.generic import negotiate_generic, vm_arch
from invariantd.protocol.negotiate import negotiate
from invariantd.protocol.policy import default_policy

TSC, TSC_DEADLINE, MISC, UCODE, ASYNC_PF_INT = (regid.x86_msr(i) for i in (0x10, 0x6E0, 0x1A0, 0x8B, 0x4B564D06))
CFG = PeerConfig(handshake_timeout=5, phase_timeout=5, apply_timeout=5, commit_timeout=5)


def x86_host(reg_list, name="") -> S.HostCapabilities:
    return S.HostCapabilities(kernel_release="6.18.0", kernel_version="6.18", arch="x86_64",
                              caps=(("KVM_CAP_ONE_REG", 1),), reg_list=tuple(reg_list), values=(),
                              writable_masks=None, profile=name)


def x86_vm(reg_list) -> S.VmProfile:
    return S.VmProfile(name="vm-x", revision=1, features=(), values=(), reg_list=tuple(reg_list))


# --- the generic plan (pure) ----------------------------------------------------------------------------------
def test_generic_plan_same_arch_restores_as_is():
    ids = (MISC, UCODE, TSC)
    plan = negotiate(x86_vm(ids), x86_host(ids + (TSC_DEADLINE,)))
    assert plan.migratable and not plan.enable_cap239
    [e] = plan.entries
    assert (e.register, e.reg_id, e.verdict) == ("registers", 0, S.Verdict.SET)
    assert "3 registers (3 msr) restored as they are" in e.reason
    assert any("read-back differences" in n for n in plan.notes)
    # both daemons compute the same digest from the same inputs; another register list gives another one
    assert plan.digest == negotiate(x86_vm(ids), x86_host(ids + (TSC_DEADLINE,))).digest
    assert plan.digest != negotiate(x86_vm(ids[:2]), x86_host(ids + (TSC_DEADLINE,))).digest
    assert len(plan.digest) == 32


def test_generic_plan_refuses_a_register_the_destination_lacks():
    plan = negotiate(x86_vm((MISC, UCODE)), x86_host((MISC,)))
    assert not plan.migratable
    bad = [e for e in plan.entries if e.verdict is S.Verdict.REFUSE]
    assert [e.register for e in bad] == ["MSR_0x8b", "registers"]
    assert "ENOENT" in bad[0].reason


def test_different_arch_is_refused_both_ways():
    arm_host = S.host_from_doc(synthetic_doc("6.12"), frozenset(default_policy().drift))
    arm_vm = S.vm_from_host(arm_host)
    assert vm_arch(arm_vm) == "aarch64" and vm_arch(x86_vm((MISC,))) == "x86_64"
    for plan in (negotiate(arm_vm, x86_host((MISC,))), negotiate(x86_vm((MISC,)), arm_host)):
        assert not plan.migratable
        [e] = plan.entries
        assert e.register == "arch" and e.verdict is S.Verdict.REFUSE
        assert "same architecture" in e.reason
    assert "aarch64" in negotiate(arm_vm, x86_host((MISC,))).entries[0].reason
    # arm64 -> arm64 still takes the negotiation engine, not the generic rule
    assert any(e.register == "MIDR_EL1" for e in negotiate(arm_vm, arm_host).entries)


def test_mixed_register_ids_are_refused():
    arm_host = S.host_from_doc(synthetic_doc("6.12"), frozenset(default_policy().drift))
    mixed = x86_vm((MISC, arm_host.reg_list[0]))
    assert vm_arch(mixed) == "mixed"
    assert not negotiate_generic(mixed, x86_host((MISC,))).migratable


def test_generic_plan_survives_the_wire():
    plan = negotiate(x86_vm((MISC,)), x86_host((MISC,)))
    assert S.plan_from_bytes(S.plan_to_bytes(plan)).entries == plan.entries
    host = x86_host((MISC, UCODE))
    assert S.host_from_bytes(S.host_to_bytes(host)) == host


# --- read-back rules (pure) -----------------------------------------------------------------------------------
def test_readback_table_rules():
    tsc = READBACK_MAY_DIFFER[TSC]
    assert tsc.kind == "advances" and tsc.why
    assert tsc.accepts(1000, 1000) and tsc.accepts(1000, 1000 + (1 << 39))
    assert tsc.accepts(1 << 40, (1 << 40) - 100)               # KVM's 1 s TSC sync: a little behind
    assert not tsc.accepts(1 << 40, (1 << 40) - (1 << 33))     # far behind: not KVM's doing
    assert not tsc.accepts(0, 1 << 41)                         # far ahead
    dl = READBACK_MAY_DIFFER[TSC_DEADLINE]
    assert dl.accepts(0x1234, 0) and not dl.accepts(0x1234, 0x1235)
    assert not ReadbackRule("X", "unknown-kind", "").accepts(1, 2)


def test_adjusted_readbacks_are_reported_not_hidden():
    ms = [Mismatch(0, "MSR_0x10", TSC, 1000, 5000),                       # inside the rule: an event
          Mismatch(1, "MSR_0x10", TSC, 1 << 40, 0),                        # outside: stays a mismatch
          Mismatch(0, "MSR_0x8b", UCODE, 1, 2),                            # not in the table: mismatch
          Mismatch(0, "MSR_0x6e0", TSC_DEADLINE, 7, None, "EINVAL")]       # unreadable: mismatch
    left, notes = adjusted(ms)
    events = readback_events(notes)
    assert left == ms[1:]
    [ev] = events
    assert (ev.vcpu, ev.reg_id, ev.action) == (0, TSC, "readback-adjusted")
    assert "wrote 0x3e8, reads 0x1388 (+4000)" in ev.detail and "TSC" in ev.detail
    counted, reported = apply_report(events)
    assert counted == [] and reported == events           # not a SET_ONE_REG failure in metrics




class Dest:
    def __init__(self, backend, pki):
        self.backend, self.registry, self.metrics = backend, VmRegistry(backend), Metrics()
        self.caps = probe(backend)
        self.results: list = []
        self.done = trio.Event()
        self.server_ctx = tls.server_context(pki["node-b"], None, pki["ca"])

    async def handler(self, stream, peer):
        try:
            self.results.append(await handle_incoming(stream, peer, backend=self.backend, registry=self.registry,
                                                      caps_doc=self.caps, cfg=CFG, metrics=self.metrics))
        finally:
            self.done.set()

    async def listen(self, nursery) -> int:
        lst = tls.PeerListener(self.handler, self.server_ctx, "127.0.0.1", 0, handshake_timeout=5)
        return await nursery.start(lst.run)


async def _caps_fetch(port, pki, code):
    ctx = tls.client_context(pki["node-a"], None, pki["ca"])
    stream = await tls.connect("127.0.0.1", port, ctx, server_hostname="localhost")
    sess = ps.Session(ps.SOURCE)
    await stream.send_all(sess.send(ps.Hello(ps.PROTOCOL_VERSIONS, ps.SOURCE, "node-a")))
    evs = []
    while len(evs) < 2:
        ev = sess.next_event()
        if ev is ps.NEED_DATA:
            sess.receive_data(await stream.receive_some(65536))
            continue
        evs.append(ev)
    await stream.send_all(sess.send(ps.Abort("capabilities only (plan)", code)))
    await stream.aclose()
    return evs


@pytest.mark.parametrize("code,counted", [(CAPS_ONLY, 0), ("source", 1)])
async def test_caps_only_fetch_is_not_an_aborted_migration(nursery, pki, code, counted):
    b = Dest(SimHost(doc=synthetic_doc("6.12")), pki)
    port = await b.listen(nursery)
    hello, caps = await _caps_fetch(port, pki, code)
    assert isinstance(caps, ps.Capabilities) and S.host_from_bytes(caps.doc).arch == "aarch64"
    with trio.fail_after(5):
        await b.done.wait()
    assert b.results == [None]
    assert b.metrics.migrations.labels("aborted")._value.get() == counted


# --- this machine's real /dev/kvm (x86) -------------------------------------------------------------------------
@pytest.fixture
def kvm():
    k = real_kvm(lambda k: None if k.arch == "x86_64" and k.check_extension(70)
                 else "needs x86 KVM with ONE_REG for MSRs (Linux >= 6.18)")
    yield k
    k.close()


@pytest.mark.kvm
def test_msr_index_list_and_reg_list(kvm):
    idx = kvm.msr_index_list()
    assert 0x10 in idx and len(idx) == len(set(idx))
    msrs = kvm.msr_reg_ids()
    assert msrs and set(msrs) <= {regid.x86_msr(i) for i in idx}
    vm = kvm.create_vm(0)
    try:
        v = vm.create_vcpu(0)
        ids = v.reg_list()
        assert ids[-len(msrs):] == list(msrs) and len(ids) == len(set(ids))
        assert all(regid.decode(r).arch == "x86_64" for r in ids)
        _, errs = v.get_regs(ids)
        assert not any(errs)                         # every listed register reads on a fresh vCPU
    finally:
        vm.close()


@pytest.mark.kvm
def test_real_apply_tsc_adjusted_and_equal_refused_write(kvm):
    src = kvm.create_vm(0)
    try:
        v = src.create_vcpu(0)
        tsc = v.get_reg(TSC)
    finally:
        src.close()
    # ASYNC_PF_INT 0: KVM refuses the write without an in-kernel LAPIC (EINVAL), but the destination
    # already holds 0: the state is there ("keep-equal", counted as an EINVAL)
    res = apply_vm(kvm, {0: [(MISC, 1), (TSC, tsc), (ASYNC_PF_INT, 0)]}, ApplyProgram())
    try:
        assert res.ok, res.mismatches
        acts = {(e.reg_id, e.action) for e in res.events}
        assert (ASYNC_PF_INT, "keep-equal") in acts and (TSC, "readback-adjusted") in acts
        [adj] = [e for e in res.events if e.action == "readback-adjusted"]
        assert adj.register == "MSR_0x10" and "IA32_TSC" in adj.detail
    finally:
        res.close()
    # a value the destination does not hold and KVM refuses: abort naming both values
    with pytest.raises(ApplyError) as ei:
        apply_vm(kvm, {0: [(ASYNC_PF_INT, 0x12)]}, ApplyProgram())
    assert ei.value.action == "confirm difference" and ei.value.errno_name == "EINVAL"
    assert "0x12" in str(ei.value)


@pytest.mark.kvm
@pytest.mark.parametrize("pipelined", [False, True])
async def test_real_x86_migration_over_the_peer_link(nursery, pki, kvm, caplog, pipelined):
    """pipelined: the source sends each vCPU's chunks as soon as it is read (pipeline_vcpus 1; forced although the
    peer is on this machine), the destination applies them while the source reads the next."""
    from invariantd.daemon.kvm.real import RealKvm
    from dataclasses import replace
    cfg = replace(CFG, pipeline_vcpus=1, pipeline_same_host=True) if pipelined else CFG
    dst_kvm = RealKvm()
    try:
        b = Dest(dst_kvm, pki)
        port = await b.listen(nursery)
        reg_a = VmRegistry(kvm)
        reg_a.create("vm-x", 2)
        host = host_capabilities(b.caps, dst_kvm, default_policy())
        assert host.arch == "x86_64" and set(kvm.msr_reg_ids()) <= set(host.reg_list)
        stream = await tls.connect("127.0.0.1", port, tls.client_context(pki["node-a"], None, pki["ca"]),
                                   server_hostname="localhost")
        plans = []
        src1 = reg_a.get("vm-x").vcpus[1]
        ids = [i for i in src1.reg_list() if i != TSC]
        src_vals = src1.get_regs(ids)[0]
        if pipelined:
            from invariantd.daemon.peer.link import same_host
            assert same_host(stream)                 # a loopback peer: pipelined only because cfg forces it
        sent: list = []
        res = await migrate_out(stream, reg_a, "vm-x", cfg=cfg, metrics=Metrics(), on_plan=plans.append,
                                on_event=lambda d, ev: sent.append(type(ev).__name__) if d == "out" else None)
        await stream.aclose()
        # pipelined: one chunk per vCPU read (sent as it was read), else one chunk for both
        assert sent.count("VcpuChunk") == (2 if pipelined else 1), sent
        with trio.fail_after(5):
            await b.done.wait()
        assert res.result == "committed" and reg_a.get("vm-x").state is VmState.RELEASED
        [plan] = plans
        assert plan.migratable and plan.entries[0].register == "registers"
        [r] = b.results
        assert r.result == "committed" and r.digest == res.digest
        vm_b = b.registry.get("vm-x")
        assert vm_b.state is VmState.RUNNING and sorted(vm_b.vcpus) == [0, 1]
        assert vm_b.vcpus[1].get_regs(ids)[0] == src_vals
        # the TSC read-backs were reported (one per vCPU), not hidden
        assert sorted(e.vcpu for e in r.events if e.action == "readback-adjusted") == [0, 1]
        # ... and logged once per register, not once per vCPU (a 256-vCPU VM gets one line)
        lines = [m for m in caplog.messages if "read back differently" in m]
        assert len(lines) == 1 and "read back differently migration=" in lines[0] and "MSR_0x10 on 2 vCPU(s)" in lines[0], lines
        assert b.metrics.migrations.labels("committed")._value.get() == 1
    finally:
        for m in list(b.registry.vms.values()):
            m.close()
        dst_kvm.close()


@pytest.mark.kvm
def test_demo_real(kvm, capsys):
    from invariantd.client.cli import main
    assert main(["demo", "--real", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "registers" in out and "result: MIGRATABLE" in out
    assert "outcome: COMMITTED" in out and "2/2 vCPUs" in out
    assert 'invariantd_migrations_total{result="committed"}  +1' in out
    assert 'invariantd_migrations_total{result="aborted"}' not in out       # the plan's caps-only fetch
