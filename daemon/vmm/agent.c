/* invariantd in-process VMM agent: loaded into a VMM (QEMU first) with LD_PRELOAD, it interposes ioctl() for
 * KVM file descriptors only (request type KVMIO, 0xAE); every other ioctl goes straight to libc.
 *
 * Why in-process: KVM answers EIO to every VM / vCPU ioctl from a process other than the VM's creator
 * (virt/kvm/kvm_main.c: kvm->mm != current->mm), so the daemon cannot touch a VMM's vCPUs from outside.
 *
 * It runs the apply program the two daemons agreed (protocol/program.py; bytes: protocol/schemas/AGENT.md) and
 * decides nothing itself:
 *   destination  cap 239 on the VM before its first vCPU when the program pins; the program's registers written
 *                at the vCPU's first KVM_SET_ONE_REG, before any other vCPU state, then read back (VERIFY); each
 *                KVM_SET_ONE_REG of a planned register writes the planned value (one ioctl), a failure is
 *                handled by the program's action for its errno; KVM_GET_REG_LIST / KVM_GET_ONE_REG answered for
 *                the drift registers the program lists; a read-back at the first KVM_RUN
 *   source       before a vCPU's first KVM_RUN (when its ID registers are fixed) its register list and ID-like
 *                values go to the daemon (SNAPSHOT)
 * No daemon, no program, a program for another migration or another plan digest: it passes through and says so
 * on stderr. Every decision goes to the daemon (EVENT).
 *
 * Environment: INVARIANTD_AGENT_SOCKET (default /run/invariantd/agent.sock), INVARIANTD_AGENT_ROLE
 * (source | destination; default: destination when the command line has -incoming), INVARIANTD_MIGRATION
 * (the migration this VMM belongs to), INVARIANTD_PLAN_DIGEST (64 hex: the digest the program must carry),
 * INVARIANTD_VM (the VM's name), INVARIANTD_AGENT_WAIT (seconds to wait for the program, default 10),
 * INVARIANTD_AGENT_QUIET (no stderr lines).
 * Written by hand: no library interposes ioctl() for us, and a VMM's address space is no place for a runtime. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* arm64-only requests: their argument structs exist only in arm64's <asm/kvm.h>, so spelled by size here */
#define IVD_KVM_ARM_VCPU_INIT _IOW(KVMIO, 0xae, char[32])
#define IVD_CAP_WRITABLE_IMP_ID_REGS 239

/* --- the program (layout: protocol/program.py, protocol/schemas/AGENT.md) --------------------------------- */
enum { A_FAIL, A_ACCEPT_DESTINATION, A_WRITE_FALLBACK, A_DROP, A_REPLAY, A_RETRY, A_KEEP_IF_EQUAL };
enum { S_EINVAL, S_EINVARIANT, S_EBUSY, S_ENOENT };
#define OP_LISTED 1
#define HAS_WRITE 1
#define HAS_FALLBACK 2
struct op { uint64_t id, write, fallback; uint8_t verdict, act[4], flags, has; };
#define PROG_HEADER 112
#define PROG_OP 32

/* --- agent wire (protocol/agentwire.py) -------------------------------------------------------------------- */
enum { T_HELLO = 1, T_PROGRAM, T_NO_PROGRAM, T_EVENT, T_SNAPSHOT, T_VERIFY };
enum { K_OVERRIDE = 1, K_DECISION, K_CAP239, K_LISTED, K_PASSTHROUGH };
enum { ROLE_UNKNOWN, ROLE_SOURCE, ROLE_DESTINATION };

#define MAXFD 4096
enum { F_NONE, F_VM, F_VCPU };

struct vcpu {
    int index, inited, ran, failed;
    uint32_t features;            /* KVM_ARM_VCPU_INIT features[0] as the VMM asked (source: in the SNAPSHOT) */
    uint8_t *reported;            /* per op: bit 0 OVERRIDE reported, bit 1 final[] holds what KVM took */
    uint64_t *final;              /* per op: the value finally written (planned, destination's, fallback) */
    uint8_t *snap;                /* source: SNAPSHOT frame kept for a daemon that connects later */
    size_t snap_len;
    int snap_sent;
};

