"""Negotiation engine: table-driven per field and safety type, imp-ID / FW / drift / big.LITTLE / errata,
determinism, and the property that a non-refusing plan applies on the simulated destination."""
from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from invariantd.protocol import kvmabi, schemas as S
from invariantd.protocol.catalog import Safety, catalog
from invariantd.protocol.negotiate import negotiate
from invariantd.protocol.policy import default_policy, loads
from invariantd.protocol.schemas import Implementation, Verdict
from support.hostdocs import A53_R0P4, A72_R0P3, A72_R0P4, A72_R1P0, BASE, CAT, N1_R4P1, entry, host, make_doc, plan_between, sim_apply















# --- per field and safety type (table-driven) -------------------------------------------------------

def _with_field(reg: str, fname: str, raw: int, base: int | None = None) -> int:
    f = next(x for x in CAT.fields_of(reg) if x.name == fname)
    return f.put(BASE.get(reg, 0) if base is None else base, raw)


FIELD_CASES = [
    # register, field, source raw, destination raw, destination masks, kernel, verdict
    ("ID_AA64ISAR0_EL1", "AES", 1, 2, "full", "7.3", Verdict.SET),            # LOWER: lower than dest: safe
    ("ID_AA64ISAR0_EL1", "AES", 2, 1, "full", "7.3", Verdict.REFUSE),         # LOWER: above dest: guest loses
    ("ID_AA64ISAR0_EL1", "AES", 1, 2, {}, "7.3", Verdict.OVERRIDE),           # not writable, dest offers more
    ("ID_AA64ISAR0_EL1", "AES", 2, 1, {}, "7.3", Verdict.REFUSE),             # not writable, dest offers less
    ("ID_AA64ISAR0_EL1", "AES", 1, 2, None, "6.1", Verdict.OVERRIDE),         # no masks: dest value shown
    ("ID_AA64ISAR0_EL1", "AES", 2, 1, None, "6.1", Verdict.REFUSE),
    ("ID_AA64PFR0_EL1", "FP", 0xF, 0, "full", "7.3", Verdict.SET),            # signed LOWER: -1 < 0
    ("ID_AA64PFR0_EL1", "FP", 0, 0xF, "full", "7.3", Verdict.REFUSE),         # signed: 0 above -1
    ("ID_AA64MMFR1_EL1", "SpecSEI", 1, 0, "full", "7.3", Verdict.SET),        # HIGHER: may raise
    ("ID_AA64MMFR1_EL1", "SpecSEI", 0, 1, "full", "7.3", Verdict.REFUSE),     # HIGHER: never lower
    ("ID_AA64MMFR1_EL1", "SpecSEI", 1, 0, {}, "7.3", Verdict.OVERRIDE),       # not writable; fewer SErrors: a gain
    ("ID_AA64MMFR1_EL1", "SpecSEI", 0, 1, {}, "7.3", Verdict.REFUSE),         # not writable; guest-visible loss
    ("CTR_EL0", "CWG", 0, 4, "full", "7.3", Verdict.SET),                     # HIGHER_OR_ZERO: 0 is safe
    ("CTR_EL0", "CWG", 5, 4, "full", "7.3", Verdict.SET),                     # HIGHER_OR_ZERO: raise
    ("CTR_EL0", "CWG", 3, 4, "full", "7.3", Verdict.REFUSE),
    ("ID_AA64MMFR0_EL1", "TGRAN4_2", 1, 2, "full", "7.3", Verdict.SET),       # EXACT: the safe value 1
    ("ID_AA64MMFR0_EL1", "TGRAN4_2", 3, 2, "full", "7.3", Verdict.REFUSE),    # EXACT: anything else
    ("ID_AA64PFR0_EL1", "RME", 1, 0, "full", "7.3", Verdict.REFUSE),          # NONE: never changes
    ("ID_AA64DFR0_EL1", "PMUVer", 1, 4, "full", "7.3", Verdict.SET),          # KVM override: EXACT -> LOWER
]


@pytest.mark.parametrize("reg,fname,s,d,masks,kernel,verdict", FIELD_CASES,
                         ids=[f"{c[0]}.{c[1]}-{c[2]}vs{c[3]}-{c[5]}-{'nomask' if c[4] is None else 'mask' if c[4] == 'full' else 'ro'}"
                              for c in FIELD_CASES])
