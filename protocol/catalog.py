"""The arm64 register catalog: names, classes and ID-register fields, loaded from data/*.tsv.

The tables are data (one row per register or per field); this module only loads, validates and
answers questions about them. Validation runs at import: a broken table fails loudly, naming the row.
The field check reproduces the kernel's arm64_check_features() (arch/arm64/kvm/sys_regs.c) so the
simulator and the negotiation engine apply exactly one rule.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import lru_cache

from . import kernelver, regid, tables


class CatalogError(ValueError):
    """A catalog table is inconsistent (overlapping fields, bad width, unsorted rows...)."""


class Safety(enum.Enum):
    LOWER = "LOWER"                    # FTR_LOWER_SAFE: may lower, never raise
    HIGHER = "HIGHER"                  # FTR_HIGHER_SAFE: may raise, never lower
    EXACT = "EXACT"                    # FTR_EXACT: the current value or the field's safe value
    HIGHER_OR_ZERO = "HIGHER_OR_ZERO"  # FTR_HIGHER_OR_ZERO_SAFE: raise, or 0
    NONE = "NONE"                      # no cpufeature row: must equal the kernel's value


@dataclass(frozen=True, slots=True)
class Field:
    register: str
    name: str
    shift: int
    width: int
    signed: bool
    safety: Safety
    safe: int
    since: tuple[int, ...]
    note: str
    kvm_safety: Safety           # the type KVM applies (differs from safety where kvm_overrides.tsv says so)
    kvm_why: str

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.shift

    @property
    def bits(self) -> str:
        hi = self.shift + self.width - 1
        return f"{hi}:{self.shift}" if self.width > 1 else str(self.shift)

    def raw(self, value: int) -> int:
        return (value >> self.shift) & ((1 << self.width) - 1)

    def get(self, value: int) -> int:
        """The field's value, sign-extended for signed fields (0xF reads as -1)."""
        v = self.raw(value)
        if self.signed and v & (1 << (self.width - 1)):
            v -= 1 << self.width
        return v

    def put(self, value: int, field_value: int) -> int:
        return (value & ~self.mask) | ((field_value & ((1 << self.width) - 1)) << self.shift)

    def in_kernel(self, kernel: tuple[int, ...] | None) -> bool:
        return self.safety is not Safety.NONE and (kernel is None or kernel >= self.since)

    def safe_value(self, new: int, cur: int) -> int:
        """arm64_ftr_safe_value() with KVM's type overrides; operands as returned by get()."""
        t = self.kvm_safety
        if t is Safety.EXACT:
            return self.get(self.put(0, self.safe))
        if t is Safety.LOWER:
            return min(new, cur)
        if t is Safety.HIGHER:
            return max(new, cur)
        if t is Safety.HIGHER_OR_ZERO:
            return 0 if new == 0 or cur == 0 else max(new, cur)
        return cur


@dataclass(frozen=True, slots=True)
class SysReg:
    name: str
    encoding: tuple[int, int, int, int, int]
    cls: str          # imp_id | id | cache | state
    reg_id: int
    visibility: str = "-"   # aa32: RAZ + userspace writes ignored on a host without AArch32 EL0 (sysregs.tsv)

    @property
    def mask_index(self) -> int | None:
        """Index into KVM_ARM_GET_REG_WRITABLE_MASKS' 192-entry array, or None outside the range."""
        return mask_index(self.encoding)


@dataclass(frozen=True, slots=True)
class FwReg:
    name: str
    reg_id: int
    kind: str        # psci | workaround | bitmap
    reset: str       # "host" or a number
    since: tuple[int, ...]
    accepts: int = 0  # bitmap: bits a new VM accepts beyond the value it reads (its reset / the host's)
    values: tuple[int, ...] = ()          # psci: the versions the setter knows
    fold: tuple[tuple[int, int], ...] = ()  # workaround: (level, folded level); () = compared as it is

    def folded(self, level: int) -> int | None:
        """A workaround level as the setter compares it (None: a level it refuses outright)."""
        if not self.fold:
            return level
        return dict(self.fold).get(level)