static int (*real_ioctl)(int, unsigned long, ...);
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;      /* program, fd tables */
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t send_mu = PTHREAD_MUTEX_INITIALIZER;
static unsigned char fdkind[MAXFD];
static unsigned char vm_cap_done[MAXFD];
static struct vcpu *vcpus[MAXFD];

static int role, quiet, started, sock = -1;
static int prog_state;            /* 0 waiting, 1 program, 2 pass through */
static struct op *ops;
static uint32_t nops;
static int cap239, einvariant = 200, retries = 3;
static char migration[65], vmname[256], sockpath[108];
static uint8_t want_digest[32];
static int have_want_digest;
static double wait_s = 10.0;

static void say(const char *fmt, ...) {
    if (quiet) return;
    va_list ap;
    va_start(ap, fmt);
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "invariantd-agent[%d]: %s\n", (int)getpid(), line);
}

static int raw(int fd, unsigned long req, void *arg) { return real_ioctl(fd, req, arg); }

/* --- sending (any thread; a blocked daemon costs at most the socket's 1 s send timeout) -------------------- */
static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

static int send_all(int s, const uint8_t *b, size_t n) {
    while (n) {
        ssize_t w = send(s, b, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        b += w;
        n -= (size_t)w;
    }
    return 0;
}

static int send_frame_locked(int type, const uint8_t *body, uint32_t len) {
    uint8_t h[12];
    memcpy(h, "IVDA", 4);
    put16(h + 4, 1);
    put16(h + 6, (uint16_t)type);
    put32(h + 8, len);
    if (sock < 0) return -1;
    if (send_all(sock, h, 12) || (len && send_all(sock, body, len))) {
        shutdown(sock, SHUT_RDWR);          /* the connection thread notices and reconnects */
        return -1;
    }
    return 0;
}

static int send_frame(int type, const uint8_t *body, uint32_t len) {
    pthread_mutex_lock(&send_mu);
    int r = send_frame_locked(type, body, len);
    pthread_mutex_unlock(&send_mu);
    return r;
}

static void event(int vcpu, int err, int kind, int action, int verdict, uint64_t id, uint64_t given, uint64_t fin) {
    uint8_t b[36];
    put32(b, (uint32_t)vcpu);
    put32(b + 4, (uint32_t)err);
    b[8] = (uint8_t)kind; b[9] = (uint8_t)action; b[10] = (uint8_t)verdict; b[11] = 0;
    put64(b + 12, id);
    put64(b + 20, given);
    put64(b + 28, fin);
    send_frame(T_EVENT, b, sizeof b);
}

/* --- the program ------------------------------------------------------------------------------------------ */
static int hexval(char c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* returns NULL when installed, else why not */
static const char *install_program(const uint8_t *b, uint32_t n) {
    uint16_t ver, flags, einv, rt;
    uint32_t cnt;
    if (n < PROG_HEADER || memcmp(b, "IVDP", 4)) return "not an apply program";
    memcpy(&ver, b + 4, 2); memcpy(&flags, b + 6, 2); memcpy(&cnt, b + 8, 4);
    memcpy(&einv, b + 12, 2); memcpy(&rt, b + 14, 2);
    if (ver != 1) return "apply program version is not 1";
    if (flags & ~1u) return "unknown program flags";
    if ((uint64_t)n != PROG_HEADER + (uint64_t)cnt * PROG_OP) return "program length does not match its op count";
    char mig[65] = {0};
    memcpy(mig, b + 48, 64);
    if (migration[0] && strcmp(mig, migration)) return "program is for another migration";
    if (have_want_digest && memcmp(b + 16, want_digest, 32)) return "program digest differs from INVARIANTD_PLAN_DIGEST";
    struct op *o = calloc(cnt ? cnt : 1, sizeof *o);
    if (!o) return "out of memory";
    uint64_t prev = 0;
    for (uint32_t i = 0; i < cnt; i++) {
        const uint8_t *p = b + PROG_HEADER + (size_t)i * PROG_OP;
        memcpy(&o[i].id, p, 8); memcpy(&o[i].write, p + 8, 8); memcpy(&o[i].fallback, p + 16, 8);
        o[i].verdict = p[24];
        memcpy(o[i].act, p + 25, 4);
        o[i].flags = p[29]; o[i].has = p[30];
        for (int k = 0; k < 4; k++)
            if (o[i].act[k] > A_KEEP_IF_EQUAL) { free(o); return "unknown action in program"; }
        if (i && o[i].id <= prev) { free(o); return "program ops not sorted by register id"; }
        prev = o[i].id;
    }
    ops = o;
    nops = cnt;
    cap239 = flags & 1;
    einvariant = einv;
    retries = rt;
    return NULL;
}

static const struct op *find_op(uint64_t id) {
    uint32_t lo = 0, hi = nops;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (ops[mid].id == id) return &ops[mid];
        if (ops[mid].id < id) lo = mid + 1; else hi = mid;
    }
    return NULL;
}

/* the program's action for a failed write (the same table protocol/program.py ApplyProgram.decide reads) */
static int decide(const struct op *o, int err) {
    if (err == EINTR || err == EAGAIN) return A_RETRY;
    if (!o) return A_FAIL;
    if (err == EINVAL) return o->act[S_EINVAL];
    if (err == einvariant) return o->act[S_EINVARIANT];
    if (err == EBUSY) return o->act[S_EBUSY];
    if (err == ENOENT) return o->act[S_ENOENT];
    return A_FAIL;
}

/* --- connection to the daemon (one thread; reconnects; the VMM never depends on it) --------------------- */
static int dial(void) {
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    memcpy(a.sun_path, sockpath, strlen(sockpath));
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) { close(s); return -1; }
    struct timeval tv = {1, 0};
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return s;
}

