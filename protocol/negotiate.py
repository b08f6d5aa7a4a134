"""The negotiation engine (pure): VmProfile + destination HostCapabilities + Policy -> Plan.

One verdict per register and per differing field, each with a reason a human can read and, when the guest
will notice, what it will see change:
  identical  same value on both sides
  set        the destination takes the source value: writable there and safe by the field's rule
             (catalog.check_write(), the kernel's arm64_check_features())
  override   the destination's value is kept and the guest sees it; the policy allows that change
  pin        MIDR/REVIDR/AIDR kept with KVM_CAP_ARM_WRITABLE_IMP_ID_REGS (cap 239, >= 6.15)
  drop       the destination does not list the register and the source value is its reset value
  refuse     none of the above: the VM cannot move there
Kernel-era facts come from the destination document, not from version numbers where the document says more:
writable masks absent (< 6.7) = any ID difference is either the destination value (override) or a refusal;
cap 239 decides MIDR/REVIDR/AIDR (7.x reports a MIDR writable mask without the cap, and the write still fails).
"""
from __future__ import annotations

from functools import lru_cache
from operator import attrgetter

from . import errata
from .generic import negotiate_generic, vm_arch
from .plandigest import frag, plan_digest
from .catalog import Field, Safety, catalog, mask_index, sve_vls_problem, sve_vqs
from . import kvmabi, regid
from .policy import Policy, default_policy
from .schemas import HostCapabilities, Plan, PlanEntry, Verdict, VmProfile

CAP239 = "KVM_CAP_ARM_WRITABLE_IMP_ID_REGS"
_MIDR_SAME_PART = ("Implementer", "Architecture", "PartNum")


@lru_cache(maxsize=None)
def _meta(rid: int) -> tuple[str, str, int | None]:
    """(name, class, writable-mask index) of a register id."""
    cat = catalog()
    d = regid.decode(rid)
    return cat.name(rid), cat.reg_class(rid), (mask_index(d.encoding) if d.encoding else None)


# Per-register results are a pure function of (register, values, destination rule inputs, policy digest):
# memoised, because a fleet repeats the same few host shapes many times. Bounded; cleared when full.
_MEMO: dict = {}
_DEST_ONLY = frozenset(("id", "imp_id", "cache"))
_MEMO_MAX = 200_000
_VERDICT, _SEES = attrgetter("verdict"), attrgetter("guest_sees")


class _VmView:
    """What a VM contributes to every plan, computed once while the same VmProfile object (and policy) is planned
    against many hosts: its values as a dict, and its registers in id order as rows
    (rid, name, class, value, the identical entry and its digest fragment - None where "same value" is not
    decided by equality alone), plus the decisions for its registers a destination does not list."""
    __slots__ = ("vm", "pol", "src", "rows", "absent", "valueless", "aa32", "ssbs_hidden")

    def __init__(self, vm: VmProfile, pol: Policy) -> None:
        self.vm, self.pol = vm, pol
        self.src = dict(vm.values)
        self.rows = [(rid, *_meta(rid)[:2], s,
                      None if rid == regid.SVE_VLS or _meta(rid)[1] == "imp_id" else _identical(_meta(rid)[0], rid, s))
                     for rid, s in sorted(self.src.items())]
        self.absent: dict = {}
        # listed by the VM without a value, and a drift candidate (the only ones a destination can refuse)
        self.valueless = sorted(r for r in set(vm.reg_list) - self.src.keys() if r in pol.drift)
        self.aa32 = _aa32(self.src)
        self.ssbs_hidden = _ssbs_hidden(vm)


_LAST_VM: list = [None]


def _vm_view(vm: VmProfile, pol: Policy) -> _VmView:
    v = _LAST_VM[0]
    if v is None or v.vm is not vm or v.pol is not pol:
        v = _LAST_VM[0] = _VmView(vm, pol)
    return v


def _type(f: Field) -> str:
    return f.kvm_safety.value.lower().replace("_", "-")




