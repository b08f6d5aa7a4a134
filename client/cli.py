"""invariantctl: drive invariantd from the command line.

The entry point: every command's parser is registered here - offline planning (plan_cmd), the daemon's RPC
(ctl), the demo and the lab on top of them - so nothing below imports this module.
"""
from __future__ import annotations

import argparse
import json
import sys

from .exits import CliError, Exit
from .render import print_caps_summary


def _backend(sim: str | None):
    if sim:
        from ..daemon.sim import SimHost, ProfileError
        try:
            return SimHost(sim)
        except ProfileError as e:
            raise CliError(str(e)) from None
    from ..daemon.kvm.real import RealKvm
    return RealKvm()


def cmd_probe(args) -> int:
    from ..daemon.probe import probe
    backend = _backend(args.sim)
    doc = probe(backend, profile=args.sim)
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return Exit.OK
    print_caps_summary(doc, "this host" if not args.sim else "simulated host")
    if doc["arch"] != "aarch64":
        return Exit.OK
    print(f"{'register':<34} {'id':<20} {'value':<20} {'writable mask':<20} fields")
    for r in doc["registers"]:
        fields = " ".join(f"{k}={v:#x}" for k, v in r["fields"].items() if v)
        print(f"{r['name']:<34} {r['id']:<20} {r['value']:<20} {r.get('writable_mask', '-'):<20} {fields}")
    for e in doc["errors"]:
        print(f"warning: {e['op']} {e['id']}: {e['errno']}", file=sys.stderr)
    return Exit.OK


def _lab_cells(args):
    from ..daemon.lab.matrix import KERNELS, MODELS
    kernels = args.kernel or list(KERNELS)
    models = args.model or list(MODELS)
    for m in models:
        if m not in MODELS:
            raise CliError(f"unknown lab CPU model {m!r}; known: {', '.join(MODELS)}")
    return [(k, m) for k in kernels for m in models]


def cmd_lab(args) -> int:
    from ..daemon import lab
    from ..daemon.lab import matrix
    try:
        lab.provision(args.kernel)
        cells = _lab_cells(args)
        total_diffs, report = 0, []
        for i, (k, m) in enumerate(cells, 1):
            cell = matrix.run_cell(k, m, suite=args.cmd_lab == "conformance")
            if cell.errors:
                raise CliError("; ".join(cell.errors), Exit.LAB)
            line = {"kernel": k, "release": cell.kernel_release, "model": m, "wall_s": round(cell.wall, 1)}
            if args.cmd_lab == "profile":
                path = matrix.write_profile(cell.profile, args.out)
                line["profile"] = str(path)
            else:
                line.update(cases=cell.cases, differences=len(cell.diffs), diffs=cell.diffs)
                total_diffs += len(cell.diffs)
            report.append(line)
            if not args.json:
                extra = (f"-> {line['profile']}" if "profile" in line
                         else f"{cell.cases} cases, {len(cell.diffs)} differences")
                print(f"[{i}/{len(cells)}] {k} ({cell.kernel_release}) {m}: {extra} ({cell.wall:.1f}s)", flush=True)
                for d in cell.diffs:
                    print(f"    DIFF {d}")
    except lab.LabUnavailable as e:
        raise CliError(f"lab unavailable: {e}", Exit.LAB) from None
    except lab.LabError as e:
        raise CliError(f"lab error: {e}", Exit.LAB) from None
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return Exit.REFUSED if total_diffs else Exit.OK


def build_parser() -> argparse.ArgumentParser:
    from . import exits
    from ..protocol import version
    p = argparse.ArgumentParser(prog="invariantctl", description="invariantctl: drive invariantd from the command line.",
                                epilog=exits.table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"invariantctl {version()}")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probe", help="discover this host's KVM capabilities (or a simulated host's)")
    pr.add_argument("--sim", metavar="PROFILE@KERNEL",
                    help="probe the simulated arm64 host, e.g. cortex-a72-r0p4@6.12 (append -patched to the "
                         "kernel for the KVM_EINVARIANT era)")
    pr.add_argument("--json", action="store_true", help="print the capability document as JSON")
    pr.set_defaults(func=cmd_probe)
    from . import plan_cmd
    plan_cmd.register(sub)
    from . import fleet_cmd
    fleet_cmd.register(sub)
    from . import ctl
    ctl.register(sub)
    from . import demo
    demo.register(sub)
    lb = sub.add_parser("lab", help="real arm64 KVM kernels under QEMU: write simulator profiles, run conformance")
    lsub = lb.add_subparsers(dest="cmd_lab", required=True)
    for name, hlp in (("profile", "boot each kernel x CPU model, probe it, write the simulator's host profile"),
                      ("conformance", "run the conformance suite in each guest and on the matching simulated "
                                      "host; exit 3 on any difference")):
        q = lsub.add_parser(name, help=hlp)
        q.add_argument("--kernel", action="append", help="kernel key (6.1, 6.12, 7.x); repeatable; default all")
        q.add_argument("--model", action="append",
                       help="profile name (cortex-a53, cortex-a72-r0p3, ..., cortex-a76, neoverse-n1, a64fx, max)")
        q.add_argument("--json", action="store_true", help="one JSON report instead of text")
        if name == "profile":
            from pathlib import Path
            q.add_argument("--out", type=Path, default=None, help="directory (default: the shipped profiles)")
        q.set_defaults(func=cmd_lab)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..daemon.kvm.errors import KvmError
    try:
        return args.func(args)
    except CliError as e:
        print(f"invariantctl: {e}", file=sys.stderr)
        return e.code
    except KvmError as e:
        print(f"invariantctl: {e}", file=sys.stderr)
        return Exit.KVM
    except BrokenPipeError:             # `invariantctl probe | head`: the reader left, not an error
        sys.stderr.close()
        return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