static int read_all(int s, uint8_t *b, size_t n) {
    while (n) {
        ssize_t r = recv(s, b, n, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        b += r;
        n -= (size_t)r;
    }
    return 0;
}

static void settle(int state, const char *why) {
    pthread_mutex_lock(&mu);
    if (prog_state == 0) {
        prog_state = state;
        if (state == 2) say("passing through: %s", why);
        pthread_cond_broadcast(&cv);
    }
    pthread_mutex_unlock(&mu);
}

static void hello(void) {
    uint8_t b[8 + 32 + 2 + 255 + 2 + 64];
    size_t vl = strlen(vmname) > 255 ? 255 : strlen(vmname), ml = strlen(migration);
    put32(b, (uint32_t)getpid());
    b[4] = (uint8_t)role; b[5] = 0; put16(b + 6, 0);
    memcpy(b + 8, want_digest, 32);
    put16(b + 40, (uint16_t)vl);
    memcpy(b + 42, vmname, vl);
    put16(b + 42 + vl, (uint16_t)ml);
    memcpy(b + 44 + vl, migration, ml);
    send_frame_locked(T_HELLO, b, (uint32_t)(44 + vl + ml));
}

static void *conn_main(void *unused) {
    (void)unused;
    int told = 0;
    for (;;) {
        int s = dial();
        if (s < 0) {
            if (!told) say("daemon socket %s unreachable (%s); retrying every second", sockpath, strerror(errno));
            if (!told) settle(2, "no daemon to ask for a program");   /* a destination does not wait for nothing */
            told = 1;
            sleep(1);
            continue;
        }
        told = 0;
        pthread_mutex_lock(&send_mu);
        sock = s;
        hello();
        for (int fd = 0; fd < MAXFD; fd++)       /* snapshots taken while no daemon listened */
            if (vcpus[fd] && vcpus[fd]->snap && send_frame_locked(T_SNAPSHOT, vcpus[fd]->snap, (uint32_t)vcpus[fd]->snap_len) == 0)
                vcpus[fd]->snap_sent = 1;
        pthread_mutex_unlock(&send_mu);
        for (;;) {
            uint8_t h[12];
            if (read_all(s, h, 12)) break;
            uint32_t len;
            uint16_t type, ver;
            memcpy(&ver, h + 4, 2); memcpy(&type, h + 6, 2); memcpy(&len, h + 8, 4);
            if (memcmp(h, "IVDA", 4) || ver != 1 || len > (1u << 20)) { say("daemon sent a malformed frame"); break; }
            uint8_t *body = malloc(len ? len : 1);
            if (!body || read_all(s, body, len)) { free(body); break; }
            if (type == T_PROGRAM) {
                pthread_mutex_lock(&mu);
                const char *why = prog_state == 0 ? install_program(body, len) : "a program arrived after the decision";
                if (!why) {
                    prog_state = 1;
                    pthread_cond_broadcast(&cv);
                    say("program for migration %s: %u registers, cap 239 %s", migration[0] ? migration : "-",
                        nops, cap239 ? "on" : "off");
                }
                pthread_mutex_unlock(&mu);
                if (why) { settle(2, why); event(-1, 0, K_PASSTHROUGH, 0, 0, 0, 0, 0); }
            } else if (type == T_NO_PROGRAM) {
                char r[256] = {0};
                uint16_t n = 0;
                if (len >= 2) memcpy(&n, body, 2);
                if (n > 255 || 2u + n > len) n = 0;
                memcpy(r, body + 2, n);
                settle(2, r[0] ? r : "the daemon has no program for this VMM");
            }
            free(body);
        }
        pthread_mutex_lock(&send_mu);
        sock = -1;
        pthread_mutex_unlock(&send_mu);
        close(s);
        sleep(1);
    }
    return NULL;
}

static void start_conn(void) {
    pthread_mutex_lock(&mu);
    int go = !started;
    started = 1;
    pthread_mutex_unlock(&mu);
    if (!go) return;
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &at, conn_main, NULL)) settle(2, "cannot start the agent thread");
    pthread_attr_destroy(&at);
}

