"""Publish this host to etcd, where a fleet's scheduler or orchestrator reads every host at once.

Under a lease (TTL `[etcd] ttl`, refreshed every third of it), in the layout daemon/fleet.py owns and reads: this
host's summary, and its capability document created if absent and re-created at every refresh if the host of the
same shape that stored it has gone.

A stopped daemon revokes its lease first (its keys go at once). etcd unreachable: logged, retried with backoff up to
the TTL; the daemon goes on (publishing is a service to others, never a reason to stop). The client is etcd3gw
(etcd's v3 gRPC-JSON gateway over HTTP), synchronous: its calls run in a worker thread.
"""
from __future__ import annotations

import logging

import trio

from .fleet import canonical, client, keys, put_host

log = logging.getLogger("invariantd.etcd")


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
