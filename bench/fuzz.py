"""Fuzz every entry point for bytes and documents with 1,000,000 mutated inputs (tests/support/fuzzing.py: the targets,
their typed errors and the mutation engine; CI runs 1,500 per target in tests/test_fuzz.py).

    .venv/bin/python bench/fuzz.py [--inputs 1000000] [--seed N] [--json]

Prints, per target, the inputs run, how many ended in the target's typed error, the rate, and every finding
(an input ending in any other exception). Exit 1 when there is a finding. The baseline printed with each rate is
the seeds' own rate (valid inputs, measured in the same run): a mutated input costing far more than a valid one
would show an amplification."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.fuzzing import run_target, targets  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, default=1_000_000, help="total inputs over all targets")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    ts = targets()
    per = max(1, a.inputs // len(ts))
    rows, findings = [], []
    for t in ts:
        t0 = time.perf_counter()
        reps = max(1, 2000 // len(t.seeds))
        for _ in range(reps):
            for s in t.seeds:
                t.run(s)
        base = (time.perf_counter() - t0) / (reps * len(t.seeds))
        t0 = time.perf_counter()
        typed, f = run_target(t, per, a.seed)
        took = time.perf_counter() - t0
        rows.append({"target": t.name, "inputs": per, "typed_errors": typed, "findings": len(f),
                     "inputs_per_s": round(per / took), "us_per_input": round(took / per * 1e6, 1),
                     "us_per_valid_seed": round(base * 1e6, 1), "ratio": round(took / per / base, 2)})
        findings += f
        if not a.json:
            r = rows[-1]
            print(f"{t.name:<38} {per:>8} inputs  {typed:>8} typed errors  {r['inputs_per_s']:>7}/s  "
                  f"{r['us_per_input']:>7} us/input vs {r['us_per_valid_seed']:>7} us/valid seed "
                  f"(x{r['ratio']})  findings {len(f)}", flush=True)
    total = sum(r["inputs"] for r in rows)
    if a.json:
        json.dump({"inputs": total, "rows": rows, "findings": findings}, sys.stdout, indent=1)
        print()
    else:
        print(f"total {total} inputs, {len(findings)} findings")
        for f in findings:
            print("  " + f)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
