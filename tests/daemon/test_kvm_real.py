"""The binding on this machine's real /dev/kvm (x86: MSRs through ONE_REG, Linux >= 6.18).

Skipped only where /dev/kvm is absent or unusable; the skip says so.
"""
import errno

import pytest

from support.fixtures import real_kvm
from invariantd.protocol.regset import RegisterSet
from invariantd.protocol import regid

pytestmark = pytest.mark.kvm


@pytest.fixture
def kvm():
    k = real_kvm()
    yield k
    k.close()


@pytest.fixture
def vcpu(kvm):
    if kvm.arch != "x86_64":
        pytest.skip("these cases use x86 MSR ids")
    if not kvm.check_extension(70):
        pytest.skip("this kernel's KVM has no ONE_REG for x86 (needs Linux >= 6.18)")
    vm = kvm.create_vm(0)
    v = vm.create_vcpu(0)
    yield v
    vm.close()


TSC, APIC_BASE, UCODE_REV, ARCH_CAPS = (regid.x86_msr(i) for i in (0x10, 0x1B, 0x8B, 0x10A))


def test_api_version_and_one_reg(kvm):
    assert kvm.api_version() == 12
    assert kvm.check_extension(70) in (0, 1)


def test_get_set_one_reg_roundtrip(vcpu):
    assert vcpu.get_reg(APIC_BASE) & 0xFFFFF000 == 0xFEE00000
    vcpu.set_reg(UCODE_REV, 0x100000000)
    assert vcpu.get_reg(UCODE_REV) == 0x100000000


def test_typed_error_names_register_and_errno(vcpu):
    from invariantd.daemon.kvm.errors import KvmError
    with pytest.raises(KvmError) as e:
        vcpu.set_reg(ARCH_CAPS, 1 << 63)
    err = e.value
    assert err.errno_value == errno.EINVAL and err.errno_name == "EINVAL"
    assert err.op == "KVM_SET_ONE_REG" and err.reg_id == ARCH_CAPS
    assert "0x203000020000010a" in str(err) and "EINVAL" in str(err)
    with pytest.raises(KvmError) as e:
        vcpu.get_reg(regid.x86_msr(0xDEADBEEF))
    assert e.value.errno_name == "EINVAL"


def test_reg_list_handshake(vcpu):
    # x86 lists only KVM-defined registers (GUEST_SSP needs SHSTK): the handshake must end with a list
    assert isinstance(vcpu.reg_list(), list)


def test_batch_calls_report_each_errno(vcpu):
    ids = [TSC, regid.x86_msr(0xDEADBEEF), APIC_BASE, UCODE_REV]
    regs, errs = vcpu.get_regs(ids)
    assert errs == [0, errno.EINVAL, 0, 0]
    assert regs.values()[2] == vcpu.get_reg(APIC_BASE) and regs.values()[1] == 0      # 0 where the read failed
    errs = vcpu.set_regs(RegisterSet.from_values([UCODE_REV, ARCH_CAPS, UCODE_REV], [0x200000000, 1 << 63,
                                                                                      0x300000000]))
    assert errs == [0, errno.EINVAL, 0]
    assert vcpu.get_reg(UCODE_REV) == 0x300000000


def test_value_too_wide_is_refused_before_the_ioctl(vcpu):
    from invariantd.daemon.kvm.errors import KvmError
    with pytest.raises(KvmError, match="does not fit 8 bytes"):
        vcpu.set_reg(UCODE_REV, 1 << 64)


def test_run_once_enters_the_guest(vcpu):
    assert isinstance(vcpu.run_once(), str)
