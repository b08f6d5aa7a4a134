"""The plan for architectures without ID-register negotiation (x86): the same architecture, every register the
source lists listed on the destination, everything restored as it is and read back."""
from __future__ import annotations

from dataclasses import replace

from . import regid
from .catalog import catalog
from .plandigest import plan_digest
from .policy import Policy, default_policy
from .schemas import HostCapabilities, Plan, PlanEntry, Verdict, VmProfile


_ARCH_BYTE = {regid.KVM_REG_ARM64 >> 56: "aarch64", regid.KVM_REG_X86 >> 56: "x86_64"}


_LAST_ARCH: list = [None, ""]


def vm_arch(vm: VmProfile) -> str:
    """The architecture a VM profile's registers belong to (ONE_REG ids carry it in bits 63:56): "aarch64",
    "x86_64", "" when the profile lists no register, "mixed" when they disagree. Remembered for the last
    profile, which is planned against many hosts in a row."""
    if _LAST_ARCH[0] is not vm:
        _LAST_ARCH[0], _LAST_ARCH[1] = vm, _vm_arch(vm)
    return _LAST_ARCH[1]


def _vm_arch(vm: VmProfile) -> str:
    arches = {r >> 56 for r in vm.reg_list} | {r >> 56 for r, _ in vm.values}
    if not arches:
        return ""
    if len(arches) > 1:
        return "mixed"
    a = arches.pop()
    return _ARCH_BYTE.get(a, f"arch {a:#x}")


def negotiate_generic(vm: VmProfile, dest: HostCapabilities, policy: Policy | None = None) -> Plan:
    """Architectures without ID-register negotiation (x86): the registers are restored as they are.

    The rule: the VM's architecture (from its register ids) must be the destination's; every register the
    source lists must be listed on the destination (else ENOENT at apply time, and with no reset-value rule
    for these registers dropping one could lose guest state). One summary entry (reg_id 0: no value is
    planned, every register keeps the source's) says what will happen; refusals name the register. The
    digest is the usual plan digest: both daemons compute it from the same VmProfile and HostCapabilities."""
    pol = policy or default_policy()
    arch = vm_arch(vm)
    entries: list[PlanEntry] = []
    notes: list[str] = []
    if arch != dest.arch:
        entries.append(PlanEntry("arch", 0, "", 0, 0, 0, Verdict.REFUSE,
                                 f"the VM's registers are {arch or 'none'}, the destination is {dest.arch}: "
                                 f"vCPU state moves only between hosts of the same architecture"))
    else:
        listed = frozenset(dest.reg_list)
        cat = catalog()
        missing = [r for r in vm.reg_list if r not in listed]
        for rid in missing:
            entries.append(PlanEntry(cat.name(rid), rid, "", 0, 0, 0, Verdict.REFUSE,
                                     f"not listed on the destination kernel {dest.kernel_version} (would fail "
                                     f"with ENOENT); on {arch} invariantd has no reset-value rule to drop it"))
        groups: dict[str, int] = {}
        for rid in vm.reg_list:
            g = regid.decode(rid).group
            groups[g] = groups.get(g, 0) + 1
        kinds = ", ".join(f"{n} {g}" for g, n in sorted(groups.items())) or "none"
        entries.append(PlanEntry("registers", 0, "", len(vm.reg_list), len(dest.reg_list), len(vm.reg_list),
                                 Verdict.REFUSE if missing else Verdict.SET,
                                 f"{arch}: no ID-register negotiation on this architecture; {len(vm.reg_list)} "
                                 f"registers ({kinds}) restored as they are, then read back"))
        notes.append(f"generic plan ({arch} -> {dest.arch}): same architecture required; KVM may adjust some "
                     f"registers on write (e.g. the TSC keeps counting): such read-back differences are "
                     f"reported per register, never hidden")
    migratable = all(e.verdict is not Verdict.REFUSE for e in entries)
    plan = Plan(vm_name=vm.name, destination=dest.name, policy=pol.label, migratable=migratable,
                enable_cap239=False, target_impls=(), big_little=False, assumed_cluster=0, cluster_cpus=(),
                entries=tuple(entries), guest_visible=(), notes=tuple(notes))
    return replace(plan, digest=plan_digest(plan))
