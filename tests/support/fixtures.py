"""Synthetic capability documents for unit tests (the shipped profiles come from real kernels).

Values are those real kernels reported for QEMU's cortex-a72 (see protocol/data/profiles); the register
list is a plausible subset. Tests that need the exact real list use the shipped profiles instead.
"""
from __future__ import annotations

import json
import socket
import threading
import time

from invariantd.protocol import regid
from invariantd.protocol.catalog import catalog, _core_names

A72 = {
    "MIDR_EL1": 0x410FD083, "MPIDR_EL1": 0x80000000, "REVIDR_EL1": 0, "AIDR_EL1": 0,
    "CTR_EL0": 0x8444C004, "CLIDR_EL1": 0x09200003, "ID_AA64PFR0_EL1": 0x1000000001000222,
    "ID_AA64PFR1_EL1": 0, "ID_AA64ZFR0_EL1": 0, "ID_AA64DFR0_EL1": 0x10305006,
    "ID_AA64ISAR0_EL1": 0x11120, "ID_AA64ISAR1_EL1": 0, "ID_AA64ISAR2_EL1": 0,
    "ID_AA64MMFR0_EL1": 0x1124, "ID_AA64MMFR1_EL1": 0, "ID_AA64MMFR2_EL1": 0,
    "SCTLR_EL1": 0xC50838, "PSTATE": 0x3C5, "ID_DFR0_EL1": 0x10006,
}
MASKS_612 = {32: 0xffff00f00f00ffff, 33: 0x0000000f000000ff, 40: 0x000000f000f00f0f, 48: 0xfffffffffffffff0,
             49: 0xffffffff00fff00f, 50: 0xffff0fffffff00ff, 56: 0xff00f000ffffff0f, 57: 0xfffff0f00ffff00f,
             58: 0xf0ff000ff00fffff, 65: 0x00007fffffffffff, 129: 0x00000000300f000f}
MASKS_73 = {**MASKS_612, 0: 0xffffffff, 6: 0xffffffffffffffff, 71: 0xffffffffffffffff,
            32: 0xffff00f0ff00ffff, 48: 0xfffffffff0fffff0, 56: 0xff00ffffffffff0f}
FW = {"KVM_REG_ARM_PSCI_VERSION": 0x10001, "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1": 1,
      "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2": 0, "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3": 1,
      "KVM_REG_ARM_STD_BMAP": 1, "KVM_REG_ARM_STD_HYP_BMAP": 1, "KVM_REG_ARM_VENDOR_HYP_BMAP": 3}


def synthetic_doc(kernel: str = "6.12", midr: int | None = None, **overrides: int) -> dict:
    cat = catalog()
    values = dict(A72)
    if midr is not None:
        values["MIDR_EL1"] = midr
    values.update(overrides)
    fw = dict(FW)
    if tuple(map(int, kernel.split("."))) >= (6, 15):
        fw["KVM_REG_ARM_VENDOR_HYP_BMAP_2"] = 0
    ids: dict[int, int] = {}
    for rid in _core_names():
        ids[rid] = values.get(cat.name(rid), 0)
    for name, reg in cat.sysregs.items():
        if reg.cls in ("id", "imp_id") or name in values or name in ("TCR2_EL1", "PIR_EL1", "PIRE0_EL1"):
            if name in ("TCR2_EL1", "PIR_EL1", "PIRE0_EL1") and kernel not in ("6.1", "6.12"):
                continue
            if name == "CCSIDR_EL1":
                continue
            ids[reg.reg_id] = values.get(name, 0)
    for fwreg in cat.fwregs.values():
        if fwreg.name in fw:
            ids[fwreg.reg_id] = fw[fwreg.name]
    for i in range(14 if kernel != "6.1" else 3):
        ids[regid.demux_ccsidr(i)] = 0x701FE01A
    masks = None if kernel == "6.1" else (MASKS_73 if kernel >= "7" else MASKS_612)
    caps = {"KVM_CAP_ONE_REG": 1, "KVM_CAP_ARM_VM_IPA_SIZE": 44, "KVM_CAP_ARM_PMU_V3": 1, "KVM_CAP_ARM_PSCI_0_2": 1,
            "KVM_CAP_ARM_SUPPORTED_REG_MASK_RANGES": 0 if masks is None else 1,
            "KVM_CAP_ARM_WRITABLE_IMP_ID_REGS": 1 if kernel >= "7" else 0}
    return {
        "format": "invariantd/host-capabilities@1", "source": "sim", "profile": None, "arch": "aarch64",
        "kernel_release": f"{kernel}.0-synthetic", "kernel_version": kernel, "api_version": 12, "caps": caps,
        "cpu_midrs": [f"{values['MIDR_EL1']:#x}"] * 2,
        "vcpu_init": {"target": 5, "base_features": ["PSCI_0_2"]},
        "reg_list": [f"{r:#x}" for r in sorted(ids)], "values": {f"{r:#x}": f"{v:#x}" for r, v in ids.items()},
        "writable_masks": None if masks is None else {str(k): f"{v:#x}" for k, v in masks.items()},
        "errors": [],
    }