class _Ctx:
    __slots__ = ("vm", "dest", "pol", "cat", "view", "src", "dst", "dst_listed", "masks", "kernel", "cap239",
                 "entries", "frags", "notes", "dview_midr", "errata_missing", "aa32")

    def __init__(self, vm: VmProfile, dest: HostCapabilities, pol: Policy) -> None:
        self.vm, self.dest, self.pol, self.cat = vm, dest, pol, catalog()
        self.view = _vm_view(vm, pol)
        self.src = self.view.src
        self.dst = dict(dest.values)
        if "SVE" in vm.features:             # an SVE VM meets the destination's SVE view of its ID registers
            self.dst.update(dest.sve_values)
        if "PMU_V3" in vm.features:          # a VM with a PMU meets the destination's PMU view (PMUVer, PerfMon)
            self.dst.update(dest.pmu_values)
        if dest.ssbs_hidden_values and self.view.ssbs_hidden:   # a VM without SSBS meets the destination's
            self.dst.update(dest.ssbs_hidden_values)             # firmware levels for it (WORKAROUND_2, 6.12+)
        self.dst_listed = frozenset(dest.reg_list)
        self.masks = dest.writable_masks
        self.kernel = dest.kernel
        self.cap239 = dest.cap(CAP239) > 0
        # AArch32 at EL0: (destination host, VM); without it KVM makes the "aa32" ID registers RAZ/WI (6.1+).
        self.aa32 = (_aa32(self.dst), self.view.aa32)
        self.entries: list[PlanEntry] = []
        self.frags: list[bytes] = []
        self.notes: list[str] = []

    def add(self, name, rid, fld, s, d, planned, verdict, reason, sees="") -> None:
        e = PlanEntry(name, rid, fld, s, d, planned, verdict, reason, sees)
        self.entries.append(e)
        self.frags.append(frag(e))