def test_field_verdict(reg, fname, s, d, masks, kernel, verdict):
    src = make_doc(kernel, {reg: _with_field(reg, fname, s)}, masks=masks)
    dst = make_doc(kernel, {reg: _with_field(reg, fname, d)}, masks=masks)
    plan = plan_between(src, dst)
    e = entry(plan, reg, fname)
    assert e.verdict is verdict, e.reason
    assert (e.source, e.destination) == (s, d)
    assert e.reason
    reg_entry = entry(plan, reg)
    assert (reg_entry.verdict is Verdict.REFUSE) == (verdict is Verdict.REFUSE)
    assert plan.migratable == (verdict is not Verdict.REFUSE)
    if verdict is Verdict.OVERRIDE:
        assert e.guest_sees == f"{s:#x} -> {d:#x}"
        assert any(g.startswith(f"{reg}.{fname}") for g in plan.guest_visible)
    if plan.migratable:
        sim_apply(plan, dst)


def _lower_fields():
    for reg, fields in CAT.fields.items():
        if CAT.sysreg(reg).cls != "id":
            continue
        for f in fields:
            if f.kvm_safety is Safety.LOWER and f.width >= 2 and not f.signed and f.since <= (7, 3):
                yield reg, f


@pytest.mark.parametrize("reg,f", list(_lower_fields()), ids=lambda x: getattr(x, "name", x))
def test_every_lower_field_safe_and_unsafe(reg, f):
    """From the catalog, like set_id_regs.c: per LOWER field one safe value (set) and one unsafe (refuse)."""
    base = BASE.get(reg, 0)
    lo, hi = f.put(base, 1), f.put(base, 2)
    if f.name in ("EL0", "EL1", "DebugVer", "CopDbg"):  # KVM's own setters refuse low values: start higher
        debug = f.name in ("DebugVer", "CopDbg")           # (prechecks.tsv: below Armv8 debug is refused)
        lo, hi = f.put(base, 0x6 if debug else 1), f.put(base, 0x8 if debug else 2)
    safe = plan_between(make_doc("7.3", {reg: lo}), make_doc("7.3", {reg: hi}))
    assert entry(safe, reg, f.name).verdict is Verdict.SET and safe.migratable
    unsafe = plan_between(make_doc("7.3", {reg: hi}), make_doc("7.3", {reg: lo}))
    assert entry(unsafe, reg, f.name).verdict is Verdict.REFUSE and not unsafe.migratable


def test_bits_outside_catalogued_fields_refuse():
    # ID_ISAR5_EL1 bits 23:20 lie in no catalogued field: a difference there has unknown meaning
    plan = plan_between(make_doc("7.3", {"ID_ISAR5_EL1": 0x11121}), make_doc("7.3", {"ID_ISAR5_EL1": 0x111121}))
    e = entry(plan, "ID_ISAR5_EL1", "(bits)")
    assert e.verdict is Verdict.REFUSE and "0x100000" in e.reason
    allow = loads('[features]\nexact = "allow"\n')
    plan = plan_between(make_doc("7.3", {"ID_ISAR5_EL1": 0x11121}), make_doc("7.3", {"ID_ISAR5_EL1": 0x111121}),
                        allow)
    assert entry(plan, "ID_ISAR5_EL1", "(bits)").verdict is Verdict.OVERRIDE and plan.migratable


def test_field_rule_in_policy_overrides_direction():
    reg, fname = "ID_AA64ISAR0_EL1", "AES"
    pol = loads(f'[[features.field]]\nregister = "{reg}"\nfield = "{fname}"\naction = "allow"\nreason = "lab only"\n')
    plan = plan_between(make_doc("7.3", {reg: _with_field(reg, fname, 2)}, masks={}),
                        make_doc("7.3", {reg: _with_field(reg, fname, 1)}, masks={}), pol)
    e = entry(plan, reg, fname)
    assert e.verdict is Verdict.OVERRIDE and "lab only" in e.reason


def test_clidr_synthetic_from_6_3_but_exact_on_6_1():
    v = {"CLIDR_EL1": 0x0A200023}
    assert entry(plan_between(make_doc("6.12", v), make_doc("6.12")), "CLIDR_EL1").verdict is Verdict.SET
    p = plan_between(make_doc("6.1", v, masks=None), make_doc("6.1", masks=None))
    assert entry(p, "CLIDR_EL1").verdict is Verdict.REFUSE


