"""apply_vm_async: the same apply as apply_vm, with the state phase and the read-back spread over worker threads
(real backend; forced with threads=True here on the simulated host so the logic runs everywhere)."""
from __future__ import annotations

import errno as E

import pytest
import trio

from invariantd.daemon.apply import ApplyError, apply_vm, apply_vm_async, read_vm_async
from invariantd.daemon.kvm.backend import threaded
from invariantd.daemon.readback import read_vm
from invariantd.protocol.program import ApplyProgram
from invariantd.daemon.kvm.errors import KvmError
from invariantd.daemon.sim.host import SimHost
from invariantd.daemon.vms import VmRegistry
from invariantd.protocol import kvmabi as abi
from invariantd.protocol import regid
from support.fixtures import real_kvm, synthetic_doc
from support.faultkvm import FaultBackend, ISAR0, MIDR, SCTLR, actions, host, patch, source_regs
from support.hostdocs import A72_R0P3, A72_R0P4, CAT


def run(coro_fn, *a, **kw):
    return trio.run(lambda: coro_fn(*a, **kw))


def summary(res):
    return (res.written, res.dropped, [str(m) for m in res.mismatches], sorted(actions(res.events)), res.replays)


def test_backend_decides_threads():
    assert not threaded(host("6.12"))

    class K:
        kind = "kvm"
    assert threaded(K())


@pytest.mark.parametrize("limit", [1, 3, 64])
def test_threaded_equals_serial(limit):
    src = source_regs("6.1", n=8, midr=A72_R0P3)
    pol = ApplyProgram.build(accept_destination=[MIDR])
    a = apply_vm(host("6.1", midr=A72_R0P4), src, pol)
    b = run(apply_vm_async, host("6.1", midr=A72_R0P4), src, pol, threads=True,
            limiter=trio.CapacityLimiter(limit))
    assert b.ok and summary(a) == summary(b)
    assert actions(b.events) == [("MIDR_EL1", "EINVAL", "override-destination")] * 8   # VM-wide phase: in order


def test_vm_wide_phase_first_on_every_vcpu():
    b = FaultBackend(host("6.12"))
    run(apply_vm_async, b, source_regs("6.12", n=6), ApplyProgram(), threads=True)
    kinds = [CAT.reg_class(r) in ("id", "imp_id", "cache", "demux", "fw") for _, _, r in b.log]
    first_state = kinds.index(False)
    assert all(kinds[:first_state]) and not any(kinds[first_state:])
    assert {i for _, i, r in b.log[:first_state]} == set(range(6))


def test_ebusy_replays_once():
    b = FaultBackend(host("6.12"), ran=1)
    res = run(apply_vm_async, b, patch(source_regs("6.12", n=4), ISAR0, 0x11020), ApplyProgram(), threads=True)
    assert res.replays == 1 and len(b.vms) == 2 and b.vms[0].closed and not b.vms[1].closed and res.ok
    b = FaultBackend(host("6.12"), ran=5)
    with pytest.raises(ApplyError) as ei:
        run(apply_vm_async, b, patch(source_regs("6.12", n=4), ISAR0, 0x11020), ApplyProgram(), threads=True)
    assert ei.value.errno_name == "EBUSY" and "once" in ei.value.action and all(vm.closed for vm in b.vms)


def test_state_phase_failure_in_a_worker_aborts_and_closes():
    b = FaultBackend(host("6.12"), faults={SCTLR: [E.EPERM] * 3})
    with pytest.raises(ApplyError) as ei:
        run(apply_vm_async, b, source_regs("6.12", n=6), ApplyProgram(), threads=True)
    assert (ei.value.register, ei.value.errno_name, ei.value.phase) == ("SCTLR_EL1", "EPERM", "state")
    assert b.vms[0].closed


def test_transient_retry_and_readback_in_workers():
    b = FaultBackend(host("6.12"), faults={SCTLR: [E.EINTR]}, fold={SCTLR: 0x8})
    res = run(apply_vm_async, b, source_regs("6.12", n=4), ApplyProgram(), threads=True)
    assert ("SCTLR_EL1", "EINTR", "retry-transient") in actions(res.events)
    assert sorted(m.vcpu for m in res.mismatches if m.reg_id == SCTLR) == [0, 1, 2, 3]


# --- this machine's real /dev/kvm -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kvm():
    k = real_kvm(lambda k: None if k.check_extension(abi.CAPS["KVM_CAP_ONE_REG"]) else "no ONE_REG on this kernel")
    yield k
    k.close()


def _vcpus(kvm, vm, n: int) -> dict:
    """n vCPUs of `vm`, initialised on arm64 (preferred target, PSCI 0.2)."""
    vcpus = {i: vm.create_vcpu(i) for i in range(n)}
    if kvm.arch == "aarch64":
        from invariantd.daemon.kvm.backend import VcpuInit
        pref = vm.preferred_target()
        for v in vcpus.values():
            v.init(VcpuInit(pref.target, (abi.VCPU_FEATURES["PSCI_0_2"],)))
    return vcpus


def test_real_threaded_equals_serial(kvm):
    src = kvm.create_vm()
    try:
        regsets = read_vm(_vcpus(kvm, src, 8))
    finally:
        src.close()
    if not regsets[0]:
        pytest.skip("no ONE_REG-readable registers")
    a = apply_vm(kvm, regsets, ApplyProgram())
    b = run(apply_vm_async, kvm, regsets, ApplyProgram())
    try:
        assert a.ok and b.ok and a.written == b.written and a.dropped == b.dropped
        assert sorted(actions(a.events)) == sorted(actions(b.events))
        ids = list(regsets[3])
        assert b.vcpus[3].get_regs([r for r, _ in ids])[1] == [0] * len(ids)
    finally:
        a.close()
        b.close()


def test_read_vm_async_equals_read_vm(kvm):
    """The source's pause read: threaded on the real binding, same registers and values as the serial read, in
    vCPU order; an unreadable register raises the same KvmError naming it."""
    vm = kvm.create_vm()
    try:
        vcpus = _vcpus(kvm, vm, 6)
        serial = read_vm(vcpus)
        got = run(read_vm_async, vcpus, kvm)
        assert list(got) == sorted(vcpus)
        tsc = regid.x86_msr(0x10) if kvm.arch == "x86_64" else None       # keeps counting between reads
        strip = lambda rs: [(r, v) for r, v in rs if r != tsc]              # noqa: E731
        assert {i: strip(rs) for i, rs in got.items()} == {i: strip(rs) for i, rs in serial.items()}
        assert [r for r, _ in got[5]] == [r for r, _ in serial[5]]
        bad = 0x6030000000000000 | (0x7FFF << 16) if kvm.arch == "aarch64" else regid.x86_msr(0xDEAD0000)
        with pytest.raises(KvmError) as a:
            read_vm(vcpus, [bad])
        with pytest.raises(KvmError) as b:
            run(read_vm_async, {i: _Only(v, bad) for i, v in vcpus.items()}, kvm)
        assert str(a.value) == str(b.value)
    finally:
        vm.close()


class _Only:
    """A vCPU whose register list is one (unknown) register."""

    def __init__(self, vcpu, reg):
        self.vcpu, self.reg = vcpu, reg

    def reg_list(self):
        return [self.reg]

    def get_regs(self, ids):
        return self.vcpu.get_regs(ids)


def test_read_vm_async_on_the_simulated_host():
    host = SimHost(doc=synthetic_doc("6.12"))
    reg = VmRegistry(host)
    vcpus = reg.create("vm", 3).vcpus
    assert run(read_vm_async, vcpus, host) == read_vm(vcpus)
