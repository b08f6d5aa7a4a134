"""Golden plans on the shipped host profiles (capability documents from real kernels, probed through the
simulated host exactly as `invariantctl probe --sim X --json` does). Skips when a profile is missing."""
from __future__ import annotations

import pytest

from invariantd.protocol import schemas as S
from invariantd.protocol.catalog import catalog
from invariantd.protocol.negotiate import negotiate
from invariantd.protocol.policy import default_policy
from invariantd.protocol.schemas import Verdict
from support.hostdocs import entry, sim_apply


def probe_doc(spec: str) -> dict:
    from invariantd.daemon.probe import probe
    from invariantd.daemon.sim import ProfileError, SimHost
    try:
        return probe(SimHost(spec), profile=spec)
    except ProfileError as e:
        pytest.skip(f"host profile {spec} not available: {e}")


def newest_7x() -> str:
    from invariantd.daemon.sim import list_profiles
    ks = sorted({p.split("@")[1] for p in list_profiles() if p.startswith("cortex-a72-r0p3@7.")},
                key=lambda k: tuple(map(int, k.split("."))))
    if not ks:
        pytest.skip("no cortex-a72-r0p3@7.x profile shipped yet")
    return ks[-1]


def plan_for(a: str, b: str):
    extra = frozenset(default_policy().drift)
    src, dst = probe_doc(a), probe_doc(b)
    return negotiate(S.load_source(src, extra), S.host_from_doc(dst, extra)), dst


def changed(plan):
    return [(e.register, e.field, e.verdict.value) for e in plan.entries if e.verdict is not Verdict.IDENTICAL]


def test_a72_r0p3_to_r0p4_on_6_1_is_a_guest_visible_midr_override():
    plan, dst = plan_for("cortex-a72-r0p3@6.1", "cortex-a72-r0p4@6.1")
    assert changed(plan) == [("MIDR_EL1", "Revision", "override"), ("MIDR_EL1", "", "override")]
    midr = entry(plan, "MIDR_EL1")
    assert (midr.source, midr.destination, midr.planned) == (0x410FD083, 0x410FD084, 0x410FD084)
    assert "cap 239" in midr.reason and "errata check passed" in midr.reason
    assert plan.migratable and not plan.enable_cap239
    assert [g.split(":")[0] for g in plan.guest_visible] == ["MIDR_EL1"]
    sim_apply(plan, dst)


def test_a72_r0p3_to_r0p4_on_7x_pins_the_source_midr():
    k = newest_7x()
    plan, dst = plan_for(f"cortex-a72-r0p3@{k}", f"cortex-a72-r0p4@{k}")
    assert changed(plan) == [("MIDR_EL1", "Revision", "pin"), ("MIDR_EL1", "", "pin")]
    midr = entry(plan, "MIDR_EL1")
    assert midr.planned == 0x410FD083 and plan.enable_cap239 and plan.migratable
    assert plan.guest_visible == ()
    sim_apply(plan, dst)


def test_a72_r0p3_to_r1p0_on_6_12_variant_change_is_an_override():
    plan, dst = plan_for("cortex-a72-r0p3@6.12", "cortex-a72-r1p0@6.12")
    assert entry(plan, "MIDR_EL1").verdict is Verdict.OVERRIDE and plan.migratable
    sim_apply(plan, dst)


@pytest.mark.parametrize("kernel", ["6.1", "6.12", "7.3"])
def test_a72_to_neoverse_n1_lists_every_differing_field(kernel):
    plan, _ = plan_for(f"cortex-a72-r0p3@{kernel}", f"neoverse-n1@{kernel}")
    assert not plan.migratable
    cat = catalog()
    vm_vals = dict(S.vm_from_host(S.host_from_doc(probe_doc(f"cortex-a72-r0p3@{kernel}"))).values)
    dst_vals = dict(S.host_from_doc(probe_doc(f"neoverse-n1@{kernel}")).values)
    by_reg = {}
    for e in plan.entries:
        by_reg.setdefault(e.register, []).append(e)
    for rid, s in vm_vals.items():
        d = dst_vals.get(rid)
        if d is None or d == s:
            continue
        name = cat.name(rid)
        regs = [e for e in by_reg[name] if not e.field]
        assert len(regs) == 1 and regs[0].verdict is not Verdict.IDENTICAL and regs[0].reason
        if cat.reg_class(rid) not in ("id", "cache") or cat.setter_checks(name, tuple(map(int, kernel.split(".")))):
            continue                       # a register the kernel's own setter decides whole (setters.tsv)
        fields = {e.field for e in by_reg[name] if e.field}
        covered = 0
        for f in cat.fields_of(name):
            covered |= f.mask
            if f.raw(s) != f.raw(d):
                assert f.name in fields, (name, f.name)
        if (s ^ d) & ~covered:
            assert "(bits)" in fields, name
    err = entry(plan, "MIDR_EL1", "errata")
    assert err.verdict is Verdict.REFUSE and "spectre-bhb-loop-k24" in err.reason


