"""KVM ONE_REG register ids for arm64 (and the x86 MSR form): encode, decode, name.

Layout (include/uapi/linux/kvm.h, arch/arm64/include/uapi/asm/kvm.h):
  63:56 arch (0x60 arm64, 0x20 x86) | 55:52 size log2(bytes) | 27:16 coproc | 15:0 index
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

KVM_REG_ARM64 = 0x6000000000000000
KVM_REG_X86 = 0x2000000000000000
KVM_REG_ARCH_MASK = 0xFF00000000000000
KVM_REG_SIZE_SHIFT = 52
KVM_REG_SIZE_MASK = 0x00F0000000000000

SIZE_U8, SIZE_U16, SIZE_U32, SIZE_U64, SIZE_U128, SIZE_U256, SIZE_U512, SIZE_U1024, SIZE_U2048 = range(9)

COPROC_SHIFT = 16
COPROC_MASK = 0x0FFF0000
COPROC_CORE = 0x10
COPROC_DEMUX = 0x11
COPROC_SYSREG = 0x13
COPROC_FW = 0x14
COPROC_SVE = 0x15
COPROC_FW_FEAT_BMAP = 0x16

COPROC_NAMES = {
    COPROC_CORE: "core", COPROC_DEMUX: "demux", COPROC_SYSREG: "sysreg", COPROC_FW: "fw",
    COPROC_SVE: "sve", COPROC_FW_FEAT_BMAP: "fw-bmap",
}


class RegIdError(ValueError):
    """A register id that is not a valid arm64 ONE_REG id; the message names the id in hex."""


def size_bytes(reg_id: int) -> int:
    """KVM_REG_SIZE(id): bytes of the value buffer."""
    return 1 << ((reg_id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)


def with_size(size_log2: int) -> int:
    if not 0 <= size_log2 <= SIZE_U2048:
        raise RegIdError(f"register size code {size_log2} out of range 0..8 (U8..U2048)")
    return size_log2 << KVM_REG_SIZE_SHIFT


def arm64(coproc: int, index: int, size_log2: int = SIZE_U64) -> int:
    if not 0 <= index <= 0xFFFF:
        raise RegIdError(f"index {index:#x} does not fit 16 bits")
    return KVM_REG_ARM64 | with_size(size_log2) | (coproc << COPROC_SHIFT) | index


def sysreg(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """ARM64_SYS_REG(op0, op1, CRn, CRm, op2): always U64."""
    for name, v, hi in (("op0", op0, 3), ("op1", op1, 7), ("CRn", crn, 15), ("CRm", crm, 15), ("op2", op2, 7)):
        if not 0 <= v <= hi:
            raise RegIdError(f"sysreg {name}={v} out of range 0..{hi}")
    return arm64(COPROC_SYSREG, (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2)


def core(offset_words: int, size_log2: int = SIZE_U64) -> int:
    """KVM_REG_ARM_CORE_REG: offset into struct kvm_regs in 32-bit words."""
    return arm64(COPROC_CORE, offset_words, size_log2)


def fw(index: int) -> int:
    return arm64(COPROC_FW, index)


def fw_bmap(index: int) -> int:
    return arm64(COPROC_FW_FEAT_BMAP, index)


def demux_ccsidr(csselr: int) -> int:
    if not 0 <= csselr <= 0xFF:
        raise RegIdError(f"CSSELR value {csselr} out of range")
    return arm64(COPROC_DEMUX, csselr, SIZE_U32)


def sve_z(n: int, slice_: int = 0) -> int:
    return arm64(COPROC_SVE, (n << 5) | slice_, SIZE_U2048)


def sve_p(n: int, slice_: int = 0) -> int:
    return arm64(COPROC_SVE, 0x400 | (n << 5) | slice_, SIZE_U256)


def sve_ffr(slice_: int = 0) -> int:
    return arm64(COPROC_SVE, 0x600 | slice_, SIZE_U256)


SVE_VLS = arm64(COPROC_SVE, 0xFFFF, SIZE_U512)


def x86_msr(index: int) -> int:
    """KVM_X86_REG_MSR(index), Linux 6.18 x86 ONE_REG (type 2, U64)."""
    if not 0 <= index <= 0xFFFFFFFF:
        raise RegIdError(f"MSR index {index:#x} does not fit 32 bits")
    return KVM_REG_X86 | with_size(SIZE_U64) | (2 << 32) | index


@dataclass(frozen=True, slots=True)
class DecodedId:
    reg_id: int
    arch: str
    size: int          # bytes
    group: str         # core, demux, sysreg, fw, sve, fw-bmap, msr, x86-kvm
    index: int
    encoding: tuple[int, int, int, int, int] | None = None   # sysreg (op0, op1, CRn, CRm, op2)


@lru_cache(maxsize=8192)
def decode(reg_id: int) -> DecodedId:
    """Split an id into arch, size, group and index (cached: register lists repeat per vCPU)."""
    if not 0 <= reg_id < 1 << 64:
        raise RegIdError(f"register id {reg_id!r} is not a 64-bit value")
    arch = reg_id & KVM_REG_ARCH_MASK
    size = size_bytes(reg_id)
    if arch == KVM_REG_X86:
        typ = (reg_id >> 32) & 0xFF
        group = {2: "msr", 3: "x86-kvm"}.get(typ)
        if group is None or (reg_id >> 40) & 0xFFF:
            raise RegIdError(f"register id {reg_id:#018x}: unknown x86 ONE_REG type {typ}")
        return DecodedId(reg_id, "x86_64", size, group, reg_id & 0xFFFFFFFF)
    if arch != KVM_REG_ARM64:
        raise RegIdError(f"register id {reg_id:#018x}: arch byte {arch >> 56:#x} is neither arm64 (0x60) nor x86 (0x20)")
    if (reg_id >> 32) & 0x000FFFFF:
        raise RegIdError(f"register id {reg_id:#018x}: bits 51:32 must be zero on arm64")
    if reg_id & 0xF0000000:
        raise RegIdError(f"register id {reg_id:#018x}: bits 31:28 must be zero on arm64")
    coproc = (reg_id & COPROC_MASK) >> COPROC_SHIFT
    group = COPROC_NAMES.get(coproc)
    if group is None:
        raise RegIdError(f"register id {reg_id:#018x}: unknown arm64 coproc group {coproc:#x}")
    index = reg_id & 0xFFFF
    enc = None
    if coproc == COPROC_SYSREG:
        enc = ((index >> 14) & 3, (index >> 11) & 7, (index >> 7) & 15, (index >> 3) & 15, index & 7)
    return DecodedId(reg_id, "aarch64", size, group, index, enc)


def parse_id(text: str) -> int:
    """Accept '0x603000000013c020' or a decimal; raise RegIdError naming the text otherwise."""
    try:
        return int(text, 0)
    except (TypeError, ValueError):
        raise RegIdError(f"{text!r} is not a register id (expected hex like 0x603000000013c020)") from None
