"""negotiate() memoises per register (a fleet repeats a few host shapes) and keeps a per-VM view between calls:
every plan made with warm memos equals the plan made from scratch - across VMs, hosts, kernels, policies and
SVE / PMU / SSBS variants, cap 239 and big.LITTLE hosts: each memo entry reused by other pairs."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from invariantd.protocol import negotiate as N
from invariantd.protocol import schemas as S
from invariantd.protocol.catalog import catalog
from invariantd.protocol.policy import default_policy, loads

CAT = catalog()


def _docs() -> dict[str, dict]:
    from invariantd.daemon.probe import probe
    from invariantd.daemon.sim import SimHost, list_profiles
    names = list_profiles()
    if len(names) < 4:
        pytest.skip("fewer than four shipped host profiles")
    return {n: probe(SimHost(n), profile=n) for n in names}


def _cold(vm, host, pol):
    N._MEMO.clear()
    N._LAST_VM[0] = None
    return N.negotiate(vm, host, pol)


def test_warm_memo_plans_equal_plans_from_scratch():
    docs = _docs()
    lenient = loads('name = "lenient"\n[features]\nloss = "allow"\nexact = "allow"\n'
                    '[imp_id.MIDR_EL1]\noverride = "any"\nreason = "test"\n')
    policies = [default_policy(), lenient]
    vms, hosts = [], []
    for pol in policies:
        extra = frozenset(pol.drift)
        for name, d in docs.items():
            vms.append((pol, S.load_source(d, extra)))
            vm = S.load_source(d, extra)
            for feats in (("SVE",), ("PMU_V3",)):
                vms.append((pol, replace(vm, features=tuple(sorted(set(vm.features) | set(feats))))))
            vms.append((pol, replace(vm, seen_midrs=(0x410FD0C0, 0x410FD034))))    # knows more implementations
            h = S.host_from_doc(d, extra)
            hosts.append((pol, h))
            hosts.append((pol, replace(h, caps=tuple((k, 0 if k == N.CAP239 else v) for k, v in h.caps))))
            hosts.append((pol, replace(h, cpu_midrs=(0x410FD034, 0x410FD082, 0x410FD0C0))))    # big.LITTLE
            ctr = CAT.id_of("CTR_EL0")
            if ctr in dict(h.values):                       # larger cache lines: CCSIDR's setter reads CTR_EL0
                hosts.append((pol, replace(h, values=tuple((r, v | 0x70007 if r == ctr else v) for r, v in h.values))))
            if h.kernel_version != "6.1":                   # the same values reported by an older kernel
                hosts.append((pol, replace(h, kernel_version="6.1", kernel_release="6.1.0-relabelled")))
    rng = random.Random(7)
    # a VM planned against every host in a row (the fleet's pattern: the view and the memos reused across hosts of
    # other kernels, cap 239, clusters), for a sample of VMs under both policies, in a shuffled order
    sample = [(p, vm, h) for p, vm in rng.sample(vms, 24) for q, h in hosts if p is q]
    cold = {i: _cold(vm, h, p) for i, (p, vm, h) in enumerate(sample)}
    N._MEMO.clear()
    N._LAST_VM[0] = None
    order = list(range(len(sample)))
    rng.shuffle(order)
    for i in sorted(order, key=lambda i: id(sample[i][1])) + order:    # by VM, then every pair shuffled
        p, vm, h = sample[i]
        warm = N.negotiate(vm, h, p)
        assert warm == cold[i], f"{vm.name} -> {h.name} ({p.label}): the memoised plan differs"
    assert len({c.digest for c in cold.values()}) > 50      # the sample covers many distinct plans
    assert any(c.migratable for c in cold.values()) and not all(c.migratable for c in cold.values())
