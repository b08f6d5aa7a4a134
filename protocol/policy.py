"""Negotiation policy: TOML (tomllib), safe defaults in data/default-policy.toml, a reason on every rule.

A user policy is merged over the defaults key by key (tables recursively, arrays replaced), then validated:
an unknown key, action or register is an error naming it, so a typo never silently weakens the policy.
"""
from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from .catalog import catalog


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the key or value."""


@dataclass(frozen=True, slots=True)
class ImpIdRule:
    override: str          # never | same-part | any
    reason: str


@dataclass(frozen=True, slots=True)
class FieldRule:
    register: str
    field: str
    action: str            # allow | refuse
    reason: str


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    version: int
    pin: bool
    pin_reason: str
    imp_id: dict                    # register name -> ImpIdRule (frozen dataclass; dict not mutated)
    errata_missing: str
    errata_reason: str
    gain: str
    gain_reason: str
    loss: str
    loss_reason: str
    exact: str
    exact_reason: str
    field_rules: dict               # (register, field) -> FieldRule
    big_little: str
    big_little_reason: str
    drift: dict                     # reg_id -> catalog.Drift (kernel data, the same for every policy)
    digest: str                     # sha256 of the merged policy document

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version} sha256:{self.digest[:16]}"


_TOP = {"name", "version", "imp_id", "errata", "features", "big_little"}


def _merge(base: dict, over: dict, path: str = "") -> dict:
    out = dict(base)
    for k, v in over.items():
        where = f"{path}{k}"
        if not path and k not in _TOP:
            raise PolicyError(f"policy: unknown key {where!r} (known: {', '.join(sorted(_TOP))})")
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, where + ".")
        else:
            out[k] = v
    return out


def _choice(value, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise PolicyError(f"policy: {where} = {value!r}; expected one of {', '.join(allowed)}")
    return value


def _default_doc() -> dict:
    return tomllib.loads(resources.files(__package__).joinpath("data", "default-policy.toml").read_text())


def from_doc(doc: dict) -> Policy:
    cat = catalog()
    d = doc
    try:
        imp = d.get("imp_id", {})
        rules = {}
        imp_regs = sorted(cat.imp_masks)       # every implementation-ID register of the catalog (imp_id.tsv)
        for reg in imp_regs:
            r = imp.get(reg, {})
            rules[reg] = ImpIdRule(_choice(r.get("override", "never"), ("never", "same-part", "any"),
                                           f"imp_id.{reg}.override"), str(r.get("reason", "")))
        unknown = set(imp) - {"pin", "pin_reason", *imp_regs}
        if unknown:
            raise PolicyError(f"policy: unknown imp_id key(s) {sorted(unknown)}")
        er, fe, bl = d.get("errata", {}), d.get("features", {}), d.get("big_little", {})
        frules = {}
        for r in fe.get("field", []):
            reg, fld = r.get("register"), r.get("field")
            names = [f.name for f in cat.fields_of(reg)] if reg in cat.sysregs else None
            if names is None or fld not in names:
                raise PolicyError(f"policy: features.field {reg}.{fld}: unknown register or field")
            frules[(reg, fld)] = FieldRule(reg, fld, _choice(r.get("action"), ("allow", "refuse"),
                                                             f"features.field {reg}.{fld}.action"),
                                           str(r.get("reason", "")))
        drift = cat.drift      # kernel facts (protocol/data/drift.tsv), not a policy choice
        canon = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return Policy(
            name=str(d.get("name", "custom")), version=int(d.get("version", 1)),
            pin=bool(imp.get("pin", False)), pin_reason=str(imp.get("pin_reason", "")), imp_id=rules,
            errata_missing=_choice(er.get("missing", "refuse"), ("refuse", "allow"), "errata.missing"),
            errata_reason=str(er.get("reason", "")),
            gain=_choice(fe.get("gain", "refuse"), ("allow", "refuse"), "features.gain"),
            gain_reason=str(fe.get("gain_reason", "")),
            loss=_choice(fe.get("loss", "refuse"), ("allow", "refuse"), "features.loss"),
            loss_reason=str(fe.get("loss_reason", "")),
            exact=_choice(fe.get("exact", "refuse"), ("allow", "refuse"), "features.exact"),
            exact_reason=str(fe.get("exact_reason", "")), field_rules=frules,
            big_little=_choice(bl.get("action", "refuse"), ("assume-cluster", "refuse"), "big_little.action"),
            big_little_reason=str(bl.get("reason", "")), drift=drift,
            digest=hashlib.sha256(canon).hexdigest())
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, PolicyError):
            raise
        raise PolicyError(f"policy: malformed value ({e})") from None


@lru_cache(maxsize=1)
def default_policy() -> Policy:
    return from_doc(_default_doc())


def loads(text: str) -> Policy:
    """A user policy (TOML text) merged over the defaults."""
    try:
        user = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"policy: not valid TOML: {e}") from None
    return from_doc(_merge(_default_doc(), user))
