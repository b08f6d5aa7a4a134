"""protocol/program.py: the plan compiled into an apply program (one rule per verdict), its wire form (the fixed
layout an in-process VMM agent reads), the one errno -> action interpretation, and the daemon's apply engine
running it; readback.plan_deviations: an apply judged against the plan."""
from __future__ import annotations

import errno as E
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invariantd.daemon.apply import apply_vm
from invariantd.daemon.readback import plan_deviations, read_vm
from invariantd.protocol.kvmabi import KVM_RESET_UNKNOWN
from invariantd.daemon.probe import probe
from invariantd.daemon.sim.host import SimHost
from invariantd.protocol import kvmabi
from invariantd.protocol import schemas as S
from invariantd.protocol.catalog import catalog
from invariantd.protocol.negotiate import negotiate
from invariantd.protocol.policy import default_policy
from invariantd.protocol.program import (Action, ApplyProgram, ProgramError, RegOp, Verdict8, compile_plan)
from invariantd.protocol.schemas import Plan, PlanEntry, Verdict, VmProfile

CAT = catalog()
MIDR, ISAR0, MMFR1, MMFR3, PSCI, TCR2, PIR, PIRE0, PFR2 = (CAT.id_of(n) for n in (
    "MIDR_EL1", "ID_AA64ISAR0_EL1", "ID_AA64MMFR1_EL1", "ID_AA64MMFR3_EL1", "KVM_REG_ARM_PSCI_VERSION", "TCR2_EL1",
    "PIR_EL1", "PIRE0_EL1", "ID_AA64PFR2_EL1"))


def plan_of(*entries, migratable=True, cap239=False) -> Plan:
    return Plan("vm", "dst", "default", migratable, cap239, (), False, 0, (), tuple(entries), (), (), b"\x5a" * 32)


def row(name, s, d, planned, verdict, field=""):
    return PlanEntry(name, CAT.id_of(name), field, s, d, planned, verdict, "why")


def shipped_plan(a: str, b: str):
    pol = default_policy()
    extra = frozenset(pol.drift)
    vm = S.load_source(probe(SimHost(a)), extra)
    return negotiate(vm, S.host_from_doc(probe(SimHost(b)), extra), pol), vm


def two_vcpus(spec: str):
    s = SimHost(spec)
    vm = s.create_vm()
    vcpus = {i: vm.create_vcpu(i) for i in range(2)}
    for v in vcpus.values():
        v.init(s.init)
    return read_vm(vcpus)


# --- one rule per verdict --------------------------------------------------------------------------------------
def test_each_verdict_compiles_to_its_row():
    p = compile_plan(plan_of(
        row("MIDR_EL1", 0x410FD083, 0x410FD084, 0x410FD084, Verdict.OVERRIDE),
        row("MIDR_EL1", 3, 4, 4, Verdict.OVERRIDE, "Revision"),                  # field rows: the register row decides
        row("ID_AA64ISAR0_EL1", 0x11020, 0x11120, 0x11020, Verdict.SET),
        row("ID_AA64MMFR1_EL1", 0x10212122, 0x10212122, 0x10212122, Verdict.IDENTICAL),
        row("PIR_EL1", KVM_RESET_UNKNOWN, 0, 0, Verdict.DROP)))
    assert [o.reg_id for o in p.ops] == sorted([MIDR, ISAR0, MMFR1, PIR]) and p.digest == b"\x5a" * 32
    midr, isar0, mmfr1, pir = (p.op(r) for r in (MIDR, ISAR0, MMFR1, PIR))
    assert (midr.write, midr.verdict, midr.actions()) == (0x410FD084, Verdict8.OVERRIDE, (
        Action.FAIL, Action.FAIL, Action.REPLAY, Action.FAIL))      # the override IS the value written: no retry
    assert (isar0.write, isar0.verdict, mmfr1.write) == (0x11020, Verdict8.SET, 0x10212122)
    assert (pir.listed, pir.on_enoent, pir.write) == (True, Action.DROP, KVM_RESET_UNKNOWN)
    assert p.listed() == (pir,) and p.generic_rules and not p.enable_cap239


def test_pin_enables_cap239_and_writes_the_source_value():
    p = compile_plan(plan_of(row("MIDR_EL1", 0x410FD083, 0x410FD084, 0x410FD083, Verdict.PIN), cap239=True))
    assert p.enable_cap239 and p.op(MIDR).write == 0x410FD083 and p.op(MIDR).verdict is Verdict8.PIN