/* destination: block the VMM's first vCPU until the program (or its absence) is known */
static int have_program(void) {
    if (role != ROLE_DESTINATION) return 0;
    pthread_mutex_lock(&mu);
    if (prog_state == 0) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += (time_t)wait_s;
        until.tv_nsec += (long)((wait_s - (time_t)wait_s) * 1e9);
        if (until.tv_nsec >= 1000000000L) { until.tv_sec++; until.tv_nsec -= 1000000000L; }
        while (prog_state == 0)
            if (pthread_cond_timedwait(&cv, &mu, &until) == ETIMEDOUT) break;
        if (prog_state == 0) {
            prog_state = 2;
            say("passing through: no program from the daemon within %.1f s", wait_s);
        }
    }
    int r = prog_state == 1;
    pthread_mutex_unlock(&mu);
    return r;
}

static int ready(void) {
    pthread_mutex_lock(&mu);
    int r = prog_state == 1;
    pthread_mutex_unlock(&mu);
    return r;
}

/* --- register access ---------------------------------------------------------------------------------------- */
static size_t reg_size(uint64_t id) { return (size_t)1 << ((id >> 52) & 0xf); }

static int set_reg(int fd, uint64_t id, uint64_t v) {
    uint8_t buf[8] = {0};
    size_t n = reg_size(id);
    if (n > 8) { errno = EINVAL; return -1; }
    memcpy(buf, &v, n);                         /* little-endian hosts: the low n bytes */
    struct kvm_one_reg r = {id, (uint64_t)(uintptr_t)buf};
    return raw(fd, KVM_SET_ONE_REG, &r);
}

