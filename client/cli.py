"""invariantctl: drive invariantd from the command line.

Exit codes (stable, for orchestrators):
  0  success                        4  peer or daemon unreachable
  1  internal error (a bug: report)  5  KVM / apply error (register, id and errno in the message)
  2  usage, bad input, not found     6  lab unavailable (no Debian archive or qemu)
  3  plan refused (not migratable)   7  migration failed, aborted, cancelled or in doubt
"""
from __future__ import annotations

import argparse
import json
import sys

EXIT_OK, EXIT_USAGE, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_KVM, EXIT_LAB = 0, 2, 3, 4, 5, 6


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def _backend(sim: str | None):
    if sim:
        from ..daemon.sim import SimHost, ProfileError
        try:
            return SimHost(sim)
        except ProfileError as e:
            raise CliError(str(e)) from None
    from ..daemon.kvm.real import RealKvm
    return RealKvm()


def print_caps_summary(doc: dict, label: str) -> None:
    """The human header of a capability document (probe here, or a daemon's / peer's via `caps`)."""
    one_reg = doc.get("one_reg", (doc.get("caps") or {}).get("KVM_CAP_ONE_REG"))
    print(f"{label}: {doc.get('source')} {doc.get('profile') or ''}   arch: {doc.get('arch')}   "
          f"kernel: {doc.get('kernel_release')}   KVM API {doc.get('api_version')}   ONE_REG: {'yes' if one_reg else 'no'}")
    print("caps: " + ", ".join(f"{k.replace('KVM_CAP_', '')}={v}" for k, v in (doc.get("caps") or {}).items()))
    if doc.get("arch") != "aarch64":
        return
    if doc.get("sim_era"):
        print(f"simulated kernel era: {doc['sim_era']}")
    print(f"per-CPU MIDR: {', '.join(doc.get('cpu_midrs') or []) or 'n/a'}   registers listed: "
          f"{len(doc.get('reg_list') or [])}   writable masks: "
          f"{'not offered' if doc.get('writable_masks') is None else len(doc['writable_masks'])}")
    if doc.get("sve_vls"):
        from ..protocol.catalog import sve_vqs
        vls = ", ".join(str(128 * q) for q in sve_vqs(int(doc["sve_vls"], 16)))
        print(f"SVE vector lengths: {vls} bits   an SVE vCPU reads differently: "
              f"{', '.join(_reg_name(k) for k in doc.get('sve_values') or {}) or 'nothing'}")


def _reg_name(hex_id: str) -> str:
    from ..protocol.catalog import catalog
    return catalog().name(int(hex_id, 16))


def cmd_probe(args) -> int:
    from ..daemon.probe import probe
    backend = _backend(args.sim)
    doc = probe(backend, profile=args.sim)
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return EXIT_OK
    print_caps_summary(doc, "this host" if not args.sim else "simulated host")
    if doc["arch"] != "aarch64":
        return EXIT_OK
    print(f"{'register':<34} {'id':<20} {'value':<20} {'writable mask':<20} fields")
    for r in doc["registers"]:
        fields = " ".join(f"{k}={v:#x}" for k, v in r["fields"].items() if v)
        print(f"{r['name']:<34} {r['id']:<20} {r['value']:<20} {r.get('writable_mask', '-'):<20} {fields}")
    for e in doc["errors"]:
        print(f"warning: {e['op']} {e['id']}: {e['errno']}", file=sys.stderr)
    return EXIT_OK


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
                raise CliError("; ".join(cell.errors), EXIT_LAB)
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
        raise CliError(f"lab unavailable: {e}", EXIT_LAB) from None
    except lab.LabError as e:
        raise CliError(f"lab error: {e}", EXIT_LAB) from None
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return EXIT_REFUSED if total_diffs else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="invariantctl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probe", help="discover this host's KVM capabilities (or a simulated host's)")
    pr.add_argument("--sim", metavar="PROFILE@KERNEL",
                    help="probe the simulated arm64 host, e.g. cortex-a72-r0p4@6.12 (append -patched to the "
                         "kernel for the KVM_EINVARIANT era)")
    pr.add_argument("--json", action="store_true", help="print the capability document as JSON")
    pr.set_defaults(func=cmd_probe)
    from . import plan_cmd
    plan_cmd.register(sub)
    from . import ctl; ctl.register(sub)  # noqa: E702
    lb = sub.add_parser("lab", help="real arm64 KVM kernels under QEMU: write simulator profiles, run conformance")
    lsub = lb.add_subparsers(dest="cmd_lab", required=True)
    for name, hlp in (("profile", "boot each kernel x CPU model, probe it, write the simulator's host profile"),
                      ("conformance", "run the conformance suite in each guest and on the matching simulated "
                                      "host; exit 3 on any difference")):
        q = lsub.add_parser(name, help=hlp)
        q.add_argument("--kernel", action="append", help="kernel key (6.1, 6.12, 7.x); repeatable; default all")
        q.add_argument("--model", action="append",
                       help="profile name (cortex-a53, cortex-a72-r0p3, ..., cortex-a76, neoverse-n1, a64fx, max)")
        q.add_argument("--json", action="store_true")
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
        return EXIT_KVM
    except BrokenPipeError:             # `invariantctl probe | head`: the reader left, not an error
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