# --- implementation ID registers ---------------------------------------------------------------------

def test_midr_revision_pins_with_cap239():
    plan = plan_between(make_doc("7.3"), make_doc("7.3", {"MIDR_EL1": A72_R0P4}))
    e = entry(plan, "MIDR_EL1")
    assert e.verdict is Verdict.PIN and e.planned == A72_R0P3 and plan.enable_cap239 and plan.migratable
    assert entry(plan, "MIDR_EL1", "Revision").verdict is Verdict.PIN
    assert plan.guest_visible == ()
    sim_apply(plan, make_doc("7.3", {"MIDR_EL1": A72_R0P4}))


def test_midr_mask_without_cap239_is_not_writable():
    """7.x reports a MIDR mask even without cap 239; the decision comes from the cap, not the mask."""
    dst = make_doc("7.3", {"MIDR_EL1": A72_R0P4}, cap239=0)
    assert int(dst["writable_masks"]["0"], 16)
    plan = plan_between(make_doc("7.3", cap239=0), dst)
    e = entry(plan, "MIDR_EL1")
    assert e.verdict is Verdict.OVERRIDE and e.planned == A72_R0P4 and not plan.enable_cap239
    assert "cap 239" in e.reason and "writable-mask" in e.reason
    sim_apply(plan, dst)


def test_midr_revision_on_6_1_is_a_guest_visible_override_with_errata_reason():
    dst = make_doc("6.1", {"MIDR_EL1": A72_R0P4}, masks=None)
    plan = plan_between(make_doc("6.1", masks=None), dst)
    e = entry(plan, "MIDR_EL1")
    assert e.verdict is Verdict.OVERRIDE and "errata check passed" in e.reason
    assert any(g.startswith("MIDR_EL1:") and "r0p4" in g for g in plan.guest_visible)
    sim_apply(plan, dst)


def test_midr_other_part_refused_without_cap239():
    plan = plan_between(make_doc("6.12"), make_doc("6.12", {"MIDR_EL1": N1_R4P1}))
    e = entry(plan, "MIDR_EL1")
    assert e.verdict is Verdict.REFUSE and "PartNum" in e.reason and not plan.migratable
    assert entry(plan, "MIDR_EL1", "PartNum").verdict is Verdict.REFUSE


def test_errata_missing_refuses_even_when_pinned_unless_target_impls_cover_it():
    src, dst = make_doc("7.3"), make_doc("7.3", {"MIDR_EL1": N1_R4P1})
    plan = plan_between(src, dst)
    assert entry(plan, "MIDR_EL1").verdict is Verdict.PIN
    err = entry(plan, "MIDR_EL1", "errata")
    assert err.verdict is Verdict.REFUSE and "spectre-bhb-loop-k24" in err.reason and not plan.migratable
    vm = S.vm_from_host(host(src))
    covered = S.VmProfile(vm.name, 1, vm.features, vm.values, vm.reg_list,
                          target_impls=(Implementation(A72_R0P3), Implementation(N1_R4P1)))
    plan = negotiate(covered, host(dst))
    assert plan.migratable and plan.target_impls == covered.target_impls
    assert any("BMAP_2" in n for n in plan.notes)
    sim_apply(plan, dst)


def test_errata_policy_allow_shows_the_exposure():
    pol = loads('[errata]\nmissing = "allow"\n')
    plan = plan_between(make_doc("7.3"), make_doc("7.3", {"MIDR_EL1": N1_R4P1}), pol)
    e = entry(plan, "MIDR_EL1", "errata")
    assert e.verdict is Verdict.OVERRIDE and plan.migratable and "spectre-bhb-loop-k24" in e.guest_sees


def test_errata_revidr_fix_is_honoured():
    # Cortex-A53 r0p4 with REVIDR bit 8 has 843419 fixed: a guest from such a CPU moving to a plain r0p4 misses it
    src = make_doc("6.12", {"MIDR_EL1": A53_R0P4, "REVIDR_EL1": 0x100})
    dst = make_doc("6.12", {"MIDR_EL1": A53_R0P4, "REVIDR_EL1": 0})
    plan = plan_between(src, dst)
    assert "843419" in entry(plan, "MIDR_EL1", "errata").reason and not plan.migratable
    assert plan_between(dst, src).migratable          # the other way round needs nothing new


