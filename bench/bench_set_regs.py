"""Registers per second setting one vCPU's registers on this machine's real /dev/kvm (issue 14 P1).

    .venv/bin/python bench/bench_set_regs.py [--regs 256] [--sets 200] [--rounds 15]

Three variants on the same vCPU, same ids and values, interleaved and rotated every round (bench/pairing.py), each
round doing --sets full register sets:
  python    one Python call per register (RealVcpu.set_reg)
  set_regs  RealVcpu.set_regs(RegisterSet): the call the apply engine makes - the set's bytes copied into the
            thread's reused C buffers, one crossing into bench/../daemon/kvm/batch.c per set
  c         bench/cref.c's cref_set_loop: a plain C loop of KVM_SET_ONE_REG ioctls (the same fd, in this process)
Printed: median [min..max] ms per round, regs/s, each variant's speed as a fraction of C's (C's median time / its
median time; target for set_regs >= 0.9), and the load. x86 hosts use MSR ids through ONE_REG (Linux >= 6.18); only
registers whose GET/SET round-trip works here are used, repeated to a 256-register set (an arm64 vCPU's list).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cref  # noqa: E402
from pairing import interleave, load, report  # noqa: E402

from invariantd.daemon.kvm.real import RealKvm  # noqa: E402
from invariantd.protocol.regset import RegisterSet  # noqa: E402
from invariantd.protocol import regid  # noqa: E402


CANDIDATES = [0x8B, 0x174, 0x175, 0x176, 0x277, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,
              0xC0000100, 0xC0000101, 0xC0000102, 0x1B, 0x10]


def usable(vcpu) -> list[tuple[int, int]]:
    out = []
    for msr in CANDIDATES:
        rid = regid.x86_msr(msr)
        try:
            v = vcpu.get_reg(rid)
            vcpu.set_reg(rid, v)
            out.append((rid, v))
        except OSError:
            pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regs", type=int, default=256)
    ap.add_argument("--sets", type=int, default=200, help="register sets per variant per round")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    if not os.path.exists("/dev/kvm"):
        print("bench_set_regs: no /dev/kvm here; nothing to measure", file=sys.stderr)
        return 1
    kvm = RealKvm()
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    base = usable(vcpu)
    if not base:
        print("bench_set_regs: no register round-trips through ONE_REG on this kernel", file=sys.stderr)
        return 1
    regs = (base * (args.regs // len(base) + 1))[:args.regs]
    rs = RegisterSet.from_pairs(regs)                # what the apply engine hands the binding
    lib = cref.load()
    arr = cref.Arrays([rs])
    fails = ctypes.c_int()

    def python() -> None:
        for _ in range(args.sets):
            for r, v in regs:
                vcpu.set_reg(r, v)

    def set_regs() -> None:
        for _ in range(args.sets):
            if any(vcpu.set_regs(rs)):
                raise SystemExit("bench_set_regs: a batch set failed")

    def c() -> float:
        return lib.cref_set_loop(vcpu.fd, arr.ids, arr.data, arr.offs, arr.n, args.sets, ctypes.byref(fails)) / 1e9

    variants = {"c": c, "set_regs": set_regs, "python": python}
    for f in variants.values():
        f()
    print(f"registers per set: {args.regs} ({len(base)} distinct MSRs), {args.sets} sets per round, "
          f"{args.rounds} rounds; {load()}")
    samples = interleave(variants, args.rounds)
    med = report(samples, "c", unit="ms", scale=1e3)
    n = args.regs * args.sets
    for name in ("set_regs", "python"):
        ratio = med["c"] / med[name]
        print(f"speed vs C  {name:<9} {ratio:5.2f}x  ({n / med[name]:,.0f} regs/s vs {n / med['c']:,.0f})"
              + (f"  target >= 0.9: {'OK' if ratio >= 0.9 else 'MISSED'}" if name == "set_regs" else ""))
    if fails.value:
        print(f"warning: the C loop saw {fails.value} failed sets", file=sys.stderr)
    print(f"after: {load()}")
    vm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
