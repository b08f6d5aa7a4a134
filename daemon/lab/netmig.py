"""Guest side of the lab's network migration (tests/lab/test_network_migration.py): run in an arm64 lab guest
with a NIC (run_many_in_guest(net=...)), the real daemon on the guest's /dev/kvm plus an orchestrator step.

    python3 -m invariantd.daemon.lab.netmig dest   --node node-a --wait-vm NAME [--timeout S]
    python3 -m invariantd.daemon.lab.netmig source --node node-b --peer node-a=10.0.0.1 --vm NAME [--vcpus 2]

Both start `invariantd` (daemon/server.run, backend kvm) with peer listener 0.0.0.0:7443 and the orchestrator
RPC on 0.0.0.0:7444 (mutual TLS), certificates from the job inputs (GUEST_JOB_DIR/in.ca.pem, in.NODE.pem,
in.operator.pem; CN = node, SAN localhost, so peers are addressed with server_name "localhost").
dest: waits until a VM named NAME is held running (RPC list_vms), lingers briefly, prints a JSON summary.
source: creates a VM over its own RPC, plans and migrates it to the peer (retrying the plan until the peer
answers), waits for the result, prints a JSON summary. Exit 0 = the expected outcome was seen.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

PEER_PORT = 7443
RPC_PORT = 7444
JOB = "/opt/ivd/job"


def _console(msg: str) -> None:
    """A marker on the guest console (the host reads it live); best effort."""
    try:
        with open("/dev/console", "w") as f:
            f.write(f"@@IVD {msg} @@\n")
    except OSError:
        pass


def _fix_clock() -> None:
    """Certificates are valid from the host's "now - 5 min": make sure the guest clock is not behind."""
    host = float(os.environ.get("IVD_HOST_EPOCH", "0") or 0)
    if host and time.time() < host - 60:
        time.clock_settime(time.CLOCK_REALTIME, host)


def _config(node: str, peers=()):
    from ..config import Config, BackendConfig, PeerSection, MetricsSection, RpcSection, Timeouts
    return Config(node=node, log_level="info", backend=BackendConfig(kind="kvm"),
                  peer=PeerSection(listen="0.0.0.0", port=PEER_PORT, cert=f"{JOB}/in.{node}.pem", ca=f"{JOB}/in.ca.pem"),
                  metrics=MetricsSection(enabled=False),
                  timeouts=Timeouts(handshake=20, phase=60, apply=60, commit=30, drain=5),
                  rpc=RpcSection(enabled=True, listen="0.0.0.0", port=RPC_PORT, tls=True, unix=""), peers=tuple(peers))


def _client(addr: str, timeout: float = 60):
    from ..rpcclient import Client, client_ssl
    return Client(addr, client_ssl(f"{JOB}/in.operator.pem", None, f"{JOB}/in.ca.pem"), server_hostname="localhost",
                  timeout=timeout)


def _vm_view(v: dict) -> dict:
    return {k: v.get(k) for k in ("name", "state", "vcpus", "origin", "history", "features")}


async def _dest(args, out: dict) -> int:
    import trio
    from ..server import make_backend, run
    cfg = _config(args.node)
    async with trio.open_nursery() as n:
        await n.start(partial(run, cfg, backend=make_backend(cfg)))
        _console(f"NETMIG dest-ready node={args.node}")
        client = _client(f"127.0.0.1:{RPC_PORT}")
        try:
            caps = await trio.to_thread.run_sync(client.caps)
            out["caps"] = {"arch": caps.get("arch"), "kernel_release": caps.get("kernel_release"),
                           "cpu_midrs": caps.get("cpu_midrs"),
                           "writable_imp_id_regs": (caps.get("caps") or {}).get("KVM_CAP_ARM_WRITABLE_IMP_ID_REGS")}
            deadline = time.monotonic() + args.timeout
            arrived = None
            while time.monotonic() < deadline:
                vms = await trio.to_thread.run_sync(client.list_vms)
                arrived = next((v for v in vms if v["name"] == args.wait_vm and v["state"] == "running"), None)
                if arrived:
                    out["arrived_after_s"] = round(args.timeout - (deadline - time.monotonic()), 2)
                    break
                await trio.sleep(0.25)
            if arrived:
                _console(f"NETMIG dest-arrived vm={args.wait_vm}")
                await trio.sleep(args.linger)        # let the source finish its side of the commit
                arrived = await trio.to_thread.run_sync(client.inspect_vm, args.wait_vm)
            out["vm"] = _vm_view(arrived) if arrived else None
            out["vms"] = [_vm_view(v) for v in await trio.to_thread.run_sync(client.list_vms)]
        finally:
            await trio.to_thread.run_sync(client.close)
            n.cancel_scope.cancel()
    return 0 if out.get("vm") and out["vm"]["state"] == "running" else 1


