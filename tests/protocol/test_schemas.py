"""Cap'n Proto boundary: round trips, decoding limits, and schema evolution in both directions."""
from __future__ import annotations

import capnp
import pytest

from invariantd.protocol import schemas as S
from invariantd.protocol.negotiate import negotiate
from invariantd.protocol.schemas import Implementation, Verdict
from support.hostdocs import A72_R0P4, host, make_doc

OLDER = """@0xb1f5e0a7c3d2e401;
# HostCapabilities as version 1 daemons before masks and per-CPU MIDRs sent it (ordinals 0..6 only).
struct RegValue { id @0 :UInt64; value @1 :UInt64; }
struct Capability { name @0 :Text; value @1 :Int64; }
struct HostCapabilities {
  version @0 :UInt16 = 1;
  kernelRelease @1 :Text;
  kernelVersion @2 :Text;
  arch @3 :Text;
  caps @4 :List(Capability);
  regList @5 :List(UInt64);
  values @6 :List(RegValue);
}
"""

NEWER_VERDICT = """@0xc2a6e1b8d4e3f502;
# A future daemon: Verdict has one more enumerant; PlanEntry unchanged.
enum Verdict { identical @0; set @1; override @2; pin @3; drop @4; refuse @5; emulate @6; }
struct PlanEntry {
  register @0 :Text; regId @1 :UInt64; field @2 :Text; source @3 :UInt64; destination @4 :UInt64;
  planned @5 :UInt64; verdict @6 :Verdict; reason @7 :Text; guestSees @8 :Text;
}
struct Implementation { midr @0 :UInt64; revidr @1 :UInt64; aidr @2 :UInt64; }
struct Plan {
  version @0 :UInt16 = 1; vmName @1 :Text; destination @2 :Text; policy @3 :Text; migratable @4 :Bool;
  enableCap239 @5 :Bool; targetImpls @6 :List(Implementation); bigLittle @7 :Bool; assumedCluster @8 :UInt64;
  clusterCpus @9 :List(UInt32); entries @10 :List(PlanEntry); guestVisible @11 :List(Text);
  notes @12 :List(Text); digest @13 :Data; futureField @14 :Text;
}
"""


@pytest.fixture(scope="module")
def compat(tmp_path_factory):
    """The older and newer test schemas, each loaded exactly once (a second capnp.load of the same schema
    id aborts the process)."""
    d = tmp_path_factory.mktemp("capnp")
    out = {}
    for name, text in (("older", OLDER), ("newer", NEWER_VERDICT)):
        p = d / f"{name}.capnp"
        p.write_text(text)
        out[name] = capnp.load(str(p), imports=[])
    return out


def test_schema_is_loaded_once():
    assert S.schema() is S.schema()


def test_host_round_trip_real_shapes():
    for doc in (make_doc("7.3"), make_doc("6.1", masks=None)):
        h = host(doc)
        assert S.host_from_bytes(S.host_to_bytes(h)) == h
    assert S.host_from_bytes(S.host_to_bytes(host(make_doc("6.1", masks=None)))).writable_masks is None
    # an SVE host: its vector lengths (a value) and the ID registers an SVE vCPU reads differently
    from invariantd.daemon.probe import probe
    from invariantd.daemon.sim.host import SimHost
    from invariantd.protocol import regid
    sve = S.host_from_doc(probe(SimHost("max@7.3"), profile="max@7.3"))
    assert dict(sve.values)[regid.SVE_VLS] == 0xFFFF and sve.sve_values
    assert S.host_from_bytes(S.host_to_bytes(sve)) == sve


