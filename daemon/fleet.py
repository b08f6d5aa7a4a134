"""The fleet as etcd holds it: the keys' layout (one owner: the daemons' publisher, daemon/etcdpub.py, writes
with `put_host`), and the readers' side - every host at once, one VM planned against all of them, a baseline over
all of them.

    PREFIX/hosts/NODE    a summary {"node", "profile", "arch", "kernel", "midr", "cap239", "peer", "caps"} as JSON
    PREFIX/caps/DIGEST   the full capability document (`invariantctl probe --json`'s), DIGEST = `doc_digest` of it

Documents are content-addressed because a fleet is a few host shapes repeated: 10,000 hosts of 30 shapes store 30
documents of ~34 KB, not 10,000 (etcd's database and every reader's range stay small), and a reader plans once per
shape. A document is created only if absent (a transaction), under the lease of whichever host created it; every
refresh re-creates it if that host has gone, so a shared document may be missing for at most a third of the TTL
after its creator dies (readers report such a host as "document not stored").

Two range reads (the hosts' summaries, then the content-addressed capability documents), each document checked
against its address and parsed once, and one plan per distinct document fanned out to every host that published it:
a fleet of 10,000 hosts and 30 shapes costs 30 plans. A host whose summary is unreadable or whose document is not
(or not yet) stored gets a row that says so; nothing in the store stops the others from being planned.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

from ..protocol import schemas as S
from ..protocol.baseline import Baseline, baseline
from ..protocol.negotiate import negotiate
from ..protocol.policy import Policy
from ..protocol.schemas import Plan, Verdict
from ..protocol.catalog import catalog


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


class StoreError(Exception):
    """etcd could not be read (unreachable, refused, or not an etcd v3 gateway)."""


@dataclass(frozen=True, slots=True)
class Host:
    node: str
    summary: dict           # as published (summary()); {} when unreadable
    digest: str             # its capability document's address ("" when unreadable)
    problem: str = ""       # why this host cannot be planned ("" = its document is stored and parses)


@dataclass(frozen=True, slots=True)
class Store:
    hosts: tuple[Host, ...]
    caps: dict              # digest -> HostCapabilities (stored, matching its address, parsed)
    docs: dict              # digest -> the capability document (JSON object)


# ranks, best first
MIGRATABLE, WITH_CHANGES, REFUSED, UNKNOWN = "migratable", "migratable-with-changes", "refused", "unknown"
RANKS = (MIGRATABLE, WITH_CHANGES, REFUSED, UNKNOWN)


@dataclass(frozen=True, slots=True)
class Row:
    host: Host
    verdict: str                    # one of RANKS
    plan: Plan | None
    reasons: tuple[str, ...]        # refusals ("REGISTER.field: why"), or why there is no plan

    @property
    def changes(self) -> tuple[str, ...]:
        return self.plan.guest_visible if self.plan is not None else ()


def _values(client, prefix: str) -> list[tuple[str, bytes]]:
    try:
        got = client.get_prefix(prefix)
    except Exception as e:               # noqa: BLE001 - etcd3gw raises requests' and its own errors
        raise StoreError(f"etcd: reading {prefix}: {e}") from None
    return [(meta["key"].decode(errors="replace") if isinstance(meta.get("key"), bytes) else str(meta.get("key")),
             value) for value, meta in got]


def read(client, prefix: str, nodes: Sequence[str] = (), extra_ids: frozenset[int] = frozenset()) -> Store:
    """Every host under PREFIX (only those whose node name matches one of the `nodes` globs, when given)."""
    hp = hosts_prefix(prefix)
    hosts = []
    for key, value in _values(client, hp):
        node = key[len(hp):]
        if nodes and not any(fnmatch.fnmatchcase(node, g) for g in nodes):
            continue
        try:
            summ = json.loads(value)
        except (ValueError, UnicodeDecodeError) as e:
            hosts.append(Host(node, {}, "", f"summary at {key} is not JSON ({e})"))
            continue
        digest = summ.get("caps") if isinstance(summ, dict) else None
        if not isinstance(digest, str) or not digest:
            hosts.append(Host(node, summ if isinstance(summ, dict) else {}, "",
                              f"summary at {key} names no capability document (published by an older invariantd?)"))
            continue
        hosts.append(Host(node, summ, digest))
    wanted = {h.digest for h in hosts if h.digest}
    cp = caps_prefix(prefix)
    caps, docs, bad = {}, {}, {}
    for key, value in _values(client, cp) if wanted else ():
        digest = key[len(cp):]
        if digest not in wanted:
            continue
        if hashlib.sha256(value).hexdigest()[:32] != digest:
            bad[digest] = f"capability document {key} does not match its address (altered in the store)"
            continue
        try:
            doc = json.loads(value)
            caps[digest] = S.host_from_doc(doc, extra_ids)
            docs[digest] = doc
        except (ValueError, UnicodeDecodeError) as e:
            bad[digest] = f"capability document {key} is not JSON ({e})"
        except S.SchemaError as e:
            bad[digest] = f"capability document {key}: {e}"
    out = []
    for h in hosts:
        if h.problem or h.digest in caps:
            out.append(h)
        else:
            out.append(Host(h.node, h.summary, h.digest, bad.get(h.digest) or (
                f"capability document {cp}{h.digest} is not stored (its publisher just stopped: stored again "
                f"within a third of the TTL if another host has it)")))
    return Store(tuple(sorted(out, key=lambda h: h.node)), caps, docs)


def _refusals(plan: Plan) -> tuple[str, ...]:
    return tuple(f"{e.register}{'.' + e.field if e.field else ''}: {e.reason}"
                 for e in plan.entries if e.verdict is Verdict.REFUSE)


def plan_all(vm: S.VmProfile, store: Store, policy: Policy) -> list[Row]:
    """Every host's row, ranked: migratable with nothing the guest sees change, then migratable with the fewest
    guest-visible changes, then refusals (fewest first), then hosts that could not be planned; by node within.
    One plan per distinct document: hosts of one shape share their Plan and their reasons."""
    done: dict[str, tuple[str, Plan, tuple[str, ...], int]] = {}
    rows = []
    for h in store.hosts:
        if h.problem:
            rows.append((RANKS.index(UNKNOWN), 1, h.node, Row(h, UNKNOWN, None, (h.problem,))))
            continue
        got = done.get(h.digest)
        if got is None:
            plan = negotiate(vm, store.caps[h.digest], policy)
            if not plan.migratable:
                reasons = _refusals(plan)
                got = (REFUSED, plan, reasons, len(reasons))
            else:
                got = (WITH_CHANGES if plan.guest_visible else MIGRATABLE, plan, (), len(plan.guest_visible))
            done[h.digest] = got
        verdict, plan, reasons, weight = got
        rows.append((RANKS.index(verdict), weight, h.node, Row(h, verdict, plan, reasons)))
    rows.sort(key=lambda r: r[:3])
    return [r[3] for r in rows]


def fleet_baseline(store: Store, name: str, revision: int, policy: Policy) -> Baseline:
    """The baseline of every plannable host: computed over the distinct documents (a host repeated changes
    nothing: each field's combination is a fold over values, and the same value folds to itself)."""
    digests = list(dict.fromkeys(h.digest for h in store.hosts if not h.problem))
    if not digests:
        raise ValueError("no host in the store has a readable capability document")
    return baseline([store.caps[d] for d in digests], name=name, revision=revision, policy=policy)
