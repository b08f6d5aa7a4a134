"""Guest side of the lab's QEMU migrations with invariantd in the path (tests/lab/test_qemu_agent.py): in each of
two lab guests (daemon/lab/qemu.run_pair), the real daemon on the guest's /dev/kvm with its agent socket, and
Debian's QEMU running the bare-metal payload with the invariantd agent preloaded (the aarch64 build of
daemon/vmm/agent.c, job input libivdagent.so).

    python3 -m invariantd.daemon.lab.vmmig dest   --node node-a --source-rpc 10.0.0.2:7444 [--timeout S]
    python3 -m invariantd.daemon.lab.vmmig source --node node-b --peer node-a=10.0.0.1 [--timeout S]

dest: starts invariantd, then QEMU with -incoming defer (its agent asks the daemon for the program at QEMU's
first vCPU; the daemon holds the request until the source's prepareVmm), and waits until the VM runs here or
the source daemon's migration ended; prints a JSON report (payload lines, the agent's record, QEMU's stderr,
metrics). source: starts invariantd and QEMU, waits for the payload and the agent's snapshot, then asks its
daemon to migrate the VM (migrateVmm: the daemons plan, pre-flight, drive both QEMUs over QMP) and prints a
JSON report (the migration's status, the payload before and after, the source QEMU's end state).
Exit 0 = a report was printed; the test judges it.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
import urllib.request
from functools import partial

from .netmig import JOB, PEER_PORT, RPC_PORT, _client, _console, run_role
from .vmm import PAYLOAD, Qemu, payload_view

VM = "payload"
AGENT_SOCKET = "/tmp/ivd-agent.sock"
AGENT_LIB = "/tmp/libivdagent.so"
METRICS_PORT = 9464
DEST_QMP = "/tmp/ivd-qmp-dest.sock"          # Qemu(name="dest") puts its QMP socket there
MIGRATION_PORT = 4444


def _config(node: str, peers=()):
    from ..config import (AgentSection, BackendConfig, Config, MetricsSection, PeerSection, RpcSection,
                          Timeouts)
    return Config(node=node, log_level="info", backend=BackendConfig(kind="kvm"),
                  peer=PeerSection(listen="0.0.0.0", port=PEER_PORT, cert=f"{JOB}/in.{node}.pem", ca=f"{JOB}/in.ca.pem"),
                  metrics=MetricsSection(enabled=True, listen="127.0.0.1", port=METRICS_PORT),
                  timeouts=Timeouts(handshake=20, phase=60, apply=90, commit=60, drain=5),
                  rpc=RpcSection(enabled=True, listen="0.0.0.0", port=RPC_PORT, tls=True, unix=""),
                  agent=AgentSection(socket=AGENT_SOCKET, hold=240.0), peers=tuple(peers))


def _agent_env() -> dict:
    shutil.copyfile(f"{JOB}/in.libivdagent.so", AGENT_LIB)
    return {"LD_PRELOAD": AGENT_LIB, "INVARIANTD_AGENT_SOCKET": AGENT_SOCKET, "INVARIANTD_VM": VM,
            "INVARIANTD_AGENT_WAIT": "240"}


def _metrics() -> list[str]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
    except OSError as e:
        return [f"# unreadable: {e}"]
    keep = ("invariantd_invariant_overrides_total", "invariantd_set_one_reg_failures_total",
            "invariantd_migrations_total", "invariantd_plan_verdicts_total")
    return [ln for ln in text.splitlines() if ln.startswith(keep)]


async def _dest(args, out: dict) -> int:
    import trio
    from ..server import make_backend, run
    cfg = _config(args.node)
    q = None
    async with trio.open_nursery() as n:
        await n.start(partial(run, cfg, backend=make_backend(cfg)))
        _console(f"VMMIG dest-ready node={args.node}")
        client = _client(f"127.0.0.1:{RPC_PORT}")
        source = _client(args.source_rpc, timeout=10)
        try:
            q = Qemu(PAYLOAD, incoming="defer", env=_agent_env(), extra_args=["-name", VM], name="dest").start()
            deadline = time.monotonic() + args.timeout
            ended_at = None
            while time.monotonic() < deadline and q.running():
                if len(q.payload()) >= args.lines:
                    break
                if ended_at is None:
                    try:
                        ms = await trio.to_thread.run_sync(source.list_migrations)
                        if any(m["vm"] == VM and m["state"] != "running" for m in ms):
                            ended_at = time.monotonic()
                    except Exception:           # the source guest may still be booting
                        pass
                elif time.monotonic() - ended_at > args.linger:
                    break
                await trio.sleep(0.5)
            out["vmms"] = await trio.to_thread.run_sync(client.list_vmms)
            out["metrics"] = await trio.to_thread.run_sync(_metrics)
        finally:
            for c in (client, source):
                await trio.to_thread.run_sync(c.close)
            if q is not None:
                out["running_here"] = bool(q.payload())
                out["lines"] = [payload_view(p) for p in q.payload()[:8]]
                q.stop()
                out["qemu"] = q.report()
            n.cancel_scope.cancel()
    return 0


async def _source(args, out: dict) -> int:
    import trio
    from ..config import PeerEntry
    from ..server import make_backend, run
    from ..rpcclient import RpcError
    pname, _, paddr = args.peer.partition("=")
    peers = (PeerEntry(pname, paddr, PEER_PORT, rpc=f"{paddr}:{RPC_PORT}", server_name="localhost"),)
    cfg = _config(args.node, peers)
    q = None
    async with trio.open_nursery() as n:
        await n.start(partial(run, cfg, backend=make_backend(cfg)))
        _console(f"VMMIG source-ready node={args.node}")
        client = _client(f"127.0.0.1:{RPC_PORT}", timeout=args.timeout)

        def rpc(fn, *a):
            return trio.to_thread.run_sync(lambda: fn(*a))
        try:
            q = Qemu(PAYLOAD, env=_agent_env(), extra_args=["-name", VM], name="source").start()
            if not q.wait_payload(2, 120):
                raise RuntimeError("the payload printed fewer than 2 lines in 120 s")
            for _ in range(100):                        # the agent's snapshot (taken before the first KVM_RUN)
                vmms = await rpc(client.list_vmms)
                if any(v["vm"] == VM and v["vcpus_snapshotted"] for v in vmms):
                    break
                await trio.sleep(0.2)
            out["agent"] = next((v for v in vmms if v["vm"] == VM), None)
            deadline = time.monotonic() + args.peer_wait
            while True:                                 # the destination guest may still be booting
                try:
                    await rpc(client.caps, pname)
                    break
                except RpcError as e:
                    if e.kind != "unreachable" or time.monotonic() > deadline:
                        raise
                    await trio.sleep(1.0)
            mark = len(q.lines)
            before = q.payload()
            _console(f"VMMIG source-migrating vm={VM} to={pname}")
            t0 = time.monotonic()
            mid = await rpc(client.migrate_vmm, VM, pname, q.qmp_path, f"tcp:{paddr}:{MIGRATION_PORT}", DEST_QMP)
            st = await trio.to_thread.run_sync(client.wait, mid, int(args.timeout * 1000))
            out["migration_wall_s"] = round(time.monotonic() - t0, 3)
            out["migration"] = st
            _console(f"VMMIG source-done state={st['state']} wall={out['migration_wall_s']}")
            await trio.sleep(args.linger)
            last = max((p["n"] for p in before), default=-1)
            after = q.payload(mark)
            out["last_n_before"] = f"0x{last:x}"
            out["lines_before"] = [payload_view(p) for p in before[-3:]]
            out["lines_after"] = [payload_view(p) for p in after[:8]]
            out["still_counting"] = any(p["n"] > last for p in after[-3:]) and q.running()
            out["source_qemu_running"] = q.running()
            if q.running():
                q.connect_qmp(10)
                out["query_migrate"] = q.try_qmp("query-migrate")
                out["query_status"] = q.try_qmp("query-status")
            out["metrics"] = await trio.to_thread.run_sync(_metrics)
        except RpcError as e:
            out["error"] = {"kind": e.kind, "message": e.message}
        finally:
            await trio.to_thread.run_sync(client.close)
            if q is not None:
                q.stop()
                out["qemu"] = q.report()
            n.cancel_scope.cancel()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vmmig")
    sub = ap.add_subparsers(dest="role", required=True)
    d = sub.add_parser("dest")
    d.add_argument("--node", required=True)
    d.add_argument("--source-rpc", required=True, help="the source daemon's RPC (to see when its migration ended)")
    d.add_argument("--timeout", type=float, default=240)
    d.add_argument("--lines", type=int, default=3)
    d.add_argument("--linger", type=float, default=5.0)
    s = sub.add_parser("source")
    s.add_argument("--node", required=True)
    s.add_argument("--peer", required=True, help="NAME=IP")
    s.add_argument("--peer-wait", type=float, default=120)
    s.add_argument("--timeout", type=float, default=240)
    s.add_argument("--linger", type=float, default=4.0)
    args = ap.parse_args(argv)
    return run_role(_dest if args.role == "dest" else _source, args)


if __name__ == "__main__":
    sys.exit(main())