def test_vm_and_plan_round_trip():
    vm = S.vm_from_host(host(make_doc("7.3")))
    vm = S.VmProfile(vm.name, 3, vm.features, vm.values, vm.reg_list, (Implementation(1, 2, 3),), (5, 6), "7.3")
    assert S.vm_from_bytes(S.vm_to_bytes(vm)) == vm
    plan = negotiate(vm, host(make_doc("7.3", {"MIDR_EL1": A72_R0P4})))
    back = S.plan_from_bytes(S.plan_to_bytes(plan))
    assert back == plan
    from invariantd.protocol.plandigest import plan_digest
    assert plan_digest(back) == plan.digest


def test_newer_daemon_decodes_older_message(compat):
    old = compat["older"]
    m = old.HostCapabilities.new_message()
    m.kernelRelease, m.kernelVersion, m.arch = "6.1.0-old", "6.1", "aarch64"
    caps = m.init("caps", 1)
    caps[0].name, caps[0].value = "KVM_CAP_ONE_REG", 1
    m.regList = [0x603000000013C000]
    vals = m.init("values", 1)
    vals[0].id, vals[0].value = 0x603000000013C000, 0x410FD083
    h = S.host_from_bytes(m.to_bytes())
    assert h.kernel_version == "6.1" and h.values == ((0x603000000013C000, 0x410FD083),)
    assert h.writable_masks is None          # rule 4: the default means "no masks ioctl"
    assert h.cpu_midrs == () and h.profile == "" and h.base_features == ()


def test_older_daemon_decodes_newer_message(compat):
    old = compat["older"]
    h = host(make_doc("7.3"))
    with old.HostCapabilities.from_bytes(S.host_to_bytes(h)) as r:
        assert r.kernelVersion == "7.3" and len(r.values) == len(h.values)


def test_unknown_verdict_from_newer_peer_reads_as_refuse(compat):
    new = compat["newer"]
    m = new.Plan.new_message()
    m.vmName, m.migratable, m.futureField = "vm", True, "ignored by us"
    ents = m.init("entries", 2)
    ents[0].register, ents[0].verdict = "MIDR_EL1", "emulate"
    ents[1].register, ents[1].verdict = "AIDR_EL1", "identical"
    p = S.plan_from_bytes(m.to_bytes())
    assert [e.verdict for e in p.entries] == [Verdict.REFUSE, Verdict.IDENTICAL]


def test_decode_limits_and_garbage(monkeypatch):
    with pytest.raises(S.SchemaError, match="cannot decode"):
        S.host_from_bytes(b"\x00\x01garbage-not-a-message")
    data = S.host_to_bytes(host(make_doc("7.3")))
    monkeypatch.setattr(S, "TRAVERSAL_LIMIT_WORDS", 64)
    with pytest.raises(S.SchemaError, match="HostCapabilities"):
        S.host_from_bytes(data)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(format="invariantd/host-capabilities@0"), "format"),
    (lambda d: d["values"].update({"FOO_EL1": "0x1"}), "unknown register 'FOO_EL1'"),
    (lambda d: d["values"].update({"0x603000000013c000": "zz"}), "not a number"),
    (lambda d: d["reg_list"].append("0x1234"), "register id '0x1234'"),
    (lambda d: d.pop("values"), "missing 'values'"),
    (lambda d: d.update(arch="x86_64"), "aarch64"),
])
def test_bad_capability_documents_name_the_problem(mutate, match):
    doc = make_doc("7.3")
    mutate(doc)
    with pytest.raises(S.SchemaError, match=match):
        S.host_from_doc(doc)


def test_vm_profile_document_round_trip_and_names():
    vm = S.vm_from_host(host(make_doc("7.3")))
    doc = S.vm_to_doc(vm)
    assert S.vm_from_doc(doc) == vm
    doc["values"] = {"MIDR_EL1": "0x410fd084"}                    # names are accepted too
    assert dict(S.vm_from_doc(doc).values) == {0x603000000013C000: 0x410FD084}
    doc["features"] = ["PSCI_0_2", "WARP_DRIVE"]
    with pytest.raises(S.SchemaError, match="WARP_DRIVE"):
        S.vm_from_doc(doc)
