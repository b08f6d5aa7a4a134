"""The apply program: the agreed plan compiled into what a register writer does, register by register.

This is the one place where the plan is interpreted. Two executors run it and decide nothing themselves:
the daemon's apply engine (daemon/apply.py, for the VMs the daemon creates) and the in-process VMM agent
(daemon/vmm/agent.c, inside QEMU), which receives it in the fixed binary layout below
(protocol/schemas/AGENT.md describes the bytes).

Per register (RegOp):
    write     the value written instead of the one the source / the VMM gives (the plan's planned value:
              one ioctl, never write / fail / read / write); None = write the given value
    actions   what to do when KVM_SET_ONE_REG fails, per errno: EINVAL, EINVARIANT, EBUSY, ENOENT
    fallback  the value WRITE_FALLBACK writes (hand-built programs: "on EINVAL retry with X")
    listed    the register is a drift register: the agent lists it in KVM_GET_REG_LIST when the kernel
              does not, answers KVM_GET_ONE_REG for it, and its ENOENT write is dropped
Program-wide: enable KVM_CAP_ARM_WRITABLE_IMP_ID_REGS (cap 239) before the first vCPU; the plan digest;
the migration it belongs to; the errno value of EINVARIANT on this host; bounded retries of EINTR/EAGAIN.

compile_plan(plan, vm) is the only mapping from verdicts to actions:

    verdict    write          EINVAL / EINVARIANT   ENOENT   EBUSY
    identical  source         FAIL                  FAIL     REPLAY
    set        planned        FAIL                  FAIL     REPLAY
    override   planned        FAIL                  FAIL     REPLAY    (the override *is* the planned value)
    pin        source (=plan) FAIL                  FAIL     REPLAY    + enable cap 239
    drop       -              FAIL                  DROP     REPLAY    + listed (drift: decided by feature)

A failure the plan did not foresee fails: the executor never invents a value. REPLAY is the daemon's
"recreate the VM and replay in order, once"; an agent inside a VMM cannot recreate the VM and fails instead.
"""
from __future__ import annotations

import enum
import errno as E
import struct
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from . import kvmabi, regid
from .catalog import catalog
from .schemas import Plan, Verdict, VmProfile

PROGRAM_MAGIC = b"IVDP"
PROGRAM_VERSION = 1
MIGRATION_ID_MAX = 63               # bytes of UTF-8; NUL-padded to 64 on the wire
TRANSIENT_ERRNOS = frozenset({E.EINTR, E.EAGAIN})
# register classes whose EINVAL means "differs from what this host offers" (KVM's ID checks)
ID_LIKE_CLASSES = frozenset({"id", "imp_id", "cache", "demux", "fw"})


class Action(enum.IntEnum):
    """What an executor does with a failed KVM_SET_ONE_REG. The numbers are the wire values."""
    FAIL = 0                # stop: the write fails, nothing is invented
    ACCEPT_DESTINATION = 1  # keep what the destination kernel holds (read it, record it)
    WRITE_FALLBACK = 2      # write RegOp.fallback instead
    DROP = 3                # the register does not exist here and the guest cannot reach it: done
    REPLAY = 4              # ordering fault (ID registers frozen): recreate the VM, replay in order, once
    RETRY = 5               # transient: the same value again, bounded
    KEEP_IF_EQUAL = 6       # the destination already holds the value (generic path: x86 answers EINVAL)


class Verdict8(enum.IntEnum):
    """Plan verdicts as one byte on the wire (metrics and reports name them)."""
    NONE = 0
    IDENTICAL = 1
    SET = 2
    OVERRIDE = 3
    PIN = 4
    DROP = 5

    @classmethod
    def of(cls, v: Verdict | None) -> "Verdict8":
        return cls.NONE if v is None else cls[v.name]


# the errnos a RegOp carries an action for, in wire order
ERRNO_SLOTS = ("EINVAL", "EINVARIANT", "EBUSY", "ENOENT")
FLAG_LISTED = 1

_HEADER = struct.Struct("<4sHHIHH32s64s")     # magic, version, flags, n_ops, einvariant, retries, digest, migration
_OP = struct.Struct("<QQQBBBBBBH")            # reg_id, write, fallback, verdict, 4 actions, flags, has_write|has_fb
PROGRAM_FLAG_CAP239 = 1
_HAS_WRITE, _HAS_FALLBACK = 1, 2


