"""A KVM backend that fails on purpose (FaultBackend: errnos per register and call) over the simulated host, and the
register sets the apply tests move."""
from __future__ import annotations

from support.fixtures import synthetic_doc
from invariantd.daemon.readback import read_vm
from invariantd.daemon.kvm.backend import set_one_by_one
from invariantd.daemon.kvm.errors import KvmError
from invariantd.daemon.sim.host import SimHost, eras
from invariantd.protocol import regid
from invariantd.protocol.regset import RegisterSet
from support.hostdocs import CAT


MIDR = CAT.id_of("MIDR_EL1")
ISAR0 = CAT.id_of("ID_AA64ISAR0_EL1")
TCR2 = CAT.id_of("TCR2_EL1")
SCTLR = CAT.id_of("SCTLR_EL1")
UNNAMED_ID = regid.sysreg(3, 0, 0, 7, 7)


def host(kernel: str, era: str | None = None, **kw) -> SimHost:
    return SimHost(doc=synthetic_doc(kernel, **kw), era=eras()[era] if era else None)


def sim_vcpus(kernel: str = "6.12", n: int = 2, era: str | None = None, **kw) -> dict:
    """n initialised vCPUs of one VM on a synthetic simulated host."""
    h = host(kernel, era, **kw)
    vm = h.create_vm()
    vcpus = {}
    for i in range(n):
        v = vm.create_vcpu(i)
        v.init(h.init)
        vcpus[i] = v
    return vcpus


def source_regs(kernel: str = "6.12", n: int = 2, era: str | None = None, **kw) -> dict[int, list[tuple[int, int]]]:
    return read_vm(sim_vcpus(kernel, n, era, **kw))


def patch(regsets, reg_id, value):
    return {i: [(r, value if r == reg_id else v) for r, v in regs] for i, regs in regsets.items()}


def actions(events):
    return [(e.register, e.errno, e.action) for e in events]


# --- fault-injecting wrappers (injected, never monkeypatched) -------------------------------------
class Proxy:
    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)


class FaultVcpu(Proxy):
    """set_reg/set_regs return queued errnos for chosen registers; get_regs may fold bits; calls are logged
    (sets in `log`, get_regs in `reads`)."""

    def __init__(self, inner, faults, fold, log, reads):
        super().__init__(inner)
        self.index, self.faults, self.fold, self.log, self.reads = inner.index, faults, fold, log, reads

    def set_reg(self, r, v):
        q = self.faults.get(r)
        if q:
            raise KvmError("KVM_SET_ONE_REG", q.pop(0), r)
        self.log.append(("set", self.index, r))
        return self._inner.set_reg(r, v)

    def set_regs(self, regs):
        return set_one_by_one(self, regs)

    def get_regs(self, ids):
        self.reads.append((self.index, tuple(ids)))
        regs, errs = self._inner.get_regs(ids)
        return RegisterSet.from_values(ids, [v & ~self.fold.get(r, 0) for r, v in regs]), errs


class FaultVm(Proxy):
    def __init__(self, inner, backend):
        super().__init__(inner)
        self.backend, self.closed = backend, False

    def create_vcpu(self, i):
        return FaultVcpu(self._inner.create_vcpu(i), self.backend.faults, self.backend.fold, self.backend.log,
                         self.backend.reads)

    def close(self):
        self.closed = True
        self._inner.close()


class FaultBackend(Proxy):
    def __init__(self, inner, faults=None, fold=None, ran=0):
        super().__init__(inner)
        self.kind, self.arch = inner.kind, inner.arch
        self.faults, self.fold, self.ran, self.log, self.vms = faults or {}, fold or {}, ran, [], []
        self.reads: list[tuple[int, tuple[int, ...]]] = []     # (vCPU, ids) of every get_regs

    def create_vm(self, vm_type=0):
        inner = self._inner.create_vm(vm_type)
        if len(self.vms) < self.ran:
            inner.has_ran = True            # "something ran a vCPU": ID registers are frozen on this VM
        vm = FaultVm(inner, self)
        self.vms.append(vm)
        return vm
