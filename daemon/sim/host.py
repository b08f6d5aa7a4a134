"""A simulated arm64 KVM host that answers ONE_REG / REG_LIST / masks exactly as a real kernel of one era.

Host facts (register list, reset values, caps, writable masks, per-CPU MIDRs) come from a profile: a
capability document written by `invariantctl lab profile` on a real kernel. Behaviour that differs by
kernel comes from eras.tsv and protocol/data/prechecks.tsv. The per-field rule is the catalog's check_write(), the
same code the negotiation engine uses.
"""
from __future__ import annotations

import errno as E
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Sequence

from ...protocol import kvmabi as abi
from ...protocol import kernelver, regid, tables
from ...protocol.catalog import Catalog, catalog, mask_index, sve_vls_problem
from ...protocol.regset import RegisterSet
from ..kvm.backend import VcpuInit, reg_list_handshake, set_one_by_one
from ..kvm.errors import KvmError


class ProfileError(ValueError):
    """A --sim profile name or file that cannot be used; the message lists what exists."""


@dataclass(frozen=True)
class Era:
    name: str
    lo: tuple[int, ...] | None
    hi: tuple[int, ...] | None
    id_write: str
    frozen_errno: int
    imp_id: str
    invariant_errno: int
    cap239_before_vcpu: bool = True
    first_run_clears: tuple[str, ...] = ()


def _errno(name: str) -> int:
    return abi.EINVARIANT if name == "EINVARIANT" else getattr(E, name)


@lru_cache(maxsize=1)
def eras() -> dict[str, Era]:
    out = {}
    for r in tables.rows("eras.tsv", __package__, ""):
        out[r["era"]] = Era(r["era"], None if r["from"] == "-" else kernelver.parse(r["from"]),
                            None if r["to"] == "-" else kernelver.parse(r["to"]), r["id_write"], _errno(r["frozen_errno"]),
                            r["imp_id"], _errno(r["invariant_errno"]),
                            r["cap239_order"] == "before_vcpu",
                            tuple(x for x in r["first_run_clears"].split(";") if x))
    return out


def era_for(kernel: str) -> Era:
    if kernel.endswith("-patched"):
        return eras()["patched"]
    v = kernelver.parse(kernel)[:2]
    for e in eras().values():
        if e.lo is not None and e.lo <= v <= e.hi:
            return e
    raise ProfileError(f"no simulated kernel era covers {kernel} (eras: "
                       + ", ".join(f"{e.name} {'.'.join(map(str, e.lo))}-{'.'.join(map(str, e.hi))}"
                                   for e in eras().values() if e.lo) + ")")


_PROFILE_DIR = ("data", "profiles")


def list_profiles() -> list[str]:
    d = resources.files("invariantd.protocol").joinpath(*_PROFILE_DIR)
    names = sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".json"))
    return names


def load_profile(spec: str) -> tuple[dict, Era]:
    """'cortex-a72-r0p4@6.12' -> (capability document, era). '@6.1-patched' selects the EINVARIANT era."""
    if "@" not in spec:
        raise ProfileError(f"--sim wants PROFILE@KERNEL, e.g. cortex-a72-r0p4@6.12; got {spec!r}. "
                           f"Known: {', '.join(list_profiles())}")
    cpu, kernel = spec.rsplit("@", 1)
    base = kernel[:-len("-patched")] if kernel.endswith("-patched") else kernel
    d = resources.files("invariantd.protocol").joinpath(*_PROFILE_DIR)
    path = d.joinpath(f"{cpu}@{base}.json")
    if not path.is_file():
        raise ProfileError(f"no simulated host profile {cpu}@{base}. Known: {', '.join(list_profiles())}")
    doc = json.loads(path.read_text())
    return doc, era_for(kernel)


def _hexmap(d: dict) -> dict[int, int]:
    return {int(k, 16): int(v, 16) for k, v in d.items()}


@dataclass(frozen=True, slots=True)
class RegInfo:
    cls: str            # catalog class (id, imp_id, cache, fw, demux, state, ...)
    group: str          # regid group (core, sysreg, fw, fw-bmap, demux, sve, ...)
    raz: bool           # an "aa32" ID register on a host without AArch32 at EL0 (6.1+): reads 0, ignores writes
    sve_data: bool      # Z / P / FFR: only after KVM_ARM_VCPU_FINALIZE


