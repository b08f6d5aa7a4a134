"""Operator resolution of in-doubt and released VMs (daemon/vms.py resolution / VmRegistry.resolve; RPC resolveVm,
removeVm; invariantctl resolve, remove-vm, vms --unresolved): a VM stays runnable on exactly one host."""
from __future__ import annotations

import json

import pytest

from invariantd.daemon.vms import VmState, resolution
from support.cluster import ctl, start_cluster

IN_DOUBT, RELEASED, RUNNING = VmState.IN_DOUBT, VmState.RELEASED, VmState.RUNNING


@pytest.mark.parametrize("here,peer,action,ok", [
    (IN_DOUBT, "released", "resume", True),      # destination: the source gave it up
    (IN_DOUBT, None, "resume", True),            # the source no longer has it at all (its VMs die with it)
    (IN_DOUBT, "running", "resume", False),      # the source runs it: never two
    (IN_DOUBT, "running", "discard", True),
    (IN_DOUBT, "released", "discard", False),    # then it would run nowhere
    (RELEASED, None, "resume", True),            # source: the destination discarded it
    (RELEASED, "in-doubt", "resume", False),     # resolve it there instead
    (RELEASED, "running", "discard", True),
    (RELEASED, "paused", "discard", False),
    (RUNNING, None, "resume", False),            # nothing to resolve
    (IN_DOUBT, None, "reboot", False),
])
def test_the_rule(here, peer, action, ok):
    assert (resolution(here, peer, action) == "") is ok


async def test_resolve_and_remove_through_the_cli(nursery, pki, capsys):
    cl = await start_cluster(nursery, pki)
    assert await ctl(cl, "create-vm", "vm-1", "--vcpus", "1") == 0
    assert await ctl(cl, "migrate", "vm-1", "--to", "node-b", "--json") == 0
    capsys.readouterr()
    assert await ctl(cl, "vms", "--unresolved", "--json") == 0
    assert [v["state"] for v in json.loads(capsys.readouterr().out)] == ["released"]
    # node-b runs it: resuming the released copy here is refused, naming why; discarding it is allowed
    assert await ctl(cl, "resolve", "vm-1", "--peer", "node-b", "--resume") == 2
    assert "the peer runs it" in capsys.readouterr().err
    assert await ctl(cl, "remove-vm", "nope") == 2
    capsys.readouterr()
    assert await ctl(cl, "resolve", "vm-1", "--peer", "node-b", "--discard") == 0
    assert "discarded here" in capsys.readouterr().out
    assert await ctl(cl, "vms", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert await ctl(cl, "remove-vm", "vm-1", daemon="b") == 0        # node-b's running copy: the operator's to drop
    assert "removed vm-1" in capsys.readouterr().out


async def test_a_released_vm_the_destination_ran_is_never_resumed_here(nursery, pki, capsys):
    """The destination acknowledged and ran the VM, then lost it: the source's pause-time copy is stale (the guest
    ran on since), and its state was freed at the acknowledgement: resume is refused, naming why."""
    cl = await start_cluster(nursery, pki)
    assert await ctl(cl, "create-vm", "vm-2", "--vcpus", "1") == 0
    assert await ctl(cl, "migrate", "vm-2", "--to", "node-b", "--json") == 0
    assert await ctl(cl, "remove-vm", "vm-2", daemon="b") == 0          # the destination's copy is gone
    capsys.readouterr()
    assert await ctl(cl, "resolve", "vm-2", "--peer", "node-b", "--resume", "--json") == 2
    assert "nothing to resume here: the destination node-b acknowledged: it runs the VM" in capsys.readouterr().err


async def test_an_unanswered_peer_is_asked_again_with_backoff(autojump_clock):
    """A peer that cannot be asked: the VM waits, says for what, and the resolver asks again after 1, 2, 4, 8, 16
    and then every 30 s (trio's MockClock: 100 s of the resolver's time pass at once; nothing here does I/O)."""
    import trio

    from invariantd.daemon.resolve import ResolveError, Resolver
    asked = []

    class Unanswered(Resolver):
        def unresolved(self):
            return [(None, "destination", "m-1", "vm-x", "ghost")]

        async def ask(self, peer, migration_id, vm_id):
            asked.append(trio.current_time())
            raise ResolveError("no answer")
    r = Unanswered(registry=None, peers=(), client_ctx=None)
    async with trio.open_nursery() as n:
        await n.start(r.run)
        t0 = trio.current_time()
        await trio.sleep(100)
        n.cancel_scope.cancel()
    assert [round(t - t0, 6) for t in asked] == [0, 1, 3, 7, 15, 31, 61, 91]
    assert r.waiting["vm-x"] == "waits for ghost to answer about migration m-1: no answer"
