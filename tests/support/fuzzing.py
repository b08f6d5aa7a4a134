"""Fuzz targets for every place bytes or documents enter invariantd, and a small mutation engine.

Each target takes one input (bytes) and must end in a typed, named error or a valid result: anything else (an
IndexError, a RecursionError, a TypeError, a hang) is a finding. Used by tests/test_fuzz.py (bounded, fixed seed,
in CI) and bench/fuzz.py (1,000,000 inputs). Hypothesis drives the property tests elsewhere (test_session.py);
this engine exists for throughput: a million mutated inputs in minutes, which Hypothesis's shrinking machinery
is not built for. Seeds are valid encodings made by the project's own encoders.
"""
from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass
from typing import Callable

from invariantd.daemon.config import ConfigError, parse as parse_config
from invariantd.protocol import agentwire as W
from invariantd.protocol import schemas as S
from invariantd.protocol import session as ps
from invariantd.protocol.errors import ProtocolError
from invariantd.protocol.framing import Limits
from invariantd.protocol.program import ApplyProgram, ProgramError, compile_plan

LIMITS = Limits(max_frame_bytes=1 << 16, traversal_limit_in_words=1 << 14)


@dataclass
class Target:
    name: str
    run: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]
    seeds: list[bytes]
    structured: bool = False             # JSON: mutate the document's values, not its bytes (which stop being JSON)


# --- seeds ------------------------------------------------------------------------------------------------------
def _docs():
    from invariantd.daemon.probe import probe
    from invariantd.daemon.sim.host import SimHost
    from invariantd.protocol.negotiate import negotiate
    from invariantd.protocol.policy import default_policy
    src, dst = SimHost("cortex-a72-r0p3@6.12"), SimHost("cortex-a72-r0p4@7.3")
    pol = default_policy()
    sdoc, ddoc = probe(src), probe(dst)
    host = S.host_from_doc(ddoc, frozenset(pol.drift))
    vm = S.load_source(sdoc, frozenset(pol.drift))
    plan = negotiate(vm, host, pol)
    return sdoc, ddoc, host, vm, plan


REGS = [(0x6030000000100000 + 2 * i, i * 0x1111) for i in range(40)]


def _proposal(host, vm, plan) -> ps.PlanProposal:
    return ps.PlanProposal("m1", "vm", 2, "invariantd/plan@1", S.plan_to_bytes(plan), plan.digest, S.vm_to_bytes(vm))


def _chunks() -> list[ps.VcpuChunk]:
    return [ps.VcpuChunk.build("vm", v, 0, REGS, "xxh3") for v in range(2)]


def _conversation(host: S.HostCapabilities, vm: S.VmProfile, plan: S.Plan) -> dict[str, list[bytes]]:
    """The frames each role receives in one whole migration (the drivers below answer them the same way)."""
    s, d = ps.Session(ps.SOURCE), ps.Session(ps.DESTINATION)
    frames: dict[str, list[bytes]] = {ps.SOURCE: [], ps.DESTINATION: []}

    def send(a, b, ev):
        data = a.send(ev)
        frames[b.our_role].append(data)
        b.receive_data(data)
        b.next_event()
    send(s, d, ps.Hello(ps.PROTOCOL_VERSIONS, ps.SOURCE, "a"))
    send(d, s, ps.Hello(ps.PROTOCOL_VERSIONS, ps.DESTINATION, "b"))
    send(d, s, ps.Capabilities("invariantd/host-capabilities@1+capnp", S.host_to_bytes(host)))
    prop = _proposal(host, vm, plan)
    send(s, d, prop)
    send(d, s, ps.PlanAccept("m1", plan.digest))
    send(d, s, ps.Preflight(True, "ok", ()))
    for c in _chunks():
        send(s, d, c)
    end = s.stream_end()
    send(s, d, end)
    send(d, s, ps.Commit("m1", end.digest))
    send(s, d, ps.Commit("m1", end.digest))
    send(d, s, ps.Commit("m1", end.digest))
    return frames


