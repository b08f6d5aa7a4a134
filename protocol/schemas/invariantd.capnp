# invariantd wire schemas: HostCapabilities, VmProfile, Plan.
#
# SCHEMA EVOLUTION RULES (read before editing; details in EVOLUTION.md next to this file)
#  1. Never change, reuse or renumber an existing ordinal (@N), never change a field's type, never
#     move a field into or out of a union. New fields are appended with the next free ordinal.
#  2. Never remove a field: rename it to `obsoleteName` and stop writing it. Readers must not depend on it.
#  3. Enums only grow at the end. A reader that meets an enumerant it does not know treats the whole
#     message as the newest version it understands and says so (e.g. an unknown Verdict => refuse).
#  4. The default value of a new field must mean "behave as before the field existed" (0, false, empty).
#     That is how a newer daemon reads an older peer's message: missing fields read as their defaults.
#  5. An older daemon reading a newer message ignores fields it does not know (Cap'n Proto skips them).
#     Anything an older peer MUST understand to be safe goes into a new struct version (see `version`),
#     and the newer daemon refuses to negotiate with a peer that advertises a lower version.
#  6. The plan digest is computed over invariantd's canonical encoding of the decoded dataclasses
#     (protocol/negotiate.py, "invariantd/plan-digest@1"), never over Cap'n Proto bytes, so both daemons
#     agree on it whatever schema version each compiled in. A change to the canonical encoding bumps
#     the digest tag.
@0xde481083ee527c15;

struct RegValue {
  id @0 :UInt64;          # KVM ONE_REG id
  value @1 :UInt64;
}

struct Capability {
  name @0 :Text;          # e.g. "KVM_CAP_ARM_WRITABLE_IMP_ID_REGS"
  value @1 :Int64;        # KVM_CHECK_EXTENSION result
}

struct Implementation {
  midr @0 :UInt64;
  revidr @1 :UInt64;
  aidr @2 :UInt64;
}

struct HostCapabilities {
  version @0 :UInt16 = 1;
  kernelRelease @1 :Text;
  kernelVersion @2 :Text;             # "major.minor"
  arch @3 :Text;                      # "aarch64"
  caps @4 :List(Capability);
  regList @5 :List(UInt64);           # KVM_GET_REG_LIST of a vCPU with the base features
  values @6 :List(RegValue);          # ID / imp-ID / cache / FW registers (and register-list drift candidates)
  hasWritableMasks @7 :Bool;          # false: KVM_ARM_GET_REG_WRITABLE_MASKS not offered (< 6.7)
  writableMasks @8 :List(UInt64);     # 192 entries when hasWritableMasks
  cpuMidrs @9 :List(UInt64);          # per physical CPU (big.LITTLE: more than one distinct value)
  profile @10 :Text;                  # simulated profile name or host name
  vcpuTarget @11 :UInt32;
  baseFeatures @12 :List(Text);
  sveValues @13 :List(RegValue);      # ID registers a vCPU *with SVE* reads differently (ID_AA64PFR0_EL1.SVE,
                                      # ID_AA64ZFR0_EL1; KVM hides them without the feature); empty: no SVE or
                                      # an older daemon (an SVE VM is then planned against the base view)
  pmuValues @14 :List(RegValue);      # ID registers a vCPU *with PMU_V3* reads differently (ID_AA64DFR0_EL1.PMUVer,
                                      # ID_DFR0_EL1.PerfMon); empty: no PMU or an older daemon
  ssbsHiddenValues @15 :List(RegValue);  # firmware registers that read differently once the VM's
                                      # ID_AA64PFR1_EL1.SSBS is written 0 (6.12+: SMCCC_ARCH_WORKAROUND_2's level
                                      # follows the VM's SSBS on a Spectre-v4-mitigated host); empty: no such view
}

struct VmProfile {
  version @0 :UInt16 = 1;
  name @1 :Text;
  revision @2 :UInt32;                # the profile's own version (baseline revision)
  features @3 :List(Text);            # vCPU init features, names from kvmabi.VCPU_FEATURES
  values @4 :List(RegValue);          # the VM's ID / imp-ID / cache / FW register values
  regList @5 :List(UInt64);           # the source vCPU's register list (drift detection); may be empty
  targetImpls @6 :List(Implementation);   # implementations published via BMAP_2 discovery (>= 6.15)
  seenMidrs @7 :List(UInt64);         # MIDRs the guest may have booted/run on (source big.LITTLE)
  sourceKernel @8 :Text;
}

enum Verdict {
  identical @0;
  set @1;          # writable on the destination and safe by the field's rule
  override @2;     # guest-visible change the policy allows: the guest sees the destination's value
  pin @3;          # kept via KVM_CAP_ARM_WRITABLE_IMP_ID_REGS (cap 239)
  drop @4;         # absent on the destination, value equals the reset value
  refuse @5;
}

struct PlanEntry {
  register @0 :Text;
  regId @1 :UInt64;
  field @2 :Text;            # empty: the whole register
  source @3 :UInt64;
  destination @4 :UInt64;
  planned @5 :UInt64;        # value the destination VMM writes (register entries only)
  verdict @6 :Verdict;
  reason @7 :Text;
  guestSees @8 :Text;        # what the guest will see change; empty when nothing
}

struct Plan {
  version @0 :UInt16 = 1;
  vmName @1 :Text;
  destination @2 :Text;
  policy @3 :Text;           # "name@version sha256:..."
  migratable @4 :Bool;
  enableCap239 @5 :Bool;
  targetImpls @6 :List(Implementation);
  bigLittle @7 :Bool;
  assumedCluster @8 :UInt64; # MIDR of the cluster the plan assumes (0: none)
  clusterCpus @9 :List(UInt32);
  entries @10 :List(PlanEntry);
  guestVisible @11 :List(Text);
  notes @12 :List(Text);
  digest @13 :Data;          # sha256 over the canonical encoding (rule 6)
}
