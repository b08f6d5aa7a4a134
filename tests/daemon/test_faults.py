"""Fault injection: two real daemon processes (simulated arm64 hosts, mutual TLS on loopback, journals on disk), a
VM migrated from node-a to node-b, and a fault at each step of it (daemon/failpoints.py): kill -9 of either daemon
and its restart, a daemon stopped past every timeout (SIGSTOP, then SIGCONT), the connection cut. After recovery
the daemons resolve by themselves (peer protocol 5 Inquiry) and the VM runs on exactly one host, or - only when the
process holding the VM's only copy was killed - on none, with that process's journal saying it died there.
It is never runnable on two hosts, at any moment we look."""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from invariantd.client.demo import DST_PROFILE, SRC_PROFILE
from invariantd.daemon.pki import make_pki
from invariantd.daemon.rpcclient import Client, RpcError

VM = "vm-f"
COMMIT = 3                 # s: the commit timeout (a stopped peer is waited for this long); the others are ample
DAEMON = "import sys; from invariantd.daemon.server import main; sys.exit(main(sys.argv[1:]))"




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, d: Path, node: str, profile: str, port: int, peer: str, peer_port: int, pki) -> None:
        self.node, self.dir = node, d
        self.sock, self.db, self.log = d / f"{node}.sock", d / f"{node}.db", d / f"{node}.log"
        self.conf = d / f"{node}.toml"
        self.conf.write_text(f"""node = "{node}"
[backend]
kind = "sim"
sim_profile = "{profile}"
[peer]
port = {port}
cert = "{pki[node]}"
ca = "{pki['ca']}"
[metrics]
enabled = false
[rpc]
listen = ""
port = 0
unix = "{self.sock}"
[timeouts]
handshake = 5
phase = 5
apply = 10
commit = {COMMIT}
drain = 1
[journal]
path = "{self.db}"
[peers]
{peer} = {{ address = "127.0.0.1:{peer_port}", server_name = "localhost" }}
""")
        self.proc: subprocess.Popen | None = None

    def start(self, failpoints: str = "") -> None:
        env = dict(os.environ, INVARIANTD_FAILPOINTS=failpoints)
        env.pop("JOURNAL_STREAM", None)
        self.sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", DAEMON, "--config", str(self.conf)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "a"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.node} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            if self.sock.exists():
                try:
                    self.vms()
                    return
                except RpcError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"{self.node} did not start: {self.log.read_text()[-2000:]}")

    def client(self) -> Client:
        return Client(f"unix:{self.sock}", timeout=5)

    def vms(self) -> dict[str, dict]:
        with self.client() as c:
            return {v["name"]: v for v in c.list_vms()}

    def state(self) -> str | None:
        """The VM's state here; None when not held or the daemon is down; "unknown" when a running daemon did not
        answer (a stopped one, or a slow one under load: asked again by settle)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            v = self.vms().get(VM)
        except RpcError:
            return "unknown"
        return v["state"] if v else None

    def journal_vm(self) -> str:
        with sqlite3.connect(self.db) as db:
            row = db.execute("SELECT state, detail FROM vms WHERE name=?", (VM,)).fetchone()
        return f"{row[0]}: {row[1]}" if row else ""

    def outcome(self) -> str:
        """The journal's outcome of the VM's latest migration here."""
        with sqlite3.connect(self.db) as db:
            row = db.execute("SELECT outcome FROM migrations WHERE vm=? ORDER BY updated DESC LIMIT 1",
                             (VM,)).fetchone()
        return row[0] if row else ""

    def wait_exit(self, timeout: float = 20) -> None:
        self.proc.wait(timeout)

    def wait_stopped(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "T":
                    return
            time.sleep(0.02)
        raise AssertionError(f"{self.node} never reached its stop failpoint: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def pair(tmp_path, pki):
    pa, pb = free_port(), free_port()
    a = Daemon(tmp_path, "node-a", SRC_PROFILE, pa, "node-b", pb, pki)
    b = Daemon(tmp_path, "node-b", DST_PROFILE, pb, "node-a", pa, pki)
    yield a, b
    a.stop()
    b.stop()


def runnable(a: Daemon, b: Daemon) -> list[str]:
    return [d.node for d in (a, b) if d.state() == "running"]


def settle(a: Daemon, b: Daemon, timeout: float = 25) -> list[str]:
    """Wait until nothing is left to resolve; assert at every look that the VM is never runnable on two hosts."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = a.outcome()                 # first: a settled outcome is never older than the states below
        sa, sb = a.state(), b.state()
        where = [d.node for d, st in ((a, sa), (b, sb)) if st == "running"]
        assert len(where) <= 1, f"runnable on {where}"
        if not {sa, sb} & {"in-doubt", "paused", "incoming", "unknown"} and outcome not in ("open", "in-doubt"):
            return where
        if time.monotonic() > deadline:
            raise AssertionError(f"unresolved after {timeout}s: a={a.state()} b={b.state()}; "
                                 f"a log: {a.log.read_text()[-1500:]}\nb log: {b.log.read_text()[-1500:]}")
        time.sleep(0.2)


def migrate(a: Daemon) -> None:
    with a.client() as c:
        c.create_vm(VM, 2)
        mid = c.migrate(VM, "node-b")
        try:
            c.wait(mid, 15000)
        except RpcError:
            pass


