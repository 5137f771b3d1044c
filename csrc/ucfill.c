/*
 * ucfill.c -- ptemu as the MMU of a Unicorn 2.1 x86-64 engine.
 *
 * In virtual-TLB mode (uc_ctl UC_TLB_VIRTUAL) Unicorn asks a
 * UC_HOOK_TLB_FILL callback for every page its own TLB misses
 * (qemu/softmmu/unicorn_vtlb.c unicorn_fill_tlb): a virtual page and an
 * access kind in, a physical page and uc_prot rights out, or "refused",
 * which stops emulation on the faulting instruction (cpu_loop_exit_restore,
 * the state restored to that instruction).  This file is that callback:
 *
 *   fill(vaddr, kind) --> ptemu_uc_sync: CR0 CR3 CR4 EFER CS RFLAGS RIP from
 *        |               the engine; a change is a MOV CR / WRMSR the code
 *        |               executed, applied to ptemu's TLB (SDM 4.10.4.1)
 *        v
 *   ptemu_ctx_translate (TLB, walk, A/D) --ok--> physical page, rights
 *        | fault
 *        v
 *   record it (state FAULTED), refuse: emulation stops, Python decides.
 *
 * Unicorn hands the callback the page of the access, not its address.  CR2
 * is the address itself (SDM 4.7), so for a refused data access Python
 * re-runs the faulting instruction once (state PROBE, context saved and
 * restored around it) with the refused page sent to PTEMU_UC_TRAP_PA, which
 * nothing backs: ptemu_uc_trap, hooked on that page's unmapped accesses,
 * sees the full address.  During the probe every other page is handed out
 * without write rights and translated without A/D writes, so the probe
 * changes nothing.  A refused fetch needs no probe: its address is RIP when
 * RIP is on the refused page, else the page's first byte (an instruction
 * that crosses into it).
 *
 * Unicorn's layouts are declared in ptemu_cdef.h (no Unicorn header is
 * included, nothing links against libunicorn); the uc_* functions come as
 * pointers from the loaded library.
 */
#include "ptemu.h"

/* cdef() takes no expressions in array sizes: the literal sizes in
 * ptemu_cdef.h must be these constants. */
#define PTEMU_UC_COUNT(a) (sizeof(a) / sizeof((a)[0]))
_Static_assert(PTEMU_UC_COUNT(((ptemu_uc_link *)0)->regs) == PTEMU_UC_NREGS, "regs");
_Static_assert(PTEMU_UC_COUNT(((ptemu_uc_link *)0)->events) == PTEMU_UC_NEVENTS, "events");
_Static_assert(PTEMU_UC_COUNT(((ptemu_uc_link *)0)->tails) == PTEMU_UC_NTAILS, "tails");
_Static_assert(PTEMU_UC_COUNT(((ptemu_uc_link *)0)->gprs) == 16, "gprs");
/* Unicorn's uc_tlb_entry and uc_x86_msr, as the x86-64 ABI lays them out. */
_Static_assert(sizeof(ptemu_uc_tlb_entry) == 16 && sizeof(ptemu_uc_msr) == 16, "uc layouts");

typedef int (*uc_reg_read_batch_fn)(void *uc, const int *regs, void **vals, int count);
typedef int (*uc_ctl_fn)(void *uc, int control, ...);

uint64_t ptemu_uc_ctx_size(void)
{
    return sizeof(ptemu_ctx);
}

void ptemu_uc_flush(ptemu_uc_link *l)
{
    if (l->ctl) {
        ((uc_ctl_fn)l->ctl)(l->uc, l->ctl_tlb_flush);
        l->uc_flushes++;
    }
}

static void link_tlb_flush(ptemu_uc_link *l, uint32_t kind, uint32_t pcid, uint32_t cause)
{
    if (l->tlb)
        ptemu_tlb_flush(l->tlb, kind, pcid, 0, cause);
}

static uint32_t pcid_of(uint64_t cr3, uint64_t cr4)
{
    return (cr4 & PTEMU_CR4_PCIDE) ? (uint32_t)(cr3 & PTEMU_CR3_PCID_MASK) : 0;
}

