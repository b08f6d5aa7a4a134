"""Migration over the network between two real arm64 kernels, with the real daemons.

Two lab guests run concurrently, joined by a QEMU socket link on host loopback (README §8; the guests'
10.0.0.x addresses exist only on that link): guest A = destination (Linux 7.x, cortex-a72 r0p4), guest B =
source (Linux 6.12, cortex-a72 r0p3). Each runs `invariantd` on its own real /dev/kvm with mutual-TLS
certificates made on the host (daemon/pki.make_pki). B creates a 2-vCPU VM through its orchestrator RPC and
migrates it to A; A waits until it holds the VM running (daemon/lab/netmig.py).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from invariantd.daemon.pki import make_pki
from invariantd.daemon import lab
from invariantd.daemon.lab import run_many_in_guest

pytestmark = pytest.mark.lab

DEST = ("7.x", "cortex-a72,midr=0x410fd084", "10.0.0.1/24", "52:54:00:12:34:01", "node-a")
SOURCE = ("6.12", "cortex-a72,midr=0x410fd083", "10.0.0.2/24", "52:54:00:12:34:02", "node-b")
VM = "netmig-vm"
GUEST_TIMEOUT = 150          # each QEMU is killed after this (run_many_in_guest's `timeout`)
READY_TIMEOUT = 60           # the listener guest's READY marker


@pytest.fixture(scope="module")
def provisioned():
    try:
        return lab.provision(["6.12", "7.x"])
    except lab.LabUnavailable as e:
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"arm64 KVM lab unavailable under CI: {e}")
        pytest.skip(f"arm64 KVM lab unavailable: {e}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summary(res, who: str) -> dict:
    try:
        return json.loads(res.stdout)
    except ValueError:
        pytest.fail(f"{who}: no JSON summary (rc={res.returncode}); stderr:\n{res.stderr[-3000:]}\nlog {res.log_path}")


def _pair(tmp_path, dest, source, features=()):
    """Destination and source guests on one socket link; -> (dest summary, source summary, results, seconds)."""
    pki = make_pki(tmp_path, nodes=(dest[4], source[4], "operator"))
    common = {"ca.pem": open(pki["ca"], "rb").read(), "operator.pem": open(pki["operator"], "rb").read()}
    port = _free_port()
    env = {"IVD_HOST_EPOCH": f"{time.time():.0f}"}
    results: dict = {}
    procs: list = []
    ready = threading.Event()

    def guest(role, spec, argv, mode, on_line=None):
        kernel, cpu, ip, mac, node = spec
        try:
            results[role] = run_many_in_guest(
                kernel, cpu, [["-m", "invariantd.daemon.lab.netmig", *argv]], timeout=GUEST_TIMEOUT, env=env,
                files={**common, f"{node}.pem": open(pki[node], "rb").read()},
                net=(mode, port, ip, mac), on_line=on_line, on_start=procs.append)[0]
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            results[role] = e
        finally:
            ready.set()

    def on_line_a(line: str) -> None:
        if "@@IVD READY" in line:
            ready.set()

    t_start = time.monotonic()
    threads = []
    try:
        ta = threading.Thread(target=guest, daemon=True, name="guest-dest", args=(
            "dest", dest, ["dest", "--node", dest[4], "--wait-vm", VM, "--timeout", "110"], "listen", on_line_a))
        ta.start()
        threads.append(ta)
        # the connecting QEMU must start after the listening one is up (README §8): wait for A's READY marker
        assert ready.wait(READY_TIMEOUT), f"destination guest not ready within {READY_TIMEOUT}s"
        assert not isinstance(results.get("dest"), BaseException), f"destination guest failed: {results['dest']}"
        tb = threading.Thread(target=guest, daemon=True, name="guest-source", args=(
            "source", source, ["source", "--node", source[4], "--peer", f"{dest[4]}={dest[2].split('/')[0]}",
                               "--vm", VM, "--vcpus", "2", "--peer-wait", "80", "--timeout", "60",
                               *[x for f in features for x in ("--feature", f)]], "connect"))
        tb.start()
        threads.append(tb)
        for t in threads:
            t.join(max(1.0, GUEST_TIMEOUT + 30 - (time.monotonic() - t_start)))
    finally:
        for p in procs:             # whatever happened: no QEMU outlives the test
            if p.poll() is None:
                p.terminate()
        for t in threads:
            t.join(30)
    total = time.monotonic() - t_start
    for role in ("dest", "source"):
        r = results.get(role)
        assert r is not None, f"{role} guest still running after its timeout"
        if isinstance(r, BaseException):
            raise AssertionError(f"{role} guest failed: {r}") from r

    a, b = _summary(results["dest"], "destination"), _summary(results["source"], "source")
    return a, b, results, total


def test_migration_over_the_network_between_real_kernels(provisioned, tmp_path):
    a, b, results, total = _pair(tmp_path, DEST, SOURCE)
    print(f"\nnetwork migration 6.12/r0p3 -> 7.x/r0p4: {b.get('migration', {}).get('state')} in "
          f"{b.get('migration_wall_s')} s wall (elapsed_ms {b.get('migration', {}).get('elapsed_ms')}), "
          f"plan tries {b.get('plan_tries')}, whole test {total:.1f} s "
          f"(boots: dest {results['dest'].boot_seconds:.1f} s, source {results['source'].boot_seconds:.1f} s)")
    assert results["source"].returncode == 0, json.dumps(b, indent=1)[-3000:] + results["source"].stderr[-2000:]
    assert results["dest"].returncode == 0, json.dumps(a, indent=1)[-3000:] + results["dest"].stderr[-2000:]
    assert a["kernel"].startswith("7.") and b["kernel"].startswith("6.12."), (a["kernel"], b["kernel"])

    mig = b["migration"]
    assert mig["state"] == "committed" and mig["result"] == "committed", mig
    assert mig["vcpus_done"] == mig["vcpus_total"] == 2
    assert mig["plan_digest"] == b["plan"]["digest"]

    plan = b["plan"]
    assert plan["migratable"] and plan["enable_cap239"], plan
    ch = {(e["register"], e["field"]): e for e in plan["changed"]}
    midr = ch[("MIDR_EL1", "")]
    assert midr["verdict"] == "pin" and "cap 239" in midr["reason"], midr
    assert int(midr["planned"], 16) == 0x410fd083 and int(midr["destination"], 16) == 0x410fd084, midr
    assert {ch[(r, "")]["verdict"] for r in ("TCR2_EL1", "PIR_EL1", "PIRE0_EL1")} == {"drop"}, plan["changed"]
    assert a["caps"]["writable_imp_id_regs"], a["caps"]

    assert a["vm"]["name"] == VM and a["vm"]["state"] == "running" and a["vm"]["vcpus"] == 2, a["vm"]
    assert a["vm"]["origin"] == "incoming", a["vm"]
    assert b["source_vm"]["state"] == "released", b["source_vm"]


def test_sve_vm_over_the_network_between_real_kernels(provisioned, tmp_path):
    """An SVE VM (a64fx: 128/256/512-bit vectors) created over the source daemon's RPC, migrated 6.12 -> 7.3 by the
    real daemons: the vector lengths are identical, ID_AA64PFR0_EL1 is planned against the destination's SVE view,
    and the VM runs on the destination."""
    dest = ("7.x", "a64fx", "10.0.0.1/24", "52:54:00:12:34:01", "node-a")
    source = ("6.12", "a64fx", "10.0.0.2/24", "52:54:00:12:34:02", "node-b")
    a, b, results, _ = _pair(tmp_path, dest, source, features=("PSCI_0_2", "SVE"))
    assert results["source"].returncode == 0, json.dumps(b, indent=1)[-3000:] + results["source"].stderr[-2000:]
    assert results["dest"].returncode == 0, json.dumps(a, indent=1)[-3000:] + results["dest"].stderr[-2000:]
    assert b["vm_created"]["features"] == ["PSCI_0_2", "SVE"], b["vm_created"]
    mig = b["migration"]
    assert mig["state"] == "committed" and mig["vcpus_done"] == 2, mig
    ch = {(e["register"], e["field"]): e["verdict"] for e in b["plan"]["changed"]}
    assert ("KVM_REG_ARM64_SVE_VLS", "") not in ch and ch.get(("ID_AA64PFR0_EL1", "")) != "refuse", ch
    assert a["vm"]["state"] == "running" and a["vm"]["vcpus"] == 2, a["vm"]
