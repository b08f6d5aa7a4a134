"""Apply a VM's vCPU register sets on this host: the executor of an ApplyProgram (protocol/program.py).

    result = apply_vm(backend, {0: [(reg_id, value), ...], 1: [...]}, compile_plan(plan, vm))

The program - the plan compiled, the only place the plan is interpreted - says per register which value to
write (the planned one, written directly: one ioctl) and what to do per errno when KVM refuses it; this module
only carries that out. Order: create the VM (enabling KVM_CAP_ARM_WRITABLE_IMP_ID_REGS first when the program
says so), create and initialise every vCPU, then phase "vm-wide" (ID / imp-ID / cache / CCSIDR / FW registers)
on every vCPU before phase "state" (everything else) on any vCPU. Each phase is one batch call per vCPU
(vcpu.set_regs: one errno per register); only the registers that failed are then handled one by one, by the
program's Action for (register, errno):

    ACCEPT_DESTINATION   GET the destination value, confirm it differs, keep it
    WRITE_FALLBACK       write the program's fallback value
    REPLAY               (EBUSY) ordering fault: close the VM, recreate it, replay everything, once
    DROP                 (ENOENT) the register does not exist here and the guest cannot reach it
    RETRY                (EINTR / EAGAIN) bounded retry of the same value
    KEEP_IF_EQUAL        (generic path) the destination already holds the value
    FAIL                 abort, naming register, id, errno and what to do

Afterwards every written register is read back and compared with what was written (KVM can fold bits).
Every planned override, retry, drop and replay is recorded as an ApplyEvent (metrics and logs use them); a
planned override is an override (errno "-"), not a failed write.
On any abort the VM is closed: a half-applied VM is never handed out.
"""
from __future__ import annotations

import enum
import errno as E
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from ..protocol import kvmabi as abi
from ..protocol import regid
from ..protocol.catalog import catalog
from ..protocol.program import ID_LIKE_CLASSES, Action, ApplyProgram
from .kvm.backend import Backend, Vcpu, VcpuInit, Vm, create_vcpus, threaded, worker_threads
from .kvm.errors import KvmError
from ..protocol.regset import RegisterSet
from .readback import Mismatch, adjusted, compare, read_vm, verify

# classes applied VM-wide, before any other register (and before any vCPU could run)
VM_WIDE_CLASSES = ID_LIKE_CLASSES




class EventAction(enum.StrEnum):
    """What the engine did about one register (an ApplyEvent's action; metrics and logs print the value)."""
    OVERRIDE_PLAN = "override-plan"                  # the program's value written instead of the source's
    OVERRIDE_DESTINATION = "override-destination"    # the destination's own value kept
    DROP_RESET = "drop-reset"                        # absent here, and the guest cannot reach it / it holds a reset value
    RETRY_TRANSIENT = "retry-transient"
    REPLAY = "replay"                                # EBUSY: the VM recreated, everything replayed once
    KEEP_EQUAL = "keep-equal"                        # refused, but the destination already holds the value
    ABORT = "abort"
    READBACK_ADJUSTED = "readback-adjusted"          # a read-back difference within KVM's known rules (reported)


#: the actions that change what the guest sees (metrics: invariantd_invariant_overrides)
OVERRIDES = frozenset({EventAction.OVERRIDE_DESTINATION, EventAction.OVERRIDE_PLAN, EventAction.DROP_RESET})


@dataclass(frozen=True, slots=True)
class ApplyEvent:
    """One retry / override / drop / replay / abort: what metrics count and logs print."""
    vcpu: int | None
    register: str
    reg_id: int
    errno: str                  # errno name (EINVARIANT, EINVAL, ...)
    action: EventAction
    fields: tuple[str, ...] = ()
    detail: str = ""

    def as_dict(self) -> dict:
        return {"vcpu": self.vcpu, "register": self.register, "id": f"{self.reg_id:#018x}", "errno": self.errno,
                "action": self.action, "fields": list(self.fields), "detail": self.detail}


