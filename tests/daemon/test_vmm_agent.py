"""The in-process VMM agent (daemon/vmm/agent.c, LD_PRELOAD) against this machine's real /dev/kvm, with the
daemon's side of its socket (daemon/vmm/hub.py) and the apply program (protocol/program.py).

A "VMM" here is a child Python process using the project's own KVM binding (its ioctls go through libc's
ioctl(), which the agent interposes, exactly as QEMU's do). x86 has ONE_REG for MSRs, so the generic parts of
the agent are proven here: the planned value written instead of the VMM's (one ioctl), a refused write handled
by the program's action for its errno, a FAIL that reaches the VMM as the kernel's errno, the read-back, the
pass-through without a program. arm64-only parts (cap 239, KVM_GET_REG_LIST drift, the source snapshot) run in
the lab on real arm64 kernels."""
from __future__ import annotations

import ctypes
import errno as E
import json
import os
import sys
import textwrap

import pytest
import trio

from support.fixtures import real_kvm
from invariantd.daemon.vmm import agent_library
from invariantd.daemon.vmm.hub import AgentHub
from invariantd.daemon.vmm.wrapper import command, vm_name
from invariantd.protocol import agentwire as W
from invariantd.protocol import kvmabi, regid
from invariantd.protocol.program import Action, ApplyProgram, RegOp, Verdict8

UCODE, ARCH_CAPS, MISC = regid.x86_msr(0x8B), regid.x86_msr(0x10A), regid.x86_msr(0x1A0)

VMM = textwrap.dedent("""
    import json, sys
    from invariantd.daemon.kvm.real import RealKvm
    from invariantd.protocol.regset import RegisterSet
    writes = [(int(r, 16), int(v, 16)) for r, v in json.loads(sys.argv[1])]
    k = RealKvm(); vm = k.create_vm(); vcpu = vm.create_vcpu(0)
    errs = vcpu.set_regs(RegisterSet.from_pairs(writes))
    vals, gerrs = vcpu.get_regs([r for r, _ in writes])
    vals = vals.values()
    print(json.dumps({"errs": errs, "vals": [hex(v) for v in vals]}))
""")


def x86_only():
    k = real_kvm()
    if k.arch != "x86_64":
        pytest.skip("the x86 MSR path; arm64 hosts run the lab tests instead")
    return k


async def run_vmm(tmp_path, writes, *, migration="m-1", role="destination", extra_env=None):
    env = dict(os.environ, LD_PRELOAD=str(agent_library()), INVARIANTD_AGENT_SOCKET=str(tmp_path / "agent.sock"),
               INVARIANTD_AGENT_ROLE=role, INVARIANTD_MIGRATION=migration, INVARIANTD_VM="vm-x",
               INVARIANTD_AGENT_WAIT="5", **(extra_env or {}))
    arg = json.dumps([[f"{r:#x}", f"{v:#x}"] for r, v in writes])
    cp = await trio.run_process([sys.executable, "-c", VMM, arg], env=env, capture_stdout=True, capture_stderr=True,
                                check=False)
    assert cp.returncode == 0, cp.stderr.decode()
    return json.loads(cp.stdout), cp.stderr.decode()


def test_agent_was_built_with_the_ioctl_numbers_of_kvmabi():
    lib = ctypes.CDLL(str(agent_library()))
    f = lib.ivd_agent_ioctl_number
    f.restype, f.argtypes = ctypes.c_ulong, [ctypes.c_char_p]
    for name in ("KVM_CREATE_VM", "KVM_CREATE_VCPU", "KVM_RUN", "KVM_ENABLE_CAP", "KVM_GET_ONE_REG",
                 "KVM_SET_ONE_REG", "KVM_GET_REG_LIST", "KVM_ARM_VCPU_INIT"):
        assert f(name.encode()) == kvmabi.IOCTLS[name], name