@pytest.mark.parametrize("reg", ["REVIDR_EL1", "AIDR_EL1"])
def test_revidr_aidr_accept_destination(reg):
    dst = make_doc("6.12", {reg: 0x5})
    plan = plan_between(make_doc("6.12"), dst)
    assert entry(plan, reg).verdict is Verdict.OVERRIDE and plan.migratable
    sim_apply(plan, dst)
    never = loads(f'[imp_id.{reg}]\noverride = "never"\n')
    assert entry(plan_between(make_doc("6.12"), dst, never), reg).verdict is Verdict.REFUSE


# --- firmware registers -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,s,d,verdict", [
    ("KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1", 1, 2, Verdict.SET),
    ("KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1", 2, 1, Verdict.REFUSE),     # destination less mitigated
    ("KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3", 1, 0, Verdict.REFUSE),
    ("KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2", 2, 3, Verdict.SET),        # AVAIL / NOT_REQUIRED fold together
    ("KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2", 3, 0, Verdict.REFUSE),
    ("KVM_REG_ARM_PSCI_VERSION", 0x10000, 0x10001, Verdict.SET),
    ("KVM_REG_ARM_PSCI_VERSION", 0x10002, 0x10001, Verdict.REFUSE),
    ("KVM_REG_ARM_STD_BMAP", 0, 1, Verdict.SET),
    ("KVM_REG_ARM_VENDOR_HYP_BMAP", 3, 1, Verdict.REFUSE),
])
def test_firmware_registers(name, s, d, verdict):
    dst = make_doc("6.12", {name: d})
    plan = plan_between(make_doc("6.12", {name: s}), dst)
    assert entry(plan, name).verdict is verdict
    if plan.migratable:
        sim_apply(plan, dst)


# --- register-list drift ------------------------------------------------------------------------------

def test_bmap2_dropped_going_back_when_zero_refused_when_set():
    src = make_doc("7.3")
    dst = make_doc("6.12")
    plan = plan_between(src, dst)
    e = entry(plan, "KVM_REG_ARM_VENDOR_HYP_BMAP_2")
    assert e.verdict is Verdict.DROP and plan.migratable and "reset" in e.reason
    sim_apply(plan, dst)
    src = make_doc("7.3", {"KVM_REG_ARM_VENDOR_HYP_BMAP_2": 3})
    assert entry(plan_between(src, dst), "KVM_REG_ARM_VENDOR_HYP_BMAP_2").verdict is Verdict.REFUSE


@pytest.mark.parametrize("reg", ["TCR2_EL1", "PIR_EL1", "PIRE0_EL1"])
def test_613_hidden_registers(reg):
    dst = make_doc("6.13")
    zero = plan_between(make_doc("6.12", listed_extra=(reg,)), dst)
    assert entry(zero, reg).verdict is Verdict.DROP and zero.migratable
    used = plan_between(make_doc("6.12", {reg: 0x5}), dst)
    assert entry(used, reg).verdict is Verdict.REFUSE and not used.migratable


def test_unknown_register_absent_on_destination_refuses():
    plan = plan_between(make_doc("6.12", {"KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3": 1}),
                        make_doc("6.12", unlisted=("KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3",)))
    assert entry(plan, "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3").verdict is Verdict.REFUSE


# --- big.LITTLE ---------------------------------------------------------------------------------------

def test_big_little_destination_names_the_cluster():
    dst = make_doc("6.12", cpu_midrs=[A53_R0P4, A53_R0P4, A72_R0P3, A72_R0P3])
    plan = plan_between(make_doc("6.12"), dst)
    assert plan.big_little and plan.assumed_cluster == A72_R0P3 and plan.cluster_cpus == (2, 3)
    assert entry(plan, "MIDR_EL1", "cluster").verdict is Verdict.OVERRIDE and plan.migratable
    refuse = loads('[big_little]\naction = "refuse"\n')
    assert not plan_between(make_doc("6.12"), dst, refuse).migratable


def test_big_little_source_midrs_count_as_known_implementations():
    src = make_doc("6.12", cpu_midrs=[A72_R0P3, N1_R4P1])
    plan = plan_between(src, make_doc("6.12"))
    assert plan.migratable  # destination == the A72 cluster