def negotiate(vm: VmProfile, dest: HostCapabilities, policy: Policy | None = None) -> Plan:
    pol = policy or default_policy()
    if dest.arch != "aarch64" or vm_arch(vm) not in ("aarch64", ""):
        return negotiate_generic(vm, dest, pol)
    c = _Ctx(vm, dest, pol)
    cat = c.cat
    midr_id, revidr_id = cat.id_of("MIDR_EL1"), cat.id_of("REVIDR_EL1")

    # big.LITTLE: which cluster's MIDR the guest will see (without cap 239) and whose errata apply.
    clusters = sorted(set(dest.cpu_midrs))
    big_little = len(clusters) > 1
    d_midr = c.dst.get(midr_id, 0)
    s_midr = c.src.get(midr_id, 0)
    assumed, cpus = d_midr, ()
    if big_little:
        assumed = s_midr if s_midr in clusters else (d_midr if d_midr in clusters else clusters[0])
        cpus = tuple(i for i, m in enumerate(dest.cpu_midrs) if m == assumed)
        listing = ", ".join(errata.describe_midr(m) for m in clusters)
        if pol.big_little == "refuse":
            c.add("MIDR_EL1", midr_id, "cluster", s_midr, assumed, d_midr, Verdict.REFUSE,
                  f"destination is big.LITTLE ({listing}); policy refuses heterogeneous hosts")
        else:
            c.add("MIDR_EL1", midr_id, "cluster", s_midr, assumed, d_midr, Verdict.OVERRIDE,
                  f"destination is big.LITTLE ({listing}); plan assumes the cluster {errata.describe_midr(assumed)} "
                  f"on CPUs {', '.join(map(str, cpus))}: {pol.big_little_reason}",
                  f"vCPUs confined to CPUs {', '.join(map(str, cpus))}")
    c.dview_midr = assumed

    # Errata: the physical implementation the guest will run on vs. every implementation it knows.
    known = [(s_midr, c.src.get(revidr_id))] + [(m, None) for m in vm.seen_midrs] + \
            [(i.midr, i.revidr) for i in vm.target_impls]
    c.errata_missing = errata.missing([(assumed, c.dst.get(revidr_id))], known) if midr_id in c.src else []

    src, dst, listed = c.src, c.dst, c.dst_listed
    rows = c.view.rows
    extra = [r for r in dst.keys() - src.keys() if r in listed and _meta(r)[1] in _DEST_ONLY]
    if extra:                        # ID registers only the destination lists: decided in id order with the rest
        rows = sorted(rows + [(r, *_meta(r)[:2], None, None) for r in extra])
    entries, frags, memo = c.entries, c.frags, _MEMO
    eappend, fappend, dget = entries.append, frags.append, dst.get
    per_field_key = (c.masks is None, c.kernel, dest.kernel_version, pol.digest)
    errata_key = tuple(e.erratum for e in c.errata_missing)
    absent = c.view.absent
    for rid, name, cls, s, same in rows:
        d = dget(rid)
        if same is not None and s == d and rid in listed:      # fast path: identical and listed
            eappend(same[0])
            fappend(same[1])
            continue
        if rid == regid.SVE_VLS:
            _sve_vls(c, s, d)
            continue
        if s is None:
            if d and cls == "id":
                _idreg(c, rid, name, 0, d, note="not listed on the source kernel (read as 0 there); ")
            continue
        # every other decision is a pure function of its key: memoised (the absent ones per VM, in its view)
        if rid not in listed:
            table, key, fn = absent, (rid, dest.kernel_version), _absent    # the VM and policy: the view's own
        elif d is None:
            c.add(name, rid, "", s, 0, s, Verdict.REFUSE, "the destination listed it but reported no value")
            continue
        elif cls == "imp_id":
            table, key, fn = memo, (rid, s, d, c.dview_midr, c.cap239, _mask(c, rid), errata_key, per_field_key), _impid
        elif cls == "fw":
            table, key, fn = memo, (rid, s, d, pol.digest), _fw
        elif cls in ("id", "cache"):
            table, key, fn = memo, (rid, s, d, _mask(c, rid), per_field_key, c.aa32, _setter_inputs(c, name)), _idreg
        elif cls == "demux":
            table, key, fn = memo, (rid, s, d, per_field_key, _setter_inputs(c, name)), _ccsidr
        else:
            c.add(name, rid, "", s, d, s, Verdict.SET, "per-vCPU state: restored as is")
            continue
        hit = table.get(key)
        if hit is None:
            start = len(entries)
            fn(c, rid, name, s, d)
            if len(table) >= _MEMO_MAX:
                table.clear()
            table[key] = (tuple(entries[start:]), tuple(frags[start:]))
        else:
            entries.extend(hit[0])
            frags.extend(hit[1])

    # vCPU init features: the destination must offer each one (the target itself is never migrated).
    caps = dict(dest.caps)
    for feat in vm.features:
        cap = kvmabi.FEATURE_GATES.get(feat, "unchecked")       # data/vcpu_features.tsv
        since = kvmabi.FEATURE_SINCE.get(feat, ())
        missing = [r for r in kvmabi.FEATURE_REQUIRES.get(feat, ()) if r not in vm.features]
        if missing:
            c.add("vcpu_init", 0, feat, 1, 0, 0, Verdict.REFUSE,
                  f"vCPU feature {feat} needs {', '.join(missing)} too: KVM_ARM_VCPU_INIT refuses it alone (EINVAL)")
        elif tuple(c.kernel) < since:
            c.add("vcpu_init", 0, feat, 1, 0, 0, Verdict.REFUSE,
                  f"vCPU feature {feat} is unknown to the destination kernel {c.dest.kernel_version} (from "
                  f"{'.'.join(map(str, since))}): KVM_ARM_VCPU_INIT answers ENOENT")
        elif cap == "always":
            continue
        elif cap == "unchecked":
            c.add("vcpu_init", 0, feat, 1, 0, 0, Verdict.REFUSE, f"vCPU feature {feat}: invariantd cannot check it yet")
        elif cap not in caps:
            c.notes.append(f"vCPU feature {feat}: the destination document does not report {cap}; "
                           f"KVM_ARM_VCPU_INIT decides")
        elif not caps[cap]:
            c.add("vcpu_init", 0, feat, 1, 0, 0, Verdict.REFUSE,
                  f"vCPU feature {feat} needs {cap}, which the destination does not offer")

    # Source registers the VM profile lists without a value (drift candidates only).
    if c.view.valueless:
        for rid in [r for r in c.view.valueless if r not in c.dst_listed]:
            d = pol.drift.get(rid)
            if d is not None and d.unreachable(c.src):
                c.add(cat.name(rid), rid, "", 0, 0, 0, Verdict.DROP,
                      f"absent on the destination; the VM has no {d.feature[3]}, so the guest cannot reach it")
            elif d is not None:
                c.add(cat.name(rid), rid, "", 0, 0, 0, Verdict.REFUSE,
                      "absent on the destination and the VM profile carries no value to prove it is the reset value")

    if c.errata_missing:
        listing = "; ".join(f"{e.erratum}: {e.description}" for e in c.errata_missing)
        verdict = Verdict.REFUSE if pol.errata_missing == "refuse" else Verdict.OVERRIDE
        c.add("MIDR_EL1", midr_id, "errata", s_midr, assumed, c.dst.get(midr_id, 0), verdict,
              f"destination {errata.describe_midr(assumed)} needs workarounds the guest never enabled: {listing}; "
              f"{pol.errata_reason}",
              "" if verdict is Verdict.REFUSE else f"runs without workarounds {', '.join(e.erratum for e in c.errata_missing)}")

    if vm.target_impls:
        bmap2 = cat.id_of("KVM_REG_ARM_VENDOR_HYP_BMAP_2")
        if bmap2 in c.dst_listed:
            c.notes.append("VMM: keep VENDOR_HYP_BMAP_2 = 0b11, forward SMCCC 0xC6000040/0xC6000041 to userspace and "
                           "answer them with target_impls (unchanged for the VM's lifetime)")
        else:
            c.add("KVM_REG_ARM_VENDOR_HYP_BMAP_2", bmap2, "", 0b11, 0, 0, Verdict.REFUSE,
                  "the VM publishes target implementations (errata discovery) but the destination kernel has no "
                  "BMAP_2 (< 6.15)")

    entries = tuple(c.entries)
    verdicts = list(map(_VERDICT, entries))        # `in` on a list compares identity first: no Enum.__hash__
    migratable = Verdict.REFUSE not in verdicts
    pinned = Verdict.PIN in verdicts and any(e.verdict is Verdict.PIN and not e.field for e in entries)
    if pinned:
        c.notes.append("VMM: enable KVM_CAP_ARM_WRITABLE_IMP_ID_REGS (239) on the VM before creating any vCPU")
    visible = tuple(dict.fromkeys(_visible(entries)))
    fields = dict(vm_name=vm.name, destination=dest.name, policy=pol.label, migratable=migratable,
                  enable_cap239=pinned, target_impls=vm.target_impls, big_little=big_little,
                  assumed_cluster=assumed if big_little else 0, cluster_cpus=cpus, entries=entries,
                  guest_visible=visible, notes=tuple(c.notes))
    return Plan(**fields, digest=plan_digest(Plan(**fields), c.frags))


