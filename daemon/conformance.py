"""One conformance suite, two backends: ONE_REG / REG_LIST / masks cases generated from the catalog.

`run_suite(backend)` generates cases from the backend's own capability document and the catalog, runs
each on a fresh VM and records, per step, the errno (or OK) and the read-back value. The same module runs
inside the arm64 guests on real kernels (`python3 -m invariantd.daemon.conformance --json`) and on the
simulated host of the matching era and CPU; `compare()` lists every case where they differ.
Stdlib + the project only (it runs in a minimal guest rootfs).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Callable

from ..protocol import kvmabi as abi
from ..protocol import regid
from ..protocol.catalog import catalog
from .kvm.backend import VcpuInit
from .kvm.errors import KvmError
from .probe import probe

FORMAT = "invariantd/conformance@1"


@dataclass
class Case:
    name: str
    kind: str
    steps: list[tuple] = field(default_factory=list)    # ("set"|"get"|"run"|"cap239"|..., args...)
    cap239_first: bool = False
    run_first: bool = False
    meta: dict = field(default_factory=dict)
    features: tuple[str, ...] = ("PSCI_0_2",)              # the vCPU's init features (kvmabi names)


def _field_cases(doc: dict) -> list[Case]:
    cat = catalog()
    values = {int(k, 16): int(v, 16) for k, v in doc["values"].items()}
    cases = []
    for rid in (int(x, 16) for x in doc["reg_list"]):
        fields = cat.fields_of(rid)
        if cat.reg_class(rid) not in ("id", "cache") or not fields:
            continue
        name, cur = cat.name(rid), values.get(rid, 0)
        for f in fields:
            v = f.get(cur)
            lo = -(1 << (f.width - 1)) if f.signed else 0
            hi = (1 << (f.width - 1)) - 1 if f.signed else (1 << f.width) - 1
            for label, nv in (("lower", v - 1), ("raise", v + 1)):
                if lo <= nv <= hi:
                    new = f.put(cur, nv)
                    cases.append(Case(f"field/{name}.{f.name}/{label}", "field",
                                      [("set", rid, new), ("get", rid), ("set", rid, cur), ("get", rid)],
                                      meta={"register": name, "field": f.name, "type": f.kvm_safety.value,
                                            "from": f.raw(cur), "to": f.raw(new)}))
    return cases


def generate(doc: dict) -> list[Case]:
    cat = catalog()
    listed = {int(x, 16) for x in doc["reg_list"]}
    values = {int(k, 16): int(v, 16) for k, v in doc["values"].items()}
    midr, revidr, aidr = (cat.id_of(n) for n in ("MIDR_EL1", "REVIDR_EL1", "AIDR_EL1"))
    isar0 = cat.id_of("ID_AA64ISAR0_EL1")
    m = values.get(midr, 0)
    cases = [
        Case("reglist/count", "reglist", [("reglist",)]),
        Case("reglist/e2big-sizing", "reglist", [("reglist-raw", "zero"), ("reglist-raw", "short"), ("reglist-raw", "exact")]),
        Case("before-init/get-midr", "lifecycle", [("get-noinit", midr)]),
        Case("unknown/unlisted-sysreg", "errno", [("get", regid.sysreg(3, 0, 15, 15, 7))]),
        Case("unknown/bad-id-bits", "errno", [("get", midr | (1 << 40))]),
        Case("unknown/fw-index", "errno", [("get", regid.fw(0x7F))]),
        Case("masks/ioctl", "masks", [("masks",)]),
        Case("masks/bad-range", "masks", [("masks-bad",)]),
    ]
    imp = [("midr-next-revision", midr, (m & ~0xF) | ((m + 1) & 0xF)),
           ("midr-other-part", midr, (m & ~0xFFF0) | (0xD0C << 4 if (m >> 4) & 0xFFF != 0xD0C else 0xD08 << 4)),
           ("midr-high-bits", midr, m | (1 << 32)),
           ("revidr-one", revidr, values.get(revidr, 0) ^ 1),
           ("aidr-one", aidr, values.get(aidr, 0) ^ 1)]
    for label, rid, new in imp:
        steps = [("set", rid, new), ("get", rid)]
        cases.append(Case(f"impid/{label}", "impid", list(steps)))
        cases.append(Case(f"impid-cap239/{label}", "impid", list(steps), cap239_first=True))
        cases.append(Case(f"impid-cap239-after-run/{label}", "impid", list(steps), cap239_first=True,
                          run_first=True))
    cases.append(Case("cap239/after-vcpu", "cap", [("cap239-late",)]))
    cases.append(Case("cap239/check", "cap", [("check", abi.KVM_CAP_ARM_WRITABLE_IMP_ID_REGS)]))
    # EBUSY after the first run: lower ISAR0.AES if it can be lowered, else re-write the same value
    cur = values.get(isar0, 0)
    aes = next(f for f in cat.fields_of("ID_AA64ISAR0_EL1") if f.name == "AES")
    lowered = aes.put(cur, aes.get(cur) - 1) if aes.get(cur) > 0 else cur
    cases.append(Case("after-run/isar0-lowered", "frozen", [("set", isar0, lowered), ("get", isar0)], run_first=True))
    cases.append(Case("after-run/isar0-same", "frozen", [("set", isar0, cur)], run_first=True))
    pfr0, pfr1 = cat.id_of("ID_AA64PFR0_EL1"), cat.id_of("ID_PFR1_EL1")
    cases.append(Case("after-run/gic-fields", "frozen", [("get", pfr0), ("get", pfr1)], run_first=True))
    for rid in sorted(listed):
        g = regid.decode(rid).group
        name = cat.name(rid)
        if g == "fw":
            v = values.get(rid, 0)
            cases.append(Case(f"fw/{name}/same", "fw", [("set", rid, v), ("get", rid)]))
            if "WORKAROUND" in name:
                cases.append(Case(f"fw/{name}/above-host", "fw", [("set", rid, v + 1), ("get", rid)]))
        elif g == "fw-bmap":
            v = values.get(rid, 0)
            cases.append(Case(f"fw/{name}/zero", "fw", [("set", rid, 0), ("get", rid)]))
            cases.append(Case(f"fw/{name}/unsupported-bit", "fw", [("set", rid, v | (1 << 63)), ("get", rid)]))
            cases.append(Case(f"fw/{name}/zero-after-run", "fw", [("set", rid, 0), ("get", rid)], run_first=True))
    clidr = cat.id_of("CLIDR_EL1")
    if clidr in listed:
        v = values.get(clidr, 0)
        cases.append(Case("cache/CLIDR_EL1/res0-bit", "cache", [("set", clidr, v | (1 << 47)), ("get", clidr)]))
        # set_clidr's IDC check (setters.tsv): accepted where the host's CTR_EL0.IDC is 1, refused where it is 0
        f = {x.name: x for x in cat.fields_of("CLIDR_EL1")}
        unified = f["LoUIS"].put(f["LoUU"].put(v, 0), 0)                  # LoUU = LoUIS = 0: implies IDC
        no_loc = f["LoC"].put(v, 0)                                         # LoC = 0: implies IDC
        not_idc = f["LoUIS"].put(f["LoUU"].put(f["LoC"].put(v, max(1, f["LoC"].get(v))), 1), 1)
        for label, nv in (("implies-idc-louu-louis", unified), ("implies-idc-loc", no_loc), ("needs-pou", not_idc)):
            cases.append(Case(f"cache/CLIDR_EL1/{label}", "cache", [("set", clidr, nv), ("get", clidr),
                                                                    ("set", clidr, v)]))
        cases.append(Case("after-run/clidr-changed", "frozen", [("set", clidr, not_idc), ("get", clidr)],
                          run_first=True))
    cases += _ccsidr_cases(doc)
    # WORKAROUND_2 follows the VM's SSBS (6.12+): hide SSBS where the kernel lets it, then read and write WA2
    pfr1, wa2 = cat.id_of("ID_AA64PFR1_EL1"), cat.id_of("KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2")
    ssbs = next(f for f in cat.fields_of("ID_AA64PFR1_EL1") if f.name == "SSBS")
    masks = doc.get("writable_masks") or {}
    pmask = int(masks.get(str(cat.sysreg("ID_AA64PFR1_EL1").mask_index), "0x0"), 16)
    if wa2 in listed and ssbs.get(values.get(pfr1, 0)) and (pmask & ssbs.mask) == ssbs.mask:
        cases.append(Case("fw/WORKAROUND_2/ssbs-hidden", "fw",
                          [("get", wa2), ("set", pfr1, ssbs.put(values[pfr1], 0)), ("get", wa2), ("set", wa2, 3),
                           ("set", wa2, 0), ("get", wa2)]))
    ctr = cat.id_of("CTR_EL0")
    if ctr in listed:
        v = values.get(ctr, 0)
        l1ip = next(f for f in cat.fields_of("CTR_EL0") if f.name == "L1Ip")
        cases.append(Case("cache/CTR_EL0/l1ip-vpipt", "cache", [("set", ctr, l1ip.put(v, 0)), ("get", ctr)]))
    return cases + _init_cases() + _sve_cases(doc) + _field_cases(doc)


def _init_cases() -> list[Case]:
    """KVM_ARM_VCPU_INIT with each feature of vcpu_features.tsv (and the features it requires), and each feature
    that requires another one without it: ENOENT (bit unknown to the kernel), EINVAL (not offered, or missing
    what it needs) or OK."""
    cases = []
    for name in abi.VCPU_FEATURES:
        need = abi.FEATURE_REQUIRES[name]
        cases.append(Case(f"vcpu-init/{name}", "init", [("init",)],
                          features=tuple(dict.fromkeys(("PSCI_0_2", name) + need))))
        if need:
            cases.append(Case(f"vcpu-init/{name}/alone", "init", [("init",)], features=("PSCI_0_2", name)))
    return cases


def _ccsidr_cases(doc: dict) -> list[Case]:
    """set_ccsidr (setters.tsv) on the L1 data and instruction caches' CCSIDR (CSSELR 0 and 1): the UNKNOWN bits
    31:28, a line below CTR_EL0's minimum, a longer line, another geometry; one with the VM's CTR_EL0.DminLine
    lowered first (whose CTR_EL0 the rule reads); an index past CSSELR_MAX (13)."""
    cat = catalog()
    listed = {int(x, 16) for x in doc["reg_list"]}
    values = {int(k, 16): int(v, 16) for k, v in doc["values"].items()}
    f = {x.name: x for x in cat.fields_of("CCSIDR_EL1")}
    ctr_id = cat.id_of("CTR_EL0")
    ctr = values.get(ctr_id, 0)
    cf = {x.name: x for x in cat.fields_of("CTR_EL0")}
    cases = [Case("cache/CCSIDR/past-csselr-max", "cache", [("get", regid.demux_ccsidr(14)),
                                                              ("set", regid.demux_ccsidr(14), 0)])]
    for csselr in (0, 1):
        rid = regid.demux_ccsidr(csselr)
        if rid not in listed:
            continue
        v = values.get(rid, 0)
        least = cf["IminLine" if csselr & 1 else "DminLine"].get(ctr) + 2 - 4      # LineSize of the minimum line
        line = f["LineSize"].get(v)
        sets = {"unknown-bits": f["UNKNOWN"].put(v, 0xF),
                "geometry": f["NumSets"].put(f["Associativity"].put(v, 3), 255),
                "longer-line": f["LineSize"].put(v, min(line + 1, 7))}
        if least > 0:
            sets["below-min"] = f["LineSize"].put(v, least - 1)
        for label, nv in sets.items():
            cases.append(Case(f"cache/CCSIDR[{csselr}]/{label}", "cache",
                              [("set", rid, nv), ("get", rid), ("set", rid, v), ("get", rid)]))
    d0 = regid.demux_ccsidr(0)
    dmin = cf["DminLine"].get(ctr)
    if d0 in listed and ctr_id in listed and dmin > 3:
        lowered = cf["DminLine"].put(ctr, dmin - 1)
        short = f["LineSize"].put(values.get(d0, 0), dmin - 1 + 2 - 4)
        cases.append(Case("cache/CCSIDR[0]/after-ctr-lowered", "cache",
                          [("set", ctr_id, lowered), ("get", ctr_id), ("set", d0, short), ("get", d0)]))
    return cases


def _sve_cases(doc: dict) -> list[Case]:
    """KVM_REG_ARM64_SVE_VLS on an SVE vCPU (set_sve_vls): the host's set, a lower maximum, only 128 bits, a hole,
    one above the host's maximum, none, and a write after KVM_ARM_VCPU_FINALIZE."""
    if not doc["caps"].get("KVM_CAP_ARM_SVE") or "sve_vls" not in doc:
        return []
    vls = int(doc["sve_vls"], 16)
    top = vls.bit_length()
    sets = [("host", vls), ("only-128", 1), ("zero", 0)]
    if vls & (vls - 1):
        sets += [("drop-max", vls & ~(1 << (top - 1))), ("hole", vls & ~1)]
    if top < 512:
        sets.append(("above", vls | (1 << top)))
    sve = ("PSCI_0_2", "SVE")
    cases = [Case(f"sve/vls-{label}", "sve", [("set", regid.SVE_VLS, v), ("get", regid.SVE_VLS)], features=sve)
             for label, v in sets]
    cases.append(Case("sve/vls-after-finalize", "sve", [("finalize",), ("set", regid.SVE_VLS, vls),
                                                        ("get", regid.SVE_VLS)], features=sve))
    cat = catalog()
    pfr0, zfr0 = cat.id_of("ID_AA64PFR0_EL1"), cat.id_of("ID_AA64ZFR0_EL1")
    cases.append(Case("sve/id-view", "sve", [("get", pfr0), ("get", zfr0)], features=sve))
    view = {int(k, 16): int(v, 16) for k, v in (doc.get("sve_values") or {}).items()}
    if pfr0 in view:          # the SVE view is the limit an SVE vCPU's writes are checked against
        cases.append(Case("sve/pfr0-view-same", "sve", [("set", pfr0, view[pfr0]), ("get", pfr0)], features=sve))
    return cases


