//! `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp`.
//!
//! The prebuilt `compiler_builtins` of a `*-linux-gnu` target expects libc
//! to provide these, and there is no libc here. They are written in
//! assembly because Rust loops can be compiled back into calls to the very
//! function being defined. All use the i386 C calling convention (arguments
//! on the stack at `[esp + 4]`, ...; result in eax; eax, ecx and edx are
//! scratch, ebx, esi, edi and ebp are preserved, DF is 0 on entry and exit).

#[cfg(target_arch = "x86")]
core::arch::global_asm!(
    ".pushsection .text.lguest_rt_mem,\"ax\",@progbits",
    // void *memcpy(void *dst, const void *src, size_t n): esi and edi are
    // callee-saved, so push them first; the arguments are then at
    // [esp + 12], [esp + 16], [esp + 20]. `rep movsb` copies ecx bytes
    // forward from esi to edi. Returns dst.
    ".globl memcpy",
    ".type memcpy,@function",
    "memcpy:",
    "push edi",
    "push esi",
    "mov edi, dword ptr [esp + 12]",
    "mov esi, dword ptr [esp + 16]",
    "mov ecx, dword ptr [esp + 20]",
    "mov eax, edi",
    "rep movsb",
    "pop esi",
    "pop edi",
    "ret",
    ".size memcpy, . - memcpy",
    // void *memmove(void *dst, const void *src, size_t n): forward copy
    // unless dst lies inside (src, src + n), in which case copy backward
    // (esi/edi at the last byte, DF = 1) and clear DF again afterwards.
    ".globl memmove",
    ".type memmove,@function",
    "memmove:",
    "push edi",
    "push esi",
    "mov edi, dword ptr [esp + 12]",
    "mov esi, dword ptr [esp + 16]",
    "mov ecx, dword ptr [esp + 20]",
    "mov eax, edi",
    "mov edx, edi",
    "sub edx, esi",
    "cmp edx, ecx",
    "jb .Lmemmove_backward",
    "rep movsb",
    "pop esi",
    "pop edi",
    "ret",
    ".Lmemmove_backward:",
    "lea esi, [esi + ecx - 1]",
    "lea edi, [edi + ecx - 1]",
    "std",
    "rep movsb",
    "cld",
    "pop esi",
    "pop edi",
    "ret",
    ".size memmove, . - memmove",
    // void *memset(void *dst, int c, size_t n): `rep stosb` stores al ecx
    // times at edi. eax is reloaded with dst for the return value.
    ".globl memset",
    ".type memset,@function",
    "memset:",
    "push edi",
    "mov edi, dword ptr [esp + 8]",
    "mov eax, dword ptr [esp + 12]",
    "mov ecx, dword ptr [esp + 16]",
    "rep stosb",
    "mov eax, dword ptr [esp + 8]",
    "pop edi",
    "ret",
    ".size memset, . - memset",
    // int memcmp(const void *a, const void *b, size_t n) and bcmp (same
    // contract, only zero/non-zero matters): compare byte by byte, return
    // the difference of the first differing (unsigned) bytes, or 0.
    ".globl memcmp",
    ".type memcmp,@function",
    ".globl bcmp",
    ".type bcmp,@function",
    "memcmp:",
    "bcmp:",
    "push edi",
    "push esi",
    "mov esi, dword ptr [esp + 12]",
    "mov edi, dword ptr [esp + 16]",
    "mov ecx, dword ptr [esp + 20]",
    "xor eax, eax",
    ".Lmemcmp_loop:",
    "test ecx, ecx",
    "jz .Lmemcmp_done",
    "movzx eax, byte ptr [esi]",
    "movzx edx, byte ptr [edi]",
    "sub eax, edx",
    "jnz .Lmemcmp_done",
    "inc esi",
    "inc edi",
    "dec ecx",
    "jmp .Lmemcmp_loop",
    ".Lmemcmp_done:",
    "pop esi",
    "pop edi",
    "ret",
    ".size memcmp, . - memcmp",
    ".size bcmp, . - bcmp",
    ".popsection",
);
