"""The fleet as etcd holds it (daemon/etcdpub.py's layout): every host at once, one VM planned against all of them,
a baseline over all of them.

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
from .etcdpub import caps_prefix, hosts_prefix


class StoreError(Exception):
    """etcd could not be read (unreachable, refused, or not an etcd v3 gateway)."""


@dataclass(frozen=True, slots=True)
class Host:
    node: str
    summary: dict           # as published (etcdpub.summary); {} when unreadable
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
    guest-visible changes, then refusals (fewest first), then hosts that could not be planned; by node within."""
    plans: dict[str, Plan] = {}          # one plan per distinct document
    rows = []
    for h in store.hosts:
        if h.problem:
            rows.append(Row(h, UNKNOWN, None, (h.problem,)))
            continue
        plan = plans.get(h.digest)
        if plan is None:
            plan = plans[h.digest] = negotiate(vm, store.caps[h.digest], policy)
        if not plan.migratable:
            rows.append(Row(h, REFUSED, plan, _refusals(plan)))
        else:
            rows.append(Row(h, WITH_CHANGES if plan.guest_visible else MIGRATABLE, plan, ()))
    rows.sort(key=lambda r: (RANKS.index(r.verdict), len(r.reasons) + len(r.changes), r.host.node))
    return rows


def fleet_baseline(store: Store, name: str, revision: int, policy: Policy) -> Baseline:
    """The baseline of every plannable host: computed over the distinct documents (a host repeated changes
    nothing: each field's combination is a fold over values, and the same value folds to itself)."""
    digests = list(dict.fromkeys(h.digest for h in store.hosts if not h.problem))
    if not digests:
        raise ValueError("no host in the store has a readable capability document")
    return baseline([store.caps[d] for d in digests], name=name, revision=revision, policy=policy)
