"""Capture a VM's vCPU state on one host and restore it on another through a file: the migration path
without the network (plan from the destination's own capabilities, apply with the errno-aware retry,
read-back), so it runs on real arm64 kernels inside the lab's guests, one kernel at a time.

    python -m invariantd.daemon.vmstate capture --vcpus 2 > state.json        # on the source host
    python -m invariantd.daemon.vmstate restore state.json --json            # on the destination host

Exit codes as invariantctl: 0 restored and verified, 3 plan refused, 5 apply error, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import random
import sys

from ..protocol import kvmabi as abi
from ..protocol import regid
from ..protocol import schemas as S
from ..protocol.program import compile_plan
from ..protocol.negotiate import negotiate
from ..protocol.policy import default_policy
from .apply import ApplyError, apply_vm
from .readback import plan_deviations, read_vm
from .kvm.backend import VcpuInit, create_vcpus
from .vmprofile import host_capabilities, vm_profile
from .probe import probe

FORMAT = "invariantd/vm-state@1"


def _backend(sim: str | None):
    if sim:
        from .sim import SimHost
        return SimHost(sim)
    from .kvm.real import RealKvm
    return RealKvm()


def capture(backend, vcpus: int, features=("PSCI_0_2",), run: bool = True) -> dict:
    """A fresh VM with `vcpus` vCPUs (run once each when `run`, so KVM has frozen its ID registers as a running
    guest's would be), its register sets, and the source host's capability document. With "SVE" in `features`
    each vCPU is finalized at the host's vector lengths and its Z/P/FFR registers hold pseudo-random data
    (what KVM keeps of it: the bits within the vector length) before the run."""
    vm = backend.create_vm(0)
    try:
        feats = tuple(abi.VCPU_FEATURES[f] for f in features)
        init = VcpuInit(vm.preferred_target().target, feats) if backend.arch == "aarch64" else None
        rnd = random.Random(0x5FE)
        handles = create_vcpus(vm, backend.arch, range(vcpus), init)
        if "SVE" in features:
            for v in handles.values():
                for r in v.reg_list():
                    if regid.decode(r).group == "sve" and r != regid.SVE_VLS:
                        v.set_reg(r, rnd.getrandbits(8 * regid.size_bytes(r)))
        if run:
            for v in handles.values():
                v.run_once()
        regsets = read_vm(handles)
    finally:
        vm.close()
    return {"format": FORMAT, "features": list(features), "source": probe(backend),
            "regsets": {str(i): [[f"{r:#x}", f"{val:#x}"] for r, val in regs] for i, regs in regsets.items()}}


def restore(backend, state: dict, policy=None) -> tuple[int, dict]:
    """Plan against this host and apply. Returns (exit code, report)."""
    if state.get("format") != FORMAT:
        raise ValueError(f"not a VM state document (format {state.get('format')!r}, want {FORMAT!r})")
    pol = policy or default_policy()
    regsets = {int(i): [(int(r, 16), int(v, 16)) for r, v in regs] for i, regs in state["regsets"].items()}
    feats = tuple(abi.VCPU_FEATURES[f] for f in state["features"])
    src = state["source"]
    src_host = S.host_from_doc(src, frozenset(pol.drift)) if src.get("arch") == "aarch64" else None
    vm = vm_profile("restored", VcpuInit(0, feats), regsets, _SourceFacts(src), pol)
    dest = host_capabilities(probe(backend), backend, pol)
    plan = negotiate(vm, dest, pol)
    report = {"source": {"kernel": src.get("kernel_release"), "profile": src.get("profile"),
                         "midr": src.get("cpu_midrs")},
              "destination": {"kernel": dest.kernel_release},
              "plan": S.plan_to_doc(plan)}
    if src_host is not None:
        report["source"]["kernel_version"] = src_host.kernel_version
    if not plan.migratable:
        return 3, report
    apol = compile_plan(plan, vm)
    try:
        res = apply_vm(backend, regsets, apol, features=feats if backend.arch == "aarch64" else None)
    except ApplyError as e:
        report["error"] = str(e)
        report["events"] = [ev.as_dict() for ev in e.events]
        return 5, report
    try:
        written = res.written.get(min(res.written), {}) if res.written else {}
        report.update(
            registers=sum(len(w) for w in res.written.values()),
            dropped={str(i): [f"{r:#x}" for r in d] for i, d in res.dropped.items() if d},
            events=[ev.as_dict() for ev in res.events],
            mismatches=[str(m) for m in res.mismatches],
            deviations=plan_deviations(plan, written, res.dropped.get(min(res.written), []) if res.written else []),
            replays=res.replays)
    finally:
        res.close()
    return (0 if res.ok else 5), report


class _SourceFacts:
    """What vm_profile asks of the source backend, answered from the captured capability document."""

    def __init__(self, doc: dict) -> None:
        self.doc = doc

    def cpu_midrs(self) -> list[int]:
        return [int(m, 16) for m in self.doc.get("cpu_midrs") or []]

    def kernel_release(self) -> str:
        return self.doc.get("kernel_release", "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m invariantd.daemon.vmstate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture", help="create a VM here and print its vCPU state document")
    c.add_argument("--vcpus", type=int, default=2)
    c.add_argument("--no-run", action="store_true", help="do not enter the guest once before reading")
    c.add_argument("--sve", action="store_true", help="vCPUs with SVE (Z/P/FFR filled with pseudo-random data)")
    c.add_argument("--sim", metavar="PROFILE@KERNEL", help="capture on the simulated host")
    r = sub.add_parser("restore", help="plan against this host and apply a captured state")
    r.add_argument("file", help="state document (- for stdin)")
    r.add_argument("--sim", metavar="PROFILE@KERNEL", help="restore on the simulated host")
    r.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    backend = _backend(a.sim)
    if a.cmd == "capture":
        feats = ("PSCI_0_2", "SVE") if a.sve else ("PSCI_0_2",)
        json.dump(capture(backend, a.vcpus, feats, run=not a.no_run), sys.stdout)
        sys.stdout.write("\n")
        return 0
    try:
        state = json.load(sys.stdin if a.file == "-" else open(a.file))
        code, report = restore(backend, state)
    except (OSError, ValueError, KeyError) as e:
        print(f"vmstate: {a.file}: {e}", file=sys.stderr)
        return 2
    if a.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        p = report["plan"]
        print(f"plan: {'MIGRATABLE' if p.get('migratable') else 'REFUSED'}  {len(p.get('entries', []))} entries")
        for e in p.get("entries", []):
            if e.get("verdict") not in ("identical",):
                print(f"  {e.get('register'):<34} {e.get('field') or '-':<12} {e.get('verdict'):<9} {e.get('reason')}")
        print(f"registers applied: {report.get('registers', 0)}")
        for ev in report.get("events", []):
            print(f"  vCPU {ev['vcpu']} {ev['register']} {ev['errno']} -> {ev['action']}: {ev['detail']}")
        for k in ("mismatches", "deviations", "error"):
            if report.get(k):
                print(f"{k}: {report[k]}")
    return code


if __name__ == "__main__":
    sys.exit(main())