class SimHost:
    kind = "sim"
    arch = "aarch64"

    def __init__(self, spec: str | None = None, doc: dict | None = None, era: Era | None = None,
                 rules: Catalog | None = None) -> None:
        """spec 'cpu@kernel' loads a shipped profile; or pass a capability document and an era.
        rules: the register catalog to check writes with (default: the shipped one)."""
        self.catalog = rules or catalog()
        if doc is None:
            doc, era = load_profile(spec)
        self.spec = spec or doc.get("profile") or "custom"
        self.doc = doc
        self.era = era or era_for(doc["kernel_version"])
        self.caps = {abi.CAPS[k]: v for k, v in doc["caps"].items() if k in abi.CAPS}
        if self.era.name == "patched":
            self.caps[abi.KVM_CAP_ARM_WRITABLE_IMP_ID_REGS] = 0
        self.reg_list = [int(x, 16) for x in doc["reg_list"]]
        self.values = _hexmap(doc["values"])
        masks = doc.get("writable_masks")
        self.masks = None if masks is None else [0] * abi.KVM_ARM_FEATURE_ID_RANGE_SIZE
        if masks is not None:
            for k, v in masks.items():
                self.masks[int(k)] = int(v, 16)
        self.kernel_tuple = kernelver.parse(doc["kernel_version"])[:2]
        self.sve_vls = int(doc.get("sve_vls", "0x1"), 16)      # the host's SVE vector lengths (probe.py)
        self.sve_values = _hexmap(doc.get("sve_values") or {})  # ID registers an SVE vCPU reads differently
        self.pmu_values = _hexmap(doc.get("pmu_values") or {})  # ... and a vCPU with PMU_V3
        self.ssbs_hidden_values = _hexmap(doc.get("ssbs_hidden_values") or {})   # FW registers once SSBS is 0
        # no AArch32 at EL0: the "aa32" ID registers are RAZ and ignore userspace writes (6.1+, sysregs.tsv)
        self.aa32_raz = self.kernel_tuple >= (6, 1) and not self.catalog.aarch32_el0(self.values)
        self.init = VcpuInit(doc["vcpu_init"]["target"],
                             tuple(abi.VCPU_FEATURES[f] for f in doc["vcpu_init"]["base_features"]))
        self._info: dict = {}      # reg id -> RegInfo; ("tpl", features) -> vcpu_template
        pfr1 = self.catalog.id_of("ID_AA64PFR1_EL1")
        self.ssbs = (pfr1, next(f for f in self.catalog.fields_of(pfr1) if f.name == "SSBS"))

    def vcpu_template(self, features: tuple[int, ...]) -> tuple[tuple[int, ...], dict[int, int]]:
        """(register list, values) of a vCPU just initialised with `features` (MPIDR aside: per vCPU). Computed once
        per feature set: every vCPU of a VM repeats it."""
        key = ("tpl", features)
        got = self._info.get(key)
        if got is None:
            listed = list(self.reg_list)
            values = {rid: self.values.get(rid, 0) for rid in listed}
            if _SVE_FEATURE in features:
                core_v = {r for r in listed if regid.decode(r).group == "core" and regid.size_bytes(r) == 16}
                listed = [r for r in listed if r not in core_v]       # unlisted (their values stay, as before)
                sve = ([regid.sve_z(n) for n in range(32)] + [regid.sve_p(n) for n in range(16)]
                       + [regid.sve_ffr(), regid.SVE_VLS])
                listed += sve
                for r in sve:
                    values[r] = self.sve_vls if r == regid.SVE_VLS else 0
                for r, v in self.sve_values.items():        # KVM shows PFR0.SVE / ZFR0 to an SVE vCPU only
                    if r in values:
                        values[r] = v
            if _PMU_FEATURE in features:
                for r, v in self.pmu_values.items():        # KVM shows PMUVer / PerfMon to a vCPU with a PMU only
                    if r in values:
                        values[r] = v
            got = self._info[key] = (tuple(listed), values)
        return got

    def info(self, reg_id: int) -> "RegInfo":
        """What the simulated kernel's ONE_REG paths ask of a register id, looked up once per id (the catalog's
        class, the id's group, whether it is RAZ/WI here): a register costs a dict lookup, not a catalog walk."""
        got = self._info.get(reg_id)
        if got is None:                          # asked for listed registers only (SimVcpu._check): bounded
            d = regid.decode(reg_id)
            got = self._info[reg_id] = RegInfo(
                self.catalog.reg_class(reg_id), d.group,
                self.aa32_raz and self.catalog.visibility(reg_id) == "aa32",
                d.group == "sve" and reg_id != regid.SVE_VLS)
        return got

    # Backend interface
    def api_version(self) -> int:
        return 12

    def check_extension(self, cap: int) -> int:
        return self.caps.get(cap, 0)

    def create_vm(self, vm_type: int = 0) -> "SimVm":
        ipa = vm_type & 0xFF
        if vm_type & ~0xFF or (ipa and not 32 <= ipa <= self.caps.get(abi.KVM_CAP_ARM_VM_IPA_SIZE, 40)):
            raise KvmError("KVM_CREATE_VM", E.EINVAL, detail=f"machine type {vm_type:#x}")
        return SimVm(self)

    def kernel_release(self) -> str:
        rel = self.doc["kernel_release"]
        return rel + "+einvariant" if self.era.name == "patched" else rel

    def cpu_midrs(self) -> list[int]:
        return [int(x, 16) for x in self.doc.get("cpu_midrs", [])]

    def close(self) -> None:
        pass

    def mask_for(self, reg_id: int) -> int:
        d = regid.decode(reg_id)
        idx = mask_index(d.encoding) if d.encoding else None
        if self.masks is None or idx is None:
            return 0
        return self.masks[idx]


