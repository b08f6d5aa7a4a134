"""Bench: the daemons' resident memory over thousands of migrations (issue 14 P5: flat RSS, idle < 60 MB).

    .venv/bin/python bench/bench_rss.py [--migrations 3000] [--every 250] [--vcpus 4]

Two real `invariantd` processes on loopback (simulated hosts cortex-a72-r0p3@7.3 and cortex-a72-r0p4@7.3, both
with cap 239, so a VM goes both ways; mutual TLS with a throwaway PKI; journals in a temporary folder), one VM
migrated back and forth through the orchestrator RPC (migrate + wait), as an orchestrator would. Printed: each
daemon's VmRSS (/proc/PID/status) idle after start, after the first `--every` migrations (the warm-up: caches,
pools, lazily imported modules), then every `--every` migrations; the growth after the warm-up per 1,000
migrations is the figure to read (flat: within the allocator's noise, < 1 MB per 1,000).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from invariantd.daemon.pki import make_pki
from invariantd.daemon.rpcclient import Client, RpcError, client_ssl

PROFILES = {"node-a": "cortex-a72-r0p3@7.3", "node-b": "cortex-a72-r0p4@7.3"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def config(node: str, other: str, pki: dict, ports: dict, d: Path) -> str:
    return f"""node = "{node}"
log_level = "warning"
[backend]
kind = "sim"
sim_profile = "{PROFILES[node]}"
[peer]
listen = "127.0.0.1"
port = {ports[node]['peer']}
cert = "{pki[node]}"
ca = "{pki['ca']}"
[metrics]
enabled = false
[rpc]
listen = "127.0.0.1"
port = {ports[node]['rpc']}
tls = true
unix = ""
[agent]
socket = ""
[journal]
path = "{d / (node + '.db')}"
[peers]
{other} = {{ address = "127.0.0.1:{ports[other]['peer']}", rpc = "127.0.0.1:{ports[other]['rpc']}", server_name = "localhost" }}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--migrations", type=int, default=3000)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--vcpus", type=int, default=4)
    a = ap.parse_args()
    exe = os.path.join(os.path.dirname(sys.executable), "invariantd")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        pki = make_pki(d)
        ports = {n: {"peer": free_port(), "rpc": free_port()} for n in PROFILES}
        procs = {}
        for node, other in (("node-a", "node-b"), ("node-b", "node-a")):
            (d / f"{node}.toml").write_text(config(node, other, pki, ports, d))
            procs[node] = subprocess.Popen([exe, "--config", str(d / f"{node}.toml")], stderr=open(d / f"{node}.log", "w"))
        ctx = client_ssl(pki["operator"], None, pki["ca"])
        clients = {n: Client(f"127.0.0.1:{ports[n]['rpc']}", ctx, server_hostname="localhost") for n in PROFILES}
        try:
            for n, c in clients.items():
                for _ in range(100):
                    try:
                        c.peers()
                        break
                    except RpcError:
                        time.sleep(0.1)
                else:
                    raise SystemExit(f"bench_rss: {n} did not start: {(d / f'{n}.log').read_text()[-1000:]}")
            time.sleep(1.0)
            idle = {n: rss_kb(p.pid) for n, p in procs.items()}
            print("idle after start: " + ", ".join(f"{n} {v / 1024:.1f} MB" for n, v in idle.items())
                  + f"   target < 60 MB: {'OK' if max(idle.values()) < 60 * 1024 else 'MISSED'}")
            clients["node-a"].create_vm("rss-vm", a.vcpus)
            here, there = "node-a", "node-b"
            samples = []
            t0 = time.perf_counter()
            for k in range(1, a.migrations + 1):
                mid = clients[here].migrate("rss-vm", there)
                st = clients[here].wait(mid, 30000)
                if st.get("state") != "committed":
                    raise SystemExit(f"bench_rss: migration {k} {here} -> {there} ended {st.get('state')}: "
                                     f"{st.get('error')}")
                here, there = there, here
                if k % a.every == 0:
                    now = {n: rss_kb(p.pid) for n, p in procs.items()}
                    samples.append((k, now))
                    rate = k / (time.perf_counter() - t0)
                    print(f"after {k:5d} migrations ({rate:.0f}/s): "
                          + ", ".join(f"{n} {v / 1024:.1f} MB" for n, v in now.items()), flush=True)
            (k0, warm), (k1, last) = samples[0], samples[-1]
            per_k = {n: (last[n] - warm[n]) / 1024 / max(1, k1 - k0) * 1000 for n in PROFILES}
            print("growth after the warm-up: " + ", ".join(
                f"{n} {last[n] - warm[n]:+d} kB over {k1 - k0} = {per_k[n]:+.2f} MB per 1,000" for n in PROFILES)
                + f"   flat (< 1 MB per 1,000): {'OK' if max(per_k.values()) < 1 else 'MISSED'}")
        finally:
            for c in clients.values():
                c.close()
            for p in procs.values():
                p.terminate()
                p.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
