"""vCPU state as the stream carries it: chunks built from register sets (lazily, per protocol version) and read
back, and the stream-size estimate a destination reserves for."""
from __future__ import annotations

import math
from typing import Callable, Sequence


from ...protocol import schemas as S
from ...protocol import session as ps
from ...protocol.regset import RegisterSet


def stream_estimate(vm: S.VmProfile, vcpus: int, version: int) -> int:
    """About the bytes a VM's chunks take on the wire (values, register ids, framing), from its register list:
    what the destination reserves before the stream (Session.reserve). Protocol 2 chunks are assumed to carry
    at least 64 KiB; a smaller estimate only means the last frames are buffered the ordinary way."""
    try:
        values = sum(ps.register_size(r) for r in vm.reg_list)
    except Exception:
        return 0
    ids = 8 * len(vm.reg_list) + 256
    if version < 2:
        return vcpus * (values + ids)
    chunks = -(-vcpus * values // (64 * 1024)) + 1
    return vcpus * (values + 64) + chunks * ids


def _regsets(chunks: Sequence[ps.VcpuChunk]) -> dict[int, RegisterSet]:
    """Received chunks -> each vCPU's RegisterSet (the received bytes; a vCPU split over chunks joined)."""
    parts: dict[int, list[RegisterSet]] = {}
    for c in chunks:
        for vcpu, regs in c.per_vcpu().items():
            parts.setdefault(vcpu, []).append(regs)
    return {vcpu: RegisterSet.concat(p) for vcpu, p in parts.items()}


def _later(make: Callable[[], object]):
    """One event, made when an iteration reaches it."""
    yield make()


def _chunks(vm_id: str, regsets, n: int, checksum: str, version: int = 1, chunk_bytes: int = 128 * 1024):
    """The chunks of a VM's register sets. Protocol 1: one vCPU per chunk, at most n registers each.
    Protocol 2: consecutive vCPUs with the same register list (every vCPU of a VM, normally) share chunks of
    about chunk_bytes; a vCPU with more than n registers is split into single-vCPU chunks as in protocol 1."""
    items = [(vcpu, RegisterSet.from_pairs(regs)) for vcpu, regs in sorted(regsets.items())]
    if version < 2:
        for vcpu, regs in items:
            for k in range(max(1, math.ceil(len(regs) / n))):
                yield ps.VcpuChunk.build(vm_id, vcpu, k, regs.slice(k * n, (k + 1) * n), checksum)
        return
    i = 0
    while i < len(items):
        vcpu, regs = items[i]
        if len(regs) > n:
            for k in range(math.ceil(len(regs) / n)):
                yield ps.VcpuChunk.build(vm_id, vcpu, k, regs.slice(k * n, (k + 1) * n), checksum)
            i += 1
            continue
        per = 8 * len(regs) + regs.layout.total
        group = [regs]
        j = i + 1
        while j < len(items) and items[j][0] == vcpu + (j - i) and (j - i + 1) * per <= max(chunk_bytes, per):
            if items[j][1].ids_le != regs.ids_le:
                break
            group.append(items[j][1])
            j += 1
        yield ps.VcpuChunk.build_multi(vm_id, vcpu, 0, regs.ids, group, checksum)
        i = j