_SVE_FEATURE = abi.VCPU_FEATURES["SVE"]
_PMU_FEATURE = abi.VCPU_FEATURES["PMU_V3"]


_FEATURE_NAMES = {bit: name for name, bit in abi.VCPU_FEATURES.items()}


def _check_features(host: "SimHost", bits) -> None:
    """kvm_vcpu_init_check_features() from protocol/data/vcpu_features.tsv: a bit the kernel does not know ENOENT
    (before any other check), a feature whose capability the host reports 0 (a document without the capability
    leaves it to the kernel, as the plan does) or without the features it requires EINVAL."""
    names = set()
    for b in bits:
        name = _FEATURE_NAMES.get(b)
        if name is None or host.kernel_tuple < abi.FEATURE_SINCE[name]:
            raise KvmError("KVM_ARM_VCPU_INIT", E.ENOENT, detail=f"feature bit {b} unknown to kernel "
                                                                  f"{'.'.join(map(str, host.kernel_tuple))}")
        names.add(name)
    for name in sorted(names):
        gate = abi.FEATURE_GATES[name]
        if gate == "unchecked" or (gate != "always" and host.caps.get(abi.CAPS[gate], 1) == 0):
            raise KvmError("KVM_ARM_VCPU_INIT", E.EINVAL, detail=f"{name} requested but not offered")
        missing = [r for r in abi.FEATURE_REQUIRES[name] if r not in names]
        if missing:
            raise KvmError("KVM_ARM_VCPU_INIT", E.EINVAL, detail=f"{name} needs {', '.join(missing)}")