@lru_cache(maxsize=1 << 14)
def _identical(name: str, rid: int, s: int) -> tuple[PlanEntry, bytes]:
    e = PlanEntry(name, rid, "", s, s, s, Verdict.IDENTICAL, "same value")
    return e, frag(e)


def _visible(entries):
    """Register-level descriptions where the register has one (e.g. MIDR), else its field entries."""
    entries = list(filter(_SEES, entries))
    reg_level = {e.register for e in entries if not e.field}
    for e in entries:
        if e.guest_sees and (not e.field or e.register not in reg_level):
            yield f"{e.register}{'.' + e.field if e.field else ''}: {e.guest_sees}"


# --- per register class --------------------------------------------------------------------------------

def _absent(c: _Ctx, rid: int, name: str, s: int, _d: int | None) -> None:
    cls = _meta(rid)[1]
    drift = c.pol.drift.get(rid)
    fw = c.cat.fwregs.get(rid)
    if drift is not None:
        if drift.unreachable(c.src):
            feat = drift.feature[3]
            c.add(name, rid, "", s, 0, 0, Verdict.DROP, f"not listed on the destination kernel {c.dest.kernel_version}; "
                                                        f"the VM has no {feat}, so the guest cannot reach it "
                                                        f"(whatever it holds, {s:#x}): {drift.reason}")
        elif s in drift.resets:
            c.add(name, rid, "", s, 0, 0, Verdict.DROP, f"not listed on the destination kernel {c.dest.kernel_version}; "
                                                        f"value {s:#x} is the reset value: {drift.reason}")
        else:
            c.add(name, rid, "", s, 0, 0, Verdict.REFUSE,
                  f"not listed on the destination kernel {c.dest.kernel_version} (ENOENT) and {s:#x} is not its "
                  f"reset value ({', '.join(f'{r:#x}' for r in drift.resets)})")
        return
    if cls == "id" and s == 0:
        c.add(name, rid, "", s, 0, 0, Verdict.DROP,
              "ID slot not listed on the destination; 0 is the value of an unallocated/hidden ID register")
        return
    if fw is not None and fw.reset != "host" and s == int(fw.reset, 0):
        c.add(name, rid, "", s, 0, 0, Verdict.DROP, f"not listed on the destination; {s:#x} is its reset value")
        return
    c.add(name, rid, "", s, 0, 0, Verdict.REFUSE,
          f"not listed on the destination kernel {c.dest.kernel_version} (would fail with ENOENT) and no rule "
          f"proves {s:#x} is its reset value")


