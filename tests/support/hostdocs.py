"""Capability documents and plans for negotiation tests: a Cortex-A72 as real 6.12 kernels report it (BASE),
make_doc() to vary it, host() / plan_between() / entry() to plan, sim_apply() to prove a plan on the simulator."""
from __future__ import annotations

import copy

from invariantd.protocol import kvmabi, schemas as S
from invariantd.protocol.catalog import catalog
from invariantd.protocol.negotiate import negotiate
from invariantd.protocol.policy import default_policy


CAT = catalog()
A72_R0P3, A72_R0P4, A72_R1P0 = 0x410FD083, 0x410FD084, 0x411FD080
N1_R4P1, A53_R0P4 = 0x414FD0C1, 0x410FD034
BASE = {  # a Cortex-A72 as real 6.12 kernels report it (arm64-observed-values.md)
    "MIDR_EL1": A72_R0P3, "REVIDR_EL1": 0, "AIDR_EL1": 0, "CTR_EL0": 0x8444C004, "CLIDR_EL1": 0x09200003,
    "ID_AA64PFR0_EL1": 0x1000000001000222, "ID_AA64PFR1_EL1": 0, "ID_AA64DFR0_EL1": 0x10305006,
    "ID_AA64ISAR0_EL1": 0x11120, "ID_AA64ISAR1_EL1": 0, "ID_AA64MMFR0_EL1": 0x1124, "ID_AA64MMFR1_EL1": 0,
    "ID_AA64MMFR2_EL1": 0, "ID_DFR0_EL1": 0x03010066,
    "KVM_REG_ARM_PSCI_VERSION": 0x10001, "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1": 1,
    "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2": 0, "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3": 1,
    "KVM_REG_ARM_STD_BMAP": 1, "KVM_REG_ARM_STD_HYP_BMAP": 1, "KVM_REG_ARM_VENDOR_HYP_BMAP": 3,
}


FULL = 0xFFFFFFFFFFFFFFFF


def mask_of(name: str) -> int:
    return CAT.sysreg(name).mask_index


def make_doc(kernel: str = "7.3", values: dict | None = None, masks: dict | None | str = "full",
             cap239: int | None = None, cpu_midrs: list[int] | None = None, listed_extra: tuple = (),
             unlisted: tuple = ()) -> dict:
    """A capability document from a few register values (names) and masks ({register name: mask});
    masks="full": every ID/cache register fully writable (a kernel whose table allows everything the
    catalog's fields allow); None: no writable masks (< 6.7)."""
    vals = dict(BASE)
    if kernel >= "6.15" or kernel.startswith("7"):
        vals["KVM_REG_ARM_VENDOR_HYP_BMAP_2"] = 0
    vals.update(values or {})
    for n in listed_extra:
        vals.setdefault(n, 0)
    for n in unlisted:
        vals.pop(n, None)
    ids = {f"{CAT.id_of(k):#x}": f"{v:#x}" for k, v in vals.items()}
    if masks == "full":
        words = {str(mask_of(n)): f"{FULL:#x}" for n, r in CAT.sysregs.items()
                 if (r.cls in ("id", "cache") or (r.cls == "imp_id" and kernel.startswith("7")))
                 and r.mask_index is not None}
    elif masks is None:
        words = None
    else:
        words = {str(mask_of(n)): f"{m:#x}" for n, m in masks.items()}
    if cap239 is None:
        cap239 = 1 if kernel.startswith("7") else 0
    midr = vals["MIDR_EL1"]
    return {"format": S.HOST_FORMAT, "source": "test", "profile": f"test@{kernel}", "arch": "aarch64",
            "kernel_release": f"{kernel}.0-test", "kernel_version": kernel, "api_version": 12,
            "caps": {"KVM_CAP_ONE_REG": 1, "KVM_CAP_ARM_WRITABLE_IMP_ID_REGS": cap239,
                     "KVM_CAP_ARM_SUPPORTED_REG_MASK_RANGES": 0 if words is None else 1},
            "cpu_midrs": [f"{m:#x}" for m in (cpu_midrs or [midr, midr])],
            "vcpu_init": {"target": 5, "base_features": ["PSCI_0_2"]},
            "reg_list": list(ids), "values": ids, "writable_masks": words, "errors": []}


def host(doc: dict) -> S.HostCapabilities:
    return S.host_from_doc(doc, frozenset(default_policy().drift))


def plan_between(src_doc: dict, dst_doc: dict, policy=None, vm=None):
    vm = vm or S.vm_from_host(host(src_doc))
    return negotiate(vm, host(dst_doc), policy)


def entry(plan, register: str, field: str = ""):
    hits = [e for e in plan.entries if e.register == register and e.field == field]
    assert len(hits) == 1, (register, field, [(e.register, e.field) for e in plan.entries])
    return hits[0]


def sim_apply(plan, dst_doc: dict) -> None:
    """Apply a plan on the simulated destination exactly as the apply engine will: cap 239 first when
    planned, vCPU init with the preferred target + PSCI 0.2, then every planned ID/FW value."""
    from invariantd.daemon.kvm.backend import VcpuInit
    from invariantd.daemon.sim import SimHost
    h = SimHost(doc=copy.deepcopy(dst_doc))
    vm = h.create_vm(0)
    if plan.enable_cap239:
        vm.enable_cap(kvmabi.KVM_CAP_ARM_WRITABLE_IMP_ID_REGS)
    vcpu = vm.create_vcpu(0)
    vcpu.init(VcpuInit(vm.preferred_target().target, (kvmabi.VCPU_FEATURES["PSCI_0_2"],)))
    for rid, value in plan.planned_writes():
        vcpu.set_reg(rid, value)        # must not raise


def field_put(reg, fname, raw, base=None):
    f = next(x for x in CAT.fields_of(reg) if x.name == fname)
    return f.put(BASE.get(reg, 0) if base is None else base, raw)


# KVM's AA32_ID_SANITISED / AA32_ID_WRITABLE registers (arch/arm64/kvm/sys_regs.c; ID_AFR0/ID_DFR1 are hidden)
AA32_ID = {"ID_PFR0_EL1", "ID_PFR1_EL1", "ID_DFR0_EL1", "ID_MMFR0_EL1", "ID_MMFR1_EL1", "ID_MMFR2_EL1",
           "ID_MMFR3_EL1", "ID_ISAR0_EL1", "ID_ISAR1_EL1", "ID_ISAR2_EL1", "ID_ISAR3_EL1", "ID_ISAR4_EL1",
           "ID_ISAR5_EL1", "ID_MMFR4_EL1", "ID_ISAR6_EL1", "MVFR0_EL1", "MVFR1_EL1", "MVFR2_EL1", "ID_PFR2_EL1",
           "ID_MMFR5_EL1"}