class ApplyError(Exception):
    """Applying stopped: register (name, id in hex), errno name, the action tried, what to do.

    The VM was closed. `events` holds every retry / override up to and including the abort.
    """

    def __init__(self, register: str | None, reg_id: int | None, errno_name: str, action: str, hint: str,
                 *, vcpu: int | None = None, phase: str = "", events: Sequence[ApplyEvent] = (),
                 detail: str = "") -> None:
        self.register, self.reg_id, self.errno_name = register, reg_id, errno_name
        self.action, self.hint, self.vcpu, self.phase = action, hint, vcpu, phase
        self.events = list(events)
        self.detail = detail
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"vCPU {self.vcpu} " if self.vcpu is not None else ""
        reg = f"{self.register} ({self.reg_id:#018x})" if self.reg_id is not None else "VM setup"
        s = f"apply {self.phase or 'setup'}: {where}{reg}: {self.errno_name}; tried: {self.action}"
        if self.detail:
            s += f" ({self.detail})"
        return s + f" — {self.hint}" if self.hint else s

    def __reduce__(self):
        return (_rebuild_apply_error, (self.register, self.reg_id, self.errno_name, self.action, self.hint,
                                       self.vcpu, self.phase, self.events, self.detail))


def _rebuild_apply_error(register, reg_id, errno_name, action, hint, vcpu, phase, events, detail):
    return ApplyError(register, reg_id, errno_name, action, hint, vcpu=vcpu, phase=phase, events=events,
                      detail=detail)


@dataclass
class ApplyResult:
    vm: Vm
    vcpus: dict[int, Vcpu]
    written: dict[int, dict[int, int]]          # vcpu -> reg_id -> value actually written
    dropped: dict[int, list[int]]               # vcpu -> reg ids dropped (ENOENT at reset value)
    events: list[ApplyEvent]
    mismatches: list[Mismatch]
    replays: int = 0

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def close(self) -> None:
        _close_vm(self.vm)


class _Replay(Exception):
    def __init__(self, vcpu: int, reg_id: int) -> None:
        self.vcpu, self.reg_id = vcpu, reg_id


def _close_vm(vm: Vm | None) -> None:
    if vm is None:
        return
    try:
        vm.close()
    except Exception:      # closing is best effort; the original failure matters more
        pass


def _arm64(reg_id: int) -> bool:
    return reg_id & regid.KVM_REG_ARCH_MASK == regid.KVM_REG_ARM64


def vm_wide(reg_id: int) -> bool:
    return catalog().reg_class(reg_id) in VM_WIDE_CLASSES


def _changed_fields(reg_id: int, a: int, b: int) -> tuple[str, ...]:
    return tuple(f.name for f in catalog().fields_of(reg_id) if f.raw(a) != f.raw(b))


def _set_regs(vcpu: Vcpu, ids: list[int], vals: list[int]) -> list[int]:
    """One batch write. A value that does not fit its register is refused as KVM refuses it (EINVAL), without
    a write; the others go as one RegisterSet."""
    bad = [k for k, (r, v) in enumerate(zip(ids, vals)) if v < 0 or v >> (8 * regid.size_bytes(r))]
    if not bad:
        return vcpu.set_regs(RegisterSet.from_values(ids, vals))
    keep = [k for k in range(len(ids)) if k not in set(bad)]
    errs = dict(zip(keep, vcpu.set_regs(RegisterSet.from_values([ids[k] for k in keep], [vals[k] for k in keep]))))
    return [errs.get(k, E.EINVAL) for k in range(len(ids))]


