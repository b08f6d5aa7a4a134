"""Daemon configuration: one TOML file (see deploy/systemd/invariantd.toml.example). Unknown keys are errors."""
from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field, fields, replace

from ..protocol.session import CHECKSUMS


class ConfigError(ValueError):
    """The configuration file is unusable; the message names the file, the key and what is expected."""


@dataclass(frozen=True)
class BackendConfig:
    kind: str = "sim"                       # sim | kvm
    sim_profile: str = ""                   # PROFILE@KERNEL for kind = "sim"
    device: str = "/dev/kvm"


@dataclass(frozen=True)
class PeerSection:
    listen: str = "127.0.0.1"
    port: int = 7443
    cert: str = ""                          # PEM: this node's certificate chain (and key, unless `key` is set)
    key: str = ""
    ca: str = ""                            # PEM: the cluster CA
    allowed_peers: tuple[str, ...] = ()     # certificate CNs; empty = any certificate of the cluster CA
    chunk_registers: int = 4096
    checksum: str = "xxh3"                  # per-chunk checksum; crc32 with a peer older than protocol 3
    pipeline_vcpus: int = 32                # real KVM: stream every N vCPUs read (0: read all, then stream)


@dataclass(frozen=True)
class MetricsSection:
    enabled: bool = True
    listen: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True)
class RpcSection:
    """The orchestrator RPC (protocol/schemas/rpc.capnp). By default only the unix socket (mode 0660: the daemon's
    group may call; callers there are orchestrators). A TCP listener (listen = address) is mutual TLS only
    (tls = true, the peer link's certificate and CA; callers' roles from their certificates, daemon/pki.py)."""
    enabled: bool = True
    listen: str = ""                        # "" = no TCP listener
    port: int = 7444
    unix: str = "/run/invariantd/rpc.sock"  # "" = none
    tls: bool = False
    max_vms_per_caller: int = 64            # createVm quota per caller (certificate name / unix uid)
    max_vcpus_per_caller: int = 1024


@dataclass(frozen=True)
class AgentSection:
    """The unix socket the in-process VMM agents (invariantd-qemu) report to and take their programs from.
    "" = off (no VMM migrations here). The socket is made mode 0660: give the VMM's user the daemon's group."""
    socket: str = ""
    hold: float = 30.0                      # s a destination agent's request waits for its program to be planned


@dataclass(frozen=True)
class JournalSection:
    """The migration journal (daemon/journal.py): a sqlite database that survives kill -9. "" = in memory:
    nothing survives a restart (the daemon says so at start). The unit's StateDirectory is /var/lib/invariantd."""
    path: str = ""


@dataclass(frozen=True)
class NfdSection:
    """node-feature-discovery (daemon/nfd.py): the local feature file the daemon keeps current, "" = off; the
    interval it rewrites it at (the file's expiry is 3 intervals, so a dead daemon's labels go away); the baseline VM
    profiles (`invariantctl baseline -o FILE`) whose acceptance by this host becomes a label each."""
    path: str = ""
    interval: float = 60.0
    baselines: tuple[str, ...] = ()


@dataclass(frozen=True)
class EtcdSection:
    """etcd (daemon/etcdpub.py): endpoint "host:port" ("" = off), the key prefix, the lease TTL (the keys vanish this
    long after the daemon stops refreshing them), and TLS files (ca set: https with this client certificate)."""
    endpoint: str = ""
    prefix: str = "/invariantd"
    ttl: float = 30.0
    ca: str = ""
    cert: str = ""
    key: str = ""


@dataclass(frozen=True)
class PeerEntry:
    """[peers] name = "host:port" (its peer listener), or name = { address = "host:port", rpc = "host:port",
    server_name = "..." } (rpc: its orchestrator RPC, used to fetch its capabilities for `plan`)."""
    name: str
    host: str
    port: int
    rpc: str = ""
    server_name: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Timeouts:
    handshake: float = 10.0
    phase: float = 30.0
    apply: float = 60.0
    commit: float = 30.0
    drain: float = 30.0