CONFIG = """node = "a"
log_level = "info"
[backend]
kind = "sim"
sim_profile = "cortex-a72-r0p4@6.12"
[peer]
listen = "127.0.0.1"
port = 7443
cert = "/etc/invariantd/tls/node.pem"
ca = "/etc/invariantd/tls/ca.pem"
allowed_peers = ["b"]
chunk_registers = 4096
[metrics]
port = 9464
[timeouts]
handshake = 10
apply = 60.5
[rpc]
unix = "/run/invariantd/rpc.sock"
[journal]
path = "/var/lib/invariantd/journal.db"
[peers]
b = { address = "10.0.0.2:7443", rpc = "10.0.0.2:7444", server_name = "b" }
"""


# --- targets ----------------------------------------------------------------------------------------------------
def _feed(s: ps.Session, data: bytes, answer) -> None:
    """Feed data in three pieces; answer(event) sends what the daemon would (the session checks every step)."""
    step = max(1, len(data) // 3)
    for i in range(0, len(data) + 1, step):
        s.receive_data(data[i:i + step] if i < len(data) else b"")
        while (ev := s.next_event()) is not ps.NEED_DATA:
            if isinstance(ev, (ps.ConnectionClosed, ps.Abort)) or s.state in (ps.DONE, ps.ABORTED):
                return
            answer(s, ev)


def _destination(host, plan):
    caps = ps.Capabilities("invariantd/host-capabilities@1+capnp", S.host_to_bytes(host))

    def answer(s: ps.Session, ev) -> None:
        if isinstance(ev, ps.Hello):
            s.send(ps.Hello(ps.PROTOCOL_VERSIONS, ps.DESTINATION, "b"))
            s.send(caps)
        elif isinstance(ev, ps.PlanProposal):
            s.send(ps.PlanAccept(ev.migration_id, ev.digest))
            s.send(ps.Preflight(True, "ok", ()))
        elif isinstance(ev, ps.StreamEnd):
            s.send(ps.Commit(s.proposal.migration_id, s.stream_digest))
        elif isinstance(ev, ps.Commit) and s.state is ps.RELEASED:
            s.send(ps.Commit(ev.migration_id, ev.digest))
        elif isinstance(ev, ps.Inquiry):
            s.send(ps.Answer(ev.migration_id, ev.vm_id, "", "", ""))

    def run(data: bytes) -> None:
        _feed(ps.Session(ps.DESTINATION, LIMITS), data, answer)
    return run


def _source(host, vm, plan):
    prop = _proposal(host, vm, plan)

    def answer(s: ps.Session, ev) -> None:
        if isinstance(ev, ps.Capabilities):
            s.send(prop)
        elif isinstance(ev, ps.Preflight):
            for c in _chunks():
                s.send(c)
            s.send(s.stream_end())
        elif isinstance(ev, ps.Commit) and s.state is ps.COMMITTING:
            s.send(ps.Commit(ev.migration_id, ev.digest))

    def run(data: bytes) -> None:
        s = ps.Session(ps.SOURCE, LIMITS)
        s.send(ps.Hello(ps.PROTOCOL_VERSIONS, ps.SOURCE, "a"))
        _feed(s, data, answer)
    return run


def _agent(data: bytes):
    W.Reader().feed(data)


def _json_doc(fn):
    def run(data: bytes):
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):    # the CLI's JSON reader says "not JSON" (exit 2): not this target's
            return
        return fn(doc)
    return run


def targets() -> list[Target]:
    sdoc, ddoc, host, vm, plan = _docs()
    conv = _conversation(host, vm, plan)
    program = compile_plan(plan, vm, migration="m1").encode()
    agent = [W.encode_hello(W.Hello(1234, W.Role.DESTINATION, "vm", "m1", b"\x01" * 32)),
             W.encode_event(W.Event(0, 22, W.Kind.DECISION, 1, 2, 0x603000000013c000, 5, 6)),
             W.encode_snapshot(W.Snapshot(1, (0x603000000013c000, 0x603000000013c001), ((0x603000000013c000, 7),),
                                          3)),
             W.encode_verify(W.Verify(0, 10, 1, ((0x603000000013c000, 1, 2, 0),)))]
    to_d, to_s = conv[ps.DESTINATION], conv[ps.SOURCE]
    return [
        Target("peer session (destination)", _destination(host, plan), (ProtocolError,),
               [b"".join(to_d), b"".join(to_d[:2]), to_d[0]]),
        Target("peer session (source)", _source(host, vm, plan), (ProtocolError,),
               [b"".join(to_s), b"".join(to_s[:2])]),
        Target("HostCapabilities bytes", S.host_from_bytes, (S.SchemaError,), [S.host_to_bytes(host)]),
        Target("VmProfile bytes", S.vm_from_bytes, (S.SchemaError,), [S.vm_to_bytes(vm)]),
        Target("Plan bytes", S.plan_from_bytes, (S.SchemaError,), [S.plan_to_bytes(plan)]),
        Target("apply program", ApplyProgram.decode, (ProgramError,), [program]),
        Target("agent socket frames", _agent, (W.WireError,), agent + [b"".join(agent)]),
        Target("capability document (JSON)", _json_doc(lambda d: S.host_from_doc(d)), (S.SchemaError,),
               [json.dumps(ddoc).encode()], structured=True),
        Target("VM profile / source document (JSON)", _json_doc(S.load_source), (S.SchemaError,),
               [json.dumps(sdoc).encode(), json.dumps(S.vm_to_doc(vm)).encode()], structured=True),
        Target("daemon config (TOML)", lambda b: parse_config(b.decode("utf-8", "replace")), (ConfigError,),
               [CONFIG.encode()]),
    ]