def _impid(c: _Ctx, rid: int, name: str, s: int, d: int) -> None:
    is_midr = name == "MIDR_EL1"
    seen = c.dview_midr if is_midr else d
    fields = c.cat.fields_of(name)
    if s == d and seen == s:
        c.add(name, rid, "", s, d, s, Verdict.IDENTICAL, "same value")
        return
    if c.cap239 and c.pol.pin:
        for f in fields:
            if f.raw(s) != f.raw(d):
                c.add(name, rid, f.name, f.raw(s), f.raw(d), f.raw(s), Verdict.PIN, "kept with cap 239")
        c.add(name, rid, "", s, d, s, Verdict.PIN, f"{c.pol.pin_reason}; destination value {d:#x} is not shown to the guest")
        return
    rule = c.pol.imp_id[name]
    why_fixed = (f"destination kernel {c.dest.kernel_version} does not offer cap 239"
                 + (" (its writable-mask report for this register does not make it writable without the cap)"
                    if c.masks is not None and _mask(c, rid) else "")
                 + (" (policy: imp_id.pin = false)" if c.cap239 else ""))
    problem = ""
    if rule.override == "never":
        problem = "policy allows no change of this register"
    elif rule.override == "same-part" and is_midr:
        diff = [f.name for f in fields if f.name in _MIDR_SAME_PART and f.raw(s) != f.raw(seen)]
        if diff:
            problem = f"different {'/'.join(diff)}: not a revision of the same part"
        elif c.errata_missing:
            problem = "the errata check fails (see the errata entry)"
    sees = f"{errata.describe_midr(s)} -> {errata.describe_midr(seen)}" if is_midr else f"{s:#x} -> {seen:#x}"
    verdict = Verdict.REFUSE if problem else Verdict.OVERRIDE
    for f in fields:
        if f.raw(s) != f.raw(seen):
            c.add(name, rid, f.name, f.raw(s), f.raw(seen), f.raw(d), verdict,
                  problem or "destination value shown to the guest", f"{f.raw(s):#x} -> {f.raw(seen):#x}")
    if problem:
        c.add(name, rid, "", s, d, d, Verdict.REFUSE, f"{why_fixed}; {problem} ({rule.reason})")
    else:
        extra = "; errata check passed: the destination needs no workaround the guest lacks" if is_midr else ""
        c.add(name, rid, "", s, d, d, Verdict.OVERRIDE, f"{why_fixed}; {rule.reason}{extra}", sees)


