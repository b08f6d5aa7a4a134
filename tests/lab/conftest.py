"""Fixtures shared by the lab's QEMU tests: a provisioned QEMU userland (kernels 6.12 and 7.x), skipped without
Debian's archive, failed under CI."""
from __future__ import annotations

import os

import pytest

from invariantd.daemon import lab
from invariantd.daemon.lab import qemu


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _provision(variant: str) -> dict:
    try:
        return qemu.provision_qemu(variant, ("6.12", "7.x"))
    except lab.LabUnavailable as e:
        if in_ci():
            pytest.fail(f"arm64 KVM lab unavailable under CI: {e}")
        pytest.skip(f"arm64 KVM lab unavailable: {e}")


@pytest.fixture(scope="module")
def q11():
    return _provision("q11")


@pytest.fixture(scope="module")
def q10():
    return _provision("q10")
