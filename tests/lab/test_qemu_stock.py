"""Debian's arm64 QEMU with -accel kvm inside the lab guests, and what stock QEMU migration does between two real
kernels on two CPU revisions (daemon/lab/qemu.py host side, daemon/lab/vmm.py guest side).

The nested VM runs the bare-metal payload (daemon/lab/payload/payload.S), which prints its counter and the ID
registers it reads; every assertion about the VM comes from those lines. The pair is the netmig topology: the
destination guest (Linux 7.x, cortex-a72 r0p4, 10.0.0.1) and the source guest (Linux 6.12, r0p3, 10.0.0.2) on a QEMU
socket link on host loopback; both nested QEMUs run with the return-path capability.
"""
from __future__ import annotations

import json
import subprocess

import pytest

from invariantd.daemon.lab import qemu

pytestmark = pytest.mark.lab

MIDR_R0P3, MIDR_R0P4 = 0x410fd083, 0x410fd084
MIDR_REG = "op0:3 op1:0 crn:0 crm:0 op2:0"        # how QEMU names MIDR_EL1 in its cpreg errors


def _show(doc: dict) -> str:
    return json.dumps(doc, indent=1)[-4000:]


def _n(line: dict) -> int:
    return int(line["n"], 16)


def test_qemu11_kvm_runs_the_payload_in_a_7x_guest(q11):
    """QEMU 11.1 -accel kvm in a 7.x guest on a Cortex-A72 r0p4: the payload counts and reads the guest's MIDR; the
    same boot imports the daemon with the trixie tree's Python and cp313 wheels (the daemon can run next to QEMU)."""
    assert q11["qemu"].startswith("1:11."), q11          # trixie-backports: 11.1.3 when written
    daemon_check = ["-c", "import sys, capnp, trio, cryptography, qemu.qmp, invariantd.daemon.server, "
                          "invariantd.daemon.kvm.real; print(sys.version_info[:2] == (3, 13), 'ok')"]
    r, imp = qemu.run_guest(qemu.DEST.kernel, qemu.DEST.cpu,
                            [qemu.vmm_argv("single", lines=3, timeout=120), daemon_check], variant="q11")
    s = qemu.summary(r, "single")
    print(f"\nQEMU 11.1 single on {s['kernel']}: boot {r.boot_seconds:.1f} s, runner {r.run_seconds:.1f} s, "
          f"first payload line {s.get('first_line_after_s')} s after QEMU start; daemon import {imp.run_seconds:.1f} s")
    assert r.returncode == 0, _show(s) + r.stderr[-2000:]
    assert s["kernel"].startswith("7."), s["kernel"]
    assert s["query_kvm"]["return"] == {"enabled": True, "present": True}, s["query_kvm"]
    v = s["query_version"]["return"]["qemu"]
    assert v["major"] == 11 and v["minor"] >= 1, v
    lines = s["lines"]
    assert len(lines) >= 3, _show(s)
    assert {int(p["midr"], 16) for p in lines} == {MIDR_R0P4}, lines
    assert all(_n(b) > _n(a) for a, b in zip(lines, lines[1:])), lines
    assert imp.returncode == 0 and imp.stdout.split() == ["True", "ok"], imp.stderr[-3000:]


