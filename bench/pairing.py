"""What every bench here shares: variants timed paired and interleaved, reported with their spread and the load.

`interleave(variants, rounds)` runs each variant once per round, the order rotated every round (A B C, B C A, C A B,
...), so a drift in the machine's state (load, caches, thermal) lands on every variant alike; `report` prints each
variant's median [min..max] and its ratio to the named baseline's median, with the load average before and after.
`whole_process(argv)` times one fresh process (import and all: the cold figure an operator sees).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import time
from typing import Callable


def interleave(variants: dict[str, Callable[[], float | None]], rounds: int) -> dict[str, list[float]]:
    """Each variant returns the seconds it measured (None: time the call itself)."""
    names = list(variants)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            got = variants[n]()
            samples[n].append(got if got is not None else time.perf_counter() - t0)
    return samples


def whole_process(argv: list[str], env: dict | None = None) -> float:
    """Wall time of one fresh process; its failure is the bench's failure (with its stderr)."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    took = time.perf_counter() - t0
    if p.returncode not in (0, 3):       # 3: a plan or baseline that refuses is still a complete answer
        raise SystemExit(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.decode(errors='replace')[-500:]}")
    return took


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def report(samples: dict[str, list[float]], baseline: str, unit: str = "s", scale: float = 1.0,
           targets: dict[str, float] | None = None) -> dict[str, float]:
    """Print median [min..max] per variant and median / baseline's median; returns the medians."""
    base = statistics.median(samples[baseline])
    medians = {}
    width = max(map(len, samples))
    for name, xs in samples.items():
        med = statistics.median(xs)
        medians[name] = med
        line = (f"  {name:<{width}}  median {med * scale:9.3f} {unit} [{min(xs) * scale:.3f}..{max(xs) * scale:.3f}]"
                f"  n={len(xs)}")
        if name != baseline:
            line += f"  ratio to {baseline}: {med / base:.2f}x"
        if targets and name in targets:
            line += f"  target < {targets[name] * scale:g} {unit}: {'OK' if med < targets[name] else 'MISSED'}"
        print(line)
    return medians
