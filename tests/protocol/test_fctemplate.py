"""A baseline as a Firecracker custom CPU template (protocol/fctemplate.py): Firecracker's format (as its docs and
schema.json describe it: addr a string holding the ONE_REG id, bitmap "0b" + [01x] most significant first, at most
128 characters; vcpu_features index + a 32-bit bitmap; kvm_capabilities "N" / "!N"), and its meaning - applied to
each host's own values, every field the baseline chose reads the baseline's value, every other bit the host's."""
from __future__ import annotations

import json
import re
from importlib import resources

from invariantd.protocol import schemas as S
from invariantd.protocol.baseline import baseline
from invariantd.protocol.catalog import catalog
from invariantd.protocol.fctemplate import _bitmap, apply, template


def host(spec: str) -> S.HostCapabilities:
    doc = json.loads(resources.files("invariantd.protocol").joinpath("data", "profiles", f"{spec}.json").read_text())
    return S.host_from_doc(doc)


def check_format(tpl: dict) -> None:
    assert set(tpl) <= {"kvm_capabilities", "vcpu_features", "reg_modifiers"}
    for m in tpl["reg_modifiers"]:
        assert set(m) == {"addr", "bitmap"} and isinstance(m["addr"], str) and int(m["addr"], 0) >> 56 == 0x60
        assert re.fullmatch(r"0b[01x]{1,128}", m["bitmap"]), m
    for v in tpl.get("vcpu_features", ()):
        assert set(v) == {"index", "bitmap"} and isinstance(v["index"], int)
        assert re.fullmatch(r"0b[01x]{1,32}", v["bitmap"]), v
    for c in tpl.get("kvm_capabilities", ()):
        assert re.fullmatch(r"!?\d+", c), c


def test_bitmap_is_most_significant_bit_first():
    assert _bitmap(0b1010, 0b1000, 4) == "0b1x0x"
    assert apply({"reg_modifiers": [{"addr": "0x6030000000000001", "bitmap": "0b1x0x"}]},
                 {0x6030000000000001: 0b0111}) == {0x6030000000000001: 0b1101}


def test_three_revisions_look_alike_under_the_template():
    hosts = [host(s) for s in ("cortex-a72-r0p3@7.3", "cortex-a72-r0p4@7.3", "cortex-a72-r1p0@7.3")]
    b = baseline(hosts, name="a72-fleet")
    tpl, notes = template(b, hosts)
    check_format(tpl)
    cat, want = catalog(), dict(b.profile.values)
    assert tpl["reg_modifiers"] and tpl.get("kvm_capabilities") == ["239"]      # MIDR pinned: cap 239
    for h in hosts:
        got = apply(tpl, dict(h.values))
        for c in b.lowered:
            rid = cat.id_of(c.register)
            f = next((x for x in cat.fields_of(c.register) if x.name == c.field), None)
            assert (f.get(got[rid]) == f.get(want[rid])) if f else got[rid] == want[rid], (c, h.name)
        own = dict(h.values)
        untouched = [r for r in own if r not in {int(m["addr"], 16) for m in tpl["reg_modifiers"]}]
        assert untouched and all(got[r] == own[r] for r in untouched)


def test_a_feature_some_host_lacks_is_forced_off_and_conflicts_are_named():
    hosts = [host(s) for s in ("cortex-a72-r0p3@7.3", "a64fx@7.3")]      # a64fx: SVE, no AArch32
    b = baseline(hosts, name="mixed")
    tpl, notes = template(b, hosts)
    check_format(tpl)
    bits = tpl["vcpu_features"][0]["bitmap"][2:][::-1]                   # bit 0 first
    assert bits[4] == "0" and bits[2] == "1"                             # SVE off (the A72 has none), PSCI 0.2 on
    assert all(isinstance(n, str) and n for n in notes)
