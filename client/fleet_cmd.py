"""`invariantctl fleet`: every host the daemons published to etcd (`[etcd]` in their config; daemon/etcdpub.py).

fleet hosts
    One line per host: node, profile, kernel, MIDR, cap 239, peer address, its capability document's address.
fleet plan VM [--daemon ADDR]
    VM: a VM profile (JSON), a capability document or a shipped host profile (= a VM created with that host's
    defaults), as `plan --from` takes; with --daemon, the name of a VM that daemon holds (its profile read from
    its vCPUs now, over the RPC's vmProfile). Every host, ranked: migratable with nothing the guest sees change, then
    migratable with the fewest guest-visible changes, then refused (the reasons), then hosts that could not be
    planned (why). One plan per distinct capability document, shared by the hosts that published it.
    Exit codes: 0 some host is migratable, 3 none is, 4 etcd unreachable, 2 bad input / no hosts.
fleet baseline
    The baseline (as `baseline` prints it) of every stored host, or of those --nodes selects.
    Exit codes: 0 accepted by every host, 3 some field has no value every host accepts, 4 etcd unreachable, 2 bad
    input / no hosts.

The store: --etcd HOST:PORT (default $INVARIANTD_ETCD or 127.0.0.1:2379), --prefix (the daemons' `[etcd] prefix`,
default $INVARIANTD_ETCD_PREFIX or /invariantd), --etcd-ca / --etcd-cert / --etcd-key for an etcd behind TLS.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .exits import CliError, Exit
from .render import print_fleet_hosts, print_fleet_plan


def _store(args):
    from ..daemon import fleet
    from ..daemon.config import EtcdSection
    from ..daemon.fleet import client
    from .plan_cmd import _policy
    pol = _policy(args.policy)
    section = EtcdSection(endpoint=args.etcd or os.environ.get("INVARIANTD_ETCD") or "127.0.0.1:2379",
                          prefix=args.prefix, ttl=30.0, ca=args.etcd_ca or "", cert=args.etcd_cert or "",
                          key=args.etcd_key or "")
    try:
        c = client(section)
    except ImportError:
        raise CliError("fleet: the etcd client is not installed (pip install 'invariantd[fleet]')") from None
    except (ValueError, OSError) as e:
        raise CliError(f"--etcd {section.endpoint}: {e}") from None
    try:
        store = fleet.read(c, args.prefix, args.nodes or (), frozenset(pol.drift))
    except fleet.StoreError as e:
        raise CliError(str(e), Exit.UNREACHABLE) from None
    if not store.hosts:
        sel = f" matching {', '.join(args.nodes)}" if args.nodes else ""
        raise CliError(f"fleet: no hosts{sel} under {args.prefix} in etcd {section.endpoint} (do the daemons have an "
                       f"[etcd] section with this prefix?)")
    return store, pol


def _host_doc(h) -> dict:
    s = h.summary
    return {"node": h.node, "profile": s.get("profile", ""), "kernel": s.get("kernel", ""), "midr": s.get("midr", ""),
            "cap239": bool(s.get("cap239")), "peer": s.get("peer", ""), "caps": h.digest,
            **({"problem": h.problem} if h.problem else {})}


def cmd_hosts(args) -> int:
    store, _ = _store(args)
    hosts = [_host_doc(h) for h in store.hosts]
    if args.json:
        json.dump({"prefix": args.prefix, "hosts": hosts, "documents": len(store.docs)}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_fleet_hosts(hosts, len(store.docs))
    return Exit.OK


def cmd_plan(args) -> int:
    from ..daemon import fleet
    from ..protocol import schemas as S
    from .plan_cmd import _read_json
    if args.limit < 0:
        raise CliError(f"--limit {args.limit}: must be 0 (all) or more")
    store, pol = _store(args)
    if args.daemon:                    # a VM that daemon holds, as its planner sees it now
        from ..daemon.rpcclient import RpcError
        from . import exits
        from .ctl import _client
        try:
            with _client(args) as c:
                doc = c.vm_profile(args.vm)
        except RpcError as e:
            raise CliError(f"VM {args.vm} on {args.daemon}: {e.message}", exits.for_kind(e.kind)) from None
    else:
        doc = _read_json(args.vm, "VM")
    try:
        vm = S.load_source(doc, frozenset(pol.drift))
    except S.SchemaError as e:
        raise CliError(f"VM {args.vm}: {e}") from None
    rows = fleet.plan_all(vm, store, pol)
    counts = {k: sum(r.verdict == k for r in rows) for k in fleet.RANKS}
    plans = {}
    for r in rows:
        if r.plan is not None and r.host.digest not in plans:
            plans[r.host.digest] = {"verdict": r.verdict, "plan_digest": r.plan.digest.hex(),
                                    "guest_visible": list(r.changes), "reasons": list(r.reasons)}
    head = {"vm": vm.name, "hosts": len(rows), "documents": len(store.caps), "counts": counts, "plans": plans}
    if args.json:
        # one row per line, written by json's C encoder (indent= would use the pure-Python one: 10,000 rows take
        # a second); a row names its document, whose plan (shared by every host of that shape) is in "plans"
        out = sys.stdout
        out.write(json.dumps(head)[:-1] + ', "rows": [\n')
        out.write(",\n".join(json.dumps({**_host_doc(r.host), "verdict": r.verdict, "changes": len(r.changes),
                                          "refusals": len(r.reasons) if r.verdict == fleet.REFUSED else 0})
                              for r in rows))
        out.write("\n]}\n")
    else:
        print_fleet_plan(head, rows, limit=args.limit)
    return Exit.OK if counts[fleet.MIGRATABLE] + counts[fleet.WITH_CHANGES] else Exit.REFUSED


def cmd_baseline(args) -> int:
    from ..daemon import fleet
    from .plan_cmd import emit_baseline
    store, pol = _store(args)
    ok = [h for h in store.hosts if not h.problem]
    for h in store.hosts:
        if h.problem:
            print(f"fleet baseline: leaving out {h.node}: {h.problem}", file=sys.stderr)
    try:
        b = fleet.fleet_baseline(store, args.name, args.revision, pol)
    except ValueError as e:
        raise CliError(f"fleet baseline: {e}") from None
    digests = list(dict.fromkeys(h.digest for h in ok))
    return emit_baseline(args, b, [store.caps[d] for d in digests], [h.node for h in ok], digests)


def register(sub) -> None:
    from . import exits
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("the store (etcd, as the daemons' [etcd] section publishes to it)")
    g.add_argument("--etcd", metavar="HOST:PORT", help="etcd endpoint (default $INVARIANTD_ETCD or 127.0.0.1:2379)")
    g.add_argument("--prefix", default=os.environ.get("INVARIANTD_ETCD_PREFIX", "/invariantd"),
                   help="the daemons' [etcd] prefix (default $INVARIANTD_ETCD_PREFIX or %(default)s)")
    g.add_argument("--etcd-ca", metavar="PEM", help="CA of an etcd served over TLS (enables https)")
    g.add_argument("--etcd-cert", metavar="PEM", help="client certificate for etcd")
    g.add_argument("--etcd-key", metavar="PEM", help="client key for etcd")
    common.add_argument("--nodes", action="append", metavar="GLOB",
                        help="only hosts whose node name matches (repeatable; shell-style, e.g. 'rack7-*')")
    common.add_argument("--policy", metavar="FILE", help="policy TOML merged over the defaults")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    kw = dict(parents=[common], epilog=exits.table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    f = sub.add_parser("fleet", help="every host published to etcd: list, plan a VM against all, baseline",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fs = f.add_subparsers(dest="fleet_cmd", required=True, metavar="{hosts,plan,baseline}")
    p = fs.add_parser("hosts", help="the hosts in the store", **kw)
    p.set_defaults(func=cmd_hosts)
    from .ctl import connection_options
    p = fs.add_parser("plan", help="plan one VM against every host, ranked", parents=[common, connection_options()],
                      epilog=exits.table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vm", metavar="VM", help="VM profile JSON, capability document or shipped host profile "
                                           "(e.g. cortex-a72-r0p3@7.3); with --daemon, the name of a VM it holds")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="print only the first N rows (0 = all; the "
                                                                       "summary counts every host)")
    p.set_defaults(func=cmd_plan)
    p = fs.add_parser("baseline", help="a VM profile every stored host accepts", **kw)
    p.add_argument("--name", default="baseline", help="the baseline VM profile's name (default: %(default)s)")
    p.add_argument("--revision", type=int, default=1, metavar="N", help="its revision number (default: %(default)s)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the VM profile JSON to FILE")
    p.add_argument("--firecracker", metavar="FILE", help="also write it as a Firecracker custom CPU template")
    p.set_defaults(func=cmd_baseline)