def test_registers_the_source_did_not_carry_become_extra_writes_never_for_an_agent():
    vm = VmProfile("vm", 1, ("PSCI_0_2",), ((MIDR, 0x410FD083),))
    plan = plan_of(row("MIDR_EL1", 0x410FD083, 0x410FD083, 0x410FD083, Verdict.IDENTICAL),
                   row("ID_AA64PFR2_EL1", 0, 0x11, 0, Verdict.SET))
    assert compile_plan(plan, vm).extra_writes == ((PFR2, 0),)
    agent = compile_plan(plan, vm, for_agent=True)
    assert agent.extra_writes == () and agent.op(PFR2) is None and ApplyProgram.decode(agent.encode()) == agent


def test_refused_plan_is_never_compiled():
    with pytest.raises(ProgramError, match="refused .*MIDR_EL1"):
        compile_plan(plan_of(row("MIDR_EL1", 1, 2, 2, Verdict.REFUSE), migratable=False))


# --- the one interpretation of a failed write -------------------------------------------------------------------
def test_decide_follows_the_op_then_the_errno_rules():
    p = compile_plan(plan_of(row("MIDR_EL1", 1, 2, 2, Verdict.OVERRIDE), row("TCR2_EL1", 5, 0, 0, Verdict.DROP)))
    assert p.decide(MIDR, 2, E.EINVAL) is Action.FAIL
    assert p.decide(MIDR, 2, kvmabi.EINVARIANT) is Action.FAIL
    assert p.decide(MIDR, 2, E.EBUSY) is Action.REPLAY
    assert p.decide(MIDR, 2, E.EINTR) is Action.RETRY and p.decide(ISAR0, 0, E.EAGAIN) is Action.RETRY
    assert p.decide(TCR2, 0x1234, E.ENOENT) is Action.DROP              # by feature: whatever it holds
    agent = compile_plan(plan_of(row("MIDR_EL1", 1, 2, 2, Verdict.OVERRIDE)), for_agent=True)
    assert agent.decide(PIR, 0, E.ENOENT) is Action.FAIL                # an agent's program: no catalog guesses
    assert agent.decide(0x2030000000000010, 1, E.EINVAL) is Action.FAIL
    hand = ApplyProgram.build(drops={TCR2: 0})
    assert hand.decide(TCR2, 0, E.ENOENT) is Action.DROP and hand.decide(TCR2, 1, E.ENOENT) is Action.FAIL
    assert hand.decide(PIR, KVM_RESET_UNKNOWN, E.ENOENT) is Action.DROP   # catalog knowledge, hand-built only
    assert hand.decide(0x2030000000000010, 1, E.EINVAL) is Action.KEEP_IF_EQUAL   # x86 MSR: generic path
    assert hand.decide(ISAR0, 1, E.EINVAL) is Action.FAIL


# --- the wire form ---------------------------------------------------------------------------------------------
def test_encode_decode_roundtrip_and_layout():
    plan, vm = shipped_plan("cortex-a72-r0p3@6.12", "cortex-a72-r0p4@7.3")
    p = compile_plan(plan, vm, migration="m-1234", for_agent=True)
    data = p.encode()
    assert data[:4] == b"IVDP" and struct.unpack_from("<HHIHH", data, 4) == (1, 1, len(p.ops), kvmabi.EINVARIANT, 3)
    assert len(data) == 112 + 32 * len(p.ops) and data[16:48] == plan.digest
    q = ApplyProgram.decode(data)
    assert q == p and q.migration == "m-1234" and q.enable_cap239
    assert {CAT.name(o.reg_id) for o in q.listed()} == {"TCR2_EL1", "PIR_EL1", "PIRE0_EL1"}


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:4] + struct.pack("<H", 9) + b[6:], "version 9"),
    (lambda b: b[:-1], "ops"),
    (lambda b: b[:6] + struct.pack("<H", 0x80) + b[8:], "flags"),
    (lambda b: b[:112 + 24] + bytes([77]) + b[112 + 25:], "op 0"),
    (lambda b: b[:10], "shorter"),
])
def test_decode_names_what_is_wrong(mutate, match):
    data = compile_plan(plan_of(row("MIDR_EL1", 1, 2, 2, Verdict.OVERRIDE))).encode()
    with pytest.raises(ProgramError, match=match):
        ApplyProgram.decode(mutate(data))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_decode_any_bytes_is_a_program_or_a_program_error(data):
    try:
        ApplyProgram.decode(data)
    except ProgramError:
        pass


def test_hand_built_value_conditional_drops_and_extra_writes_do_not_go_to_an_agent():
    with pytest.raises(ProgramError, match="value-conditional"):
        ApplyProgram.build(drops={TCR2: 0}).encode()
    with pytest.raises(ProgramError, match="extra_writes"):
        ApplyProgram.build(extra_writes={PFR2: 0}).encode()
    with pytest.raises(ProgramError, match="fit"):
        RegOp(MIDR, write=-1)