# --- determinism and digest ---------------------------------------------------------------------------

def test_plan_and_digest_are_deterministic():
    src, dst = make_doc("7.3"), make_doc("7.3", {"MIDR_EL1": A72_R0P4, "ID_AA64ISAR0_EL1": 0x10211120})
    p1, p2 = plan_between(src, dst), plan_between(copy.deepcopy(src), copy.deepcopy(dst))
    assert p1 == p2 and len(p1.digest) == 32
    shuffled = copy.deepcopy(dst)
    shuffled["values"] = dict(reversed(list(shuffled["values"].items())))
    shuffled["reg_list"] = list(reversed(shuffled["reg_list"]))
    assert plan_between(src, shuffled).digest == p1.digest
    other = plan_between(src, make_doc("7.3", {"MIDR_EL1": A72_R1P0}))
    assert other.digest != p1.digest
    assert plan_between(src, dst, loads('[errata]\nmissing = "allow"\n')).digest != p1.digest  # policy in digest


# --- property: a non-refusing plan never gets a rejection on the simulated destination ----------------

_KNOBS = [("ID_AA64ISAR0_EL1", "AES"), ("ID_AA64ISAR0_EL1", "SHA2"), ("ID_AA64ISAR0_EL1", "ATOMIC"),
          ("ID_AA64PFR0_EL1", "CSV2"), ("ID_AA64PFR0_EL1", "RAS"), ("ID_AA64PFR0_EL1", "AdvSIMD"),
          ("ID_AA64MMFR0_EL1", "PARANGE"), ("ID_AA64MMFR1_EL1", "PAN"), ("ID_AA64MMFR1_EL1", "VMIDBits"),
          ("ID_AA64DFR0_EL1", "PMUVer"), ("CTR_EL0", "IDC"), ("CTR_EL0", "DminLine")]


def _mutate(values: dict, draws: list[int]) -> dict:
    out = dict(values)
    for (reg, fname), v in zip(_KNOBS, draws):
        f = next(x for x in CAT.fields_of(reg) if x.name == fname)
        out[reg] = f.put(out.get(reg, BASE.get(reg, 0)), v & ((1 << f.width) - 1))
    return out


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kernel=st.sampled_from(["6.1", "6.12", "7.3"]),
       sdraw=st.lists(st.integers(0, 3), min_size=len(_KNOBS), max_size=len(_KNOBS)),
       ddraw=st.lists(st.integers(0, 3), min_size=len(_KNOBS), max_size=len(_KNOBS)),
       smidr=st.sampled_from([A72_R0P3, A72_R0P4, A72_R1P0, N1_R4P1]),
       dmidr=st.sampled_from([A72_R0P3, A72_R0P4, A72_R1P0, N1_R4P1]),
       cap239=st.booleans(), wa=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       real_masks=st.booleans())
def test_property_non_refusing_plan_applies_on_sim(kernel, sdraw, ddraw, smidr, dmidr, cap239, wa, real_masks):
    from support.fixtures import MASKS_612, MASKS_73
    masks = None if kernel == "6.1" else "full"
    if real_masks and masks:
        table = MASKS_73 if kernel == "7.3" else MASKS_612
        masks = {n: table.get(r.mask_index, 0) for n, r in CAT.sysregs.items()
                 if r.mask_index is not None and r.cls in ("id", "cache", "imp_id")}
    c239 = int(cap239 and kernel == "7.3")
    src = make_doc(kernel, _mutate({"MIDR_EL1": smidr, "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1": wa[0]}, sdraw),
                   masks=masks, cap239=c239)
    dst = make_doc(kernel, _mutate({"MIDR_EL1": dmidr, "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1": wa[1]}, ddraw),
                   masks=masks, cap239=c239)
    plan = plan_between(src, dst)
    assert plan == plan_between(src, dst)
    refusals = [e for e in plan.entries if e.verdict is Verdict.REFUSE]
    assert plan.migratable == (not refusals)
    for e in plan.entries:
        assert e.reason, e
    if plan.migratable:
        sim_apply(plan, dst)