class _Applier:
    """Carries out one program's decisions for the registers a batch write refused."""

    def __init__(self, program: ApplyProgram, events: list[ApplyEvent]) -> None:
        self.program, self.events = program, events
        self.cat = catalog()
        self.phase = ""

    def _event(self, vcpu: int, reg_id: int, err: int | None, action: str, fields: tuple[str, ...] = (),
               detail: str = "") -> None:
        self.events.append(ApplyEvent(vcpu, self.cat.name(reg_id), reg_id, "-" if err is None else abi.errno_name(err),
                                      action, fields, detail))

    def _abort(self, vcpu: int, reg_id: int, err: int, action: str, hint: str, detail: str = "") -> ApplyError:
        self._event(vcpu, reg_id, err, EventAction.ABORT, detail=f"after {action}" + (f": {detail}" if detail else ""))
        return ApplyError(self.cat.name(reg_id), reg_id, abi.errno_name(err), action, hint, vcpu=vcpu,
                          phase=self.phase, events=self.events, detail=detail)

    def batch(self, vcpu: Vcpu, regs: Sequence[tuple[int, int]]) -> tuple[dict[int, int], list[int], bool]:
        """-> (written, dropped, whole): whole = a RegisterSet the kernel took entirely as given."""
        written: dict[int, int] = {}
        dropped: list[int] = []
        if not regs:
            return written, dropped, False
        prog = self.program
        as_given = isinstance(regs, RegisterSet) and not prog.touches(regs.ids)
        if as_given:
            vals = regs.values()                           # nothing planned here: written as the source read it
            errs = vcpu.set_regs(regs)
            if not any(errs):                              # the common case: every register taken as given
                written.update(zip(regs.ids, vals))
                return written, dropped, True
        else:
            vals = [prog.value_to_write(r, v) for r, v in regs]
            errs = _set_regs(vcpu, [r for r, _ in regs], vals)
        for (r, given), v, e in zip(regs, vals, errs):
            if v != given and not (e and prog.decide(r, v, e) is Action.DROP):
                op = prog.op(r)
                self._event(vcpu.index, r, None, EventAction.OVERRIDE_PLAN, _changed_fields(r, given, v),
                            f"{given:#x} -> {v:#x} (plan: {op.verdict.name.lower() if op else '?'})")
            if not e:
                written[r] = v
                continue
            got = self.one(vcpu, r, v, e)
            if got is None:
                dropped.append(r)
            else:
                written[r] = got
        # a refused register the destination already held (the generic EINVAL rule) leaves the set as given
        return written, dropped, as_given and not dropped and all(
            written[r] == v for r, v, e in zip(regs.ids, vals, errs) if e)

    def _destination(self, vcpu: Vcpu, r: int, err: int) -> int:
        try:
            return vcpu.get_reg(r)
        except KvmError as e:
            raise self._abort(vcpu.index, r, e.errno_value, "get destination value",
                              "could not read the destination's value to compare",
                              detail=f"first refusal {abi.errno_name(err)}") from None

    def one(self, vcpu: Vcpu, r: int, v: int, err: int) -> int | None:
        """Carry out the program's action for one refused register; returns the value finally written, None
        when dropped."""
        idx, prog = vcpu.index, self.program
        act = prog.decide(r, v, err)
        if act is Action.RETRY:
            for i in range(prog.transient_retries):
                self._event(idx, r, err, EventAction.RETRY_TRANSIENT, detail=f"attempt {i + 2}")
                try:
                    vcpu.set_reg(r, v)
                    return v
                except KvmError as e:
                    if prog.decide(r, v, e.errno_value) is not Action.RETRY:
                        return self.one(vcpu, r, v, e.errno_value)
                    err = e.errno_value
            raise self._abort(idx, r, err, f"retry-transient x{prog.transient_retries}",
                              "the kernel kept returning a transient error; retry the migration later")
        if act is Action.REPLAY:
            self._event(idx, r, err, EventAction.REPLAY, detail="ID registers frozen: recreate the VM and replay in order")
            raise _Replay(idx, r)
        if act is Action.DROP:
            op = prog.op(r)
            why = "the plan drops it (the guest cannot reach it)" if op is not None and not op.resets \
                else f"value {v:#x} is a reset value"
            self._event(idx, r, err, EventAction.DROP_RESET, detail=f"absent here; {why}")
            return None
        if act in (Action.ACCEPT_DESTINATION, Action.WRITE_FALLBACK):
            dest = self._destination(vcpu, r, err)
            if act is Action.ACCEPT_DESTINATION and err == E.EINVAL and dest == v:
                raise self._abort(idx, r, err, "confirm difference",
                                  "the destination already holds this value, so the refusal is not an ID "
                                  "mismatch; check the vCPU features and kernel log")
            op = prog.op(r)
            target = dest if act is Action.ACCEPT_DESTINATION else op.fallback
            action = EventAction.OVERRIDE_DESTINATION if act is Action.ACCEPT_DESTINATION else EventAction.OVERRIDE_PLAN
            try:
                vcpu.set_reg(r, target)
            except KvmError as e:
                if prog.decide(r, target, e.errno_value) is Action.REPLAY:
                    return self.one(vcpu, r, v, e.errno_value)
                raise self._abort(idx, r, e.errno_value, action,
                                  f"the kernel refused the program's value {target:#x} too; re-plan against "
                                  f"this host", detail=f"first refusal {abi.errno_name(err)}") from None
            self._event(idx, r, err, action, _changed_fields(r, v, target), detail=f"{v:#x} -> {target:#x}")
            return target
        if act is Action.KEEP_IF_EQUAL:
            # generic path (x86 answers EINVAL for every refusal): when the destination already holds the value
            # the state is there (e.g. a PV MSR whose write needs an in-kernel LAPIC, written 0 = disabled)
            dest = self._destination(vcpu, r, err)
            if dest == v:
                self._event(idx, r, err, EventAction.KEEP_EQUAL, detail=f"write refused; the destination already holds {v:#x}")
                return v
            raise self._abort(idx, r, err, "confirm difference",
                              f"the kernel refused the source value {v:#x}; the destination holds {dest:#x} "
                              f"(no plan override on {regid.decode(r).arch}: a vCPU feature or in-kernel device "
                              f"the source VM had may be missing here)")
        idlike = err in (E.EINVAL, abi.EINVARIANT) and self.cat.reg_class(r) in ID_LIKE_CLASSES
        raise self._abort(idx, r, err, "none: the program allows no override" if idlike else "none",
                          self._fail_hint(vcpu, r, v, err))

    def _fail_hint(self, vcpu: Vcpu, r: int, v: int, err: int) -> str:
        if err == E.ENOENT:
            resets = self.program.catalog_resets(r)
            why = (f"its value {v:#x} is not a reset value ({', '.join(f'{x:#x}' for x in resets)}): the guest "
                   f"uses it" if resets else "it is not a known drift register the plan drops, so dropping it could lose guest state")
            return (f"the register does not exist on this kernel and {why}; migrate to a host whose kernel "
                    f"offers it")
        if (err == abi.EINVARIANT or err == E.EINVAL) and self.cat.reg_class(r) in ID_LIKE_CLASSES:
            try:
                dest = vcpu.get_reg(r)
            except KvmError:
                return f"the kernel refused {v:#x}; re-plan against this host (override, per-field merge or cap 239)"
            fields = _changed_fields(r, v, dest)
            return (f"the kernel refused {v:#x}; this host holds {dest:#x}"
                    + (f" (differs in {', '.join(fields)})" if fields else "")
                    + "; re-plan against this host (override, per-field merge or cap 239)")
        return KvmError("KVM_SET_ONE_REG", err, r).hint or "no retry is defined for this errno"