/* One uc_reg_read_batch call: Unicorn's API is the only way into its CPU
 * state (its CPUX86State layout is private and changes between versions). */
static int read_regs(ptemu_uc_link *l, const int *ids, void **vals, int n)
{
    return ((uc_reg_read_batch_fn)l->reg_read_batch)(l->uc, ids, vals, n);
}

/* SDM 3.3.7.1 (as ptemu_canonical, from CR4 rather than a walk context). */
static int canonical(uint64_t va, uint64_t cr4)
{
    uint32_t bits = (cr4 & PTEMU_CR4_LA57) ? 57 : 48;
    int64_t s = (int64_t)(va << (64 - bits)) >> (64 - bits);
    return (uint64_t)s == va;
}

/* INVLPG of the block that just ran: its operand from the registers now
 * (INVLPG changes none), with and without the REX byte that may precede
 * it (a byte before the 0F may belong to the previous instruction: both
 * readings are invalidated, which is never less than the SDM asks).  SDM
 * 4.10.4.1: the page in the current PCID, its global entries, and the
 * PCID's paging-structure caches; a non-canonical operand is a no-op.
 * Unicorn's TLB is flushed whole: QEMU's own INVLPG drops one 4 KiB page,
 * and a larger page is held there as 4 KiB pieces. */
static void apply_invlpg(ptemu_uc_link *l, const ptemu_uc_tail *t, uint64_t end)
{
    ptemu_cpu *cpu = l->cpu;
    uint64_t vals[4] = {0, 0, 0, 0};
    int ids[4];
    void *ptrs[4];
    uint8_t regs[4] = {t->base, t->index, t->rex_base, t->rex_index};
    for (int i = 0; i < 4; i++) {
        ptrs[i] = &vals[i];
        ids[i] = regs[i] < 16 ? l->gprs[regs[i]] : l->gprs[0];   /* (a value not used) */
    }
    if (t->kind == PTEMU_UC_TAIL_INVLPG && !read_regs(l, ids, ptrs, 4)) {
        for (int form = 0; form < 2; form++) {
            uint8_t b = form ? t->rex_base : t->base, x = form ? t->rex_index : t->index;
            if (form && b == t->base && x == t->index)
                break;
            uint64_t ea = (uint64_t)(int64_t)t->disp;
            if (b == PTEMU_UC_RIP_REL)
                ea += end;
            else if (b < 16)
                ea += vals[form ? 2 : 0];
            if (x < 16)
                ea += vals[form ? 3 : 1] << t->scale;
            if (canonical(ea, cpu->cr4) && l->tlb)
                ptemu_tlb_flush(l->tlb, PTEMU_FLUSH_INVLPG, pcid_of(cpu->cr3, cpu->cr4), ea,
                                PTEMU_FLUSHED_BY_INVLPG);
        }
    } else {
        link_tlb_flush(l, PTEMU_FLUSH_ALL, 0, PTEMU_FLUSHED_BY_INVLPG);
    }
    l->events[PTEMU_UC_EV_INVLPG]++;
    ptemu_uc_flush(l);
}

/*
 * The engine's CPU state into l->cpu.  A control register that differs
 * from the last fill was written by the code (MOV CR0/CR3/CR4, WRMSR
 * EFER): its TLB effect (SDM 4.10.4.1, the rules of Mmu.write_cr3 and
 * write_cr4) is applied to ptemu's TLB, and Unicorn's TLB is flushed too
 * whenever ptemu's is (QEMU flushes its own on CR3 writes and on some CR4
 * bits, not on PCIDE 1->0; flushing more is always allowed).  A pending
 * block tail (MOV CR3, INVLPG) takes effect once RIP has left its block,
 * or at once with `done` (the next block started).
 * Returns 0, or -1 when the registers cannot be read.
 */
