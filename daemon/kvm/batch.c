/*
 * libivdbatch: the few C entry points invariantd's KVM binding calls through cffi (ABI mode).
 *
 * Why C at all: setting a vCPU's ~250 registers from Python costs one foreign call per register;
 * ivd_set_regs/ivd_get_regs cross once per vCPU and report each register's errno, so the caller
 * can retry exactly the registers that failed. ivd_ioctl wraps a single ioctl without varargs and
 * returns -errno, which keeps errno intact across the FFI boundary.
 *
 * Plain C99 + Linux ioctl only: it builds unchanged for x86_64 and aarch64 (the lab cross-compiles
 * it with aarch64-linux-gnu-gcc for the real arm64 kernels booted under QEMU).
 */
#include <errno.h>
#include <linux/kvm.h>           /* the ioctl numbers and struct kvm_one_reg: from the kernel's own header */
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>

int ivd_abi_version(void) { return 1; }

/* One ioctl with a pointer (or integer) argument. Returns the ioctl's result, or -errno. */
long ivd_ioctl(int fd, unsigned long request, uintptr_t arg)
{
	long r = ioctl(fd, request, arg);
	return r < 0 ? -(long)errno : r;
}

static int one(int fd, unsigned long req, uint64_t id, uint8_t *addr)
{
	struct kvm_one_reg reg = { .id = id, .addr = (uint64_t)(uintptr_t)addr };
	if (ioctl(fd, req, &reg) < 0)
		return errno;
	return 0;
}

/*
 * Apply (or read) n registers of one vCPU. Register i has id ids[i] and its value bytes at
 * data + offs[i] (KVM_REG_SIZE(id) bytes, little-endian as KVM wants). errs[i] receives 0 or the
 * errno of that register's ioctl. Returns the number of registers that failed; never stops early.
 */
int ivd_set_regs(int fd, const uint64_t *ids, uint8_t *data, const uint64_t *offs, int n, int *errs)
{
	int failed = 0;
	for (int i = 0; i < n; i++) {
		errs[i] = one(fd, KVM_SET_ONE_REG, ids[i], data + offs[i]);
		failed += errs[i] != 0;
	}
	return failed;
}

int ivd_get_regs(int fd, const uint64_t *ids, uint8_t *data, const uint64_t *offs, int n, int *errs)
{
	int failed = 0;
	for (int i = 0; i < n; i++) {
		errs[i] = one(fd, KVM_GET_ONE_REG, ids[i], data + offs[i]);
		failed += errs[i] != 0;
	}
	return failed;
}
