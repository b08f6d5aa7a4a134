"""The orchestrator RPC's records marshalled both ways, in one place: a VM (VmInfo) and a migration's status
(MigrationStatus) as the daemon's service hands them (plain dicts) -> Cap'n Proto builders (rpcimpl.py), and the
Cap'n Proto readers -> the dicts invariantctl and the daemon's own RPC client read (rpcclient.py). A field added to
rpc.capnp's VmInfo or MigrationStatus is added here, on both sides."""
from __future__ import annotations

import json


# --- daemon -> wire -------------------------------------------------------------------------------------------
def fill_vm(b, d: dict) -> None:
    b.name, b.state, b.nVcpus, b.arch, b.origin = d["name"], d["state"], d["vcpus"], d["arch"], d["origin"]
    b.registerCount = d["register_count"]
    b.migration, b.peer, b.waiting = d.get("migration", ""), d.get("peer", ""), d.get("waiting", "")
    fl = b.init("features", len(d["features"]))
    for i, f in enumerate(d["features"]):
        fl[i] = f
    hl = b.init("history", len(d["history"]))
    for i, h in enumerate(d["history"]):
        hl[i] = h
    rl = b.init("idRegisters", len(d["id_registers"]))
    for i, r in enumerate(d["id_registers"]):
        rl[i].name, rl[i].id, rl[i].value, rl[i].fields = r["name"], r["id"], r["value"], r["fields"]


def fill_status(b, d: dict) -> None:
    b.id, b.vm, b.toHost, b.state, b.phase = d["id"], d["vm"], d["to"], d["state"], d["phase"]
    b.bytesSent, b.bytesReceived, b.vcpusDone, b.vcpusTotal = (d["bytes_sent"], d["bytes_received"],
                                                               d["vcpus_done"], d["vcpus_total"])
    b.registersSent, b.startedUnixMs, b.elapsedMs, b.result = (d["registers_sent"], d["started_unix_ms"],
                                                               d["elapsed_ms"], d["result"])
    b.planDigest = d["plan_digest"]
    if d.get("detail"):
        b.detail = json.dumps(d["detail"], default=jsonable).encode()
    if d["error"]:
        b.error.kind, b.error.message = d["error"][0], d["error"][1][:8000]


def jsonable(x):
    if isinstance(x, bytes):
        return x.hex()
    return str(x)


#: MigrationState enumerants (rpc.capnp: camelCase by Cap'n Proto's rules) as people and scripts read them - the
#: words of the VM states and of invariantd_migrations_total{result} (in-doubt)
STATE_WORDS = {"inDoubt": "in-doubt"}


# --- wire -> client -------------------------------------------------------------------------------------------
def vm_info(r) -> dict:
    return {"name": r.name, "state": r.state, "vcpus": r.nVcpus, "features": list(r.features), "arch": r.arch,
            "origin": r.origin, "history": list(r.history),
            "id_registers": [{"name": x.name, "id": f"{x.id:#x}", "value": f"{x.value:#018x}", "fields": x.fields}
                             for x in r.idRegisters],
            "register_count": r.registerCount, "migration": r.migration, "peer": r.peer, "waiting": r.waiting}


def migration_status(r) -> dict:
    e = r.error
    return {"id": r.id, "vm": r.vm, "to": r.toHost, "state": STATE_WORDS.get(str(r.state), str(r.state)),
            "phase": r.phase,
            "bytes_sent": r.bytesSent, "bytes_received": r.bytesReceived, "vcpus_done": r.vcpusDone,
            "vcpus_total": r.vcpusTotal, "registers_sent": r.registersSent, "started_unix_ms": r.startedUnixMs,
            "elapsed_ms": r.elapsedMs, "result": r.result, "plan_digest": bytes(r.planDigest).hex(),
            "detail": json.loads(bytes(r.detail)) if len(r.detail) else {},
            "error": None if str(e.kind) == "ok" else {"kind": str(e.kind), "message": e.message}}