static int sync_state(ptemu_uc_link *l, int done)
{
    uint64_t v[PTEMU_UC_NREGS];
    ptemu_uc_msr efer;
    void *vals[PTEMU_UC_NREGS];
    for (int i = 0; i < PTEMU_UC_NREGS; i++) {
        v[i] = 0;
        vals[i] = &v[i];
    }
    efer.rid = PTEMU_MSR_EFER;
    efer.value = 0;
    vals[PTEMU_UC_R_EFER] = &efer;
    /* RIP (the last slot) only when a block tail waits for it to leave its
     * block: a register read costs about as much as a quarter of a walk. */
    int n = l->pending.kind ? PTEMU_UC_NREGS : PTEMU_UC_R_RIP;
    if (read_regs(l, l->regs, vals, n))
        return -1;
    ptemu_cpu *cpu = l->cpu;
    uint64_t cr0 = v[PTEMU_UC_R_CR0] & 0xffffffffu;
    uint64_t cr3 = v[PTEMU_UC_R_CR3];
    uint64_t cr4 = v[PTEMU_UC_R_CR4] & 0xffffffffu;
    uint64_t rip = v[PTEMU_UC_R_RIP];
    /* SDM 5.5: the CPL is bits 1:0 of CS. */
    uint32_t cpl = (uint32_t)(v[PTEMU_UC_R_CS] & 3);
    uint32_t ac = (uint32_t)(v[PTEMU_UC_R_RFLAGS] >> 18) & 1;
    int uc_flush_needed = 0;
    ptemu_uc_tail tail = l->pending;
    uint64_t tail_end = tail.pc + tail.size;
    if (tail.kind && (done || rip < tail.pc || rip >= tail_end))
        l->pending.kind = PTEMU_UC_TAIL_NONE;
    else
        tail.kind = PTEMU_UC_TAIL_NONE;

    if (cr0 != l->seen[0]) {
        l->events[PTEMU_UC_EV_CR0]++;
        if ((cpu->cr0 & PTEMU_CR0_PG) && !(cr0 & PTEMU_CR0_PG)) {
            link_tlb_flush(l, PTEMU_FLUSH_ALL, 0, PTEMU_FLUSHED_BY_CR0);
            uc_flush_needed = 1;
        }
        cpu->cr0 = cr0;
        l->seen[0] = cr0;
        l->ctx_valid = 0;
    }
    if (cr4 != l->seen[2]) {
        uint64_t old = cpu->cr4, changed = old ^ cr4;
        l->events[PTEMU_UC_EV_CR4]++;
        if ((changed & PTEMU_CR4_PGE) || ((old & PTEMU_CR4_PCIDE) && !(cr4 & PTEMU_CR4_PCIDE))) {
            link_tlb_flush(l, PTEMU_FLUSH_ALL, 0, PTEMU_FLUSHED_BY_CR4);
            uc_flush_needed = 1;
        } else if ((changed & PTEMU_CR4_PAE) || ((cr4 & PTEMU_CR4_SMEP) && !(old & PTEMU_CR4_SMEP))) {
            link_tlb_flush(l, PTEMU_FLUSH_PCID_ALL, pcid_of(cpu->cr3, old), PTEMU_FLUSHED_BY_CR4);
            uc_flush_needed = 1;
        }
        cpu->cr4 = cr4;
        l->seen[2] = cr4;
        l->ctx_valid = 0;
    }
    if (cr3 != l->seen[1] || tail.kind == PTEMU_UC_TAIL_CR3) {
        /* MOV CR3: with PCIDE=1 bit 63 asks for no flush and is not stored
         * (QEMU stores it: the engine's value keeps it, ptemu's does not). */
        int noflush = (cr4 & PTEMU_CR4_PCIDE) && (cr3 & PTEMU_CR3_NOFLUSH);
        uint64_t value = (cr4 & PTEMU_CR4_PCIDE) ? cr3 & ~(uint64_t)PTEMU_CR3_NOFLUSH : cr3;
        l->events[cr3 != l->seen[1] ? PTEMU_UC_EV_CR3 : PTEMU_UC_EV_CR3_SAME]++;
        cpu->cr3 = value;
        if (!noflush) {
            link_tlb_flush(l, PTEMU_FLUSH_PCID, pcid_of(value, cr4), PTEMU_FLUSHED_BY_CR3);
            uc_flush_needed = 1;
        }
        l->seen[1] = cr3;
        l->ctx_valid = 0;
    }
    if (efer.value != l->seen[3]) {
        l->events[PTEMU_UC_EV_EFER]++;
        cpu->efer = efer.value;
        l->seen[3] = efer.value;
        l->ctx_valid = 0;
    }
    if (cpu->cpl != cpl || cpu->ac != ac) {
        cpu->cpl = cpl;
        cpu->ac = ac;
        l->ctx_valid = 0;
    }
    if (tail.kind == PTEMU_UC_TAIL_INVLPG || tail.kind == PTEMU_UC_TAIL_FLUSH)
        apply_invlpg(l, &tail, tail_end);
    else if (uc_flush_needed)
        ptemu_uc_flush(l);
    return 0;
}

