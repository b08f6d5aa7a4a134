# invariantd orchestrator RPC: the control plane an orchestrator (any language with Cap'n Proto RPC) calls.
#
# Transport: standard Cap'n Proto two-party RPC (rpc-twoparty.capnp) over TCP (default 127.0.0.1:7444) or a
# unix socket, optionally inside mutual TLS (the cluster CA of the peer link). The bootstrap capability is an
# `Orchestrator`: bootstrap(), cast to Orchestrator, call listVms(). The `capnp` tool itself encodes and decodes
# messages but makes no RPC calls; client/examples/list_vms.c++ is a complete C++ orchestrator (stock EzRpcClient,
# unix socket; how to build it is in the file). Tested with: pycapnp 2.2.4 (the daemon and invariantctl) and
# Debian 12's Cap'n Proto 0.9.2 C++ library (tests/client/test_cpp_client.py builds and runs the example).
#
# Errors: every result carries `error :Error`. `error.kind == ok` (the default, also when the pointer is unset)
# means success; anything else means the other result fields are unset and `error.message` says what happened
# and what to do. Cap'n Proto exceptions (type `failed`) only signal bugs or a broken connection.
#
# Evolution: the rules of invariantd.capnp (EVOLUTION.md) apply: append-only ordinals, enums grow at the end,
# new methods take the next method ordinal. A client meeting an unknown ErrorKind treats it as `internal`.
@0x98294ef5f3b3afb9;

using Inv = import "invariantd.capnp";

enum ErrorKind {
  ok @0;
  badRequest @1;       # malformed argument (invariantctl exit 2)
  notFound @2;         # no such VM / peer / migration (exit 2)
  conflict @3;         # VM exists, VM not in a state that allows this (exit 2)
  refused @4;          # the plan says not migratable (exit 3)
  unreachable @5;      # peer daemon unreachable / TLS refused (exit 4)
  kvm @6;              # KVM ioctl or apply error (exit 5)
  migrationFailed @7;  # migration aborted, cancelled or in doubt (exit 7)
  internal @8;         # daemon bug (exit 1)
  forbidden @9;        # the caller's role may not call this, or its quota is used up (exit 8)
}

struct Error {
  kind @0 :ErrorKind;
  message @1 :Text;
}

struct IdRegister {
  name @0 :Text;            # e.g. MIDR_EL1
  id @1 :UInt64;            # KVM ONE_REG id
  value @2 :UInt64;
  fields @3 :Text;          # non-zero fields, "Name=0x.. Name=0x.."
}

struct VmInfo {
  name @0 :Text;
  state @1 :Text;           # running | paused | released | incoming | in-doubt
  nVcpus @2 :UInt32;
  features @3 :List(Text);  # vCPU init features (arm64), e.g. PSCI_0_2
  arch @4 :Text;
  origin @5 :Text;          # created | incoming | adopted
  history @6 :List(Text);   # state transitions, oldest first
  idRegisters @7 :List(IdRegister);   # inspectVm only: ID / imp-ID / FW summary of vCPU 0
  registerCount @8 :UInt32; # registers listed on vCPU 0 (inspectVm only)
  migration @9 :Text;       # the migration that last moved it ("" = none)
  peer @10 :Text;           # that migration's peer
  waiting @11 :Text;        # in-doubt / released: what its resolution waits for ("" = nothing)
}

struct PlanResult {
  migratable @0 :Bool;
  digest @1 :Data;          # sha256 over the canonical plan encoding (both daemons agree on it)
  json @2 :Data;            # the plan document (invariantctl plan --json format), UTF-8 JSON
  plan @3 :Inv.Plan;        # the same plan as a struct (unset when the hosts are not arm64)
  destination @4 :Text;     # peer name
}

enum MigrationState {
  running @0;
  committed @1;
  failed @2;
  cancelled @3;
  inDoubt @4;
}

struct MigrationStatus {
  id @0 :Text;
  vm @1 :Text;
  toHost @2 :Text;
  state @3 :MigrationState;
  phase @4 :Text;           # connecting | handshake | plan | preflight | stream | apply | commit | done
  bytesSent @5 :UInt64;     # peer-link bytes (after TLS decryption: protocol bytes)
  bytesReceived @6 :UInt64;
  vcpusDone @7 :UInt32;
  vcpusTotal @8 :UInt32;
  registersSent @9 :UInt64;
  startedUnixMs @10 :UInt64;
  elapsedMs @11 :UInt64;
  result @12 :Text;         # committed | aborted | cancelled | in-doubt | "" while running
  error @13 :Error;         # why it failed (kind ok while running or committed)
  planDigest @14 :Data;
  detail @15 :Data;         # JSON, may be empty: for a QEMU migration the destination agent's decisions and
                            # read-backs ({"destination": {"applied", "running", "failed", "agent", "qemu"}})
}