class ProgramError(ValueError):
    """A program that cannot be built or decoded: says which field and why."""


@dataclass(frozen=True, slots=True)
class RegOp:
    reg_id: int
    write: int | None = None
    on_einval: Action = Action.FAIL
    on_einvariant: Action = Action.FAIL
    on_ebusy: Action = Action.REPLAY
    on_enoent: Action = Action.FAIL
    fallback: int | None = None
    listed: bool = False
    verdict: Verdict8 = Verdict8.NONE
    resets: tuple[int, ...] = ()    # hand-built only: DROP only at these values (the wire carries none)

    def __post_init__(self) -> None:
        limit = 1 << min(64, 8 * regid.size_bytes(self.reg_id))
        for what, v in (("write", self.write), ("fallback", self.fallback)):
            if v is not None and not (isinstance(v, int) and 0 <= v < limit):
                raise ProgramError(f"{catalog().name(self.reg_id)} ({self.reg_id:#018x}): {what} value {v!r} does "
                                   f"not fit the register")
        if self.fallback is None and Action.WRITE_FALLBACK in self.actions():
            raise ProgramError(f"{catalog().name(self.reg_id)}: WRITE_FALLBACK without a fallback value")

    def actions(self) -> tuple[Action, Action, Action, Action]:
        return (self.on_einval, self.on_einvariant, self.on_ebusy, self.on_enoent)