int ptemu_uc_sync(ptemu_uc_link *l)
{
    return sync_state(l, 0);
}

/* The context for the current state, derived again only after a change. */
static ptemu_ctx *ctx_of(ptemu_uc_link *l)
{
    ptemu_ctx *c = (ptemu_ctx *)l->ctx;
    if (!l->ctx_valid) {
        ptemu_ctx_init(c, l->cpu, l->mem, l->tlb);
        ptemu_ctx_tables(c);
        l->ctx_valid = 1;
    }
    return c;
}

/*
 * The uc_prot rights for a translated page: the combined rights of the
 * walk (SDM 4.6) for this mode, read by ptemu's own decision table.  Write
 * only once the leaf's D bit is set (SDM 4.8): on this write, or seen in
 * the leaf by this walk -- a TLB hit carries no leaf, so a page read first
 * is handed out read-only and its first write comes back here.  With
 * protection keys the rights also depend on the key, which a TLB hit does
 * not report: then only the access that was checked is granted.
 */
static int uc_perms(const ptemu_ctx *c, uint32_t access, uint32_t flags,
                    const ptemu_walk_out *o)
{
    if (c->pke || c->pks)
        return access == PTEMU_ACC_WRITE ? PTEMU_UC_PROT_READ | PTEMU_UC_PROT_WRITE
             : access == PTEMU_ACC_FETCH ? PTEMU_UC_PROT_EXEC : PTEMU_UC_PROT_READ;
    uint32_t m = flags & (PTEMU_IN_USER | PTEMU_IN_IMPLICIT), r = o->rights & 7;
    int p = 0;
    if (!c->rtab[PTEMU_ACC_READ][m][r])
        p |= PTEMU_UC_PROT_READ;
    if (!c->rtab[PTEMU_ACC_FETCH][m][r])
        p |= PTEMU_UC_PROT_EXEC;
    if (access == PTEMU_ACC_WRITE
        || (!o->tlb_hit && (o->leaf & PTEMU_PTE_D) && !c->rtab[PTEMU_ACC_WRITE][m][r]))
        p |= PTEMU_UC_PROT_WRITE;
    return p;
}

