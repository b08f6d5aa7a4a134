"""`invariantctl demo`: two daemons on loopback, one VM, one migration through the orchestrator RPC.

Source: simulated cortex-a72-r0p3 on Linux 6.12. Destination: simulated cortex-a72-r0p4 on Linux 7.3 (same part,
next revision, newer kernel: cap 239 keeps the guest's MIDR). Both daemons run in this process as trio tasks
(the real daemon code: server.run with peer listener, RPC service and /metrics), with a throwaway mutual-TLS
PKI made with `cryptography`. The VM is created, planned and migrated through the RPC client against the
source daemon, exactly as an orchestrator would; both daemons' /metrics are scraped before and after.

--real: both daemons on this machine's /dev/kvm. On x86 the generic path: the plan (negotiate_generic) checks
the architecture and the register list (KVM-listed registers + the MSRs as ONE_REG ids), the registers are
restored as they are, and read-back differences KVM is known to produce (readback.READBACK_MAY_DIFFER, e.g. the
TSC keeps counting) are reported, not hidden.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import urllib.request
from dataclasses import replace
from functools import partial

from ..daemon.pki import make_pki
from . import exits
from .render import print_plan_doc, progress_bar

SRC_PROFILE = "cortex-a72-r0p3@6.12"
DST_PROFILE = "cortex-a72-r0p4@7.3"
VM_NAME = "demo-vm"
VCPUS = 2


# --- metrics deltas ---------------------------------------------------------------------------------------------
def scrape(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.type in ("info", "gauge"):
            continue
        for s in fam.samples:
            if s.name.endswith("_created") or s.name.endswith("_bucket"):
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def deltas(before: dict, after: dict) -> list[dict]:
    rows = []
    for k, v in sorted(after.items()):
        d = v - before.get(k, 0.0)
        if d:
            name, labels = k
            rows.append({"metric": name, "labels": dict(labels), "delta": round(d, 6)})
    return rows


def _fmt_labels(labels: dict) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""


# --- the demo ---------------------------------------------------------------------------------------------------
def _config(node: str, pki: dict, backend_kind: str, profile: str, peers=(), journal: str = ""):
    from ..daemon.config import (Config, BackendConfig, JournalSection, PeerSection, MetricsSection, RpcSection,
                                 Timeouts)
    return Config(node=node, log_level="warning",
                  backend=BackendConfig(kind=backend_kind, sim_profile=profile if backend_kind == "sim" else ""),
                  peer=PeerSection(listen="127.0.0.1", port=0, cert=pki[node], ca=pki["ca"]),
                  metrics=MetricsSection(enabled=True, listen="127.0.0.1", port=0),
                  timeouts=Timeouts(handshake=10, phase=30, apply=60, commit=30, drain=5),
                  rpc=RpcSection(enabled=True, listen="127.0.0.1", port=0, tls=True, unix=""), peers=tuple(peers),
                  journal=JournalSection(journal))


class DemoError(exits.CliError):
    """The demo could not run (its exit code: client/exits.py)."""


def run_demo(*, real: bool = False, as_json: bool = False, out=None, progress: bool = True) -> int:
    """Run the whole demo; returns the exit code (0 = migrated and committed)."""
    import trio
    out = out or sys.stdout
    report: dict = {"mode": "real" if real else "sim"}

    def say(s=""):
        if not as_json:
            print(s, file=out, flush=True)

    with tempfile.TemporaryDirectory(prefix="invariantd-demo-") as tmp:
        pki = make_pki(tmp)
        result = trio.run(partial(_demo, pki, real, say, report, as_json, progress, out))
    if as_json:
        json.dump(report, out, indent=1, default=str)
        out.write("\n")
    return result


async def _demo(pki, real, say, report, as_json, progress, out) -> int:
    import trio
    from ..daemon.config import PeerEntry
    from ..daemon.server import make_backend, run
    from ..daemon.rpcclient import Client, RpcError, client_ssl

    kind = "kvm" if real else "sim"
    cfg_b = _config("node-b", pki, kind, DST_PROFILE, journal=os.path.join(os.path.dirname(pki["ca"]), "node-b.db"))
    src_label = "this host's /dev/kvm" if real else f"simulated {SRC_PROFILE}"
    dst_label = "this host's /dev/kvm" if real else f"simulated {DST_PROFILE}"
    code = 0
    async with trio.open_nursery() as n:
        try:
            backend_b = make_backend(cfg_b)
            ports_b = await n.start(partial(run, cfg_b, backend=backend_b))
            peers = (PeerEntry("node-b", "127.0.0.1", ports_b["peer"], rpc=f"127.0.0.1:{ports_b['rpc']}",
                               server_name="localhost"),)
            cfg_a = replace(_config("node-a", pki, kind, SRC_PROFILE, journal=os.path.join(os.path.dirname(pki["ca"]), "node-a.db")),
                            peers=peers)
            backend_a = make_backend(cfg_a)
            ports_a = await n.start(partial(run, cfg_a, backend=backend_a))
        except Exception as e:
            n.cancel_scope.cancel()
            raise DemoError(f"cannot start the daemons: {e}", 5 if real else 1) from e
        report["daemons"] = {"source": {"node": "node-a", "host": src_label, **ports_a},
                             "destination": {"node": "node-b", "host": dst_label, **ports_b}}
        say(f"invariantd demo ({'real /dev/kvm' if real else 'simulated arm64 hosts'}), loopback, mutual TLS "
            f"(throwaway CA)")
        say(f"  source       node-a  {src_label:<34} peer :{ports_a['peer']}  rpc :{ports_a['rpc']}  "
            f"metrics :{ports_a['metrics']}")
        say(f"  destination  node-b  {dst_label:<34} peer :{ports_b['peer']}  rpc :{ports_b['rpc']}  "
            f"metrics :{ports_b['metrics']}")

        client = Client(f"127.0.0.1:{ports_a['rpc']}", client_ssl(pki["operator"], None, pki["ca"]),
                        server_hostname="localhost", timeout=60)

        def rpc(fn, *a):
            return trio.to_thread.run_sync(lambda: fn(*a))
        try:
            before = {"source": await trio.to_thread.run_sync(scrape, ports_a["metrics"]),
                      "destination": await trio.to_thread.run_sync(scrape, ports_b["metrics"])}
            vm = await rpc(client.create_vm, VM_NAME, VCPUS)
            report["vm"] = vm
            say(f"\ncreated VM {vm['name']} on node-a: {vm['vcpus']} vCPUs, features "
                f"{','.join(vm['features']) or '-'}, state {vm['state']}")
            plan = await rpc(client.plan, VM_NAME, "node-b")
            report["plan"] = plan
            say("")
            print_plan_doc(plan["plan"], out=out) if not as_json else None
            mid = await rpc(client.migrate, VM_NAME, "node-b")
            say(f"\nmigrating {VM_NAME} node-a -> node-b (migration {mid})")
            st = await _follow(client, mid, progress and not as_json, out)
            report["migration"] = st
            if st["state"] == "committed":
                say(f"outcome: COMMITTED in {st['elapsed_ms']} ms - {st['vcpus_done']}/{st['vcpus_total']} vCPUs, "
                    f"{st['registers_sent']} registers, {st['bytes_sent']} bytes sent / {st['bytes_received']} "
                    f"received on the peer link; plan digest {st['plan_digest'][:16]}...")
            else:
                err = st["error"] or {"kind": "migrationFailed", "message": "?"}
                say(f"outcome: {st['state'].upper()} in phase {st['phase']}: {err['message']}")
                code = exits.for_kind(err["kind"]) or exits.Exit.FAILED
            b_client = Client(f"127.0.0.1:{ports_b['rpc']}", client_ssl(pki["operator"], None, pki["ca"]),
                              server_hostname="localhost")
            try:
                src_vm = await rpc(client.inspect_vm, VM_NAME)
                dst_vms = await rpc(b_client.list_vms)
            finally:
                b_client.close()
            report["after"] = {"source_vm": {k: src_vm[k] for k in ("name", "state", "history")},
                               "destination_vms": [{k: v[k] for k in ("name", "state", "origin", "history")}
                                                   for v in dst_vms]}
            say(f"  node-a holds {VM_NAME}: {src_vm['state']} ({' '.join(src_vm['history'])})")
            for v in dst_vms:
                say(f"  node-b holds {v['name']}: {v['state']} ({v['origin']}; {' '.join(v['history'])})")
            await trio.sleep(0.05)
            after = {"source": await trio.to_thread.run_sync(scrape, ports_a["metrics"]),
                     "destination": await trio.to_thread.run_sync(scrape, ports_b["metrics"])}
            report["metrics_deltas"] = {k: deltas(before[k], after[k]) for k in before}
            say("\nmetrics that moved (after - before):")
            for side in ("source", "destination"):
                say(f"  {side} (node-{'a' if side == 'source' else 'b'}):")
                for r in report["metrics_deltas"][side]:
                    say(f"    {r['metric']}{_fmt_labels(r['labels'])}  +{r['delta']:g}")
        except RpcError as e:
            report["error"] = {"kind": e.kind, "message": e.message}
            say(f"demo failed: {e}")
            code = exits.for_kind(e.kind)
        finally:
            await trio.to_thread.run_sync(client.close)
            n.cancel_scope.cancel()
    report["exit_code"] = code
    return code


async def _follow(client, mid: str, show: bool, out) -> dict:
    """Poll status until the migration ends, with a rich progress bar when `show`."""
    import trio
    if not show:
        return await trio.to_thread.run_sync(client.wait, mid, 60000)
    with progress_bar(out) as (update, _):
        while True:
            st = await trio.to_thread.run_sync(client.status, mid)
            update(st)
            if st["state"] != "running":
                return st
            await trio.sleep(0.05)


def cmd_demo(args) -> int:
    try:
        return run_demo(real=args.real, as_json=args.json, progress=not args.no_progress)
    except DemoError as e:
        print(f"invariantctl demo: {e}", file=sys.stderr)
        return e.code


def register(sub) -> None:
    import argparse
    p = sub.add_parser("demo", help="two daemons on loopback: create, plan, migrate a VM via RPC; metrics",
                       description=__doc__, epilog=exits.table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="both daemons on this machine's /dev/kvm")
    p.add_argument("--json", action="store_true", help="one JSON report instead of text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)