class SimVm:
    def __init__(self, host: SimHost) -> None:
        self.host = host
        self.vcpus: list[SimVcpu] = []
        self.cap239 = False
        self.has_ran = False
        self.vm_values: dict[int, int] | None = None     # ID / imp-ID / CTR / FW: VM-wide, set at first VCPU_INIT

    def check_extension(self, cap: int) -> int:
        return self.host.check_extension(cap)

    def enable_cap(self, cap: int, args: Sequence[int] = ()) -> None:
        if cap != abi.KVM_CAP_ARM_WRITABLE_IMP_ID_REGS or not self.host.check_extension(cap):
            raise KvmError("KVM_ENABLE_CAP", E.EINVAL, detail=f"capability {abi.CAP_NAMES.get(cap, cap)} not offered")
        if self.vcpus and self.host.era.cap239_before_vcpu:
            raise KvmError("KVM_ENABLE_CAP", E.EINVAL,
                           detail="KVM_CAP_ARM_WRITABLE_IMP_ID_REGS must be enabled before the first vCPU")
        self.cap239 = True

    def create_vcpu(self, index: int) -> "SimVcpu":
        if any(v.index == index for v in self.vcpus):
            raise KvmError("KVM_CREATE_VCPU", E.EEXIST, detail=f"vCPU {index} exists")
        v = SimVcpu(self, index)
        self.vcpus.append(v)
        return v

    def preferred_target(self) -> VcpuInit:
        return VcpuInit(self.host.init.target, ())

    def writable_masks(self, range_: int = 0) -> list[int]:
        if self.host.masks is None:
            raise KvmError("KVM_ARM_GET_REG_WRITABLE_MASKS", E.EINVAL, detail="not offered by this kernel (< 6.7)")
        if range_ != 0:
            raise KvmError("KVM_ARM_GET_REG_WRITABLE_MASKS", E.EINVAL, detail=f"range {range_} (only 0 exists)")
        return list(self.host.masks)

    def close(self) -> None:
        self.vcpus.clear()


_CHECKED = frozenset(("id", "imp_id", "cache", "fw", "fw-bmap", "demux"))    # classes / groups a setter checks


def _vm_wide(cls: str) -> bool:
    return cls in ("id", "imp_id", "fw") or cls == "cache"


