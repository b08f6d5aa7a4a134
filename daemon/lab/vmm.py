"""Guest side of the lab's nested QEMU runs: inside an arm64 lab guest whose userland carries Debian's QEMU
(run_many_in_guest(rootfs="q10" | "q11"), see daemon/lab/qemu.py), start `qemu-system-aarch64 -accel kvm` on the
guest's /dev/kvm running the bare-metal payload (daemon/lab/payload/payload.S), drive it over QMP (qemu.qmp) and
read the payload's UART lines.

    python3 -m invariantd.daemon.lab.vmm single [--lines N]
    python3 -m invariantd.daemon.lab.vmm dest   [--listen tcp:0.0.0.0:4444] [--lines N]
    python3 -m invariantd.daemon.lab.vmm source [--dest tcp:10.0.0.1:4444] [--lines N]
      common: [--payload FILE] [--cpu host] [--env K=V]... [--qemu-arg=ARG]... [--cap CAP]... [--no-return-path]
              [--timeout S] [-- EXTRA QEMU ARGS]

Each prints one JSON document (see run_single / run_dest / run_source) and exits 0 when the run went as the role
expects (single: the payload counts; dest: the VM arrived and runs; source: the migration completed), 1 otherwise,
2 on an internal error. The pieces are functions (Qemu, parse_line, run_single, run_dest, run_source) so that
another guest program (the daemon's own QEMU driver, a lab orchestrator running the daemon next to QEMU) can use
them: `Qemu(payload, env={"LD_PRELOAD": ...}, extra_args=[...]).start()`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Callable, Iterable

QEMU_BINARY = "/usr/bin/qemu-system-aarch64"
JOB = "/opt/ivd/job"
PAYLOAD = f"{JOB}/in.payload.elf"          # qemu.run_guest() passes the payload as this job input
MIGRATION_PORT = 4444
RETURN_PATH = "return-path"
FINAL_MIGRATION_STATES = ("completed", "failed", "cancelled")
PAYLOAD_FIELDS = ("n", "t", "f", "midr", "pfr0", "rev")
_LINE = re.compile(r"^P " + " ".join(rf"{f}=([0-9a-f]{{16}})" for f in PAYLOAD_FIELDS) + r"\s*$")
KEEP_LINES = 20                            # payload lines per phase in a report
_T0 = time.monotonic()


def now() -> float:
    """Seconds since this program started (the time base of every timestamp in the reports)."""
    return round(time.monotonic() - _T0, 3)


def console(msg: str) -> None:
    """A marker line on the guest console (the host sees it live, run_many_in_guest(on_line=...)); best effort."""
    try:
        with open("/dev/console", "w") as f:
            f.write(f"@@IVD VMM t={now()} {msg} @@\n")
    except OSError:
        pass


def parse_line(line: str) -> dict | None:
    """A payload line `P n=... t=... f=... midr=... pfr0=... rev=...` -> {field: int}; None for anything else
    (the banner, a line cut by a migration or by quit)."""
    m = _LINE.match(line)
    return dict(zip(PAYLOAD_FIELDS, (int(v, 16) for v in m.groups()))) if m else None


def payload_view(p: dict) -> dict:
    """A parsed payload line as JSON-friendly hex strings (t_s: CNTVCT in seconds)."""
    out = {k: f"0x{p[k]:x}" for k in PAYLOAD_FIELDS}
    out["t_s"] = round(p["t"] / p["f"], 3) if p.get("f") else None
    if "at" in p:
        out["at"] = p["at"]
    return out


def qemu_argv(payload: str, *, qmp: str, cpu: str = "host", incoming: str | None = None,
              extra_args: Iterable[str] = (), memory_mb: int = 64, binary: str = QEMU_BINARY,
              accel: str = "kvm") -> list[str]:
    """The QEMU command line: one vCPU under KVM on -machine virt (GICv3), the payload as -kernel, its UART on
    stdout, QMP on the unix socket `qmp`; `incoming` ("defer", "tcp:...") makes it a migration destination."""
    argv = [binary, "-accel", accel, "-machine", "virt,gic-version=3", "-cpu", cpu, "-smp", "1",
            "-m", str(memory_mb), "-nodefaults", "-display", "none", "-serial", "stdio", "-monitor", "none",
            "-qmp", f"unix:{qmp},server=on,wait=off", "-kernel", payload]
    if incoming:
        argv += ["-incoming", incoming]
    return argv + list(extra_args)


class QmpError(RuntimeError):
    """A QMP command failed (error reply, or the connection is gone)."""


class Qemu:
    """One qemu-system-aarch64 -accel kvm running the payload.

    env: extra environment for the QEMU process (e.g. {"LD_PRELOAD": "/tmp/agent.so"}), on top of ours.
    extra_args: appended to the command line. incoming: see qemu_argv. name: tells sockets and reports apart.
    binary / accel: another QEMU, "tcg" (e.g. to try this module on a host without arm64 KVM).

    After start(): `lines` / `stderr` are [(t, text)] as they arrive (t = now()); payload(since) the parsed payload
    lines; qmp(cmd, **args) a QMP command's return value (QmpError on failure); stop() ends QEMU, -> exit code."""

    def __init__(self, payload: str = PAYLOAD, *, cpu: str = "host", incoming: str | None = None,
                 env: dict | None = None, extra_args: Iterable[str] = (), name: str = "vm",
                 memory_mb: int = 64, binary: str = QEMU_BINARY, accel: str = "kvm", workdir: str = "/tmp"):
        self.name = name
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.qmp_path = os.path.join(workdir, f"ivd-qmp-{name}.sock")
        self.payload_path = os.path.join(workdir, f"ivd-payload-{name}.elf")
        shutil.copyfile(payload, self.payload_path)      # off the 9p job share
        self.argv = qemu_argv(self.payload_path, qmp=self.qmp_path, cpu=cpu, incoming=incoming,
                              extra_args=extra_args, memory_mb=memory_mb, binary=binary, accel=accel)
        self.lines: list[tuple[float, str]] = []
        self.stderr: list[tuple[float, str]] = []
        self.events: list[dict] = []
        self.proc: subprocess.Popen | None = None
        self.t_start: float | None = None
        self.exited_by_itself: bool | None = None
        self._mon = None

    # -- process
    def start(self) -> "Qemu":
        if os.path.exists(self.qmp_path):
            os.unlink(self.qmp_path)
        self.t_start = now()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={**os.environ, **self.env})
        for stream, sink in ((self.proc.stdout, self.lines), (self.proc.stderr, self.stderr)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True,
                             name=f"qemu-{self.name}-pump").start()
        console(f"qemu-started name={self.name} pid={self.proc.pid}")
        return self

    @staticmethod
    def _pump(stream, sink: list) -> None:
        for raw in stream:
            sink.append((now(), raw.decode("utf-8", "replace").rstrip("\r\n")))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10) -> int:
        """quit over QMP, else SIGTERM, else SIGKILL; -> QEMU's exit code."""
        if self.exited_by_itself is None:
            self.exited_by_itself = not self.running()
        if self.running():
            try:
                self.qmp("quit")
            except QmpError:
                pass
            if self.wait_exit(timeout) is None:
                self.proc.terminate()
                if self.wait_exit(5) is None:
                    self.proc.kill()
                    self.proc.wait()
        self.close_qmp()
        time.sleep(0.2)             # let the pump threads drain the pipes
        return self.proc.returncode

    # -- serial
    def payload(self, since: int = 0, until: int | None = None) -> list[dict]:
        """Parsed payload lines of serial line indexes [since, until), each with "at" (its now() time)."""
        out = []
        for t, text in self.lines[since:until]:
            p = parse_line(text)
            if p:
                out.append({**p, "at": t})
        return out

    def wait_payload(self, count: int, timeout: float, since: int = 0) -> bool:
        """Wait until `count` payload lines arrived after serial line index `since`; False on timeout or exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.payload(since)) >= count:
                return True
            if not self.running():
                return len(self.payload(since)) >= count
            time.sleep(0.05)
        return False

    def stderr_tail(self, n: int = 40) -> list[str]:
        return [text for _, text in self.stderr[-n:]]

    # -- QMP
    def connect_qmp(self, timeout: float = 60):
        """Connect to QEMU's QMP socket (retrying until it exists), negotiate; -> the QEMUMonitorProtocol."""
        from qemu.qmp.legacy import QEMUMonitorProtocol
        deadline = time.monotonic() + timeout
        while True:
            mon = QEMUMonitorProtocol(self.qmp_path)
            try:
                mon.connect()
                mon.settimeout(30)
                self._mon = mon
                return mon
            except Exception as e:  # noqa: BLE001 - ConnectError, OSError while QEMU comes up
                if not self.running():
                    raise QmpError(f"QEMU exited (rc {self.proc.returncode}) before QMP answered") from e
                if time.monotonic() > deadline:
                    raise QmpError(f"QMP {self.qmp_path}: no answer within {timeout}s: {e}") from e
                time.sleep(0.1)

    def qmp(self, cmd: str, **args):
        """Run a QMP command; -> its return value. QmpError when not connected, on an error reply, or when the
        connection breaks (QEMU exited)."""
        if self._mon is None:
            raise QmpError(f"{cmd}: QMP not connected")
        try:
            ret = self._mon.cmd(cmd, **args)
            self.events += [{"at": now(), **e} for e in self._mon.get_events()]
            return ret
        except Exception as e:  # noqa: BLE001 - qemu.qmp raises ExecuteError, StateError, EOFError...
            raise QmpError(f"{cmd}: {type(e).__name__}: {e}") from e

    def try_qmp(self, cmd: str, **args) -> dict:
        """A QMP command for a report: {"return": ...} or {"error": "..."}; never raises."""
        try:
            return {"return": self.qmp(cmd, **args)}
        except QmpError as e:
            return {"error": str(e)}

    def close_qmp(self) -> None:
        if self._mon is not None:
            try:
                self._mon.close()
            except Exception:  # noqa: BLE001 - the peer may be gone
                pass
            self._mon = None

    def set_capabilities(self, caps: Iterable[str]) -> None:
        caps = list(caps)
        if caps:
            self.qmp("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])

    def status(self) -> str | None:
        """query-status' status ("running", "paused", "inmigrate", "postmigrate"...), None when QMP is gone."""
        try:
            return self.qmp("query-status").get("status")
        except QmpError:
            return None

    def report(self) -> dict:
        """What this QEMU was and how it ended (call after stop())."""
        return {"name": self.name, "argv": self.argv, "env": self.env,
                "rc": self.proc.returncode if self.proc else None, "exited_by_itself": self.exited_by_itself,
                "started_at": self.t_start, "serial_lines": len(self.lines), "stderr_tail": self.stderr_tail(),
                "events": [{k: e.get(k) for k in ("at", "event", "data")} for e in self.events[-20:]]}


# --------------------------------------------------------------------------- roles

def _base(role: str) -> dict:
    return {"role": role, "kernel": os.uname().release}


def _error(e: BaseException) -> dict:
    import traceback
    return {"kind": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()[-3000:]}


def _counting(lines: list[dict]) -> bool:
    return len(lines) >= 2 and all(b["n"] > a["n"] for a, b in zip(lines, lines[1:]))


def run_single(payload: str = PAYLOAD, *, lines: int = 3, timeout: float = 120, cpu: str = "host",
               env: dict | None = None, extra_args: Iterable[str] = (),
               on_ready: Callable[[Qemu], None] | None = None) -> tuple[int, dict]:
    """Run the payload under -accel kvm until `lines` payload lines arrived; -> (exit code, report):
    lines (parsed), first_line_after_s (QEMU start to the first payload line), query_kvm, query_status,
    query_version, query_name, qemu (Qemu.report()). Exit code 0 when the counter increased over the lines."""
    out = _base("single")
    q = Qemu(payload, cpu=cpu, env=env, extra_args=extra_args, name="single").start()
    try:
        q.connect_qmp(timeout)
        if on_ready:
            on_ready(q)
        got = q.wait_payload(lines, timeout)
        pl = q.payload()
        out["first_line_after_s"] = round(pl[0]["at"] - q.t_start, 3) if pl else None
        for c in ("query-kvm", "query-status", "query-version", "query-name"):
            out[c.replace("-", "_")] = q.try_qmp(c)
        out["lines"] = [payload_view(p) for p in pl[:KEEP_LINES]]
        out["complete"] = got
    except Exception as e:  # noqa: BLE001 - the report says what happened, with QEMU's side
        out["error"] = _error(e)
    finally:
        q.stop()
        out["qemu"] = q.report()
    return (0 if out.get("complete") and _counting(q.payload()) else 1), out


def run_dest(payload: str = PAYLOAD, *, listen: str = f"tcp:0.0.0.0:{MIGRATION_PORT}",
             caps: Iterable[str] = (RETURN_PATH,), lines: int = 3, timeout: float = 180, cpu: str = "host",
             env: dict | None = None, extra_args: Iterable[str] = (), linger: float = 2.0,
             on_ready: Callable[[Qemu], None] | None = None) -> tuple[int, dict]:
    """Migration destination: QEMU with -incoming defer, the capabilities `caps`, migrate-incoming `listen`; wait
    (up to `timeout`) until the VM runs or QEMU exits; when it runs, collect `lines` payload lines.
    -> (exit code, report): arrived (bool), status, query_migrate, lines (parsed, all after arrival), qemu
    (rc, exited_by_itself, stderr_tail...). Exit code 0 when the VM arrived and its payload counts on."""
    out = _base("dest")
    q = Qemu(payload, cpu=cpu, incoming="defer", env=env, extra_args=extra_args, name="dest").start()
    try:
        q.connect_qmp(60)
        q.set_capabilities(caps)
        out["caps"] = list(caps)
        q.qmp("migrate-incoming", uri=listen)
        out["listening_at"] = now()
        console(f"dest-listening uri={listen}")
        if on_ready:
            on_ready(q)
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline and q.running():
            status = q.status()
            if status in (None, "running"):
                break
            time.sleep(0.2)
        out["status"] = status
        out["arrived"] = status == "running"
        out["decided_at"] = now()
        console(f"dest-decided status={status} qemu_running={q.running()}")
        if out["arrived"]:
            out["query_migrate"] = q.try_qmp("query-migrate")
            q.wait_payload(lines, 60)
            out["query_status"] = q.try_qmp("query-status")
            time.sleep(linger)
        else:
            q.wait_exit(10)         # a failed load: QEMU exits by itself; give it the time to say why
        out["lines"] = [payload_view(p) for p in q.payload()[:KEEP_LINES]]
    except Exception as e:  # noqa: BLE001 - the report says what happened, with QEMU's side
        out["error"] = _error(e)
    finally:
        q.stop()
        out["qemu"] = q.report()
    return (0 if out.get("arrived") and _counting(q.payload()) else 1), out


def run_source(payload: str = PAYLOAD, *, dest: str = f"tcp:10.0.0.1:{MIGRATION_PORT}",
               caps: Iterable[str] = (RETURN_PATH,), lines: int = 2, timeout: float = 120,
               connect_wait: float = 150, cpu: str = "host", env: dict | None = None,
               extra_args: Iterable[str] = (), linger: float = 3.0,
               on_ready: Callable[[Qemu], None] | None = None) -> tuple[int, dict]:
    """Migration source: run the payload until `lines` payload lines arrived, set `caps`, `migrate` to `dest`
    (retried while the destination does not accept connections, up to `connect_wait` s), poll query-migrate to a
    final state, then watch the VM: when it runs again (a failed migration with return-path), collect `lines` more
    payload lines. -> (exit code, report): lines_before (parsed, up to the last `migrate`), lines_during (how many
    while it ran), last_n_before_decision (hex), lines_after (parsed, printed after query-migrate's final state),
    query_migrate (final), migrate_attempts, status_after (query-status right after), resumed (bool: the payload
    counted on past every value it printed before the decision), query_status, qemu. Exit code 0 when the
    migration completed."""
    out = _base("source")
    q = Qemu(payload, cpu=cpu, env=env, extra_args=extra_args, name="source").start()
    final: dict = {}
    try:
        q.connect_qmp(60)
        if not q.wait_payload(lines, timeout):
            raise QmpError(f"the payload printed fewer than {lines} lines within {timeout}s")
        q.set_capabilities(caps)
        out["caps"] = list(caps)
        if on_ready:
            on_ready(q)
        deadline = time.monotonic() + connect_wait
        attempts, tries = 0, []
        while True:
            attempts += 1
            migrate_mark = len(q.lines)
            out["migrate_at"] = now()
            q.qmp("migrate", uri=dest)
            while True:
                final = q.qmp("query-migrate")
                if final.get("status") in FINAL_MIGRATION_STATES:
                    break
                time.sleep(0.1)
            tries.append({"at": now(), "status": final.get("status"), "error-desc": final.get("error-desc")})
            # retry only while the destination QEMU does not listen yet ("Failed to connect to '...': Connection
            # refused"); a failure after the stream started is the answer
            if final.get("status") != "failed" or time.monotonic() > deadline or \
                    not (final.get("error-desc") or "").startswith("Failed to connect"):
                break
            time.sleep(1.0)
        out["migrate_attempts"] = attempts
        out["failed_connects"] = tries[:-1][-5:]
        out["query_migrate"] = final
        out["decided_at"] = now()
        console(f"source-decided status={final.get('status')} attempts={attempts}")
        time.sleep(0.5)             # lines printed before the decision are through the pipe
        mark = len(q.lines)
        out["status_after"] = q.status()
        if out["status_after"] == "running":
            q.wait_payload(lines, 60, since=mark)
        before, during, after = q.payload(0, migrate_mark), q.payload(migrate_mark, mark), q.payload(mark)
        last = max((p["n"] for p in before + during), default=-1)
        out["lines_before"] = [payload_view(p) for p in before[-KEEP_LINES:]]
        out["lines_during"] = len(during)
        out["last_n_before_decision"] = f"0x{last:x}"
        out["lines_after"] = [payload_view(p) for p in after[:KEEP_LINES]]
        out["resumed"] = any(p["n"] > last for p in after)
        out["query_status"] = q.try_qmp("query-status")
        time.sleep(linger)          # let the destination finish (or fail) before this end goes away
    except Exception as e:  # noqa: BLE001 - the report says what happened, with QEMU's side
        out["error"] = _error(e)
    finally:
        q.stop()
        out["qemu"] = q.report()
    return (0 if final.get("status") == "completed" else 1), out


# --------------------------------------------------------------------------- CLI

def _env_pairs(items) -> dict:
    env = {}
    for it in items or ():
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise SystemExit(f"--env {it!r}: expected KEY=VALUE")
        env[k] = v
    return env


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python3 -m invariantd.daemon.lab.vmm",
                                 description="run the lab payload under the guest's QEMU -accel kvm")
    ap.add_argument("role", choices=("single", "source", "dest"))
    ap.add_argument("--payload", default=PAYLOAD)
    ap.add_argument("--cpu", default="host", help="QEMU -cpu of the nested VM (default host)")
    ap.add_argument("--env", action="append", metavar="K=V", help="extra environment for QEMU (repeatable)")
    ap.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                    help="extra QEMU argument (repeatable; --qemu-arg=-foo); also everything after --")
    ap.add_argument("--cap", action="append", metavar="CAP", help="migration capability (repeatable)")
    ap.add_argument("--no-return-path", action="store_true", help="do not set the return-path capability")
    ap.add_argument("--lines", type=int, default=None, help="payload lines to collect (per phase)")
    ap.add_argument("--dest", default=f"tcp:10.0.0.1:{MIGRATION_PORT}", help="source: migration URI")
    ap.add_argument("--listen", default=f"tcp:0.0.0.0:{MIGRATION_PORT}", help="dest: migrate-incoming URI")
    ap.add_argument("--timeout", type=float, default=None, help="seconds to wait for the role's main event")
    ap.add_argument("--connect-wait", type=float, default=150, help="source: retry the migration this long")
    ap.add_argument("--linger", type=float, default=None)
    a = ap.parse_args(argv)
    caps = list(dict.fromkeys(([] if a.no_return_path else [RETURN_PATH]) + (a.cap or [])))
    kw = {"cpu": a.cpu, "env": _env_pairs(a.env), "extra_args": a.qemu_arg + extra}
    for k in ("lines", "timeout", "linger"):
        if getattr(a, k) is not None:
            kw[k] = getattr(a, k)
    try:
        if a.role == "single":
            kw.pop("linger", None)
            rc, out = run_single(a.payload, **kw)
        elif a.role == "dest":
            rc, out = run_dest(a.payload, listen=a.listen, caps=caps, **kw)
        else:
            rc, out = run_source(a.payload, dest=a.dest, caps=caps, connect_wait=a.connect_wait, **kw)
    except Exception as e:  # noqa: BLE001 - report anything as JSON
        import traceback
        rc, out = 2, {"role": a.role, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    out["program_s"] = now()
    json.dump(out, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
