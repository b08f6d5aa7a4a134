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
