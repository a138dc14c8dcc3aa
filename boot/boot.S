/*
 * rustyvisor boot trampoline (AT&T syntax, included through global_asm!).
 *
 * GRUB enters `_start` in 32-bit protected mode, paging off, with
 * eax = multiboot2 magic and ebx = physical address of the boot information.
 * This code:
 *   1. checks that the CPU can do long mode and NX (printing a clear message on
 *      COM1 and halting if not),
 *   2. builds boot page tables: identity 0..1 GiB (only needed for the next few
 *      instructions), the kernel image at -2 GiB, and a direct map of 0..4 GiB at
 *      0xFFFF800000000000 so Rust can read the boot information and early frames,
 *   3. turns on PAE, long mode + NX, paging + write protect,
 *   4. far-jumps into 64-bit code and calls `kernel_entry(magic, mbi)` on the
 *      high-half boot stack.
 * Rust replaces these tables with W^X kernel tables soon after.
 */

    .set MB2_MAGIC,        0xE85250D6
    .set MB2_ARCH_I386,    0
    .set KERNEL_VMA,       0xFFFFFFFF80000000
    .set COM1,             0x3F8

    .section .multiboot2, "a"
    .balign 8
mb2_header_start:
    .long MB2_MAGIC
    .long MB2_ARCH_I386
    .long mb2_header_end - mb2_header_start
    .long 0x100000000 - (MB2_MAGIC + MB2_ARCH_I386 + (mb2_header_end - mb2_header_start))

    /* Information request (optional): cmdline, modules, memory map,
     * framebuffer info, ACPI old and new RSDP. */
    .balign 8
mb2_info_req_start:
    .short 1
    .short 1
    .long mb2_info_req_end - mb2_info_req_start
    .long 1
    .long 3
    .long 6
    .long 8
    .long 14
    .long 15
mb2_info_req_end:

    /* Page-align modules so the launcher can hand out whole frames. */
    .balign 8
    .short 6
    .short 0
    .long 8

    /* End tag. */
    .balign 8
    .short 0
    .short 0
    .long 8
mb2_header_end:

    .section .boot.bss, "aw", @nobits
    .balign 4096
boot_pml4:      .skip 4096
boot_pdpt_id:   .skip 4096
boot_pdpt_hi:   .skip 4096
boot_pdpt_dm:   .skip 4096
boot_pd:        .skip 4096 * 4
boot_stack32:   .skip 4096
boot_stack32_top:

    .section .boot.rodata, "a"
    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00209A0000000000     /* 0x08: 64-bit code, DPL 0 */
    .quad 0x0000920000000000     /* 0x10: data */
boot_gdt_end:
boot_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .long boot_gdt

msg_no_lm:
    .asciz "rustyvisor: this CPU has no 64-bit long mode; rustyvisor needs an x86_64 CPU.\r\n"
msg_no_nx:
    .asciz "rustyvisor: this CPU has no NX (execute-disable) bit; rustyvisor needs it.\r\n"
msg_no_mb2:
    .asciz "rustyvisor: not started by a multiboot2 loader (bad magic in eax); boot it with GRUB's multiboot2 command.\r\n"

    .section .boot.text, "ax"
    .code32
    .global _start
_start:
    cli
    cld
    mov $boot_stack32_top, %esp
    mov %eax, %edi                  /* magic -> first SysV argument */
    mov %ebx, %esi                  /* MBI   -> second SysV argument */

    cmp $0x36D76289, %eax
    jne .Lno_mb2

    /* CPUID extended leaf 0x80000001: EDX bit 29 = long mode, bit 20 = NX. */
    mov $0x80000000, %eax
    cpuid
    cmp $0x80000001, %eax
    jb .Lno_lm
    mov $0x80000001, %eax
    cpuid
    bt $29, %edx
    jnc .Lno_lm
    bt $20, %edx
    jnc .Lno_nx

    /* Zero the boot tables (they are NOLOAD; do not trust the loader). */
    push %edi
    mov $boot_pml4, %edi
    mov $(4096 * 8 / 4), %ecx
    xor %eax, %eax
    rep stosl
    pop %edi

    /* Four page directories of 2 MiB pages: physical 0..4 GiB, P|RW|PS. */
    mov $boot_pd, %ebx
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $21, %eax                   /* low 32 bits of ecx * 2 MiB */
    or $0x83, %eax
    mov %eax, (%ebx, %ecx, 8)
    mov %ecx, %eax
    shr $11, %eax                   /* high bits: (ecx * 2 MiB) >> 32 */
    mov %eax, 4(%ebx, %ecx, 8)
    inc %ecx
    cmp $2048, %ecx
    jne 1b

    /* Identity: PML4[0] -> pdpt_id[0] -> pd[0] (0..1 GiB). */
    mov $boot_pdpt_id, %eax
    or $0x3, %eax
    mov %eax, boot_pml4
    mov $boot_pd, %eax
    or $0x3, %eax
    mov %eax, boot_pdpt_id

    /* Kernel: PML4[511] -> pdpt_hi[510] -> pd[0] (-2 GiB -> 0..1 GiB). */
    mov $boot_pdpt_hi, %eax
    or $0x3, %eax
    mov %eax, boot_pml4 + 511 * 8
    mov $boot_pd, %eax
    or $0x3, %eax
    mov %eax, boot_pdpt_hi + 510 * 8

    /* Direct map: PML4[256] -> pdpt_dm[0..3] -> pd[0..3] (0..4 GiB). */
    mov $boot_pdpt_dm, %eax
    or $0x3, %eax
    mov %eax, boot_pml4 + 256 * 8
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $12, %eax
    add $boot_pd, %eax
    or $0x3, %eax
    mov %eax, boot_pdpt_dm(, %ecx, 8)
    inc %ecx
    cmp $4, %ecx
    jne 2b

    mov $boot_pml4, %eax
    mov %eax, %cr3

    mov %cr4, %eax
    or $(1 << 5), %eax              /* PAE */
    mov %eax, %cr4

    mov $0xC0000080, %ecx           /* IA32_EFER */
    rdmsr
    or $((1 << 8) | (1 << 11)), %eax  /* LME | NXE */
    wrmsr

    mov %cr0, %eax
    or $((1 << 31) | (1 << 16)), %eax /* PG | WP */
    mov %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $long_mode_entry

.Lno_mb2:
    mov $msg_no_mb2, %esi
    jmp .Lfail
.Lno_lm:
    mov $msg_no_lm, %esi
    jmp .Lfail
.Lno_nx:
    mov $msg_no_nx, %esi
.Lfail:
    /* Polled COM1 output of the NUL-terminated string at esi, then halt. */
3:  movb (%esi), %al
    test %al, %al
    jz 5f
    mov %eax, %ebx
    mov $(COM1 + 5), %dx
4:  inb %dx, %al
    test $0x20, %al
    jz 4b
    mov %ebx, %eax
    mov $COM1, %dx
    outb %al, %dx
    inc %esi
    jmp 3b
5:  cli
    hlt
    jmp 5b

    .code64
long_mode_entry:
    xor %eax, %eax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    movabs $boot_stack_top, %rsp
    xor %ebp, %ebp
    movabs $kernel_entry, %rax
    call *%rax
6:  cli
    hlt
    jmp 6b

    /* The high-half boot stack; Rust moves onto a guarded stack early. */
    .section .bss.boot_stack, "aw", @nobits
    .balign 4096
boot_stack:
    .skip 65536
    .global boot_stack_top
boot_stack_top:
