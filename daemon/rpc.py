"""The orchestrator RPC service: protocol/schemas/rpc.capnp served with pycapnp's own RPC, bridged to trio.

pycapnp 2.x RPC runs on asyncio only (stack-check.md §1.3), so the service is split in two (option (ii),
§7.2 there):

  capnp thread (asyncio + KJ loop)           trio (the daemon's root nursery)
  ------------------------------------       ------------------------------------------------------------
  _Impl: one coroutine per RPC method  --->  Orchestrator: VMs, plans, migrations (migrate_out), peers
         (Bridge.to_trio: TrioToken)   <---  plain data back (dicts, bytes); RpcFailure(kind, message)

Every Cap'n Proto object stays on the capnp thread; only plain Python data crosses. Errors travel typed in
each result's `error` field (ErrorKind); a Cap'n Proto exception only ever means a daemon bug.
Listeners, the relay and the thread: daemon/rpcserve.py; the Cap'n Proto Impl: daemon/rpcimpl.py; which role may
call which method: daemon/rpcaccess.py; a migration's record and progress tap: daemon/migrations.py.

Migrations run as trio tasks in the service's nursery, each in its own cancel scope (cancel()). Progress
(phase, bytes, vCPUs streamed) is read off the peer stream by a tap that decodes the peer protocol's frames
(ProgressStream), so migrate_out needs no progress hook.
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

import trio

from ..protocol import kvmabi as abi
from ..protocol import schemas as S
from ..protocol.negotiate import negotiate
from ..protocol.policy import default_policy
from . import memory
from . import peer as peer_mod
from . import tls
from .readback import read_vm
from .config import Config, PeerEntry
from .kvm.backend import VcpuInit
from .kvm.errors import KvmError
from .logs import kv
from .metrics import Metrics
from .migrations import Migration, ProgressStream
from .probe import describe
from .rpcaccess import Caller
from .resolve import ResolveError, Resolver
from .vms import ManagedVm, VmRegistry, VmStateError
from .vmm.service import VmmError, VmmService

log = logging.getLogger("invariantd.rpc")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_VCPUS = 512
MAX_VMS = 256                   # VMs one daemon holds (createVm refuses beyond)
FINISHED = ("committed", "failed", "cancelled", "inDoubt")
KEEP_FINISHED = 200


class RpcFailure(Exception):
    """A request the daemon refuses or could not carry out. kind: an ErrorKind name of rpc.capnp."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


# PeerError.kind (daemon/peer/) -> ErrorKind
PEER_KINDS = {"plan": "refused", "tls": "unreachable", "preflight": "kvm", "apply": "kvm", "vm": "kvm",
              "protocol": "migrationFailed", "aborted": "migrationFailed", "timeout": "migrationFailed",
              "closed": "migrationFailed", "in-doubt": "migrationFailed"}


# --- the service (trio side) -----------------------------------------------------------------------------------
def vm_profile_of(mvm: ManagedVm, regsets, backend, policy) -> S.VmProfile:
    """The negotiation input for a VM held here (the peer module's definition when it has one, so the plan
    shown by `plan` has the digest migrate_out will propose)."""
    return peer_mod.vm_profile(mvm.vm_id, mvm.init, regsets, backend, policy)


def host_doc_from_caps(h: S.HostCapabilities) -> dict:
    """A capability document rebuilt from a HostCapabilities struct (peer link): enough for plan --to."""
    return {"format": S.HOST_FORMAT, "source": "peer", "profile": h.profile or None, "arch": h.arch,
            "kernel_release": h.kernel_release, "kernel_version": h.kernel_version, "caps": dict(h.caps),
            "cpu_midrs": [f"{m:#x}" for m in h.cpu_midrs],
            "vcpu_init": {"target": h.vcpu_target, "base_features": list(h.base_features)},
            "reg_list": [f"{r:#x}" for r in h.reg_list], "values": {f"{r:#x}": f"{v:#x}" for r, v in h.values},
            "writable_masks": None if h.writable_masks is None else
            {str(i): f"{m:#x}" for i, m in enumerate(h.writable_masks) if m}, "errors": []}


