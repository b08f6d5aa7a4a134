/* invariantd lab payload: a bare-metal program for QEMU `-machine virt` (KVM or TCG), entered at EL1 with
 * the MMU off (QEMU's -kernel loads this ELF at 0x40080000; see payload.ld).
 *
 * It counts in x19 and, every 2^SHIFT iterations, prints one line to the PL011 UART at 0x09000000:
 *
 *     P n=<x19> t=<CNTVCT_EL0> f=<CNTFRQ_EL0> midr=<MIDR_EL1> pfr0=<ID_AA64PFR0_EL1> rev=<REVIDR_EL1>
 *
 * each value as 16 hex digits. The whole state lives in registers (x19 counter, x20 UART base), so a
 * migrated vCPU continues the count where the source left it, and the ID registers show what the guest
 * reads on whichever host it runs. Parsed by daemon/lab/vmm.py (parse_line). Built by qemu.build_payload().
 */
#ifndef SHIFT
#define SHIFT 24
#endif
#define UART        0x09000000
#define UARTDR      0x00
#define UARTFR      0x18
#define UARTFR_TXFF (1 << 5)
#define UARTCR      0x30

    .text
    .global _start
_start:
    ldr     x0, =stack_top
    mov     sp, x0
    ldr     x20, =UART
    mov     w0, #0x301                  /* UARTCR: UARTEN | TXE | RXE */
    str     w0, [x20, #UARTCR]
    adr     x0, s_banner
    bl      puts
    mov     x19, #0

count:
    add     x19, x19, #1
    tst     x19, #((1 << SHIFT) - 1)
    b.ne    count

    adr     x0, s_n
    bl      puts
    mov     x0, x19
    bl      puthex
    isb
    .irp    field, t, f, midr, pfr0, rev
    adr     x0, s_\field
    bl      puts
    .ifc \field, t
    mrs     x0, cntvct_el0
    .endif
    .ifc \field, f
    mrs     x0, cntfrq_el0
    .endif
    .ifc \field, midr
    mrs     x0, midr_el1
    .endif
    .ifc \field, pfr0
    mrs     x0, id_aa64pfr0_el1
    .endif
    .ifc \field, rev
    mrs     x0, revidr_el1
    .endif
    bl      puthex
    .endr
    mov     w0, #'\n'
    bl      putc
    b       count

/* putc(w0): wait while the transmit FIFO is full, then write. Clobbers w1. */
putc:
    ldr     w1, [x20, #UARTFR]
    tbnz    w1, #5, putc                /* UARTFR_TXFF */
    str     w0, [x20, #UARTDR]
    ret

/* puts(x0 = NUL-terminated string). Clobbers x0, x1, x9, x10. */
puts:
    mov     x9, x30
    mov     x10, x0
1:  ldrb    w0, [x10], #1
    cbz     w0, 2f
    bl      putc
    b       1b
2:  ret     x9

/* puthex(x0): 16 lower-case hex digits. Clobbers x0, x1, x11-x13. */
puthex:
    mov     x11, x30
    mov     x12, x0
    mov     x13, #60
3:  lsr     x0, x12, x13
    and     x0, x0, #0xf
    cmp     x0, #10
    add     x1, x0, #'0'
    add     x0, x0, #('a' - 10)
    csel    x0, x1, x0, lt
    bl      putc
    subs    x13, x13, #4
    b.ge    3b
    ret     x11

    .ltorg
    .balign 8
s_banner: .asciz "PAYLOAD start\n"
s_n:      .asciz "P n="
s_t:      .asciz " t="
s_f:      .asciz " f="
s_midr:   .asciz " midr="
s_pfr0:   .asciz " pfr0="
s_rev:    .asciz " rev="

    .bss
    .balign 16
    .space  4096
stack_top:
