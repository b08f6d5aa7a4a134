"""Publish this host to etcd, where a fleet's scheduler or orchestrator reads every host at once.

Under a lease (TTL `[etcd] ttl`, refreshed every third of it), so the keys vanish when the daemon dies:

    PREFIX/hosts/NODE    a summary {"node", "profile", "arch", "kernel", "midr", "cap239", "peer", "caps"} as JSON
    PREFIX/caps/DIGEST   the full capability document (`invariantctl probe --json`'s), DIGEST = `doc_digest` of it

Documents are content-addressed because a fleet is a few host shapes repeated: 10,000 hosts of 30 shapes store 30
documents of ~34 KB, not 10,000 (etcd's database and every reader's range stay small), and a reader plans once per
shape (daemon/fleet.py). A document is created only if absent (a transaction), under the lease of whichever host
created it; every refresh re-creates it if that host has gone, so a shared document may be missing for at most a
third of the TTL after its creator dies (readers report such a host as "document not stored").

A stopped daemon revokes its lease first (its keys go at once). etcd unreachable: logged, retried with backoff up to
the TTL; the daemon goes on (publishing is a service to others, never a reason to stop). The client is etcd3gw
(etcd's v3 gRPC-JSON gateway over HTTP), synchronous: its calls run in a worker thread.
"""
from __future__ import annotations

import hashlib
import json
import logging

import trio

from ..protocol.catalog import catalog

log = logging.getLogger("invariantd.etcd")


def canonical(caps: dict) -> str:
    """The stored text of a capability document: its JSON with sorted keys, no spaces (what `doc_digest` hashes)."""
    return json.dumps(caps, sort_keys=True, separators=(",", ":"))


def doc_digest(caps: dict) -> str:
    """A capability document's content address: the first 32 hex digits of the SHA-256 of its canonical text."""
    return hashlib.sha256(canonical(caps).encode()).hexdigest()[:32]


def summary(node: str, caps: dict, peer_address: str) -> dict:
    vals = caps.get("values") or {}
    midr = int(vals.get(f"{catalog().id_of('MIDR_EL1'):#x}", "0x0"), 16) if caps.get("arch") == "aarch64" else 0
    return {"node": node, "profile": caps.get("profile") or "", "arch": caps.get("arch"),
            "kernel": caps.get("kernel_version"), "midr": f"{midr:#x}",
            "cap239": bool((caps.get("caps") or {}).get("KVM_CAP_ARM_WRITABLE_IMP_ID_REGS")), "peer": peer_address,
            "caps": doc_digest(caps)}


def client(section):
    import etcd3gw                     # optional: pip install 'invariantd[fleet]'
    host, _, port = section.endpoint.rpartition(":")
    kw = {}
    if section.ca:
        kw = {"protocol": "https", "ca_cert": section.ca, "cert_cert": section.cert or None,
              "cert_key": section.key or None}
    return etcd3gw.client(host=host or "127.0.0.1", port=int(port or 2379), timeout=max(1.0, section.ttl / 3), **kw)


def hosts_prefix(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/hosts/"


def caps_prefix(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/caps/"


def keys(prefix: str, node: str, caps: dict) -> tuple[str, str]:
    """(the host's summary key, its capability document's key)."""
    return hosts_prefix(prefix) + node, caps_prefix(prefix) + doc_digest(caps)


def put_host(c, prefix: str, node: str, caps: dict, peer_address: str, lease=None) -> bool:
    """Store one host (its document if absent, then its summary) with an etcd3gw client; True if this call stored
    the document. The one writer of the layout above (the daemon's publisher; tests and the fleet bench)."""
    summary_key, caps_key = keys(prefix, node, caps)
    created = c.create(caps_key, canonical(caps), lease=lease)
    c.put(summary_key, json.dumps(summary(node, caps, peer_address)), lease=lease)
    return created


async def publish(section, node: str, caps: dict, peer_address: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Keep this host's keys in etcd until cancelled (then revoke the lease)."""
    summary_key, caps_key = keys(section.prefix, node, caps)
    caps_json = canonical(caps)
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
                        return new, put_host(c, section.prefix, node, caps, peer_address, new)
                    lease, created = await trio.to_thread.run_sync(put)
                    log.info("etcd: published %s and %s (%s; lease %x, ttl %ss)", summary_key, caps_key,
                             "stored" if created else "already stored by a host of the same shape", lease.id,
                             section.ttl)
                else:
                    def refresh():
                        ttl = lease.refresh()
                        return ttl, ttl > 0 and c.create(caps_key, caps_json, lease=lease)
                    ttl, recreated = await trio.to_thread.run_sync(refresh)
                    if ttl <= 0:             # expired meanwhile (etcd was away longer than the TTL): publish anew
                        lease = None
                        continue
                    if recreated:            # the host that stored this shape's document has gone
                        log.info("etcd: stored %s again (its previous owner's lease ended)", caps_key)
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