# --- drift decided by feature, not by value ---------------------------------------------------------------------
def test_drift_is_dropped_by_feature_whatever_it_holds():
    pol = default_policy()
    extra = frozenset(pol.drift)
    dest = S.host_from_doc(probe(SimHost("cortex-a72-r0p4@7.3")), extra)
    vm = S.load_source(probe(SimHost("cortex-a72-r0p4@6.12")), extra)
    odd = VmProfile(vm.name, vm.revision, vm.features,
                    tuple((r, 0x1234 if r == PIR else v) for r, v in vm.values), vm.reg_list)
    plan = negotiate(odd, dest, pol)
    pir = next(e for e in plan.entries if e.reg_id == PIR and not e.field)
    assert pir.verdict is Verdict.DROP and "FEAT_S1PIE" in pir.reason
    # a VM that has S1PIE (MMFR3.S1PIE = 1) may use PIR: absent on the destination it is refused
    with_s1pie = VmProfile(vm.name, vm.revision, vm.features,
                           tuple((r, (v | 0x100) if r == MMFR3 else (0x1234 if r == PIR else v)) for r, v in vm.values),
                           vm.reg_list)
    plan2 = negotiate(with_s1pie, dest, pol)
    assert any(e.reg_id == PIR and e.verdict is Verdict.REFUSE for e in plan2.entries)


# --- the daemon's apply engine runs it: the planned value written directly --------------------------------------
@pytest.mark.parametrize("a,b,overridden,cap239,drops", [
    ("cortex-a72-r0p3@6.12", "cortex-a72-r0p3@6.12", set(), False, set()),
    ("cortex-a72-r0p3@6.12", "cortex-a72-r0p4@6.12", {"MIDR_EL1"}, False, set()),
    ("cortex-a72-r0p3@7.3", "cortex-a72-r0p4@7.3", set(), True, set()),
    ("cortex-a72-r0p3@6.12", "cortex-a72-r0p4@7.3", set(), True, {TCR2, PIR, PIRE0}),
])
def test_shipped_plans_apply_as_planned_with_one_write_each(a, b, overridden, cap239, drops):
    plan, vm = shipped_plan(a, b)
    p = compile_plan(plan, vm)
    assert p.enable_cap239 == cap239 and {o.reg_id for o in p.listed()} == drops
    res = apply_vm(SimHost(b), two_vcpus(a), p)
    assert res.ok
    for i in res.written:
        assert plan_deviations(plan, res.written[i], res.dropped[i], vcpu=i) == []
    assert {CAT.name(r) for r in res.dropped[0]} == {CAT.name(r) for r in drops}
    # a planned override is an override (errno "-"), never a refused write first
    over = {(e.register, e.errno, e.action) for e in res.events if e.action.startswith("override")}
    assert over == {(r, "-", "override-plan") for r in overridden}
    assert not [e for e in res.events if e.errno in ("EINVAL", "EINVARIANT")]


def test_patched_kernel_gets_the_planned_value_directly():
    plan, vm = shipped_plan("cortex-a72-r0p3@6.1-patched", "cortex-a72-r0p4@6.1-patched")
    res = apply_vm(SimHost("cortex-a72-r0p4@6.1-patched"), two_vcpus("cortex-a72-r0p3@6.1-patched"),
                   compile_plan(plan, vm))
    assert res.ok and not [e for e in res.events if e.errno == "EINVARIANT"]
    assert dict(res.written[0])[MIDR] == 0x410FD084


def test_extra_writes_are_applied_in_the_vm_wide_phase():
    h = SimHost("cortex-a72-r0p3@6.12")
    res = apply_vm(h, {0: [(MIDR, 0x410FD083)]}, ApplyProgram.build(extra_writes={ISAR0: 0x11020}))
    assert res.ok and res.written[0] == {MIDR: 0x410FD083, ISAR0: 0x11020}


def test_deviations_name_register_plan_and_actual():
    CTR = CAT.id_of("CTR_EL0")
    plan = plan_of(row("MIDR_EL1", 0x410FD083, 0x410FD084, 0x410FD084, Verdict.OVERRIDE),
                   row("TCR2_EL1", 0, 0, 0, Verdict.DROP), row("CTR_EL0", 1, 1, 1, Verdict.IDENTICAL))
    out = plan_deviations(plan, {MIDR: 0x410FD083, TCR2: 0}, dropped={CTR}, vcpu=3)
    assert out == ["vCPU 3 MIDR_EL1: the plan says 0x410fd084 (override), applied 0x410fd083",
                   "vCPU 3 TCR2_EL1: the plan drops it, the kernel took 0x0",
                   "vCPU 3 CTR_EL0: dropped (ENOENT) but the plan keeps it at 0x1 (identical)"]
