"""A VM as the negotiation sees it: its VmProfile (ID-like registers, features, drift registers), this host's
capabilities, and how a plan's refusals and a changed profile are told to people. No I/O: both migration roles
(daemon/peer/), the QEMU path and vmstate use it."""
from __future__ import annotations

from typing import Mapping, Sequence


from ..protocol import kernelver, kvmabi as abi
from ..protocol import schemas as S
from ..protocol.regset import RegisterSet
from ..protocol.catalog import catalog
from ..protocol.policy import Policy
from .apply import vm_wide
from .readback import read_vm
from .kvm.backend import Backend, Vcpu


# --- plans: the negotiation engine on both sides ----------------------------------------------------------------
def _feature_names(init) -> tuple[str, ...]:
    names = {v: k for k, v in abi.VCPU_FEATURES.items()}
    return tuple(names.get(f, str(f)) for f in (init.features if init is not None else ()))


def vm_profile(vm_id: str, init, regsets: Mapping[int, Sequence[tuple[int, int]]], backend: Backend,
               policy: Policy) -> S.VmProfile:
    """The negotiation input for a VM held here: VM-wide register values (ID / imp-ID / cache / FW, read on
    vCPU 0), the drift registers (per vCPU: a value that is not a reset value wins, so the plan refuses
    rather than the apply aborting later), the register list, the vCPU features, what the guest saw."""
    first = list(regsets[min(regsets)])
    keep = frozenset(policy.drift)
    cat = catalog()
    values = {r: v for r, v in first if r in keep or r in S.PLANNED_IDS or cat.reg_class(r) in S.PLANNED_CLASSES}
    for rid, d in policy.drift.items():
        resets = getattr(d, "resets", None) or (d.reset,)
        for regs in regsets.values():
            for r, v in regs:
                if r == rid and v not in resets:
                    values[rid] = v
    try:
        midrs = tuple(sorted(set(backend.cpu_midrs())))
        kernel = kernelver.major_minor(backend.kernel_release())
    except Exception:       # a backend that cannot say: the plan then knows less about what the guest saw
        midrs, kernel = (), ""
    return S.VmProfile(name=vm_id, revision=1, features=_feature_names(init), values=tuple(sorted(values.items())),
                       reg_list=tuple(r for r, _ in first), seen_midrs=midrs, source_kernel=kernel)


def profile_view(regsets: Mapping[int, Sequence[tuple[int, int]]], policy: Policy) -> dict[int, list]:
    """The part of a VM's register sets vm_profile reads: the first vCPU's whole set, the drift registers of
    the others (the same profile as from the whole sets)."""
    first = min(regsets)
    drift = frozenset(policy.drift)
    return {i: list(regs) if i == first else [(r, v) for r, v in regs if r in drift]
            for i, regs in regsets.items()}


def profile_regsets(vcpus: Mapping[int, Vcpu], policy: Policy) -> dict[int, list[tuple[int, int]]]:
    """Read what vm_profile needs, no more (the VM may still run): the first vCPU's whole register set and
    the drift registers each other vCPU lists. Equals profile_view(read_vm(vcpus), policy)."""
    first = min(vcpus)
    out = read_vm({first: vcpus[first]})
    drift = frozenset(policy.drift)
    if drift:
        for i, v in sorted(vcpus.items()):
            if i != first:
                ids = [r for r in v.reg_list() if r in drift]
                out[i] = read_vm({i: v}, ids)[i] if ids else []
    else:
        out.update({i: [] for i in vcpus if i != first})
    return out


def profile_changes(before: S.VmProfile, after: S.VmProfile, limit: int = 16) -> list[str]:
    """What differs between the VM profile the plan was computed from (VM running) and the paused VM's:
    ID / imp-ID / cache / FW values (frozen once a vCPU ran, so normally nothing), drift registers, the
    register list, the vCPU features. Empty when the plan still describes the VM."""
    if before == after:
        return []
    cat = catalog()
    out = []
    if before.features != after.features:
        out.append(f"vCPU features {list(before.features)} -> {list(after.features)}")
    if before.reg_list != after.reg_list:
        gone, new = set(before.reg_list) - set(after.reg_list), set(after.reg_list) - set(before.reg_list)
        out.append(f"register list changed ({len(gone)} gone, {len(new)} new"
                   + (f": {', '.join(cat.name(r) for r in sorted(gone | new)[:8])}" if gone | new else "") + ")")
    a, b = dict(before.values), dict(after.values)
    for r in sorted(set(a) | set(b)):
        if a.get(r) != b.get(r):
            fmt = lambda x: "absent" if x is None else f"{x:#x}"         # noqa: E731
            out.append(f"{cat.name(r)}: {fmt(a.get(r))} at plan time, {fmt(b.get(r))} after the pause")
            if len(out) >= limit:
                break
    return out or ["the VM profile differs (seen MIDRs / kernel)"]