_Bool ptemu_uc_tlb_fill(void *uc, uint64_t vaddr, int type, ptemu_uc_tlb_entry *result,
                        void *user_data)
{
    ptemu_uc_link *l = (ptemu_uc_link *)user_data;
    uint32_t access = type == PTEMU_UC_MEM_WRITE ? PTEMU_ACC_WRITE
                    : type == PTEMU_UC_MEM_FETCH ? PTEMU_ACC_FETCH : PTEMU_ACC_READ;
    (void)uc;
    vaddr &= ~(uint64_t)0xfff;
    /* A refusal is pending, or the probe already saw its access: refuse. */
    if (l->state == PTEMU_UC_FAULTED || l->state == PTEMU_UC_PROBED)
        return 0;
    if (ptemu_uc_sync(l))
        return 0;
    ptemu_ctx *c = ctx_of(l);
    uint32_t flags = l->cpu->cpl == 3 ? PTEMU_IN_USER : 0;
    ptemu_walk_out o;
    ptemu_fault f;

    if (l->state == PTEMU_UC_PROBE) {
        if (vaddr == l->fault_page) {
            result->paddr = PTEMU_UC_TRAP_PA;
            result->perms = PTEMU_UC_PROT_READ | PTEMU_UC_PROT_WRITE | PTEMU_UC_PROT_EXEC;
            return 1;
        }
        if (ptemu_ctx_translate(c, vaddr, access, flags | PTEMU_IN_NO_AD, &o, &f)
            || access == PTEMU_ACC_WRITE)
            return 0;
        result->paddr = o.pa & ~(uint64_t)0xfff;
        result->perms = uc_perms(c, access, flags, &o) & ~PTEMU_UC_PROT_WRITE;
        return 1;
    }

    l->fills++;
    l->fills_by_access[access]++;
    int r = ptemu_ctx_translate(c, vaddr, access, flags, &o, &f);
    if (r == PTEMU_OK) {
        result->paddr = o.pa & ~(uint64_t)0xfff;
        result->perms = uc_perms(c, access, flags, &o);
        return 1;
    }
    l->faults++;
    l->fault_page = vaddr;
    l->fault_va = vaddr;
    l->fault_access = access;
    l->fault_exact = 1;
    if (access == PTEMU_ACC_FETCH) {
        /* The first byte fetched from the refused page: RIP itself, or the
         * page's start for an instruction that began before it. */
        uint64_t rip = 0;
        void *val = &rip;
        read_regs(l, &l->regs[PTEMU_UC_R_RIP], &val, 1);
        if ((rip & ~(uint64_t)0xfff) == vaddr)
            l->fault_va = rip;
        if (r == PTEMU_VEC_PF)
            f.cr2 = l->fault_va;
    } else {
        l->fault_exact = 0;     /* the probe finds the address (see above) */
    }
    l->fault = f;
    l->state = PTEMU_UC_FAULTED;
    /* The block stopped before its tail ran. */
    l->pending.kind = PTEMU_UC_TAIL_NONE;
    return 0;
}

_Bool ptemu_uc_trap(void *uc, int type, uint64_t address, int size, int64_t value,
                    void *user_data)
{
    ptemu_uc_link *l = (ptemu_uc_link *)user_data;
    (void)uc;
    (void)type;
    (void)size;
    (void)value;
    if (l->state == PTEMU_UC_PROBE && (address & ~(uint64_t)0xfff) == PTEMU_UC_TRAP_PA) {
        l->probe_pa = address;
        l->state = PTEMU_UC_PROBED;
    }
    return 0;   /* not handled: the engine stops */
}

/* One byte of virtual memory for the tail decoder: translated as a fetch
 * without A/D writes or TLB use, read through the bounds-checked word
 * helper (memory is a multiple of 8 bytes).  -1 when it cannot be read. */
static int code_byte(ptemu_uc_link *l, const ptemu_ctx *c, uint64_t va)
{
    ptemu_walk_out o;
    ptemu_fault f;
    uint32_t flags = (l->cpu->cpl == 3 ? PTEMU_IN_USER : 0) | PTEMU_IN_NO_AD;
    if (ptemu_ctx_translate(c, va, PTEMU_ACC_FETCH, flags, &o, &f))
        return -1;
    const uint8_t *p = ptemu_word(l->mem, o.pa & ~(uint64_t)7);
    return p ? p[o.pa & 7] : -1;
}

/*
 * What the last instruction of the block [pc, pc+size) does to the TLB.
 * Only two encodings matter (SDM Vol. 2): MOV CR3, r64 = [REX] 0F 22 /r
 * with reg = 3 (the r/m form is always a register), and INVLPG m =
 * 0F 01 /7 with a memory operand.  The block's last bytes are matched
 * against them; a match in bytes that are really the end of another
 * instruction only costs a flush that was not needed.
 */