class Passthrough:
    """Base for test streams that watch or cut a trio stream: everything but send_all passes through.
    Subclasses are trio.abc.Stream via the mixin order `class X(Passthrough, trio.abc.Stream)`."""

    def __init__(self, inner) -> None:
        self.inner = inner

    async def send_all(self, data) -> None:
        await self.inner.send_all(data)

    async def receive_some(self, n=None):
        return await self.inner.receive_some(n)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


def real_kvm(need=None):
    """This machine's /dev/kvm (RealKvm), or pytest.skip naming why not. need(kvm) -> a reason to skip, or None."""
    import os

    import pytest
    from invariantd.daemon.kvm.errors import KvmError
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine")
    from invariantd.daemon.kvm.real import RealKvm
    try:
        k = RealKvm()
    except (OSError, KvmError) as e:
        pytest.skip(f"/dev/kvm present but not usable: {e}")
    why = need(k) if need is not None else None
    if why:
        k.close()
        pytest.skip(why)
    return k


class FakeQemu:
    """A stand-in for QEMU's QMP on a unix socket (the real qemu.qmp client talks to it): records every command;
    query-migrate walks through `states`; migrate pauses the guest, cont / migrate_cancel run it again.
    With the migration capability `events` on (and `events` here True, as QEMU does), `migrate` emits a MIGRATION
    event per state up to pre-switchover and migrate-continue one per state after it; query-migrate then
    answers the last state emitted."""

    def __init__(self, path: str, states=("active", "pre-switchover", "completed"), events: bool = True) -> None:
        self.path, self.states, self.cmds, self.running = path, list(states), [], True
        self.emits, self.events_on, self.status = events, False, None
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _emit(self, conn, until: str | None) -> None:
        """MIGRATION events for the scripted states, up to and including `until` (None: all)."""
        while self.states:
            self.status = self.states.pop(0)
            now = time.time()
            conn.sendall(json.dumps({"event": "MIGRATION", "data": {"status": self.status},
                                     "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}
                                    ).encode() + b"\n")
            if self.status == until:
                return

    def _answer(self, name: str, args: dict):
        if name == "migrate-set-capabilities":
            for c in args.get("capabilities", []):
                if c.get("capability") == "events":
                    self.events_on = self.emits and c.get("state", False)
        if name == "query-migrate":
            if self.events_on and self.status is not None:
                return {"status": self.status}
            return {"status": self.states.pop(0) if len(self.states) > 1 else self.states[0]} if self.states else {}
        if name == "query-status":
            return {"status": "running" if self.running else "paused", "running": self.running}
        if name == "migrate":
            self.running = False
        if name == "cont":
            self.running = True
        if name == "migrate_cancel":
            self.states = ["cancelled"]
            self.running = True
            if self.events_on:
                self.status = "cancelled"
        return {}

    def _conn(self, conn) -> None:
        conn.sendall(json.dumps({"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 11}, "package": ""},
                                         "capabilities": []}}).encode() + b"\n")
        buf, dec = "", json.JSONDecoder()
        while True:                       # QMP is a JSON stream: no newline between a client's messages
            data = conn.recv(65536)
            if not data:
                return
            buf += data.decode()
            while buf.strip():
                try:
                    msg, end = dec.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                name = msg["execute"]
                if name != "qmp_capabilities":
                    self.cmds.append((name, msg.get("arguments", {})))
                reply = {"return": self._answer(name, msg.get("arguments", {}))}
                if "id" in msg:
                    reply["id"] = msg["id"]
                conn.sendall(json.dumps(reply).encode() + b"\n")
                if self.events_on and name in ("migrate", "migrate-continue"):
                    self._emit(conn, "pre-switchover" if name == "migrate" else None)
                if name == "quit":
                    conn.close()
                    return

    def names(self) -> list[str]:
        return [c for c, _ in self.cmds if not c.startswith("query-")]