def test_vcpu_features_need_the_destination_caps():
    dst = make_doc("7.3")
    dst["caps"]["KVM_CAP_ARM_SVE"] = 0
    vm = S.vm_from_host(host(make_doc("7.3")))
    sve = S.VmProfile(vm.name, 1, ("PSCI_0_2", "SVE"), vm.values, vm.reg_list)
    plan = negotiate(sve, host(dst))
    e = entry(plan, "vcpu_init", "SVE")
    assert e.verdict is Verdict.REFUSE and "KVM_CAP_ARM_SVE" in e.reason and not plan.migratable
    dst["caps"]["KVM_CAP_ARM_SVE"] = 1
    assert negotiate(sve, host(dst)).migratable


def test_vcpu_feature_gates_come_from_the_table():
    """data/vcpu_features.tsv: POWER_OFF is accepted by every arm64 KVM; HAS_EL2 is not checked yet (refused)."""
    from invariantd.protocol import kvmabi
    assert kvmabi.FEATURE_GATES["SVE"] == "KVM_CAP_ARM_SVE" and kvmabi.VCPU_FEATURES["HAS_EL2"] == 7
    dst = make_doc("7.3")
    vm = S.vm_from_host(host(make_doc("7.3")))
    off = negotiate(S.VmProfile(vm.name, 1, ("POWER_OFF", "PSCI_0_2"), vm.values, vm.reg_list), host(dst))
    assert off.migratable and not [e for e in off.entries if e.register == "vcpu_init"]
    el2 = negotiate(S.VmProfile(vm.name, 1, ("PSCI_0_2", "HAS_EL2"), vm.values, vm.reg_list), host(dst))
    e = entry(el2, "vcpu_init", "HAS_EL2")
    assert e.verdict is Verdict.REFUSE and "cannot check it yet" in e.reason and not el2.migratable


def test_bmap2_discovery_bits_are_data():
    from invariantd.protocol.catalog import catalog
    cat = catalog()
    bm2 = cat.id_of("KVM_REG_ARM_VENDOR_HYP_BMAP_2")
    assert cat.fwregs[bm2].accepts == 0b11
    assert all(fw.accepts == 0 for rid, fw in cat.fwregs.items() if rid != bm2)


def test_clidr_implying_idc_is_refused_where_ctr_el0_has_no_idc():
    """set_clidr (6.3+, setters.tsv): LoUU = LoUIS = 0 implies IDC; a host with CTR_EL0.IDC = 0 refuses it."""
    a76_like = {"CLIDR_EL1": 0x82000023}                     # LoC 2, LoUU 0, LoUIS 0
    idc0 = {"CTR_EL0": 0x84448004}                           # IDC 0 (Cortex-A72)
    e = entry(plan_between(make_doc("6.12", a76_like), make_doc("6.12", idc0)), "CLIDR_EL1")
    assert e.verdict is Verdict.REFUSE and "set_clidr: this CLIDR implies IDC" in e.reason
    idc1 = {"CTR_EL0": 0x94448004}                           # IDC 1
    assert entry(plan_between(make_doc("6.12", a76_like), make_doc("6.12", idc1)), "CLIDR_EL1").verdict \
        is Verdict.SET


def test_csv2_lowered_as_it_is_on_6_1():
    """6.1 has no writable masks, but set_id_aa64pfr0_el1 lets userspace lower CSV2/CSV3 (legacy_writable.tsv):
    the plan writes the source's lower value (the guest keeps it) instead of showing it the destination's."""
    low = _with_field("ID_AA64PFR0_EL1", "CSV2", 0)
    high = _with_field("ID_AA64PFR0_EL1", "CSV2", 1)
    dst = make_doc("6.1", {"ID_AA64PFR0_EL1": high}, masks=None)
    plan = plan_between(make_doc("6.1", {"ID_AA64PFR0_EL1": low}, masks=None), dst)
    e = entry(plan, "ID_AA64PFR0_EL1", "CSV2")
    assert e.verdict is Verdict.SET and e.planned == 0 and "set_id_aa64pfr0_el1" in e.reason
    assert entry(plan, "ID_AA64PFR0_EL1").verdict is Verdict.SET and plan.guest_visible == ()
    sim_apply(plan, dst)                                       # the simulated 6.1 kernel takes it
    up = plan_between(make_doc("6.1", {"ID_AA64PFR0_EL1": high}, masks=None),
                      make_doc("6.1", {"ID_AA64PFR0_EL1": low}, masks=None))
    assert entry(up, "ID_AA64PFR0_EL1", "CSV2").verdict is not Verdict.SET    # raising is not allowed
    on_612 = plan_between(make_doc("6.12", {"ID_AA64PFR0_EL1": low}), make_doc("6.12", {"ID_AA64PFR0_EL1": high}))
    assert "set_id_aa64pfr0_el1 lets" not in entry(on_612, "ID_AA64PFR0_EL1", "CSV2").reason


