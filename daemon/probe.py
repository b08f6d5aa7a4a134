"""Host capability discovery: the same document from the real /dev/kvm and from the simulated host.

arm64: scratch VM + vCPU (preferred target + PSCI 0.2), KVM_GET_REG_LIST, GET of every listed register,
writable masks, caps, per-CPU MIDRs. x86: API version and the caps ONE_REG needs. The document is
JSON-ready and is also the simulator's host-profile format (`invariantctl lab profile` writes it).
"""
from __future__ import annotations

import errno as E

from ..protocol import kvmabi as abi
from ..protocol.catalog import catalog, mask_index
from ..protocol import kernelver, regid
from ..protocol import schemas as S
from .kvm.backend import Backend, VcpuInit
from .kvm.errors import KvmError

FORMAT = S.HOST_FORMAT
BASE_FEATURES = ("PSCI_0_2",)


def probe(backend: Backend, profile: str | None = None) -> dict:
    doc: dict = {
        "format": FORMAT,
        "source": backend.kind,
        "profile": profile,
        "arch": backend.arch,
        "kernel_release": backend.kernel_release(),
        "kernel_version": kernelver.major_minor(backend.kernel_release()),
        "api_version": backend.api_version(),
        "caps": {},
        "errors": [],
    }
    for name, cap in abi.CAPS.items():
        if backend.arch != "aarch64" and "_ARM_" in name:
            continue
        doc["caps"][name] = backend.check_extension(cap)
    if backend.arch != "aarch64":
        doc["one_reg"] = bool(doc["caps"].get("KVM_CAP_ONE_REG"))
        return doc
    era = getattr(backend, "era", None)
    doc["sim_era"] = era.name if era is not None else None
    doc["one_reg"] = bool(doc["caps"].get("KVM_CAP_ONE_REG"))
    doc["cpu_midrs"] = [f"{m:#x}" for m in backend.cpu_midrs()]
    vm = backend.create_vm(0)
    try:
        pref = vm.preferred_target()
        feats = tuple(abi.VCPU_FEATURES[f] for f in BASE_FEATURES)
        vcpu = vm.create_vcpu(0)
        vcpu.init(VcpuInit(pref.target, feats))
        doc["vcpu_init"] = {"target": pref.target, "base_features": list(BASE_FEATURES)}
        ids = vcpu.reg_list()
        doc["reg_list"] = [f"{r:#x}" for r in ids]
        regs, errs = vcpu.get_regs(ids)
        vals = regs.values()
        doc["values"] = {f"{r:#x}": f"{v:#x}" for r, v, e in zip(ids, vals, errs) if not e}
        for r, e in zip(ids, errs):
            if e:
                doc["errors"].append({"op": "KVM_GET_ONE_REG", "id": f"{r:#x}", "errno": abi.errno_name(e)})
        try:
            masks = vm.writable_masks()
            doc["writable_masks"] = {str(i): f"{m:#x}" for i, m in enumerate(masks) if m}
        except KvmError as e:
            if e.errno_value != E.EINVAL:
                raise
            doc["writable_masks"] = None
        doc["registers"] = describe(ids, dict(zip(ids, vals)), doc["writable_masks"])
    finally:
        vm.close()
    if doc["caps"].get("KVM_CAP_ARM_SVE"):
        vls, view = sve_view(backend, doc["values"])
        doc["sve_vls"] = f"{vls:#x}"
        doc["sve_values"] = view
    doc["pmu_values"] = pmu_view(backend, doc["values"]) if doc["caps"].get("KVM_CAP_ARM_PMU_V3") else {}
    doc["ssbs_hidden_values"] = ssbs_hidden_view(backend, doc)
    return doc


