"""Bench: destination apply + read-back of a many-vCPU VM on this machine's real /dev/kvm, serial (apply_vm:
one thread, vCPU after vCPU) against threaded (apply_vm_async: the VM-wide phase serial and first, then the
"state" phase and the read-back one vCPU per worker thread, at most os.cpu_count() at a time; the C batch
calls release the GIL during their ioctl loop). Both measured in this run, same register sets, best of N.

x86: each vCPU's set is RealVcpu.reg_list() (the ONE_REG-readable MSRs) with the values a fresh vCPU holds
(read from a source VM of the same size); x86 refuses some MSR writes with EINVAL, which the apply path
handles (keep-equal) in both variants alike. arm64: the vCPU's KVM_GET_REG_LIST set.

Printed: registers per vCPU, vCPUs, regs/s serial and threaded (registers written + read back), the ratio,
and the CPUs available. Skips (exit 0, with a message) without /dev/kvm or ONE_REG.

    .venv/bin/python bench/bench_apply.py [--vcpus 64] [--runs 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import trio

from invariantd.daemon.apply import apply_vm, apply_vm_async
from invariantd.daemon.readback import read_vm
from invariantd.protocol.program import ApplyProgram
from invariantd.protocol import kvmabi as abi


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vcpus", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
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

    serial(), threaded()                                  # warm up (library load, caches)
    s, t = [], []
    for _ in range(args.runs):                            # interleaved: both see the same machine state
        s.append(serial())
        t.append(threaded())
    rs, rt = total / min(s), total / min(t)
    print(f"VM: {args.vcpus} vCPUs x {nregs} registers ({kvm.arch}, kernel {kvm.kernel_release()}), "
          f"{os.cpu_count()} CPUs; apply + read-back, best of {args.runs}")
    print(f"serial    {rs:12,.0f} regs/s  {min(s) * 1e3:8.2f} ms  (apply_vm: one thread)")
    print(f"threaded  {rt:12,.0f} regs/s  {min(t) * 1e3:8.2f} ms  (apply_vm_async: state phase + read-back in "
          f"<= {os.cpu_count()} worker threads)")
    print(f"ratio     {rt / rs:8.2f} x  threaded / serial")
    kvm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