@dataclass(frozen=True)
class ApplyProgram:
    ops: tuple[RegOp, ...] = ()
    enable_cap239: bool = False
    digest: bytes = b""
    migration: str = ""
    einvariant: int = field(default_factory=lambda: kvmabi.EINVARIANT)
    transient_retries: int = 3
    # registers the program has no op for, in the daemon's own VMs: the catalog's reset knowledge on ENOENT (drift
    # rows at their reset values, unnamed feature-ID slots at 0) and the generic path's keep-if-equal on EINVAL
    # (x86). Never in an agent's program (decode sets False): there, what the plan does not name fails.
    generic_rules: bool = True
    extra_writes: tuple[tuple[int, int], ...] = ()   # written in the VM-wide phase though the source lacks them

    def __post_init__(self) -> None:
        seen = set()
        for o in self.ops:
            if o.reg_id in seen:
                raise ProgramError(f"two ops for {catalog().name(o.reg_id)} ({o.reg_id:#018x})")
            seen.add(o.reg_id)
        if not 0 <= self.transient_retries <= 100:
            raise ProgramError(f"transient_retries {self.transient_retries} outside 0..100")
        if self.digest and len(self.digest) != 32:
            raise ProgramError(f"digest must be 32 bytes (sha256), got {len(self.digest)}")
        if len(self.migration.encode()) > MIGRATION_ID_MAX:
            raise ProgramError(f"migration id longer than {MIGRATION_ID_MAX} bytes")
        object.__setattr__(self, "_by_id", {o.reg_id: o for o in self.ops})
        object.__setattr__(self, "_touched", {})      # id tuple -> touches(): every vCPU repeats the same list

    # --- lookups ----------------------------------------------------------------------------------------------
    def op(self, reg_id: int) -> RegOp | None:
        return self._by_id.get(reg_id)     # type: ignore[attr-defined]

    def touches(self, ids: Sequence[int]) -> bool:
        """Whether the program has a value of its own for any of these registers (else they go as given)."""
        memo = self._touched               # type: ignore[attr-defined]
        key = ids if isinstance(ids, tuple) else tuple(ids)
        got = memo.get(key)
        if got is None:
            by_id = self._by_id            # type: ignore[attr-defined]
            got = any(r in by_id and by_id[r].write is not None for r in key)
            if len(memo) >= 64:            # bounded: a peer's distinct lists cannot grow it
                memo.clear()
            memo[key] = got
        return got

    def value_to_write(self, reg_id: int, given: int) -> int:
        o = self._by_id.get(reg_id)        # type: ignore[attr-defined]
        return given if o is None or o.write is None else o.write

    def listed(self) -> tuple[RegOp, ...]:
        return tuple(o for o in self.ops if o.listed)

    # --- the one interpretation of a failure -------------------------------------------------------------------
    def decide(self, reg_id: int, value: int, err: int) -> Action:
        """The action for a KVM_SET_ONE_REG of `reg_id` (value `value`) that failed with errno `err`."""
        if err in TRANSIENT_ERRNOS:
            return Action.RETRY
        o = self._by_id.get(reg_id)        # type: ignore[attr-defined]
        if o is not None:
            if err == E.EINVAL:
                return o.on_einval
            if err == self.einvariant:
                return o.on_einvariant
            if err == E.EBUSY:
                return o.on_ebusy
            if err == E.ENOENT:
                if o.on_enoent == Action.DROP and o.resets and value not in o.resets:
                    return Action.FAIL
                return o.on_enoent
            return Action.FAIL
        if err == E.EBUSY:
            return Action.REPLAY
        if not self.generic_rules:
            return Action.FAIL          # an agent's program: what the plan does not name fails as the kernel said
        if err == E.ENOENT:
            return Action.DROP if value in self.catalog_resets(reg_id) else Action.FAIL
        if err == E.EINVAL and reg_id & regid.KVM_REG_ARCH_MASK != regid.KVM_REG_ARM64:
            return Action.KEEP_IF_EQUAL
        return Action.FAIL

    def catalog_resets(self, reg_id: int) -> tuple[int, ...]:
        """Values at which an unplanned register absent here may be dropped (generic_rules only)."""
        if not self.generic_rules:
            return ()
        cat = catalog()
        d = cat.drift.get(reg_id)
        if d is not None:
            return d.resets
        if cat.reg_class(reg_id) == "id" and reg_id not in cat.by_id:
            return (0,)
        return ()

    # --- wire form (fixed little-endian layout; AGENT.md) ---------------------------------------------------------
    def encode(self) -> bytes:
        flags = PROGRAM_FLAG_CAP239 if self.enable_cap239 else 0
        if self.extra_writes:
            raise ProgramError("extra_writes are for the daemon's own VMs; a VMM agent writes only what the VMM "
                               "restores (compile the plan for the agent without them)")
        out = [_HEADER.pack(PROGRAM_MAGIC, PROGRAM_VERSION, flags, len(self.ops), self.einvariant,
                            self.transient_retries, self.digest.ljust(32, b"\0"),
                            self.migration.encode().ljust(64, b"\0"))]
        for o in self.ops:
            if o.resets:
                raise ProgramError(f"{catalog().name(o.reg_id)}: a value-conditional drop cannot go to an agent "
                                   f"(compiled plans decide drops by feature)")
            has = (_HAS_WRITE if o.write is not None else 0) | (_HAS_FALLBACK if o.fallback is not None else 0)
            out.append(_OP.pack(o.reg_id, o.write or 0, o.fallback or 0, o.verdict, *o.actions(),
                                FLAG_LISTED if o.listed else 0, has))
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes) -> "ApplyProgram":
        if len(data) < _HEADER.size:
            raise ProgramError(f"program of {len(data)} bytes is shorter than its {_HEADER.size}-byte header")
        magic, ver, flags, n, einv, retries, digest, mig = _HEADER.unpack_from(data)
        if magic != PROGRAM_MAGIC:
            raise ProgramError(f"not an apply program (magic {magic!r}, expected {PROGRAM_MAGIC!r})")
        if ver != PROGRAM_VERSION:
            raise ProgramError(f"apply program version {ver}; this side speaks {PROGRAM_VERSION}")
        if flags & ~PROGRAM_FLAG_CAP239:
            raise ProgramError(f"unknown program flags {flags:#x}")
        if len(data) != _HEADER.size + n * _OP.size:
            raise ProgramError(f"program says {n} ops ({_HEADER.size + n * _OP.size} bytes), got {len(data)} bytes")
        ops = []
        for i in range(n):
            rid, w, fb, verdict, a1, a2, a3, a4, fl, has = _OP.unpack_from(data, _HEADER.size + i * _OP.size)
            try:
                acts = [Action(a) for a in (a1, a2, a3, a4)]
                v8 = Verdict8(verdict)
            except ValueError as e:
                raise ProgramError(f"op {i} ({rid:#018x}): {e}") from None
            if fl & ~FLAG_LISTED or has & ~(_HAS_WRITE | _HAS_FALLBACK):
                raise ProgramError(f"op {i} ({rid:#018x}): unknown flags {fl:#x}/{has:#x}")
            ops.append(RegOp(rid, w if has & _HAS_WRITE else None, *acts,
                             fallback=fb if has & _HAS_FALLBACK else None, listed=bool(fl & FLAG_LISTED),
                             verdict=v8))
        return cls(tuple(ops), enable_cap239=bool(flags & PROGRAM_FLAG_CAP239), digest=digest.rstrip(b"\0")
                   and digest, migration=mig.rstrip(b"\0").decode("utf-8", "replace"), einvariant=einv,
                   transient_retries=retries, generic_rules=False)

    # --- hand-built programs (tests, benches, the generic path) ----------------------------------------------------
    @classmethod
    def build(cls, *, accept_destination: Iterable[int] = (), retry_with: Mapping[int, int] | None = None,
              drops: Mapping[int, int | tuple[int, ...]] | None = None, enable_cap239: bool = False,
              transient_retries: int = 3, extra_writes: Mapping[int, int] | None = None,
              generic_rules: bool = True) -> "ApplyProgram":
        """A program without a plan: accept_destination = on EINVAL / EINVARIANT keep the destination's value;
        retry_with = on EINVAL / EINVARIANT write this value instead; drops = on ENOENT drop at these values."""
        ops: dict[int, RegOp] = {}
        for r in accept_destination:
            ops[r] = RegOp(r, on_einval=Action.ACCEPT_DESTINATION, on_einvariant=Action.ACCEPT_DESTINATION)
        for r, v in (retry_with or {}).items():
            ops[r] = RegOp(r, on_einval=Action.WRITE_FALLBACK, on_einvariant=Action.WRITE_FALLBACK, fallback=v)
        for r, v in (drops or {}).items():
            resets = tuple(v) if isinstance(v, (tuple, list)) else (v,)
            base = ops.get(r, RegOp(r))
            ops[r] = RegOp(r, base.write, base.on_einval, base.on_einvariant, base.on_ebusy, Action.DROP,
                           base.fallback, True, base.verdict, resets)
        return cls(tuple(ops[r] for r in sorted(ops)), enable_cap239=enable_cap239,
                   transient_retries=transient_retries, generic_rules=generic_rules,
                   extra_writes=tuple(sorted((extra_writes or {}).items())))


