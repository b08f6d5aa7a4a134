"""The one interface both KVM backends implement: the real /dev/kvm binding and the simulated arm64 host.

Single registers are Python ints holding KVM_REG_SIZE(id) little-endian bytes; a vCPU's batch of registers is a
RegisterSet (protocol/regset.py: KVM's own bytes, end to end). Every failure raises KvmError(op, errno, reg_id).
Batch calls never raise per register: they return one errno per register.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import errno
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from ...protocol import kvmabi as abi
from ...protocol import regid
from ...protocol.regset import RegisterSet
from .errors import KvmError


@dataclass(frozen=True, slots=True)
class VcpuInit:
    target: int
    features: tuple[int, ...] = field(default_factory=tuple)   # feature bit numbers (kvmabi.VCPU_FEATURES)

    def words(self) -> list[int]:
        w = [0] * 7
        for bit in self.features:
            w[bit // 32] |= 1 << (bit % 32)
        return w


def sizing_handshake(op: str, ask: Callable[[int], list[int]]) -> list[int]:
    """A KVM list ioctl the way KVM wants it (KVM_GET_REG_LIST, KVM_GET_MSR_INDEX_LIST): ask(capacity) with room
    for 0, learn the count from E2BIG (KvmError.required), ask again - a few times, if the list keeps growing."""
    capacity = 0
    for _ in range(4):
        try:
            return ask(capacity)
        except KvmError as e:
            if e.errno_value != errno.E2BIG or e.required is None or e.required <= capacity:
                raise
            capacity = e.required
    raise KvmError(op, errno.E2BIG, detail="the count kept growing")


def set_one_by_one(vcpu: "Vcpu", regs) -> list[int]:
    """Vcpu.set_regs as single KVM_SET_ONE_REG calls, in order: 0 or the errno per register (a binding without a
    batch call, or a path that must see each write: the simulator's checked registers, the tests' fault proxy)."""
    errs = []
    for r, v in regs:
        try:
            vcpu.set_reg(r, v)
            errs.append(0)
        except KvmError as e:
            errs.append(e.errno_value)
    return errs


def reg_list_handshake(vcpu: "Vcpu") -> list[int]:
    """KVM_GET_REG_LIST: the sizing handshake over the vCPU's one-ioctl get_reg_list."""
    return sizing_handshake("KVM_GET_REG_LIST", vcpu.get_reg_list)


class Vcpu(Protocol):
    index: int

    def init(self, init: VcpuInit) -> None: ...
    def finalize(self, feature: int) -> None: ...
    def get_reg(self, reg_id: int) -> int: ...
    def set_reg(self, reg_id: int, value: int) -> None: ...
    def get_reg_list(self, capacity: int) -> list[int]: ...   # one ioctl; E2BIG with .required
    def reg_list(self) -> list[int]: ...                       # the E2BIG sizing handshake
    def get_regs(self, ids: Sequence[int]) -> tuple[RegisterSet, list[int]]: ...  # (values; 0 where errno), errnos
    def set_regs(self, regs: RegisterSet) -> list[int]: ...                      # one errno per register
    def run_once(self) -> str: ...
    def close(self) -> None: ...


class Vm(Protocol):
    def check_extension(self, cap: int) -> int: ...
    def enable_cap(self, cap: int, args: Sequence[int] = ()) -> None: ...
    def create_vcpu(self, index: int) -> Vcpu: ...
    def preferred_target(self) -> VcpuInit: ...
    def writable_masks(self, range_: int = 0) -> list[int]: ...
    def close(self) -> None: ...


class Backend(Protocol):
    kind: str            # "kvm" | "sim"
    arch: str            # "aarch64" | "x86_64"

    def api_version(self) -> int: ...
    def check_extension(self, cap: int) -> int: ...
    def create_vm(self, vm_type: int = 0) -> Vm: ...
    def kernel_release(self) -> str: ...
    def cpu_midrs(self) -> list[int]: ...


def create_vcpus(vm: Vm, arch: str, indices: Iterable[int], init: VcpuInit | None = None,
                 sve_vls: Mapping[int, int] | None = None) -> dict[int, Vcpu]:
    """The one way a vCPU is made, in KVM's order: KVM_CREATE_VCPU for every index, then on arm64
    KVM_ARM_VCPU_INIT (`init`, default: the preferred target with PSCI 0.2), and for an SVE vCPU its vector lengths
    (KVM_REG_ARM64_SVE_VLS from `sve_vls[index]`, else the host's) before KVM_ARM_VCPU_FINALIZE. Other
    architectures: create only."""
    vcpus = {i: vm.create_vcpu(i) for i in indices}
    if arch != "aarch64":
        return vcpus
    if init is None:
        init = VcpuInit(vm.preferred_target().target, (abi.VCPU_FEATURES["PSCI_0_2"],))
    for i, vcpu in vcpus.items():
        vcpu.init(init)
        if abi.KVM_ARM_VCPU_SVE in init.features:
            vls = (sve_vls or {}).get(i)
            if vls is not None:
                vcpu.set_reg(regid.SVE_VLS, vls)          # must precede finalize
            vcpu.finalize(abi.KVM_ARM_VCPU_SVE)
    return vcpus


def threaded(backend: Backend) -> bool:
    """Whether apply_vm_async spreads vCPUs over worker threads: on the real /dev/kvm binding, whose batch
    calls release the GIL for the ioctl loop. The simulated host is pure Python (threads bring nothing)."""
    return getattr(backend, "kind", "") == "kvm"


def worker_threads() -> int:
    """How many worker threads a VM's ioctls are spread over: the CPUs this process may run on (its affinity - a
    cgroup cpuset or taskset - not the machine's count)."""
    import os
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
