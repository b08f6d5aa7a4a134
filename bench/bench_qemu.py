"""QEMU migration with invariantd in the path vs stock QEMU, paired, on a pair where stock QEMU succeeds.

    .venv/bin/python bench/bench_qemu.py [--rounds 3] [--variant q11]

Both run in the arm64 lab (daemon/lab/qemu.py): two guests, Linux 7.x on a Cortex-A72 r0p4 each (identical hosts:
stock QEMU's own migration works there), Debian's QEMU -accel kvm running the bare-metal payload, 64 MiB of RAM.
- stock: QEMU's migration with return-path on both ends (qemu.migrate_stock);
- invariantd: the daemons' migrateVmm (qemu.migrate_with_daemons): plan + pre-flight before QEMU's migration,
  the agent in both QEMUs, pause-before-switchover held until the destination agent applied the plan.
Each round runs both, alternating which goes first. Figures, from the source QEMU's final query-migrate:
downtime (ms, the source paused -> the destination runs; for invariantd this includes the held switchover) and
total-time (ms, QEMU's migration from `migrate` to completion); for invariantd also the whole migrateVmm (plan to
commit) and the held switchover's own steps (the migration's detail.switchover). Printed: every run, then median [min..max] per variant and the ratio of medians (invariantd / stock).
Nested KVM under TCG on a 2-core host: absolute figures are slow and noisy; the ratio is what to read.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

from invariantd.daemon.lab import qemu

SOURCE_7X_R0P4 = qemu.GuestSpec("7.x", "cortex-a72,midr=0x410fd084", "10.0.0.2/24", "52:54:00:12:34:02")


def stock(variant: str) -> dict:
    m = qemu.migrate_stock(variant=variant, dest=qemu.DEST, source=SOURCE_7X_R0P4)
    q = m.source.get("query_migrate") or {}
    if q.get("status") != "completed":
        raise SystemExit(f"stock migration did not complete: {q}")
    return {"downtime": q.get("downtime"), "total": q.get("total-time"), "whole": None}


def daemons(variant: str) -> dict:
    m = qemu.migrate_with_daemons(variant=variant, dest=qemu.DEST, source=SOURCE_7X_R0P4)
    mig = m.source.get("migration") or {}
    if mig.get("state") != "committed":
        raise SystemExit(f"invariantd migration did not commit: {mig.get('error')}")
    q = mig["detail"]["qemu"]
    return {"downtime": q.get("downtime"), "total": q.get("total-time"),
            "whole": round(m.source["migration_wall_s"] * 1000), "hold": mig["detail"].get("switchover") or {}}


def med(xs):
    xs = [x for x in xs if x is not None]
    return (statistics.median(xs), min(xs), max(xs)) if xs else (None, None, None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variant", default="q11", choices=qemu.VARIANTS)
    args = ap.parse_args(argv)
    qemu.provision_qemu(args.variant, ("7.x",))
    runs = {"stock": [], "invariantd": []}
    fns = {"stock": stock, "invariantd": daemons}
    print(f"load before: {os.getloadavg()[0]:.2f}; {args.rounds} rounds, QEMU {args.variant}, 7.x r0p4 -> 7.x r0p4")
    for i in range(args.rounds):
        order = ("stock", "invariantd") if i % 2 == 0 else ("invariantd", "stock")
        for name in order:
            r = fns[name](args.variant)
            runs[name].append(r)
            hold = " ".join(f"{k} {v}" for k, v in (r.get("hold") or {}).items())
            print(f"round {i + 1} {name:<10} downtime {r['downtime']} ms  total-time {r['total']} ms"
                  + (f"  migrateVmm {r['whole']} ms" if r["whole"] else "")
                  + (f"  held switchover (ms): {hold}" if hold else "") + f"  (load {os.getloadavg()[0]:.2f})")
            sys.stdout.flush()
    print()
    for key, label in (("downtime", "downtime"), ("total", "QEMU total-time")):
        (sm, slo, shi), (im, ilo, ihi) = med(r[key] for r in runs["stock"]), med(r[key] for r in runs["invariantd"])
        ratio = f"{im / sm:.2f}x" if sm and im is not None else "n/a"
        print(f"{label:<16} stock {sm} [{slo}..{shi}] ms   invariantd {im} [{ilo}..{ihi}] ms   ratio {ratio}")
    holds = [r["hold"] for r in runs["invariantd"] if r.get("hold")]
    if holds:
        print(f"{'held switchover':<16} invariantd's share of its downtime, medians (ms): " + ", ".join(
            f"{k} {med(h.get(k) for h in holds)[0]}" for k in holds[0]) + "  (noticed: QEMU's pre-switchover event "
            "-> the daemon; decided; journal: the step written; continue: migrate-continue answered)")
    wm, wlo, whi = med(r["whole"] for r in runs["invariantd"])
    print(f"{'migrateVmm':<16} plan + pre-flight + QEMU migration + commit: {wm} [{wlo}..{whi}] ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
