"""The destination side (handle_incoming): capabilities, plan check, pre-flight, receive and apply, commit; and the
answer to a peer's inquiry about a migration."""
from __future__ import annotations

import logging
from typing import Callable

import trio

from ...protocol import kvmabi as abi
from ...protocol import schemas as S
from ...protocol import session as ps
from ...protocol.negotiate import negotiate
from ...protocol.policy import Policy, default_policy
from ...protocol.program import compile_plan
from .. import failpoints
from ..apply import ApplyError, EventAction, apply_vm_async
from ..staged import NeedsFullApply, StagedApply
from ..readback import plan_deviations
from ..kvm.backend import Backend
from ..kvm.errors import KvmError
from ..logs import kv
from ..metrics import Metrics
from ..vms import ManagedVm, VmRegistry, VmState
from .chunks import _regsets, stream_estimate
from .receive import StreamApplier
from .link import (CAPS_FORMAT, CAPS_ONLY, PLAN_FORMAT, Conn, MigrationResult, PeerConfig, PeerError, _describe,
                   _wrap)
from ..vmprofile import explain_mismatch, host_capabilities, refusal_reasons

log = logging.getLogger("invariantd.peer")


def _features(vm: S.VmProfile) -> tuple[int, ...] | None:
    try:
        return tuple(abi.VCPU_FEATURES[f] for f in vm.features) or None
    except KeyError as e:
        raise PeerError("plan", f"unknown vCPU feature {e.args[0]!r} in the VM profile") from None


def apply_report(events) -> tuple[list, list]:
    """(events metrics count, read-back adjustments): "readback-adjusted" events are no SET_ONE_REG failure;
    they are logged and returned with the migration result instead."""
    counted = [e for e in events if e.action != EventAction.READBACK_ADJUSTED]
    adjusted = [e for e in events if e.action == EventAction.READBACK_ADJUSTED]
    return counted, adjusted


def _by_register(events) -> dict[str, list]:
    out: dict[str, list] = {}
    for e in events:
        out.setdefault(e.register, []).append(e)
    return out


PlanChecker = Callable[[S.Plan, S.VmProfile], None]


def answer_inquiry(registry: VmRegistry, q: ps.Inquiry) -> ps.Answer:
    """What this daemon decided for migration q.migration_id (its journal) and holds of q.vm_id now."""
    rec = registry.journal.migration(q.migration_id)
    if rec is not None and rec.vm != q.vm_id:
        rec = None                           # a migration of another VM: no record of this one
    held = registry.vms.get(q.vm_id)
    return ps.Answer(q.migration_id, q.vm_id, rec.outcome if rec else "", rec.phase if rec else "",
                     held.state.value if held is not None else "")


async def handle_incoming(stream: trio.abc.Stream, peer: str, *, backend: Backend, registry: VmRegistry,
                          caps_doc: dict, cfg: PeerConfig = PeerConfig(), metrics: Metrics | None = None,
                          plan_checker: PlanChecker | None = None,
                          policy: Policy | None = None,
                          preplan_slots: trio.Semaphore | None = None) -> MigrationResult | None:
    """Destination side of one connection. Returns the result, or None when the migration did not complete
    (the reason is logged and was sent to the source).

    caps_doc: this host's capability document (daemon/probe.py); sent as HostCapabilities and used to
    recompute the plan. policy: the negotiation policy (default: the shipped one; must be the source's).
    plan_checker(plan, vm_profile): an extra veto after the plan was agreed (raise ValueError to refuse).
    preplan_slots: connections that may be before their plan at once (each may buffer a pre-plan frame, up to
    Limits.max_preplan_frame_bytes); the others wait, their bytes in the kernel, up to the handshake timeout."""
    conn = Conn(stream, ps.Session(ps.DESTINATION, cfg.limits, cfg.versions), metrics)
    m = metrics or Metrics()
    pol = policy or default_policy()
    journal = registry.journal
    result = None
    mvm: ManagedVm | None = None
    committed = begun = False
    staged: StagedApply | None = None
    rx: StreamApplier | None = None
    slot = [None]

    def release_slot() -> None:
        if slot[0] is not None:
            slot[0].release()
            slot[0] = None
    try:
        if preplan_slots is not None:
            with trio.fail_after(cfg.handshake_timeout):
                await preplan_slots.acquire()
            slot[0] = preplan_slots
        try:
            host = await trio.to_thread.run_sync(host_capabilities, caps_doc, backend, pol)
        except S.SchemaError as e:
            raise PeerError("plan", f"this host's capability document cannot be negotiated: {e}") from None
        except KvmError as e:
            raise PeerError("plan", f"cannot list this host's registers: {e}") from None
        with m.phase("handshake"), trio.fail_after(cfg.handshake_timeout):
            await conn.expect(ps.Hello)
            await conn.send(ps.Hello(cfg.versions, ps.DESTINATION, cfg.node))
            await conn.send(ps.Capabilities(CAPS_FORMAT, S.host_to_bytes(host)))
        with m.phase("plan"), trio.fail_after(cfg.phase_timeout):
            prop = await conn.expect(ps.PlanProposal, ps.Inquiry)
            if isinstance(prop, ps.Inquiry):
                ans = answer_inquiry(registry, prop)
                release_slot()
                await conn.send(ans)
                log.info("inquiry answered %s: %s at %s, VM %s here", kv(migration=ans.migration_id, vm=ans.vm_id,
                                                                          peer=peer),
                         ans.outcome or "no record", ans.phase or "-", ans.vm_state or "not held")
                return None
            try:
                held = registry.vms.get(prop.vm_id)
                if held is not None and held.state is not VmState.RELEASED:
                    raise ValueError(f"a VM named {prop.vm_id!r} is already held here ({held.state.value}); rename or "
                                     f"remove one of them")
                if prop.format != PLAN_FORMAT:
                    raise ValueError(f"plan format {prop.format!r} is not understood here (want {PLAN_FORMAT})")
                try:
                    vm = S.vm_from_bytes(prop.vm_profile)
                except S.SchemaError as e:
                    raise ValueError(f"VM profile: {e}") from None
                plan = negotiate(vm, host, pol)
                m.record_verdicts(e.verdict.value for e in plan.entries if not e.field)
                if not plan.migratable:
                    raise ValueError(f"refused here: {refusal_reasons(plan)}")
                if plan.digest != prop.digest:
                    try:
                        theirs = S.plan_from_bytes(prop.plan)
                    except S.SchemaError:
                        theirs = None
                    raise ValueError(f"plan digest mismatch (source {prop.digest.hex()[:16]}, destination "
                                     f"{plan.digest.hex()[:16]}): {explain_mismatch(plan, theirs)}")
                feats = _features(vm)
                apply_program = compile_plan(plan, vm)
                if plan_checker is not None:
                    plan_checker(plan, vm)
            except ValueError as e:
                raise PeerError("plan", f"plan refused: {e}") from None
            journal.begin(prop.migration_id, prop.vm_id, "destination", peer, plan.digest)
            begun = True
            release_slot()
            await failpoints.hit("destination.accepted")
            await conn.send(ps.PlanAccept(prop.migration_id, plan.digest))
        with m.phase("preflight"), trio.fail_after(cfg.apply_timeout):
            # The destination VM itself, built while the source's VM still runs: every vCPU created, the plan's
            # VM-wide registers written (the profile's values through the program, the same retry path as any
            # apply), the profile's other registers trialled on vCPU 0, read back (staged.StagedApply)
            staged = StagedApply(backend, prop.vcpus, vm.values, apply_program, features=feats)
            try:
                trial = await trio.to_thread.run_sync(staged.prepare)
                bad = [str(x) for x in trial.mismatches] + plan_deviations(plan, trial.written[0],
                                                                          trial.dropped[0])
                ok, detail = not bad, "; ".join(bad) or "ok"
                evs = tuple(f"{e.register} {e.errno} {e.action}" for e in trial.events)
            except ApplyError as e:
                ok, detail, evs = False, str(e), tuple(f"{x.register} {x.errno} {x.action}" for x in e.events)
            if ok:                          # memory for the stream, taken while the source's VM still runs
                conn.session.reserve(stream_estimate(vm, prop.vcpus, conn.session.version or 1))
            else:
                staged.close()
            await conn.send(ps.Preflight(ok, detail, evs))
            if not ok:
                ev = await conn.receive()          # the source aborts; anything else is its problem
                raise PeerError("preflight", f"pre-flight failed: {detail}" + (
                    "" if isinstance(ev, ps.Abort) else f" (source sent {type(ev).__name__})"))
        rx = StreamApplier(staged, vm)
        with m.phase("stream"):
            while True:
                with trio.fail_after(cfg.phase_timeout):
                    ev = await conn.expect(ps.VcpuChunk, ps.StreamEnd)
                if isinstance(ev, ps.StreamEnd):
                    break
                rx.chunk(ev)            # checked (checksum, order, digest); applied once its vCPUs are complete
            rx.end()
        await failpoints.hit("destination.streamed")
        with m.phase("apply"), trio.fail_after(cfg.apply_timeout):
            try:
                await rx.wait()
                res = await staged.finish()
            except NeedsFullApply:      # ID registers frozen (EBUSY): everything anew on a fresh VM, in order
                staged.close()
                regsets = await trio.to_thread.run_sync(_regsets, rx.received)
                res = await apply_vm_async(backend, regsets, apply_program, features=feats)
                res.events[:0] = staged.events
            counted, adjusted = apply_report(res.events)
            m.record_apply_events(counted)
            for reg, evs in _by_register(adjusted).items():     # one line per register, not per vCPU
                log.warning("read back differently %s: %s on %d vCPU(s) (KVM adjusts it); vCPU %s: %s",
                            kv(migration=prop.migration_id, vm=prop.vm_id, peer=peer), reg, len(evs), evs[0].vcpu,
                            evs[0].detail)
            bad = [str(x) for x in res.mismatches[:8]]
            for i in sorted(res.written):
                bad += plan_deviations(plan, res.written[i], res.dropped[i], vcpu=i)
                if len(bad) >= 8:
                    break
            if bad:
                res.close()
                raise PeerError("apply", "applied state differs from the plan / read-back: " + "; ".join(bad[:8]))
            journal.step(prop.migration_id, "applied")     # before our Commit can leave (journal.py)
            mvm = registry.adopt(prop.vm_id, res.vm, res.vcpus, None, VmState.INCOMING, migration=prop.migration_id,
                                 peer=peer)
        with m.phase("commit"):
            digest = conn.session.stream_digest
            committed = True                 # from here the source may have our Commit: never discard unasked
            await failpoints.hit("destination.applied")
            await conn.send(ps.Commit(prop.migration_id, digest))
            await failpoints.hit("destination.committed")
            with trio.fail_after(cfg.commit_timeout):
                await conn.expect(ps.Commit)
            journal.step(prop.migration_id, "running")
            journal.decide(prop.migration_id, "committed")
            mvm.resume()                     # the source released it: this host runs the VM now
            await failpoints.hit("destination.running")
            if (conn.session.version or 1) >= ps.ACKED_COMMIT_SINCE:
                try:
                    with trio.fail_after(cfg.commit_timeout):
                        await conn.send(ps.Commit(prop.migration_id, digest))     # "received: it runs here"
                except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    log.warning("acknowledgement lost %s: the VM runs here, the source reports it in doubt until "
                                "it asks (%s)", kv(migration=prop.migration_id, vm=prop.vm_id, peer=peer),
                                _describe(e))
        m.migration("committed")
        log.info("migration committed %s: the VM runs here", kv(migration=prop.migration_id, vm=prop.vm_id,
                                                                  peer=peer))
        result = MigrationResult(prop.migration_id, prop.vm_id, "committed", res.events, digest)
        return result
    except BaseException as e:
        err = _wrap(e)
        if staged is not None and mvm is None:   # the VM built for this migration, never adopted: closed once no
            with trio.CancelScope(shield=True):  # worker thread can still be using it
                if rx is not None:
                    await rx.drain(stop=True)
            staged.close()
        if isinstance(err, PeerError) and err.kind == "aborted" and err.code == CAPS_ONLY and mvm is None:
            log.info("capabilities sent %s (caps-only fetch, no migration)", kv(peer=peer))
            return None
        source_kept = (isinstance(err, PeerError) and err.kind == "aborted"
                       and conn.session.aborted_by == ps.SOURCE)   # its Abort: it never released the VM
        if mvm is not None and committed and mvm.state is VmState.RUNNING:
            log.warning("acknowledgement lost %s: the VM runs here: %s",
                        kv(migration=prop.migration_id, vm=mvm.vm_id, peer=peer), err or _describe(e))
            m.migration("committed")
            if err is None:
                raise
            return MigrationResult(prop.migration_id, prop.vm_id, "committed", [], conn.session.stream_digest)
        if mvm is not None and committed and not source_kept:
            journal.decide(prop.migration_id, "in-doubt", str(err) if err else _describe(e))
            mvm.in_doubt()                   # the source may have released it: keep it paused, never discard
            m.migration("in-doubt")
            log.error("migration in doubt %s: kept paused until the source answers: %s",
                      kv(migration=prop.migration_id, vm=mvm.vm_id, peer=peer), err or _describe(e))
        else:
            if begun:
                journal.decide(prop.migration_id, "aborted", str(err) if err else _describe(e))
            if mvm is not None:
                registry.remove(mvm.vm_id, "discarded: the source aborted and kept the VM" if source_kept else
                                "discarded: the migration aborted before our Commit")
            m.migration("aborted")
            log.warning("incoming migration aborted %s: %s", kv(migration=prop.migration_id if begun else "",
                                                                 vm=prop.vm_id if begun else "", peer=peer),
                        err or _describe(e))
        await conn.abort_quietly(str(err) if err else _describe(e), err.kind if err else "destination")
        if err is None:
            raise                             # a bug or cancellation: let it propagate
        return None
    finally:
        release_slot()