def _init_vcpus(backend: Backend, vm: Vm, indices: Iterable[int], init: VcpuInit | None,
                regsets: Mapping[int, Sequence[tuple[int, int]]],
                features: Sequence[int] | None = None) -> dict[int, Vcpu]:
    indices = list(indices)
    if init is None and features is not None and backend.arch == "aarch64":
        init = VcpuInit(vm.preferred_target().target, tuple(features))
    vls = {i: v for i in indices for r, v in regsets.get(i, ()) if r == regid.SVE_VLS}
    return create_vcpus(vm, backend.arch, indices, init, vls)


def readback_events(notes) -> list[ApplyEvent]:
    """Read-back differences within KVM's known rules (readback.adjusted) as "readback-adjusted" events: reported
    (logs, the migration result), not hidden and not counted as failed writes."""
    return [ApplyEvent(m.vcpu, m.register, m.reg_id, "-", EventAction.READBACK_ADJUSTED, (), why) for m, why in notes]


class _Run:
    """One attempt of apply_vm: setup, then the phases, then the read-back. Each step is synchronous; the
    per-vCPU steps (phase_vcpu, verify_vcpu) touch one vCPU only, so apply_vm_async runs them in threads."""

    def __init__(self, backend: Backend, regsets: Mapping[int, Sequence[tuple[int, int]]], program: ApplyProgram,
                 events: list[ApplyEvent], init: VcpuInit | None, features: Sequence[int] | None,
                 vm_type: int) -> None:
        self.backend, self.regsets, self.program, self.init, self.features = backend, regsets, program, init, features
        self.vm_type = vm_type
        self.indices = sorted(regsets)
        self.ap = _Applier(program, events)
        self.vm: Vm | None = None
        self.vcpus: dict[int, Vcpu] = {}
        self.written: dict[int, dict[int, int]] = {i: {} for i in self.indices}
        self.dropped: dict[int, list[int]] = {i: [] for i in self.indices}
        feats = init.features if init is not None else (features or ())
        self.skip = {regid.SVE_VLS} if abi.KVM_ARM_VCPU_SVE in feats else set()
        self._split: dict[tuple[int, ...], tuple[frozenset, ...]] = {}
        self._state_pos: dict[bytes, tuple[int, ...] | None] = {}
        self.whole: dict[int, RegisterSet] = {}     # vCPU -> its state-phase set, taken whole as given
        self._taken: dict[bytes, frozenset] = {}

    def setup(self) -> None:
        ap, program = self.ap, self.program
        ap.phase = "setup"
        try:
            self.vm = self.backend.create_vm(self.vm_type)
            if program.enable_cap239:
                self.vm.enable_cap(abi.KVM_CAP_ARM_WRITABLE_IMP_ID_REGS)
            self.vcpus = _init_vcpus(self.backend, self.vm, self.indices, self.init, self.regsets, self.features)
        except KvmError as e:
            raise ApplyError(e.reg_name, e.reg_id, e.errno_name, e.op, e.hint or str(e), phase="setup",
                             events=ap.events, detail=e.detail) from e

    def prepare(self) -> None:
        """setup, then the VM-wide phase vCPU after vCPU (one thread: ordered before anything else)."""
        self.setup()
        self.ap.phase = "vm-wide"
        for i in self.indices:
            self.phase_vcpu(i, True)
        self.ap.phase = "state"

    def _wide_ids(self, ids: tuple[int, ...]) -> frozenset:
        """The VM-wide registers of a register list (computed once per distinct list: every vCPU repeats it)."""
        w = self._split.get(ids)
        if w is None:
            w = self._split[ids] = frozenset(r for r in ids if vm_wide(r))
        return w

    def regs_for(self, i: int, want: bool) -> Sequence[tuple[int, int]]:
        regs = self.regsets[i]
        if not want and isinstance(regs, RegisterSet):     # the state phase: the source's bytes as they came
            lay = regs.layout
            pos = self._state_pos.get(lay.ids_le, False)
            if pos is False:                               # once per distinct list (None: every register)
                wide = self._wide_ids(lay.ids)
                keep = tuple(k for k, r in enumerate(lay.ids) if r not in wide and r not in self.skip)
                pos = self._state_pos[lay.ids_le] = None if len(keep) == len(lay.ids) else keep
            return regs if pos is None else regs.pick(pos)
        wide = self._wide_ids(regs.ids if isinstance(regs, RegisterSet) else tuple(r for r, _ in regs))
        skip = self.skip
        if want and not wide:                              # no VM-wide register in this list (x86)
            out = []
        else:
            out = [(r, v) for r, v in regs if (r in wide) == want and r not in skip]
        if want and self.program.extra_writes:
            present = {r for r, _ in regs}
            out += [(r, v) for r, v in self.program.extra_writes if r not in present]
        if want:        # in index order, as QEMU writes them: the ID registers (group 0x13) before the firmware ones
            out.sort()  # (0x14), whose levels KVM derives from the VM's ID registers (WORKAROUND_2 from PFR1.SSBS)
        return out

    def phase_vcpu(self, i: int, want: bool) -> None:
        regs = self.regs_for(i, want)
        w, d, whole = self.ap.batch(self.vcpus[i], regs)
        self.written[i].update(w)
        self.dropped[i] += d
        if whole and not want:
            self.whole[i] = regs

    def verify_vcpu(self, i: int) -> list[Mismatch]:
        """Read every written register back. A state-phase set written whole is compared as bytes, KVM's bytes
        against the source's (one comparison); what differs there, and the rest, register by register."""
        rs = self.whole.get(i)
        if rs is None:
            return verify({i: self.vcpus[i]}, {i: self.written[i]})
        return self.verify_whole(i, rs, frozenset())

    def verify_whole(self, i: int, rs: RegisterSet, skip: frozenset) -> list[Mismatch]:
        """vCPU i's state-phase set `rs`, written whole, read back as one set and compared as bytes; what
        differs there is found register by register in the same answer (not read again); then the other
        registers written on it, except `skip`."""
        got, errs = self.vcpus[i].get_regs(rs.ids)
        out = [] if not any(errs) and got.data == rs.data else compare(i, rs.ids, got, errs, self.written[i])
        written = self.written[i]
        if len(written) > len(rs):                          # the VM-wide phase's registers too
            taken = self._taken.get(rs.ids_le)
            if taken is None:
                taken = self._taken[rs.ids_le] = frozenset(rs.ids)
            others = written.keys() - taken - skip
            if others:
                out += verify({i: self.vcpus[i]}, {i: {r: v for r, v in written.items() if r in others}})
        return out

    def result(self, mismatches: list[Mismatch], replays: int) -> ApplyResult:
        if mismatches:
            mismatches, notes = adjusted(mismatches)
            self.ap.events += readback_events(notes)
        return ApplyResult(self.vm, self.vcpus, self.written, self.dropped, self.ap.events, mismatches, replays)


