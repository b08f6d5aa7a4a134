"""After an apply: what the vCPUs hold, read back and judged - against what was written (with the differences
KVM is known to produce: READBACK_MAY_DIFFER) and against the plan (plan_deviations); and reading a VM's
registers on the source (read_vm)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from ..protocol import kvmabi as abi
from ..protocol import regid
from ..protocol.catalog import catalog
from ..protocol.regset import RegisterSet
from ..protocol.schemas import Plan, Verdict
from .kvm.backend import Vcpu
from .kvm.errors import KvmError


@dataclass(frozen=True, slots=True)
class ReadbackRule:
    """A register KVM is known to adjust on write: its read-back may differ from the value written.

    kind: "advances" = a counter KVM keeps running: read-back - written must lie in [-behind, ahead];
          "zero-ok"  = KVM may ignore the write and read 0 (the written value, or 0, is accepted);
          "ignore-bits" = bits in `bits` are computed by KVM (read-only status): compared without them.
    A difference inside the rule is not hidden: apply_vm records it as an ApplyEvent "readback-adjusted"
    (register, written, read, why). A difference outside the rule is a Mismatch like any other."""
    name: str
    kind: str
    why: str
    behind: int = 0
    ahead: int = 0
    bits: int = 0

    def accepts(self, written: int, got: int) -> bool:
        if self.kind == "ignore-bits":
            return (written ^ got) & ~self.bits == 0
        if self.kind == "advances":
            return -self.behind <= got - written <= self.ahead
        if self.kind == "zero-ok":
            return got == 0
        return False


# x86 (Linux arch/x86/kvm/x86.c, observed on this project's 6.18 host). Bounds for the TSC: behind by up to
# 2^32 ticks (KVM's kvm_synchronize_tsc() gives vCPUs written within one second a common offset, so vCPU N may
# read the TSC of vCPU 0's write plus the time since: >= 1 s at <= 4.29 GHz), ahead by up to 2^40 ticks (the
# time between the write and the read-back: minutes at any real TSC rate, far above the apply timeout).
_ARM64_TIMER_CNT, _ARM64_PTIMER_CNT = regid.sysreg(3, 3, 14, 3, 2), regid.sysreg(3, 3, 14, 0, 1)
_ARM64_TIMER_CTL, _ARM64_PTIMER_CTL = regid.sysreg(3, 3, 14, 3, 1), regid.sysreg(3, 3, 14, 2, 1)
READBACK_MAY_DIFFER: dict[int, ReadbackRule] = {
    regid.x86_msr(0x10): ReadbackRule(
        "IA32_TSC", "advances", "a host write sets the vCPU's TSC offset so the TSC equals the written value at that "
        "instant (or, within KVM's 1 s TSC-sync window, matches the other vCPUs' offset); the TSC keeps counting",
        behind=1 << 32, ahead=1 << 40),
    # arm64 (seen on the real 6.12 / 7.3 kernels in the lab: tests/lab/test_cross_kernel.py). The counters keep
    # running: a write sets the offset so the counter equals the value at that instant (2^40 ticks: hours at
    # the 1-100 MHz generic-timer rates). CTL bit 2 (ISTATUS) is the timer condition KVM computes from CVAL
    # and the counter (7.x reports it only while the timer is enabled).
    _ARM64_TIMER_CNT: ReadbackRule(
        "KVM_REG_ARM_TIMER_CNT", "advances", "the virtual counter keeps counting after the write (and is VM-wide on newer kernels)",
        behind=1 << 32, ahead=1 << 40),
    _ARM64_PTIMER_CNT: ReadbackRule(
        "KVM_REG_ARM_PTIMER_CNT", "advances", "the physical counter keeps counting after the write (and is VM-wide on newer kernels)",
        behind=1 << 32, ahead=1 << 40),
    _ARM64_TIMER_CTL: ReadbackRule(
        "KVM_REG_ARM_TIMER_CTL", "ignore-bits", "ISTATUS (bit 2) is computed by KVM, read-only", bits=0x4),
    _ARM64_PTIMER_CTL: ReadbackRule(
        "KVM_REG_ARM_PTIMER_CTL", "ignore-bits", "ISTATUS (bit 2) is computed by KVM, read-only", bits=0x4),
    regid.x86_msr(0x6E0): ReadbackRule(
        "IA32_TSC_DEADLINE", "zero-ok", "without an in-kernel local APIC KVM ignores the write and reads 0; with "
        "one, a deadline already in the past has fired and reads 0"),
}


@dataclass(frozen=True, slots=True)
class Mismatch:
    vcpu: int
    register: str
    reg_id: int
    intended: int
    actual: int | None          # None: the read-back itself failed
    errno: str = ""

    def __str__(self) -> str:
        got = f"{self.actual:#x}" if self.actual is not None else f"unreadable ({self.errno})"
        return f"vCPU {self.vcpu} {self.register} ({self.reg_id:#018x}): wrote {self.intended:#x}, reads {got}"


def verify(vcpus: Mapping[int, Vcpu], written: Mapping[int, Mapping[int, int]]) -> list[Mismatch]:
    out: list[Mismatch] = []
    for i, regs in written.items():
        ids = list(regs)
        if not ids:
            continue
        got_set, errs = vcpus[i].get_regs(ids)
        if not any(errs) and got_set == RegisterSet.from_values(ids, [regs[r] for r in ids]):
            continue                                # the whole vCPU reads back as written: one comparison
        out += compare(i, ids, got_set, errs, regs)
    return out


def compare(i: int, ids: Sequence[int], got: RegisterSet, errs: Sequence[int], intended: Mapping[int, int]
            ) -> list[Mismatch]:
    """vCPU i's registers `ids` as read back (got, errs: get_regs's answer) against the values written, register by
    register: what a whole-set comparison that failed still has to say, without reading the registers again."""
    cat = catalog()
    out: list[Mismatch] = []
    for r, v, e in zip(ids, got.values(), errs):
        if e:
            out.append(Mismatch(i, cat.name(r), r, intended[r], None, abi.errno_name(e)))
        elif v != intended[r]:
            out.append(Mismatch(i, cat.name(r), r, intended[r], v))
    return out


def adjusted(mismatches: list[Mismatch]) -> tuple[list[Mismatch], list[tuple[Mismatch, str]]]:
    """Read-back differences KVM is known to produce (READBACK_MAY_DIFFER) and within their rule -> (the
    mismatches that remain, [(mismatch, why) the caller reports as "readback-adjusted"])."""
    out, notes = [], []
    for m in mismatches:
        rule = READBACK_MAY_DIFFER.get(m.reg_id)
        if rule is None or m.actual is None or not rule.accepts(m.intended, m.actual):
            out.append(m)
            continue
        delta = m.actual - m.intended
        notes.append((m, f"{rule.name}: wrote {m.intended:#x}, reads {m.actual:#x} ({delta:+d}); {rule.why}"))
    return out, notes


def read_vm(vcpus: Mapping[int, Vcpu], ids: Sequence[int] | None = None) -> dict[int, RegisterSet]:
    """Read every listed register of each vCPU (source side): one RegisterSet per vCPU, KVM's bytes as read.
    Raises KvmError on the first unreadable register."""
    out: dict[int, RegisterSet] = {}
    for i, vcpu in sorted(vcpus.items()):
        rl = list(ids) if ids is not None else vcpu.reg_list()
        regs, errs = vcpu.get_regs(rl)
        for r, e in zip(rl, errs):
            if e:
                raise KvmError("KVM_GET_ONE_REG", e, r, f"vCPU {i}")
        out[i] = regs
    return out


# --- judged against the plan ----------------------------------------------------------------------------------
_LAST_JUDGED: list = [(None, ())]


def _judged(plan: Plan) -> tuple:
    """The plan's entries an apply is judged against (whole registers, not refused): once per plan, not per vCPU
    (kept for the last plan seen, by identity: hashing a Plan would cost more than the filter)."""
    seen, got = _LAST_JUDGED[0]
    if seen is not plan:
        got = tuple(e for e in plan.entries if not e.field and e.reg_id and e.verdict is not Verdict.REFUSE)
        _LAST_JUDGED[0] = (plan, got)
    return got


def plan_deviations(plan: Plan, written: Mapping[int, int], dropped: Iterable[int] = (), *,
                    vcpu: int | None = None) -> list[str]:
    """Where an apply ended differently from the plan: a planned register holding another value than the
    plan's, a dropped register the plan keeps, a kept register the plan drops. Registers not applied are
    not judged here (the caller decides what must be present)."""
    dropped = set(dropped)
    where = f"vCPU {vcpu} " if vcpu is not None else ""
    out = []
    for e in _judged(plan):
        if e.verdict is Verdict.DROP:
            if e.reg_id in written:
                out.append(f"{where}{e.register}: the plan drops it, the kernel took {written[e.reg_id]:#x}")
        elif e.reg_id in dropped:
            out.append(f"{where}{e.register}: dropped (ENOENT) but the plan keeps it at {e.planned:#x} "
                       f"({e.verdict.value})")
        elif e.reg_id in written and written[e.reg_id] != e.planned:
            out.append(f"{where}{e.register}: the plan says {e.planned:#x} ({e.verdict.value}), applied "
                       f"{written[e.reg_id]:#x}")
    return out