# (failpoint, expected holder after recovery; None = the VM died with the killed process that held its only copy)
KILLS = [
    ("source.proposed", None), ("source.paused", None), ("source.streamed", "node-b"),
    ("source.released", "node-b"), ("source.committed", "node-b"),
    ("destination.accepted", "node-a"), ("destination.streamed", "node-a"), ("destination.applied", "node-a"),
    ("destination.committed", "node-a"),      # the source read our Commit, released it; we restart: it never ran here
    ("destination.running", None),
]


def start_with(a: Daemon, b: Daemon, point: str, action: str) -> Daemon:
    """Start both daemons, the one the failpoint belongs to with it armed; -> that one."""
    victim = a if point.startswith("source") else b
    a.start(f"{point}={action}" if victim is a else "")
    b.start(f"{point}={action}" if victim is b else "")
    return victim


@pytest.mark.parametrize("point,holder", KILLS, ids=[p for p, _ in KILLS])
def test_kill_9_and_restart_at_each_step(pair, point, holder):
    a, b = pair
    victim = start_with(a, b, point, "kill")
    migrate(a)
    victim.wait_exit()
    assert victim.proc.returncode == -signal.SIGKILL
    assert len(runnable(a, b)) <= 1
    victim.start()                                    # restarted without the failpoint: it reads its journal
    where = settle(a, b)
    assert where == ([holder] if holder else []), f"runnable on {where}"
    if not holder:                                    # honest: the journal says the VM died with that process
        assert victim.journal_vm().startswith("lost: died"), victim.journal_vm()
    # a daemon that lost a VM with its process answers for it; the survivor never exited
    other = b if victim is a else a
    assert other.proc.poll() is None


@pytest.mark.parametrize("point,holder", [("source.released", "node-b"), ("destination.committed", "node-b")])
def test_a_peer_stopped_past_every_timeout(pair, point, holder):
    a, b = pair
    victim = start_with(a, b, point, "stop")
    with a.client() as c:
        c.create_vm(VM, 2)
        c.migrate(VM, "node-b")
    victim.wait_stopped()
    time.sleep(COMMIT + 1.5)                           # past the commit timeout: the other side is in doubt now
    other = b if victim is a else a
    assert other.state() in ("in-doubt", "released")   # it waits, paused: it neither runs nor drops the VM
    assert len(runnable(a, b)) == 0
    if victim is a:                                    # and says what it waits for
        deadline = time.monotonic() + 10
        while not b.vms()[VM]["waiting"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert b.vms()[VM]["waiting"].startswith("waits for node-a to answer about migration"), b.vms()[VM]
    victim.proc.send_signal(signal.SIGCONT)
    assert settle(a, b) == [holder]


@pytest.mark.parametrize("point,holder", [
    ("source.streamed", "node-a"), ("source.released", "node-b"), ("source.committed", "node-b"),
    ("destination.streamed", "node-a"), ("destination.applied", "node-a"),
    ("destination.committed", "node-b"),      # the source read our Commit before the cut: released -> resolved
    ("destination.running", "node-b"),
])
def test_cut_at_each_step(pair, point, holder):
    a, b = pair
    start_with(a, b, point, "cut")
    migrate(a)
    assert settle(a, b) == [holder]
    assert a.proc.poll() is None and b.proc.poll() is None


def test_cancel_while_the_destination_applies(pair):
    """The operator cancels while the destination holds the applied VM: the source resumes it, and its Abort tells
    the destination to discard its copy at once (not to keep it in doubt)."""
    a, b = pair
    start_with(a, b, "destination.applied", "sleep:2")
    with a.client() as c:
        c.create_vm(VM, 2)
        mid = c.migrate(VM, "node-b")
        deadline = time.monotonic() + 10
        while c.status(mid)["phase"] not in ("apply", "commit") and time.monotonic() < deadline:
            time.sleep(0.02)
        c.cancel(mid)
        st = c.wait(mid, 10000)
    assert st["state"] == "cancelled"
    time.sleep(2.5)                                     # the destination leaves its failpoint and reads the Abort
    assert settle(a, b) == ["node-a"]
    assert b.state() is None and "discarded: the source aborted and kept the VM" in b.journal_vm()


def _sizes(tmp_path, pki) -> tuple[int, int]:
    """Bytes each side sends in one clean migration of the VM (the sweep below cuts across them)."""
    pa, pb = free_port(), free_port()
    a = Daemon(tmp_path, "node-a", SRC_PROFILE, pa, "node-b", pb, pki)
    b = Daemon(tmp_path, "node-b", DST_PROFILE, pb, "node-a", pa, pki)
    try:
        a.start()
        b.start()
        with a.client() as c:
            c.create_vm(VM, 2)
            st = c.wait(c.migrate(VM, "node-b"), 15000)
        assert st["state"] == "committed", st
        return st["bytes_sent"], st["bytes_received"]
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def sizes(tmp_path_factory, pki):
    return _sizes(tmp_path_factory.mktemp("sizes"), pki)


@pytest.mark.parametrize("side,at", [("source", f) for f in (0.01, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 0.99, 0.999)]
                         + [("destination", f) for f in (0.05, 0.3, 0.6, 0.9, 0.97, 0.995)])
def test_cut_across_the_byte_stream(pair, sizes, side, at):
    """The connection breaks after a given share of the bytes one side sends: after recovery the VM runs on exactly
    one host, whichever side the cut came from and wherever it fell."""
    a, b = pair
    total = sizes[0] if side == "source" else sizes[1]
    start_with(a, b, f"{side}.bytes", f"cut:{max(1, int(total * at))}")
    migrate(a)
    assert len(settle(a, b)) == 1
    assert a.proc.poll() is None and b.proc.poll() is None
