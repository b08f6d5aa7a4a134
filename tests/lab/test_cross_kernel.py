"""Migration between real arm64 kernels and CPU revisions, without the network: a 2-vCPU VM captured (after
one KVM_RUN) on one real kernel+CPU is planned against and applied on another real kernel+CPU, with the
errno-aware retry and a full read-back (daemon/vmstate.py). The simulated host can only agree with this.
"""
from __future__ import annotations

import os

import pytest

from invariantd.daemon import lab
from invariantd.daemon.lab.matrix import cross_restore, hide_aarch32

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def provisioned():
    try:
        return lab.provision(["6.1", "6.12", "7.x"])
    except lab.LabUnavailable as e:
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"arm64 KVM lab unavailable under CI: {e}")
        pytest.skip(f"arm64 KVM lab unavailable: {e}")


def changed(report):
    return {(e["register"], e["field"]): e["verdict"] for e in report["plan"]["entries"] if e["verdict"] != "identical"}


def actions(report):
    return sorted({(e["register"], e["errno"], e["action"]) for e in report.get("events", [])})


def test_next_revision_older_to_newer_kernel_pins_midr(provisioned):
    code, rep = cross_restore(("6.12", "cortex-a72-r0p3"), ("7.x", "cortex-a72-r0p4"))
    assert code == 0, rep.get("error") or rep.get("mismatches")
    ch = changed(rep)
    assert ch[("MIDR_EL1", "")] == "pin"
    assert {ch[(r, "")] for r in ("TCR2_EL1", "PIR_EL1", "PIRE0_EL1")} == {"drop"}
    assert ("PIR_EL1", "ENOENT", "drop-reset") in actions(rep)
    assert rep["mismatches"] == [] and rep["deviations"] == []


def test_next_revision_on_6_1_overrides_midr_with_one_write(provisioned):
    """The plan's MIDR (the destination's revision) is written directly: the real kernel refuses nothing."""
    code, rep = cross_restore(("6.1", "cortex-a72-r0p3"), ("6.1", "cortex-a72-r0p4"))
    assert code == 0, rep.get("error") or rep.get("mismatches")
    assert changed(rep)[("MIDR_EL1", "")] == "override"
    assert ("MIDR_EL1", "-", "override-plan") in actions(rep), actions(rep)
    assert not [a for a in actions(rep) if a[1] == "EINVAL"], actions(rep)


def test_next_revision_on_6_12_overrides_midr(provisioned):
    code, rep = cross_restore(("6.12", "cortex-a72-r0p3"), ("6.12", "cortex-a72-r1p0"))
    assert code == 0, rep.get("error") or rep.get("mismatches")
    assert changed(rep)[("MIDR_EL1", "")] == "override"


def test_other_part_is_refused_before_anything_is_applied(provisioned):
    code, rep = cross_restore(("7.x", "cortex-a72-r0p3"), ("7.x", "neoverse-n1"))
    assert code == 3
    assert "registers" not in rep and "events" not in rep
    assert not rep["plan"]["migratable"]


@pytest.mark.parametrize("kernel", ["6.12", "7.x"])
def test_vm_without_aarch32_restores_on_an_aarch32_host(provisioned, kernel):
    """A VM whose guest sees no AArch32 (ID_AA64PFR0_EL1.EL0 = 1, AArch32 ID registers 0, as a VM from an a64fx
    or Neoverse-N2 carries) restored on a real Cortex-A76: the kernel takes every zero but ID_DFR0_EL1's, whose
    setter refuses CopDbg below Armv8 (EINVAL). The plan knew (prechecks.tsv): it overrides that field with the
    destination's, and the apply writes that value directly: the kernel refuses nothing."""
    code, rep = cross_restore((kernel, "cortex-a76"), (kernel, "cortex-a76"), edit=hide_aarch32)
    assert code == 0, rep.get("error") or rep.get("mismatches")
    ch = changed(rep)
    assert ch[("ID_DFR0_EL1", "")] == "override" and ch[("ID_DFR0_EL1", "CopDbg")] == "override"
    assert ch[("ID_ISAR0_EL1", "")] == "set" and ch[("ID_AA64PFR0_EL1", "EL0")] == "set"
    assert ("ID_DFR0_EL1", "-", "override-plan") in actions(rep)
    assert [a for a in actions(rep) if a[0] != "ID_DFR0_EL1" and a[2] != "readback-adjusted"] == []
    assert rep["mismatches"] == [] and rep["deviations"] == []


@pytest.mark.parametrize("src_kernel", ["6.12", "7.x"])
def test_other_part_same_features_migrates_with_midr_pinned(provisioned, src_kernel):
    """"A different MIDR is not a different MMFR0": a Cortex-A76 VM onto a real Neoverse-N1 7.3 (another part
    number, the same feature registers but SSBS / PARANGE / the GIC fields, which the VM keeps lower) commits with
    MIDR pinned by cap 239; from 6.12 the registers 7.3 does not list are dropped at their reset values."""
    code, rep = cross_restore((src_kernel, "cortex-a76"), ("7.x", "neoverse-n1"))
    assert code == 0, rep.get("error") or rep.get("mismatches")
    ch = changed(rep)
    assert ch[("MIDR_EL1", "")] == "pin" and ch[("MIDR_EL1", "PartNum")] == "pin"
    assert ch[("ID_AA64PFR1_EL1", "SSBS")] == "set" and ch[("ID_AA64MMFR0_EL1", "PARANGE")] == "set"
    assert not [a for a in actions(rep) if a[2] not in ("readback-adjusted", "drop-reset")], actions(rep)
    assert rep["mismatches"] == [] and rep["deviations"] == []


@pytest.mark.parametrize("model", ["a64fx", "max"])
def test_sve_vm_moves_to_a_newer_real_kernel(provisioned, model):
    """An SVE VM (Z/P/FFR holding data, the host's vector lengths: a64fx 128/256/512, max 128..2048) from 6.12 to
    7.3: the lengths are identical, ID_AA64PFR0_EL1 is planned against the destination's *SVE* view (KVM shows
    PFR0.SVE only to an SVE vCPU: against the base view the plan refused), every Z/P/FFR read back equal."""
    code, rep = cross_restore(("6.12", model), ("7.x", model), sve=True)
    assert code == 0, rep.get("error") or rep.get("mismatches")
    ch = changed(rep)
    assert ("KVM_REG_ARM64_SVE_VLS", "") not in ch                       # identical
    assert ch.get(("ID_AA64PFR0_EL1", "SVE")) is None and ch.get(("ID_AA64PFR0_EL1", ""), "set") == "set"
    assert rep["registers"] > 2 * (32 + 16 + 1)                           # both vCPUs' Z, P and FFR among them
    assert rep["mismatches"] == [] and rep["deviations"] == []


def test_sve_vector_lengths_kvm_cannot_offer_refuse_the_plan(provisioned):
    """a64fx (128/256/512) onto QEMU max (128..2048): KVM can cap the length at 512 but cannot hide 384, so the plan
    refuses the VM's lengths (the conformance suite shows the real set_sve_vls refusing such a hole)."""
    code, rep = cross_restore(("7.x", "a64fx"), ("7.x", "max"), sve=True)
    assert code == 3
    vls = next(e for e in rep["plan"]["entries"] if e["register"] == "KVM_REG_ARM64_SVE_VLS")
    assert vls["verdict"] == "refuse" and "384" in vls["reason"]
