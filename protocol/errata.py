"""Guest-visible errata by MIDR range (data/errata.tsv), and the coverage check the plan uses.

A guest kernel enables an erratum's workaround when one of the implementations it knows about is affected:
the MIDR it booted on, the other MIDRs of a big.LITTLE source, and (Linux >= 6.15 guests) every target
implementation published through the BMAP_2 discovery hypercalls. Migrating to an implementation that needs
a workaround none of those triggered leaves the guest exposed: the plan refuses that (or allows it, per policy).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from . import tables
from .catalog import CatalogError


@dataclass(frozen=True, slots=True)
class Erratum:
    erratum: str
    implementer: int
    part: int
    lo: tuple[int, int]            # (variant, revision)
    hi: tuple[int, int]
    fixed: tuple[int, int] | None  # (variant<<20 | revision, REVIDR mask)
    scope: str                     # guest | el2
    covered_by: tuple[str, ...]
    description: str

    def affects(self, midr: int, revidr: int | None = None) -> bool:
        if (midr >> 24) & 0xFF != self.implementer or (midr >> 4) & 0xFFF != self.part:
            return False
        vr = ((midr >> 20) & 0xF, midr & 0xF)
        if not self.lo <= vr <= self.hi:
            return False
        if self.fixed and revidr is not None and (midr & 0xF0000F) == self.fixed[0] and revidr & self.fixed[1]:
            return False
        return True


@lru_cache(maxsize=1)
def table() -> tuple[Erratum, ...]:
    out = []
    for n, r in enumerate(tables.rows("errata.tsv"), start=1):
        try:
            lo = (int(r["var_min"]), int(r["rev_min"]))
            hi = (int(r["var_max"]), int(r["rev_max"]))
            fixed = None
            if r["revidr_fixed"]:
                a, b = r["revidr_fixed"].split(":")
                fixed = (int(a, 0), int(b, 0))
            e = Erratum(r["erratum"], int(r["implementer"], 0), int(r["part"], 0), lo, hi, fixed, r["scope"],
                        tuple(x for x in r["covered_by"].split(";") if x), r["description"])
        except (KeyError, ValueError, AttributeError) as ex:
            raise CatalogError(f"errata.tsv row {n}: {ex}") from None
        if e.scope not in ("guest", "el2") or not lo <= hi or max(lo + hi) > 15:
            raise CatalogError(f"errata.tsv row {n} ({e.erratum}): bad scope or range")
        out.append(e)
    ids = {e.erratum for e in out}
    for e in out:
        for c in e.covered_by:
            if c not in ids:
                raise CatalogError(f"errata.tsv: {e.erratum} covered_by unknown erratum {c!r}")
    return tuple(out)


@lru_cache(maxsize=4096)
def needed(midr: int, revidr: int | None = None) -> dict[str, Erratum]:
    """Guest-visible errata a guest needs on this implementation (erratum id -> row)."""
    return {e.erratum: e for e in table() if e.scope == "guest" and e.affects(midr, revidr)}


def missing(dest: Iterable[tuple[int, int | None]], known: Iterable[tuple[int, int | None]]) -> list[Erratum]:
    """Errata the destination implementations need that no implementation the guest knows triggers.

    `dest` / `known` are (MIDR, REVIDR or None) pairs. An erratum counts as covered when the guest applies
    it or one listed in its covered_by column. An unknown REVIDR is read conservatively: on a known
    implementation as "every fix present" (the guest may have skipped the workaround), on a destination as
    "no fix present"."""
    applied: set[str] = set()
    for midr, revidr in known:
        applied.update(needed(midr, 0xFFFFFFFFFFFFFFFF if revidr is None else revidr))
    out: dict[str, Erratum] = {}
    for midr, revidr in dest:
        for eid, e in needed(midr, 0 if revidr is None else revidr).items():
            if eid not in applied and not applied.intersection(e.covered_by):
                out.setdefault(eid, e)
    return sorted(out.values(), key=lambda e: e.erratum)


def describe_midr(midr: int) -> str:
    return f"{midr:#x} (implementer {(midr >> 24) & 0xFF:#x} part {(midr >> 4) & 0xFFF:#x} " \
           f"r{(midr >> 20) & 0xF}p{midr & 0xF})"