def _failed_attempt(run: "_Run", exc: BaseException, attempt: int, events: list[ApplyEvent]) -> int:
    """After a failed attempt: the VM is closed (never handed out half-applied). The first EBUSY replay
    returns 1 (try again from scratch); anything else is raised."""
    _close_vm(run.vm)
    if isinstance(exc, _Replay):
        if attempt == 0:
            return 1
        raise _replay_error(exc, run.ap.phase, events) from None
    raise exc


def _replay_error(rp: "_Replay", phase: str, events: list[ApplyEvent]) -> ApplyError:
    r = rp.reg_id
    return ApplyError(catalog().name(r), r, "EBUSY", "replay on a recreated VM (once)",
                      "ID registers were frozen again on a fresh VM: something runs a vCPU before "
                      "apply finishes; check that nothing else uses this VM",
                      vcpu=rp.vcpu, phase=phase, events=events)


def _steps(backend: Backend, regsets: Mapping[int, Sequence[tuple[int, int]]], program: ApplyProgram,
           init: VcpuInit | None, features: Sequence[int] | None, vm_type: int, verify: bool):
    """The one apply, as steps its driver carries out: yields ("serial", fn) - fn() in one thread - or ("each", fn,
    indices) - fn(i) for every vCPU, answered with {i: result}; a step's failure is thrown back in. Two attempts:
    an EBUSY replay recreates the VM and starts over once. Returns the ApplyResult (apply_vm runs the steps in
    this thread, apply_vm_async spreads the "each" steps over worker threads)."""
    events: list[ApplyEvent] = []
    replays = 0
    for attempt in (0, 1):
        run = _Run(backend, regsets, program, events, init, features, vm_type)
        try:
            yield "serial", run.prepare
            yield "each", (lambda i: run.phase_vcpu(i, False)), run.indices
            mismatches: list[Mismatch] = []
            if verify:
                per = yield "each", run.verify_vcpu, run.indices
                for i in run.indices:
                    mismatches += per[i]
            return run.result(mismatches, replays)
        except BaseException as e:
            replays += _failed_attempt(run, e, attempt, events)
    raise AssertionError("unreachable")