# --- the plan -> the program -----------------------------------------------------------------------------------
def compile_plan(plan: Plan, vm: VmProfile | None = None, *, migration: str = "", transient_retries: int = 3,
                 for_agent: bool = False) -> ApplyProgram:
    """The plan's register-level verdicts as an ApplyProgram (table in the module docstring).

    Registers the plan writes that the source VM did not carry (absent from vm.values: the source kernel did
    not list them) become extra_writes for the daemon's own VMs (for_agent: left out, a VMM restores only
    what it saved). A refused plan raises ProgramError: it is never applied."""
    if not plan.migratable:
        refused = sorted({e.register for e in plan.entries if e.verdict is Verdict.REFUSE})
        raise ProgramError(f"plan for {plan.vm_name} is refused ({', '.join(refused)}): nothing to apply")
    src = dict(vm.values) if vm is not None else None
    ops: list[RegOp] = []
    extra: dict[int, int] = {}
    for e in plan.entries:
        if e.field or not e.reg_id or e.verdict is Verdict.REFUSE:
            continue                        # field rows and vcpu_init rows: the register row decides
        v8 = Verdict8.of(e.verdict)
        if e.verdict is Verdict.DROP:
            # written as the source had it where the kernel lists it; listed (and read as that value) by an agent
            # where it does not; dropped on ENOENT whatever it holds: the plan decided by feature
            ops.append(RegOp(e.reg_id, e.source, on_enoent=Action.DROP, listed=True, verdict=v8))
            continue
        if src is not None and e.reg_id not in src:
            if not for_agent:
                extra[e.reg_id] = e.planned
            continue
        ops.append(RegOp(e.reg_id, e.planned, verdict=v8))
    ops.sort(key=lambda o: o.reg_id)
    return ApplyProgram(tuple(ops), enable_cap239=plan.enable_cap239, digest=plan.digest, migration=migration,
                        transient_retries=transient_retries, generic_rules=not for_agent,
                        extra_writes=tuple(sorted(extra.items())))
