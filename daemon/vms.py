"""The VMs this daemon holds, and the one rule that matters: a VM is runnable on at most one host.

States: running -> paused (migration out) -> released (destination committed; never runnable here again,
        vCPU state kept until the operator removes it) | running again (migration failed: resumed)
        incoming (applied and verified, paused) -> running (source released it) | in-doubt (the link broke
        after we committed: kept paused, never run and never discarded without an operator)
Pausing is bookkeeping here: this daemon does not run guest code; the VMM that does asks before running.

The VM handle is deliberately abstract: a ManagedVm holds a backend `Vm` and `Vcpu` objects (kvm/backend.py
protocols). They come from create() (the daemon's own VM: demo, tests, orchestrator createVm) or from the apply
engine (incoming). These VMs die with the daemon's process: their KVM fds cannot outlive it.

A VM that an external VMM (QEMU, cloud-hypervisor, Firecracker) runs can never be held here: KVM answers EIO to
every VM, vCPU and device ioctl from a process other than the VM's creator (virt/kvm/kvm_main.c,
`kvm->mm != current->mm`; measured on real 6.12 and 7.3 kernels for a forked child, pidfd_getfd(2) and an fd
received over SCM_RIGHTS). Such VMs are migrated by their VMM with the plan applied inside it by the invariantd
agent (daemon/vmm/), and do not depend on this daemon staying up.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Sequence

from ..protocol import kvmabi as abi
from ..protocol import regid
from .journal import Journal
from .kvm.backend import Backend, Vcpu, VcpuInit, Vm, create_vcpus


class VmState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    RELEASED = "released"
    INCOMING = "incoming"
    IN_DOUBT = "in-doubt"


class VmStateError(RuntimeError):
    pass


RUNNABLE = frozenset({VmState.RUNNING})


@dataclass
class ManagedVm:
    vm_id: str
    vm: Vm
    vcpus: dict[int, Vcpu]
    init: VcpuInit | None
    state: VmState = VmState.RUNNING
    history: list[str] = field(default_factory=list)
    origin: str = "created"                 # created | incoming | adopted (see the module note)
    journal: Journal | None = None          # the registry's: every state change is written there first
    migration: str = ""                     # the migration that last moved it (journal)
    peer: str = ""
    n_vcpus: int = 0                        # kept when the vCPUs are freed (free())
    freed: str = ""                         # why its KVM state was freed ("" = held)

    def __post_init__(self) -> None:
        self.n_vcpus = self.n_vcpus or len(self.vcpus)

    def _to(self, new: VmState, allowed: Sequence[VmState]) -> None:
        if self.state not in allowed:
            raise VmStateError(f"VM {self.vm_id}: cannot go {self.state.value} -> {new.value}")
        if self.journal is not None:
            self.journal.vm(self.vm_id, new.value, self.origin, self.migration, self.peer)
        self.history.append(f"{self.state.value}->{new.value}")
        self.state = new

    def pause(self) -> None:
        self._to(VmState.PAUSED, (VmState.RUNNING,))

    def resume(self) -> None:
        """Source after a failed migration, or destination once the source released the VM."""
        self._to(VmState.RUNNING, (VmState.PAUSED, VmState.INCOMING, VmState.IN_DOUBT))

    def release(self) -> None:
        self._to(VmState.RELEASED, (VmState.PAUSED,))

    def in_doubt(self) -> None:
        self._to(VmState.IN_DOUBT, (VmState.INCOMING,))

    def reclaim(self) -> None:
        """A released VM runs here again: only when its peer confirmed it holds no copy (resolve)."""
        if self.freed:
            raise VmStateError(f"VM {self.vm_id}: nothing to resume here: {self.freed}")
        self._to(VmState.RUNNING, (VmState.RELEASED,))

    def free(self, why: str) -> None:
        """A released VM whose destination acknowledged it (it runs there): its KVM state goes (the record stays,
        its history and migration, until removed). Resuming that pause-time copy later would run a stale guest."""
        if self.state is not VmState.RELEASED:
            raise VmStateError(f"VM {self.vm_id}: only a released VM's state is freed, not a {self.state.value} one")
        self.close()
        self.vcpus = {}
        self.freed = why
        if self.journal is not None:
            self.journal.vm(self.vm_id, self.state.value, detail=f"state freed: {why}")

    @property
    def runnable(self) -> bool:
        return self.state in RUNNABLE

    def close(self) -> None:
        try:
            self.vm.close()
        except Exception:
            pass


#: what a peer may hold of a VM and still let a copy here run / be discarded (VmRegistry.resolve)
PEER_HOLDS_IT = frozenset({"running", "paused", "incoming", "in-doubt"})
UNRESOLVED = frozenset({VmState.IN_DOUBT, VmState.RELEASED})


def resolution(here: VmState, peer_state: str | None, action: str) -> str:
    """Whether the operator's `action` on a VM this daemon holds in `here` is safe, given what its peer says it holds
    (`peer_state`: its state there, None = the peer has no such VM). "" = safe, else why not. The rule keeps a VM
    runnable on exactly one host: resume here only when the peer holds no copy that could run (it released it or
    never had it: the daemon's own VMs die with its process); discard here only when the peer runs it."""
    if here not in UNRESOLVED:
        return f"the VM is {here.value} here: only an in-doubt or released VM needs resolving"
    if action == "resume":
        if peer_state in PEER_HOLDS_IT:
            return (f"the peer holds it {peer_state}: resume it there" if peer_state != "running" else
                    "the peer runs it: discard the copy here instead")
        return ""
    if action == "discard":
        if peer_state != "running":
            return (f"the peer {'has no such VM' if peer_state is None else 'holds it ' + peer_state}: discarding "
                    f"here could leave it runnable nowhere")
        return ""
    return f"unknown action {action!r} (resume | discard)"


#: a source's phases from which the destination may run the VM (journal.py: written before the Commit goes out)
RELEASED_PHASES = frozenset({"released", "acked"})


def settle(role: str, peer_outcome: str, peer_phase: str, peer_vm: str | None) -> tuple[str, str]:
    """What a daemon holding an unresolved VM of migration X does once its peer answered about X (Inquiry,
    protocol 5). role: ours in X (source: our VM is released, its Commit unacknowledged; destination: our VM is
    in-doubt, paused after our Commit). The peer's journal outcome and phase for X ("" = no record), and its VM's
    state now (None = it holds none). Returns (action, why): resume (run our copy) | discard (drop our copy) |
    committed (source: the destination runs it) | wait (ask again later; `why` names what we wait for).
    Write-ahead journaling makes each answer a floor on what the peer did, so the rule keeps a VM runnable on
    exactly one host."""
    if role == "source":
        if peer_outcome == "committed" or peer_phase == "running" or peer_vm == "running":
            return "committed", "the destination runs the VM (or ran it)"
        if peer_outcome in ("lost", "aborted") and peer_phase != "running":
            return "resume", (f"the destination never ran it ({peer_outcome} at {peer_phase or 'no phase'}): ours is "
                              f"the only copy")
        if not peer_outcome:
            return "wait", "the destination has no record of this migration: an operator must decide (resolve)"
        return "wait", f"the destination holds it {peer_outcome} at {peer_phase}: it decides once it asks us"
    if peer_phase in RELEASED_PHASES or peer_outcome == "committed":
        return "resume", "the source released the VM"
    if peer_outcome == "aborted":
        return "discard", "the source kept the VM (it aborted this migration and resumed it)"
    if peer_outcome == "lost":
        return "resume", "the source died holding the VM without releasing it: ours is the only copy"
    if not peer_outcome:
        if peer_vm == "running":
            return "discard", "the source has no record of this migration and runs the VM"
        return "wait", "the source has no record of this migration: an operator must decide (resolve)"
    return "wait", f"the source's migration is still {peer_outcome} at {peer_phase}"


class VmRegistry:
    """journal: where the VMs' whereabouts and the migrations are written (daemon/journal.py); in memory when
    not given (nothing survives a restart)."""

    def __init__(self, backend: Backend, journal: Journal | None = None) -> None:
        self.backend = backend
        self.journal = journal if journal is not None else Journal()
        self.vms: dict[str, ManagedVm] = {}

    def create(self, vm_id: str, vcpus: int = 1, init: VcpuInit | None = None,
               regs: dict[int, Sequence[tuple[int, int]]] | None = None) -> ManagedVm:
        """A fresh running VM on this host (demo / tests: the VM to migrate out)."""
        if vm_id in self.vms:
            raise VmStateError(f"VM {vm_id} exists")
        vm = self.backend.create_vm()
        try:
            if init is None and self.backend.arch == "aarch64":
                init = VcpuInit(vm.preferred_target().target, (abi.VCPU_FEATURES["PSCI_0_2"],))
            cpus = create_vcpus(vm, self.backend.arch, range(vcpus), init,
                                {i: v for i, rs in (regs or {}).items() for r, v in rs if r == regid.SVE_VLS})
            sve = init is not None and abi.KVM_ARM_VCPU_SVE in init.features
            for i, rs in (regs or {}).items():
                for r, val in rs:
                    if not (sve and r == regid.SVE_VLS):
                        cpus[i].set_reg(r, val)
        except BaseException:
            vm.close()
            raise
        m = ManagedVm(vm_id, vm, cpus, init, journal=self.journal)
        self.journal.vm(vm_id, m.state.value, m.origin)
        self.vms[vm_id] = m
        return m

    def adopt(self, vm_id: str, vm: Vm, vcpus: dict[int, Vcpu], init: VcpuInit | None,
              state: VmState = VmState.INCOMING, origin: str = "incoming", migration: str = "",
              peer: str = "") -> ManagedVm:
        if vm_id in self.vms and self.vms[vm_id].state is not VmState.RELEASED:
            raise VmStateError(f"VM {vm_id} already held here in state {self.vms[vm_id].state.value}")
        old = self.vms.pop(vm_id, None)
        if old is not None:
            old.close()                     # a released VM migrating back: its stale handle goes
        m = ManagedVm(vm_id, vm, vcpus, init, state, origin=origin, journal=self.journal, migration=migration,
                      peer=peer)
        self.journal.vm(vm_id, state.value, origin, migration, peer)
        self.vms[vm_id] = m
        return m

    def get(self, vm_id: str) -> ManagedVm:
        try:
            return self.vms[vm_id]
        except KeyError:
            raise VmStateError(f"no VM {vm_id!r} here (known: {', '.join(sorted(self.vms)) or 'none'})") from None

    def remove(self, vm_id: str, why: str = "removed") -> None:
        m = self.vms.pop(vm_id, None)
        if m is not None:
            self.journal.vm(vm_id, "removed", detail=f"{why} (was {m.state.value})")
            m.close()

    def forget(self, vm_id: str) -> None:
        """The operator's remove: a running VM of this daemon's own, or a released one (its state was kept for
        inspection). A VM in a migration or in doubt is refused: that is resolve's."""
        m = self.get(vm_id)
        if m.state not in (VmState.RUNNING, VmState.RELEASED):
            raise VmStateError(f"VM {vm_id} is {m.state.value}: " + (
                "resolve it first (resolve --resume | --discard)" if m.state is VmState.IN_DOUBT else
                "it is in a migration"))
        self.remove(vm_id)

    def resolve(self, vm_id: str, peer_state: str | None, action: str) -> ManagedVm:
        m = self.get(vm_id)
        why = resolution(m.state, peer_state, action)
        if why:
            raise VmStateError(f"VM {vm_id}: cannot {action} here: {why}")
        if action == "discard":
            self.remove(vm_id, "discarded by resolution")
        elif m.state is VmState.RELEASED:
            m.reclaim()
        else:
            m.resume()
        return m

    MAX_FREED = 256

    def free_released(self, vm_id: str, why: str) -> None:
        """Free a released VM's KVM state (ManagedVm.free); at most MAX_FREED such records are kept, the oldest
        dropped first (the journal keeps every one)."""
        m = self.vms.get(vm_id)
        if m is None or m.freed:
            return
        m.free(why)
        freed = [n for n, x in self.vms.items() if x.freed]
        for n in freed[:-self.MAX_FREED]:
            del self.vms[n]

    def close(self) -> None:
        """The daemon stops: its own VMs die with the process. The journal says so (state `lost`), so that a
        peer asking later learns that no copy is left here."""
        for vm_id, m in list(self.vms.items()):
            self.journal.vm(vm_id, "lost", detail=f"died {m.state.value} when the daemon stopped")
            self.vms.pop(vm_id).close()