@dataclass(frozen=True, slots=True)
class Precheck:
    """A check one of KVM's custom ID-register setters makes before the generic rule (prechecks.tsv)."""
    register: str
    field: Field
    min: int | None               # raw field values below it: EINVAL
    refuse: tuple[int, ...]       # raw field values refused: EINVAL
    rewrite: tuple[int, int] | None   # (from, to): KVM stores `to` when userspace writes `from`
    since: tuple[int, ...]
    why: str

    def refuses(self, value: int) -> bool:
        raw = self.field.raw(value)
        return (self.min is not None and raw < self.min) or raw in self.refuse


@dataclass(frozen=True, slots=True)
class SetterCheck:
    """One check of KVM's whole-register setter for a cache-geometry register (setters.tsv)."""
    register: str
    check: str                    # res0 | idc
    arg: str
    since: tuple[int, ...]
    until: tuple[int, ...] | None
    errno: str
    why: str

    def active(self, kernel: tuple[int, ...]) -> bool:
        return tuple(kernel) >= self.since and (self.until is None or tuple(kernel) < self.until)


@dataclass(frozen=True, slots=True)
class Drift:
    register: str
    reg_id: int
    resets: tuple[int, ...]
    since: tuple[int, ...]
    reason: str
    feature: tuple[int, int, int, str] | None = None   # (ID register id, shift, width, FEAT_ name); None: none

    @property
    def reset(self) -> int:
        return self.resets[0]

    def unreachable(self, values: dict[int, int]) -> bool:
        """Whether a guest with these ID register values cannot reach the register (its feature field is 0).
        False when the register has no gating feature or the values do not say."""
        if self.feature is None:
            return False
        rid, shift, width, _ = self.feature
        v = values.get(rid)
        return v is not None and (v >> shift) & ((1 << width) - 1) == 0


def sve_vqs(vls: int) -> list[int]:
    """The vector lengths of a KVM_REG_ARM64_SVE_VLS value, in quadwords (bit vq-1; VL = 128 * vq bits)."""
    return [q + 1 for q in range(vls.bit_length()) if vls >> q & 1]


def sve_vls_problem(vls: int, host: int) -> str | None:
    """Why KVM_SET_ONE_REG(KVM_REG_ARM64_SVE_VLS) = vls fails on a host offering `host` (set_sve_vls,
    arch/arm64/kvm/guest.c), or None: at least one length, the maximum within the host's, and exactly the host's
    lengths up to that maximum (KVM can only cap the length, ZCR_EL2.LEN; it cannot hide one below the cap)."""
    if not vls:
        return "no vector length"
    top = vls.bit_length()
    bits = lambda v: "/".join(str(128 * q) for q in sve_vqs(v)) or "none"        # noqa: E731
    if top > host.bit_length():
        return f"maximum VL {128 * top} above the host's {128 * host.bit_length()} (host offers {bits(host)})"
    if vls != host & ((1 << top) - 1):
        return (f"VLs {bits(vls)} are not the host's up to {128 * top} ({bits(host & ((1 << top) - 1))}): KVM can "
                f"cap the vector length but not hide one below the cap")
    return None


def mask_index(enc: tuple[int, int, int, int, int]) -> int | None:
    op0, op1, crn, crm, op2 = enc
    if op0 != 3 or crn != 0 or op1 not in (0, 1, 3) or crm > 7:
        return None
    o = op1 & 3
    o = 2 if o == 3 else o
    return (o << 6) | ((crm & 7) << 3) | op2


