"""Bench: the whole destination apply of a many-vCPU VM on this machine's real /dev/kvm against a C program doing
the same ioctls (issue 14 P1).

    .venv/bin/python bench/bench_apply.py [--vcpus 256] [--rounds 9]

Three variants, same register sets, interleaved and rotated every round (bench/pairing.py), in one process:
  c         bench/cref.c's cref_apply: KVM_CREATE_VM, n x KVM_CREATE_VCPU, every register SET (a refused one read
            back and accepted when equal), every register GET and compared, close - what a C VMM's restore does
  serial    apply_vm: invariantd's apply engine in one thread (create, VM-wide phase, state phase, read-back)
  threaded  apply_vm_async: the same with the state phase and the read-back spread over worker threads
x86: each vCPU's set is RealVcpu.reg_list() (the ONE_REG-readable MSRs) with the values a fresh vCPU holds (read
from a source VM of the same size); arm64: the vCPU's KVM_GET_REG_LIST set. Printed: median [min..max] ms, the
ratio of C's median to each variant's (>= 0.9 is the target: invariantd at 90% of C's speed or better), the load.
Skips (exit 0, with a message) without /dev/kvm or ONE_REG.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cref  # noqa: E402
from pairing import interleave, load, report  # noqa: E402

from invariantd.daemon.apply import apply_vm, apply_vm_async  # noqa: E402
from invariantd.daemon.readback import read_vm  # noqa: E402
from invariantd.protocol.program import ApplyProgram  # noqa: E402
from invariantd.protocol import kvmabi as abi  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vcpus", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    if not os.path.exists("/dev/kvm"):
        print("bench_apply: skipped: no /dev/kvm on this machine")
        return 0
    from invariantd.daemon.kvm.real import RealKvm
    try:
        kvm = RealKvm()
    except OSError as e:
        print(f"bench_apply: skipped: cannot open /dev/kvm ({e})")
        return 0
    if not kvm.check_extension(abi.CAPS["KVM_CAP_ONE_REG"]):
        print("bench_apply: skipped: this kernel has no KVM_CAP_ONE_REG for this architecture")
        return 0
    src = kvm.create_vm()
    try:
        vcpus = {i: src.create_vcpu(i) for i in range(args.vcpus)}
        if kvm.arch == "aarch64":
            pref = src.preferred_target()
            from invariantd.daemon.kvm.backend import VcpuInit
            for v in vcpus.values():
                v.init(VcpuInit(pref.target, (abi.VCPU_FEATURES["PSCI_0_2"],)))
        regsets = read_vm(vcpus)
    finally:
        src.close()
    nregs = len(regsets[0])
    if not nregs:
        print("bench_apply: skipped: no ONE_REG-readable registers on this kernel")
        return 0
    total = sum(len(r) for r in regsets.values())
    program = ApplyProgram()
    lib = cref.load()
    arrays = cref.Arrays([regsets[i] for i in sorted(regsets)])
    bad = ctypes.c_int()

    def c() -> float:
        ns = lib.cref_apply(kvm.fd, args.vcpus, arrays.ids, arrays.data, arrays.stride, arrays.offs, arrays.n,
                            ctypes.byref(bad))
        if ns < 0:
            raise SystemExit(f"bench_apply: the C reference failed: errno {-ns}")
        return ns / 1e9

    def serial() -> float:
        t = time.perf_counter()
        res = apply_vm(kvm, regsets, program)
        dt = time.perf_counter() - t
        assert res.ok, res.mismatches[:3]
        res.close()
        return dt

    def threaded() -> float:
        async def go():
            t = time.perf_counter()
            res = await apply_vm_async(kvm, regsets, program)
            dt = time.perf_counter() - t
            assert res.ok, res.mismatches[:3]
            res.close()
            return dt
        return trio.run(go)

    variants = {"c": c, "serial": serial, "threaded": threaded}
    for f in variants.values():                            # warm up (library load, caches)
        f()
    print(f"VM: {args.vcpus} vCPUs x {nregs} registers ({kvm.arch}, kernel {kvm.kernel_release()}), "
          f"{os.cpu_count()} CPUs; create + apply + read-back; {load()}")
    samples = interleave(variants, args.rounds)
    med = report(samples, "c", unit="ms", scale=1e3)
    print(f"  C read-back differences: {bad.value} (registers KVM changes by itself, e.g. the TSC)")
    for name in ("serial", "threaded"):
        ratio = med["c"] / med[name]
        print(f"speed vs C  {name:<9} {ratio:5.2f}x  ({total / med[name]:,.0f} regs/s vs {total / med['c']:,.0f})"
              f"  target >= 0.9: {'OK' if ratio >= 0.9 else 'MISSED'}")
    print(f"after: {load()}")
    kvm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
