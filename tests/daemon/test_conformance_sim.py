"""The conformance suite on the simulated host, every era: each generated case against the kernel's rules.

The expectations here are written independently of the simulator (a plain restatement of the rules
per safety type), so a wrong simulator rule fails a named case. The real-kernel comparison is in
tests/lab/.
"""
import pytest

from support.fixtures import synthetic_doc
from invariantd.daemon.conformance import generate, run_suite
from invariantd.daemon.sim.host import SimHost, era_for, list_profiles
from invariantd.protocol.catalog import catalog
from support.hostdocs import AA32_ID

SYNTHETIC = ["6.1", "6.1-patched", "6.12", "7.3"]


def _host(spec):
    if spec in SYNTHETIC:
        return SimHost(doc=synthetic_doc(spec.split("-")[0]), era=era_for(spec))
    return SimHost(spec)


PFR0 = "0x603000000013c020"          # ID_AA64PFR0_EL1 (3,0,0,4,0)


def _raz_wi(doc, reg) -> bool:
    """aa32_id_visibility: no AArch32 at EL0 (ID_AA64PFR0_EL1.EL0, bits 3:0, below 2) -> RAZ, writes ignored."""
    kernel = tuple(map(int, doc["kernel_version"].split(".")))[:2]
    return reg in AA32_ID and kernel >= (6, 1) and int(doc["values"][PFR0], 16) & 0xF < 2


def _expected_field(era, doc, meta):
    """OK or the errno a field write must get, from the safety rule alone."""
    cat = catalog()
    reg, fname = meta["register"], meta["field"]
    if _raz_wi(doc, reg):
        return "OK"
    f = next(x for x in cat.fields_of(reg) if x.name == fname)
    cls = cat.reg_class(cat.id_of(reg))
    kernel = tuple(map(int, doc["kernel_version"].split(".")))
    if cat.setter_checks(reg, kernel):            # the kernel's own setter (setters.tsv): its checks decide
        values = {int(k, 16): int(v, 16) for k, v in doc["values"].items()}
        new_value = f.put(values.get(cat.id_of(reg), 0), f.get(f.put(0, meta["to"])))
        return "EINVAL" if cat.setter_problems(reg, new_value, kernel, values) else "OK"
    refusal = "EINVARIANT" if (era.name == "patched" and cls == "cache") else "EINVAL"
    if era.id_write == "exact":
        lowering = f.get(f.put(0, meta["to"])) < f.get(f.put(0, meta["from"]))
        kernel = tuple(map(int, doc["kernel_version"].split(".")))
        return "OK" if fname in cat.legacy_writable(reg, kernel) and lowering else refusal
    masks = doc["writable_masks"] or {}
    idx = cat.sysreg(reg).mask_index
    mask = int(masks.get(str(idx), "0x0"), 16)
    new, cur = f.get(f.put(0, meta["to"])), f.get(f.put(0, meta["from"]))
    kernel = tuple(map(int, doc["kernel_version"].split(".")))
    if (reg, fname) in (("ID_AA64PFR0_EL1", "EL0"), ("ID_AA64PFR0_EL1", "EL1")) and meta["to"] < 1 \
            and kernel >= (6, 13):
        return "EINVAL"
    if (reg, fname) in (("ID_AA64DFR0_EL1", "DebugVer"), ("ID_DFR0_EL1", "CopDbg")) and meta["to"] < 6:
        return "EINVAL"
    if (reg, fname) == ("CTR_EL0", "L1Ip") and meta["to"] in (0, 1):
        return "EINVAL"
    if (reg, fname) == ("ID_DFR0_EL1", "PerfMon") and meta["to"] in (1, 2):
        return "EINVAL"
    if (reg, fname) in (("ID_AA64DFR0_EL1", "PMUVer"), ("ID_DFR0_EL1", "PerfMon")) and meta["to"] == 0xF:
        meta = dict(meta, to=0)          # KVM stores IMPLEMENTATION DEFINED as "no PMU" before checking
        if meta["to"] == meta["from"]:
            return "OK"
        new = 0
    if f.mask & mask != f.mask or not f.in_kernel(tuple(map(int, doc["kernel_version"].split(".")))):
        return "EINVAL"
    t = f.kvm_safety.value
    ok = {"LOWER": new < cur, "HIGHER": new > cur, "EXACT": new == f.get(f.put(0, f.safe)),
          "HIGHER_OR_ZERO": new == 0 or new > cur}[t]
    return "OK" if ok else "EINVAL"


SPECS = SYNTHETIC + list_profiles()


