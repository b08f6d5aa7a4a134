/*
 * The C references the apply benches compare against (built by bench/cref.py with the system compiler, loaded with
 * ctypes, called on the same /dev/kvm fds as the Python path so the two can be interleaved in one process).
 *
 * cref_set_loop: a plain loop of KVM_SET_ONE_REG on one vCPU, `rounds` times over n registers.
 * cref_apply:    what a C VMM restoring a VM does (vCPU v's register bytes at all + v * stride) - KVM_CREATE_VM, n_vcpus x KVM_CREATE_VCPU, every register of
 *                every vCPU with KVM_SET_ONE_REG (a refused one read back with KVM_GET_ONE_REG and accepted when
 *                equal, as invariantd's generic path does), then every register read back and compared; closes all.
 * cref_blackout_part: the register traffic of a blackout for vCPUs [lo, hi) of a VM, one thread's share: with
 *                `get`, every register read into its place (the paused source); else every register written and
 *                then read back and compared (a destination whose VM was built beforehand). Several threads call it
 *                on disjoint ranges, as the daemon's worker threads do.
 * All return elapsed nanoseconds (CLOCK_MONOTONIC; cref_apply's without closing the VM, which the Python variants
 * also do outside their timing), or -errno of the first failure that stops them.
 */
#include <errno.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static int64_t now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int reg(int fd, unsigned long req, uint64_t id, void *addr)
{
	struct kvm_one_reg r = { .id = id, .addr = (uint64_t)(uintptr_t)addr };
	return ioctl(fd, req, &r) < 0 ? errno : 0;
}

static size_t reg_size(uint64_t id) { return (size_t)1 << ((id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT); }

int64_t cref_set_loop(int vcpu, const uint64_t *ids, uint8_t *data, const uint64_t *offs, int n, int rounds,
		      int *failures)
{
	int64_t t0 = now();
	int fails = 0;
	for (int r = 0; r < rounds; r++)
		for (int i = 0; i < n; i++)
			fails += reg(vcpu, KVM_SET_ONE_REG, ids[i], data + offs[i]) != 0;
	*failures = fails;
	return now() - t0;
}

int64_t cref_apply(int kvm, int n_vcpus, const uint64_t *ids, const uint8_t *all, uint64_t stride,
		   const uint64_t *offs, int n, int *mismatches)
{
	int64_t t0 = now();
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		return -errno;
	int *fds = calloc(n_vcpus, sizeof(int));
	uint8_t got[256];
	int bad = 0, err = 0;
	for (int v = 0; v < n_vcpus; v++) {
		fds[v] = ioctl(vm, KVM_CREATE_VCPU, v);
		if (fds[v] < 0) { err = -errno; n_vcpus = v; goto out; }
	}
	for (int v = 0; v < n_vcpus; v++) {
		const uint8_t *data = all + v * stride;
		for (int i = 0; i < n; i++)
			if (reg(fds[v], KVM_SET_ONE_REG, ids[i], (void *)(data + offs[i])) &&
			    (reg(fds[v], KVM_GET_ONE_REG, ids[i], got) || memcmp(got, data + offs[i], reg_size(ids[i]))))
				bad++;
	}
	for (int v = 0; v < n_vcpus; v++) {
		const uint8_t *data = all + v * stride;
		for (int i = 0; i < n; i++)
			if (reg(fds[v], KVM_GET_ONE_REG, ids[i], got) || memcmp(got, data + offs[i], reg_size(ids[i])))
				bad++;
	}
out:;
	int64_t took = now() - t0;	/* as the Python variants, which time the apply and close the VM after */
	for (int v = 0; v < n_vcpus; v++)
		close(fds[v]);
	free(fds);
	close(vm);
	*mismatches = bad;
	return err ? err : took;
}

int64_t cref_blackout_part(const int *fds, int lo, int hi, const uint64_t *ids, uint8_t *all, uint64_t stride,
			   const uint64_t *offs, int n, int get, int *mismatches)
{
	int64_t t0 = now();
	uint8_t got[256];
	int bad = 0;
	for (int v = lo; v < hi; v++) {
		uint8_t *data = all + v * stride;
		if (get) {
			for (int i = 0; i < n; i++)
				bad += reg(fds[v], KVM_GET_ONE_REG, ids[i], data + offs[i]) != 0;
			continue;
		}
		for (int i = 0; i < n; i++)
			bad += reg(fds[v], KVM_SET_ONE_REG, ids[i], data + offs[i]) != 0;
		for (int i = 0; i < n; i++)
			bad += reg(fds[v], KVM_GET_ONE_REG, ids[i], got) || memcmp(got, data + offs[i], reg_size(ids[i]));
	}
	*mismatches = bad;
	return now() - t0;
}
