"""A plan's digest: the canonical bytes both daemons compute from the same plan (tag, header, one line per entry)
and compare before anything moves - independent of Cap'n Proto and of dict ordering."""
from __future__ import annotations

import hashlib
import json

from .schemas import Plan, PlanEntry

DIGEST_TAG = b"invariantd/plan-digest@1\n"


def frag(e: PlanEntry) -> bytes:
    """One entry's canonical encoding (part of the digest input)."""
    return json.dumps([e.register, e.reg_id, e.field, e.source, e.destination, e.planned, e.verdict.value,
                       e.reason, e.guest_sees], separators=(",", ":"), ensure_ascii=True).encode()


def _header(plan: Plan) -> bytes:
    return json.dumps([plan.vm_name, plan.destination, plan.policy, plan.migratable, plan.enable_cap239,
                       [[i.midr, i.revidr, i.aidr] for i in plan.target_impls], plan.big_little,
                       plan.assumed_cluster, list(plan.cluster_cpus), list(plan.guest_visible), list(plan.notes)],
                      separators=(",", ":"), ensure_ascii=True).encode()


def canonical_bytes(plan: Plan, frags: list[bytes] | None = None) -> bytes:
    """The digest input: tag, a fixed-order JSON array of the plan's header fields, then one JSON array per
    entry (integers as JSON numbers, verdicts by value), newline-separated. Independent of Cap'n Proto and
    of dict ordering; a peer recomputes it from the decoded plan."""
    if frags is None:
        frags = [frag(e) for e in plan.entries]
    return DIGEST_TAG + _header(plan) + b"\n" + b"\n".join(frags)


def plan_digest(plan: Plan, frags: list[bytes] | None = None) -> bytes:
    return hashlib.sha256(canonical_bytes(plan, frags)).digest()
