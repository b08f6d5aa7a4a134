"""Failpoints (after etcd's gofail): named points in the migration code where this process fails on purpose, so
that the fault-injection suite (tests/daemon/test_faults.py) and an operator reproducing a report can stop or kill a
daemon at an exact step of a migration. Off unless the environment says otherwise:

    INVARIANTD_FAILPOINTS="source.released=kill,destination.applied=stop"

Actions: kill (SIGKILL this process: nothing runs after it, as with kill -9), stop (SIGSTOP: a peer that stops
answering past every timeout; SIGCONT resumes it), sleep:SECONDS, cut (the peer connection breaks here: raises
trio.BrokenResourceError). Two points cut the byte stream instead: source.bytes=cut:N and destination.bytes=cut:N
write the first N bytes that side sends on a migration's connection, then break it (peer.Conn). Points
(daemon/peer/; the phase names are the journal's, daemon/journal.py):

    source.proposed       the plan is journaled, the proposal not yet sent
    source.paused         the VM is paused, nothing streamed
    source.streamed       every chunk and StreamEnd written, the destination's Commit not yet read
    source.released       `released` is journaled, our Commit not yet sent
    source.committed      our Commit sent, the acknowledgement not yet read
    destination.accepted  the plan is journaled and accepted, no pre-flight yet
    destination.streamed  StreamEnd received, nothing applied
    destination.applied   applied, verified and journaled `applied`, our Commit not yet sent
    destination.committed our Commit sent, the source's not yet read
    destination.running   the VM runs here, our acknowledgement not yet sent
"""
from __future__ import annotations

import os
import signal

import trio

POINTS = ("source.proposed", "source.paused", "source.streamed", "source.released", "source.committed",
          "destination.accepted", "destination.streamed", "destination.applied", "destination.committed",
          "destination.running", "source.bytes", "destination.bytes")
ACTIONS = ("kill", "stop", "sleep", "cut")


class FailpointError(ValueError):
    pass


def parse(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, action = item.partition("=")
        if not sep or name not in POINTS or action.split(":", 1)[0] not in ACTIONS:
            raise FailpointError(f"INVARIANTD_FAILPOINTS: {item!r}: expected POINT=ACTION, POINT one of "
                                 f"{', '.join(POINTS)}; ACTION one of kill, stop, sleep:SECONDS, cut")
        if action.startswith("sleep"):
            try:
                float(action.split(":", 1)[1])
            except (IndexError, ValueError):
                raise FailpointError(f"INVARIANTD_FAILPOINTS: {item!r}: sleep needs seconds (sleep:2.5)") from None
        if name.endswith(".bytes") and not (action.startswith("cut:") and action[4:].isdigit()):
            raise FailpointError(f"INVARIANTD_FAILPOINTS: {item!r}: a .bytes point takes cut:N (bytes)")
        out[name] = action
    return out


ACTIVE: dict[str, str] = parse(os.environ.get("INVARIANTD_FAILPOINTS", ""))


def byte_cut(role: str) -> int | None:
    """source.bytes / destination.bytes: how many bytes `role` may send before its connection breaks."""
    action = ACTIVE.get(f"{role}.bytes")
    return int(action[4:]) if action else None


async def hit(name: str) -> None:
    action = ACTIVE.get(name)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "cut":
        raise trio.BrokenResourceError(f"failpoint {name}: connection cut")
    else:
        await trio.sleep(float(action.split(":", 1)[1]))