static int get_reg(int fd, uint64_t id, uint64_t *v) {
    uint8_t buf[8] = {0};
    if (reg_size(id) > 8) { errno = EINVAL; return -1; }
    struct kvm_one_reg r = {id, (uint64_t)(uintptr_t)buf};
    int rc = raw(fd, KVM_GET_ONE_REG, &r);
    *v = 0;
    memcpy(v, buf, reg_size(id));
    return rc;
}

/* write `v` for op `o` on vCPU fd; on failure carry out the program's action. Returns 0 or -1 with errno. */
static int took(struct vcpu *vc, const struct op *o, uint64_t v) {
    if (vc->reported && vc->final) { vc->reported[o - ops] |= 2; vc->final[o - ops] = v; }
    return 0;
}

static int apply_write(int fd, struct vcpu *vc, const struct op *o, uint64_t given, uint64_t v) {
    if (set_reg(fd, o->id, v) == 0) return took(vc, o, v);
    int err = errno;
    for (int attempt = 0;; attempt++) {
        int act = decide(o, err);
        uint64_t cur = 0;
        switch (act) {
        case A_RETRY:
            if (attempt < retries && set_reg(fd, o->id, v) == 0) {
                event(vc->index, err, K_DECISION, act, o->verdict, o->id, given, v);
                return took(vc, o, v);
            }
            if (attempt < retries) { err = errno; continue; }
            break;
        case A_DROP:
            event(vc->index, err, K_DECISION, act, o->verdict, o->id, given, v);
            return 0;
        case A_ACCEPT_DESTINATION:
        case A_KEEP_IF_EQUAL:
            if (get_reg(fd, o->id, &cur) == 0 && (act == A_ACCEPT_DESTINATION ? !(err == EINVAL && cur == v) : cur == v)) {
                event(vc->index, err, K_DECISION, act, o->verdict, o->id, given, cur);
                return took(vc, o, cur);
            }
            break;
        case A_WRITE_FALLBACK:
            if ((o->has & HAS_FALLBACK) && set_reg(fd, o->id, o->fallback) == 0) {
                event(vc->index, err, K_DECISION, act, o->verdict, o->id, given, o->fallback);
                return took(vc, o, o->fallback);
            }
            break;
        default:
            break;
        }
        /* FAIL (and REPLAY: a VMM's VM cannot be recreated from in here) */
        event(vc->index, err, K_DECISION, A_FAIL, o->verdict, o->id, given, v);
        say("vCPU %d register 0x%016llx: KVM_SET_ONE_REG of 0x%llx failed: %s; the plan allows nothing else",
            vc->index, (unsigned long long)o->id, (unsigned long long)v, strerror(err));
        vc->failed = 1;
        errno = err;
        return -1;
    }
}

static void verify(int fd, struct vcpu *vc, int phase) {
    size_t cap = 16 + (size_t)nops * 32;
    uint8_t *b = calloc(1, cap);
    if (!b) return;
    uint32_t checked = 0, bad = 0;
    for (uint32_t i = 0; i < nops; i++) {
        const struct op *o = &ops[i];
        if ((o->flags & OP_LISTED) || !(o->has & HAS_WRITE)) continue;
        uint64_t got = 0, want = (vc->reported && (vc->reported[i] & 2)) ? vc->final[i] : o->write;
        int rc = get_reg(fd, o->id, &got), err = rc ? errno : 0;
        checked++;
        if (rc || got != want) {
            uint8_t *p = b + 16 + (size_t)bad * 32;
            put64(p, o->id); put64(p + 8, want); put64(p + 16, got); put32(p + 24, (uint32_t)err); put32(p + 28, 0);
            bad++;
        }
    }
    put32(b, (uint32_t)vc->index); put32(b + 4, checked); put32(b + 8, bad); put32(b + 12, (uint32_t)phase);
    send_frame(T_VERIFY, b, 16 + bad * 32);
    if (bad) say("vCPU %d: %u of %u planned registers read back differently", vc->index, bad, checked);
    free(b);
}

