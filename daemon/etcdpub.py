"""Publish this host to etcd, where a fleet's scheduler or orchestrator reads every host at once.

Under a lease (TTL `[etcd] ttl`, refreshed every third of it), so the keys vanish when the daemon dies:

    PREFIX/hosts/NODE/caps      the full capability document (`invariantctl probe --json`'s)
    PREFIX/hosts/NODE/summary   {"node", "profile", "arch", "kernel", "midr", "cap239", "peer"} as JSON

A stopped daemon revokes its lease first (the keys go at once). etcd unreachable: logged, retried with backoff up to
the TTL; the daemon goes on (publishing is a service to others, never a reason to stop). The client is etcd3gw
(etcd's v3 gRPC-JSON gateway over HTTP), synchronous: its calls run in a worker thread.
"""
from __future__ import annotations

import json
import logging

import trio

from ..protocol.catalog import catalog

log = logging.getLogger("invariantd.etcd")


def summary(node: str, caps: dict, peer_address: str) -> dict:
    vals = caps.get("values") or {}
    midr = int(vals.get(f"{catalog().id_of('MIDR_EL1'):#x}", "0x0"), 16) if caps.get("arch") == "aarch64" else 0
    return {"node": node, "profile": caps.get("profile") or "", "arch": caps.get("arch"),
            "kernel": caps.get("kernel_version"), "midr": f"{midr:#x}",
            "cap239": bool((caps.get("caps") or {}).get("KVM_CAP_ARM_WRITABLE_IMP_ID_REGS")), "peer": peer_address}


def client(section):
    import etcd3gw                     # optional: pip install 'invariantd[fleet]'
    host, _, port = section.endpoint.rpartition(":")
    kw = {}
    if section.ca:
        kw = {"protocol": "https", "ca_cert": section.ca, "cert_cert": section.cert or None,
              "cert_key": section.key or None}
    return etcd3gw.client(host=host or "127.0.0.1", port=int(port or 2379), timeout=max(1.0, section.ttl / 3), **kw)


def keys(section, node: str) -> tuple[str, str]:
    base = f"{section.prefix.rstrip('/')}/hosts/{node}"
    return f"{base}/caps", f"{base}/summary"


async def publish(section, node: str, caps: dict, peer_address: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Keep this host's keys in etcd until cancelled (then revoke the lease)."""
    caps_key, summary_key = keys(section, node)
    caps_json, summary_json = json.dumps(caps, sort_keys=True), json.dumps(summary(node, caps, peer_address))
    c = await trio.to_thread.run_sync(client, section)
    lease = None
    backoff = 1.0
    started = False
    try:
        while True:
            try:
                if lease is None:
                    def put():
                        new = c.lease(ttl=max(2, int(section.ttl)))
                        c.put(caps_key, caps_json, lease=new)
                        c.put(summary_key, summary_json, lease=new)
                        return new
                    lease = await trio.to_thread.run_sync(put)
                    log.info("etcd: published %s and %s (lease %x, ttl %ss)", caps_key, summary_key, lease.id,
                             section.ttl)
                else:
                    ttl = await trio.to_thread.run_sync(lease.refresh)
                    if ttl <= 0:             # expired meanwhile (etcd was away longer than the TTL): publish anew
                        lease = None
                        continue
                backoff = 1.0
                wait = section.ttl / 3
            except Exception as e:           # noqa: BLE001 - etcd3gw raises its own and requests' errors
                log.warning("etcd %s: %s; retrying in %.0fs", section.endpoint, e, backoff)
                lease, wait, backoff = None, backoff, min(backoff * 2, section.ttl)
            if not started:
                task_status.started()
                started = True
            await trio.sleep(wait)
    finally:
        if lease is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await trio.to_thread.run_sync(lease.revoke, abandon_on_cancel=True)
                except Exception as e:       # noqa: BLE001 - best effort: the TTL removes the keys anyway
                    log.warning("etcd: could not revoke lease %x: %s", lease.id, e)