def test_pmu_v3_strict_follows_the_kernel_that_knows_it():
    """Bit 9 (7.3 uapi): vcpu_features.tsv says since 7.3, gated by KVM_CAP_ARM_PMU_V3, requires PMU_V3 - as the lab
    kernels answered (conformance vcpu-init/*: 7.3 OK with PMU_V3, EINVAL alone; 6.1 / 6.12 ENOENT)."""
    from invariantd.protocol import kvmabi
    assert kvmabi.VCPU_FEATURES["PMU_V3_STRICT"] == 9 and kvmabi.FEATURE_SINCE["PMU_V3_STRICT"] == (7, 3)
    base = S.vm_from_host(host(make_doc("7.3")))

    def plan_to(kernel, feats, pmu=1):
        dst = make_doc(kernel)
        dst["caps"]["KVM_CAP_ARM_PMU_V3"] = pmu
        return negotiate(S.VmProfile(base.name, base.revision, feats, base.values, base.reg_list), host(dst))
    strict = ("PSCI_0_2", "PMU_V3", "PMU_V3_STRICT")
    assert plan_to("7.3", strict).migratable
    old = plan_to("6.12", strict)
    e = entry(old, "vcpu_init", "PMU_V3_STRICT")
    assert not old.migratable and "unknown to the destination kernel 6.12" in e.reason and "ENOENT" in e.reason
    e = entry(plan_to("7.3", ("PSCI_0_2", "PMU_V3_STRICT")), "vcpu_init", "PMU_V3_STRICT")
    assert e.verdict is Verdict.REFUSE and "needs PMU_V3" in e.reason
    e = entry(plan_to("7.3", strict, pmu=0), "vcpu_init", "PMU_V3_STRICT")
    assert e.verdict is Verdict.REFUSE and "KVM_CAP_ARM_PMU_V3" in e.reason


def test_ccsidr_follows_set_ccsidr():
    """CCSIDR[n] (setters.tsv, set_ccsidr): from 6.3 a line no shorter than CTR_EL0's minimum is taken, whatever
    the UNKNOWN bits 31:28 and the geometry; before 6.3 only the physical CPU's own value."""
    ccsidr0 = 0x6020000000110000                                  # CSSELR 0: L1 data cache
    a53_61, a64fx_64b_min = 0x700FE01A, 0x96668006                 # a53 on 6.1: 64-byte lines; CTR with 256-byte lines

    def doc(kernel, ccsidr, ctr=None):
        d = make_doc(kernel, {"CTR_EL0": ctr} if ctr else {}, masks=None if kernel == "6.1" else "full")
        d["values"][f"{ccsidr0:#x}"] = f"{ccsidr:#x}"
        d["reg_list"].append(f"{ccsidr0:#x}")
        return d
    ok = plan_between(doc("6.1", a53_61), doc("6.12", 0x2))
    e = entry(ok, "CCSIDR[0]")
    assert e.verdict is Verdict.SET and e.planned == a53_61 and "set_ccsidr takes it" in e.reason
    sim_apply(ok, doc("6.12", 0x2))                               # the simulated 6.12 kernel takes it
    short = entry(plan_between(doc("6.12", 0x2), doc("6.12", 0x4, ctr=a64fx_64b_min)), "CCSIDR[0]")
    assert short.verdict is Verdict.REFUSE and "64-byte lines, below the 256 bytes of CTR_EL0.DminLine" in short.reason
    legacy = entry(plan_between(doc("6.1", a53_61), doc("6.1", 0x701FE01A)), "CCSIDR[0]")
    assert legacy.verdict is Verdict.REFUSE and "physical CPU's cache geometry" in legacy.reason


