"""Bench: plan one VM against 10,000 host capability documents, and a baseline over 10,000.

The planner in this process, warm (imports done, documents parsed into HostCapabilities before timing; parsing is
printed separately): what one `negotiate` costs per host. The 10,000 documents are variations of the shipped
Cortex-A72 / Neoverse-N1 profiles (24 distinct contents under 10,000 names). The operator's figure - a fresh
process reading 10,000 hosts from etcd, the target < 1 s - is bench/bench_fleet.py's, which plans once per
distinct document; this bench shows what planning every host separately costs.

    .venv/bin/python bench/bench_plan.py [N]
"""
from __future__ import annotations

import copy
import random
import sys
import time

from invariantd.protocol import schemas as S
from invariantd.protocol.baseline import baseline
from invariantd.protocol.catalog import catalog
from invariantd.protocol.negotiate import negotiate
from invariantd.protocol.policy import default_policy


def source_docs() -> list[dict]:
    from invariantd.daemon.probe import probe
    from invariantd.daemon.sim import SimHost, list_profiles
    wanted = [p for p in list_profiles() if p.startswith(("cortex-a72", "neoverse-n1"))]
    if not wanted:
        sys.exit("bench_plan: no cortex-a72 / neoverse-n1 profiles in protocol/data/profiles")
    return [probe(SimHost(p), profile=p) for p in wanted]


def variants(bases: list[dict], n: int, seed: int = 4) -> list[dict]:
    rng = random.Random(seed)
    cat = catalog()
    isar0 = f"{cat.id_of('ID_AA64ISAR0_EL1'):#x}"
    out = []
    for i in range(n):
        d = copy.deepcopy(rng.choice(bases))
        d["profile"] = f"{d['profile']}#{i}"
        if isar0 in d["values"] and rng.random() < 0.3:      # a host whose firmware hides AES (lowered field)
            v = int(d["values"][isar0], 16)
            d["values"][isar0] = f"{v & ~0xF0:#x}"
        out.append(d)
    return out


def main() -> None:
    import os
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    print("load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    extra = frozenset(default_policy().drift)
    bases = source_docs()
    docs = variants(bases, n)
    t0 = time.perf_counter()
    hosts = [S.host_from_doc(d, extra) for d in docs]
    t_parse = time.perf_counter() - t0
    vm = S.load_source(next(b for b in bases if b["profile"].startswith("cortex-a72-r0p3@7")) if any(
        b["profile"].startswith("cortex-a72-r0p3@7") for b in bases) else bases[0], extra)
    pol = default_policy()
    t0 = time.perf_counter()
    plans = [negotiate(vm, h, pol) for h in hosts]
    t_plan = time.perf_counter() - t0
    ok = sum(p.migratable for p in plans)
    from invariantd.protocol import negotiate as N
    cold_n = min(n, 1000)
    t0 = time.perf_counter()
    for h in hosts[:cold_n]:
        N._MEMO.clear()                      # no memo hits: every register decided from scratch
        negotiate(vm, h, pol)
    t_cold = (time.perf_counter() - t0) / cold_n
    a72_73 = [h for h in hosts if h.profile.startswith("cortex-a72") and h.kernel_version.startswith("7")]
    cluster = (a72_73 * (n // max(1, len(a72_73)) + 1))[:n]
    t0 = time.perf_counter()
    b = baseline(cluster, name="bench")
    t_base = time.perf_counter() - t0
    print(f"documents: {n} (from {len(bases)} shipped profiles), parse into HostCapabilities: {t_parse:.3f} s")
    print(f"plan 1 VM x {n} hosts: {t_plan:.3f} s ({t_plan / n * 1e6:.1f} us/plan), {ok} migratable, "
          f"{n - ok} refused")
    print(f"  cold (per-register memo cleared before every plan): {t_cold * 1e6:.1f} us/plan "
          f"= {t_cold * n:.2f} s for {n}")
    print(f"baseline over {len(cluster)} hosts: {t_base:.3f} s, {len(b.lowered)} lowered field(s), "
          f"{len(b.conflicts)} conflict(s)")


if __name__ == "__main__":
    main()
