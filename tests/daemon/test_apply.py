"""apply.py: every retry class of DESIGN.md step 5 on the simulated arm64 host, the generic path on x86 /dev/kvm."""
from __future__ import annotations

import errno as E

import pytest

from support.fixtures import real_kvm, synthetic_doc
from invariantd.daemon.apply import ApplyError, apply_vm
from invariantd.daemon.readback import read_vm
from invariantd.protocol.program import ApplyProgram
from invariantd.daemon.kvm.errors import KvmError
from invariantd.daemon.sim.host import SimHost, eras
from invariantd.protocol import regid
from invariantd.protocol.catalog import catalog
from support.faultkvm import FaultBackend, ISAR0, MIDR, SCTLR, TCR2, UNNAMED_ID, actions, host, patch, source_regs

CAT = catalog()
A72_R0P3, A72_R0P4 = 0x410FD083, 0x410FD084


















# --- the clean path ---------------------------------------------------------------------------------
def test_identical_hosts_apply_without_events():
    src = source_regs("6.12")
    res = apply_vm(host("6.12"), src, ApplyProgram())
    assert res.ok and res.events == [] and res.replays == 0
    assert {i: len(w) for i, w in res.written.items()} == {i: len(r) for i, r in src.items()}


def test_vm_wide_registers_go_first_on_every_vcpu():
    b = FaultBackend(host("6.12"))
    apply_vm(b, source_regs("6.12"), ApplyProgram())
    kinds = [CAT.reg_class(r) in ("id", "imp_id", "cache", "demux", "fw") for _, _, r in b.log]
    first_state = kinds.index(False)
    assert all(kinds[:first_state]) and not any(kinds[first_state:])
    assert {i for _, i, r in b.log[:first_state]} == {0, 1}


# --- EINVAL on an ID-like register (legacy era: any difference refused) ------------------------------
def test_legacy_midr_einval_retried_with_destination_value():
    src = source_regs("6.1", midr=A72_R0P3)
    res = apply_vm(host("6.1", midr=A72_R0P4), src, ApplyProgram.build(accept_destination=[MIDR]))
    assert res.ok
    assert actions(res.events) == [("MIDR_EL1", "EINVAL", "override-destination")] * 2
    assert res.events[0].fields == ("Revision",) or res.events[0].fields   # field named when the catalog knows it
    assert res.written[0][MIDR] == A72_R0P4


def test_legacy_midr_without_override_aborts_and_closes_vm():
    b = FaultBackend(host("6.1", midr=A72_R0P4))
    with pytest.raises(ApplyError) as ei:
        apply_vm(b, source_regs("6.1", midr=A72_R0P3), ApplyProgram())
    e = ei.value
    assert (e.register, e.reg_id, e.errno_name, e.vcpu, e.phase) == ("MIDR_EL1", MIDR, "EINVAL", 0, "vm-wide")
    assert "no override" in e.action and f"{MIDR:#018x}" in str(e) and "re-plan" in e.hint
    assert e.events[-1].action == "abort"
    assert b.vms[0].closed


def test_einval_when_destination_holds_same_value_is_not_an_id_mismatch():
    b = FaultBackend(host("6.12"), faults={ISAR0: [E.EINVAL]})
    with pytest.raises(ApplyError) as ei:
        apply_vm(b, source_regs("6.12"), ApplyProgram.build(accept_destination=[ISAR0]))
    assert ei.value.action == "confirm difference"


# --- EINVARIANT (patched era) -------------------------------------------------------------------------
def test_patched_einvariant_override():
    src = source_regs("6.1", midr=A72_R0P3)
    dst = host("6.1", era="patched", midr=A72_R0P4)
    res = apply_vm(dst, src, ApplyProgram.build(accept_destination=[MIDR]))
    assert actions(res.events) == [("MIDR_EL1", "EINVARIANT", "override-destination")] * 2
    assert res.ok