def _setter_inputs(c: _Ctx, name: str) -> tuple:
    """The destination values a register's kernel setter also reads (setters.tsv: CLIDR_EL1 reads CTR_EL0): part
    of the memo key, since the decision depends on them."""
    checks = c.cat.setters.get(c.cat.setter_key(name))
    if not checks:
        return ()
    return tuple(c.dst.get(c.cat.id_of(k.arg.partition(".")[0])) for k in checks if k.check in ("idc", "linesize"))


def _aa32(values: dict[int, int]) -> bool | None:
    """Whether the host (or VM) these values describe runs AArch32 at EL0; None when they have no
    ID_AA64PFR0_EL1 to tell (the ordinary rules apply)."""
    cat = catalog()
    return cat.aarch32_el0(values) if cat.id_of("ID_AA64PFR0_EL1") in values else None


def _ssbs_hidden(vm: VmProfile) -> bool:
    """The VM's ID_AA64PFR1_EL1.SSBS is 0 (so KVM reports its firmware levels as for a VM without SSBS)."""
    cat = catalog()
    pfr1 = dict(vm.values).get(cat.id_of("ID_AA64PFR1_EL1"))
    return pfr1 is not None and not next(f for f in cat.fields_of("ID_AA64PFR1_EL1") if f.name == "SSBS").get(pfr1)


def _mask(c: _Ctx, rid: int) -> int:
    idx = _meta(rid)[2]
    if c.masks is None or idx is None:
        return 0
    return c.masks[idx]


def _direction(f: Field, fs: int, fd: int) -> str:
    """gain: the destination offers more than the guest saw (the source's value is the safe one of the two, by
    Field.safe_value); loss: less; exact: the field has no safe direction."""
    if f.kvm_safety not in (Safety.LOWER, Safety.HIGHER):
        return "exact"
    return "gain" if f.safe_value(fs, fd) == fs else "loss"


def _ccsidr(c: _Ctx, rid: int, name: str, s: int, d: int) -> None:
    """CCSIDR[n], a vCPU's cache geometry (KVM_REG_ARM_DEMUX_ID_CCSIDR): restored as the source read it where the
    destination kernel's set_ccsidr takes it (setters.tsv); before 6.3 only the physical CPU's own value is taken."""
    cat = c.cat
    if not cat.setter_checks(name, c.kernel):
        c.add(name, rid, "", s, d, d, Verdict.REFUSE,
              f"the destination kernel {c.dest.kernel_version} reports the physical CPU's cache geometry and refuses "
              f"any other (writable from 6.3): the guest would see {d:#x} instead of {s:#x}")
        return
    problems = cat.setter_problems(name, s, c.kernel, c.dst)
    if problems:
        c.add(name, rid, "", s, d, d, Verdict.REFUSE, "; ".join(p for _, p in problems))
    else:
        c.add(name, rid, "", s, d, s, Verdict.SET, "per-vCPU cache geometry: the destination's set_ccsidr takes it")