def test_ids_across_kernels_is_planned_not_failed():
    """ID_AA64MMFR2_EL1.IDS (the anchors: may differ between kernels from 7.0, not writable). On every lab CPU model
    the real 6.12 and 7.3 kernels report the same IDS (profiles), so 6.12 <-> 7.3 is unaffected there; where it does
    differ the plan says so before anything moves: 0 -> 1 is shown to the guest (a gain), 1 -> 0 refused (a loss)."""
    import json
    from importlib import resources
    cat = catalog()
    rid, f = cat.id_of("ID_AA64MMFR2_EL1"), next(x for x in cat.fields_of("ID_AA64MMFR2_EL1") if x.name == "IDS")
    prof = resources.files("invariantd.protocol").joinpath("data", "profiles")
    for model in ("cortex-a72-r0p4", "cortex-a76", "neoverse-n1", "a64fx", "max"):
        ids = {k: f.get(int(json.loads(prof.joinpath(f"{model}@{k}.json").read_text())["values"][f"{rid:#x}"], 16))
               for k in ("6.12", "7.3")}
        assert ids["6.12"] == ids["7.3"], (model, ids)
    zero, one = _with_field("ID_AA64MMFR2_EL1", "IDS", 0), _with_field("ID_AA64MMFR2_EL1", "IDS", 1)
    not_ids = {"ID_AA64MMFR2_EL1": 0xFFFFFFFFFFFFFFFF & ~f.mask}     # as the real kernels report: IDS not writable
    up = plan_between(make_doc("6.12", {"ID_AA64MMFR2_EL1": zero}),
                      make_doc("7.3", {"ID_AA64MMFR2_EL1": one}, masks=not_ids))
    assert entry(up, "ID_AA64MMFR2_EL1", "IDS").verdict is Verdict.OVERRIDE
    down = plan_between(make_doc("7.3", {"ID_AA64MMFR2_EL1": one}),
                        make_doc("6.12", {"ID_AA64MMFR2_EL1": zero}, masks=not_ids))
    assert entry(down, "ID_AA64MMFR2_EL1", "IDS").verdict is Verdict.REFUSE


def test_workaround_2_follows_the_vms_ssbs_on_a_mitigated_6_12_host():
    """6.12+ (hypercalls.c get_kernel_wa_level): on a Spectre-v4-mitigated host, a VM with SSBS reads and may write
    WORKAROUND_2 NOT_AVAIL (0) only; once its ID_AA64PFR1_EL1.SSBS is 0, NOT_REQUIRED (3). The capability document
    carries that view (ssbs_hidden_values); a VM without SSBS is planned against it, and the apply engine writes
    PFR1 before the firmware registers (index order), so the kernel takes the 3."""
    from invariantd.daemon.apply import apply_vm
    from invariantd.daemon.sim import SimHost
    from invariantd.protocol.program import compile_plan
    cat = catalog()
    wa2 = cat.id_of("KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2")
    with_ssbs, no_ssbs = _with_field("ID_AA64PFR1_EL1", "SSBS", 2), _with_field("ID_AA64PFR1_EL1", "SSBS", 0)
    dst = make_doc("6.12", {"ID_AA64PFR1_EL1": with_ssbs, "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2": 0})
    src = make_doc("6.12", {"ID_AA64PFR1_EL1": no_ssbs, "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2": 3})
    assert entry(plan_between(src, dst), "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2").verdict is Verdict.REFUSE  # no view
    dst["ssbs_hidden_values"] = {f"{wa2:#x}": "0x3"}
    vm = S.vm_from_host(host(src))
    plan = negotiate(vm, host(dst))
    assert entry(plan, "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2").verdict is Verdict.IDENTICAL and plan.migratable
    res = apply_vm(SimHost(doc=copy.deepcopy(dst)), {0: list(vm.values)}, compile_plan(plan, vm))
    try:
        assert res.vcpus[0].get_reg(wa2) == 3 and not res.mismatches
    finally:
        res.close()
    h = SimHost(doc=copy.deepcopy(dst))                      # the view itself: SSBS visible -> 0, hidden -> 3
    v = h.create_vm(0).create_vcpu(0)
    v.init(h.init)
    assert v.get_reg(wa2) == 0
    v.set_reg(cat.id_of("ID_AA64PFR1_EL1"), no_ssbs)
    assert v.get_reg(wa2) == 3