/* destination, at the vCPU's first KVM_SET_ONE_REG (before any other state): the program's registers */
static void write_program(int fd, struct vcpu *vc) {
    for (uint32_t i = 0; i < nops; i++) {
        const struct op *o = &ops[i];
        if ((o->flags & OP_LISTED) || !(o->has & HAS_WRITE)) continue;
        apply_write(fd, vc, o, o->write, o->write);
    }
    verify(fd, vc, 1);
}

/* source: the register list and the ID-like values, before the first KVM_RUN */
static int id_like(uint64_t id) {
    if ((id >> 56) != 0x60) return 0;                   /* KVM_REG_ARM64 */
    unsigned coproc = (unsigned)((id >> 16) & 0xfff);
    if (coproc == 0x11 || coproc == 0x14 || coproc == 0x16) return 1;   /* CCSIDR demux, FW, FW bitmaps */
    if (coproc != 0x13) return 0;
    unsigned op0 = (id >> 14) & 3, op1 = (id >> 11) & 7, crn = (id >> 7) & 0xf;
    return op0 == 3 && crn == 0 && (op1 == 0 || op1 == 1 || op1 == 3);
}

static void snapshot(int fd, struct vcpu *vc) {
    struct kvm_reg_list probe = {0};
    if (raw(fd, KVM_GET_REG_LIST, &probe) == 0 || errno != E2BIG) return;
    uint64_t n = probe.n;
    struct kvm_reg_list *rl = calloc(1, sizeof *rl + n * 8);
    if (!rl) return;
    rl->n = n;
    if (raw(fd, KVM_GET_REG_LIST, rl)) { free(rl); return; }
    n = rl->n;
    uint32_t nv = 0;
    uint8_t *b = calloc(1, 16 + n * 8 + n * 16);
    if (!b) { free(rl); return; }
    for (uint64_t i = 0; i < n; i++) put64(b + 16 + i * 8, rl->reg[i]);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t v;
        if (!id_like(rl->reg[i]) || reg_size(rl->reg[i]) > 8 || get_reg(fd, rl->reg[i], &v)) continue;
        put64(b + 16 + n * 8 + nv * 16, rl->reg[i]);
        put64(b + 16 + n * 8 + nv * 16 + 8, v);
        nv++;
    }
    put32(b, (uint32_t)vc->index); put32(b + 4, (uint32_t)n); put32(b + 8, nv); put32(b + 12, vc->features);
    pthread_mutex_lock(&send_mu);
    vc->snap = b;
    vc->snap_len = 16 + n * 8 + (size_t)nv * 16;
    vc->snap_sent = send_frame_locked(T_SNAPSHOT, b, (uint32_t)vc->snap_len) == 0;
    pthread_mutex_unlock(&send_mu);
    free(rl);
}

/* --- interposition ------------------------------------------------------------------------------------------ */
static struct vcpu *vcpu_of(int fd) { return fd >= 0 && fd < MAXFD && fdkind[fd] == F_VCPU ? vcpus[fd] : NULL; }

static int on_set_one_reg(int fd, struct vcpu *vc, struct kvm_one_reg *r) {
    const struct op *o = find_op(r->id);
    if (!o || reg_size(r->id) > 8) return raw(fd, KVM_SET_ONE_REG, r);
    uint64_t given = 0;
    memcpy(&given, (void *)(uintptr_t)r->addr, reg_size(r->id));
    uint64_t v = (o->has & HAS_WRITE) ? o->write : given;
    if (v != given && !(o->flags & OP_LISTED) && vc->reported && !(vc->reported[o - ops] & 1)) {
        vc->reported[o - ops] |= 1;
        event(vc->index, 0, K_OVERRIDE, 0, o->verdict, o->id, given, v);
    }
    return apply_write(fd, vc, o, given, v);
}

