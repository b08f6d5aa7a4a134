import pytest

from invariantd.protocol import regid
from invariantd.protocol.catalog import Catalog, CatalogError, Field, Safety, catalog, mask_index
from support.hostdocs import AA32_ID


@pytest.mark.parametrize("name,rid,idx", [
    ("MIDR_EL1", 0x603000000013C000, 0), ("MPIDR_EL1", 0x603000000013C005, 5),
    ("REVIDR_EL1", 0x603000000013C006, 6), ("AIDR_EL1", 0x603000000013C807, 71),
    ("CTR_EL0", 0x603000000013D801, 129), ("CLIDR_EL1", 0x603000000013C801, 65),
    ("ID_AA64PFR0_EL1", 0x603000000013C020, 32), ("ID_AA64ISAR0_EL1", 0x603000000013C030, 48),
    ("ID_AA64MMFR2_EL1", 0x603000000013C03A, 58),
])
def test_sysreg_ids_and_mask_index_match_the_kernel_abi(name, rid, idx):
    reg = catalog().sysreg(name)
    assert reg.reg_id == rid
    assert reg.mask_index == idx
    assert catalog().name(rid) == name


def test_other_groups_encode_and_name():
    cat = catalog()
    assert regid.core(0x42) == 0x6030000000100042 and cat.name(0x6030000000100042) == "PSTATE"
    assert cat.name(regid.core(0x54, regid.SIZE_U128)) == "V0"
    assert regid.fw(0) == 0x6030000000140000 and cat.name(regid.fw(0)) == "KVM_REG_ARM_PSCI_VERSION"
    assert regid.fw_bmap(3) == 0x6030000000160003
    assert regid.demux_ccsidr(2) == 0x6020000000110002
    assert regid.sve_z(1, 0) == 0x6080000000150020
    assert regid.SVE_VLS == 0x606000000015FFFF
    assert regid.x86_msr(0x10) == 0x2030000200000010
    assert regid.size_bytes(regid.sve_z(0)) == 256
    assert cat.name(regid.sysreg(3, 0, 0, 4, 3)) == "S3_0_C0_C4_3"
    assert cat.reg_class(regid.sysreg(3, 0, 0, 4, 3)) == "id"


def test_decode_rejects_bad_ids_naming_them():
    with pytest.raises(regid.RegIdError, match="0x6030010000000000"):
        regid.decode(0x6030010000000000)
    with pytest.raises(regid.RegIdError, match="arch byte"):
        regid.decode(0x1030000000000000)
    with pytest.raises(regid.RegIdError):
        regid.sysreg(4, 0, 0, 0, 0)


def test_signed_fields_and_safe_values():
    cat = catalog()
    f = next(x for x in cat.fields_of("ID_AA64PFR0_EL1") if x.name == "FP")
    assert f.signed and f.get(0xF << 16) == -1
    aes = next(x for x in cat.fields_of("ID_AA64ISAR0_EL1") if x.name == "AES")
    assert aes.safe_value(1, 2) == 1 and aes.safe_value(3, 2) == 2
    sei = next(x for x in cat.fields_of("ID_AA64MMFR1_EL1") if x.name == "SpecSEI")
    assert sei.safety is Safety.HIGHER and sei.safe_value(0, 1) == 1
    cwg = next(x for x in cat.fields_of("CTR_EL0") if x.name == "CWG")
    assert cwg.safe_value(0, 4) == 0 and cwg.safe_value(5, 4) == 5
    pmu = next(x for x in cat.fields_of("ID_AA64DFR0_EL1") if x.name == "PMUVer")
    assert pmu.safety is Safety.EXACT and pmu.kvm_safety is Safety.LOWER and pmu.kvm_why


def test_check_write_is_the_kernels_rule():
    cat = catalog()
    m612 = 0xFFFFFFFFFFFFFFF0
    assert cat.check_write("ID_AA64ISAR0_EL1", 0x11110, 0x11120, m612) == []          # AES 2->1 lowered
    probs = cat.check_write("ID_AA64ISAR0_EL1", 0x11130, 0x11120, m612)               # AES raised
    assert [p[0].name for p in probs] == ["AES"]
    assert cat.check_write("ID_AA64ISAR0_EL1", 0x11110, 0x11120, 0) != []             # not writable
    assert cat.check_write("ID_AA64ISAR0_EL1", 0x11120 | 1, 0x11120, m612) != []      # RES0 bit


def _f(name, shift, width):
    return Field("X", name, shift, width, False, Safety.LOWER, 0, (0,), "", Safety.LOWER, "")


def test_validation_catches_overlap_and_order():
    with pytest.raises(CatalogError, match="overlaps"):
        Catalog._validate("X", [_f("A", 4, 8), _f("B", 0, 8)])
    with pytest.raises(CatalogError, match="sorted"):
        Catalog._validate("X", [_f("A", 0, 4), _f("B", 4, 4)])
    with pytest.raises(CatalogError, match="outside"):
        Catalog._validate("X", [_f("A", 62, 4)])


