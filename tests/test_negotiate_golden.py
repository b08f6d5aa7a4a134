"""Golden plans on the shipped host profiles (capability documents from real kernels, probed through the
simulated host exactly as `invariantctl probe --sim X --json` does). Skips when a profile is missing."""
from __future__ import annotations

import pytest

from invariantd.protocol import schemas as S
from invariantd.protocol.catalog import catalog
from invariantd.protocol.negotiate import negotiate
from invariantd.protocol.policy import default_policy
from invariantd.protocol.schemas import Verdict
from test_negotiate import entry, sim_apply


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
        if cat.reg_class(rid) not in ("id", "cache") or regs[0].reason.startswith("CLIDR_EL1 is synthetic"):
            continue
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


def test_a_drift_register_holding_guest_state_refuses():
    k = newest_7x()
    extra = frozenset(default_policy().drift)
    src = probe_doc("cortex-a72-r0p3@6.12")
    src["values"][f"{catalog().id_of('TCR2_EL1'):#x}"] = "0x1"
    plan = negotiate(S.load_source(src, extra), S.host_from_doc(probe_doc(f"cortex-a72-r0p4@{k}"), extra))
    assert entry(plan, "TCR2_EL1").verdict is Verdict.REFUSE and not plan.migratable
