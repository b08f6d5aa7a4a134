"""The real-kernel matrix: profiles for the simulator and the conformance comparison.

One boot per (kernel, CPU model) runs, in the guest, `invariantctl probe --json` (the capability document
that becomes the simulator's host profile) and the conformance suite; the host then runs the same suite on
the simulated host built from the profile and compares case by case.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..conformance import compare, run_suite
from ..sim.host import SimHost, era_for
from ...protocol.catalog import catalog
from . import LabError, run_in_guest, run_many_in_guest

# profile name -> QEMU -cpu model (one row per CPU model; the profile file is NAME@<kernel major.minor>.json)
MODELS = {
    "cortex-a72-r0p3": "cortex-a72,midr=0x410fd083",
    "cortex-a72-r0p4": "cortex-a72,midr=0x410fd084",
    "cortex-a72-r1p0": "cortex-a72,midr=0x411fd080",
    "neoverse-n1": "neoverse-n1",
    "max": "max,pauth-impdef=on",
    "a64fx": "a64fx",
    "cortex-a76": "cortex-a76",
    "cortex-a53": "cortex-a53",
}
KERNELS = ("6.1", "6.12", "7.x")
# registers whose value changes between two reads (counters): not part of a profile comparison
VOLATILE = {"0x603000000013df1a", "0x603000000013df01"}

PROBE = ["-m", "invariantd.client.cli", "probe", "--json"]
SUITE = ["-m", "invariantd.daemon.conformance", "--json"]


def profiles_dir() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "protocol" / "data" / "profiles"


def _failed(r, what: str) -> str:
    return f"{what} failed in the guest (rc={r.returncode}): {r.stderr.strip()[-800:]} [log {r.log_path}]"


@dataclass
class CellResult:
    kernel: str
    model: str
    profile: dict | None = None
    real: dict | None = None
    cases: int = 0
    diffs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0
    kernel_release: str = ""


def as_profile(doc: dict, name: str) -> dict:
    """A probe document as a simulator profile: named, and counters (VOLATILE) zeroed so two runs of the
    profile command on the same kernel write the same file."""
    doc = dict(doc)
    doc["values"] = {k: ("0x0" if k in VOLATILE else v) for k, v in doc["values"].items()}
    doc["profile"] = f"{name}@{doc['kernel_version']}"
    doc["source"] = "kvm"
    return doc


def run_cell(kernel: str, model: str, suite: bool = True) -> CellResult:
    t = time.monotonic()
    cell = CellResult(kernel, model)
    results = run_many_in_guest(kernel, MODELS[model], [PROBE] + ([SUITE] if suite else []))
    cell.kernel_release = results[0].kernel_release
    if results[0].returncode != 0:
        cell.errors.append(_failed(results[0], "probe"))
        return cell
    cell.profile = as_profile(json.loads(results[0].stdout), model)
    if suite:
        if results[1].returncode != 0:
            cell.errors.append(_failed(results[1], "conformance suite"))
        else:
            real = cell.real = json.loads(results[1].stdout)
            sim = run_suite(SimHost(doc=cell.profile, era=era_for(cell.profile["kernel_version"])))
            cell.cases = len(real["cases"])
            cell.diffs = compare(real, sim)
    cell.wall = time.monotonic() - t
    return cell


def write_profile(profile: dict, directory: Path | None = None) -> Path:
    d = directory or profiles_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{profile['profile']}.json"
    path.write_text(json.dumps(profile, indent=1, sort_keys=True) + "\n")
    return path


def comparable(doc: dict) -> dict:
    """The parts of a profile that must not change between two probes of the same kernel and CPU."""
    d = {k: v for k, v in doc.items() if k not in ("kernel_release", "errors", "registers")}
    d["values"] = {k: v for k, v in doc["values"].items() if k not in VOLATILE}
    return d


CAPTURE = ["-m", "invariantd.daemon.vmstate", "capture", "--vcpus", "2"]
RESTORE = ["-m", "invariantd.daemon.vmstate", "restore", "/opt/ivd/job/in.state.json", "--json"]


def hide_aarch32(state: dict) -> None:
    """Edit a captured VM state into one whose guest sees no AArch32 (ID_AA64PFR0_EL1.EL0 = 1, the AArch32 ID
    registers 0): what a VM from a host without AArch32 (a64fx, Neoverse-N2) carries."""
    cat = catalog()
    pfr0 = cat.id_of("ID_AA64PFR0_EL1")
    el0 = next(f for f in cat.fields_of("ID_AA64PFR0_EL1") if f.name == "EL0")
    aa32 = {r.reg_id for r in cat.sysregs.values() if r.visibility == "aa32"}
    for regs in state["regsets"].values():
        for pair in regs:
            r = int(pair[0], 16)
            if r == pfr0:
                pair[1] = f"{el0.put(int(pair[1], 16), 1):#x}"
            elif r in aa32:
                pair[1] = "0x0"


def cross_restore(src: tuple[str, str], dst: tuple[str, str],
                  edit: Callable[[dict], None] | None = None, sve: bool = False) -> tuple[int, dict]:
    """Capture a 2-vCPU VM (run once) on real kernel+CPU `src`, restore it on real kernel+CPU `dst`:
    plan against the destination kernel's own capabilities, apply with the retry, read back.
    edit(state): change the captured state before the restore (e.g. hide_aarch32). sve: vCPUs with SVE, Z/P/FFR
    holding pseudo-random data. Returns (the restore's exit code, its report)."""
    cap = run_in_guest(src[0], MODELS[src[1]], CAPTURE + (["--sve"] if sve else []))
    if cap.returncode != 0:
        raise LabError(_failed(cap, f"capture on {src}"))
    data = cap.stdout.encode()
    if edit is not None:
        state = json.loads(cap.stdout)
        edit(state)
        data = json.dumps(state).encode()
    res = run_many_in_guest(dst[0], MODELS[dst[1]], [RESTORE], files={"state.json": data})[0]
    if res.returncode not in (0, 3, 5):
        raise LabError(_failed(res, f"restore on {dst}"))
    report = json.loads(res.stdout)
    report["source"]["kernel_release"], report["destination"]["kernel_release"] = \
        cap.kernel_release, res.kernel_release
    return res.returncode, report