def test_older_kernel_to_newer_kernel_drops_the_drift_registers():
    """6.12 lists TCR2/PIR/PIRE0 for every vCPU (PIR/PIRE0 at KVM's UNKNOWN fill); 6.13+ hides them."""
    k = newest_7x()
    plan, dst = plan_for("cortex-a72-r0p3@6.12", f"cortex-a72-r0p4@{k}")
    dropped = sorted(e.register for e in plan.entries if e.verdict is Verdict.DROP)
    assert dropped == ["PIRE0_EL1", "PIR_EL1", "TCR2_EL1"]
    assert entry(plan, "PIR_EL1").source == 0x1DE7EC7EDBADC0DE
    assert plan.migratable and plan.enable_cap239
    sim_apply(plan, dst)


def test_a_drift_register_holding_guest_state_refuses_when_the_guest_can_reach_it():
    k = newest_7x()
    extra = frozenset(default_policy().drift)
    src = probe_doc("cortex-a72-r0p3@6.12")
    src["values"][f"{catalog().id_of('TCR2_EL1'):#x}"] = "0x1"
    dest = S.host_from_doc(probe_doc(f"cortex-a72-r0p4@{k}"), extra)
    plan = negotiate(S.load_source(src, extra), dest)
    assert entry(plan, "TCR2_EL1").verdict is Verdict.DROP       # no FEAT_TCR2 in the VM: unreachable
    mmfr3 = f"{catalog().id_of('ID_AA64MMFR3_EL1'):#x}"
    src["values"][mmfr3] = hex(int(src["values"].get(mmfr3, "0"), 16) | 0x1)      # TCRX = 1: the guest may use it
    plan = negotiate(S.load_source(src, extra), dest)
    assert entry(plan, "TCR2_EL1").verdict is Verdict.REFUSE and not plan.migratable


# --- hosts without AArch32 (a64fx) and KVM's setter checks -------------------------------------------------------
AA32_REGS = ("ID_ISAR0_EL1", "MVFR0_EL1", "ID_DFR0_EL1")


@pytest.mark.parametrize("kernel", ["6.1", "6.12", "7.3"])
def test_to_a_host_without_aarch32_the_aa32_registers_are_refused_with_the_reason(kernel):
    plan, _ = plan_for(f"cortex-a76@{kernel}", f"a64fx@{kernel}")
    assert not plan.migratable
    rows = {e.register: e for e in plan.entries if not e.field}
    for reg in AA32_REGS:
        e = rows[reg]
        assert e.verdict is Verdict.REFUSE and "no AArch32 at EL0" in e.reason and "reads" in e.reason, e
        assert "UNKNOWN" not in e.reason                   # the A76 VM has AArch32 EL0: its guest may use it
    el0 = next(e for e in plan.entries if (e.register, e.field) == ("ID_AA64PFR0_EL1", "EL0"))
    assert el0.verdict is Verdict.REFUSE


def test_between_hosts_without_aarch32_the_aa32_registers_are_identical():
    plan, _ = plan_for("a64fx@6.12", "a64fx@7.3")
    rows = {e.register: e for e in plan.entries if not e.field}
    assert all(rows[r].verdict is Verdict.IDENTICAL and rows[r].source == 0 for r in AA32_REGS)


def test_a_value_kvms_setter_refuses_is_not_planned_as_set():
    """ID_DFR0_EL1.CopDbg below Armv8 debug: set_id_dfr0_el1 refuses it (prechecks.tsv) although the generic rule
    calls lowering safe; the plan must not say "set" (the apply would meet EINVAL after the pause)."""
    from invariantd.protocol.catalog import catalog
    cat = catalog()
    dfr0 = cat.id_of("ID_DFR0_EL1")
    copdbg = next(f for f in cat.fields_of("ID_DFR0_EL1") if f.name == "CopDbg")
    extra = frozenset(default_policy().drift)
    src = probe_doc("cortex-a76@7.3")
    vm = S.load_source(src, extra)
    vals = dict(vm.values)
    vals[dfr0] = copdbg.put(vals[dfr0], 0)
    vm = S.VmProfile(vm.name, vm.revision, vm.features, tuple(sorted(vals.items())), vm.reg_list)
    plan = negotiate(vm, S.host_from_doc(probe_doc("cortex-a76@7.3"), extra))
    row = next(e for e in plan.entries if (e.register, e.field) == ("ID_DFR0_EL1", "CopDbg"))
    assert row.verdict is not Verdict.SET and "setter refuses" in row.reason, row
    reg = next(e for e in plan.entries if e.register == "ID_DFR0_EL1" and not e.field)
    assert reg.verdict is Verdict.REFUSE or copdbg.get(reg.planned) >= 6, reg