class Catalog:
    def __init__(self) -> None:
        self.sysregs: dict[str, SysReg] = {}
        self.by_id: dict[int, SysReg] = {}
        for r in tables.rows("sysregs.tsv"):
            enc = tuple(int(r[k]) for k in ("op0", "op1", "crn", "crm", "op2"))
            rid = regid.sysreg(*enc)
            if r["name"] in self.sysregs or rid in self.by_id:
                raise CatalogError(f"sysregs.tsv: duplicate register {r['name']} / {rid:#x}")
            if r["class"] not in ("imp_id", "id", "cache", "state"):
                raise CatalogError(f"sysregs.tsv: {r['name']}: unknown class {r['class']!r}")
            if r["visibility"] not in ("-", "aa32"):
                raise CatalogError(f"sysregs.tsv: {r['name']}: unknown visibility {r['visibility']!r}")
            reg = SysReg(r["name"], enc, r["class"], rid, r["visibility"])
            self.sysregs[reg.name] = reg
            self.by_id[rid] = reg
        self.imp_masks: dict[str, int] = {}             # imp_id.tsv: writable bits with cap 239
        for r in tables.rows("imp_id.tsv"):
            if self.sysregs.get(r["register"]) is None or self.sysregs[r["register"]].cls != "imp_id":
                raise CatalogError(f"imp_id.tsv: {r['register']} is no imp_id register of sysregs.tsv")
            self.imp_masks[r["register"]] = int(r["mask"], 0)
        missing = [n for n, x in self.sysregs.items() if x.cls == "imp_id" and n not in self.imp_masks]
        if missing:
            raise CatalogError(f"imp_id.tsv: no row for {', '.join(missing)}")
        self.fwregs: dict[int, FwReg] = {}
        for r in tables.rows("fwregs.tsv"):
            rid = (regid.fw if r["group"] == "fw" else regid.fw_bmap)(int(r["index"]))
            vals, fold = (), ()
            if r["values"] != "-" and r["kind"] == "psci":
                vals = tuple(int(x, 0) for x in r["values"].split(";"))
            elif r["values"] != "-":
                fold = tuple((int(a), int(to)) for grp in r["values"].split(";") for lhs, to in [grp.split(">")]
                             for a in lhs.split(","))
            self.fwregs[rid] = FwReg(r["name"], rid, r["kind"], r["reset"], kernelver.data(r["since"]), int(r["accepts"], 0),
                                     vals, fold)
        self.drift: dict[int, Drift] = {}
        for r in tables.rows("drift.tsv"):
            rid = self.id_of(r["register"])
            feat = None
            if r["feature"] != "-":
                try:
                    reg, shift, width, fname = r["feature"].split(":")
                    feat = (self.id_of(reg), int(shift), int(width), fname)
                except (ValueError, KeyError, CatalogError) as e:
                    raise CatalogError(f"drift.tsv: {r['register']}: feature {r['feature']!r} is not "
                                       f"REGISTER:shift:width:FEAT_NAME ({e})") from None
            self.drift[rid] = Drift(r["register"], rid, tuple(int(x, 0) for x in r["resets"].split(";")),
                                    kernelver.data(r["since"]), r["why"], feat)
        overrides = {(r["register"], r["field"]): r for r in tables.rows("kvm_overrides.tsv")}
        self.fields: dict[str, tuple[Field, ...]] = {}
        acc: dict[str, list[Field]] = {}
        for r in tables.rows("id_fields.tsv"):
            reg = r["register"]
            if reg not in self.sysregs:
                raise CatalogError(f"id_fields.tsv: field {r['field']} names unknown register {reg}")
            ov = overrides.pop((reg, r["field"]), None)
            safety = Safety(r["type"])
            f = Field(reg, r["field"], int(r["shift"]), int(r["width"]), r["sign"] == "S", safety,
                      int(r["safe"], 0), kernelver.data(r["since"]), r["note"],
                      Safety(ov["type"]) if ov else safety, ov["why"] if ov else "")
            acc.setdefault(reg, []).append(f)
        if overrides:
            raise CatalogError(f"kvm_overrides.tsv: rows name no known field: {sorted(overrides)}")
        for reg, fields in acc.items():
            self._validate(reg, fields)
            self.fields[reg] = tuple(fields)
        self.prechecks: dict[str, tuple[Precheck, ...]] = {}
        for r in tables.rows("prechecks.tsv"):
            f = next((x for x in self.fields_of(r["register"]) if x.name == r["field"]), None)
            if f is None:
                raise CatalogError(f"prechecks.tsv: {r['register']}.{r['field']}: no such field in id_fields.tsv")
            pc = Precheck(r["register"], f, int(r["min"]) if r["min"] else None,
                          tuple(int(x) for x in r["refuse"].split(";") if x),
                          tuple(int(x) for x in r["rewrite"].split(":")) if r["rewrite"] else None,
                          kernelver.data(r["since"]), r["why"])
            self.prechecks[pc.register] = self.prechecks.get(pc.register, ()) + (pc,)
        self.legacy: dict[str, tuple[tuple[Field, tuple[int, ...], tuple[int, ...], str], ...]] = {}
        for r in tables.rows("legacy_writable.tsv"):
            f = next((x for x in self.fields_of(r["register"]) if x.name == r["field"]), None)
            if f is None:
                raise CatalogError(f"legacy_writable.tsv: {r['register']}.{r['field']}: no such field")
            self.legacy[r["register"]] = self.legacy.get(r["register"], ()) + (
                (f, kernelver.data(r["since"]), kernelver.data(r["until"]), r["why"]),)
        self.setters: dict[str, tuple[SetterCheck, ...]] = {}
        for r in tables.rows("setters.tsv"):
            if r["check"] not in ("res0", "idc", "linesize"):
                raise CatalogError(f"setters.tsv: {r['register']}: unknown check {r['check']!r} (res0 | idc | linesize)")
            if r["check"] == "linesize" and not {"IminLine", "DminLine"} <= {f.name for f in self.fields_of(r["arg"])}:
                raise CatalogError(f"setters.tsv: {r['register']} linesize: {r['arg']} has no IminLine / DminLine")
            if r["check"] == "idc":
                reg, _, fld = r["arg"].partition(".")
                if not any(f.name == fld for f in self.fields_of(reg)):
                    raise CatalogError(f"setters.tsv: {r['register']} idc: {r['arg']} is no field of id_fields.tsv")
            sc = SetterCheck(r["register"], r["check"], r["arg"], kernelver.data(r["since"]),
                             kernelver.data(r["until"]) if r["until"] else None, r["errno"], r["why"])
            self.setters[sc.register] = self.setters.get(sc.register, ()) + (sc,)

    @staticmethod
    def _validate(reg: str, fields: list[Field]) -> None:
        prev = None
        for f in fields:
            if not 1 <= f.width <= 64 or f.shift < 0 or f.shift + f.width > 64:
                raise CatalogError(f"{reg}.{f.name}: bits {f.shift}+{f.width} outside 0..63")
            if f.safe >> f.width:
                raise CatalogError(f"{reg}.{f.name}: safe value {f.safe:#x} does not fit {f.width} bits")
            if prev is not None:
                if f.shift >= prev.shift:
                    raise CatalogError(f"{reg}: fields not sorted by descending shift at {f.name}")
                if f.shift + f.width > prev.shift:
                    raise CatalogError(f"{reg}: field {f.name} [{f.bits}] overlaps {prev.name} [{prev.bits}]")
            prev = f

    # --- lookups -----------------------------------------------------------------------------
    def sysreg(self, name: str) -> SysReg:
        try:
            return self.sysregs[name]
        except KeyError:
            raise KeyError(f"unknown system register {name!r}") from None

    def id_of(self, name: str) -> int:
        if name in self.sysregs:
            return self.sysregs[name].reg_id
        for fw in self.fwregs.values():
            if fw.name == name:
                return fw.reg_id
        for rid, n in _core_names().items():
            if n == name:
                return rid
        raise KeyError(f"unknown register name {name!r}")

    def name(self, reg_id: int) -> str:
        if reg_id in self.by_id:
            return self.by_id[reg_id].name
        if reg_id in self.fwregs:
            return self.fwregs[reg_id].name
        core = _core_names().get(reg_id)
        if core:
            return core
        try:
            d = regid.decode(reg_id)
        except regid.RegIdError:
            return f"REG_{reg_id:#018x}"
        if d.group == "sysreg":
            op0, op1, crn, crm, op2 = d.encoding
            return f"S{op0}_{op1}_C{crn}_C{crm}_{op2}"
        if d.group == "demux":
            return f"CCSIDR[{d.index & 0xFF}]"
        if d.group == "sve":
            i = d.index
            if i == 0xFFFF:
                return "KVM_REG_ARM64_SVE_VLS"
            if i < 0x400:
                return f"Z{i >> 5}[{i & 31}]"
            if i < 0x600:
                return f"P{(i - 0x400) >> 5}[{i & 31}]"
            return f"FFR[{i & 31}]"
        if d.group == "msr":
            return f"MSR_{d.index:#x}"
        return f"{d.group.upper()}_{d.index:#x}"

    def reg_class(self, reg_id: int) -> str:
        """imp_id | id | cache | state | fw | core | demux | sve | unknown."""
        if reg_id in self.by_id:
            return self.by_id[reg_id].cls
        try:
            d = regid.decode(reg_id)
        except regid.RegIdError:
            return "unknown"
        if d.group == "sysreg":
            op0, op1, crn, crm, op2 = d.encoding
            # the feature-ID space (op0=3, op1=0, CRn=0, CRm=1..7) holds ID registers only, named or not
            return "id" if (op0, op1, crn) == (3, 0, 0) and 1 <= crm <= 7 else "state"
        if d.group in ("fw", "fw-bmap"):
            return "fw"
        return d.group

    def visibility(self, reg_id: int) -> str:
        """sysregs.tsv's visibility rule of a register ("-" when none)."""
        reg = self.by_id.get(reg_id)
        return reg.visibility if reg else "-"

    def aarch32_el0(self, values) -> bool:
        """Whether a host (its ID_AA64PFR0_EL1 value in `values`, reg_id -> value) runs AArch32 at EL0: KVM's
        kvm_supports_32bit_el0(). Without it the "aa32" registers read 0 and ignore userspace writes."""
        pfr0 = self.id_of("ID_AA64PFR0_EL1")
        el0 = next(f for f in self.fields_of("ID_AA64PFR0_EL1") if f.name == "EL0")
        return pfr0 in values and el0.get(values[pfr0]) >= 2

    def fields_of(self, reg: str | int) -> tuple[Field, ...]:
        name = reg if isinstance(reg, str) else self.name(reg)
        return self.fields.get(name, ())

    def decode_fields(self, reg: str | int, value: int) -> dict[str, int]:
        return {f.name: f.raw(value) for f in self.fields_of(reg)}

    # --- the kernel's per-field rule ----------------------------------------------------------
    def precheck(self, reg: str, value: int, kernel: tuple[int, ...]) -> tuple[int, list[tuple[Field, str]]]:
        """KVM's custom setter of `reg` on `kernel` (prechecks.tsv): (the value KVM would store, its refusals)."""
        stored, problems = value, []
        for pc in self.prechecks.get(reg, ()):
            if tuple(kernel) < pc.since:
                continue
            if pc.refuses(value):
                problems.append((pc.field, f"{pc.field.name}={pc.field.raw(value):#x}: {pc.why}"))
            elif pc.rewrite and pc.field.raw(value) == pc.rewrite[0]:
                stored = pc.field.put(stored, pc.rewrite[1])
        return stored, problems

    def legacy_writable(self, reg: str, kernel: tuple[int, ...]) -> dict[str, str]:
        """Fields of `reg` a kernel without writable masks still lets userspace lower (legacy_writable.tsv):
        {field name: why}."""
        return {f.name: why for f, since, until, why in self.legacy.get(reg, ())
                if since <= tuple(kernel) < until}

    @staticmethod
    def setter_key(reg: str) -> str:
        """The setters.tsv row name of a register: every CCSIDR[n] (KVM_REG_ARM_DEMUX_ID_CCSIDR) is CCSIDR_EL1."""
        return "CCSIDR_EL1" if reg.startswith("CCSIDR[") else reg

    def setter_checks(self, reg: str, kernel: tuple[int, ...]) -> tuple[SetterCheck, ...]:
        """The checks KVM's own setter of `reg` makes on `kernel` (setters.tsv); () = the register is invariant
        there (or has no such setter)."""
        return tuple(c for c in self.setters.get(self.setter_key(reg), ()) if c.active(kernel))

    def min_line_problem(self, reg: str, value: int, ctr: int) -> str | None:
        """set_ccsidr's line-size rule for CCSIDR[n] (n = CSSELR: bit 0 InD selects the instruction cache):
        LineSize + 4 must be at least CTR_EL0's IminLine / DminLine + 2 (both log2 bytes). None = accepted."""
        csselr = int(reg[reg.index("[") + 1:-1]) if "[" in reg else 0
        line = next(f for f in self.fields_of("CCSIDR_EL1") if f.name == "LineSize").get(value) + 4
        which = "IminLine" if csselr & 1 else "DminLine"
        least = next(f for f in self.fields_of("CTR_EL0") if f.name == which).get(ctr) + 2
        if line < least:
            return f"{1 << line}-byte lines, below the {1 << least} bytes of CTR_EL0.{which}"
        return None

    def implies_idc(self, clidr: int) -> bool:
        """CLIDR_EL1 says no cleaning to the PoU is needed: LoC = 0, or LoUIS = 0 and LoUU = 0."""
        f = {x.name: x for x in self.fields_of("CLIDR_EL1")}
        return f["LoC"].get(clidr) == 0 or (f["LoUIS"].get(clidr) == 0 and f["LoUU"].get(clidr) == 0)

    def setter_problems(self, reg: str, value: int, kernel: tuple[int, ...], vm_values: dict[int, int]
                        ) -> list[tuple[SetterCheck, str]]:
        """Why KVM's setter of `reg` on `kernel` refuses `value`, for a VM whose other registers hold `vm_values`
        (the idc check reads CTR_EL0 there). [] = accepted."""
        out = []
        for c in self.setter_checks(reg, kernel):
            if c.check == "res0":
                bad = value & int(c.arg, 0)
                if bad:
                    out.append((c, f"{c.why}: {bad:#x}"))
            elif c.check == "linesize":
                why = self.min_line_problem(reg, value, vm_values.get(self.id_of(c.arg), 0))
                if why:
                    out.append((c, f"{c.why} ({why})"))
            elif c.check == "idc" and self.implies_idc(value):
                other, _, fld = c.arg.partition(".")
                f = next(x for x in self.fields_of(other) if x.name == fld)
                if not f.get(vm_values.get(self.id_of(other), 0)):
                    out.append((c, c.why))
        return out

    def check_write(self, reg: str | int, val: int, limit: int, writable: int,
                    kernel: tuple[int, ...] | None = None) -> list[tuple[Field | None, str]]:
        """arm64_check_features(): every problem with writing `val` where the kernel holds `limit`.

        Returns [] when the kernel would accept the value. Each problem is (field or None, reason).
        `writable` is the register's writable mask; `kernel` selects which cpufeature rows exist.
        """
        problems: list[tuple[Field | None, str]] = []
        covered = 0
        for f in self.fields_of(reg):
            if not f.in_kernel(kernel) or (f.mask & writable) != f.mask:
                continue
            covered |= f.mask
            new, cur = f.get(val), f.get(limit)
            if new == cur:
                continue
            if f.safe_value(new, cur) != new:
                problems.append((f, f"{f.name}={f.raw(val):#x} is not safe against {f.raw(limit):#x} "
                                    f"({f.kvm_safety.value.lower().replace('_', '-')}-safe)"))
        rest = ~covered & 0xFFFFFFFFFFFFFFFF
        if (val & rest) != (limit & rest):
            bad = (val ^ limit) & rest
            named = [f for f in self.fields_of(reg) if f.mask & bad]
            if named:
                for f in named:
                    problems.append((f, f"{f.name}={f.raw(val):#x} differs from {f.raw(limit):#x} and is not "
                                        f"writable here"))
            else:
                problems.append((None, f"bits {bad:#018x} differ and are not writable here"))
        return problems


@lru_cache(maxsize=1)
def _core_names() -> dict[int, str]:
    names: dict[int, str] = {}
    for n in range(31):
        names[regid.core(2 * n)] = f"X{n}"
    for off, n in ((62, "SP"), (64, "PC"), (66, "PSTATE"), (68, "SP_EL1"), (70, "ELR_EL1"),
                   (72, "SPSR_EL1"), (74, "SPSR_ABT"), (76, "SPSR_UND"), (78, "SPSR_IRQ"), (80, "SPSR_FIQ")):
        names[regid.core(off)] = n
    for n in range(32):
        names[regid.core(0x54 + 4 * n, regid.SIZE_U128)] = f"V{n}"
    names[regid.core(0xD4, regid.SIZE_U32)] = "FPSR"
    names[regid.core(0xD5, regid.SIZE_U32)] = "FPCR"
    return names


@lru_cache(maxsize=1)
def catalog() -> Catalog:
    return Catalog()