@pytest.mark.kvm
async def test_destination_agent_runs_the_program_on_real_kvm(tmp_path):
    x86_only()
    hub = AgentHub(str(tmp_path / "agent.sock"), hold=1.0)
    prog = ApplyProgram((
        RegOp(UCODE, write=0x200000000, verdict=Verdict8.OVERRIDE),                 # planned: written instead
        RegOp(ARCH_CAPS, write=1 << 63, on_einval=Action.ACCEPT_DESTINATION, verdict=Verdict8.SET),
    ), digest=b"\x11" * 32, migration="m-1", generic_rules=False)
    async with trio.open_nursery() as n:
        await n.start(hub.serve)
        hub.offer("m-1", prog)
        out, err = await run_vmm(tmp_path, [(MISC, 1), (UCODE, 0x100000000), (ARCH_CAPS, 1 << 63)])
        rec = await hub.wait_for(lambda h: h.find(migration="m-1"), 5)
        n.cancel_scope.cancel()
    # the VMM's writes all "succeeded"; KVM holds the planned UCODE and the destination's ARCH_CAPS
    assert out["errs"] == [0, 0, 0] and out["vals"] == ["0x1", "0x200000000", "0x0"], (out, err)
    assert rec.role is W.Role.DESTINATION and rec.vm == "vm-x" and rec.program_digest == b"\x11" * 32
    kinds = [(e.kind, e.reg_id, e.errno, e.action) for e in rec.events]
    assert (W.Kind.OVERRIDE, UCODE, 0, 0) in kinds                   # counted as an override, not a failure
    assert (W.Kind.DECISION, ARCH_CAPS, E.EINVAL, Action.ACCEPT_DESTINATION) in kinds
    assert not rec.failures()
    [v] = rec.verify.values()                                        # written first (no VCPU_INIT on x86), read back
    assert (v.phase, v.checked, v.bad) == (1, 2, ()) and rec.verified()
    assert "program for migration m-1: 2 registers" in err


@pytest.mark.kvm
async def test_a_refusal_the_plan_does_not_cover_fails_as_the_kernel_said(tmp_path):
    x86_only()
    hub = AgentHub(str(tmp_path / "agent.sock"), hold=1.0)
    prog = ApplyProgram((RegOp(ARCH_CAPS, write=1 << 63, verdict=Verdict8.SET),), migration="m-2",
                        generic_rules=False)
    async with trio.open_nursery() as n:
        await n.start(hub.serve)
        hub.offer("m-2", prog)
        out, err = await run_vmm(tmp_path, [(ARCH_CAPS, 1 << 63)], migration="m-2")
        rec = await hub.wait_for(lambda h: h.find(migration="m-2"), 5)
        n.cancel_scope.cancel()
    assert out["errs"] == [E.EINVAL]                                  # the VMM sees the kernel's refusal
    # refused when the agent wrote the program first, and again when the VMM wrote it: both reported
    assert {(f.reg_id, f.errno) for f in rec.failures()} == {(ARCH_CAPS, E.EINVAL)}
    assert "the plan allows nothing else" in err and not rec.verified()


@pytest.mark.kvm
@pytest.mark.parametrize("case", ["no-daemon", "unknown-migration", "digest-mismatch"])
async def test_without_a_matching_program_the_agent_only_passes_through(tmp_path, case):
    x86_only()
    hub = AgentHub(str(tmp_path / "agent.sock"), hold=1.0)
    prog = ApplyProgram((RegOp(UCODE, write=0x200000000),), digest=b"\x22" * 32, migration="m-3",
                        generic_rules=False)
    env = {"INVARIANTD_PLAN_DIGEST": "33" * 32} if case == "digest-mismatch" else {}
    async with trio.open_nursery() as n:
        if case != "no-daemon":
            await n.start(hub.serve)
            hub.offer("m-3", prog)
        out, err = await run_vmm(tmp_path, [(UCODE, 0x100000000)], extra_env=env,
                                 migration="other" if case == "unknown-migration" else "m-3")
        n.cancel_scope.cancel()
    assert out["errs"] == [0] and out["vals"] == ["0x100000000"]       # nothing invented
    assert "passing through" in err
    if case == "unknown-migration":
        assert "no migration 'other' is planned here" in err
    elif case == "digest-mismatch":
        assert "plan digest 3333333333333333" in err


