"""Bench: plan one VM against 10,000 host capability documents, and a baseline over 10,000 (issue 14 P4).

Every figure comes from a fresh Python process (the planner's memos start empty), the variants interleaved and
rotated (bench/pairing.py), R rounds; each child prints what it timed itself:
  plan      N documents (24 distinct contents under N host names: the shipped Cortex-A72 / Neoverse-N1 profiles,
            30% of them with firmware hiding AES) parsed into HostCapabilities, then 1 VM planned against each:
            N negotiate() calls, no plan shared between hosts. Target < 1 s.
  baseline  the baseline of N Cortex-A72 7.x hosts. Target < 1 s.
  distinct  as plan, but every host a different document (each lowers a random field set of its own): what the
            per-register memo saves when no two hosts are alike. Outside the target, printed so that nobody
            mistakes the first figure for it.
Parsing (HostCapabilities from the parsed JSON: 10,000 distinct 25 KB documents take ~1.6 s here, the fleet
store's content addressing is what spares an operator that) and the planner's imports are timed and printed
apart from the work; building the documents from the simulated hosts is not timed.
The operator's cold path through a real etcd is bench/bench_fleet.py.

    .venv/bin/python bench/bench_plan.py [--hosts N] [--rounds R]
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pairing import interleave, load, report  # noqa: E402


def source_docs() -> list[dict]:
    from invariantd.daemon.probe import probe
    from invariantd.daemon.sim import SimHost, list_profiles
    wanted = [p for p in list_profiles() if p.startswith(("cortex-a72", "neoverse-n1"))]
    if not wanted:
        sys.exit("bench_plan: no cortex-a72 / neoverse-n1 profiles in protocol/data/profiles")
    return [probe(SimHost(p), profile=p) for p in wanted]


def variants(bases: list[dict], n: int, distinct: bool = False, seed: int = 4) -> list[dict]:
    """N host documents from the shipped ones; `distinct`: each also lowers fields of its own choosing in the
    ID_AA64ISAR0/ISAR1/PFR0/MMFR0 registers, so no two hosts share a document."""
    from invariantd.protocol.catalog import catalog
    rng = random.Random(seed)
    cat = catalog()
    isar0 = f"{cat.id_of('ID_AA64ISAR0_EL1'):#x}"
    regs = [(f"{cat.id_of(r):#x}", [f for f in cat.fields_of(r) if f.width == 4])
            for r in ("ID_AA64ISAR0_EL1", "ID_AA64ISAR1_EL1", "ID_AA64PFR0_EL1", "ID_AA64MMFR0_EL1")]
    texts = [json.dumps(b) for b in bases]
    out, seen = [], set()
    for i in range(n):
        d = json.loads(rng.choice(texts))
        d["profile"] = f"{d['profile']}#{i}"
        if isar0 in d["values"] and rng.random() < 0.3:      # a host whose firmware hides AES (lowered field)
            v = int(d["values"][isar0], 16)
            d["values"][isar0] = f"{v & ~0xF0:#x}"
        while distinct:
            for key, fields in regs:
                if key in d["values"] and rng.random() < 0.5:
                    f = rng.choice(fields)
                    v = int(d["values"][key], 16)
                    d["values"][key] = f"{f.put(v, f.get(v) // 2):#x}"
            shape = json.dumps(d["values"], sort_keys=True) + d["kernel_version"]
            if shape not in seen:
                seen.add(shape)
                break
        out.append(d)
    return out


def child(what: str, n: int) -> None:
    """One fresh process: build the documents, time parsing and the work, print {"parse": s, "work": s, ...}."""
    t0 = time.perf_counter()
    from invariantd.protocol import schemas as S
    from invariantd.protocol.baseline import baseline
    from invariantd.protocol.negotiate import negotiate
    from invariantd.protocol.policy import default_policy
    pol = default_policy()
    extra = frozenset(pol.drift)
    imports = time.perf_counter() - t0
    bases = source_docs()
    docs = variants(bases, n, distinct=what == "distinct")
    if what == "baseline":
        docs = [d for d in docs if d["profile"].startswith("cortex-a72") and d["kernel_version"].startswith("7")]
        docs = (docs * (n // max(1, len(docs)) + 1))[:n]
    t0 = time.perf_counter()
    hosts = [S.host_from_doc(d, extra) for d in docs]
    t1 = time.perf_counter()
    out: dict = {"parse": t1 - t0, "imports": imports}
    if what == "baseline":
        b = baseline(hosts, name="bench", policy=pol)
        out.update(lowered=len(b.lowered), conflicts=len(b.conflicts))
    else:
        src = next((b for b in bases if b["profile"].startswith("cortex-a72-r0p3@7")), bases[0])
        vm = S.load_source(src, extra)
        ok = sum(negotiate(vm, h, pol).migratable for h in hosts)
        out.update(migratable=ok, distinct=len({h.values for h in hosts}))
    out["work"] = time.perf_counter() - t1
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--child", choices=("plan", "baseline", "distinct"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.hosts)
    imports: dict[str, list[float]] = {}
    parse: dict[str, list[float]] = {}
    last: dict[str, dict] = {}

    def run(what: str):
        def go() -> float:
            p = subprocess.run([sys.executable, __file__, "--child", what, "--hosts", str(a.hosts)],
                               capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"bench_plan --child {what}: exit {p.returncode}: {p.stderr[-800:]}")
            got = last[what] = json.loads(p.stdout.splitlines()[-1])
            parse.setdefault(what, []).append(got["parse"])
            imports.setdefault(what, []).append(got["imports"])
            return got["work"]
        return go

    print(f"before: {load()}")
    samples = interleave({w: run(w) for w in ("plan", "baseline", "distinct")}, a.rounds)
    print(f"fresh processes, {a.hosts} hosts, interleaved x{a.rounds} (the work each child timed itself):")
    report(samples, "plan", targets={"plan": 1.0, "baseline": 1.0})
    print("  parsing the documents into HostCapabilities (not in the figures above):")
    report(parse, "plan")
    print("  importing the planner (invariantd.protocol) in the fresh process, before either:")
    report(imports, "plan")
    p, d, b = last["plan"], last["distinct"], last["baseline"]
    print(f"plan: {p['migratable']} of {a.hosts} migratable, {p['distinct']} distinct host documents; "
          f"distinct: {d['migratable']} migratable, {d['distinct']} distinct; "
          f"baseline: {b['lowered']} lowered field(s), {b['conflicts']} conflict(s)")
    print(f"after: {load()}")


if __name__ == "__main__":
    main()