# --- the mutation engine ----------------------------------------------------------------------------------------
INTERESTING = (0, 1, 2, 7, 8, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0xffff, 0x7fffffff, 0xffffffff)


def mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        n = len(b)
        if op == 0 and n:                                   # flip a bit
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:                                 # a random byte
            b[rng.randrange(n)] = rng.randrange(256)
        elif op == 2 and n >= 4:                            # an interesting u32 (lengths, counts, pointers)
            i = rng.randrange(n - 3)
            struct.pack_into("<I", b, i, rng.choice(INTERESTING))
        elif op == 3 and n:                                 # truncate
            del b[rng.randrange(n):]
        elif op == 4 and n:                                 # delete a range
            i = rng.randrange(n)
            del b[i:i + rng.randint(1, 64)]
        elif op == 5 and n:                                 # duplicate a range
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 256))
            b[i:i] = b[i:j]
        elif op == 6:                                       # insert random bytes
            i = rng.randrange(n + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        else:                                               # splice another seed in
            other = rng.choice(seeds)
            if other:
                i, j = rng.randrange(len(other)), rng.randrange(n + 1)
                b[j:] = other[i:]
    return bytes(b)


def _odd(rng: random.Random):
    deep: object = 0
    for _ in range(rng.choice((3, 50, 5000))):
        deep = [deep]
    return rng.choice((None, True, -1, 0, 2 ** 64, 2 ** 200, -2 ** 63, 1.5, float("nan"), "", "0x", "0xzz",
                       "0x" + "f" * 17, "x" * 300, [], {}, [None], {"": None}, deep))


def mutate_doc(rng: random.Random, data: bytes) -> bytes:
    """A JSON document with 1-3 values (or keys) replaced by odd ones: wrong types, out of range, deep nesting."""
    doc = json.loads(data)
    for _ in range(rng.randint(1, 3)):
        node, path = doc, []
        while isinstance(node, (dict, list)) and node and rng.random() < 0.8:
            key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
            path.append((node, key))
            node = node[key]
        if not path:
            doc = _odd(rng)
            break
        parent, key = path[-1]
        if isinstance(parent, dict) and rng.random() < 0.2:
            parent[rng.choice(("", "0x", "0xzz", "format", "x" * 300, "0x" + "f" * 17))] = parent.pop(key)   # renamed
        else:
            parent[key] = _odd(rng)
    try:
        return json.dumps(doc).encode()
    except (ValueError, RecursionError):
        return b"[]"


def run_target(t: Target, n: int, seed: int = 0) -> tuple[int, list[str]]:
    """n mutated inputs (and the seeds as they are). -> (inputs that ended in a typed error, findings)."""
    rng = random.Random(seed)
    typed, findings = 0, []
    for k in range(n):
        if k < len(t.seeds):
            data = t.seeds[k]
        elif t.structured:
            data = mutate_doc(rng, rng.choice(t.seeds))
        else:
            data = mutate(rng, rng.choice(t.seeds), t.seeds)
        try:
            t.run(data)
        except t.allowed:
            typed += 1
        except Exception as e:  # noqa: BLE001 - what the fuzzer is for
            findings.append(f"{t.name}: {type(e).__name__}: {e} on input {data[:64].hex()}... ({len(data)} bytes)")
            if len(findings) >= 5:
                break
    return typed, findings
