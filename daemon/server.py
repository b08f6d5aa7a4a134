"""invariantd: the daemon. One trio root nursery: peer listener (mutual TLS), orchestrator RPC (Cap'n Proto,
daemon/rpc.py: pycapnp in its own thread, bridged to trio), /metrics, sd_notify watchdog.

    invariantd --config /etc/invariantd/invariantd.toml

SIGTERM/SIGINT: STOPPING=1 to systemd, then a drain: the root scope gets a deadline of now + timeouts.drain,
so in-flight migrations can finish (a source resumes its VM on cancellation, a destination discards).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from functools import partial

import trio

from ..protocol import version
from . import memory, tls
from .config import check_files, Config, ConfigError, load
from .journal import Journal
from .logs import setup_logging
from .metrics import Metrics, serve_metrics
from .peer import PeerConfig, handle_incoming
from .probe import probe
from .resolve import Resolver
from .vms import VmRegistry

log = logging.getLogger("invariantd")
PREPLAN_SLOTS = 16          # incoming connections before their plan at once (x 256 KiB frames: 4 MiB at most)


def sd_notify(state: str) -> bool:
    """Send one sd_notify datagram to $NOTIFY_SOCKET (path or @abstract). False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as e:
        log.warning("sd_notify(%s) failed: %s", state.split("\n")[0], e)
        return False


def watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