@pytest.mark.parametrize("spec", SPECS)
def test_every_generated_case_follows_the_rules(spec):
    host = _host(spec)
    era = host.era
    res = run_suite(host)
    cases = res["cases"]
    doc = host.doc
    checked = 0
    for name, meta in res["meta"].items():
        steps = cases[name]
        want = _expected_field(era, doc, meta)
        assert steps[0][1] == want, f"{spec} {name}: got {steps[0][1]}, rule says {want}"
        assert steps[1][1] == "OK"
        written = int(steps[0][2], 16)
        rewritten = {("ID_AA64DFR0_EL1", "PMUVer"): 0xF00, ("ID_DFR0_EL1", "PerfMon"): 0xF000000}
        if want == "OK" and meta["to"] == 0xF and (meta["register"], meta["field"]) in rewritten:
            mask = rewritten[(meta["register"], meta["field"])]
            assert int(steps[1][2], 16) == written & ~mask, f"{spec} {name}: IMP_DEF PMU not stored as none"
        elif _raz_wi(doc, meta["register"]):
            assert int(steps[1][2], 16) == 0, f"{spec} {name}: RAZ/WI register did not read 0"
        elif want == "OK":
            assert int(steps[1][2], 16) == written, f"{spec} {name}: accepted value not stored"
        else:
            assert int(steps[1][2], 16) != written, f"{spec} {name}: refused value changed the register"
        assert steps[2][1] == "OK", f"{spec} {name}: restoring the host value failed"
        checked += 1
    assert checked > 100
    assert any(_raz_wi(doc, m["register"]) for m in res["meta"].values()) == (spec.startswith("a64fx"))
    inv = "EINVARIANT" if era.name == "patched" else "EINVAL"
    assert cases["impid/midr-next-revision"][0][1] == inv
    assert cases["impid/midr-next-revision"][1] == ["get", "OK", doc["values"][f"{catalog().id_of('MIDR_EL1'):#x}"]]
    assert cases["cap239/after-vcpu"][0][1] == "EINVAL"
    assert cases["before-init/get-midr"][0][1] == "ENOEXEC"
    assert cases["unknown/unlisted-sysreg"][0][1] == "ENOENT"
    assert cases["unknown/bad-id-bits"][0][1] == "EINVAL"
    assert cases["reglist/count"] == [["reglist", "OK", len(doc["reg_list"])]]
    n = len(doc["reg_list"])
    assert cases["reglist/e2big-sizing"] == [["reglist-raw", "E2BIG", n], ["reglist-raw", "E2BIG", n],
                                             ["reglist-raw", "OK", n]]
    assert cases["after-run/isar0-same"][-1][1] == "OK"
    pfr0 = int(doc["values"][f"{catalog().id_of('ID_AA64PFR0_EL1'):#x}"], 16)
    after = int(cases["after-run/gic-fields"][1][2], 16)
    gic = 0xF << 24
    assert after == (pfr0 & ~gic if era.id_write == "per_field" else pfr0), "first run without a vGIC hides GIC"
    frozen = cases["after-run/isar0-lowered"][1][1]
    assert frozen == ("EBUSY" if era.id_write == "per_field" else "EINVAL")
    if era.imp_id == "cap239":
        assert cases["impid-cap239/midr-next-revision"][0][1] == "OK"
        assert cases["impid-cap239/midr-other-part"][0][1] == "OK"       # no plausibility check in KVM
        assert cases["impid-cap239/midr-high-bits"][0][1] == "EINVAL"    # bits 63:32 outside the mask
        assert cases["impid-cap239-after-run/midr-next-revision"][1][1] == "EBUSY"
    else:
        assert cases["impid-cap239/midr-next-revision"][0][0] == "skip"
    _check_sve(doc, cases)
    assert cases["masks/ioctl"][0][1] == ("EINVAL" if doc["writable_masks"] is None else "OK")
    assert cases["masks/bad-range"][0][1] == "EINVAL"


def test_generation_is_deterministic():
    doc = synthetic_doc("6.12")
    assert [c.name for c in generate(doc)] == [c.name for c in generate(doc)]


def test_sve_registers_need_finalize():
    from invariantd.daemon.kvm.backend import VcpuInit
    from invariantd.daemon.kvm.errors import KvmError
    from invariantd.protocol import kvmabi, regid
    doc = synthetic_doc("6.12")
    doc["caps"]["KVM_CAP_ARM_SVE"] = 1
    vm = SimHost(doc=doc, era=era_for("6.12")).create_vm()
    v = vm.create_vcpu(0)
    v.init(VcpuInit(5, (kvmabi.VCPU_FEATURES["PSCI_0_2"], kvmabi.VCPU_FEATURES["SVE"])))
    with pytest.raises(KvmError) as e:
        v.get_reg(regid.sve_z(0))
    assert e.value.errno_name == "EPERM" and "Z0[0]" in str(e.value)
    with pytest.raises(KvmError):
        v.reg_list()
    v.finalize(kvmabi.KVM_ARM_VCPU_SVE)
    assert v.get_reg(regid.sve_z(0)) == 0
    assert regid.sve_z(0) in v.reg_list()


