"""Cluster baseline: a VM profile every input host accepts (proved by the plan and by the simulator)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from invariantd.protocol.baseline import baseline
from invariantd.protocol.catalog import catalog
from invariantd.protocol.negotiate import negotiate
from support.hostdocs import A72_R0P3, A72_R0P4, A72_R1P0, field_put, host, make_doc, sim_apply

CAT = catalog()




def assert_accepted_everywhere(b, docs):
    for d in docs:
        plan = negotiate(b.profile, host(d))
        assert plan.migratable, [(e.register, e.field, e.reason) for e in plan.entries if e.verdict.value == "refuse"]
        sim_apply(plan, d)


def test_lowers_fields_by_safety_type_and_says_why():
    docs = [make_doc("7.3", {"ID_AA64ISAR0_EL1": field_put("ID_AA64ISAR0_EL1", "AES", 2),
                             "CTR_EL0": field_put("CTR_EL0", "DminLine", 4)}),
            make_doc("7.3", {"ID_AA64ISAR0_EL1": field_put("ID_AA64ISAR0_EL1", "AES", 1),
                             "CTR_EL0": field_put("CTR_EL0", "DminLine", 5)})]
    b = baseline([host(d) for d in docs], name="fleet-a", revision=7)
    assert b.profile.name == "fleet-a" and b.profile.revision == 7 and b.accepted_everywhere
    lowered = {(c.register, c.field): c for c in b.lowered}
    assert lowered[("ID_AA64ISAR0_EL1", "AES")].chosen == 1 and "LOWER" in lowered[("ID_AA64ISAR0_EL1", "AES")].reason
    assert lowered[("CTR_EL0", "DminLine")].chosen == 4
    assert_accepted_everywhere(b, docs)


def test_impid_uniform_with_cap239_and_errata_discovery_list():
    docs = [make_doc("7.3", {"MIDR_EL1": m}) for m in (A72_R0P3, A72_R0P4, A72_R1P0)]
    b = baseline([host(d) for d in docs])
    assert b.accepted_everywhere
    assert dict(b.profile.values)[CAT.id_of("MIDR_EL1")] == A72_R0P3
    assert {i.midr for i in b.profile.target_impls} == {A72_R0P3, A72_R0P4, A72_R1P0}
    assert dict(b.profile.values)[CAT.id_of("KVM_REG_ARM_VENDOR_HYP_BMAP_2")] == 0b11
    assert_accepted_everywhere(b, docs)


def test_hosts_without_masks_that_differ_are_conflicts():
    reg = "ID_AA64ISAR0_EL1"
    docs = [make_doc("6.1", {reg: field_put(reg, "AES", 2)}, masks=None),
            make_doc("6.1", {reg: field_put(reg, "AES", 1)}, masks=None)]
    b = baseline([host(d) for d in docs])
    assert not b.accepted_everywhere
    c = b.conflicts[0]
    assert (c.register, c.field) == (reg, "AES") and "cannot take" in c.reason


def test_firmware_levels_lowered():
    wa1 = "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1"
    docs = [make_doc("6.12", {wa1: 2}), make_doc("6.12", {wa1: 1})]
    b = baseline([host(d) for d in docs])
    assert dict(b.profile.values)[CAT.id_of(wa1)] == 1
    assert_accepted_everywhere(b, docs)


def test_registers_not_on_every_host_are_omitted_with_reason():
    docs = [make_doc("6.12", listed_extra=("TCR2_EL1",)), make_doc("6.13")]
    b = baseline([host(d) for d in docs])
    assert any(o.startswith("TCR2_EL1") for o in b.omitted)
    assert_accepted_everywhere(b, docs)


_KNOBS = [("ID_AA64ISAR0_EL1", "AES"), ("ID_AA64ISAR0_EL1", "SHA1"), ("ID_AA64PFR0_EL1", "CSV2"),
          ("ID_AA64MMFR0_EL1", "PARANGE"), ("ID_AA64MMFR1_EL1", "PAN"), ("CTR_EL0", "DminLine"),
          ("ID_AA64DFR0_EL1", "PMUVer")]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hosts=st.lists(st.tuples(st.sampled_from(["6.12", "7.3"]),
                                st.lists(st.integers(0, 3), min_size=len(_KNOBS), max_size=len(_KNOBS)),
                                st.sampled_from([A72_R0P3, A72_R0P4, A72_R1P0])), min_size=1, max_size=4))
def test_property_baseline_accepted_by_every_host(hosts):
    docs = []
    for kernel, draws, midr in hosts:
        vals = {"MIDR_EL1": midr}
        for (reg, fname), v in zip(_KNOBS, draws):
            vals[reg] = field_put(reg, fname, v, vals.get(reg))
        docs.append(make_doc(kernel, vals))
    b = baseline([host(d) for d in docs])
    # feature fields always combine; only MIDR may conflict (hosts without cap 239 show their own), and the
    # plan then overrides it per destination (same part, errata identical): every host still accepts.
    assert b.accepted_everywhere, b.conflicts
    assert bool(b.varies) == (len({m for _, _, m in hosts}) > 1 and any(k == "6.12" for k, _, _ in hosts))
    assert all(c.register == "MIDR_EL1" for c in b.varies)
    assert_accepted_everywhere(b, docs)


def _probe(spec):
    from invariantd.daemon.probe import probe
    from invariantd.daemon.sim import ProfileError, SimHost
    try:
        return probe(SimHost(spec), profile=spec)
    except ProfileError as e:
        pytest.skip(f"host profile {spec} not available: {e}")


def test_baseline_over_real_a72_profiles_7x():
    specs = ["cortex-a72-r0p3@7.3", "cortex-a72-r0p4@7.3", "cortex-a72-r1p0@7.3"]
    docs = [_probe(s) for s in specs]
    b = baseline([host(d) for d in docs], name="a72-fleet")
    assert b.accepted_everywhere and len(b.profile.target_impls) == 3
    assert_accepted_everywhere(b, docs)


@pytest.mark.parametrize("kernel", ["6.12", "7.3"])
def test_clidr_and_ctr_do_not_depend_on_the_order_of_the_hosts(kernel):
    """Cortex-A76 (CTR_EL0.IDC = 1, CLIDR LoUU = LoUIS = 0: implies IDC) and Cortex-A72 (IDC = 0): the baseline's
    CLIDR must pass set_clidr on the A72 (setters.tsv) whichever host comes first; before, the A76's CLIDR was kept
    when it came first, the plan said migratable and the real kernel refused it."""
    a76, a72 = _probe(f"cortex-a76@{kernel}"), _probe(f"cortex-a72-r0p4@{kernel}")
    assert CAT.implies_idc(int(a76["values"][f"{CAT.id_of('CLIDR_EL1'):#x}"], 16))
    results = []
    for docs in ([a76, a72], [a72, a76]):
        b = baseline([host(d) for d in docs], name="mixed")
        vals = dict(b.profile.values)
        results.append((vals[CAT.id_of("CLIDR_EL1")], vals[CAT.id_of("CTR_EL0")]))
        for d in docs:
            plan = negotiate(b.profile, host(d))
            clidr = next(e for e in plan.entries if e.register == "CLIDR_EL1" and not e.field)
            assert clidr.verdict.value in ("set", "identical"), clidr.reason
    assert results[0] == results[1]
    assert not CAT.implies_idc(results[0][0])


@pytest.mark.parametrize("kernel", ["6.12", "7.3"])
def test_ccsidr_line_sizes_do_not_depend_on_the_order_of_the_hosts(kernel):
    """A64FX (256-byte lines) and Cortex-A53 (64-byte): each CCSIDR[n] of the baseline must pass set_ccsidr on both
    (setters.tsv: no line shorter than the host's CTR_EL0 minimum), whichever host comes first - the A53's 64-byte
    CCSIDR would be refused by the A64FX kernel - and every CCSIDR entry of the plan is then a SET."""
    a64fx, a53 = _probe(f"a64fx@{kernel}"), _probe(f"cortex-a53@{kernel}")
    seen = []
    for docs in ([a64fx, a53], [a53, a64fx]):
        b = baseline([host(d) for d in docs], name="mixed")
        ccsidr = {r: v for r, v in b.profile.values if CAT.reg_class(r) == "demux"}
        assert ccsidr and all(v & 7 == 4 for v in ccsidr.values()), ccsidr      # 2**(4+4) = 256 bytes
        seen.append(ccsidr)
        for d in docs:
            plan = negotiate(b.profile, host(d))
            assert all(e.verdict.value in ("set", "identical") for e in plan.entries if e.register.startswith("CCSIDR"))
            sim_apply(plan, d)
    assert seen[0] == seen[1]
