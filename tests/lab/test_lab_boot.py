"""arm64 KVM lab: boot a real Debian arm64 kernel under qemu-system-aarch64 and run Python in it.

Provisions itself (cached in $INVARIANTD_LAB_CACHE, default ~/.cache/invariantd-lab). Skips when
the lab cannot be provisioned on this machine, except under CI (CI=true), where that fails.
"""
from __future__ import annotations

import os

import pytest

from invariantd.daemon import lab

pytestmark = pytest.mark.lab

KERNEL = "6.12"
CPU = "cortex-a72"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def provisioned():
    try:
        return lab.provision([KERNEL])
    except lab.LabUnavailable as e:
        if _in_ci():
            pytest.fail(f"arm64 KVM lab unavailable under CI: {e}")
        pytest.skip(f"arm64 KVM lab unavailable: {e}")


def test_guest_python_sees_dev_kvm(provisioned):
    assert provisioned[KERNEL]["version"].startswith("6.12.")
    r = lab.run_in_guest(KERNEL, CPU, ["-c", "import os,platform; print(platform.machine(), os.path.exists('/dev/kvm'))"],
                         timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "aarch64 True\n"
    assert r.kernel_release == provisioned[KERNEL]["release"]
    assert r.log_path.exists()
    assert r.wall_seconds > 0


def test_exit_code_output_and_project_import(provisioned, tmp_path):
    # one boot, several programs: return codes, exact stdout (incl. \r), stderr, project imports
    rs = lab.run_many_in_guest(KERNEL, CPU, [
        ["-c", "import sys; print('before exit'); sys.exit(3)"],
        ["-c", "import sys; sys.stdout.write('a\\r\\nb'); sys.stderr.write('to stderr')"],
        ["-c", "import os, invariantd.daemon as d; print(d.__name__, os.path.isdir(os.path.dirname(d.__file__)))"],
    ], timeout=300)
    assert [r.returncode for r in rs] == [3, 0, 0], [r.stderr for r in rs]
    assert rs[0].stdout == "before exit\n"
    assert rs[1].stdout == "a\r\nb"
    assert rs[1].stderr == "to stderr"
    assert rs[2].stdout == "invariantd.daemon True\n"
    assert len({r.log_path for r in rs}) == 1


def test_batch_lib_cross_compiled_and_loadable(provisioned, tmp_path):
    # a stand-in for daemon/kvm/batch.c, so the test does not depend on its contents
    src = tmp_path / "batch.c"
    src.write_text("#include <stdint.h>\nint ivd_abi_version(void) { return 42; }\n")
    code = ("import os, ctypes; p = os.environ['INVARIANTD_BATCH_LIB']; "
            "print(p, ctypes.CDLL(p).ivd_abi_version())")
    r = lab.run_in_guest(KERNEL, CPU, ["-c", code], batch_source=src, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [lab.guest_info()["batch_lib"], "42"]


def test_guest_failure_is_reported_with_log_tail(provisioned):
    with pytest.raises(lab.LabError, match="last 40 lines"):
        lab.run_in_guest(KERNEL, "no-such-cpu-model", ["-c", "pass"], timeout=60)


def test_guest_has_the_projects_dependencies(provisioned):
    """The guest userland carries the project's runtime dependencies (aarch64 wheels), so the daemon imports there."""
    code = ("import trio, capnp, prometheus_client, cryptography, cffi, platform; "
            "import invariantd.daemon.server, invariantd.daemon.rpc, invariantd.protocol.negotiate; "
            "print(platform.machine(), cffi.__version__ >= '1.16', 'ok')")
    r = lab.run_in_guest(KERNEL, CPU, ["-c", code], timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["aarch64", "True", "ok"]
