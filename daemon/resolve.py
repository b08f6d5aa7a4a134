"""Resolving in-doubt VMs by themselves: ask the peer what it decided (peer protocol 5 Inquiry), act on one rule.

A VM is unresolved here when its migration broke at the commit step (daemon/peer/):
- destination: the VM is `in-doubt` (applied and verified, paused after our Commit; the source may or may not
  have released it). It waits for the source's answer: released -> run it; aborted (the source resumed its
  copy) -> discard it; the source died holding it (lost) -> run it (ours is the only copy).
- source: the VM is `released` and the journal says `in-doubt` (our Commit went out, no acknowledgement). It
  waits for the destination's answer: it runs (or ran) the VM -> committed; it never ran it -> run ours again.
- a QEMU migration this daemon was the source of, in doubt (the daemon restarted during it, or the destination
  could not be asked after the switchover): VmmService.settle_source asks the source QEMU (QMP) and the
  destination daemon: before the switchover the source guest resumes; after it, the source QEMU quits once the
  destination runs the guest, and waits (paused) while that cannot be known.
The rule is vms.settle; this module only asks and acts. Until an answer decides, the VM stays as it is and
`waiting[vm]` names what it waits for (shown by `invariantctl vms`): a peer that cannot be reached (asked again
with backoff, up to every `max_interval` s), a peer not in [peers] (an operator must `resolve`), an answer that
does not decide.

The peer of an incoming migration is known by its certificate's name: it is found in [peers] by name, or by
server_name.
"""
from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import trio

from ..protocol import session as ps
from . import tls
from .config import PeerEntry
from .journal import MigrationRecord
from .logs import kv
from .peer import PeerConfig, PeerError, inquire
from .vms import ManagedVm, VmRegistry, VmState, settle

log = logging.getLogger("invariantd.resolve")


class ResolveError(Exception):
    """The peer could not be asked (not configured, unreachable, too old); the message says which and why."""