def _fresh(backend, cap239: bool, features: tuple[str, ...] = ("PSCI_0_2",)):
    vm = backend.create_vm(0)
    if cap239:
        vm.enable_cap(abi.KVM_CAP_ARM_WRITABLE_IMP_ID_REGS)
    vcpu = vm.create_vcpu(0)
    vcpu.init(VcpuInit(vm.preferred_target().target, tuple(abi.VCPU_FEATURES[f] for f in features)))
    return vm, vcpu


def _ok(fn: Callable) -> tuple[str, object]:
    try:
        return "OK", fn()
    except KvmError as e:
        return e.errno_name, None


def run_case(backend, case: Case, caps: dict) -> list[list]:
    cap239 = case.cap239_first
    if cap239 and not caps.get("KVM_CAP_ARM_WRITABLE_IMP_ID_REGS"):
        return [["skip", "no cap 239"]]
    out: list[list] = []
    if case.steps[0][0] == "get-noinit":
        vm = backend.create_vm(0)
        try:
            v = vm.create_vcpu(0)
            out.append(["get", *_ok(lambda: v.get_reg(case.steps[0][1]))])
        finally:
            vm.close()
        return [[a, b, None if c is None else f"{c:#x}"] for a, b, c in out]
    if case.steps[0][0] == "cap239-late":
        vm = backend.create_vm(0)
        try:
            vm.create_vcpu(0)
            out.append(["enable_cap", *_ok(lambda: vm.enable_cap(abi.KVM_CAP_ARM_WRITABLE_IMP_ID_REGS))])
        finally:
            vm.close()
        return [[a, b, None] for a, b, _ in out]
    if case.steps[0][0] == "init":
        vm = backend.create_vm(0)
        try:
            v = vm.create_vcpu(0)
            bits = tuple(abi.VCPU_FEATURES[f] for f in case.features)
            out.append(["init", *_ok(lambda: v.init(VcpuInit(vm.preferred_target().target, bits)))])
        finally:
            vm.close()
        return [[a, b, None] for a, b, _ in out]
    vm, vcpu = _fresh(backend, cap239, case.features)
    try:
        if case.run_first:
            out.append(["run", *_ok(vcpu.run_once)])
            out[-1][2] = None
        for step in case.steps:
            op = step[0]
            if op == "set":
                st, _ = _ok(lambda: vcpu.set_reg(step[1], step[2]))
                out.append(["set", st, f"{step[2]:#x}"])
            elif op == "get":
                st, v = _ok(lambda: vcpu.get_reg(step[1]))
                out.append(["get", st, None if v is None else f"{v:#x}"])
            elif op == "reglist":
                st, v = _ok(vcpu.reg_list)
                out.append(["reglist", st, None if v is None else len(v)])
            elif op == "reglist-raw":       # one KVM_GET_REG_LIST with room for 0, count-1 or count ids
                count = len(_ok(vcpu.reg_list)[1] or [])
                cap = {"zero": 0, "short": max(count - 1, 0), "exact": count}[step[1]]
                try:
                    got = vcpu.get_reg_list(cap)
                    out.append(["reglist-raw", "OK", len(got)])
                except KvmError as e:
                    out.append(["reglist-raw", e.errno_name, e.required])
            elif op == "masks":
                st, v = _ok(vm.writable_masks)
                out.append(["masks", st, None if v is None else {str(i): f"{m:#x}" for i, m in enumerate(v) if m}])
            elif op == "masks-bad":
                st, _ = _ok(lambda: _masks_bad_range(vm))
                out.append(["masks-bad-range", st, None])
            elif op == "finalize":
                st, _ = _ok(lambda: vcpu.finalize(abi.KVM_ARM_VCPU_SVE))
                out.append(["finalize", st, None])
            elif op == "check":
                out.append(["check_extension", "OK", vm.check_extension(step[1])])
    finally:
        vm.close()
    return out