class Orchestrator:
    """What the RPC methods do, in trio. Every method returns plain data or raises RpcFailure."""

    def __init__(self, cfg: Config, *, backend, registry: VmRegistry, caps: dict, metrics: Metrics,
                 peer_cfg: peer_mod.PeerConfig, client_ctx, rpc_client_ctx=None, vmm: VmmService | None = None,
                 resolver=None) -> None:
        self.cfg, self.backend, self.registry, self.caps_doc = cfg, backend, registry, caps
        self.metrics, self.peer_cfg, self.client_ctx, self.rpc_client_ctx = metrics, peer_cfg, client_ctx, \
            rpc_client_ctx
        self.migrations: dict[str, Migration] = {}
        self.nursery: trio.Nursery | None = None
        self.policy = default_policy()
        self.vmm = vmm
        self.resolver = resolver if resolver is not None else Resolver(registry, cfg.peers, client_ctx, peer_cfg)
        self.owners: dict[str, str] = {}      # VM -> the caller that created it (quotas)
        self._peer_clients: dict = {}        # peer name -> an open RPC client (QEMU migrations poll the peer)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Owns the nursery migrations run in; until cancelled."""
        try:
            async with trio.open_nursery() as n:
                self.nursery = n
                task_status.started()
                await trio.sleep_forever()
        finally:
            for c, _ in self._peer_clients.values():
                c.close()
            self._peer_clients.clear()

    @property
    def inflight(self) -> int:
        return sum(1 for m in self.migrations.values() if m.state == "running")

    # --- peers
    def _peer(self, name: str) -> PeerEntry:
        p = self.cfg.find_peer(name)
        if p is not None:
            return p
        known = ", ".join(x.name for x in self.cfg.peers) or "none configured ([peers] in the config)"
        raise RpcFailure("notFound", f"no peer named {name!r} (known: {known})")

    async def peers(self) -> dict:
        return {"node": self.cfg.node,
                "peers": [{"name": p.name, "address": p.address, "rpc": p.rpc} for p in self.cfg.peers]}

    async def _peer_host(self, p: PeerEntry) -> tuple[dict, S.HostCapabilities | None]:
        """The peer's capability document (and as HostCapabilities when it is arm64): over its RPC when
        configured, else over the peer link (Hello -> Capabilities -> Abort "caps-only")."""
        if p.rpc:
            from .rpcclient import Client, RpcError

            def fetch():
                with Client(p.rpc, self.rpc_client_ctx, timeout=self.cfg.timeouts.handshake,
                            server_hostname=p.server_name or None) as c:
                    return c.caps()
            try:
                doc = await trio.to_thread.run_sync(fetch)
            except RpcError as e:
                raise RpcFailure("unreachable" if e.kind in ("unreachable", "internal") else e.kind,
                                 f"peer {p.name} (RPC {p.rpc}): {e.message}") from None
        else:
            doc, _ = await self._caps_over_peer_link(p)
        host = None
        if doc.get("arch") == "aarch64":
            try:
                host = S.host_from_doc(doc, frozenset(self.policy.drift))
            except S.SchemaError as e:
                raise RpcFailure("migrationFailed", f"peer {p.name} sent unusable capabilities: {e}") from None
        return doc, host

    async def _connect(self, p: PeerEntry) -> trio.SSLStream:
        try:
            return await tls.connect(p.host, p.port, self.client_ctx, server_hostname=p.server_name or p.host,
                                     timeout=self.cfg.timeouts.handshake)
        except tls.TlsError as e:
            raise RpcFailure("unreachable", f"peer {p.name}: {e}") from None

    async def _caps_over_peer_link(self, p: PeerEntry) -> tuple[dict, S.HostCapabilities | None]:
        stream = await self._connect(p)
        try:
            cev = await peer_mod.fetch_capabilities(stream, cfg=self.peer_cfg)
        except peer_mod.PeerError as e:
            kind = "unreachable" if e.kind in ("timeout", "closed") else "migrationFailed"   # protocol, aborted
            why = "did not send its capabilities in time" if e.kind == "timeout" else str(e)
            raise RpcFailure(kind, f"peer {p.name}: {why}") from None
        finally:
            await trio.aclose_forcefully(stream)
        if "json" in cev.format:
            return json.loads(cev.doc), None
        h = peer_mod.decode_caps(cev)
        return host_doc_from_caps(h), h

    # --- capabilities, VMs
    async def caps(self, host: str = "") -> dict:
        if not host or host == self.cfg.node:
            return self.caps_doc
        doc, _ = await self._peer_host(self._peer(host))
        return doc

    def _vm(self, name: str) -> ManagedVm:
        try:
            return self.registry.get(name)
        except VmStateError as e:
            raise RpcFailure("notFound", str(e)) from None

    def _info(self, m: ManagedVm, detail: bool = False) -> dict:
        names = {v: k for k, v in abi.VCPU_FEATURES.items()}
        d = {"name": m.vm_id, "state": m.state.value, "vcpus": m.n_vcpus,
             "features": [names.get(f, str(f)) for f in (m.init.features if m.init else ())],
             "arch": self.backend.arch, "origin": getattr(m, "origin", ""), "history": list(m.history),
             "id_registers": [], "register_count": 0, "waiting": self.resolver.waiting.get(m.vm_id, ""),
             "migration": m.migration, "peer": m.peer}
        if detail and m.vcpus:
            v0 = m.vcpus[min(m.vcpus)]
            try:
                ids = v0.reg_list()
                d["register_count"] = len(ids)
                if self.backend.arch == "aarch64":
                    regs, errs = v0.get_regs(ids)
                    vals = regs.values()
                    for r in describe(ids, {i: x for i, x, e in zip(ids, vals, errs) if not e}, None):
                        d["id_registers"].append({"name": r["name"], "id": int(r["id"], 16),
                                                  "value": int(r["value"], 16),
                                                  "fields": " ".join(f"{k}={v:#x}" for k, v in r["fields"].items()
                                                                     if v)})
            except KvmError as e:
                raise RpcFailure("kvm", f"inspect {m.vm_id}: {e}") from None
        return d

    async def list_vms(self) -> list[dict]:
        return [self._info(m) for _, m in sorted(self.registry.vms.items())]

    async def inspect_vm(self, name: str) -> dict:
        return self._info(self._vm(name), detail=True)

    async def remove_vm(self, name: str) -> dict:
        try:
            self.registry.forget(name)
        except VmStateError as e:
            raise RpcFailure("notFound" if name not in self.registry.vms else "conflict", str(e)) from None
        log.info("VM removed by request %s", kv(vm=name))
        return {}

    async def resolve_vm(self, name: str, peer: str, action: str) -> dict:
        """Resolve an in-doubt / released VM after asking the peer over the peer link (Inquiry) what it holds
        (vms.resolution's rule)."""
        m = self._vm(name)
        mid = m.migration or getattr(self.registry.journal.last_migration_of(name), "id", "")
        try:
            ans = await self.resolver.ask(peer, mid, name)
        except ResolveError as e:
            raise RpcFailure("unreachable", f"cannot ask {peer} about VM {name}: {e}") from None
        theirs = ans.vm_state or None
        try:
            m = self.registry.resolve(name, theirs, action)
        except VmStateError as e:
            raise RpcFailure("conflict", str(e)) from None
        if mid:
            # the migration committed when the VM ends up at its destination: resumed there, or discarded here
            # at the source; it aborted when the source keeps (reclaims) it or the destination drops its copy
            at_destination = m.origin == "incoming"
            ended_at_destination = (action == "resume") if at_destination else (action == "discard")
            self.registry.journal.decide(mid, "committed" if ended_at_destination else "aborted",
                                         f"resolved by request: {action} here ({peer} holds it "
                                         f"{theirs or 'not at all'})")
        log.warning("resolved by request %s: %s here (the peer holds it %s)", kv(migration=mid, vm=name, peer=peer),
                    action, theirs or "not at all")
        return self._info(m) if action == "resume" else {"name": name, "state": "removed"}

    async def create_vm(self, name: str, n_vcpus: int, features: list[str], caller: Caller | None = None) -> dict:
        if not NAME_RE.match(name or ""):
            raise RpcFailure("badRequest", f"VM name {name!r}: 1-64 characters of A-Z a-z 0-9 . _ -, "
                                           f"starting with a letter or digit")
        if not 1 <= n_vcpus <= MAX_VCPUS:
            raise RpcFailure("badRequest", f"nVcpus {n_vcpus} outside 1..{MAX_VCPUS}")
        if name in self.registry.vms:
            raise RpcFailure("conflict", f"VM {name} exists here (state {self.registry.vms[name].state.value})")
        held = sum(1 for m in self.registry.vms.values() if m.state.value != "released")
        if held >= MAX_VMS:
            raise RpcFailure("conflict", f"this daemon already holds {held} VMs (at most {MAX_VMS}): remove one first")
        if caller is not None:
            mine = [m for n, m in self.registry.vms.items() if self.owners.get(n) == caller.name
                    and m.state.value != "released"]
            vms_max, vcpus_max = self.cfg.rpc.max_vms_per_caller, self.cfg.rpc.max_vcpus_per_caller
            if len(mine) + 1 > vms_max or sum(m.n_vcpus for m in mine) + n_vcpus > vcpus_max:
                raise RpcFailure("forbidden", f"{caller.name} holds {len(mine)} VMs / "
                                              f"{sum(m.n_vcpus for m in mine)} vCPUs here; one more of {n_vcpus} "
                                              f"vCPU(s) exceeds its quota ({vms_max} VMs, {vcpus_max} vCPUs: "
                                              f"rpc.max_vms_per_caller / max_vcpus_per_caller)")
        init = None
        if features:
            if self.backend.arch != "aarch64":
                raise RpcFailure("badRequest", "vCPU features are arm64 vCPU init features; this host is "
                                               f"{self.backend.arch}")
            bad = [f for f in features if f not in abi.VCPU_FEATURES]
            if bad:
                raise RpcFailure("badRequest", f"unknown vCPU feature(s) {', '.join(bad)} "
                                               f"(known: {', '.join(abi.VCPU_FEATURES)})")
            target = (self.caps_doc.get("vcpu_init") or {}).get("target", 0)
            init = VcpuInit(target, tuple(sorted(abi.VCPU_FEATURES[f] for f in features)))
        try:
            m = await trio.to_thread.run_sync(lambda: self.registry.create(name, n_vcpus, init))
        except KvmError as e:
            raise RpcFailure("kvm", f"create {name}: {e}") from None
        except VmStateError as e:
            raise RpcFailure("conflict", str(e)) from None
        if caller is not None:
            self.owners[name] = caller.name
            for gone in set(self.owners) - set(self.registry.vms):
                del self.owners[gone]
        log.info("VM created %s: %d vCPU(s)", kv(vm=name, caller=caller.name if caller else ""), n_vcpus)
        return self._info(m)

    # --- plan
    async def plan(self, vm: str, to_host: str) -> dict:
        m = self._vm(vm)
        p = self._peer(to_host)
        try:
            regsets = await trio.to_thread.run_sync(lambda: read_vm(m.vcpus))
        except KvmError as e:
            raise RpcFailure("kvm", f"cannot read VM {vm}: {e}") from None
        if self.backend.arch == "aarch64":
            doc, host = await self._peer_host(p)
            if host is None:
                raise RpcFailure("refused", f"peer {p.name} is {doc.get('arch')}: an arm64 VM cannot move there")
        else:
            # generic plan (protocol/generic.py): it needs the destination's register list, which
            # the peer link's HostCapabilities carries (the daemon lists a fresh vCPU's registers there)
            _, host = await self._caps_over_peer_link(p)
            if host is None:
                raise RpcFailure("migrationFailed", f"peer {p.name} sent its capabilities in a format without "
                                                    f"a register list")
        profile = vm_profile_of(m, regsets, self.backend, self.policy)
        plan = negotiate(profile, host, self.policy)
        return {"migratable": plan.migratable, "digest": plan.digest,
                "json": json.dumps(S.plan_to_doc(plan), indent=1).encode(), "plan_bytes": S.plan_to_bytes(plan),
                "destination": p.name}

    async def vm_profile(self, vm: str) -> dict:
        """The VM profile document (schemas.vm_to_doc) of a VM held here, read from its vCPUs now."""
        m = self._vm(vm)
        try:
            regsets = await trio.to_thread.run_sync(lambda: read_vm(m.vcpus))
        except KvmError as e:
            raise RpcFailure("kvm", f"cannot read VM {vm}: {e}") from None
        return S.vm_to_doc(vm_profile_of(m, regsets, self.backend, self.policy))

    # --- migrations
    def _mig(self, mid: str) -> Migration:
        m = self.migrations.get(mid)
        if m is None:
            raise RpcFailure("notFound", f"no migration {mid!r} here")
        return m

    async def migrate(self, vm: str, to_host: str) -> str:
        m = self._vm(vm)
        p = self._peer(to_host)
        if not m.runnable:
            raise RpcFailure("conflict", f"VM {vm} is {m.state.value} here: only a running VM can migrate out")
        for x in self.migrations.values():
            if x.vm == vm and x.state == "running":
                raise RpcFailure("conflict", f"VM {vm} is already migrating ({x.id})")
        if self.nursery is None:
            raise RpcFailure("internal", "the migration service is not running")
        mig = Migration(uuid.uuid4().hex, vm, p.name, len(m.vcpus))
        self.migrations[mid := mig.id] = mig
        self._trim()
        self.nursery.start_soon(self._run_migration, mig, p)
        log.info("migration started %s: to %s", kv(migration=mid, vm=vm, peer=p.name), p.address)
        return mid

    def _trim(self) -> None:
        done = [k for k, v in self.migrations.items() if v.state in FINISHED]
        for k in done[:-KEEP_FINISHED]:
            del self.migrations[k]

    async def _run_migration(self, mig: Migration, p: PeerEntry) -> None:
        kw: dict[str, Any] = {"cfg": self.peer_cfg, "metrics": self.metrics, "migration_id": mig.id,
                              "on_plan": lambda plan: setattr(mig, "plan_digest", plan.digest),
                              "on_event": mig.on_event, "peer": p.name}
        try:
            with mig.scope:
                try:
                    stream = await self._connect(p)
                    try:
                        await peer_mod.migrate_out(ProgressStream(stream, mig), self.registry, mig.vm, **kw)
                    finally:
                        await trio.aclose_forcefully(stream)
                    mig.state, mig.result, mig.phase = "committed", "committed", "done"
                except RpcFailure as e:
                    mig.error = (e.kind, e.message)
                except peer_mod.PeerError as e:
                    # the destination refusing the plan is a refusal here too (exit 3), not a failed migration
                    kind = "plan" if e.kind == "aborted" and e.code == "plan" else e.kind
                    mig.error = (PEER_KINDS.get(kind, "migrationFailed"), str(e))
                    if e.kind == "in-doubt":
                        mig.state, mig.result = "inDoubt", "in-doubt"
                except VmStateError as e:
                    mig.error = ("conflict", str(e))
                except KvmError as e:
                    mig.error = ("kvm", str(e))
                except Exception as e:      # a bug: keep the daemon up, say so
                    log.exception("migration failed unexpectedly %s", kv(migration=mig.id, vm=mig.vm, peer=mig.to))
                    mig.error = ("internal", f"{type(e).__name__}: {e}")
            if mig.scope.cancelled_caught:
                vm = self.registry.vms.get(mig.vm)
                released = vm is not None and vm.state.value == "released"
                mig.state, mig.result = ("inDoubt", "in-doubt") if released else ("cancelled", "cancelled")
                mig.error = ("migrationFailed", "cancelled by request" + (
                    " after the VM was released: the destination may hold it paused in-doubt" if released
                    else "; the VM resumed here"))
            elif mig.state == "running":
                mig.state, mig.result = "failed", "aborted"
        finally:
            if mig.state == "running":       # daemon shutdown
                mig.state, mig.result, mig.error = "failed", "aborted", ("migrationFailed", "daemon shutting down")
            mig.ended = time.monotonic()
            _log_outcome(mig)
            memory.note_work()
            mig.done.set()

    async def status(self, mid: str) -> dict:
        if not mid:
            if not self.migrations:
                raise RpcFailure("notFound", "no migrations here yet")
            return list(self.migrations.values())[-1].as_dict()      # the latest
        return self._mig(mid).as_dict()

    async def list_migrations(self) -> list[dict]:
        return [m.as_dict() for m in self.migrations.values()]

    async def wait(self, mid: str, timeout_ms: int) -> dict:
        m = self._mig(mid)
        with trio.move_on_after((timeout_ms or 30000) / 1000):
            await m.done.wait()
        return m.as_dict()

    async def cancel(self, mid: str) -> dict:
        m = self._mig(mid)
        if m.state != "running":
            raise RpcFailure("conflict", f"migration {mid} already ended ({m.state})")
        if m.phase == "commit":
            raise RpcFailure("conflict", f"migration {mid} is committing: the destination holds the VM; too late "
                                         f"to cancel")
        m.scope.cancel()
        with trio.move_on_after(5):
            await m.done.wait()
        return m.as_dict()


    # --- VMs a VMM runs (daemon/vmm/service.py does the work; this maps its errors onto the RPC's)
    def _vmm(self) -> VmmService:
        if self.vmm is None:
            raise RpcFailure("conflict", "the VMM agent socket is disabled here ([agent] enabled = false)")
        return self.vmm

    async def _vmm_call(self, fn, *args):
        try:
            return await fn(*args)
        except VmmError as e:
            raise RpcFailure(e.kind, e.message) from None

    async def list_vmms(self) -> list[dict]:
        return [r.as_dict() for r in self._vmm().hub.vmms()]

    async def prepare_vmm(self, vm: str, mid: str, profile: bytes, digest: bytes) -> dict:
        try:
            prof = S.vm_from_bytes(profile)
        except S.SchemaError as e:
            raise RpcFailure("badRequest", f"prepareVmm: the VM profile does not decode: {e}") from None
        return await self._vmm_call(self._vmm().prepare, vm, mid, prof, digest)

    async def incoming_vmm(self, mid: str, qmp: str, uri: str) -> dict:
        return await self._vmm_call(self._vmm().listen, mid, qmp, uri)

    async def vmm_status(self, mid: str) -> dict:
        return await self._vmm_call(self._vmm().status, mid)

    async def peer_rpc(self, name: str, method: str, *args):
        """A call to a peer daemon's RPC, on one connection per peer kept open (a TLS handshake per call would
        slow the status polls of a QEMU migration); a connection that failed is dropped and made anew."""
        from .rpcclient import Client, RpcError
        p = self._peer(name)
        if not p.rpc:
            raise RpcFailure("badRequest", f"peer {name} has no rpc address in [peers]: VMM migrations call its RPC")
        entry = self._peer_clients.get(name)
        if entry is None:                   # one call at a time on a connection (it connects on the first)
            entry = self._peer_clients[name] = (Client(p.rpc, self.rpc_client_ctx, timeout=self.cfg.timeouts.phase,
                                                       server_hostname=p.server_name or None), trio.Lock())
        c, lock = entry
        try:
            async with lock:
                return await trio.to_thread.run_sync(lambda: getattr(c, method)(*args))
        except RpcError as e:
            if e.kind in ("unreachable", "internal") and self._peer_clients.get(name) is entry:
                del self._peer_clients[name]
                await trio.to_thread.run_sync(c.close)
            raise VmmError(e.kind, f"peer {name}: {e.message}") from None

    async def migrate_vmm(self, vm: str, to_host: str, qmp: str, uri: str, dest_qmp: str) -> str:
        svc = self._vmm()
        self._peer(to_host)
        if not qmp or not uri:
            raise RpcFailure("badRequest", "migrateVmm needs the source QEMU's QMP socket path and a migration URI")
        from ..protocol.agentwire import Role
        if svc.hub.find(vm=vm, role=Role.SOURCE) is None:
            raise RpcFailure("notFound", f"no VMM agent reported a VM named {vm!r} here (start its QEMU with "
                                         f"invariantd-qemu and -name {vm}; `invariantctl vmms` lists them)")
        if self.nursery is None:
            raise RpcFailure("internal", "the migration service is not running")
        for x in self.migrations.values():
            if x.vm == vm and x.state == "running":
                raise RpcFailure("conflict", f"VM {vm} is already migrating ({x.id})")
        mig = Migration(uuid.uuid4().hex, vm, to_host, 0)
        self.migrations[mig.id] = mig
        self._trim()

        async def caps(name):
            return (await self._peer_host(self._peer(name)))[1]

        async def run():
            try:
                with mig.scope:
                    await svc.run_source(mig, vm, to_host, qmp, uri, dest_qmp, peer_caps=caps,
                                         peer_call=self.peer_rpc, apply_timeout=self.cfg.timeouts.apply,
                                         commit_timeout=self.cfg.timeouts.commit)
                    mig.state, mig.result = "committed", "committed"
                    self.metrics.migration("committed")
            except (VmmError, RpcFailure) as e:
                mig.error = (e.kind, e.message)
            except Exception as e:          # a bug: keep the daemon up, say so
                log.exception("VMM migration failed unexpectedly %s", kv(migration=mig.id, vm=mig.vm, peer=mig.to))
                mig.error = ("internal", f"{type(e).__name__}: {e}")
            finally:
                if mig.state == "running":
                    mig.state, mig.result = ("cancelled", "cancelled") if mig.scope.cancelled_caught \
                        else ("failed", "aborted")
                    self.metrics.migration(mig.result)
                elif mig.state == "inDoubt":
                    self.metrics.migration("in-doubt")
                mig.ended = time.monotonic()
                _log_outcome(mig)
                mig.done.set()
        self.nursery.start_soon(run)
        log.info("VMM migration started %s: %s", kv(migration=mig.id, vm=vm, peer=to_host), uri)
        return mig.id


def _log_outcome(mig: Migration) -> None:
    """One line per migration's end on the source, at the priority an operator filters on."""
    took = f"{(mig.ended or time.monotonic()) - mig.t0:.2f}s"
    if mig.state == "committed":
        log.info("migration outcome committed %s: %s", kv(migration=mig.id, vm=mig.vm, peer=mig.to), took)
    elif mig.state == "inDoubt":
        log.error("migration outcome in-doubt %s: after %s: %s", kv(migration=mig.id, vm=mig.vm, peer=mig.to), took,
                  mig.error[1] if mig.error else "")
    else:
        kind, msg = mig.error or ("migrationFailed", "")
        level = logging.WARNING if kind in ("refused", "conflict", "notFound") else logging.ERROR
        log.log(level, "migration outcome %s %s: %s after %s: %s", mig.result or mig.state,
                kv(migration=mig.id, vm=mig.vm, peer=mig.to), kind, took, msg)