PRELOAD_C = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void hello(void) { fprintf(stderr, "ivd-preload: in pid %d\n", getpid()); }
"""


def test_the_runner_gives_qemu_extra_environment_and_arguments(q11, tmp_path):
    """What the LD_PRELOAD agent will need: a .so passed as a job input, preloaded into the nested QEMU
    (qemu_env), and extra QEMU arguments (qemu_args); the payload still runs."""
    (tmp_path / "hello.c").write_text(PRELOAD_C)
    so = tmp_path / "hello.so"
    subprocess.run(["aarch64-linux-gnu-gcc", "-O2", "-shared", "-fPIC", "-o", so, tmp_path / "hello.c"], check=True)
    r = qemu.run_single(variant="q11", lines=2, files={"hello.so": so.read_bytes()},
                        qemu_env={"LD_PRELOAD": "/opt/ivd/job/in.hello.so"}, qemu_args=["-name", "ivd-lab"])
    s = r.summary
    assert r.result.returncode == 0, _show(s) + r.result.stderr[-2000:]
    assert s["qemu"]["env"] == {"LD_PRELOAD": "/opt/ivd/job/in.hello.so"}, s["qemu"]
    assert any(ln.startswith("ivd-preload: in pid ") for ln in s["qemu"]["stderr_tail"]), s["qemu"]["stderr_tail"]
    assert s["query_name"]["return"] == {"name": "ivd-lab"}, s["query_name"]
    assert len(s["lines"]) >= 2 and int(s["lines"][0]["midr"], 16) == MIDR_R0P4, s["lines"]


def _check_stock_failure(m: qemu.MigrationRun, qemu_minor: tuple, dest_says: list[str]) -> None:
    d, s = m.dest, m.source
    print(f"\nstock QEMU {qemu_minor} 6.12/r0p3 -> 7.x/r0p4: source {s.get('query_migrate', {}).get('status')} "
          f"({s.get('query_migrate', {}).get('error-desc')}), status after {s.get('status_after')}, "
          f"dest rc {d['qemu']['rc']}; pair {m.pair.seconds:.1f} s; dest stderr:\n  "
          + "\n  ".join(d["qemu"]["stderr_tail"][-8:]))
    assert "error" not in s and "error" not in d, _show(s) + _show(d)
    assert s["kernel"].startswith("6.12.") and d["kernel"].startswith("7."), (s["kernel"], d["kernel"])
    assert s["caps"] == d["caps"] == ["return-path"]
    # the source ran r0p3 before the attempt
    before = s["lines_before"]
    assert before and {int(p["midr"], 16) for p in before} == {MIDR_R0P3}, before
    # the destination refused the state and exited; the VM never ran there
    assert d["arrived"] is False and d["lines"] == [], _show(d)
    assert d["qemu"]["exited_by_itself"] and d["qemu"]["rc"] != 0, _show(d)
    err = "\n".join(d["qemu"]["stderr_tail"])
    for text in dest_says:
        assert text in err, f"{text!r} not in the destination's stderr:\n{err}"
    # with return-path the source learns it and resumes: the payload counts on past its pre-migration value
    assert s["query_migrate"]["status"] == "failed", s["query_migrate"]
    assert s["resumed"], _show(s)
    after = s["lines_after"]
    last = int(s["last_n_before_decision"], 16)
    assert after and _n(after[-1]) > last and _n(after[0]) > _n(before[-1]), (before[-1:], after)
    assert {int(p["midr"], 16) for p in after} == {MIDR_R0P3}, after
    assert s["status_after"] == "running", s["status_after"]
    assert s["qemu"]["rc"] == 0, s["qemu"]


def test_stock_qemu11_migration_fails_on_midr_and_the_source_keeps_running(q11):
    """QEMU 11.1 tolerates the register-list drift (TCR2/PIR/PIRE0 only on 6.12) but KVM refuses the source's MIDR
    on the destination; with return-path the source reports failed and its VM runs on."""
    m = qemu.migrate_stock(variant="q11")
    _check_stock_failure(m, (11, 1), [MIDR_REG, "410fd083", "410fd084"])


def test_stock_qemu10_migration_fails_on_the_cpreg_list_and_the_source_keeps_running(q10):
    """QEMU 10.0 has no drift tolerance: the destination refuses the longer cpreg list (258 > 257) before any
    register is written; the source, with return-path, runs on."""
    m = qemu.migrate_stock(variant="q10")
    _check_stock_failure(m, (10, 0), ["cpreg_vmstate_array_len"])
    assert MIDR_REG not in "\n".join(m.dest["qemu"]["stderr_tail"])
