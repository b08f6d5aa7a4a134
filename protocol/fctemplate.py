"""A baseline as a Firecracker custom CPU template (aarch64): what a Firecracker fleet can boot every VM with so that
its guest sees the same ID registers on every host of the baseline.

    {"kvm_capabilities": [...], "vcpu_features": [{"index": 0, "bitmap": "0b..."}],
     "reg_modifiers": [{"addr": "0x603000000013c020", "bitmap": "0bxx..01..x"}]}

The format is Firecracker's (docs/cpu_templates/cpu-templates.md and schema.json of its sources): `addr` is the
KVM_SET_ONE_REG id as a string; `bitmap` is "0b" then one character per bit, most significant first - `0` / `1`
force the bit, `x` keeps the host's; `vcpu_features` forces KVM_ARM_VCPU_INIT feature bits the same way
(features[index]); `kvm_capabilities` adds ("N") or removes ("!N") capabilities Firecracker checks. Only the fields
the hosts disagree on are forced (the baseline's lowered fields); everything else stays each host's own.

What a Firecracker user does not get from it (the README says so too): no plan - nothing checks before boot that a
host's kernel takes these values (invariantd's plan does, per destination), no errata check across the hosts'
implementations, nothing for a VM already running (Firecracker's snapshots restore only onto the same template).
"""
from __future__ import annotations

from . import kvmabi, regid
from .baseline import Baseline
from .catalog import catalog
from .schemas import HostCapabilities

FORMAT_BITS = 64


def _bitmap(force_mask: int, value: int, bits: int = FORMAT_BITS) -> str:
    return "0b" + "".join(("1" if value >> i & 1 else "0") if force_mask >> i & 1 else "x"
                          for i in range(bits - 1, -1, -1))


def _reg_id(name: str) -> int:
    """A register of the baseline by name (CCSIDR[n]: its KVM_REG_ARM_DEMUX_ID_CCSIDR id)."""
    if name.startswith("CCSIDR["):
        return regid.demux_ccsidr(int(name[7:-1]))
    return catalog().id_of(name)


def template(b: Baseline, hosts: list[HostCapabilities]) -> tuple[dict, list[str]]:
    """(the template, notes: what it leaves out and why)."""
    cat = catalog()
    values = dict(b.profile.values)
    masks: dict[int, int] = {}
    notes: list[str] = []
    for c in b.lowered:
        rid = _reg_id(c.register)
        if not c.field:                  # a whole register chosen (cache geometry, firmware levels, imp IDs)
            size_mask = (1 << 8 * min(8, regid.size_bytes(rid))) - 1
            masks[rid] = masks.get(rid, 0) | (cat.imp_masks.get(c.register, 0) if cat.reg_class(rid) == "imp_id"
                                              else size_mask)
            continue
        f = next(x for x in cat.fields_of(c.register) if x.name == c.field)
        masks[rid] = masks.get(rid, 0) | f.mask
    for c in b.varies:
        notes.append(f"{c.register}: differs per host and not every host offers cap 239, so it cannot be forced")
    for c in b.conflicts:
        notes.append(f"{c.register}{'.' + c.field if c.field else ''}: no value every host takes ({c.reason}); the "
                     f"template leaves it to each host, so these hosts do not look alike to a guest there")
    mods = [{"addr": f"{rid:#x}", "bitmap": _bitmap(m, values.get(rid, 0))} for rid, m in sorted(masks.items()) if m]
    caps = []
    if any(cat.reg_class(rid) == "imp_id" for rid in masks):
        caps.append(str(kvmabi.CAPS["KVM_CAP_ARM_WRITABLE_IMP_ID_REGS"]))     # Firecracker enables it on 6.15+
    feats = set(b.profile.features)
    word = 0
    force = 0
    for name, bit in kvmabi.VCPU_FEATURES.items():
        if bit >= 32:
            continue
        gate = kvmabi.FEATURE_GATES[name]
        if name in feats:
            word, force = word | 1 << bit, force | 1 << bit
        elif gate not in ("always", "unchecked") and any(h.cap(gate) <= 0 for h in hosts):
            force |= 1 << bit                            # a feature some host lacks: off for every VM
    out: dict = {"reg_modifiers": mods}
    if force:
        out["vcpu_features"] = [{"index": 0, "bitmap": _bitmap(force, word, 32)}]
    if caps:
        out["kvm_capabilities"] = caps
    return out, notes


def apply(tpl: dict, values: dict[int, int]) -> dict[int, int]:
    """What a host's register values become under the template (Firecracker's rule: `0`/`1` force, `x` keeps)."""
    out = dict(values)
    for m in tpl.get("reg_modifiers", ()):
        rid, bits = int(m["addr"], 16), m["bitmap"][2:]
        v = out.get(rid, 0)
        for i, ch in enumerate(reversed(bits)):
            if ch != "x":
                v = (v & ~(1 << i)) | (int(ch) << i)
        out[rid] = v
    return out
