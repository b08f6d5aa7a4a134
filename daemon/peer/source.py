"""The source side of a migration (migrate_out): plan, pre-flight, blackout, stream, commit. See the package
docstring for the whole conversation."""
from __future__ import annotations

import itertools
import logging
import uuid
from typing import Callable

import trio

from ...protocol import schemas as S
from ...protocol import session as ps
from ...protocol.negotiate import negotiate
from ...protocol.policy import Policy, default_policy
from .. import failpoints
from ..apply import read_vm_async
from ..kvm.backend import threaded, worker_threads
from ..kvm.errors import KvmError
from ..logs import kv
from ..metrics import Metrics
from ..vms import VmRegistry, VmStateError
from .chunks import _chunks, _later
from .pipeline import BackgroundRead
from .link import PLAN_FORMAT, Conn, MigrationResult, PeerConfig, PeerError, _describe, _wrap, decode_caps, same_host
from ..vmprofile import profile_changes, profile_regsets, profile_view, refusal_reasons, vm_profile

log = logging.getLogger("invariantd.peer")


Planner = Callable[[S.VmProfile, S.HostCapabilities, Policy], S.Plan]


async def migrate_out(stream: trio.abc.Stream, registry: VmRegistry, vm_id: str, *, cfg: PeerConfig = PeerConfig(),
                      metrics: Metrics | None = None, planner: Planner | None = None,
                      migration_id: str | None = None, policy: Policy | None = None,
                      on_plan: Callable[[S.Plan], None] | None = None,
                      on_event: Callable[[str, object], None] | None = None, peer: str = "") -> MigrationResult:
    """Source side over an established (TLS) stream. Raises PeerError; the VM is then running here again.
    peer: the destination's name (the journal's; the operator's resolve and the resolver ask it by that name).

    policy: the negotiation policy (default: the shipped default; the destination must use the same one,
    the plan digest covers it). planner: the negotiation engine (negotiate) unless a test injects another.
    on_plan: called with the plan before it is proposed (refused plans included).
    on_event: called with ("out" | "in", event) for every protocol event (progress reporting)."""
    mvm = registry.get(vm_id)
    mid = migration_id or uuid.uuid4().hex
    conn = Conn(stream, ps.Session(ps.SOURCE, cfg.limits, cfg.versions), metrics, on_event)
    m = metrics or Metrics()
    pol = policy or default_policy()
    if not mvm.runnable:
        raise VmStateError(f"VM {vm_id}: cannot migrate out while {mvm.state.value} (only a running VM can)")
    journal = registry.journal
    paused = released = begun = False
    try:
        # Handshake, plan agreement and the destination's pre-flight run while the VM still runs: the plan
        # depends on ID / imp-ID / cache / FW values (frozen once a vCPU has run) and the drift registers;
        # after the pause they are read again and must be unchanged (else abort, the VM keeps running).
        with m.phase("handshake"), trio.fail_after(cfg.handshake_timeout):
            await conn.send(ps.Hello(cfg.versions, ps.SOURCE, cfg.node))
            await conn.expect(ps.Hello)
            caps_ev = await conn.expect(ps.Capabilities)
        dest = decode_caps(caps_ev)
        version = conn.session.version or 1
        checksum = cfg.checksum if ps.CHECKSUM_SINCE[cfg.checksum] <= version else "crc32"
        if checksum != cfg.checksum:
            log.info("checksum downgraded %s: the peer speaks protocol %d, which has no %s checksum: using crc32",
                     kv(migration=mid, vm=vm_id, peer=peer), version, cfg.checksum)
        with m.phase("plan"), trio.fail_after(cfg.phase_timeout):
            try:
                pregs = profile_regsets(mvm.vcpus, pol)
            except KvmError as e:
                raise PeerError("vm", f"cannot read the source VM: {e}") from None
            vm = vm_profile(vm_id, mvm.init, pregs, registry.backend, pol)
            plan = (planner or negotiate)(vm, dest, pol)
            m.record_verdicts(e.verdict.value for e in plan.entries if not e.field)
            if on_plan is not None:
                on_plan(plan)
            if not plan.migratable:
                raise PeerError("plan", f"plan refused for {dest.name}: {refusal_reasons(plan)}")
            prop = ps.PlanProposal(mid, vm_id, len(mvm.vcpus), PLAN_FORMAT, S.plan_to_bytes(plan), plan.digest,
                                   S.vm_to_bytes(vm))
            journal.begin(mid, vm_id, "source", peer, plan.digest)
            begun = True
            await failpoints.hit("source.proposed")
            await conn.send(prop)
            await conn.expect(ps.PlanAccept)
        with m.phase("preflight"), trio.fail_after(cfg.apply_timeout):
            pf = await conn.expect(ps.Preflight)
        if not pf.ok:
            raise PeerError("preflight", f"destination refused the plan in pre-flight: {pf.detail}")
        # --- blackout starts: the VM is runnable nowhere until the destination commits or we resume it
        # On real KVM the chunks of every cfg.pipeline_vcpus vCPUs read go at once while worker threads read on
        # (peer/pipeline.py), so that the destination applies them meanwhile - when it is another machine: a
        # peer on this host shares our CPUs, nothing overlaps, and the interleaving only costs (~5% measured).
        # The simulated host (pure Python: no overlap to gain) reads every vCPU first. Either way the StreamEnd
        # goes only once every vCPU is read and the VM is the one the plan was computed for - else Abort: the
        # destination discards what it applied.
        pipelined = cfg.pipeline_vcpus > 0 and threaded(registry.backend) and (
            cfg.pipeline_same_host or not same_host(stream))
        with m.phase("read"), trio.fail_after(cfg.phase_timeout):
            journal.step(mid, "paused")
            mvm.migration, mvm.peer = mid, peer
            mvm.pause()
            paused = True
            await failpoints.hit("source.paused")
            regsets: dict = {}
            try:
                if not pipelined:
                    regsets = await read_vm_async(mvm.vcpus, registry.backend)
                else:
                    order = sorted(mvm.vcpus)
                    reader = BackgroundRead(mvm.vcpus, order, worker_threads())
                    try:
                        step = cfg.pipeline_vcpus
                        for k in range(0, len(order), step):
                            part = await reader.take(order[k:k + step])
                            regsets.update(part)
                            await conn.send_prepared(conn.prepare(_chunks(
                                vm_id, part, cfg.chunk_registers, checksum, version, cfg.chunk_bytes)),
                                max(1, cfg.send_batch_bytes), cfg.phase_timeout, cfg.first_batch_bytes)
                    finally:
                        await reader.close()
            except KvmError as e:
                raise PeerError("vm", f"cannot read the paused source VM: {e}") from None
            changed = profile_changes(vm, vm_profile(vm_id, mvm.init, profile_view(regsets, pol),
                                                     registry.backend, pol))
            if changed:
                raise PeerError("vm", "the VM changed between plan and pause (the plan no longer describes it; "
                                      "migrate again): " + "; ".join(changed))
            chunks = () if pipelined else _chunks(vm_id, regsets, cfg.chunk_registers, checksum, version,
                                                  cfg.chunk_bytes)
            # the chunks (not sent yet), then their StreamEnd (made once they all went through the session)
            stream_bytes = conn.prepare(itertools.chain(chunks, _later(conn.session.stream_end)))
            end = stream_bytes.events[-1][1]
            del regsets, chunks
        with m.phase("stream"):
            await conn.send_prepared(stream_bytes, max(1, cfg.send_batch_bytes), cfg.phase_timeout,
                                     cfg.first_batch_bytes)
            del stream_bytes
            await failpoints.hit("source.streamed")
        with m.phase("apply"), trio.fail_after(cfg.apply_timeout):
            await conn.expect(ps.Commit)
        with m.phase("commit"):
            journal.step(mid, "released")   # written before our Commit can leave: an Inquiry never hears less
            mvm.release()              # never runnable here again: the destination may now run it
            released = True
            try:
                await failpoints.hit("source.released")
                with trio.fail_after(cfg.commit_timeout):
                    await conn.send(ps.Commit(mid, end.digest))
                    await failpoints.hit("source.committed")
                    if (conn.session.version or 1) >= ps.ACKED_COMMIT_SINCE:
                        await conn.expect(ps.Commit)     # the destination runs it: only now is it committed
            except BaseException as e:
                journal.decide(mid, "in-doubt", f"released; no acknowledgement of our Commit: {_describe(e)}")
                m.migration("in-doubt")
                log.error("migration in doubt %s: released, but the destination did not acknowledge our Commit "
                          "(%s): it runs the VM, or keeps it paused in-doubt (resolved by asking it)",
                          kv(migration=mid, vm=vm_id, peer=peer), _wrap(e) or _describe(e))
                raise PeerError("in-doubt", f"VM {vm_id} released; no acknowledgement of our Commit: the destination "
                                            f"runs it or holds it paused in-doubt: {_wrap(e) or _describe(e)}") from e
        journal.step(mid, "acked")
        journal.decide(mid, "committed")
        if (conn.session.version or 1) >= ps.ACKED_COMMIT_SINCE:
            registry.free_released(vm_id, f"the destination {peer or ''} acknowledged: it runs the VM")
        m.migration("committed")
        log.info("migration committed %s: the destination runs the VM", kv(migration=mid, vm=vm_id, peer=peer))
        return MigrationResult(mid, vm_id, "committed", [], end.digest)
    except BaseException as e:
        if released:
            raise
        err = _wrap(e)
        if begun:                      # before the resume: an Inquiry from an in-doubt destination hears "aborted"
            journal.decide(mid, "aborted", str(err) if err else _describe(e))
        if paused:
            mvm.resume()               # the VM never left: keep running here
        await conn.abort_quietly(str(err) if err else _describe(e), err.kind if err else "source")
        m.migration("aborted")
        unreachable = isinstance(err, PeerError) and err.kind in ("closed", "timeout", "tls")
        log.log(logging.ERROR if unreachable else logging.WARNING, "migration aborted %s: VM %s here%s: %s",
                kv(migration=mid, vm=vm_id, peer=peer), "resumed" if paused else "kept running (never paused)",
                " (the peer stopped answering)" if unreachable else "", err or _describe(e))
        if err is not None and err is not e:
            raise err from e
        raise