def _idreg(c: _Ctx, rid: int, name: str, s: int, d: int, note: str = "") -> None:
    if s == d:
        c.add(name, rid, "", s, d, s, Verdict.IDENTICAL, "same value")
        return
    pol, cat = c.pol, c.cat
    if cat.visibility(rid) == "aa32" and c.aa32[0] is False and tuple(c.kernel) >= (6, 1):
        c.add(name, rid, "", s, d, d, Verdict.REFUSE,
              f"{note}the destination has no AArch32 at EL0: KVM reads {name} as 0 and ignores writes, so the guest "
              f"would see 0 instead of {s:#x}" + ("" if c.aa32[1] else
                                                  " (the VM has no AArch32 EL0 either, so the value is UNKNOWN to "
                                                  "its guest; carrying it as 0 is not planned yet)"))
        return
    if cat.setter_checks(name, c.kernel):      # KVM's own setter decides (protocol/data/setters.tsv: set_clidr)
        problems = cat.setter_problems(name, s, c.kernel, c.dst)
        if problems:
            c.add(name, rid, "", s, d, d, Verdict.REFUSE, f"{note}" + "; ".join(p for _, p in problems))
        else:
            setter = cat.setter_checks(name, c.kernel)[0].why.split(":")[0]
            c.add(name, rid, "", s, d, s, Verdict.SET,
                  f"{note}kept: the destination kernel fabricates {name} and its {setter} accepts this value")
        return
    per_field = c.masks is not None
    wmask = _mask(c, rid)
    planned = s
    refused = overridden = False
    covered = 0
    # KVM's own setter for this register refuses some field values before the generic rule (prechecks.tsv)
    setter = {f.name: why for f, why in cat.precheck(name, s, c.kernel)[1]} if per_field else {}
    legacy = {} if per_field else cat.legacy_writable(name, c.kernel)      # legacy_writable.tsv
    legacy_mask = 0
    for f in cat.fields_of(name):
        covered |= f.mask
        if not (s ^ d) & f.mask:
            continue
        fs, fd = f.get(s), f.get(d)
        writable = per_field and f.in_kernel(c.kernel) and (f.mask & wmask) == f.mask
        if writable and f.safe_value(fs, fd) == fs and f.name not in setter:
            c.add(name, rid, f.name, f.raw(s), f.raw(d), f.raw(s), Verdict.SET,
                  f"{note}writable here and {_type(f)}-safe against the destination's {f.raw(d):#x}")
            continue
        if f.name in legacy and fs < fd and f.safe_value(fs, fd) == fs:
            legacy_mask |= f.mask
            c.add(name, rid, f.name, f.raw(s), f.raw(d), f.raw(s), Verdict.SET,
                  f"{note}lowered as it is: {legacy[f.name]} (kernel {c.dest.kernel_version})")
            continue
        if not per_field:
            why = f"ID registers must match on kernel {c.dest.kernel_version} (no writable masks)"
        elif f.name in setter:
            why = f"KVM's setter refuses it ({setter[f.name]})"
        elif not writable:
            why = "not writable on the destination (outside its writable mask)"
        else:
            why = f"{f.raw(s):#x} is not {_type(f)}-safe against the destination's {f.raw(d):#x}"
        direction = _direction(f, fs, fd)
        rule = pol.field_rules.get((name, f.name))
        action = rule.action if rule else getattr(pol, direction)
        reason = rule.reason if rule else getattr(pol, f"{direction}_reason")
        label = {"gain": "destination offers more", "loss": "destination offers less",
                 "exact": f"{_type(f)} field"}[direction]
        if action == "allow":
            planned = f.put(planned, f.raw(d))
            overridden = True
            c.add(name, rid, f.name, f.raw(s), f.raw(d), f.raw(d), Verdict.OVERRIDE,
                  f"{note}{why}; {label}: {reason}", f"{f.raw(s):#x} -> {f.raw(d):#x}")
        else:
            refused = True
            c.add(name, rid, f.name, f.raw(s), f.raw(d), f.raw(d), Verdict.REFUSE, f"{note}{why}; {label}: {reason}")
    rest = (s ^ d) & ~covered & 0xFFFFFFFFFFFFFFFF
    if rest:
        if pol.exact == "allow":
            planned = (planned & ~rest) | (d & rest)
            overridden = True
            c.add(name, rid, "(bits)", s & rest, d & rest, d & rest, Verdict.OVERRIDE,
                  f"{note}bits {rest:#x} lie outside every catalogued field: {pol.exact_reason}",
                  f"bits {rest:#x} change")
        else:
            refused = True
            c.add(name, rid, "(bits)", s & rest, d & rest, d & rest, Verdict.REFUSE,
                  f"{note}bits {rest:#x} differ and lie outside every catalogued field: {pol.exact_reason}")
    if not refused:
        # Safety net: the planned value must pass the destination kernel's own rule.
        if per_field:
            stored, problems = cat.precheck(name, planned, c.kernel)
            problems += cat.check_write(name, stored, d, wmask, c.kernel)
        else:
            problems = [] if (planned ^ d) & ~legacy_mask == 0 else \
                [(None, "value differs and this kernel accepts only its own")]
        if problems:
            refused = True
            c.add(name, rid, "(check)", planned, d, d, Verdict.REFUSE,
                  "planned value fails the destination's rule: " + "; ".join(p for _, p in problems))
    if refused:
        c.add(name, rid, "", s, d, d, Verdict.REFUSE, f"{note}at least one field cannot be carried (see fields)")
    elif overridden:
        c.add(name, rid, "", s, d, planned, Verdict.OVERRIDE, f"{note}merged: source fields where safe, destination "
                                                              f"fields where the policy allows the guest to see them")
    else:
        c.add(name, rid, "", s, d, planned, Verdict.SET, f"{note}every differing field is writable and safe here")