@dataclass(frozen=True)
class Config:
    node: str = "invariantd"
    log_level: str = "info"
    backend: BackendConfig = field(default_factory=BackendConfig)
    peer: PeerSection = field(default_factory=PeerSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    timeouts: Timeouts = field(default_factory=Timeouts)
    rpc: RpcSection = field(default_factory=RpcSection)
    agent: AgentSection = field(default_factory=AgentSection)
    journal: JournalSection = field(default_factory=JournalSection)
    nfd: NfdSection = field(default_factory=NfdSection)
    etcd: EtcdSection = field(default_factory=EtcdSection)
    peers: tuple[PeerEntry, ...] = ()

    def find_peer(self, name: str) -> PeerEntry | None:
        for p in self.peers:
            if p.name == name:
                return p
        return None


def split_hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    try:
        p = int(port)
    except ValueError:
        p = -1
    if not sep or not host or not 0 < p < 65536:
        raise ConfigError(f"{what}: expected \"host:port\", got {text!r}")
    return host.strip("[]"), p


def _peers(data) -> tuple[PeerEntry, ...]:
    if not isinstance(data, dict):
        raise ConfigError("peers: expected a table of name = \"host:port\"")
    out = []
    for name, v in data.items():
        if isinstance(v, str):
            host, port = split_hostport(v, f"peers.{name}")
            out.append(PeerEntry(name, host, port))
            continue
        if not isinstance(v, dict):
            raise ConfigError(f"peers.{name}: expected \"host:port\" or a table with address (and rpc)")
        unknown = sorted(set(v) - {"address", "rpc", "server_name"})
        if unknown:
            raise ConfigError(f"peers.{name}: unknown key(s) {', '.join(unknown)} (known: address, rpc, server_name)")
        if not isinstance(v.get("address"), str):
            raise ConfigError(f"peers.{name}.address: expected \"host:port\"")
        host, port = split_hostport(v["address"], f"peers.{name}.address")
        rpc = v.get("rpc", "")
        sn = v.get("server_name", "")
        if not isinstance(rpc, str) or not isinstance(sn, str):
            raise ConfigError(f"peers.{name}: rpc and server_name must be strings")
        if rpc:
            split_hostport(rpc, f"peers.{name}.rpc")
        out.append(PeerEntry(name, host, port, rpc, sn))
    return tuple(out)


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})")
    kw = {}
    defaults = cls()
    for name, value in data.items():
        default = getattr(defaults, name)
        key = f"{where}.{name}" if where else name
        if hasattr(default, "__dataclass_fields__"):
            kw[name] = _build(type(default), value, key)
            continue
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise ConfigError(f"{key}: expected a list of strings")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{key}: expected true or false")
        elif isinstance(default, float):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value <= 0:
                raise ConfigError(f"{key}: expected a positive, finite number of seconds, not {value!r}")
            value = float(value)
        elif isinstance(default, int):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
                raise ConfigError(f"{key}: expected an integer 0..65535")
        elif not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string")
        kw[name] = value
    return cls(**kw)


def parse(text: str, source: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    try:
        peers = _peers(data.pop("peers", {}))
        cfg = _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    cfg = replace(cfg, peers=peers)
    if cfg.backend.kind not in ("sim", "kvm"):
        raise ConfigError(f"{source}: backend.kind must be 'sim' or 'kvm', not {cfg.backend.kind!r}")
    if cfg.backend.kind == "sim" and not cfg.backend.sim_profile:
        raise ConfigError(f"{source}: backend.sim_profile is required for kind = 'sim' (e.g. cortex-a72-r0p4@6.12)")
    if cfg.peer.chunk_registers < 1:
        raise ConfigError(f"{source}: peer.chunk_registers must be at least 1, not {cfg.peer.chunk_registers}")
    if cfg.peer.checksum not in CHECKSUMS:
        raise ConfigError(f"{source}: peer.checksum must be one of {', '.join(CHECKSUMS)}, not {cfg.peer.checksum!r}")
    if not (cfg.peer.cert and cfg.peer.ca):
        raise ConfigError(f"{source}: peer.cert and peer.ca are required (mutual TLS is not optional)")
    if cfg.rpc.enabled and not cfg.rpc.tls and cfg.rpc.listen:
        raise ConfigError(f"{source}: rpc.listen = {cfg.rpc.listen!r} without rpc.tls: the RPC listens on TCP only "
                          f"with mutual TLS (set rpc.tls = true, or leave rpc.listen empty and use the unix socket "
                          f"rpc.unix)")
    if cfg.rpc.enabled and not cfg.rpc.listen and not cfg.rpc.unix:
        raise ConfigError(f"{source}: rpc is enabled with neither rpc.listen nor rpc.unix (set one, or "
                          f"rpc.enabled = false)")
    return cfg


def load(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
    return parse(text, path)


def check_files(cfg: Config, source: str = "<config>") -> None:
    """The files the configuration names exist and can be read: one line naming the key and the path if not."""
    for key, path in (("peer.cert", cfg.peer.cert), ("peer.key", cfg.peer.key), ("peer.ca", cfg.peer.ca)):
        if path and not os.access(path, os.R_OK):
            why = "no such file" if not os.path.exists(path) else "not readable by this user"
            raise ConfigError(f"{source}: {key} = {path!r}: {why}")
