"""The orchestrator RPC's Cap'n Proto side: one Impl per connection (rpc.capnp's Orchestrator.Server), bound to its
Caller; every call is checked against rpcaccess.METHOD_ROLES, run in trio through the Bridge (daemon/rpcserve.py),
and its plain-data answer written into the results. The records themselves are marshalled in
rpcmarshal.py, both ways."""
from __future__ import annotations

import json
import logging

from ..protocol import schemas as S

from .rpc import Orchestrator, RpcFailure
from .rpcaccess import BY_CALLER, Caller
from .rpcclient import rpc_schema
from .rpcmarshal import fill_status, fill_vm, jsonable

log = logging.getLogger("invariantd.rpc")


def _set_error(results, kind: str, message: str) -> None:
    results.error.kind = kind
    results.error.message = message[:8000]


def impl_class():
    rpc = rpc_schema()

    class Impl(rpc.Orchestrator.Server):
        """One per connection, bound to its caller: every call is checked against METHOD_ROLES first."""

        def __init__(self, orch: Orchestrator, bridge, caller: Caller) -> None:
            self.orch, self.bridge, self.caller = orch, bridge, caller

        async def _do(self, results, fn, args, fill) -> None:
            why = self.caller.may_not(fn.__name__)
            if why:
                log.warning("RPC refused: %s", why)
                _set_error(results, "forbidden", why)
                return
            try:
                data = await self.bridge.to_trio(fn, *args, self.caller) if fn.__name__ in BY_CALLER else \
                    await self.bridge.to_trio(fn, *args)
            except RpcFailure as e:
                _set_error(results, e.kind, e.message)
                return
            except Exception as e:                # a bug in the daemon: typed, logged, never a traceback
                log.exception("RPC %s failed", getattr(fn, "__name__", fn))
                _set_error(results, "internal", f"{type(e).__name__}: {e}")
                return
            fill(results, data)

        async def caps(self, host, _context, **kw):
            def fill(r, doc):
                r.json = json.dumps(doc, indent=1).encode()
                if doc.get("arch") == "aarch64":
                    try:
                        with S.schema().HostCapabilities.from_bytes(
                                S.host_to_bytes(S.host_from_doc(doc))) as h:
                            r.host = h
                    except Exception:         # the JSON document is the contract; the struct is a convenience
                        pass
            await self._do(_context.results, self.orch.caps, (str(host),), fill)

        async def listVms(self, _context, **kw):
            def fill(r, vms):
                lst = r.init("vms", len(vms))
                for i, d in enumerate(vms):
                    fill_vm(lst[i], d)
            await self._do(_context.results, self.orch.list_vms, (), fill)

        async def createVm(self, name, nVcpus, features, _context, **kw):
            await self._do(_context.results, self.orch.create_vm, (str(name), int(nVcpus), [str(f) for f in features]),
                           lambda r, d: fill_vm(r.vm, d))

        async def inspectVm(self, name, _context, **kw):
            await self._do(_context.results, self.orch.inspect_vm, (str(name),), lambda r, d: fill_vm(r.vm, d))

        async def removeVm(self, name, _context, **kw):
            await self._do(_context.results, self.orch.remove_vm, (str(name),), lambda r, d: None)

        async def resolveVm(self, name, peer, action, _context, **kw):
            def fill(r, d):
                if d.get("state") != "removed":
                    fill_vm(r.vm, d)
            await self._do(_context.results, self.orch.resolve_vm, (str(name), str(peer), str(action)), fill)

        async def plan(self, vm, toHost, _context, **kw):
            def fill(r, d):
                pr = r.result
                pr.migratable, pr.digest, pr.json, pr.destination = (d["migratable"], d["digest"], d["json"],
                                                                     d["destination"])
                with S.schema().Plan.from_bytes(d["plan_bytes"], traversal_limit_in_words=S.TRAVERSAL_LIMIT_WORDS,
                                                nesting_limit=S.NESTING_LIMIT) as p:
                    pr.plan = p
            await self._do(_context.results, self.orch.plan, (str(vm), str(toHost)), fill)

        async def migrate(self, vm, toHost, _context, **kw):
            def fill(r, mid):
                r.migrationId = mid
            await self._do(_context.results, self.orch.migrate, (str(vm), str(toHost)), fill)

        async def status(self, migrationId, _context, **kw):
            await self._do(_context.results, self.orch.status, (str(migrationId),),
                           lambda r, d: fill_status(r.status, d))

        async def listMigrations(self, _context, **kw):
            def fill(r, ms):
                lst = r.init("migrations", len(ms))
                for i, d in enumerate(ms):
                    fill_status(lst[i], d)
            await self._do(_context.results, self.orch.list_migrations, (), fill)

        async def cancel(self, migrationId, _context, **kw):
            await self._do(_context.results, self.orch.cancel, (str(migrationId),),
                           lambda r, d: fill_status(r.status, d))

        async def wait(self, migrationId, timeoutMs, _context, **kw):
            await self._do(_context.results, self.orch.wait, (str(migrationId), int(timeoutMs)),
                           lambda r, d: fill_status(r.status, d))

        async def peers(self, _context, **kw):
            def fill(r, d):
                r.node = d["node"]
                lst = r.init("peers", len(d["peers"]))
                for i, p in enumerate(d["peers"]):
                    lst[i].name, lst[i].address, lst[i].rpc = p["name"], p["address"], p["rpc"]
            await self._do(_context.results, self.orch.peers, (), fill)

        async def _json(self, results, fn, args):
            def fill(r, d):
                r.json = json.dumps(d, indent=1, default=jsonable).encode()
            await self._do(results, fn, args, fill)

        async def listVmms(self, _context, **kw):
            await self._json(_context.results, self.orch.list_vmms, ())

        async def vmProfile(self, name, _context, **kw):
            await self._json(_context.results, self.orch.vm_profile, (str(name),))

        async def prepareVmm(self, vm, migrationId, profile, digest, _context, **kw):
            await self._json(_context.results, self.orch.prepare_vmm, (str(vm), str(migrationId), bytes(profile),
                                                                       bytes(digest)))

        async def incomingVmm(self, migrationId, qmp, uri, _context, **kw):
            await self._json(_context.results, self.orch.incoming_vmm, (str(migrationId), str(qmp), str(uri)))

        async def vmmStatus(self, migrationId, _context, **kw):
            await self._json(_context.results, self.orch.vmm_status, (str(migrationId),))

        async def migrateVmm(self, vm, toHost, qmp, uri, destQmp, _context, **kw):
            def fill(r, mid):
                r.migrationId = mid
            await self._do(_context.results, self.orch.migrate_vmm, (str(vm), str(toHost), str(qmp), str(uri),
                                                                     str(destQmp)), fill)

    return Impl