async def _watchdog(interval: float, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    while True:
        sd_notify("WATCHDOG=1")
        await trio.sleep(interval)


def make_backend(cfg: Config):
    if cfg.backend.kind == "sim":
        from .sim.host import SimHost
        return SimHost(cfg.backend.sim_profile)
    from .kvm.real import RealKvm
    return RealKvm(cfg.backend.device)


async def run(cfg: Config, *, backend=None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until cancelled or signalled.
    task_status.started({'peer': port, 'metrics': port, 'rpc': port, 'rpc_unix': path}) (what is enabled)."""
    backend = backend or make_backend(cfg)
    journal = open_journal(cfg)
    registry = VmRegistry(backend, journal)
    metrics = Metrics()
    caps = probe(backend, cfg.backend.sim_profile or None)
    metrics.set_host_info(caps)
    pcfg = PeerConfig(node=cfg.node, chunk_registers=cfg.peer.chunk_registers, checksum=cfg.peer.checksum,
                      pipeline_vcpus=cfg.peer.pipeline_vcpus,
                      handshake_timeout=cfg.timeouts.handshake, phase_timeout=cfg.timeouts.phase,
                      apply_timeout=cfg.timeouts.apply, commit_timeout=cfg.timeouts.commit)
    ctx = tls.server_context(cfg.peer.cert, cfg.peer.key or None, cfg.peer.ca)
    resolver = Resolver(registry, cfg.peers, tls.client_context(cfg.peer.cert, cfg.peer.key or None, cfg.peer.ca),
                        pcfg)

    inflight = [0]
    idle = trio.Event()
    preplan = trio.Semaphore(PREPLAN_SLOTS)
    orch = None
    hub = vmm = None
    if cfg.agent.socket:
        from ..protocol import schemas as S
        from ..protocol.policy import default_policy
        from .vmm.hub import AgentHub
        from .vmm.service import VmmService
        hub = AgentHub(cfg.agent.socket, metrics, hold=cfg.agent.hold)
        pol = default_policy()
        host = S.host_from_doc(caps, frozenset(pol.drift)) if caps.get("arch") == "aarch64" else None
        vmm = VmmService(hub, backend=backend, host=host, policy=pol, metrics=metrics, apply_timeout=cfg.timeouts.apply,
                         journal=journal)
    if cfg.rpc.enabled:
        from .rpc import Orchestrator
        key = cfg.peer.key or None
        orch = Orchestrator(cfg, backend=backend, registry=registry, caps=caps, metrics=metrics, peer_cfg=pcfg,
                            client_ctx=tls.client_context(cfg.peer.cert, key, cfg.peer.ca),
                            rpc_client_ctx=tls.client_context(cfg.peer.cert, key, cfg.peer.ca) if cfg.rpc.tls
                            else None, vmm=vmm, resolver=resolver)
        if vmm is not None:
            resolver.vmm_settle = partial(vmm.settle_source, peer_call=orch.peer_rpc)

    async def on_peer(stream, who):
        inflight[0] += 1
        try:
            await handle_incoming(stream, who, backend=backend, registry=registry, caps_doc=caps, cfg=pcfg,
                                  metrics=metrics, preplan_slots=preplan)
            if resolver.unresolved():
                resolver.poke()
        finally:
            inflight[0] -= 1
            memory.note_work()
            if not inflight[0]:
                idle.set()

    listener = tls.PeerListener(on_peer, ctx, cfg.peer.listen, cfg.peer.port,
                                handshake_timeout=cfg.timeouts.handshake,
                                allowed_peers=frozenset(cfg.peer.allowed_peers) or None)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as root:
            ports = {"peer": await root.start(listener.run)}
            await root.start(resolver.run)
            await root.start(memory.trimmer)
            if hub is not None:
                ports["agent"] = await root.start(hub.serve)
            if orch is not None:
                from .rpcserve import serve_rpc
                rpc_ctx = tls.server_context(cfg.peer.cert, cfg.peer.key or None, cfg.peer.ca) if cfg.rpc.tls \
                    else None
                ports.update(await root.start(partial(serve_rpc, orch, cfg.rpc.listen,
                                                      cfg.rpc.port if cfg.rpc.listen else None, cfg.rpc.unix,
                                                      rpc_ctx, handshake_timeout=cfg.timeouts.handshake)))
            if cfg.metrics.enabled:
                ports["metrics"] = await root.start(partial(serve_metrics, metrics, cfg.metrics.listen,
                                                            cfg.metrics.port))
            if cfg.nfd.path:
                from ..protocol import schemas as S
                from ..protocol.policy import default_policy
                from .nfd import publish
                pol = default_policy()
                me = S.host_from_doc(caps, frozenset(pol.drift)) if caps.get("arch") == "aarch64" else None
                await root.start(partial(publish, cfg.nfd.path, cfg.nfd.interval, caps, me, cfg.nfd.baselines, pol))
                ports["nfd"] = cfg.nfd.path
            if cfg.etcd.endpoint:
                from . import etcdpub, fleet
                await root.start(partial(etcdpub.publish, cfg.etcd, cfg.node, caps,
                                         f"{cfg.peer.listen}:{ports['peer']}"))
                ports["etcd"] = fleet.keys(cfg.etcd.prefix, cfg.node, caps)[0]
            wd = watchdog_interval()
            if wd:
                await root.start(_watchdog, wd)
            sd_notify(f"READY=1\nSTATUS=serving peers on {cfg.peer.listen}:{ports['peer']}")
            log.info("invariantd %s ready: peers %s:%s, metrics %s, rpc %s", cfg.node, cfg.peer.listen,
                     ports["peer"], ports.get("metrics", "off"),
                     ports.get("rpc", ports.get("rpc_unix", "off")))
            task_status.started(ports)
            async for sig in signals:
                log.info("signal %s: draining for up to %ss", signal.Signals(sig).name, cfg.timeouts.drain)
                sd_notify("STOPPING=1")
                root.cancel_scope.deadline = min(root.cancel_scope.deadline,
                                                 trio.current_time() + cfg.timeouts.drain)
                if inflight[0]:
                    idle = trio.Event()
                    await idle.wait()                 # migrations in flight finish (or hit the deadline)
                while orch is not None and orch.inflight:
                    await trio.sleep(0.05)            # outgoing migrations too
                root.cancel_scope.cancel()
                break
    registry.close()
    journal.close()


def open_journal(cfg: Config) -> Journal:
    """The journal, and what a restart means, said once: the VMs the previous process held died with it."""
    if not cfg.journal.path:
        log.warning("no [journal] path: migrations and VM whereabouts are kept in memory only; after a restart "
                    "this daemon cannot answer its peers about in-doubt migrations")
        return Journal()
    journal = Journal(cfg.journal.path)
    died, was_open = journal.restarted()
    for v in died:
        log.error("restart: VM %s died %s with the previous daemon process (KVM state cannot outlive it) "
                  "migration=%s peer=%s", v.name, v.state, v.migration or "-", v.peer or "-")
    for m in was_open:
        now = journal.migration(m.id)
        log.warning("restart: migration=%s vm=%s role=%s peer=%s was %s at phase %s: now %s (%s)", m.id, m.vm,
                    m.role, m.peer or "-", m.outcome, m.phase, now.outcome if now else "?", now.detail if now else "")
    return journal


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="invariantd", description="invariantd: arm64 vCPU-state migration daemon")
    ap.add_argument("--config", "-c", default="/etc/invariantd/invariantd.toml", metavar="TOML",
                    help="the daemon's configuration (default: %(default)s)")
    ap.add_argument("--version", action="version", version=f"invariantd {version()}")
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config)
        check_files(cfg, args.config)
    except ConfigError as e:
        print(f"invariantd: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    try:
        trio.run(run, cfg)
    except KeyboardInterrupt:
        pass
    except Exception as e:           # startup failures (bad cert, port in use, /dev/kvm): one clear line
        cause = first_cause(e)
        log.error("invariantd failed: %s", f"{cause}" if str(cause) else type(cause).__name__)
        return 1
    return 0


def first_cause(e: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups: what an operator needs to read."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


if __name__ == "__main__":
    sys.exit(main())
