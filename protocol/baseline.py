"""Cluster baseline: one VmProfile every listed host accepts, built field by field from the safety types.

For each feature field the hosts disagree on, the combined value follows the field's KVM safety type
(LOWER: minimum, HIGHER: maximum, HIGHER_OR_ZERO: 0 if any host has 0 else maximum, EXACT: the safe value).
A host that cannot write the field (no writable masks before 6.7, or outside its mask) accepts only its
own value: when hosts that cannot write a field disagree with the combination, the field is a conflict and
the baseline is not accepted everywhere; the result says so field by field. Every lowered field is listed
with why. Implementation IDs: kept uniform (lowest MIDR) only when every host offers cap 239, and then all
implementations are published as target implementations so the guest enables every host's errata.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass

from .catalog import Field, catalog, mask_index
from . import kernelver, regid
from .negotiate import CAP239
from .policy import Policy
from .schemas import HostCapabilities, Implementation, VmProfile


@dataclass(frozen=True, slots=True)
class Change:
    register: str
    field: str
    values: tuple[int, ...]      # per host, in input order
    chosen: int
    reason: str


@dataclass(frozen=True, slots=True)
class Baseline:
    profile: VmProfile
    lowered: tuple[Change, ...]      # fields changed from at least one host's value, with why
    conflicts: tuple[Change, ...]    # fields no single value of which every host accepts
    omitted: tuple[str, ...]         # registers not listed by every host (left out), with why
    varies: tuple[Change, ...] = ()  # implementation IDs each host shows as its own (no cap 239 everywhere)

    @property
    def accepted_everywhere(self) -> bool:
        return not self.conflicts


def _mask(h: HostCapabilities, rid: int) -> int:
    d = regid.decode(rid)
    idx = mask_index(d.encoding) if d.encoding else None
    return 0 if h.writable_masks is None or idx is None else h.writable_masks[idx]


def _combine(f: Field, vals: list[int]) -> int:
    """The field value every host's value is safe against: Field.safe_value (the one safety switch) folded over
    the hosts."""
    return functools.reduce(lambda acc, v: f.safe_value(v, acc), vals[1:], vals[0])


def baseline(hosts: list[HostCapabilities], name: str = "baseline", revision: int = 1,
             policy: Policy | None = None) -> Baseline:
    if not hosts:
        raise ValueError("baseline needs at least one host capability document")
    del policy                  # every choice below is a kernel fact (catalog data), none a policy one
    cat = catalog()
    maps = [dict(h.values) for h in hosts]
    listed = [frozenset(h.reg_list) for h in hosts]
    common = [r for r in hosts[0].reg_list if all(r in s for s in listed[1:])]
    out: dict[int, int] = {}
    lowered: list[Change] = []
    conflicts: list[Change] = []
    omitted: list[str] = []
    varies: list[Change] = []
    all_cap239 = all(h.cap(CAP239) > 0 for h in hosts)
    seen = set()
    for m in maps:
        seen |= set(m)
    for rid in sorted(seen):
        nm = cat.name(rid)
        if rid not in common or any(rid not in m for m in maps):
            omitted.append(f"{nm}: not listed by every host (a VM created from the baseline leaves it at its reset value)")
            continue
        vals = [m[rid] for m in maps]
        cls = cat.reg_class(rid)
        if len(set(vals)) == 1:
            out[rid] = vals[0]
            continue
        if cls == "imp_id":
            if all_cap239:
                out[rid] = min(vals)
                lowered.append(Change(nm, "", tuple(vals), min(vals),
                                      "every host offers cap 239: one value pinned for the VM's lifetime"))
            else:
                out[rid] = vals[0]
                varies.append(Change(nm, "", tuple(vals), vals[0],
                                        "hosts differ and not every host offers cap 239: the guest will see each "
                                        "host's own value (an override the plan judges per destination)"))
            continue
        if cls == "fw":
            fw = cat.fwregs.get(rid)
            if fw and fw.kind == "workaround":
                v = min(vals, key=lambda x: fw.folded(x & 0xF) or 0)     # as the setter compares them
                why = "lowest mitigation level over the hosts (a higher one is refused where the host is less mitigated)"
            elif fw and fw.kind == "bitmap":
                v = vals[0]
                for x in vals[1:]:
                    v &= x
                why = "hypercall bits offered by every host"
            else:
                v = min(vals)
                why = "lowest version offered by every host"
            out[rid] = v
            lowered.append(Change(nm, "", tuple(vals), v, why))
            continue
        if all(cat.setter_checks(nm, h.kernel) for h in hosts):
            # every host's kernel fabricates it (set_clidr): one value each host's setter takes, whatever the
            # order of the hosts (CLIDR is checked against each host's own CTR_EL0: setters.tsv)
            ok = [v for v in sorted(set(vals))
                  if not any(cat.setter_problems(nm, v, h.kernel, dict(h.values)) for h in hosts)]
            if ok:
                out[rid] = ok[0]
                if len(set(vals)) > 1:
                    lowered.append(Change(nm, "", tuple(vals), ok[0], "the lowest value every host's kernel takes "
                                                                      "(its setter's checks, setters.tsv)"))
            else:
                out[rid] = min(vals)
                varies.append(Change(nm, "", tuple(vals), min(vals), "no value every host's kernel takes: the plan "
                                                                     "refuses it where the kernel would"))
            continue
        # feature ID / cache register: field by field
        v = vals[0]
        covered = 0
        for f in cat.fields_of(nm):
            covered |= f.mask
            fv = [f.get(x) for x in vals]
            if len(set(fv)) == 1:
                continue
            chosen = _combine(f, fv)
            v = f.put(v, chosen & ((1 << f.width) - 1))
            stuck = [i for i, h in enumerate(hosts)
                     if f.get(vals[i]) != chosen and not (h.writable_masks is not None and f.in_kernel(h.kernel)
                                                          and (f.mask & _mask(h, rid)) == f.mask
                                                          and f.safe_value(chosen, f.get(vals[i])) == chosen)]
            raw = tuple(f.raw(x) for x in vals)
            if stuck:
                conflicts.append(Change(nm, f.name, raw, f.raw(v),
                                        f"{f.kvm_safety.value} field: hosts {', '.join(hosts[i].name for i in stuck)} "
                                        f"cannot take {f.raw(v):#x} (no writable masks or outside the mask)"))
            else:
                lowered.append(Change(nm, f.name, raw, f.raw(v),
                                      f"{f.kvm_safety.value}-safe combination over {len(hosts)} hosts"))
        rest = ~covered & 0xFFFFFFFFFFFFFFFF
        if len({x & rest for x in vals}) > 1:
            conflicts.append(Change(nm, "(bits)", tuple(x & rest for x in vals), v & rest,
                                    "bits outside every catalogued field differ between hosts"))
        out[rid] = v
    impls = ()
    if all_cap239:
        mid, rev, aid = cat.id_of("MIDR_EL1"), cat.id_of("REVIDR_EL1"), cat.id_of("AIDR_EL1")
        impls = tuple(sorted({Implementation(m.get(mid, 0), m.get(rev, 0), m.get(aid, 0)) for m in maps},
                             key=lambda i: (i.midr, i.revidr, i.aidr)))
        bm2 = cat.id_of("KVM_REG_ARM_VENDOR_HYP_BMAP_2")
        if len(impls) > 1 and bm2 in out:
            out[bm2] = discovery = cat.fwregs[bm2].accepts        # DISCOVER_IMPL_VER | _CPUS (fwregs.tsv)
            lowered.append(Change("KVM_REG_ARM_VENDOR_HYP_BMAP_2", "", tuple(m.get(bm2, 0) for m in maps),
                                  discovery, "errata discovery on: the guest learns every host's implementation"))
        elif len(impls) == 1:
            impls = ()
    prof = VmProfile(name=name, revision=revision, features=hosts[0].base_features,
                     values=tuple(sorted(out.items())), reg_list=tuple(common), target_impls=impls,
                     seen_midrs=(),   # a VM created from the baseline knows only the host it boots on
                     source_kernel=min((h.kernel_version for h in hosts), key=kernelver.parse))
    return Baseline(prof, tuple(lowered), tuple(conflicts), tuple(omitted), tuple(varies))