def _sve_vls(c: _Ctx, s: int | None, d: int | None) -> None:
    """An SVE VM's vector lengths (KVM_REG_ARM64_SVE_VLS) against the destination's: KVM's set_sve_vls rule
    (catalog.sve_vls_problem), which the simulator applies too and the real kernels confirm (conformance)."""
    if s is None or "SVE" not in c.vm.features:
        return                                   # not an SVE VM: no vector lengths to carry
    name, rid = "KVM_REG_ARM64_SVE_VLS", regid.SVE_VLS
    if d is None:
        c.add(name, rid, "", s, 0, s, Verdict.SET, "the destination document does not list its SVE vector lengths: "
                                                   "KVM decides when the VLs are written (before finalize)")
    elif s == d:
        c.add(name, rid, "", s, d, s, Verdict.IDENTICAL, "same vector lengths")
    elif (why := sve_vls_problem(s, d)) is None:
        c.add(name, rid, "", s, d, s, Verdict.SET, f"VLs {', '.join(str(128 * q) for q in sve_vqs(s))} are the "
                                                   f"destination's up to their maximum: KVM caps the length there")
    else:
        c.add(name, rid, "", s, d, d, Verdict.REFUSE, f"KVM refuses the VM's vector lengths here: {why}")


def _fw(c: _Ctx, rid: int, name: str, s: int, d: int) -> None:
    if s == d:
        c.add(name, rid, "", s, d, s, Verdict.IDENTICAL, "same value")
        return
    fw = c.cat.fwregs.get(rid)
    kind = fw.kind if fw else "unknown"
    if kind == "psci":
        ok = s <= d and s in fw.values                    # the versions the setter knows (fwregs.tsv)
        c.add(name, rid, "", s, d, s if ok else d, Verdict.SET if ok else Verdict.REFUSE,
              f"PSCI version {s:#x} {'is offered by' if ok else 'is not offered by'} the destination (up to {d:#x})")
    elif kind == "workaround":
        enabled_bit = bool(fw.fold)                       # WORKAROUND_2 also has the ENABLED bit (4)
        fs, fd = fw.folded(s & 0xF), fw.folded(d & 0xF)   # as the setter compares them (fwregs.tsv)
        if s >> 5 or (s >> 4 and not enabled_bit) or fs is None:
            c.add(name, rid, "", s, d, d, Verdict.REFUSE, f"level {s:#x} does not fit the register or is not "
                                                          f"one KVM's setter knows")
        elif fd is not None and fs <= fd:
            c.add(name, rid, "", s, d, s, Verdict.SET,
                  f"source level {s:#x} is not above the destination's {d:#x}: the guest keeps what it was told")
        else:
            c.add(name, rid, "", s, d, d, Verdict.REFUSE,
                  f"source level {s:#x} is above the destination's {d:#x}: the destination is less mitigated "
                  f"(KVM refuses with EINVAL)")
    elif kind == "bitmap":
        supported = d | fw.accepts                        # bits a new VM takes beyond its own (fwregs.tsv)
        if s & ~supported:
            c.add(name, rid, "", s, d, d, Verdict.REFUSE,
                  f"hypercall bits {s & ~supported:#x} are not offered by the destination ({supported:#x})")
        else:
            c.add(name, rid, "", s, d, s, Verdict.SET, f"hypercall bits {s:#x} are all offered by the destination")
    else:
        c.add(name, rid, "", s, d, d, Verdict.REFUSE, "unknown firmware register kind: cannot prove the write is safe")