@dataclass
class Resolver:
    registry: VmRegistry
    peers: Sequence[PeerEntry]
    client_ctx: ssl.SSLContext
    cfg: PeerConfig = PeerConfig()
    min_interval: float = 1.0
    max_interval: float = 30.0
    vmm_settle: Callable[[MigrationRecord], Awaitable[tuple[str, str]]] | None = None   # QEMU migrations
    waiting: dict[str, str] = field(default_factory=dict)      # VM -> what it waits for
    resolved: list[str] = field(default_factory=list)          # recent decisions (bounded), for status and tests
    _next: dict[str, tuple[float, float]] = field(default_factory=dict)   # VM -> (next try, interval)
    _wake: trio.Event = field(default_factory=trio.Event)

    def find_peer(self, name: str) -> PeerEntry | None:
        for p in self.peers:
            if p.name == name:
                return p
        for p in self.peers:
            if p.server_name and p.server_name == name:
                return p
        return None

    async def ask(self, peer: str, migration_id: str, vm_id: str) -> ps.Answer:
        p = self.find_peer(peer)
        if p is None:
            known = ", ".join(x.name for x in self.peers) or "none"
            raise ResolveError(f"peer {peer!r} is not in [peers] (known: {known}): it cannot be asked")
        try:
            stream = await tls.connect(p.host, p.port, self.client_ctx, server_hostname=p.server_name or p.host,
                                       timeout=self.cfg.handshake_timeout)
        except tls.TlsError as e:
            raise ResolveError(str(e)) from None
        try:
            return await inquire(stream, migration_id, vm_id, cfg=self.cfg)
        except PeerError as e:
            raise ResolveError(f"peer {peer}: {e}") from None
        finally:
            await trio.aclose_forcefully(stream)

    def unresolved(self) -> list[tuple[ManagedVm | None, str, str, str, str]]:
        """(VM or None, our role, migration id, VM name, peer) for every migration waiting on its peer's answer:
        in-doubt VMs here, released VMs whose Commit was not acknowledged, and a source's in-doubt migrations
        whose VM died with a previous process (only the outcome is left to record)."""
        out = []
        held = set()
        for m in list(self.registry.vms.values()):
            if m.state is VmState.IN_DOUBT:
                out.append((m, "destination", m.migration, m.vm_id, m.peer))
                held.add(m.migration)
            elif m.state is VmState.RELEASED and m.migration:
                rec = self.registry.journal.migration(m.migration)
                if rec is not None and rec.outcome == "in-doubt":
                    out.append((m, "source", m.migration, m.vm_id, m.peer))
                held.add(m.migration)
        for rec in self.registry.journal.migrations("in-doubt"):
            if rec.id not in held and rec.role == "source":
                out.append((None, "source", rec.id, rec.vm, rec.peer))
            elif rec.role == "vmm-source" and self.vmm_settle is not None:
                out.append((None, "vmm-source", rec.id, rec.vm, rec.peer))
        return out

    def poke(self) -> None:
        """Something became unresolved (or an operator asked): try now."""
        self._next.clear()
        self._wake.set()

    async def settle_one(self, m: ManagedVm | None, role: str, mid: str, vm_id: str, peer: str) -> str:
        """Ask once and act. Returns the action taken (resume | discard | committed | lost) or "wait"."""
        if role == "vmm-source":
            rec = self.registry.journal.migration(mid)
            action, why = await self.vmm_settle(rec)
            if action == "wait":
                self.waiting[vm_id] = f"waits: {why}"
                return "wait"
            self.waiting.pop(vm_id, None)
            self._said(action, mid, vm_id, peer, why)
            return action
        try:
            ans = await self.ask(peer, mid, vm_id)
        except ResolveError as e:
            self.waiting[vm_id] = f"waits for {peer or 'its peer'} to answer about migration {mid}: {e}"
            return "wait"
        action, why = settle(role, ans.outcome, ans.phase, ans.vm_state or None)
        if m is not None and self.registry.vms.get(vm_id) is not m:   # an operator resolved or removed it meanwhile
            self.waiting.pop(vm_id, None)
            return "wait"
        journal = self.registry.journal
        if action == "wait":
            self.waiting[vm_id] = f"waits: {why} (asked {peer} about migration {mid})"
            return "wait"
        if m is None and action == "resume":         # ours was the only copy, and it died with that process
            action, why = "lost", why + "; our copy died with the previous daemon process: the VM is lost"
            journal.decide(mid, "lost", f"resolved with {peer}: {why}")
        elif action == "resume":
            journal.decide(mid, "aborted" if role == "source" else "committed", f"resolved with {peer}: {why}")
            m.reclaim() if m.state is VmState.RELEASED else m.resume()
        elif action == "discard":
            journal.decide(mid, "aborted", f"resolved with {peer}: {why}")
            self.registry.remove(vm_id, f"discarded by resolution with {peer}")
        else:                                # committed: the destination runs it; our copy's state goes
            journal.step(mid, "acked")
            journal.decide(mid, "committed", f"resolved with {peer}: {why}")
            if m is not None:
                self.registry.free_released(vm_id, f"{peer} runs the VM (resolved)")
        self.waiting.pop(vm_id, None)
        self._said(action, mid, vm_id, peer, why)
        return action

    def _said(self, action: str, mid: str, vm_id: str, peer: str, why: str) -> None:
        line = f"{action} {kv(migration=mid, vm=vm_id, peer=peer)}: {why}"
        self.resolved.append(line)
        del self.resolved[:-100]
        (log.error if action == "lost" else log.warning)("resolved in-doubt: %s", line)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            now = trio.current_time()
            pending = self.unresolved()
            for name in set(self.waiting) - {p[3] for p in pending}:
                del self.waiting[name]
            for m, role, mid, vm_id, peer in pending:
                due, interval = self._next.get(mid, (now, self.min_interval))
                if due > now:
                    continue
                if await self.settle_one(m, role, mid, vm_id, peer) == "wait":
                    self._next[mid] = (trio.current_time() + interval, min(interval * 2, self.max_interval))
                else:
                    self._next.pop(mid, None)
            self._wake = trio.Event()
            with trio.move_on_after(self.min_interval):
                await self._wake.wait()
