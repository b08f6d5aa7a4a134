"""KVM uapi numbers (ioctls, capabilities, vCPU features, errnos) as data. Same on x86_64 and arm64.

ioctl numbers follow the asm-generic _IOC layout: nr 7:0, type 15:8 (KVMIO=0xAE), size 29:16, dir 31:30.
"""
from __future__ import annotations

import errno as _errno
import os

from . import kernelver, tables

KVMIO = 0xAE
_NONE, _W, _R, _RW = 0, 1, 2, 3


def _ioc(d: int, nr: int, size: int) -> int:
    return (d << 30) | (size << 16) | (KVMIO << 8) | nr


IOCTLS = {
    "KVM_GET_API_VERSION": _ioc(_NONE, 0x00, 0),
    "KVM_CREATE_VM": _ioc(_NONE, 0x01, 0),
    "KVM_CHECK_EXTENSION": _ioc(_NONE, 0x03, 0),
    "KVM_GET_VCPU_MMAP_SIZE": _ioc(_NONE, 0x04, 0),
    "KVM_CREATE_VCPU": _ioc(_NONE, 0x41, 0),
    "KVM_SET_USER_MEMORY_REGION": _ioc(_W, 0x46, 32),
    "KVM_RUN": _ioc(_NONE, 0x80, 0),
    "KVM_ENABLE_CAP": _ioc(_W, 0xA3, 104),
    "KVM_GET_ONE_REG": _ioc(_W, 0xAB, 16),
    "KVM_SET_ONE_REG": _ioc(_W, 0xAC, 16),
    "KVM_ARM_VCPU_INIT": _ioc(_W, 0xAE, 32),
    "KVM_ARM_PREFERRED_TARGET": _ioc(_R, 0xAF, 32),
    "KVM_GET_REG_LIST": _ioc(_RW, 0xB0, 8),
    "KVM_ARM_GET_REG_WRITABLE_MASKS": _ioc(_R, 0xB6, 64),
    "KVM_ARM_VCPU_FINALIZE": _ioc(_W, 0xC2, 4),
}
globals().update(IOCTLS)

CAPS = {
    "KVM_CAP_ONE_REG": 70,
    "KVM_CAP_ARM_PSCI": 87,
    "KVM_CAP_ARM_EL1_32BIT": 93,
    "KVM_CAP_ENABLE_CAP_VM": 98,
    "KVM_CAP_ARM_PSCI_0_2": 102,
    "KVM_CAP_ARM_PMU_V3": 126,
    "KVM_CAP_ARM_VM_IPA_SIZE": 165,
    "KVM_CAP_ARM_SVE": 170,
    "KVM_CAP_ARM_PTRAUTH_ADDRESS": 171,
    "KVM_CAP_ARM_PTRAUTH_GENERIC": 172,
    "KVM_CAP_ARM_MTE": 205,
    "KVM_CAP_COUNTER_OFFSET": 227,
    "KVM_CAP_ARM_SUPPORTED_REG_MASK_RANGES": 230,
    "KVM_CAP_ARM_WRITABLE_IMP_ID_REGS": 239,
}
globals().update(CAPS)
CAP_NAMES = {v: k for k, v in CAPS.items()}


def _vcpu_features() -> list[dict[str, str]]:
    """data/vcpu_features.tsv: one row per KVM_ARM_VCPU_INIT feature bit (name, bit, gating capability)."""
    rows = tables.rows("vcpu_features.tsv")
    for r in rows:
        if r["capability"] not in ("always", "unchecked") and r["capability"] not in CAPS:
            raise ValueError(f"vcpu_features.tsv: {r['name']}: unknown capability {r['capability']!r}")
        for need in filter(None, r["requires"].split(",")):
            if need not in {x["name"] for x in rows}:
                raise ValueError(f"vcpu_features.tsv: {r['name']}: requires unknown feature {need!r}")
    return rows


_FEATURE_ROWS = _vcpu_features()
VCPU_FEATURES = {r["name"]: int(r["bit"]) for r in _FEATURE_ROWS}
# feature -> the KVM_CAP_* that gates it, "always" or "unchecked" (see the table's header)
FEATURE_GATES = {r["name"]: r["capability"] for r in _FEATURE_ROWS}
# feature -> the first kernel (major, minor) that knows the bit (ENOENT before it); () = every kernel supported
FEATURE_SINCE = {r["name"]: kernelver.parse(r["since"]) for r in _FEATURE_ROWS}
# feature -> the features KVM_ARM_VCPU_INIT requires with it (EINVAL without them)
FEATURE_REQUIRES = {r["name"]: tuple(x for x in r["requires"].split(",") if x) for r in _FEATURE_ROWS}
KVM_ARM_VCPU_SVE = 4
KVM_ARM_FEATURE_ID_RANGE_SIZE = 192
KVM_EXIT_MMIO = 6
KVM_EXIT_HLT = 5

# KVM_EINVARIANT: the errno the 2018 "KVM_EINVARIANT" proposal wanted for an invariant-register
# mismatch. Mainline never assigned one; the patched-era simulator returns this value, and the apply
# path recognises it. 200 is unused by Linux (its errno table ends at 133, EHWPOISON) and below
# MAX_ERRNO (4095). Override with INVARIANTD_EINVARIANT for a kernel patched with another value.
EINVARIANT = int(os.environ.get("INVARIANTD_EINVARIANT", "200"))


def errno_name(err: int) -> str:
    if err == EINVARIANT:
        return "EINVARIANT"
    return _errno.errorcode.get(err, f"errno {err}")


def ioctl_name(request: int) -> str:
    for k, v in IOCTLS.items():
        if v == request:
            return k
    return f"ioctl {request:#x}"

# KVM's reset_unknown() fills registers the architecture leaves UNKNOWN at reset with this pattern
# (arch/arm64/kvm/sys_regs.h); the real 6.12 kernels in protocol/data/profiles show it for PIR_EL1/PIRE0_EL1.
KVM_RESET_UNKNOWN = 0x1DE7EC7EDBADC0DE