async def _source(args, out: dict) -> int:
    import trio
    from ..config import PeerEntry
    from ..server import make_backend, run
    from ..rpcclient import RpcError
    pname, _, paddr = args.peer.partition("=")
    peers = (PeerEntry(pname, paddr, PEER_PORT, rpc=f"{paddr}:{RPC_PORT}", server_name="localhost"),)
    cfg = _config(args.node, peers)
    async with trio.open_nursery() as n:
        await n.start(partial(run, cfg, backend=make_backend(cfg)))
        _console(f"NETMIG source-ready node={args.node}")
        client = _client(f"127.0.0.1:{RPC_PORT}", timeout=args.timeout)

        def rpc(fn, *a):
            return trio.to_thread.run_sync(lambda: fn(*a))
        try:
            out["vm_created"] = _vm_view(await rpc(client.create_vm, args.vm, args.vcpus, args.feature or ()))
            # the destination guest may still be booting: retry the plan (it fetches the peer's capabilities
            # over the peer's RPC) until it answers
            deadline = time.monotonic() + args.peer_wait
            tries = 0
            while True:
                tries += 1
                try:
                    plan = await rpc(client.plan, args.vm, pname)
                    break
                except RpcError as e:
                    if e.kind != "unreachable" or time.monotonic() > deadline:
                        raise
                    out["last_plan_error"] = e.message
                    await trio.sleep(1.0)
            out["plan_tries"] = tries
            p = plan["plan"]
            out["plan"] = {"migratable": plan["migratable"], "digest": plan["digest"],
                           "enable_cap239": p.get("enable_cap239"), "destination": p.get("destination"),
                           "changed": [{k: e[k] for k in ("register", "field", "source", "destination", "planned",
                                                          "verdict", "reason")}
                                       for e in p["entries"] if e["verdict"] != "identical"]}
            _console(f"NETMIG source-migrating vm={args.vm} to={pname}")
            t0 = time.monotonic()
            mid = await rpc(client.migrate, args.vm, pname)
            st = await trio.to_thread.run_sync(client.wait, mid, int(args.timeout * 1000))
            out["migration_wall_s"] = round(time.monotonic() - t0, 3)
            out["migration"] = st
            out["source_vm"] = _vm_view(await rpc(client.inspect_vm, args.vm))
            _console(f"NETMIG source-done state={st['state']} wall={out['migration_wall_s']}")
        except RpcError as e:
            out["error"] = {"kind": e.kind, "message": e.message}
        finally:
            await trio.to_thread.run_sync(client.close)
            n.cancel_scope.cancel()
    return 0 if out.get("migration", {}).get("state") == "committed" else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="netmig")
    sub = ap.add_subparsers(dest="role", required=True)
    d = sub.add_parser("dest")
    d.add_argument("--node", required=True)
    d.add_argument("--wait-vm", required=True)
    d.add_argument("--timeout", type=float, default=120)
    d.add_argument("--linger", type=float, default=2.0)
    s = sub.add_parser("source")
    s.add_argument("--node", required=True)
    s.add_argument("--peer", required=True, help="NAME=IP")
    s.add_argument("--vm", required=True)
    s.add_argument("--vcpus", type=int, default=2)
    s.add_argument("--feature", action="append", help="vCPU init feature of the VM (repeatable, e.g. SVE)")
    s.add_argument("--peer-wait", type=float, default=90)
    s.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args(argv)
    return run_role(_dest if args.role == "dest" else _source, args)


def run_role(role, args) -> int:
    """trio.run(role, args, out) and print `out` as one JSON document (an exception too: it is the report)."""
    import traceback

    import trio
    _fix_clock()
    out: dict = {"role": args.role, "node": args.node, "kernel": os.uname().release}
    t0 = time.monotonic()
    try:
        rc = trio.run(role, args, out)
    except BaseException as e:  # noqa: BLE001 - report anything as JSON
        out["error"] = {"kind": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()[-3000:]}
        rc = 2
    out["program_s"] = round(time.monotonic() - t0, 3)
    json.dump(out, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