def test_shipped_tables_cover_the_id_registers():
    cat = catalog()
    for reg in ("ID_AA64PFR0_EL1", "ID_AA64ISAR0_EL1", "ID_AA64ISAR1_EL1", "ID_AA64MMFR0_EL1",
                "ID_AA64MMFR1_EL1", "ID_AA64MMFR2_EL1", "ID_AA64DFR0_EL1", "CTR_EL0", "MIDR_EL1"):
        assert cat.fields_of(reg), reg
    assert mask_index((3, 0, 0, 7, 4)) == 60
    assert mask_index((3, 2, 0, 0, 0)) is None


def test_aa32_visibility_rows_match_the_kernel_list():
    cat = catalog()
    assert {r.name for r in cat.sysregs.values() if r.visibility == "aa32"} == AA32_ID
    pfr0 = cat.id_of("ID_AA64PFR0_EL1")
    assert cat.aarch32_el0({pfr0: 0x2}) and not cat.aarch32_el0({pfr0: 0x1}) and not cat.aarch32_el0({})


def test_simulated_host_without_aarch32_el0_ignores_aa32_writes():
    """a64fx (no AArch32): KVM's aa32_id_visibility makes ID_ISAR0_EL1 & co. read 0 and ignore userspace writes,
    even after the first run; an AArch32-capable host (cortex-a76) checks them as usual."""
    from invariantd.daemon.sim.host import SimHost
    isar0 = catalog().id_of("ID_ISAR0_EL1")
    for spec, raz in (("a64fx@7.3", True), ("cortex-a76@7.3", False)):
        host = SimHost(spec)
        vm = host.create_vm()
        v = vm.create_vcpu(0)
        from invariantd.daemon.kvm.backend import VcpuInit
        v.init(VcpuInit(host.init.target, host.init.features))
        before = v.get_reg(isar0)
        assert (before == 0) == raz
        if raz:
            v.set_reg(isar0, 0x02101110)                   # accepted, ignored
            assert v.get_reg(isar0) == 0
            v.run_once()
            v.set_reg(isar0, 0x1)                          # after the first run too
            assert v.get_reg(isar0) == 0
        else:
            import pytest
            from invariantd.daemon.kvm.errors import KvmError
            with pytest.raises(KvmError):
                v.set_reg(isar0, before + 0x10)              # raises a field: refused


def test_implementation_id_registers_come_from_data_not_a_count_of_three():
    """imp_id.tsv lists them (SMIDR_EL1 would be a fourth row); the policy and the simulator follow the table."""
    from invariantd.protocol.policy import default_policy
    cat = catalog()
    imp = {n for n, r in cat.sysregs.items() if r.cls == "imp_id"}
    assert set(cat.imp_masks) == imp == set(default_policy().imp_id)
    assert cat.imp_masks["MIDR_EL1"] == 0xFFFFFFFF


# The setters read in the kernel sources (6.1, 6.12, 7.x), for KVM_SET_ONE_REG of ID / imp-ID / cache / FW registers
# and SVE_VLS. A setter added here without a row in kernel_setters.tsv fails, and so does a row naming no table.
SETTERS_READ = ("set_id_reg", "set_id_aa64pfr0_el1", "set_id_aa64pfr1_el1", "set_id_aa64pfr2_el1", "set_id_dfr0_el1",
                "set_id_aa64dfr0_el1", "set_id_aa64mmfr0_el1", "set_id_aa64mmfr2_el1", "set_ctr_el0", "set_clidr",
                "set_ccsidr", "set_invariant_sys_reg", "set_imp_id_reg", "set_wi_reg", "kvm_arm_set_fw_reg",
                "kvm_arm_set_fw_reg_bmap", "set_sve_vls", "kvm_vcpu_init_check_features")


def test_every_kernel_setter_read_has_a_row_naming_where_its_rule_lives():
    import re
    from importlib import resources
    data = resources.files("invariantd.protocol").joinpath("data")
    rows = [ln.split("\t") for ln in data.joinpath("kernel_setters.tsv").read_text().splitlines()
            if ln and not ln.startswith("#")][1:]
    assert sorted(r[0] for r in rows) == sorted(SETTERS_READ)
    for setter, _file, kernels, _regs, rule in rows:
        assert kernels and rule, setter
        for table in re.findall(r"([a-z_]+\.tsv)", rule):
            where = data.joinpath(table) if table != "eras.tsv" else None
            assert where is None or where.is_file(), (setter, table)
        assert re.search(r"\.tsv|catalog\.|negotiate\.|host\.py", rule), (setter, "names no rule")


def test_one_kernel_version_parser():
    """protocol/kernelver.py is the only parser: releases, data columns, the simulator's '-patched' kernels."""
    from invariantd.protocol import kernelver
    assert kernelver.parse("6.12.118+deb13-arm64") == (6, 12) and kernelver.parse("7.3-patched") == (7, 3)
    assert kernelver.parse("3.11") == (3, 11) and kernelver.parse("") == () and kernelver.parse("x") == ()
    assert kernelver.data("") == (0,) and kernelver.major_minor("6.1.0-57-arm64") == "6.1"
    with pytest.raises(ValueError):
        kernelver.data("six")
