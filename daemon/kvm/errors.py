from __future__ import annotations

import errno as _errno
import os

from ...protocol import kvmabi
from ...protocol.catalog import catalog

_HINTS = {
    _errno.EINVAL: "the destination kernel refused the value: compare it with the destination's (invariantctl probe) "
                   "and let the plan lower or override the field",
    _errno.ENOENT: "the register does not exist on this kernel/vCPU configuration (kernel drift or a feature not enabled)",
    _errno.EBUSY: "ID registers are frozen once a vCPU has run: set them before the first KVM_RUN",
    _errno.ENOEXEC: "initialise the vCPU with KVM_ARM_VCPU_INIT first",
    _errno.EPERM: "SVE registers need KVM_ARM_VCPU_FINALIZE (and VLS must be set before it)",
    _errno.E2BIG: "the register-list buffer is too small",
    _errno.EACCES: "no permission on /dev/kvm: run as root or join the kvm group",
}


class KvmError(OSError):
    """One failed KVM call: the ioctl, the register (name and id in hex) where there is one, the errno."""

    def __init__(self, op: str, err: int, reg_id: int | None = None, detail: str = "",
                 required: int | None = None) -> None:
        self.op = op
        self.required = required          # KVM_GET_REG_LIST E2BIG: the count the kernel asked for
        self.errno_value = err
        self.reg_id = reg_id
        self.reg_name = catalog().name(reg_id) if reg_id is not None else None
        self.detail = detail
        super().__init__(err, str(self))

    @property
    def errno_name(self) -> str:
        return kvmabi.errno_name(self.errno_value)

    @property
    def hint(self) -> str:
        if self.errno_value == kvmabi.EINVARIANT:
            return "invariant register differs from this host: re-plan with the destination's value or cap 239"
        return _HINTS.get(self.errno_value, "")

    def __str__(self) -> str:
        reg = f" {self.reg_name} ({self.reg_id:#018x})" if self.reg_id is not None else ""
        msg = ("invariant register mismatch" if self.errno_value == kvmabi.EINVARIANT
               else os.strerror(self.errno_value))
        s = f"{self.op}{reg}: {self.errno_name} ({msg})"
        if self.detail:
            s += f": {self.detail}"
        if self.hint:
            s += f" — {self.hint}"
        return s

    def __reduce__(self):
        return (KvmError, (self.op, self.errno_value, self.reg_id, self.detail, self.required))