def ssbs_hidden_view(backend: Backend, doc: dict) -> dict[str, str]:
    """The firmware registers a vCPU reads differently once its VM's ID_AA64PFR1_EL1.SSBS is written 0 (where the
    kernel lets it be: the writable mask covers it). From 6.12 KVM derives SMCCC_ARCH_WORKAROUND_2's level from the
    VM's own SSBS on a Spectre-v4-mitigated host (hypercalls.c get_kernel_wa_level): NOT_AVAIL with SSBS, NOT_REQUIRED
    without. {} where SSBS is 0 already, not writable, or nothing changes."""
    cat = catalog()
    pfr1 = cat.id_of("ID_AA64PFR1_EL1")
    ssbs = next(f for f in cat.fields_of("ID_AA64PFR1_EL1") if f.name == "SSBS")
    cur = int(doc["values"].get(f"{pfr1:#x}", "0x0"), 16)
    masks = doc.get("writable_masks") or {}
    mask = int(masks.get(str(cat.sysreg("ID_AA64PFR1_EL1").mask_index), "0x0"), 16)
    if not ssbs.get(cur) or (mask & ssbs.mask) != ssbs.mask:
        return {}
    vm = backend.create_vm(0)
    try:
        vcpu = vm.create_vcpu(0)
        vcpu.init(VcpuInit(vm.preferred_target().target, tuple(abi.VCPU_FEATURES[f] for f in BASE_FEATURES)))
        vcpu.set_reg(pfr1, ssbs.put(cur, 0))
        ids = [r for r in vcpu.reg_list() if regid.decode(r).group == "fw"]
        regs, errs = vcpu.get_regs(ids)
        vals = regs.values()
        return {f"{r:#x}": f"{v:#x}" for r, v, e in zip(ids, vals, errs)
                if not e and doc["values"].get(f"{r:#x}") != f"{v:#x}"}
    except KvmError as e:
        doc["errors"].append({"op": "ssbs-hidden view", "id": f"{pfr1:#x}", "errno": abi.errno_name(e.errno_value)})
        return {}
    finally:
        vm.close()


def feature_view(backend: Backend, feature: str, base_values: dict[str, str], before=None) -> tuple[object, dict]:
    """A fresh vCPU with the base features plus `feature`: before(vcpu) (what must be read or done before the
    register list, e.g. SVE's lengths and finalize), then the ID / imp-ID / cache registers that read differently
    than on a vCPU without the feature, as {id: value} in the document's hex form. -> (before's result, view)."""
    cat = catalog()
    vm = backend.create_vm(0)
    try:
        vcpu = vm.create_vcpu(0)
        vcpu.init(VcpuInit(vm.preferred_target().target,
                           tuple(abi.VCPU_FEATURES[f] for f in BASE_FEATURES) + (abi.VCPU_FEATURES[feature],)))
        first = before(vcpu) if before is not None else None
        ids = [r for r in vcpu.reg_list() if cat.reg_class(r) in ("id", "imp_id", "cache")]
        regs, errs = vcpu.get_regs(ids)
        vals = regs.values()
        return first, {f"{r:#x}": f"{v:#x}" for r, v, e in zip(ids, vals, errs)
                       if not e and base_values.get(f"{r:#x}") != f"{v:#x}"}
    finally:
        vm.close()


def sve_view(backend: Backend, base_values: dict[str, str]) -> tuple[int, dict[str, str]]:
    """KVM_REG_ARM64_SVE_VLS before finalize: the host's vector lengths (bit vq-1 per supported vq = VL/128; a VM's
    set must match it up to its own maximum, set_sve_vls), and the ID registers an SVE vCPU reads differently
    (ID_AA64PFR0_EL1.SVE, ID_AA64ZFR0_EL1: KVM hides them without the feature)."""
    def lengths(vcpu) -> int:
        vls = vcpu.get_reg(regid.SVE_VLS)
        vcpu.finalize(abi.KVM_ARM_VCPU_SVE)          # the register list needs it
        return vls
    return feature_view(backend, "SVE", base_values, lengths)


def pmu_view(backend: Backend, base_values: dict[str, str]) -> dict[str, str]:
    """The ID registers a vCPU *with* PMU_V3 reads differently (ID_AA64DFR0_EL1.PMUVer, ID_DFR0_EL1.PerfMon: KVM
    shows the PMU only to a vCPU that has one; QEMU's -cpu host VMs enable it, seen on the real kernels)."""
    return feature_view(backend, "PMU_V3", base_values)[1]


def describe(ids, values: dict[int, int], masks: dict | None) -> list[dict]:
    """ID / imp-ID / cache / FW registers with decoded fields (the human part of the document)."""
    cat = catalog()
    out = []
    for r in ids:
        cls = cat.reg_class(r)
        if cls not in ("id", "imp_id", "cache", "fw"):
            continue
        d = regid.decode(r)
        idx = mask_index(d.encoding) if d.encoding else None
        entry = {"name": cat.name(r), "id": f"{r:#x}", "class": cls, "value": f"{values.get(r, 0):#018x}",
                 "fields": {f.name: f.raw(values.get(r, 0)) for f in cat.fields_of(r)}}
        if masks is not None and idx is not None:
            entry["writable_mask"] = f"{int(masks.get(str(idx), '0x0'), 16):#018x}"
        out.append(entry)
    return out