def refusal_reasons(plan: S.Plan, limit: int = 40) -> str:
    """The refused entries of a plan, one 'REGISTER[.FIELD]: reason' per entry (field rows first)."""
    rows = [f"{e.register}{'.' + e.field if e.field else ''}: {e.reason}"
            for e in plan.entries if e.verdict is S.Verdict.REFUSE]
    more = f"; ... {len(rows) - limit} more" if len(rows) > limit else ""
    return "; ".join(rows[:limit]) + more


def explain_mismatch(ours: S.Plan, theirs: S.Plan | None) -> str:
    """Why two plans' digests differ, as precisely as the decoded plans allow."""
    if theirs is None:
        return "the source's plan could not be decoded"
    if ours.policy != theirs.policy:
        return f"different policies: source {theirs.policy!r}, destination {ours.policy!r}"
    for k in ("vm_name", "destination", "migratable", "enable_cap239", "big_little", "assumed_cluster"):
        if getattr(ours, k) != getattr(theirs, k):
            return f"{k}: source {getattr(theirs, k)!r}, destination {getattr(ours, k)!r}"
    for a, b in zip(theirs.entries, ours.entries):
        if a != b:
            return (f"first differing entry: source {a.register}{'.' + a.field if a.field else ''} "
                    f"{a.verdict.value} {a.planned:#x} ({a.reason}), destination {b.register}"
                    f"{'.' + b.field if b.field else ''} {b.verdict.value} {b.planned:#x} ({b.reason})")
    if len(ours.entries) != len(theirs.entries):
        return f"source plan has {len(theirs.entries)} entries, destination {len(ours.entries)}"
    return "same entries but different header (notes / guest-visible summary / engine version)"


_LAST_WIDE: list = [(None, {})]


def wide_values(vm: S.VmProfile) -> dict[int, int]:
    """The VM-wide registers of a VM profile with their values (what every vCPU must stream); kept for the last
    profile seen, by identity (a migration asks once per vCPU)."""
    seen, got = _LAST_WIDE[0]
    if seen is not vm:
        got = {r: v for r, v in vm.values if vm_wide(r)}
        _LAST_WIDE[0] = (vm, got)
    return got


def stream_deviations(vm: S.VmProfile, regsets: Mapping[int, Sequence[tuple[int, int]]]) -> list[str]:
    """VM-wide registers streamed with other values than the VmProfile the plan was computed from."""
    want = wide_values(vm)
    cat = catalog()
    out = []
    for i, regs in sorted(regsets.items()):
        got = dict(zip(regs.ids, regs.values())) if isinstance(regs, RegisterSet) else dict(regs)
        for r, v in want.items():
            if got.get(r) != v:
                have = got.get(r)
                out.append(f"vCPU {i} {cat.name(r)}: streamed {'nothing' if have is None else f'{have:#x}'}, "
                           f"the plan's VM profile says {v:#x}")
                if len(out) >= 16:
                    return out
    return out


def host_capabilities(caps_doc: dict, backend: Backend, policy: Policy) -> S.HostCapabilities:
    """This host as the negotiation sees it. arm64: the capability document (probe.py). Other architectures
    (the generic plan, generic.negotiate_generic): the document's arch / kernel / caps plus the register
    list of a fresh vCPU on a scratch VM (x86: KVM-listed registers + the MSRs GET_ONE_REG accepts), which
    the plan checks the source's list against; no values (nothing is negotiated per value there)."""
    if caps_doc.get("arch") == "aarch64":
        return S.host_from_doc(caps_doc, frozenset(policy.drift))
    reg_list: tuple[int, ...] = ()
    if caps_doc.get("one_reg"):
        vm = backend.create_vm(0)
        try:
            reg_list = tuple(vm.create_vcpu(0).reg_list())
        finally:
            vm.close()
    caps = tuple(sorted((str(k), int(v)) for k, v in (caps_doc.get("caps") or {}).items()))
    return S.HostCapabilities(kernel_release=str(caps_doc.get("kernel_release", "")),
                              kernel_version=str(caps_doc.get("kernel_version", "")),
                              arch=str(caps_doc.get("arch", "")), caps=caps, reg_list=reg_list, values=(),
                              writable_masks=None, profile=str(caps_doc.get("profile") or ""))