struct Peer {
  name @0 :Text;
  address @1 :Text;         # host:port of its peer listener
  rpc @2 :Text;             # host:port of its RPC service, when configured
}

interface Orchestrator {
  caps @0 (host :Text) -> (error :Error, json :Data, host :Inv.HostCapabilities);
  # host "" = this daemon; a peer name = that peer's document (fetched over its RPC or the peer link).
  # json: the capability document (invariantctl probe --json); host: the same as a struct (arm64 only).
  listVms @1 () -> (error :Error, vms :List(VmInfo));
  createVm @2 (name :Text, nVcpus :UInt32, features :List(Text)) -> (error :Error, vm :VmInfo);
  # features: vCPU init feature names (arm64); empty = the host's base features (PSCI_0_2)
  inspectVm @3 (name :Text) -> (error :Error, vm :VmInfo);
  plan @4 (vm :Text, toHost :Text) -> (error :Error, result :PlanResult);
  migrate @5 (vm :Text, toHost :Text) -> (error :Error, migrationId :Text);
  # returns once the migration started; poll status(). Plan refusal is reported here when known up front.
  status @6 (migrationId :Text) -> (error :Error, status :MigrationStatus);
  listMigrations @7 () -> (error :Error, migrations :List(MigrationStatus));
  cancel @8 (migrationId :Text) -> (error :Error, status :MigrationStatus);
  # before the destination's Commit: the VM resumes here. After it: too late (the status says so).
  peers @9 () -> (error :Error, peers :List(Peer), node :Text);
  wait @10 (migrationId :Text, timeoutMs :UInt32) -> (error :Error, status :MigrationStatus);
  # returns when the migration ends or after timeoutMs (0 = 30 s), whichever comes first

  # --- VMs a VMM runs (QEMU started by invariantd-qemu: the in-process agent reports to this daemon) ---
  listVmms @11 () -> (error :Error, json :Data);
  # every VMM agent seen here: pid, role, VM name, migration, vCPUs snapshotted, decisions, read-backs (JSON list)
  prepareVmm @12 (vm :Text, migrationId :Text, profile :Data, digest :Data) -> (error :Error, json :Data);
  # destination: plan the VM (profile: an Inv.VmProfile message, the guest's real ID registers) against this host
  # (the plan digest must equal `digest`), pre-flight it on a scratch VM, and hold the compiled program for the
  # destination QEMU's agent (matched by its INVARIANTD_MIGRATION, else by its VM name). Refused: nothing moves.
  incomingVmm @13 (migrationId :Text, qmp :Text, uri :Text) -> (error :Error, json :Data);
  # destination: the QEMU started with -incoming defer (QMP socket path `qmp`): return-path on, migrate-incoming uri
  vmmStatus @14 (migrationId :Text) -> (error :Error, json :Data);
  # destination: {"applied", "running", "failed", "agent", "qemu"} for that migration (JSON)
  migrateVmm @15 (vm :Text, toHost :Text, qmp :Text, uri :Text, destQmp :Text) -> (error :Error, migrationId :Text);
  # source: plan from the source agent's snapshot, the peer's prepareVmm (and incomingVmm when destQmp is set),
  # QEMU's migration to `uri` with return-path and pause-before-switchover, the switchover only once the
  # destination agent applied and verified the plan, the source QEMU quit once the destination guest runs;
  # on any failure before that the source guest resumes. Follow it with status() / wait().

  # --- operators
  removeVm @16 (name :Text) -> (error :Error);
  # a running VM of this daemon's own, or a released one (kept for inspection): gone. In a migration / in doubt: conflict.
  resolveVm @17 (name :Text, peer :Text, action :Text) -> (error :Error, vm :VmInfo);
  # an in-doubt or released VM, after asking `peer` what it holds: action "resume" (only when the peer holds no
  # copy that could run) or "discard" (only when the peer runs it). vm: the VM after a resume (unset after discard).
  vmProfile @18 (name :Text) -> (error :Error, json :Data);
  # the VM as the planner sees it (invariantctl plan --from's VM profile JSON), read from its vCPUs now: what
  # `invariantctl fleet plan VM --daemon ADDR` plans against every host of a fleet
}
