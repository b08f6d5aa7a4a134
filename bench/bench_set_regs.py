"""Registers per second applying a vCPU register set on this machine's real /dev/kvm.

(a) one Python call per register (RealVcpu.set_reg), (b) RealVcpu.set_regs(RegisterSet): the call the apply
engine makes (the C batch, one crossing per vCPU set, its buffers reused per register list),
(c) a plain C loop of KVM_SET_ONE_REG ioctls, built here with the system compiler, same ids and values.
Prints the three rates and the ratios against (c), all measured in this run. Target: (b) >= 0.9 x (c).
x86 hosts use MSR ids through ONE_REG (Linux >= 6.18); only registers whose GET/SET round-trip works here
are used, repeated to a 256-register set (the size of an arm64 vCPU's list).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from invariantd.daemon.kvm.real import RealKvm
from invariantd.protocol.regset import RegisterSet
from invariantd.protocol import regid

C_LOOP = r"""
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
struct one { uint64_t id, addr; };
int main(int argc, char **argv) {
    int n = atoi(argv[1]), rounds = atoi(argv[2]);
    uint64_t *ids = calloc(n, 8), *vals = calloc(n, 8);
    for (int i = 0; i < n; i++) { if (scanf("%lx %lx", &ids[i], &vals[i]) != 2) return 2; }
    int kvm = open("/dev/kvm", O_RDWR), vm = ioctl(kvm, 0xAE01, 0), vcpu = ioctl(vm, 0xAE41, 0);
    if (vcpu < 0) { perror("vcpu"); return 1; }
    struct timespec a, b; long fails = 0;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int r = 0; r < rounds; r++)
        for (int i = 0; i < n; i++) { struct one o = { ids[i], (uint64_t)(uintptr_t)&vals[i] };
            if (ioctl(vcpu, 0x4010AEACUL, &o) < 0) fails++; }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    printf("%.1f %ld\n", (double)n * rounds / s, fails);
    return 0;
}
"""

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
    ap.add_argument("--rounds", type=int, default=400)
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
    ids, vals = [r for r, _ in regs], [v for _, v in regs]

    t = time.perf_counter()
    for _ in range(args.rounds):
        for r, v in regs:
            vcpu.set_reg(r, v)
    a = args.regs * args.rounds / (time.perf_counter() - t)

    rs = RegisterSet.from_values(ids, vals)          # what the apply engine hands the binding
    fails = 0
    t = time.perf_counter()
    for _ in range(args.rounds):
        fails += sum(1 for e in vcpu.set_regs(rs) if e)
    b = args.regs * args.rounds / (time.perf_counter() - t)
    if fails:
        print(f"warning: {fails} batch sets failed", file=sys.stderr)

    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "loop.c"), os.path.join(d, "loop")
        with open(src, "w") as f:
            f.write(C_LOOP)
        subprocess.run(["cc", "-O2", "-o", exe, src], check=True)
        inp = "".join(f"{r:x} {v:x}\n" for r, v in regs)
        out = subprocess.run([exe, str(args.regs), str(args.rounds)], input=inp, capture_output=True,
                             text=True, check=True).stdout.split()
        c, cfails = float(out[0]), int(out[1])
    print(f"registers per vCPU set: {args.regs} ({len(base)} distinct MSRs), rounds: {args.rounds}")
    print(f"(a) python call per register : {a:12,.0f} regs/s   ratio to C loop {a / c:.3f}")
    print(f"(b) set_regs(RegisterSet)     : {b:12,.0f} regs/s   ratio to C loop {b / c:.3f}  (target >= 0.9)")
    print(f"(c) plain C loop of ioctls   : {c:12,.0f} regs/s   (failures {cfails})")
    vm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