def test_hub_drops_a_malformed_agent_and_keeps_serving(tmp_path):
    async def main():
        hub = AgentHub(str(tmp_path / "a.sock"))
        async with trio.open_nursery() as n:
            await n.start(hub.serve)
            bad = await trio.open_unix_socket(str(tmp_path / "a.sock"))
            await bad.send_all(b"GARBAGE-FRAME-GARBAGE")
            assert await bad.receive_some(10) == b""                  # closed by the hub
            good = await trio.open_unix_socket(str(tmp_path / "a.sock"))
            await good.send_all(W.encode_hello(W.Hello(1, W.Role.SOURCE, "vm", "")) + W.encode_snapshot(
                W.Snapshot(0, (1, 2), ((1, 5),))))
            rec = await hub.wait_for(lambda h: h.find(vm="vm") if h.find(vm="vm") and h.find(vm="vm").snapshots
                                     else None, 5)
            assert rec.snapshots[0].values == ((1, 5),) and rec.role is W.Role.SOURCE
            n.cancel_scope.cancel()
    trio.run(main)


def test_a_destination_asking_before_the_plan_is_agreed_gets_it_when_offered(tmp_path):
    """The orchestrator may start the destination QEMU (which asks at its first vCPU) before the daemons agreed:
    the hub holds the request until the program for that VM is offered (here: after the agent asked)."""
    async def main():
        hub = AgentHub(str(tmp_path / "a.sock"), hold=10)
        async with trio.open_nursery() as n:
            await n.start(hub.serve)
            agent = await trio.open_unix_socket(str(tmp_path / "a.sock"))
            await agent.send_all(W.encode_hello(W.Hello(1, W.Role.DESTINATION, "web-1", "")))
            await trio.sleep(0.2)
            prog = ApplyProgram((RegOp(UCODE, write=5),), digest=b"\x01" * 32, migration="m-7", generic_rules=False)
            hub.offer("m-7", prog, vm="web-1")
            r = W.Reader()
            got = []
            with trio.fail_after(5):
                while not got:
                    got = r.feed(await agent.receive_some(65536))
            assert ApplyProgram.decode(got[0]) == prog and hub.find(vm="web-1").migration == "m-7"
            n.cancel_scope.cancel()
    trio.run(main)


def test_wire_roundtrip():
    msgs = [W.Hello(7, W.Role.DESTINATION, "vm-1", "m-9", b"\x01" * 32),
            W.Event(3, E.EINVAL, W.Kind.DECISION, Action.DROP, Verdict8.DROP, 0x603000000013c103, 5, 5),
            W.Snapshot(1, (10, 11, 12), ((10, 1), (12, 3))), W.Verify(0, 4, 1, ((10, 1, 2, 0),))]
    data = W.encode_hello(msgs[0]) + W.encode_event(msgs[1]) + W.encode_snapshot(msgs[2]) + W.encode_verify(msgs[3])
    r = W.Reader()
    got = [m for i in range(0, len(data), 7) for m in r.feed(data[i:i + 7])]
    assert got == msgs
    with pytest.raises(W.WireError, match="version"):
        W.Reader().feed(b"IVDA\x09\x00\x01\x00\x00\x00\x00\x00")


def test_wrapper_preloads_the_agent_and_names_the_vm(tmp_path):
    fake = tmp_path / "qemu-system-aarch64"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    prog, argv, env = command(["-name", "guest=web-1,debug-threads=on", "-m", "64"],
                              {"PATH": str(tmp_path), "LD_PRELOAD": "/x/other.so"})
    assert prog == str(fake) and argv == [str(fake), "-name", "guest=web-1,debug-threads=on", "-m", "64"]
    assert env["LD_PRELOAD"].split() == [str(agent_library()), "/x/other.so"] and env["INVARIANTD_VM"] == "web-1"
    assert vm_name(["-name", "db"]) == "db" and vm_name([]) == ""
    with pytest.raises(FileNotFoundError, match="INVARIANTD_QEMU"):
        command([], {"PATH": str(tmp_path / "none")})
