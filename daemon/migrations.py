"""One migration the RPC service runs (or ran): its record - state, phase, bytes, vCPUs streamed - and the tap that
fills it from the peer-protocol events on the wire (ProgressStream counts the bytes)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from ..protocol import session as ps


@dataclass
class Migration:
    id: str
    vm: str
    to: str
    vcpus_total: int
    state: str = "running"
    phase: str = "connecting"
    bytes_sent: int = 0
    bytes_received: int = 0
    vcpus_done: int = 0
    registers_sent: int = 0
    started: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.monotonic)
    ended: float | None = None
    result: str = ""
    error: tuple[str, str] | None = None
    plan_digest: bytes = b""
    detail: dict = field(default_factory=dict)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    _cur_vcpu: int | None = None

    def as_dict(self) -> dict:
        end = self.ended if self.ended is not None else time.monotonic()
        return {"id": self.id, "vm": self.vm, "to": self.to, "state": self.state, "phase": self.phase,
                "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "vcpus_done": self.vcpus_done, "vcpus_total": self.vcpus_total,
                "registers_sent": self.registers_sent, "started_unix_ms": int(self.started * 1000),
                "elapsed_ms": int((end - self.t0) * 1000), "result": self.result, "error": self.error,
                "plan_digest": self.plan_digest, "detail": self.detail}

    # the tap: peer-protocol events seen on the wire
    def on_event(self, direction: str, ev) -> None:
        if direction == "out":
            if isinstance(ev, ps.Hello):
                self.phase = "handshake"
            elif isinstance(ev, ps.PlanProposal):
                self.phase = "plan"
                self.plan_digest = ev.digest
            elif isinstance(ev, ps.VcpuChunk):
                self.phase = "stream"
                # vCPUs are streamed in ascending order: those before this chunk's first one are done
                self.vcpus_done = max(self.vcpus_done, min(self.vcpus_total, ev.vcpu))
                self._cur_vcpu = ev.vcpu
                self.registers_sent += len(ev.reg_ids) * max(1, getattr(ev, "count", 0))
            elif isinstance(ev, ps.StreamEnd):
                self.vcpus_done = self.vcpus_total
                self.phase = "apply"
            elif isinstance(ev, ps.Commit):
                self.phase = "commit"
        else:
            if isinstance(ev, ps.Capabilities):
                self.phase = "plan"
            elif isinstance(ev, ps.PlanAccept):
                self.phase = "preflight"
            elif isinstance(ev, ps.Preflight) and ev.ok:
                self.phase = "stream"
            elif isinstance(ev, ps.Commit):
                self.phase = "commit"


class ProgressStream(trio.abc.Stream):
    """A trio stream that counts the bytes that pass (the events come from migrate_out's on_event)."""

    def __init__(self, inner: trio.abc.Stream, mig: Migration) -> None:
        self.inner, self.mig = inner, mig

    async def send_all(self, data) -> None:
        await self.inner.send_all(data)
        self.mig.bytes_sent += len(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        self.mig.bytes_received += len(data)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()
