"""daemon/rpcmarshal.py: the RPC's records, daemon dict -> Cap'n Proto -> client dict, without loss - and every field
rpc.capnp has for them is carried (a field added to the schema but not here fails this test)."""
from __future__ import annotations

from invariantd.daemon.rpcclient import rpc_schema
from invariantd.daemon.rpcmarshal import fill_status, fill_vm, migration_status, vm_info

STATUS = {"id": "m-1", "vm": "vm-1", "to": "node-b", "state": "committed", "phase": "done", "bytes_sent": 11,
          "bytes_received": 12, "vcpus_done": 2, "vcpus_total": 2, "registers_sent": 600, "started_unix_ms": 1234,
          "elapsed_ms": 56, "result": "committed", "plan_digest": b"\x01\x02", "detail": {"destination": {"x": 1}},
          "error": ("refused", "why")}
VM = {"name": "vm-1", "state": "running", "vcpus": 2, "arch": "aarch64", "origin": "created", "register_count": 300,
      "migration": "m-1", "peer": "node-b", "waiting": "waits", "features": ["PSCI_0_2"], "history": ["created"],
      "id_registers": [{"name": "MIDR_EL1", "id": 0x603000000013C000, "value": 0x410FD083, "fields": "Revision=0x3"}]}


def roundtrip(kind: str, fill, d: dict):
    msg = getattr(rpc_schema(), kind).new_message()
    fill(msg, d)
    return getattr(rpc_schema(), kind).from_bytes(msg.to_bytes())


def test_status_and_vm_roundtrip_and_every_schema_field_is_carried():
    with roundtrip("MigrationStatus", fill_status, STATUS) as r:
        back = migration_status(r)
        unset = [f for f in r.schema.fieldnames if r.to_dict().get(f) in (None, 0, "", b"", [])]
    assert back == {**STATUS, "plan_digest": "0102", "error": {"kind": "refused", "message": "why"}}
    assert unset == [], unset
    with roundtrip("VmInfo", fill_vm, VM) as r:
        back = vm_info(r)
        unset = [f for f in r.schema.fieldnames if r.to_dict().get(f) in (None, 0, "", b"", [])]
    assert back == {**VM, "id_registers": [{"name": "MIDR_EL1", "id": "0x603000000013c000",
                                            "value": "0x00000000410fd083", "fields": "Revision=0x3"}]}
    assert unset == [], unset


def test_state_words_are_the_metrics_and_vm_words():
    """inDoubt is a Cap'n Proto enumerant; the CLI, its --json and the metrics all say in-doubt."""
    from invariantd.daemon.metrics import RESULTS
    from invariantd.daemon.vms import VmState
    with roundtrip("MigrationStatus", fill_status, {**STATUS, "state": "inDoubt", "error": None}) as r:
        word = migration_status(r)["state"]
    assert word == "in-doubt" and word in RESULTS and word in {s.value for s in VmState}