def test_unknown_profile_lists_known_ones():
    from invariantd.daemon.sim import ProfileError
    with pytest.raises(ProfileError, match="Known"):
        SimHost("no-such-cpu@6.12")
    with pytest.raises(ProfileError, match="PROFILE@KERNEL"):
        SimHost("cortex-a72")


def _check_sve(doc, cases):
    """set_sve_vls restated: lengths = bits vq-1; the VM's maximum within the host's and exactly the host's lengths up
    to it; nothing after finalize (EPERM); a refused write leaves the host's set."""
    sve = {k: v for k, v in cases.items() if k.startswith("sve/")}
    if not doc["caps"].get("KVM_CAP_ARM_SVE") or "sve_vls" not in doc:
        assert not sve
        return
    host = int(doc["sve_vls"], 16)
    want = {"sve/vls-host": ("OK", host), "sve/vls-only-128": ("OK", 1), "sve/vls-zero": ("EINVAL", host)}
    top = host.bit_length()
    if host & (host - 1):
        want["sve/vls-drop-max"] = ("OK", host & ~(1 << (top - 1)))
        want["sve/vls-hole"] = ("EINVAL", host)
    want["sve/vls-above"] = ("EINVAL", host)
    view_cases = {"sve/pfr0-view-same"} if PFR0 in (doc.get("sve_values") or {}) else set()
    assert set(sve) == set(want) | {"sve/vls-after-finalize", "sve/id-view"} | view_cases, sorted(sve)
    for name in view_cases:
        assert sve[name][0][1] == "OK", (name, sve[name])
    # an SVE vCPU reads ID_AA64PFR0_EL1.SVE (bits 35:32) set, and the document's SVE view where it has one
    view = {int(k, 16): int(v, 16) for k, v in (doc.get("sve_values") or {}).items()}
    pfr0_id, zfr0_id = int(PFR0, 16), 0x603000000013c024
    got_pfr0, got_zfr0 = (int(x[2], 16) for x in sve["sve/id-view"])
    assert got_pfr0 == view.get(pfr0_id, int(doc["values"][PFR0], 16)) and (got_pfr0 >> 32) & 0xF >= 1, doc["profile"]
    assert got_zfr0 == view.get(zfr0_id, int(doc["values"].get(f"{zfr0_id:#x}", "0x0"), 16))
    for name, (errno, after) in want.items():
        assert sve[name][0][1] == errno and int(sve[name][1][2], 16) == after, (name, sve[name])
    assert [st for _, st, _ in sve["sve/vls-after-finalize"]] == ["OK", "EPERM", "OK"]


@pytest.mark.parametrize("spec", ["cortex-a76@6.12", "cortex-a72-r0p4@7.3"])
def test_batch_reads_equal_register_reads(spec):
    """SimVcpu.get_regs's batch path (the VM-wide values and the SSBS firmware view laid over the vCPU's own) reads
    what get_reg reads register by register: after a VM-wide ID write on another vCPU, a per-vCPU write, and
    ID_AA64PFR1_EL1.SSBS lowered (KVM's firmware levels for a VM without SSBS)."""
    host = SimHost(spec)
    vm = host.create_vm()
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    for v in vcpus:
        v.init(host.init)
    cat = catalog()
    ids = vcpus[1].reg_list()

    def same():
        got, errs = vcpus[1].get_regs(ids)
        assert not any(errs) and got.values() == [vcpus[1].get_reg(r) for r in ids]

    same()
    isar0, pfr1 = cat.id_of("ID_AA64ISAR0_EL1"), cat.id_of("ID_AA64PFR1_EL1")
    vcpus[0].set_reg(isar0, vcpus[0].get_reg(isar0) & ~0xF0)                # VM-wide: vCPU 1 sees it
    vcpus[1].set_reg(cat.id_of("SCTLR_EL1"), vcpus[1].get_reg(cat.id_of("SCTLR_EL1")) | 0x8)
    same()
    assert dict(vcpus[1].get_regs(ids)[0])[isar0] == vcpus[0].get_reg(isar0)
    ssbs = next(f for f in cat.fields_of("ID_AA64PFR1_EL1") if f.name == "SSBS")
    vcpus[0].set_reg(pfr1, ssbs.put(vcpus[0].get_reg(pfr1), 0))
    same()