def test_patched_einvariant_without_override_aborts():
    with pytest.raises(ApplyError) as ei:
        apply_vm(host("6.1", era="patched", midr=A72_R0P4), source_regs("6.1", midr=A72_R0P3), ApplyProgram())
    assert ei.value.errno_name == "EINVARIANT" and ei.value.register == "MIDR_EL1"


# --- per-field writable era: the plan's merged value ----------------------------------------------------
def test_writable_lower_value_accepted_directly():
    src = patch(source_regs("6.12"), ISAR0, 0x11020)          # SHA1 0: lower-safe
    res = apply_vm(host("6.12"), src, ApplyProgram())
    assert res.ok and res.events == [] and res.written[1][ISAR0] == 0x11020


def test_writable_higher_value_retried_with_plan_merge():
    src = patch(source_regs("6.12"), ISAR0, 0x11220)          # SHA1 2 > destination's 1
    res = apply_vm(host("6.12"), src, ApplyProgram.build(retry_with={ISAR0: 0x11120}))
    assert actions(res.events) == [("ID_AA64ISAR0_EL1", "EINVAL", "override-plan")] * 2
    assert res.events[0].fields == ("SHA1",) and res.ok


def test_plan_value_refused_too_aborts():
    src = patch(source_regs("6.12"), ISAR0, 0x11220)
    with pytest.raises(ApplyError) as ei:
        apply_vm(host("6.12"), src, ApplyProgram.build(retry_with={ISAR0: 0x11230}))
    assert ei.value.action == "override-plan" and "refused the program's value" in ei.value.hint


def test_cap239_makes_midr_writable():
    src = source_regs("7.0", midr=A72_R0P3)
    dst = host("7.0", midr=A72_R0P4)
    res = apply_vm(dst, src, ApplyProgram(enable_cap239=True))
    assert res.ok and res.events == [] and res.written[0][MIDR] == A72_R0P3
    with pytest.raises(ApplyError) as ei:
        apply_vm(host("7.0", midr=A72_R0P4), src, ApplyProgram())
    assert ei.value.register == "MIDR_EL1" and ei.value.errno_name == "EINVAL"


# --- ENOENT: kernel drift ---------------------------------------------------------------------------------
def test_enoent_drift_registers_dropped_at_reset_value():
    src = source_regs("6.12")                                  # lists TCR2/PIR/PIRE0, the 7.0 profile does not
    assert any(r == TCR2 for r, _ in src[0])
    src = {i: list(regs) + [(UNNAMED_ID, 0)] for i, regs in src.items()}
    res = apply_vm(host("7.0"), src, ApplyProgram())
    dropped = sorted({e.register for e in res.events if e.action == "drop-reset"})
    assert dropped == ["PIRE0_EL1", "PIR_EL1", "S3_0_C0_C7_7", "TCR2_EL1"]
    assert all(e.errno == "ENOENT" for e in res.events) and res.ok
    assert TCR2 in res.dropped[0]


def test_enoent_with_guest_state_aborts():
    src = patch(source_regs("6.12"), TCR2, 0x5)
    with pytest.raises(ApplyError) as ei:
        apply_vm(host("7.0"), src, ApplyProgram())
    assert ei.value.register == "TCR2_EL1" and ei.value.errno_name == "ENOENT" and "0x5" in ei.value.hint


def test_enoent_unknown_register_aborts():
    src = {i: list(regs) + [(regid.sysreg(3, 0, 15, 15, 7), 0)] for i, regs in source_regs("6.12").items()}
    with pytest.raises(ApplyError) as ei:
        apply_vm(host("6.12"), src, ApplyProgram())
    assert "not a known drift register" in ei.value.hint


def test_vendor_bmap2_dropped_going_back_to_older_kernel():
    src = source_regs("7.0")
    res = apply_vm(host("6.12"), src, ApplyProgram())
    assert {e.register for e in res.events} == {"KVM_REG_ARM_VENDOR_HYP_BMAP_2"}
    assert ApplyProgram().catalog_resets(regid.fw_bmap(3)) == (0,)