static int on_get_reg_list(int fd, struct kvm_reg_list *rl) {
    uint64_t cap = rl->n;
    int rc = raw(fd, KVM_GET_REG_LIST, rl);
    int err = errno;
    uint32_t extra = 0;
    for (uint32_t i = 0; i < nops; i++) extra += (ops[i].flags & OP_LISTED) != 0;
    if (!extra) { errno = err; return rc; }
    if (rc < 0 && err == E2BIG) { rl->n += extra; errno = E2BIG; return rc; }
    if (rc < 0) { errno = err; return rc; }
    uint64_t n = rl->n, add = 0;
    for (uint32_t i = 0; i < nops; i++) {
        if (!(ops[i].flags & OP_LISTED)) continue;
        int have = 0;
        for (uint64_t j = 0; j < n && !have; j++) have = rl->reg[j] == ops[i].id;
        if (have) continue;
        if (n + add + 1 > cap) { rl->n = n + extra; errno = E2BIG; return -1; }
        rl->reg[n + add++] = ops[i].id;
    }
    rl->n = n + add;
    if (add) {
        struct vcpu *vc = vcpu_of(fd);
        event(vc ? vc->index : -1, 0, K_LISTED, 0, 0, add, n, n + add);
    }
    return rc;
}

int ioctl(int fd, unsigned long req, ...) {
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (!real_ioctl) real_ioctl = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    if (((req >> 8) & 0xff) != KVMIO || fd < 0 || fd >= MAXFD) return real_ioctl(fd, req, arg);

    if (req == KVM_RUN) {
        struct vcpu *vc = vcpu_of(fd);
        if (vc && !vc->ran) {
            vc->ran = 1;
            if (role == ROLE_SOURCE) snapshot(fd, vc);
            else if (ready()) verify(fd, vc, 2);
        }
        return real_ioctl(fd, req, arg);
    }
    if (req == KVM_CREATE_VM) {
        start_conn();
        int r = real_ioctl(fd, req, arg);
        if (r >= 0 && r < MAXFD) { fdkind[r] = F_VM; vm_cap_done[r] = 0; }
        return r;
    }
    if (req == KVM_CREATE_VCPU && fdkind[fd] == F_VM) {
        if (have_program() && cap239) {
            pthread_mutex_lock(&mu);
            int todo = !vm_cap_done[fd];
            vm_cap_done[fd] = 1;
            pthread_mutex_unlock(&mu);
            if (todo) {
                struct kvm_enable_cap ec;
                memset(&ec, 0, sizeof ec);
                ec.cap = IVD_CAP_WRITABLE_IMP_ID_REGS;
                int rc = raw(fd, KVM_ENABLE_CAP, &ec), err = rc ? errno : 0;
                event(-1, err, K_CAP239, 0, 0, 0, 0, 0);
                if (rc) say("KVM_ENABLE_CAP(239) on VM fd %d failed: %s", fd, strerror(err));
            }
        }
        int r = real_ioctl(fd, req, arg);
        if (r >= 0 && r < MAXFD) {
            struct vcpu *vc = calloc(1, sizeof *vc);
            if (vc) {
                vc->index = (int)(uintptr_t)arg;
                vc->reported = calloc(nops ? nops : 1, 1);
                vc->final = calloc(nops ? nops : 1, sizeof(uint64_t));
                pthread_mutex_lock(&mu);
                if (vcpus[r]) { free(vcpus[r]->reported); free(vcpus[r]->final); }
                free(vcpus[r]);
                vcpus[r] = vc;
                fdkind[r] = F_VCPU;
                pthread_mutex_unlock(&mu);
            }
        }
        return r;
    }
    struct vcpu *vc = vcpu_of(fd);
    if (vc && req == IVD_KVM_ARM_VCPU_INIT && arg) memcpy(&vc->features, (char *)arg + 4, 4);
    if (!vc || role != ROLE_DESTINATION || !ready()) return real_ioctl(fd, req, arg);
    if (req == KVM_SET_ONE_REG) {
        /* the program's registers go first, at the vCPU's first write (QEMU's reset, at start-up): not at
         * KVM_ARM_VCPU_INIT, which QEMU's scratch vCPUs (host feature probes, other init features) also do */
        if (!vc->inited) { vc->inited = 1; write_program(fd, vc); }
        return on_set_one_reg(fd, vc, arg);
    }
    if (req == KVM_GET_REG_LIST) return on_get_reg_list(fd, arg);
    if (req == KVM_GET_ONE_REG) {
        int r = real_ioctl(fd, req, arg);
        if (r < 0 && errno == ENOENT) {
            struct kvm_one_reg *g = arg;
            const struct op *o = find_op(g->id);
            if (o && (o->flags & OP_LISTED) && reg_size(g->id) <= 8) {
                memcpy((void *)(uintptr_t)g->addr, &o->write, reg_size(g->id));
                return 0;
            }
            errno = ENOENT;
        }
        return r;
    }
    return real_ioctl(fd, req, arg);
}

