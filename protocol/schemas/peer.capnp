@0x9d05b9bbd5860262;
# invariantd peer protocol: the messages two daemons exchange over mutual TLS during one migration.
# Each message is one standard Cap'n Proto stream frame (segment table + segments) holding a Message.
# Documents owned by other schemas (HostCapabilities, Plan) travel as opaque Data (capnp or canonical
# JSON bytes, named by a format string), so this schema does not depend on them.
#
# Conversation (S = source, D = destination):
#   S Hello -> D Hello -> D Capabilities -> S PlanProposal -> D PlanAccept -> D Preflight
#   -> S VcpuChunk* -> S StreamEnd -> D Commit ("applied and verified") -> S Commit ("released")
#   Abort from either side ends it at any point before the final Commit.

struct Hello {
  versions @0 :List(UInt16);      # protocol versions the sender speaks
  node @1 :Text;                  # sender's node name (informational; identity is the TLS certificate)
  role @2 :Role;
  enum Role { source @0; destination @1; }
}

struct Capabilities {
  format @0 :Text;                # e.g. "invariantd/host-capabilities@1"
  doc @1 :Data;                   # the document bytes in that format
}

struct PlanProposal {
  migrationId @0 :Text;
  vmId @1 :Text;
  vcpus @2 :UInt32;
  format @3 :Text;                # format of `plan`
  plan @4 :Data;
  digest @5 :Data;                # sha256 of `plan`; both sides must agree before state moves
}

struct PlanAccept {
  migrationId @0 :Text;
  digest @1 :Data;
}

struct Preflight {
  ok @0 :Bool;
  detail @1 :Text;
  events @2 :List(Text);          # retries / overrides the trial apply needed
}

struct VcpuChunk {
  vmId @0 :Text;
  vcpu @1 :UInt32;
  chunk @2 :UInt32;               # 0, 1, 2... per vCPU
  regIds @3 :List(UInt64);
  values @4 :Data;                # each register's KVM_REG_SIZE(id) bytes, little-endian, in regIds order
  checksumKind @5 :ChecksumKind;
  checksum @6 :Data;              # over vcpu, chunk, regIds and values (see protocol/session.py)
  enum ChecksumKind { crc32 @0; sha256 @1; }
}

struct StreamEnd {
  vmId @0 :Text;
  vcpus @1 :UInt32;
  chunks @2 :UInt32;              # total chunks sent
  digest @3 :Data;                # sha256 over every chunk, in order
}

struct Commit {
  migrationId @0 :Text;
  digest @1 :Data;                # the whole-set digest the sender committed to
}

struct Abort {
  reason @0 :Text;
  code @1 :Text;                  # short machine-readable kind: plan, preflight, apply, stream, timeout, ...
}

struct Message {
  union {
    hello @0 :Hello;
    capabilities @1 :Capabilities;
    planProposal @2 :PlanProposal;
    planAccept @3 :PlanAccept;
    preflight @4 :Preflight;
    vcpuChunk @5 :VcpuChunk;
    streamEnd @6 :StreamEnd;
    commit @7 :Commit;
    abort @8 :Abort;
  }
}
