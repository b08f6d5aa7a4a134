"""`invariantctl plan` and `invariantctl baseline`: the negotiation engine from the command line.

plan --from VMPROFILE|CAPS --to CAPS [--policy FILE] [--json]
    A capability document (`invariantctl probe --json`) given to --from stands for a VM created on that
    host with its defaults; a shipped host profile name (e.g. cortex-a76@7.3) stands for its document. Prints one row per register and per differing field (register, field, source,
    destination, verdict, reason) and a summary of what the guest will see change.
    Exit codes: 0 migratable, 3 refused (not migratable), 2 bad input (the message names what is wrong).
baseline CAPS... [--name NAME] [--revision N] [--policy FILE] [--json] [-o FILE]
    A named, versioned VM profile every listed host accepts, and the fields that had to be lowered and why.
    Exit codes: 0 accepted by every host, 3 some field has no value every host accepts (listed), 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import sys

from .exits import CliError, Exit
from .render import VERDICTS, print_plan_doc


def _err(message: str, code: int = Exit.USAGE):
    return CliError(message, code)


def _read_json(path: str, what: str) -> dict:
    """A JSON file; or, when no such file exists, a shipped simulated host (`cortex-a76@7.3`, the --sim specs):
    its capability document, as `invariantctl probe --sim SPEC --json` prints it."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        from ..daemon.sim.host import list_profiles
        known = list_profiles()
        if path.split("-patched")[0] in known:
            from ..daemon.probe import probe
            from ..daemon.sim.host import SimHost
            return probe(SimHost(path), profile=path)
        raise _err(f"{what} {path}: no such file, and not a shipped host profile ({', '.join(known)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _err(f"{what} {path}: malformed JSON ({e})") from None
    except RecursionError:
        raise _err(f"{what} {path}: JSON nested too deeply to be a capability document or VM profile") from None
    except OSError as e:
        raise _err(f"{what} {path}: {e.strerror}") from None


def _policy(path: str | None):
    from ..protocol.policy import PolicyError, default_policy, loads
    if path is None:
        return default_policy()
    try:
        with open(path, encoding="utf-8") as f:
            return loads(f.read())
    except OSError as e:
        raise _err(f"--policy {path}: {e.strerror}") from None
    except PolicyError as e:
        raise _err(f"--policy {path}: {e}") from None


def cmd_plan(args) -> int:
    from ..protocol import schemas as S
    from ..protocol.negotiate import negotiate
    pol = _policy(args.policy)
    extra = frozenset(pol.drift)
    src_doc = _read_json(args.source, "--from")
    dst_doc = _read_json(args.to, "--to")
    try:
        vm = S.load_source(src_doc, extra)
    except S.SchemaError as e:
        raise _err(f"--from {args.source}: {e}") from None
    try:
        dest = S.host_from_doc(dst_doc, extra)
    except S.SchemaError as e:
        raise _err(f"--to {args.to}: {e}") from None
    plan = negotiate(vm, dest, pol)
    if args.json:
        json.dump(S.plan_to_doc(plan), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_plan_doc(S.plan_to_doc(plan), verbose=args.all, verdicts=args.verdict or ())
    return Exit.OK if plan.migratable else Exit.REFUSED


def cmd_baseline(args) -> int:
    from ..protocol import schemas as S
    from ..protocol.baseline import baseline
    pol = _policy(args.policy)
    hosts = []
    for p in args.caps:
        try:
            hosts.append(S.host_from_doc(_read_json(p, "CAPS"), frozenset(pol.drift)))
        except S.SchemaError as e:
            raise _err(f"{p}: {e}") from None
    b = baseline(hosts, name=args.name, revision=args.revision, policy=pol)
    return emit_baseline(args, b, hosts, [h.name for h in hosts])


def emit_baseline(args, b, hosts, names: list[str], documents: list[str] | None = None) -> int:
    """Write / print a baseline as `baseline` does (args: json, output, firecracker); `hosts` are the documents it was
    computed over, `names` the hosts it stands for (a fleet's nodes: several per document, whose addresses
    `documents` lists in the order of each field's values)."""
    from ..protocol import schemas as S
    doc = S.vm_to_doc(b.profile)
    doc["baseline"] = {
        "hosts": names,
        **({"documents": documents} if documents is not None else {}),
        "accepted_everywhere": b.accepted_everywhere,
        "lowered": [{"register": c.register, "field": c.field, "values": [f"{v:#x}" for v in c.values],
                     "chosen": f"{c.chosen:#x}", "reason": c.reason} for c in b.lowered],
        "conflicts": [{"register": c.register, "field": c.field, "values": [f"{v:#x}" for v in c.values],
                       "chosen": f"{c.chosen:#x}", "reason": c.reason} for c in b.conflicts],
        "omitted": list(b.omitted),
        "varies_per_host": [{"register": c.register, "values": [f"{v:#x}" for v in c.values], "reason": c.reason}
                            for c in b.varies],
    }
    text = json.dumps(doc, indent=1) + "\n"
    if args.firecracker:
        from ..protocol.fctemplate import template
        tpl, notes = template(b, hosts)
        with open(args.firecracker, "w", encoding="utf-8") as f:
            f.write(json.dumps(tpl, indent=1) + "\n")
        for n in notes:
            print(f"firecracker template: {n}", file=sys.stderr)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    if args.json:
        sys.stdout.write(text)
    else:
        print(f"baseline {b.profile.name} revision {b.profile.revision} over {len(names)} host(s)"
              f"{f' ({len(hosts)} distinct documents)' if len(hosts) != len(names) else ''}: "
              f"{len(b.profile.values)} registers")
        for c in b.lowered:
            verb = "lowered" if c.chosen < min(c.values) else "raised" if c.chosen > max(c.values) else "chose"
            print(f"  {verb} {c.register}{'.' + c.field if c.field else ''}: "
                  f"{'/'.join(f'{v:#x}' for v in c.values)} -> {c.chosen:#x}  ({c.reason})")
        for c in b.conflicts:
            print(f"  CONFLICT {c.register}{'.' + c.field if c.field else ''}: "
                  f"{'/'.join(f'{v:#x}' for v in c.values)}  ({c.reason})")
        for c in b.varies:
            print(f"  varies {c.register}: {'/'.join(f'{v:#x}' for v in c.values)}  ({c.reason})")
        for o in b.omitted:
            print(f"  omitted {o}")
        if b.profile.target_impls:
            print("  target implementations (errata discovery): "
                  + ", ".join(f"{i.midr:#x}" for i in b.profile.target_impls))
        print("result: " + ("accepted by every host" if b.accepted_everywhere else "NOT accepted by every host - exit 3"))
    return Exit.OK if b.accepted_everywhere else Exit.REFUSED


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="negotiate: per register and field, what a migration would do",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, metavar="VMPROFILE|CAPS",
                   help="the VM profile (JSON), or a capability document = a VM with that host's defaults")
    p.add_argument("--to", required=True, metavar="CAPS", help="destination capability document (probe --json)")
    p.add_argument("--policy", metavar="FILE", help="policy TOML merged over the defaults")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--all", action="store_true", help="also list identical registers")
    p.add_argument("--verdict", action="append", metavar="V", choices=VERDICTS,
                   help=f"list only entries with this verdict in the table (repeatable; one of {', '.join(VERDICTS)})")
    p.set_defaults(func=cmd_plan)
    b = subparsers.add_parser("baseline", help="a VM profile every listed host accepts",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("caps", nargs="+", metavar="CAPS", help="capability documents (probe --json)")
    b.add_argument("--name", default="baseline", help="the baseline VM profile's name (default: %(default)s)")
    b.add_argument("--revision", type=int, default=1, metavar="N", help="its revision number (default: %(default)s)")
    b.add_argument("--policy", metavar="FILE", help="policy TOML merged over the defaults")
    b.add_argument("--json", action="store_true", help="print the VM profile (with the baseline report) as JSON")
    b.add_argument("-o", "--output", metavar="FILE", help="write the VM profile JSON to FILE")
    b.add_argument("--firecracker", metavar="FILE", help="also write the baseline as a Firecracker custom CPU template "
                                                          "(aarch64 reg_modifiers / vcpu_features) to FILE")
    b.set_defaults(func=cmd_baseline)