# --- EBUSY: ordering fault, replay once -----------------------------------------------------------------
def test_ebusy_recreates_vm_and_replays_once():
    b = FaultBackend(host("6.12"), ran=1)
    src = patch(source_regs("6.12"), ISAR0, 0x11020)
    res = apply_vm(b, src, ApplyProgram())
    assert res.replays == 1 and len(b.vms) == 2 and b.vms[0].closed and not b.vms[1].closed
    assert ("ID_AA64ISAR0_EL1", "EBUSY", "replay") in actions(res.events) and res.ok


def test_ebusy_twice_aborts():
    b = FaultBackend(host("6.12"), ran=5)
    with pytest.raises(ApplyError) as ei:
        apply_vm(b, patch(source_regs("6.12"), ISAR0, 0x11020), ApplyProgram())
    assert ei.value.errno_name == "EBUSY" and "once" in ei.value.action
    assert len(b.vms) == 2 and all(vm.closed for vm in b.vms)


# --- transient errnos -------------------------------------------------------------------------------------
@pytest.mark.parametrize("err", [E.EINTR, E.EAGAIN])
def test_transient_retried(err):
    b = FaultBackend(host("6.12"), faults={SCTLR: [err, err]})
    res = apply_vm(b, source_regs("6.12", n=1), ApplyProgram(transient_retries=3))
    assert [e.action for e in res.events] == ["retry-transient"] * 2 and res.ok


def test_transient_bounded():
    b = FaultBackend(host("6.12"), faults={SCTLR: [E.EINTR] * 10})
    with pytest.raises(ApplyError) as ei:
        apply_vm(b, source_regs("6.12", n=1), ApplyProgram(transient_retries=3))
    assert ei.value.action == "retry-transient x3"
    assert [e.action for e in ei.value.events] == ["retry-transient"] * 3 + ["abort"]


def test_other_errno_aborts():
    b = FaultBackend(host("6.12"), faults={SCTLR: [E.EPERM]})
    with pytest.raises(ApplyError) as ei:
        apply_vm(b, source_regs("6.12", n=1), ApplyProgram.build(accept_destination=[SCTLR]))
    assert (ei.value.errno_name, ei.value.action, ei.value.phase) == ("EPERM", "none", "state")


def test_einval_on_state_register_aborts():
    fpsr = CAT.id_of("FPSR")
    src = patch(source_regs("6.12", n=1), fpsr, 1 << 40)      # does not fit U32
    with pytest.raises(ApplyError) as ei:
        apply_vm(host("6.12"), src, ApplyProgram())
    assert ei.value.register == "FPSR" and ei.value.errno_name == "EINVAL" and ei.value.action == "none"


# --- read-back --------------------------------------------------------------------------------------------
def test_readback_reports_folded_bits():
    b = FaultBackend(host("6.12"), fold={SCTLR: 0x8})
    res = apply_vm(b, source_regs("6.12", n=1), ApplyProgram())
    assert not res.ok
    [m] = res.mismatches
    assert m.register == "SCTLR_EL1" and m.actual == m.intended & ~0x8 and "SCTLR_EL1" in str(m)


def test_a_whole_set_that_reads_back_differently_is_not_read_again():
    """A state-phase set taken whole and read back as one set: where the bytes differ, the registers are compared in
    that same answer - none is read twice (on x86 the TSC always differs: every vCPU's read-back would double)."""
    b = FaultBackend(host("6.12"), fold={SCTLR: 0x8})
    res = apply_vm(b, source_regs("6.12", n=2), ApplyProgram())
    assert [(m.vcpu, m.register) for m in res.mismatches] == [(0, "SCTLR_EL1"), (1, "SCTLR_EL1")]
    for i in (0, 1):
        reads = [r for v, ids in b.reads if v == i for r in ids]
        assert SCTLR in reads and len(reads) == len(set(reads)), f"vCPU {i}: a register read back twice"


