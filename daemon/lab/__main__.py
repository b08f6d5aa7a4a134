"""python -m invariantd.daemon.lab provision | versions | run KERNEL CPU -- ARGS..."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from . import (CPU_MODELS, KERNEL_KEYS, LabError, LabUnavailable, cache_dir, provision, run_in_guest,
               timings, versions)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m invariantd.daemon.lab",
        description="arm64 KVM lab: boot real Debian arm64 kernels under qemu-system-aarch64 "
                    "(TCG, EL2 emulated) and run the project's Python code in the guest, where "
                    f"/dev/kvm is the real arm64 KVM. Cache: {cache_dir()} ($INVARIANTD_LAB_CACHE).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m invariantd.daemon.lab provision\n"
               "  python -m invariantd.daemon.lab versions\n"
               "  python -m invariantd.daemon.lab run 6.12 cortex-a72 -- -m invariantd.client.cli probe --json\n"
               "  python -m invariantd.daemon.lab run 7.x 'cortex-a72,midr=0x410fd084' -- -c 'import os; print(os.uname())'\n")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    pp = sub.add_parser("provision", help="install host tools, fetch kernels, rootfs, initramfs (cached)")
    pp.add_argument("--kernel", action="append", choices=KERNEL_KEYS,
                    help="only this kernel key (repeatable; default all)")
    pp.add_argument("--refresh", action="store_true",
                    help="re-resolve the newest kernels in the archive now (default: weekly)")
    sub.add_parser("versions", help="print the provisioned kernels as JSON")
    pr = sub.add_parser("run", help="boot KERNEL on -cpu CPU and run the guest's python3 with ARGS",
                        description="Everything after '--' is passed to the guest's python3. "
                                    "The program's stdout is printed; its exit code is ours.")
    pr.add_argument("kernel", choices=KERNEL_KEYS, metavar="KERNEL", help=f"one of {', '.join(KERNEL_KEYS)}")
    pr.add_argument("cpu", metavar="CPU", help=f"QEMU -cpu model, e.g. {', '.join(CPU_MODELS)}")
    pr.add_argument("args", nargs=argparse.REMAINDER, metavar="-- ARGS", help="python3 arguments")
    pr.add_argument("--timeout", type=float, default=600, help="seconds for the whole boot (default 600)")
    pr.add_argument("--kvm-mode", help="kvm-arm.mode= for the guest kernel (nvhe, protected, ...)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    try:
        if a.cmd == "provision":
            print(json.dumps(provision(a.kernel, refresh=a.refresh), indent=2))
            print(json.dumps({k: round(v, 2) for k, v in timings.items()}), file=sys.stderr)
        elif a.cmd == "versions":
            print(json.dumps(versions(), indent=2))
        elif a.cmd == "run":
            args = a.args[1:] if a.args[:1] == ["--"] else a.args
            if not args:
                pr.error("nothing to run: give python3 arguments after '--'")
            r = run_in_guest(a.kernel, a.cpu, args, timeout=a.timeout, kvm_mode=a.kvm_mode)
            sys.stdout.write(r.stdout)
            sys.stdout.flush()
            sys.stderr.write(r.stderr)
            logging.getLogger("invariantd.daemon.lab").info(
                "lab: rc=%d kernel=%s boot=%.2fs run=%.2fs wall=%.2fs log=%s", r.returncode,
                r.kernel_release, r.boot_seconds, r.run_seconds, r.wall_seconds, r.log_path)
            return r.returncode
    except LabUnavailable as e:
        print(f"lab unavailable: {e}", file=sys.stderr)
        return 2
    except LabError as e:
        print(f"lab error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