static void decode_tail(ptemu_uc_link *l, uint64_t pc, uint32_t size, ptemu_uc_tail *t)
{
    uint8_t b[16];
    uint32_t n = size < 16 ? size : 16;
    ptemu_ctx *c = ctx_of(l);
    memset(t, 0, sizeof *t);
    t->pc = pc;
    t->size = size;
    t->cr3 = l->seen[1];
    l->blocks_decoded++;
    for (uint32_t i = 0; i < n; i++) {
        int v = code_byte(l, c, pc + size - n + i);
        if (v < 0) {
            /* The block's bytes cannot be read now (its tables changed since
             * Unicorn fetched it): whatever its tail is, flush after it. */
            t->kind = PTEMU_UC_TAIL_FLUSH;
            return;
        }
        b[i] = (uint8_t)v;
    }
    if (n >= 3 && b[n - 3] == 0x0f && b[n - 2] == 0x22 && ((b[n - 1] >> 3) & 7) == 3
        && !(n >= 4 && (b[n - 4] & 0xf4) == 0x44)) {     /* REX.R would make it CR11 */
        t->kind = PTEMU_UC_TAIL_CR3;
        return;
    }
    for (uint32_t len = 3; len <= 8 && len <= n; len++) {
        uint32_t p = n - len;
        if (b[p] != 0x0f || b[p + 1] != 0x01)
            continue;
        uint8_t modrm = b[p + 2], mod = modrm >> 6, rm = modrm & 7;
        if (mod == 3 || ((modrm >> 3) & 7) != 7)
            continue;
        uint32_t want = 3, has_sib = rm == 4, dsize = 0;
        uint8_t sib = has_sib && p + 3 < n ? b[p + 3] : 0;
        want += has_sib;
        if (mod == 1)
            dsize = 1;
        else if (mod == 2 || (mod == 0 && (rm == 5 || (has_sib && (sib & 7) == 5))))
            dsize = 4;
        if (want + dsize != len)
            continue;
        int32_t disp = 0;
        if (dsize == 1)
            disp = (int8_t)b[p + want];
        else if (dsize == 4)
            disp = (int32_t)((uint32_t)b[p + want] | (uint32_t)b[p + want + 1] << 8
                             | (uint32_t)b[p + want + 2] << 16 | (uint32_t)b[p + want + 3] << 24);
        uint8_t rex = p >= 1 && (b[p - 1] & 0xf0) == 0x40 ? b[p - 1] : 0;
        /* A segment or address-size prefix changes the address: flush all. */
        uint32_t q = rex ? p - 1 : p;
        if (q >= 1 && (b[q - 1] == 0x64 || b[q - 1] == 0x65 || b[q - 1] == 0x67)) {
            t->kind = PTEMU_UC_TAIL_FLUSH;
            return;
        }
        uint8_t base, index = PTEMU_UC_NO_REG, scale = 0;
        if (has_sib) {
            base = (mod == 0 && (sib & 7) == 5) ? PTEMU_UC_NO_REG : (sib & 7);
            index = ((sib >> 3) & 7) == 4 ? PTEMU_UC_NO_REG : ((sib >> 3) & 7);
            scale = sib >> 6;
        } else {
            base = (mod == 0 && rm == 5) ? PTEMU_UC_RIP_REL : rm;
        }
        t->kind = PTEMU_UC_TAIL_INVLPG;
        t->base = base;
        t->index = index;
        t->scale = scale;
        t->disp = disp;
        /* REX.B extends the base, REX.X the index (not "none": index 4 with
         * REX.X is R12). */
        t->rex_base = (base < 8 && (rex & 1)) ? (uint8_t)(base + 8) : base;
        t->rex_index = has_sib && (rex & 2) ? (uint8_t)(((sib >> 3) & 7) + 8) : index;
        return;
    }
}

void ptemu_uc_block(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    ptemu_uc_link *l = (ptemu_uc_link *)user_data;
    (void)uc;
    if (l->state != PTEMU_UC_RUN)
        return;
    /* A new block started: the tail of the last one has run. */
    if (l->pending.kind && sync_state(l, 1))
        return;
    ptemu_uc_tail *t = &l->tails[(address ^ (address >> 9)) & (PTEMU_UC_NTAILS - 1)];
    if (t->size != size || t->pc != address || t->cr3 != l->seen[1])
        decode_tail(l, address, size, t);
    if (t->kind)
        l->pending = *t;
}
