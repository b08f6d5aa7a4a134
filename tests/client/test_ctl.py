"""invariantctl orchestration subcommands (client/ctl.py) against in-process daemons: output and exit codes."""
from __future__ import annotations

import json

import trio

from invariantd.client.cli import build_parser, main
from support.cluster import ctl, start_cluster




async def test_ctl_flow_and_exit_codes(nursery, pki, capsys):
    cl = await start_cluster(nursery, pki)
    assert await ctl(cl, "create-vm", "vm-1", "--vcpus", "2") == 0
    assert "created vm-1: 2 vCPU(s)" in capsys.readouterr().out
    assert await ctl(cl, "vms") == 0
    assert "vm-1" in capsys.readouterr().out
    assert await ctl(cl, "inspect-vm", "vm-1") == 0
    assert "MIDR_EL1" in capsys.readouterr().out
    assert await ctl(cl, "caps", "node-b", "--json") == 0
    assert json.loads(capsys.readouterr().out)["kernel_version"] == "7.3"
    assert await ctl(cl, "peers") == 0
    assert "node-b" in capsys.readouterr().out
    assert await ctl(cl, "plan-vm", "vm-1", "--to", "node-b") == 0
    out = capsys.readouterr().out
    assert "MIDR_EL1" in out and "result: MIGRATABLE" in out
    assert await ctl(cl, "migrate", "vm-1", "--to", "node-b", "--json") == 0
    st = json.loads(capsys.readouterr().out)
    assert st["state"] == "committed" and st["vcpus_done"] == 2
    assert await ctl(cl, "status", st["id"]) == 0
    assert "committed" in capsys.readouterr().out
    assert await ctl(cl, "status", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)) == 1
    assert await ctl(cl, "vms", daemon="b") == 0
    assert "incoming" in capsys.readouterr().out
    # error kinds -> exit codes
    assert await ctl(cl, "inspect-vm", "ghost") == 2
    assert "notFound" in capsys.readouterr().err
    assert await ctl(cl, "migrate", "vm-1", "--to", "node-b") == 2          # released here: conflict
    assert await ctl(cl, "cancel", st["id"]) == 2                           # already ended
    assert await ctl(cl, "create-vm", "x", "--vcpus", "0", "--json") == 2
    assert json.loads(capsys.readouterr().out)["error"]["kind"] == "badRequest"
    assert await trio.to_thread.run_sync(main, ["vms", "--daemon", "127.0.0.1:1"]) == 4


async def test_ctl_refused_plan_exit_3(nursery, pki, capsys):
    cl = await start_cluster(nursery, pki, dst="neoverse-n1@6.1")
    assert await ctl(cl, "create-vm", "vm-r") == 0
    assert await ctl(cl, "plan-vm", "vm-r", "--to", "node-b") == 3
    assert "result: REFUSED" in capsys.readouterr().out
    assert await ctl(cl, "migrate", "vm-r", "--to", "node-b") == 3


def test_help_documents_exit_codes_and_plan_is_unchanged(capsys):
    from invariantd.client.exits import Exit, MEANING
    p = build_parser()
    for cmd in ("migrate", "status", "demo"):
        h = p._subparsers._group_actions[0].choices[cmd].format_help()
        assert all(f"{int(c)}  {MEANING[c]}" in h for c in Exit), cmd       # the one table, whole
    args = p.parse_args(["plan", "--from", "a.json", "--to", "b.json"])
    assert (args.source, args.to) == ("a.json", "b.json") and args.func.__module__.endswith("plan_cmd")


async def test_create_vm_with_a_negative_vcpu_count_is_bad_input(nursery, pki, capsys):
    cl = await start_cluster(nursery, pki)
    assert await ctl(cl, "create-vm", "neg", "--vcpus", "-3") == 2
    assert "vCPU count -3" in capsys.readouterr().err


async def test_a_client_side_timeout_says_still_running_not_failed(nursery, pki, capsys, monkeypatch):
    """--timeout passes while the destination is still at work (failpoint: it sleeps 3 s after accepting the plan):
    exit 9 "still running", not 7 "failed"; the migration then commits."""
    from invariantd.daemon import failpoints
    monkeypatch.setattr(failpoints, "ACTIVE", {"destination.accepted": "sleep:3"})
    cl = await start_cluster(nursery, pki)
    assert await ctl(cl, "create-vm", "vm-t", "--vcpus", "1") == 0
    capsys.readouterr()
    assert await ctl(cl, "migrate", "vm-t", "--to", "node-b", "--timeout", "0.5", "--json") == 9
    captured = capsys.readouterr()
    st = json.loads(captured.out)
    assert st["state"] == "running" and "is still running after 0.5s (not failed)" in captured.err
    monkeypatch.setattr(failpoints, "ACTIVE", {})
    assert await ctl(cl, "status", st["id"]) == 0
    with trio.fail_after(20):
        while "committed" not in capsys.readouterr().out:
            await trio.sleep(0.2)
            await ctl(cl, "status", st["id"])


def test_a_qemu_migrations_status_line_shows_downtime_and_the_switchover_hold():
    from invariantd.client.ctl import _status_line
    st = {"id": "m-1", "vm": "web-1", "to": "b", "state": "committed", "phase": "done", "vcpus_done": 0,
          "vcpus_total": 0, "bytes_sent": 0, "elapsed_ms": 3100, "error": None,
          "detail": {"qemu": {"status": "completed", "downtime": 136},
                     "switchover": {"noticed": 5.5, "decided": 0.1, "journal": 0.9, "continue": 26.0}}}
    line = _status_line(st)
    assert "QEMU downtime 136 ms" in line and "switchover held 6.5 ms" in line, line
    assert "QEMU" not in _status_line({**st, "detail": {}})          # a vCPU-state migration: no QEMU part
