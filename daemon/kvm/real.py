"""The real binding: /dev/kvm through cffi (ABI mode) and the small C library in batch.c.

The library is built at install time (setup.py) next to this file; INVARIANTD_BATCH_LIB overrides
the path (the arm64 lab cross-compiles it for the guest).
"""
from __future__ import annotations

import errno as _errno
import glob
import mmap
import os
import platform
import struct
import threading
from pathlib import Path
from typing import Sequence

import cffi

from ...protocol import kvmabi as abi
from ...protocol import regid
from ...protocol.regset import RegisterSet, layout
from .backend import VcpuInit, reg_list_handshake, sizing_handshake
from .errors import KvmError

_CDEF = """
int ivd_abi_version(void);
long ivd_ioctl(int fd, unsigned long request, uintptr_t arg);
int ivd_set_regs(int fd, const uint64_t *ids, uint8_t *data, const uint64_t *offs, int n, int *errs);
int ivd_get_regs(int fd, const uint64_t *ids, uint8_t *data, const uint64_t *offs, int n, int *errs);
"""

ffi = cffi.FFI()
ffi.cdef(_CDEF)
_lib = None


class BatchLibraryMissing(RuntimeError):
    pass


def batch_library_path() -> str:
    env = os.environ.get("INVARIANTD_BATCH_LIB")
    if env:
        return env
    here = Path(__file__).parent
    hits = sorted(glob.glob(str(here / "_ivdbatch*.so")))
    if not hits:
        raise BatchLibraryMissing(
            f"the KVM batch library (_ivdbatch*.so) is not built in {here}: reinstall with "
            f"`pip install -e .` (needs a C compiler) or set INVARIANTD_BATCH_LIB")
    return hits[0]


def lib():
    global _lib
    if _lib is None:
        _lib = ffi.dlopen(batch_library_path())
        if _lib.ivd_abi_version() != 1:
            raise BatchLibraryMissing(f"{batch_library_path()}: unexpected ABI version {_lib.ivd_abi_version()}")
    return _lib


def _call(fd: int, name: str, arg: int = 0, reg_id: int | None = None) -> int:
    r = lib().ivd_ioctl(fd, abi.IOCTLS[name], arg)
    if r < 0:
        raise KvmError(name, -r, reg_id)
    return r


def _addr(cdata) -> int:
    return int(ffi.cast("uintptr_t", cdata))