@pytest.mark.parametrize("kernel", ["6.12", "7.3"])
def test_vm_without_aarch32_restores_on_the_simulated_a76(kernel):
    """The simulated twin of tests/lab/test_cross_kernel.py's AArch32-hiding restore: same plan, same events."""
    from invariantd.daemon import vmstate
    from invariantd.daemon.lab.matrix import hide_aarch32
    from invariantd.daemon.sim import SimHost
    state = vmstate.capture(SimHost(f"cortex-a76@{kernel}"), 2)
    hide_aarch32(state)
    code, rep = vmstate.restore(SimHost(f"cortex-a76@{kernel}"), state)
    assert code == 0, rep
    rows = {(e["register"], e["field"]): e["verdict"] for e in rep["plan"]["entries"]}
    assert rows[("ID_DFR0_EL1", "")] == "override" and rows[("ID_DFR0_EL1", "CopDbg")] == "override"
    assert {(e["register"], e["errno"], e["action"]) for e in rep["events"]
            if e["action"] != "readback-adjusted"} == {("ID_DFR0_EL1", "-", "override-plan")}
    assert rep["mismatches"] == [] and rep["deviations"] == []


# --- SVE vector lengths (KVM_REG_ARM64_SVE_VLS) -------------------------------------------------------------------
def _sve_vm(spec: str, vls: int | None = None):
    """A VM with SVE on `spec`'s host: its profile carries the vector lengths (the host's unless `vls`)."""
    from invariantd.protocol import regid
    extra = frozenset(default_policy().drift)
    vm = S.load_source(probe_doc(spec), extra)
    vals = dict(vm.values)
    assert regid.SVE_VLS in vals                           # the host document lists its lengths (probe.py)
    if vls is not None:
        vals[regid.SVE_VLS] = vls
    return S.VmProfile(vm.name, vm.revision, tuple(vm.features) + ("SVE",), tuple(sorted(vals.items())),
                       vm.reg_list)


def _vls_row(vm, spec):
    plan = negotiate(vm, S.host_from_doc(probe_doc(spec), frozenset(default_policy().drift)))
    return next(e for e in plan.entries if e.register == "KVM_REG_ARM64_SVE_VLS"), plan


def test_sve_vector_lengths_follow_kvms_rule():
    # a64fx offers 128/256/512; QEMU max 128..2048 in steps of 128 (the real kernels report 0xb and 0xffff)
    assert probe_doc("a64fx@7.3")["sve_vls"] == "0xb" and probe_doc("max@7.3")["sve_vls"] == "0xffff"
    assert "sve_vls" not in probe_doc("cortex-a76@7.3")
    row, _ = _vls_row(_sve_vm("max@7.3"), "max@6.12")
    assert row.verdict is Verdict.IDENTICAL
    row, plan = _vls_row(_sve_vm("a64fx@7.3"), "max@7.3")     # max also offers 384 below 512: cannot be hidden
    assert row.verdict is Verdict.REFUSE and "384" in row.reason and not plan.migratable
    row, _ = _vls_row(_sve_vm("max@7.3"), "a64fx@7.3")        # up to 2048 onto a 512 host
    assert row.verdict is Verdict.REFUSE and "above the host's 512" in row.reason
    row, _ = _vls_row(_sve_vm("max@7.3", vls=0x3), "a64fx@7.3")   # a VMM that capped the VM at 256 bits
    assert row.verdict is Verdict.SET and "128, 256" in row.reason


def test_vm_without_sve_plans_no_vector_lengths():
    plan, _ = plan_for("max@7.3", "a64fx@7.3")
    assert not [e for e in plan.entries if e.register == "KVM_REG_ARM64_SVE_VLS"]


@pytest.mark.parametrize("model", ["a64fx", "max"])
def test_sve_vm_restores_on_a_newer_simulated_kernel(model):
    """The simulated twin of the lab's SVE restore: planned against the destination's SVE view of ID_AA64PFR0_EL1
    (its base view hides PFR0.SVE, and the plan refused), Z/P/FFR read back equal."""
    from invariantd.daemon import vmstate
    from invariantd.daemon.sim import SimHost
    state = vmstate.capture(SimHost(f"{model}@6.12"), 2, ("PSCI_0_2", "SVE"))
    code, rep = vmstate.restore(SimHost(f"{model}@7.3"), state)
    assert code == 0, rep.get("error") or [e for e in rep["plan"]["entries"] if e["verdict"] == "refuse"]
    assert rep["mismatches"] == [] and rep["deviations"] == []
    vls = next(e for e in rep["plan"]["entries"] if e["register"] == "KVM_REG_ARM64_SVE_VLS")
    assert vls["verdict"] == "identical"


@pytest.mark.parametrize("kernel", ["6.12", "7.3"])
def test_workaround_2_of_a_vm_without_ssbs_meets_the_ssbs_hidden_view(kernel):
    """Cortex-A53 (no SSBS, WORKAROUND_2 NOT_REQUIRED) onto a Cortex-A76 (SSBS, mitigated: 0 for a VM with SSBS): the
    real 6.12 / 7.3 kernels report and accept 3 once the VM's SSBS is 0 (profiles' ssbs_hidden_values), so the
    plan no longer refuses the level; on 6.1 the level came from the host capability and stays refused."""
    plan, _ = plan_for(f"cortex-a53@{kernel}", f"cortex-a76@{kernel}")
    assert entry(plan, "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2").verdict is Verdict.IDENTICAL
    old, _ = plan_for("cortex-a53@6.1", "cortex-a76@6.1")
    assert entry(old, "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2").verdict is Verdict.REFUSE
