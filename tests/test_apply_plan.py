"""apply.policy_from_plan: the negotiation engine's Plan -> the apply engine's ApplyPolicy, one rule per verdict;
apply.plan_deviations: an apply judged against the plan."""
from __future__ import annotations

import pytest

from invariantd.daemon.apply import (KVM_RESET_UNKNOWN, ApplyPolicy, apply_vm, plan_deviations, policy_from_plan,
                                     read_vm)
from invariantd.daemon.probe import probe
from invariantd.daemon.sim.host import SimHost
from invariantd.protocol import schemas as S
from invariantd.protocol.catalog import catalog
from invariantd.protocol.negotiate import negotiate
from invariantd.protocol.policy import default_policy
from invariantd.protocol.schemas import Plan, PlanEntry, Verdict, VmProfile

CAT = catalog()
MIDR, ISAR0, MMFR1, CTR, PSCI, TCR2, PIR, PIRE0, PFR2 = (CAT.id_of(n) for n in (
    "MIDR_EL1", "ID_AA64ISAR0_EL1", "ID_AA64MMFR1_EL1", "CTR_EL0", "KVM_REG_ARM_PSCI_VERSION", "TCR2_EL1",
    "PIR_EL1", "PIRE0_EL1", "ID_AA64PFR2_EL1"))


def plan_of(*entries, migratable=True, cap239=False) -> Plan:
    return Plan("vm", "dst", "default", migratable, cap239, (), False, 0, (), tuple(entries), (), ())


def row(name, s, d, planned, verdict, field=""):
    return PlanEntry(name, CAT.id_of(name), field, s, d, planned, verdict, "why")


def shipped_plan(a: str, b: str):
    pol = default_policy()
    extra = frozenset(pol.drift)
    vm = S.load_source(probe(SimHost(a)), extra)
    return negotiate(vm, S.host_from_doc(probe(SimHost(b)), extra), pol), vm


# --- one rule per verdict --------------------------------------------------------------------------------------
def test_identical_and_set_at_source_value_allow_nothing():
    p = policy_from_plan(plan_of(row("MIDR_EL1", 1, 1, 1, Verdict.IDENTICAL),
                                 row("ID_AA64ISAR0_EL1", 0x11020, 0x11120, 0x11020, Verdict.SET),
                                 row("ID_AA64ISAR0_EL1", 0, 1, 0, Verdict.SET, "CRC32")))
    assert p == ApplyPolicy(drop_if_reset={})


def test_override_maps_to_the_planned_value_field_rows_ignored():
    merged = 0x10000120
    p = policy_from_plan(plan_of(row("ID_AA64MMFR1_EL1", 0, 1, 1, Verdict.OVERRIDE, "VH"),
                                 row("ID_AA64MMFR1_EL1", 0, 0x10212122, merged, Verdict.OVERRIDE),
                                 row("MIDR_EL1", 0x410FD083, 0x410FD084, 0x410FD084, Verdict.OVERRIDE)))
    assert p.overrides == {MMFR1: merged, MIDR: 0x410FD084} and not p.enable_cap239


def test_set_with_another_planned_value_is_an_override():
    p = policy_from_plan(plan_of(row("KVM_REG_ARM_PSCI_VERSION", 0x10001, 0x10003, 0x10002, Verdict.SET)))
    assert p.overrides == {PSCI: 0x10002}


def test_pin_enables_cap239_without_override():
    p = policy_from_plan(plan_of(row("MIDR_EL1", 0x410FD083, 0x410FD084, 0x410FD083, Verdict.PIN, "Revision"),
                                 row("MIDR_EL1", 0x410FD083, 0x410FD084, 0x410FD083, Verdict.PIN), cap239=True))
    assert p.enable_cap239 and p.overrides == {}


def test_drop_allows_enoent_at_the_proven_and_known_reset_values_only():
    p = policy_from_plan(plan_of(row("TCR2_EL1", 0, 0, 0, Verdict.DROP),
                                 row("PIR_EL1", KVM_RESET_UNKNOWN, 0, 0, Verdict.DROP)))
    assert p.drop_if_reset == {TCR2: (0,), PIR: (KVM_RESET_UNKNOWN, 0)}
    assert p.reset_values(PIRE0) == ()                 # not dropped by this plan: ENOENT there aborts


