"""Kernel truth: the conformance suite on real arm64 KVM kernels vs the simulated host, case by case.

For every kernel (newest 6.1, 6.12, 7.x) x CPU model: one boot runs `invariantctl probe --json` and the
conformance suite in the guest; the host runs the same suite on the simulator built from that probe and
requires identical results (errno and read-back value per step). The probe must also equal the shipped
host profile (protocol/data/profiles), so the simulator's data is what the kernel says today.
Skips when the lab cannot be provisioned (no Debian archive), except under CI where that fails.
"""
from __future__ import annotations

import json
import os

import pytest

from invariantd.daemon import lab
from invariantd.daemon.lab import matrix

pytestmark = pytest.mark.lab
SUMMARY: list[str] = []


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def provisioned():
    try:
        return lab.provision(list(matrix.KERNELS))
    except lab.LabUnavailable as e:
        if _in_ci():
            pytest.fail(f"arm64 KVM lab unavailable under CI: {e}")
        pytest.skip(f"arm64 KVM lab unavailable: {e}")


CELLS = [(k, m) for k in matrix.KERNELS for m in matrix.MODELS]


@pytest.mark.parametrize("kernel,model", CELLS)
def test_real_kernel_matches_simulator(provisioned, kernel, model, capsys):
    cell = matrix.run_cell(kernel, model)
    assert not cell.errors, cell.errors
    line = (f"conformance {kernel} ({cell.kernel_release}) x {model}: {cell.cases} cases, "
            f"{len(cell.diffs)} differences, {cell.wall:.1f}s")
    SUMMARY.append(line)
    with capsys.disabled():
        print("\n" + line, flush=True)
    assert cell.cases > 150
    assert not cell.diffs, "real kernel and simulator differ:\n" + "\n".join(cell.diffs)
    shipped = matrix.profiles_dir() / f"{cell.profile['profile']}.json"
    assert shipped.exists(), f"no shipped profile {shipped.name}: run `invariantctl lab profile`"
    want = matrix.comparable(json.loads(shipped.read_text()))
    got = matrix.comparable(cell.profile)
    changed = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    assert not changed, f"{shipped.name} differs from what the kernel reports today in {changed}: " \
                        f"regenerate with `invariantctl lab profile --kernel {kernel} --model {model}`"


@pytest.fixture(scope="module")
def cell_73(provisioned):
    cell = matrix.run_cell("7.x", "cortex-a72-r0p3")
    assert not cell.errors and not cell.diffs, cell.errors or cell.diffs
    return cell


def _diffs_with(cell, **kw):
    import dataclasses
    from invariantd.daemon.conformance import compare, run_suite
    from invariantd.daemon.sim.host import SimHost, era_for
    era = dataclasses.replace(era_for(cell.profile["kernel_version"]), **kw.pop("era", {}))
    return compare(cell.real, run_suite(SimHost(doc=cell.profile, era=era, **kw)))


def test_a_lower_safe_field_treated_as_higher_safe_is_caught(cell_73):
    import dataclasses
    from invariantd.protocol.catalog import Catalog, Safety
    rules = Catalog()
    rules.fields["ID_AA64ISAR0_EL1"] = tuple(
        dataclasses.replace(f, kvm_safety=Safety.HIGHER) if f.name == "AES" else f
        for f in rules.fields["ID_AA64ISAR0_EL1"])
    diffs = _diffs_with(cell_73, rules=rules)
    assert any(d.startswith("field/ID_AA64ISAR0_EL1.AES/lower") for d in diffs), diffs
    assert any(d.startswith("field/ID_AA64ISAR0_EL1.AES/raise") for d in diffs), diffs


def test_cap239_allowed_after_the_first_vcpu_is_caught(cell_73):
    diffs = _diffs_with(cell_73, era={"cap239_before_vcpu": False})
    assert [d.split(":")[0] for d in diffs] == ["cap239/after-vcpu"], diffs


def test_frozen_errno_einval_instead_of_ebusy_is_caught(cell_73):
    import errno
    diffs = _diffs_with(cell_73, era={"frozen_errno": errno.EINVAL})
    assert any(d.startswith("after-run/isar0-lowered") for d in diffs), diffs


def _shape(doc):
    return {k: (sorted(v[0]) if k == "registers" else type(v).__name__) for k, v in doc.items()
            if k not in ("profile", "sim_era")} | {"keys": sorted(doc)}


def test_probe_in_guest_has_the_same_shape_as_sim(cell_73):
    from invariantd.daemon.probe import probe
    from invariantd.daemon.sim.host import SimHost
    sim = probe(SimHost("cortex-a72-r0p3@7.3"), profile="cortex-a72-r0p3@7.3")
    assert _shape(cell_73.profile) == _shape(sim)