# --- hand-built programs ---------------------------------------------------------------------------------------
def test_hand_built_program_validation():
    with pytest.raises(ValueError, match="MIDR_EL1"):
        ApplyProgram.build(retry_with={MIDR: 1 << 64})
    with pytest.raises(ValueError, match="two ops"):
        from invariantd.protocol.program import RegOp
        ApplyProgram((RegOp(MIDR), RegOp(MIDR)))


# --- the real /dev/kvm (x86 here: MSRs through ONE_REG) -----------------------------------------------------
def _real():
    return real_kvm()


@pytest.mark.kvm
def test_real_kvm_generic_apply_and_readback():
    b = _real()
    if b.arch != "x86_64":
        pytest.skip("generic x86 MSR path; arm64 hosts run the conformance suite instead")
    misc, ucode = regid.x86_msr(0x1A0), regid.x86_msr(0x8B)
    res = apply_vm(b, {0: [(misc, 1), (ucode, 0x100000000)], 1: [(misc, 1)]}, ApplyProgram())
    try:
        assert res.ok and res.events == [] and res.written[0] == {misc: 1, ucode: 0x100000000}
    finally:
        res.close()


@pytest.mark.kvm
def test_real_kvm_refusal_is_typed():
    b = _real()
    if b.arch != "x86_64":
        pytest.skip("generic x86 MSR path")
    arch_caps = regid.x86_msr(0x10A)
    with pytest.raises(ApplyError) as ei:
        apply_vm(b, {0: [(regid.x86_msr(0x1A0), 1), (arch_caps, 1 << 63)]}, ApplyProgram())
    e = ei.value
    # generic EINVAL rule: GET the destination's value; it differs, so abort naming both values
    assert (e.reg_id, e.errno_name, e.action, e.phase) == (arch_caps, "EINVAL", "confirm difference", "state")
    assert f"{arch_caps:#018x}" in str(e) and "MSR_0x10a" in str(e)
    assert "source value 0x8000000000000000" in str(e) and "destination holds 0x0" in str(e)


# --- shipped profiles (measured on real kernels) -------------------------------------------------------------
def _profile(spec):
    from invariantd.daemon.sim.host import ProfileError
    try:
        return SimHost(spec)
    except ProfileError as e:
        pytest.skip(f"profile not shipped: {e}")


@pytest.mark.parametrize("src,dst,policy,expect", [
    ("cortex-a72-r0p4@6.12", "cortex-a72-r0p4@6.12", ApplyProgram(), set()),
    ("cortex-a72-r0p3@6.12", "cortex-a72-r0p4@6.12", ApplyProgram.build(accept_destination=[MIDR]),
     {("MIDR_EL1", "EINVAL", "override-destination")}),
    ("cortex-a72-r0p3@6.1-patched", "cortex-a72-r0p4@6.1-patched",
     ApplyProgram.build(accept_destination=[MIDR]), {("MIDR_EL1", "EINVARIANT", "override-destination")}),
    ("cortex-a72-r0p3@7.3", "cortex-a72-r0p4@7.3", ApplyProgram(enable_cap239=True), set()),
    # real 6.12 holds KVM's reset_unknown pattern in PIR_EL1/PIRE0_EL1: still droppable on 7.3
    ("cortex-a72-r0p4@6.12", "cortex-a72-r0p4@7.3", ApplyProgram(),
     {("TCR2_EL1", "ENOENT", "drop-reset"), ("PIR_EL1", "ENOENT", "drop-reset"),
      ("PIRE0_EL1", "ENOENT", "drop-reset")}),
])
def test_shipped_profiles(src, dst, policy, expect):
    s = _profile(src)
    vm = s.create_vm()
    vcpus = {}
    for i in range(2):
        vcpus[i] = vm.create_vcpu(i)
        vcpus[i].init(s.init)
    res = apply_vm(_profile(dst), read_vm(vcpus), policy)
    assert res.ok and {(e.register, e.errno, e.action) for e in res.events} == expect