def test_registers_the_source_did_not_carry_become_extra_writes():
    vm = VmProfile("vm", 1, ("PSCI_0_2",), ((MIDR, 0x410FD083),))
    p = policy_from_plan(plan_of(row("MIDR_EL1", 0x410FD083, 0x410FD083, 0x410FD083, Verdict.IDENTICAL),
                                 row("ID_AA64PFR2_EL1", 0, 0x11, 0, Verdict.SET)), vm)
    assert p.extra_writes == {PFR2: 0} and p.overrides == {}


def test_refused_plan_is_never_converted():
    with pytest.raises(ValueError, match="refused .*MIDR_EL1"):
        policy_from_plan(plan_of(row("MIDR_EL1", 1, 2, 2, Verdict.REFUSE), migratable=False))


def test_policy_json_roundtrip_keeps_extra_writes():
    p = ApplyPolicy(overrides={MIDR: 0x410FD084}, drop_if_reset={PIR: (0, KVM_RESET_UNKNOWN)},
                    extra_writes={PFR2: 0})
    assert ApplyPolicy.from_dict(p.to_dict()) == p


# --- on the shipped profiles (plans from the engine) --------------------------------------------------------------
@pytest.mark.parametrize("a,b,overrides,cap239,drops", [
    ("cortex-a72-r0p3@6.12", "cortex-a72-r0p3@6.12", {}, False, set()),
    ("cortex-a72-r0p3@6.12", "cortex-a72-r0p4@6.12", {MIDR: 0x410FD084}, False, set()),
    ("cortex-a72-r0p3@7.3", "cortex-a72-r0p4@7.3", {}, True, set()),
    ("cortex-a72-r0p3@6.12", "cortex-a72-r0p4@7.3", {}, True, {TCR2, PIR, PIRE0}),
])
def test_shipped_plans_convert_and_apply_as_planned(a, b, overrides, cap239, drops):
    plan, vm = shipped_plan(a, b)
    p = policy_from_plan(plan, vm)
    assert (p.overrides, p.enable_cap239, set(p.drop_if_reset)) == (overrides, cap239, drops)
    assert KVM_RESET_UNKNOWN in p.drop_if_reset.get(PIR, (KVM_RESET_UNKNOWN,))
    src = SimHost(a)
    vm_ = src.create_vm()
    vcpus = {i: vm_.create_vcpu(i) for i in range(2)}
    for v in vcpus.values():
        v.init(src.init)
    res = apply_vm(SimHost(b), read_vm(vcpus), p)
    assert res.ok
    for i in res.written:
        assert plan_deviations(plan, res.written[i], res.dropped[i], vcpu=i) == []
    assert {CAT.name(r) for r in res.dropped[0]} == {CAT.name(r) for r in drops}


def test_extra_writes_are_applied_in_the_vm_wide_phase():
    h = SimHost("cortex-a72-r0p3@6.12")
    res = apply_vm(h, {0: [(MIDR, 0x410FD083)]}, ApplyPolicy(extra_writes={ISAR0: 0x11020}))
    assert res.ok and res.written[0] == {MIDR: 0x410FD083, ISAR0: 0x11020}


def test_deviations_name_register_plan_and_actual():
    plan = plan_of(row("MIDR_EL1", 0x410FD083, 0x410FD084, 0x410FD084, Verdict.OVERRIDE),
                   row("TCR2_EL1", 0, 0, 0, Verdict.DROP), row("CTR_EL0", 1, 1, 1, Verdict.IDENTICAL))
    out = plan_deviations(plan, {MIDR: 0x410FD083, TCR2: 0}, dropped={CTR}, vcpu=3)
    assert out == ["vCPU 3 MIDR_EL1: the plan says 0x410fd084 (override), applied 0x410fd083",
                   "vCPU 3 TCR2_EL1: the plan drops it, the kernel took 0x0",
                   "vCPU 3 CTR_EL0: dropped (ENOENT) but the plan keeps it at 0x1 (identical)"]