def _masks_bad_range(vm) -> None:
    """KVM_ARM_GET_REG_WRITABLE_MASKS with range=1 (only range 0 exists): EINVAL on every kernel."""
    vm.writable_masks(1)


def run_suite(backend, progress: Callable[[int, int], None] | None = None) -> dict:
    doc = probe(backend)
    cases = generate(doc)
    results = {}
    for i, c in enumerate(cases):
        results[c.name] = run_case(backend, c, doc["caps"])
        if progress:
            progress(i + 1, len(cases))
    return {"format": FORMAT, "kernel_release": doc["kernel_release"], "kernel_version": doc["kernel_version"],
            "cpu_midrs": doc.get("cpu_midrs"), "source": doc["source"], "cases": results,
            "meta": {c.name: c.meta for c in cases if c.meta}}


def compare(real: dict, sim: dict) -> list[str]:
    """Readable differences, case by case: register, field, value, real vs simulated."""
    diffs = []
    meta = {**sim.get("meta", {}), **real.get("meta", {})}
    for name in sorted(set(real["cases"]) | set(sim["cases"])):
        a, b = real["cases"].get(name), sim["cases"].get(name)
        if a == b:
            continue
        m = meta.get(name, {})
        where = f" [{m['register']}.{m['field']} {m['from']:#x}->{m['to']:#x} {m['type']}]" if m else ""
        diffs.append(f"{name}{where}: real={json.dumps(a)} simulated={json.dumps(b)}")
    return diffs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m invariantd.daemon.conformance",
                                 description="Run the ONE_REG conformance suite on this host's /dev/kvm or a simulated host.")
    ap.add_argument("--sim", metavar="PROFILE@KERNEL", help="run on the simulated host instead of /dev/kvm")
    ap.add_argument("--json", action="store_true", help="print the results document as JSON")
    args = ap.parse_args(argv)
    if args.sim:
        from .sim import SimHost
        backend = SimHost(args.sim)
    else:
        from .kvm.real import RealKvm
        backend = RealKvm()
    res = run_suite(backend)
    if args.json:
        json.dump(res, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        for name, steps in res["cases"].items():
            print(name, steps)
        print(f"{len(res['cases'])} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