class _Drive:
    """Feeds _steps: next() gives the next step (None once the apply ended: `result`); the driver sets `reply`
    (the step's result) or `error` (its failure, thrown back into the steps) before asking again."""

    def __init__(self, steps) -> None:
        self.steps, self.reply, self.error, self.result = steps, None, None, None

    def next(self):
        try:
            step = self.steps.throw(self.error) if self.error is not None else self.steps.send(self.reply)
        except StopIteration as done:
            self.result = done.value
            return None
        self.reply = self.error = None
        return step


def apply_vm(backend: Backend, regsets: Mapping[int, Sequence[tuple[int, int]]], program: ApplyProgram,
             *, init: VcpuInit | None = None, features: Sequence[int] | None = None, vm_type: int = 0,
             verify: bool = True) -> ApplyResult:
    """Create a VM on `backend` and apply every vCPU's registers. Raises ApplyError (VM closed).

    arm64: vCPUs are initialised with `init`, or with this host's preferred target and `features`
    (default: PSCI 0.2) when `init` is None. Other architectures need no init. One thread, vCPU after vCPU
    (apply_vm_async: the same steps with the per-vCPU work in worker threads).
    """
    drive = _Drive(_steps(backend, regsets, program, init, features, vm_type, verify))
    while (step := drive.next()) is not None:
        try:
            drive.reply = step[1]() if step[0] == "serial" else {i: step[1](i) for i in step[2]}
        except BaseException as e:         # noqa: BLE001 - thrown into the steps: the attempt decides
            drive.error = e
    return drive.result


async def _each(fn, indices, limiter) -> dict:
    """fn(i) for every vCPU, spread over up to limiter.total_tokens worker threads that each take the next vCPU
    from a shared list (one thread hand-off per worker, not per vCPU: a vCPU's work is ~0.3 ms, about what a
    trio thread round-trip costs). -> {i: result}; re-raises the lowest vCPU's failure (an EBUSY replay first);
    after a failure the workers take no new vCPU."""
    import threading
    from functools import partial

    import trio
    todo = list(indices)
    out: dict[int, object] = {}
    errs: dict[int, Exception] = {}
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if errs or not todo:
                    return
                i = todo.pop(0)
            try:
                out[i] = fn(i)
            except Exception as e:      # ApplyError / _Replay / KvmError: collected, raised in order
                errs[i] = e

    k = max(1, min(len(todo), int(limiter.total_tokens)))
    async with trio.open_nursery() as n:
        for _ in range(k):
            n.start_soon(partial(trio.to_thread.run_sync, worker, limiter=limiter))
    if errs:
        replay = next((e for _, e in sorted(errs.items()) if isinstance(e, _Replay)), None)
        raise replay or errs[min(errs)]
    return out


async def read_vm_async(vcpus: Mapping[int, Vcpu], backend: Backend, *, limiter=None
                        ) -> dict[int, list[tuple[int, int]]]:
    """read_vm for a trio caller: on the real backend (threaded()) the vCPUs are spread over worker threads as in
    apply_vm_async (the event loop keeps running while the ioctls do); on the simulated host (pure Python, the GIL
    held throughout) read_vm right here: a worker thread gains nothing there, and the register sets it allocated
    made the stream that follows measurably slower (bench_stream 0.87x -> 0.71x of raw TLS)."""
    import trio
    if not threaded(backend):
        return read_vm(vcpus)
    limiter = limiter or trio.CapacityLimiter(worker_threads())
    per = await _each(lambda i: read_vm({i: vcpus[i]})[i], sorted(vcpus), limiter)
    return {i: per[i] for i in sorted(vcpus)}


async def apply_vm_async(backend: Backend, regsets: Mapping[int, Sequence[tuple[int, int]]], program: ApplyProgram,
                         *, init: VcpuInit | None = None, features: Sequence[int] | None = None, vm_type: int = 0,
                         verify: bool = True, limiter=None, threads: bool | None = None) -> ApplyResult:
    """apply_vm for a trio caller. On the real backend (threaded()), after setup and the whole VM-wide phase
    (one thread, vCPU after vCPU, ordered before anything else as in apply_vm), the "state" phase and then
    the read-back run in worker threads (each takes the next vCPU), as many as `limiter` allows (default: a
    CapacityLimiter of worker_threads()): the C batch calls release the GIL during their ioctl loop. The read-back
    starts only when every vCPU's state phase ended. Same events, retries, EBUSY replay (once, of
    everything) and errors as apply_vm; with several failing vCPUs the lowest vCPU's error is raised.
    Elsewhere: apply_vm in one worker thread."""
    import trio
    if not (threaded(backend) if threads is None else threads):
        return await trio.to_thread.run_sync(
            lambda: apply_vm(backend, regsets, program, init=init, features=features, vm_type=vm_type,
                             verify=verify))
    limiter = limiter or trio.CapacityLimiter(worker_threads())
    drive = _Drive(_steps(backend, regsets, program, init, features, vm_type, verify))
    while (step := drive.next()) is not None:
        try:
            if step[0] == "serial":
                drive.reply = await trio.to_thread.run_sync(step[1], limiter=limiter)
            else:
                drive.reply = await _each(step[1], step[2], limiter)
        except BaseException as e:         # noqa: BLE001 - thrown into the steps: the attempt decides
            drive.error = e
    return drive.result