class RegBuffers:
    """ids, offsets and one data buffer for a fixed list of registers: built once, reused per vCPU."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.layout = layout(tuple(ids))          # a RegisterSet's layout: values end to end, KVM_REG_SIZE each
        self.ids_list = list(self.layout.ids)
        n = len(self.ids_list)
        self.n = n
        self.ids = ffi.new("uint64_t[]", self.ids_list)
        self.sizes = list(self.layout.sizes)
        self.offsets = list(self.layout.offsets)
        self.offs = ffi.new("uint64_t[]", self.offsets)
        self.data = ffi.new("uint8_t[]", max(self.layout.total, 1))
        self.errs = ffi.new("int[]", max(n, 1))

    def pack_bytes(self, blob) -> None:
        ffi.memmove(self.data, blob, len(blob))

    def errnos(self) -> list[int]:
        return list(self.errs[0:self.n])


class RealVcpu:
    def __init__(self, vm: "RealVm", fd: int, index: int) -> None:
        self.vm, self.fd, self.index = vm, fd, index
        self._one = ffi.new("uint8_t[256]")
        self._reg = ffi.new("uint64_t[2]")
        self._run_map: mmap.mmap | None = None
        self._listed: list[int] | None = None

    def init(self, init: VcpuInit) -> None:
        buf = ffi.new("uint32_t[8]", [init.target] + init.words())
        self._listed = None
        _call(self.fd, "KVM_ARM_VCPU_INIT", _addr(buf))

    def finalize(self, feature: int) -> None:
        buf = ffi.new("int *", feature)
        self._listed = None
        _call(self.fd, "KVM_ARM_VCPU_FINALIZE", _addr(buf))

    def get_reg(self, reg_id: int) -> int:
        size = regid.size_bytes(reg_id)
        self._reg[0], self._reg[1] = reg_id, _addr(self._one)
        _call(self.fd, "KVM_GET_ONE_REG", _addr(self._reg), reg_id)
        return int.from_bytes(ffi.buffer(self._one, size)[:], "little")

    def set_reg(self, reg_id: int, value: int) -> None:
        size = regid.size_bytes(reg_id)
        try:
            ffi.buffer(self._one, size)[:] = int(value).to_bytes(size, "little")
        except OverflowError:
            raise KvmError("KVM_SET_ONE_REG", _errno.EINVAL, reg_id, f"value does not fit {size} bytes") from None
        self._reg[0], self._reg[1] = reg_id, _addr(self._one)
        _call(self.fd, "KVM_SET_ONE_REG", _addr(self._reg), reg_id)

    def get_reg_list(self, capacity: int) -> list[int]:
        """One KVM_GET_REG_LIST with room for `capacity` ids; E2BIG carries the count KVM wants in .required."""
        buf = ffi.new("uint64_t[]", 1 + capacity)
        buf[0] = capacity
        r = lib().ivd_ioctl(self.fd, abi.KVM_GET_REG_LIST, _addr(buf))
        if r == -_errno.E2BIG:
            raise KvmError("KVM_GET_REG_LIST", _errno.E2BIG, required=buf[0],
                           detail=f"room for {capacity}, kernel needs {buf[0]}")
        if r < 0:
            raise KvmError("KVM_GET_REG_LIST", -r)
        return [buf[1 + i] for i in range(buf[0])]

    def reg_list(self) -> list[int]:
        """Every register this vCPU migrates. arm64: KVM_GET_REG_LIST. x86: KVM_GET_REG_LIST (only KVM-defined
        registers, often none) followed by the MSRs as ONE_REG ids (RealKvm.msr_reg_ids: the KVM-listed MSRs
        that GET_ONE_REG accepts on a fresh vCPU), so read_vm / the peer stream / apply see one list. Asked of KVM
        once per vCPU and kept (KVM's list changes only with KVM_ARM_VCPU_INIT / FINALIZE, which forget it): the
        read after the pause does not repeat the sizing handshake."""
        if self._listed is None:
            ids = reg_list_handshake(self)
            if self.vm.backend.arch == "x86_64":
                listed = set(ids)
                ids += [r for r in self.vm.backend.msr_reg_ids() if r not in listed]
            self._listed = ids
        return list(self._listed)

    def get_regs_into(self, bufs: RegBuffers) -> int:
        return lib().ivd_get_regs(self.fd, bufs.ids, bufs.data, bufs.offs, bufs.n, bufs.errs)

    def set_regs_from(self, bufs: RegBuffers) -> int:
        return lib().ivd_set_regs(self.fd, bufs.ids, bufs.data, bufs.offs, bufs.n, bufs.errs)

    def _buffers(self, lay) -> RegBuffers:
        return self.vm.backend.buffers(lay)

    def get_regs(self, ids: Sequence[int]) -> tuple[RegisterSet, list[int]]:
        bufs = self._buffers(layout(tuple(ids)))
        failed = self.get_regs_into(bufs)
        lay, errs = bufs.layout, (bufs.errnos() if failed else [0] * bufs.n)
        data = bytes(ffi.buffer(bufs.data, lay.total))
        if any(errs):                               # a register that could not be read holds 0
            fixed = bytearray(data)
            for k, e in enumerate(errs):
                if e:
                    fixed[lay.offsets[k]:lay.offsets[k] + lay.sizes[k]] = bytes(lay.sizes[k])
            data = bytes(fixed)
        return RegisterSet(lay, data), errs

    def set_regs(self, regs: RegisterSet) -> list[int]:
        bufs = self._buffers(regs.layout)
        bufs.pack_bytes(regs.data)
        if self.set_regs_from(bufs) == 0:
            return [0] * bufs.n
        return bufs.errnos()

    def run_once(self) -> str:
        """Enter the guest once (a store to unmapped memory on arm64, HLT on x86), so KVM marks the VM as run."""
        if self._run_map is None:
            size = _call(self.vm.backend.fd, "KVM_GET_VCPU_MMAP_SIZE")
            self._run_map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.vm.map_guest_code()
        _call(self.fd, "KVM_RUN")
        reason = struct.unpack_from("<I", self._run_map, 8)[0]
        return {abi.KVM_EXIT_MMIO: "mmio", abi.KVM_EXIT_HLT: "hlt"}.get(reason, f"exit {reason}")

    def close(self) -> None:
        if self._run_map is not None:
            self._run_map.close()
            self._run_map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# arm64 guest at IPA 0: movz x1,#0x10,lsl#16; str x0,[x1]; b .   -> the store exits as MMIO
_ARM64_CODE = struct.pack("<3I", 0xD2A00201, 0xF9000020, 0x14000000)


class RealVm:
    def __init__(self, backend: "RealKvm", fd: int) -> None:
        self.backend, self.fd = backend, fd
        self._mem: mmap.mmap | None = None
        self.vcpus: list[RealVcpu] = []

    def check_extension(self, cap: int) -> int:
        return _call(self.fd, "KVM_CHECK_EXTENSION", cap)

    def enable_cap(self, cap: int, args: Sequence[int] = ()) -> None:
        buf = ffi.new("uint8_t[104]")
        struct.pack_into("<II4Q", ffi.buffer(buf), 0, cap, 0, *(list(args) + [0, 0, 0, 0])[:4])
        _call(self.fd, "KVM_ENABLE_CAP", _addr(buf))

    def create_vcpu(self, index: int) -> RealVcpu:
        v = RealVcpu(self, _call(self.fd, "KVM_CREATE_VCPU", index), index)
        self.vcpus.append(v)
        return v

    def preferred_target(self) -> VcpuInit:
        buf = ffi.new("uint32_t[8]")
        _call(self.fd, "KVM_ARM_PREFERRED_TARGET", _addr(buf))
        feats = tuple(b for b in range(7 * 32) if buf[1 + b // 32] >> (b % 32) & 1)
        return VcpuInit(buf[0], feats)

    def writable_masks(self, range_: int = 0) -> list[int]:
        masks = ffi.new("uint64_t[]", abi.KVM_ARM_FEATURE_ID_RANGE_SIZE)
        req = ffi.new("uint8_t[64]")
        struct.pack_into("<QI", ffi.buffer(req), 0, _addr(masks), range_)
        _call(self.fd, "KVM_ARM_GET_REG_WRITABLE_MASKS", _addr(req))
        return list(masks)

    def map_guest_code(self) -> None:
        if self._mem is not None:
            return
        self._mem = mmap.mmap(-1, 0x10000)
        if self.backend.arch == "aarch64":
            gpa = 0
            self._mem[:len(_ARM64_CODE)] = _ARM64_CODE
        else:
            gpa = 0xF0000                     # x86 reset vector f000:fff0 -> 0xffff0: all HLT
            self._mem[:] = b"\xf4" * 0x10000
        self._mem_ptr = ffi.from_buffer(self._mem)
        region = ffi.new("uint8_t[32]")
        struct.pack_into("<IIQQQ", ffi.buffer(region), 0, 0, 0, gpa, 0x10000, _addr(self._mem_ptr))
        _call(self.fd, "KVM_SET_USER_MEMORY_REGION", _addr(region))

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; } = _IOWR(KVMIO, 0x02, struct kvm_msr_list)
KVM_GET_MSR_INDEX_LIST = 0xC004AE02


class RealKvm:
    kind = "kvm"

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.path = path
        self.arch = platform.machine()
        self._msr_ids: tuple[int, ...] | None = None
        self._local = threading.local()
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(f"open {path}", e.errno or _errno.ENODEV) from None

    def api_version(self) -> int:
        return _call(self.fd, "KVM_GET_API_VERSION")

    def buffers(self, lay) -> RegBuffers:
        """C buffers for a register list, one set per thread, reused by every vCPU (of every VM) that thread
        works on: a VM's vCPUs repeat one list, and a vCPU is worked on by one thread at a time."""
        cache = getattr(self._local, "bufs", None)
        if cache is None:
            cache = self._local.bufs = {}
        bufs = cache.get(lay.ids_le)
        if bufs is None:
            if len(cache) >= 8:
                cache.clear()
            bufs = cache[lay.ids_le] = RegBuffers(lay.ids)
        return bufs

    def check_extension(self, cap: int) -> int:
        return _call(self.fd, "KVM_CHECK_EXTENSION", cap)

    def create_vm(self, vm_type: int = 0) -> RealVm:
        return RealVm(self, _call(self.fd, "KVM_CREATE_VM", vm_type))

    def kernel_release(self) -> str:
        return os.uname().release

    def msr_index_list(self) -> list[int]:
        """x86 KVM_GET_MSR_INDEX_LIST on the system fd (the MSRs KVM saves/restores plus those it emulates),
        with the sizing handshake (backend.sizing_handshake): KVM writes the count it needs into nmsrs."""
        def ask(capacity: int) -> list[int]:
            buf = ffi.new("uint32_t[]", 1 + capacity)
            buf[0] = capacity
            r = lib().ivd_ioctl(self.fd, KVM_GET_MSR_INDEX_LIST, _addr(buf))
            if r < 0:
                raise KvmError("KVM_GET_MSR_INDEX_LIST", -r, required=buf[0] if r == -_errno.E2BIG else None,
                               detail=f"room for {capacity}")
            return [buf[1 + i] for i in range(buf[0])]
        return sizing_handshake("KVM_GET_MSR_INDEX_LIST", ask)

    def msr_reg_ids(self) -> tuple[int, ...]:
        """The x86 MSRs a vCPU migrates, as ONE_REG ids (regid.x86_msr): KVM_GET_MSR_INDEX_LIST filtered to
        those GET_ONE_REG accepts on a fresh vCPU of a scratch VM (KVM lists MSRs of features this VM's vCPUs
        may lack; those fail with EINVAL and carry no state). Computed once per backend; () off x86 or
        without ONE_REG (Linux < 6.18 x86)."""
        if self._msr_ids is None:
            ids: tuple[int, ...] = ()
            if self.arch == "x86_64" and self.check_extension(abi.CAPS["KVM_CAP_ONE_REG"]):
                cand = [regid.x86_msr(i) for i in self.msr_index_list()]
                vm = self.create_vm(0)
                try:
                    _, errs = vm.create_vcpu(0).get_regs(cand)
                finally:
                    vm.close()
                ids = tuple(r for r, e in zip(cand, errs) if not e)
            self._msr_ids = ids
        return self._msr_ids

    def cpu_midrs(self) -> list[int]:
        out = []
        for p in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/regs/identification/midr_el1"),
                        key=lambda s: int(s.split("/cpu")[2].split("/")[0])):
            try:
                out.append(int(Path(p).read_text().strip(), 16))
            except (OSError, ValueError):
                pass
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
