"""deploy/: the example config is valid for the daemon; the unit file has the settings the daemon relies on."""
import configparser
from pathlib import Path

from invariantd.daemon.config import parse

DEPLOY = Path(__file__).parent.parent / "deploy" / "systemd"


def test_example_config_parses():
    cfg = parse((DEPLOY / "invariantd.toml.example").read_text(), "invariantd.toml.example")
    assert cfg.rpc.enabled and cfg.peers and cfg.peers[0].name == "host-b"


def test_unit_is_notify_with_watchdog_and_only_dev_kvm():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string((DEPLOY / "invariantd.service").read_text())
    svc = unit["Service"]
    assert svc["Type"] == "notify" and svc["WatchdogSec"]
    assert svc["DevicePolicy"] == "closed" and svc["DeviceAllow"] == "/dev/kvm rw"
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"


def test_guest_packages_follow_pyproject():
    """The lab installs into its arm64 guests exactly the runtime dependencies pyproject.toml declares (read
    from the source tree, so a dependency added since the editable install still reaches the guests)."""
    import tomllib
    from invariantd.daemon.lab.provision import runtime_requirements
    declared = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    assert runtime_requirements() == sorted(declared) and any(r.startswith("xxhash") for r in declared)


def test_systemd_analyze_verify_passes_on_the_shipped_unit(tmp_path):
    """systemd's own check of the unit as shipped (the ExecStart binary must exist: /usr/bin/env finds invariantd
    on PATH)."""
    import shutil
    import subprocess

    import pytest
    if not shutil.which("systemd-analyze"):
        pytest.skip("no systemd-analyze")
    unit = tmp_path / "invariantd.service"
    unit.write_text((DEPLOY / "invariantd.service").read_text())
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "invariantd.service" not in r.stdout + r.stderr, r.stdout + r.stderr
