"""Bench: the fleet verbs, cold, against a real etcd holding 10,000 hosts (issue 13; issue 14 P4).

    .venv/bin/python bench/bench_fleet.py [--hosts 10000] [--rounds 5]

Starts Debian's etcd on loopback (a temporary folder), stores N hosts of S distinct capability documents in the
daemons' layout (daemon/fleet.py: a summary per host, one content-addressed document per shape; S = 96: the 24
shipped host profiles x firmware that hides AES or not x two kernel builds), then times whole fresh processes,
paired and interleaved (bench/pairing.py), R rounds:
  floor     a fresh Python that only reads the same keys with etcd3gw (what any Python reader pays)
  plan      `invariantctl fleet plan cortex-a72-r0p3@6.12 --json` (import, read N summaries and S documents, check and
            parse each document, S plans, rank N rows, print them)
  baseline  `invariantctl fleet baseline --json`
Targets: plan and baseline < 1 s each (median). The ratio to the floor says what invariantd adds to reading the store.

Then, in this process and outside the target, the case the store's content addressing does not help: every host a
different document (N documents parsed and N plans) - printed so that nobody mistakes the first figure for it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pairing import interleave, load, report, whole_process  # noqa: E402
from support.etcd import etcd_server  # noqa: E402

from invariantd.daemon import fleet as store_layout  # noqa: E402
from invariantd.protocol.catalog import catalog  # noqa: E402

VM = "cortex-a72-r0p3@6.12"
PREFIX = "/bench"


def shapes() -> list[dict]:
    from invariantd.daemon.probe import probe
    from invariantd.daemon.sim import SimHost, list_profiles
    isar0 = f"{catalog().id_of('ID_AA64ISAR0_EL1'):#x}"
    out = []
    for spec in list_profiles():
        base = probe(SimHost(spec), profile=spec)
        for hide_aes in (False, True):
            for build in ("1", "2"):
                d = copy.deepcopy(base)
                d["kernel_release"] = f"{d['kernel_release']}-bench{build}"
                if hide_aes and isar0 in d["values"]:
                    d["values"][isar0] = f"{int(d['values'][isar0], 16) & ~0xF0:#x}"
                out.append(d)
    return out


def store(c, docs: list[dict], n: int, seed: int = 13) -> None:
    from etcd3gw.utils import _encode
    rng = random.Random(seed)
    for d in docs:                                   # the documents, as the daemons create them
        store_layout.put_host(c, PREFIX, "seed", d, "seed:7443")
    c.delete(store_layout.hosts_prefix(PREFIX) + "seed")
    ops = []
    for i in range(n):                               # the summaries, 100 puts per transaction
        node = f"host{i:05d}"
        d = rng.choice(docs)
        key, _ = store_layout.keys(PREFIX, node, d)
        ops.append({"request_put": {"key": _encode(key),
                                    "value": _encode(json.dumps(store_layout.summary(node, d, f"{node}:7443")))}})
        if len(ops) == 100 or i == n - 1:
            c.transaction({"compare": [], "success": ops, "failure": []})
            ops = []


def every_host_its_own_document(docs: list[dict], n: int) -> tuple[float, float]:
    """In process: N distinct documents (a kernel build per host) parsed from their stored text and planned."""
    from invariantd.protocol import schemas as S
    from invariantd.protocol.negotiate import negotiate
    from invariantd.protocol.policy import default_policy
    pol = default_policy()
    extra = frozenset(pol.drift)
    texts = []
    for i in range(n):
        d = dict(docs[i % len(docs)])
        d["kernel_release"] = f"{d['kernel_release']}.{i}"
        texts.append(store_layout.canonical(d))
    vm = S.load_source(next(d for d in docs if d["profile"] == VM), extra)
    t0 = time.perf_counter()
    hosts = [S.host_from_doc(json.loads(t), extra) for t in texts]
    t1 = time.perf_counter()
    for h in hosts:
        negotiate(vm, h, pol)
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    docs = shapes()
    ctl = os.path.join(os.path.dirname(sys.executable), "invariantctl")
    with tempfile.TemporaryDirectory() as tmp, etcd_server(Path(tmp)) as (endpoint, c):
        t0 = time.perf_counter()
        store(c, docs, a.hosts)
        print(f"stored {a.hosts} hosts of {len(docs)} distinct documents in etcd {endpoint} "
              f"({time.perf_counter() - t0:.1f} s)")
        host, port = endpoint.split(":")
        floor = [sys.executable, "-c", "import etcd3gw; c = etcd3gw.client(host=%r, port=%s); "
                 "c.get_prefix(%r); c.get_prefix(%r)" % (host, port, store_layout.hosts_prefix(PREFIX),
                                                         store_layout.caps_prefix(PREFIX))]
        common = ["--etcd", endpoint, "--prefix", PREFIX, "--json"]
        variants = {
            "floor": lambda: whole_process(floor),
            "plan": lambda: whole_process([ctl, "fleet", "plan", VM, *common]),
            "baseline": lambda: whole_process([ctl, "fleet", "baseline", *common]),
        }
        print(f"before: {load()}")
        samples = interleave(variants, a.rounds)
        print(f"whole fresh processes, {a.hosts} hosts, {len(docs)} documents, interleaved x{a.rounds}:")
        report(samples, "floor", targets={"plan": 1.0, "baseline": 1.0})
        print(f"after: {load()}")
    parse, plan = every_host_its_own_document(docs, a.hosts)
    print(f"outside the target - every host its own document, in this process: parse {a.hosts} stored documents "
          f"{parse:.2f} s + {a.hosts} plans {plan:.2f} s = {parse + plan:.2f} s")


if __name__ == "__main__":
    main()
