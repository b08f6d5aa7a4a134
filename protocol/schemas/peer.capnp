@0x9d05b9bbd5860262;
# invariantd peer protocol: the messages two daemons exchange over mutual TLS during one migration.
# Each message is one standard Cap'n Proto stream frame (segment table + segments) holding a Message.
# Documents owned by other schemas (HostCapabilities, VmProfile, Plan: invariantd.capnp) travel as opaque
# Data named by a format string, so this schema does not depend on them.
#
# Conversation (S = source, D = destination):
#   S Hello -> D Hello -> D Capabilities -> S PlanProposal -> D PlanAccept -> D Preflight
#   -> S VcpuChunk* -> S StreamEnd -> D Commit ("applied and verified") -> S Commit ("released")
#   Abort from either side ends it at any point before the final Commit.
#   Protocol 5: instead of a PlanProposal, S may send an Inquiry; D answers (Answer) and the session is done.

struct Hello {
  versions @0 :List(UInt16);      # protocol versions the sender speaks
  node @1 :Text;                  # sender's node name (informational; identity is the TLS certificate)
  role @2 :Role;
  enum Role { source @0; destination @1; }
}

struct Capabilities {
  format @0 :Text;                # "invariantd/host-capabilities@1+capnp" = invariantd.capnp HostCapabilities
  doc @1 :Data;                   # the document bytes in that format
}

struct PlanProposal {
  migrationId @0 :Text;
  vmId @1 :Text;
  vcpus @2 :UInt32;
  format @3 :Text;                # format of `plan`: "invariantd/plan@1" = invariantd.capnp Plan
  plan @4 :Data;                  # the source's plan (for diagnostics: the destination recomputes its own)
  digest @5 :Data;                # the plan digest as its format defines it (plan@1: negotiate.plan_digest);
                                  # the destination recomputes it from vmProfile and its own capabilities
                                  # and echoes it in PlanAccept: both sides agree before any state moves
  vmProfile @6 :Data;             # the negotiation input: invariantd.capnp VmProfile of the source VM
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

# VcpuChunk has a hand-written codec for the stream's hot path (protocol/session/chunkwire.py): a field added
# here must be added there too (CARRIED; tests/protocol/test_session_chunks.py fails until it is).
struct VcpuChunk {
  vmId @0 :Text;
  vcpu @1 :UInt32;                # the (first) vCPU this chunk carries
  chunk @2 :UInt32;               # 0, 1, 2... per vCPU (a multi-vCPU chunk is chunk N of each of its vCPUs)
  regIds @3 :List(UInt64);       # ids as a list (older writers); see regIdsLe
  values @4 :Data;                # each register's KVM_REG_SIZE(id) bytes, little-endian, in regIds order;
                                  # with vcpuCount = n: n such records, vCPU vcpu, vcpu+1, ... in turn
  checksumKind @5 :ChecksumKind;
  checksum @6 :Data;              # over u32 vcpu, u32 chunk, [u32 vcpuCount if > 0], the register ids (u64
                                  # LE) and values: one chunk's bytes end to end (protocol/session/events.py)
  regIdsLe @7 :Data;              # the register ids as packed u64 little-endian (what writers send; readers
                                  # accept regIds instead when this is empty). Both forms: must agree.
  vcpuCount @8 :UInt32;           # protocol 2: vCPUs vcpu..vcpu+vcpuCount-1 share regIds (0 = one vCPU, the
                                  # protocol-1 form); refused in a protocol-1 session
  enum ChecksumKind { crc32 @0; sha256 @1; xxh3 @2; }   # xxh3: XXH3-64, protocol 3 only
}

struct StreamEnd {
  vmId @0 :Text;
  vcpus @1 :UInt32;
  chunks @2 :UInt32;              # total chunks sent
  digest @3 :Data;                # protocol 1: sha256 over every chunk's checksummed bytes, in order.
                                  # protocol 2: sha256("invariantd/stream-digest@2\n" || per chunk in order:
                                  # u32 vcpu, u32 chunk, u32 vcpuCount, u8 checksumKind, u8 checksum length,
                                  # checksum). Sound without hashing every byte twice: TLS (AEAD) protects the
                                  # bytes in transit; each chunk's checksum covers its own bytes end to end and
                                  # is verified on arrival; the chain covers order, completeness and each
                                  # chunk's identity, so a lost, repeated, reordered or altered chunk changes it.
}

struct Commit {
  migrationId @0 :Text;
  digest @1 :Data;                # the whole-set digest the sender committed to
}

struct Abort {
  reason @0 :Text;
  code @1 :Text;                  # short machine-readable kind: plan, preflight, apply, stream, timeout, ...
}

struct Inquiry {                  # protocol 5: what did you decide for this migration, what do you hold?
  migrationId @0 :Text;
  vmId @1 :Text;
}

struct Answer {
  migrationId @0 :Text;
  vmId @1 :Text;
  outcome @2 :Text;               # the journal's: "" (no record), open, committed, aborted, in-doubt, lost
  phase @3 :Text;                 # the last step the journal recorded (source: plan, paused, streamed,
                                  # released, acked; destination: plan, preflight, applied, running)
  vmState @4 :Text;               # the VM's state there now ("" = not held): running, paused, incoming, ...
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
    inquiry @9 :Inquiry;
    answer @10 :Answer;
  }
}