/* for the tests: the request numbers this file was compiled with, checked against protocol/kvmabi.py */
unsigned long ivd_agent_ioctl_number(const char *name) {
    static const struct { const char *n; unsigned long v; } t[] = {
        {"KVM_CREATE_VM", KVM_CREATE_VM}, {"KVM_CREATE_VCPU", KVM_CREATE_VCPU}, {"KVM_RUN", KVM_RUN},
        {"KVM_ENABLE_CAP", KVM_ENABLE_CAP}, {"KVM_GET_ONE_REG", KVM_GET_ONE_REG},
        {"KVM_SET_ONE_REG", KVM_SET_ONE_REG}, {"KVM_GET_REG_LIST", KVM_GET_REG_LIST},
        {"KVM_ARM_VCPU_INIT", IVD_KVM_ARM_VCPU_INIT}};
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        if (!strcmp(t[i].n, name)) return t[i].v;
    return 0;
}

static int cmdline_has_incoming(void) {
    char buf[65536];
    int f = open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
    if (f < 0) return 0;
    ssize_t n = read(f, buf, sizeof buf - 1);
    close(f);
    for (ssize_t i = 0; i < n; i += (ssize_t)strlen(buf + i) + 1) {
        buf[n] = 0;
        if (!strcmp(buf + i, "-incoming") || !strcmp(buf + i, "--incoming")) return 1;
    }
    return 0;
}

__attribute__((constructor)) static void agent_init(void) {
    real_ioctl = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    quiet = getenv("INVARIANTD_AGENT_QUIET") != NULL;
    const char *s = getenv("INVARIANTD_AGENT_SOCKET");
    snprintf(sockpath, sizeof sockpath, "%s", s && *s ? s : "/run/invariantd/agent.sock");
    const char *r = getenv("INVARIANTD_AGENT_ROLE");
    role = r && !strcmp(r, "source") ? ROLE_SOURCE : r && !strcmp(r, "destination") ? ROLE_DESTINATION
         : cmdline_has_incoming() ? ROLE_DESTINATION : ROLE_SOURCE;
    const char *m = getenv("INVARIANTD_MIGRATION");
    snprintf(migration, sizeof migration, "%s", m ? m : "");
    const char *v = getenv("INVARIANTD_VM");
    snprintf(vmname, sizeof vmname, "%s", v ? v : "");
    const char *w = getenv("INVARIANTD_AGENT_WAIT");
    if (w && *w) wait_s = atof(w);
    const char *d = getenv("INVARIANTD_PLAN_DIGEST");
    if (d && strlen(d) == 64) {
        have_want_digest = 1;
        for (int i = 0; i < 32; i++) {
            int hi = hexval(d[2 * i]), lo = hexval(d[2 * i + 1]);
            if (hi < 0 || lo < 0) { have_want_digest = 0; say("INVARIANTD_PLAN_DIGEST is not 64 hex digits: ignored"); break; }
            want_digest[i] = (uint8_t)(hi << 4 | lo);
        }
    }
}