class SimVcpu:
    def __init__(self, vm: SimVm, index: int) -> None:
        self.vm, self.index = vm, index
        self.features: tuple[int, ...] | None = None
        self.finalized = False
        self.values: dict[int, int] = {}
        self.listed: list[int] = []

    # --- lifecycle
    def init(self, init: VcpuInit) -> None:
        if init.target != self.vm.host.init.target:
            raise KvmError("KVM_ARM_VCPU_INIT", E.EINVAL, detail=f"target {init.target} is not the preferred "
                                                                  f"{self.vm.host.init.target}")
        host = self.vm.host
        _check_features(host, init.features)
        self.features = tuple(init.features)
        listed, values = host.vcpu_template(self.features)
        self.listed, self.values = list(listed), dict(values)
        cat = self.vm.host.catalog
        mpidr = cat.id_of("MPIDR_EL1")
        if mpidr in self.values:
            self.values[mpidr] = (1 << 31) | (self.index & 0xF) | ((self.index >> 4) & 0xFF) << 8
        if self.vm.vm_values is None:
            self.vm.vm_values = {r: v for r, v in self.values.items() if _vm_wide(cat.reg_class(r))}

    def finalize(self, feature: int) -> None:
        if self.features is None:
            raise KvmError("KVM_ARM_VCPU_FINALIZE", E.EPERM, detail="vCPU not initialised")
        if feature != abi.KVM_ARM_VCPU_SVE or _SVE_FEATURE not in self.features:
            raise KvmError("KVM_ARM_VCPU_FINALIZE", E.EINVAL, detail=f"feature {feature}")
        if self.finalized:
            raise KvmError("KVM_ARM_VCPU_FINALIZE", E.EPERM, detail="already finalized")
        self.finalized = True

    def _check_vls(self, op: str, value: int) -> int:
        """set_sve_vls (arch/arm64/kvm/guest.c): before finalize only; the set's maximum within the host's, and
        exactly the host's vector lengths up to that maximum (KVM can only cap ZCR_EL2.LEN, not hide one)."""
        if self.finalized:
            raise KvmError(op, E.EPERM, regid.SVE_VLS, "SVE already finalized")
        why = sve_vls_problem(value, self.vm.host.sve_vls)
        if why:
            raise KvmError(op, E.EINVAL, regid.SVE_VLS, why)
        return value

    def run_once(self) -> str:
        if self.features is None:
            raise KvmError("KVM_RUN", E.ENOEXEC)
        if _SVE_FEATURE in self.features and not self.finalized:
            raise KvmError("KVM_RUN", E.EPERM, detail="SVE not finalized")
        if not self.vm.has_ran:
            cat = self.vm.host.catalog
            for spec in self.vm.host.era.first_run_clears:     # no in-kernel GIC: KVM hides it at first run
                reg, fname = spec.split(".")
                f = next(x for x in cat.fields_of(reg) if x.name == fname)
                rid = cat.id_of(reg)
                if self.vm.vm_values is not None and rid in self.vm.vm_values:
                    self.vm.vm_values[rid] = f.put(self.vm.vm_values[rid], 0)
        self.vm.has_ran = True
        return "mmio"

    def close(self) -> None:
        pass

    # --- registers
    def _check(self, op: str, reg_id: int) -> RegInfo:
        if self.features is None:
            raise KvmError(op, E.ENOEXEC, reg_id)
        if reg_id not in self.values:            # listed ids only (valid arm64 ids): the rest is an error
            if (reg_id & regid.KVM_REG_ARCH_MASK) != regid.KVM_REG_ARM64 or (reg_id >> 32) & 0x000FFFFF:
                raise KvmError(op, E.EINVAL, reg_id, "not an arm64 register id")
            raise KvmError(op, E.ENOENT, reg_id)
        info = self.vm.host.info(reg_id)
        if info.sve_data and not self.finalized:
            raise KvmError(op, E.EPERM, reg_id, "SVE not finalized")
        return info

    def _store(self, reg_id: int) -> dict[int, int]:
        vmv = self.vm.vm_values
        return vmv if vmv is not None and reg_id in vmv else self.values

    def get_reg(self, reg_id: int) -> int:
        info = self._check("KVM_GET_ONE_REG", reg_id)
        if info.raz:
            return 0
        if info.group == "fw":
            hidden = self._ssbs_hidden_view()
            if reg_id in hidden:
                return hidden[reg_id]
        return self._store(reg_id)[reg_id]

    def _ssbs_hidden_view(self) -> dict[int, int]:
        """The firmware registers as KVM computes them for a VM whose ID_AA64PFR1_EL1.SSBS is 0 (6.12+: the
        WORKAROUND_2 level follows the VM's SSBS; the profile's ssbs_hidden_values, probed on the real kernels)."""
        host = self.vm.host
        if not host.ssbs_hidden_values:
            return {}
        pfr1, ssbs = host.ssbs
        store = self._store(pfr1)
        return host.ssbs_hidden_values if pfr1 in store and not ssbs.get(store[pfr1]) else {}

    def get_reg_list(self, capacity: int) -> list[int]:
        if self.features is None:
            raise KvmError("KVM_GET_REG_LIST", E.ENOEXEC)
        if _SVE_FEATURE in self.features and not self.finalized:
            raise KvmError("KVM_GET_REG_LIST", E.EPERM, detail="SVE not finalized")
        if capacity < len(self.listed):
            raise KvmError("KVM_GET_REG_LIST", E.E2BIG, required=len(self.listed),
                           detail=f"room for {capacity}, kernel needs {len(self.listed)}")
        return list(self.listed)

    def reg_list(self) -> list[int]:
        return reg_list_handshake(self)

    def _plain(self, ids: tuple[int, ...], writing: bool) -> bool:
        """Whether every register of `ids` takes the plain path here (listed, no RAZ, SVE data only once finalized;
        writing: per-vCPU state, no setter check) - then a whole batch is one comprehension or
        one dict update, exactly what the register-by-register path would do. Cached per list and vCPU shape."""
        host = self.vm.host
        key = ("plain", ids, self.features, self.finalized, writing)
        got = host._info.get(key)
        if got is None:
            values = self.values
            ok = True
            for r in ids:
                if r not in values:
                    ok = False
                    break
                info = host.info(r)
                if info.raz or (info.sve_data and not self.finalized) or (writing and (
                        r == regid.SVE_VLS or info.cls in _CHECKED or info.group in _CHECKED)):
                    ok = False
                    break
            if len(host._info) >= 1 << 16:
                host._info.clear()
            got = host._info[key] = ok
        return got

    def _positions(self, key: tuple[int, ...]) -> tuple[frozenset, dict[int, int]]:
        """A register list's ids as a set and each one's position (cached per list on the host)."""
        host = self.vm.host
        got = host._info.get(("pos", key))
        if got is None:
            if len(host._info) >= 1 << 16:
                host._info.clear()
            got = host._info[("pos", key)] = (frozenset(key), {r: i for i, r in enumerate(key)})
        return got

    def get_regs(self, ids: Sequence[int]) -> tuple[RegisterSet, list[int]]:
        key = tuple(ids)
        if self.features is not None and self._plain(key, False):
            vals = list(map(self.values.__getitem__, key))          # every one is there (_plain)
            keyset, pos = self._positions(key)
            for over in (self.vm.vm_values, self._ssbs_hidden_view()):     # VM-wide values, then the SSBS view
                if over:
                    for r in keyset.intersection(over):
                        vals[pos[r]] = over[r]
            return RegisterSet.from_values(key, vals), [0] * len(key)
        vals, errs = [], []
        for r in ids:
            try:
                vals.append(self.get_reg(r))
                errs.append(0)
            except KvmError as e:
                vals.append(0)
                errs.append(e.errno_value)
        return RegisterSet.from_values(ids, vals), errs

    def set_regs(self, regs: RegisterSet) -> list[int]:
        if self.features is not None and self._plain(regs.ids, True):
            self.values.update(zip(regs.ids, regs.values()))   # a RegisterSet's values fit their registers
            return [0] * len(regs)
        return set_one_by_one(self, regs)

    def set_reg(self, reg_id: int, value: int) -> None:
        op = "KVM_SET_ONE_REG"
        info = self._check(op, reg_id)
        if value < 0 or value >> (8 * regid.size_bytes(reg_id)):
            raise KvmError(op, E.EINVAL, reg_id, f"value does not fit {regid.size_bytes(reg_id)} bytes")
        if info.raz:
            return                      # REG_USER_WI: accepted, ignored (no setter runs, not even after first run)
        if reg_id == regid.SVE_VLS:
            self.values[reg_id] = self._check_vls(op, value)
            return
        cls, group = info.cls, info.group
        if cls not in _CHECKED and group not in _CHECKED:
            self.values[reg_id] = value          # per-vCPU state: no setter check (vm_values holds VM-wide only)
            return
        cat = self.vm.host.catalog
        store = self._store(reg_id)
        cur = store[reg_id]
        if cls in ("id", "imp_id", "cache"):
            value = self._set_idlike(op, reg_id, cls, value, cur)
        elif group == "fw":
            self._set_fw(op, reg_id, value, cur)
            if "WORKAROUND" in cat.name(reg_id):
                return          # accepted but not stored: GET keeps reporting the host's own level
        elif group == "fw-bmap":
            offered = self.vm.host.values.get(reg_id, 0) | cat.fwregs[reg_id].accepts      # fwregs.tsv
            if value & ~offered and value != cur:
                raise KvmError(op, E.EINVAL, reg_id, "unsupported hypercall bit")
            if value != cur and self.vm.has_ran:
                raise KvmError(op, E.EBUSY, reg_id)
        elif group == "demux":                  # set_ccsidr (protocol/data/setters.tsv)
            host, name = self.vm.host, cat.name(reg_id)
            if not cat.setter_checks(name, host.kernel_tuple):
                if value != host.values.get(reg_id, 0):
                    raise KvmError(op, E.EINVAL, reg_id, "CCSIDR is the physical CPU's on this kernel")
            else:
                ctr = cat.id_of("CTR_EL0")          # the host's CTR_EL0 (get_min_cache_line_size)
                problems = cat.setter_problems(name, value, host.kernel_tuple, {ctr: host.values.get(ctr, 0)})
                if problems:
                    raise KvmError(op, E.EINVAL, reg_id, problems[0][1])
        store[reg_id] = value

    def _set_fw(self, op: str, reg_id: int, value: int, cur: int) -> None:
        name = self.vm.host.catalog.name(reg_id)
        host_level = self._ssbs_hidden_view().get(reg_id, self.vm.host.values.get(reg_id, 0))
        fw = self.vm.host.catalog.fwregs[reg_id]
        if fw.kind == "psci":
            if value != cur and value not in fw.values or value > host_level:           # fwregs.tsv
                raise KvmError(op, E.EINVAL, reg_id, f"PSCI version {value:#x} not offered (host {host_level:#x})")
            return
        if value >> 5 or (value >> 4 and not fw.fold):
            raise KvmError(op, E.EINVAL, reg_id, "workaround level does not fit 4 bits")
        if fw.fold:                                  # WORKAROUND_2: the ENABLED bit and the level fold (fwregs.tsv)
            if value >> 4 and (value & 0xF) != 2:
                raise KvmError(op, E.EINVAL, reg_id, "ENABLED bit without AVAIL")
            level, host = fw.folded(value & 0xF), fw.folded(host_level & 0xF)
            if level is None:
                raise KvmError(op, E.EINVAL, reg_id, f"unknown {name} level")
            if host is None or level > host:
                raise KvmError(op, E.EINVAL, reg_id, f"destination is less mitigated ({name})")
        elif value > host_level:
            raise KvmError(op, E.EINVAL, reg_id, f"destination is less mitigated ({value} > host {host_level})")

    def _set_idlike(self, op: str, reg_id: int, cls: str, value: int, cur: int) -> int:
        """Check an ID / imp-ID / cache register write as the era's kernel would; return the value KVM stores."""
        host, vm, era, cat = self.vm.host, self.vm, self.vm.host.era, self.vm.host.catalog
        name = cat.name(reg_id)
        reset = host.values.get(reg_id, 0)
        if _SVE_FEATURE in (self.features or ()) and reg_id in host.sve_values:
            reset = host.sve_values[reg_id]          # an SVE vCPU's limit is the SVE view (PFR0.SVE, ZFR0)
        if _PMU_FEATURE in (self.features or ()) and reg_id in host.pmu_values:
            reset = host.pmu_values[reg_id]          # a PMU vCPU's limit is the PMU view (PMUVer, PerfMon)
        if cls == "imp_id":
            if value == cur:
                return value
            if era.imp_id != "cap239" or not vm.cap239:
                raise KvmError(op, era.invariant_errno, reg_id,
                               "implementation ID registers are invariant here" if era.imp_id != "cap239" else
                               "KVM_CAP_ARM_WRITABLE_IMP_ID_REGS was not enabled before the first vCPU")
            if vm.has_ran:
                raise KvmError(op, E.EBUSY, reg_id)
            if value & ~cat.imp_masks[name]:                  # protocol/data/imp_id.tsv
                raise KvmError(op, E.EINVAL, reg_id, "bits outside the writable mask")
            return value
        if cat.setter_checks(name, host.kernel_tuple):       # set_clidr and kin (protocol/data/setters.tsv)
            ctr = cat.id_of("CTR_EL0")                        # (set_clidr has no after-first-run check)
            problems = cat.setter_problems(name, value, host.kernel_tuple,
                                            {ctr: self._store(ctr).get(ctr, host.values.get(ctr, 0))})
            if problems:
                raise KvmError(op, E.EINVAL, reg_id, problems[0][1])
            return value
        if era.id_write == "exact":
            invariant = cls == "cache"
            lw = cat.legacy_writable(name, host.kernel_tuple)          # protocol/data/legacy_writable.tsv
            legacy = [f for f in cat.fields_of(name) if f.name in lw]
            mask = 0
            for f in legacy:
                mask |= f.mask
            if value == cur:
                return value
            problems = cat.check_write(name, value, reset, mask) if legacy else [(None, "differs")]
            if problems:
                raise KvmError(op, era.invariant_errno if invariant else E.EINVAL, reg_id,
                               problems[0][1] if legacy else "ID registers must match the host on this kernel")
            return value
        stored, refused = cat.precheck(name, value, host.kernel_tuple)     # protocol/data/prechecks.tsv
        if refused:
            raise KvmError(op, E.EINVAL, reg_id, refused[0][1])
        if stored != value:     # a rewritten value goes through the generic rule as what KVM stores
            return self._set_idlike(op, reg_id, cls, stored, cur)
        if value == cur:
            return value
        if vm.has_ran:
            raise KvmError(op, era.frozen_errno, reg_id)
        problems = cat.check_write(name, value, reset, host.mask_for(reg_id), self.vm.host.kernel_tuple)
        if problems:
            raise KvmError(op, E.EINVAL, reg_id, "; ".join(p for _, p in problems))
        return value
