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

/*
 * The engine's CPU state into l->cpu.  A control register that differs
 * from the last fill was written by the code (MOV CR0/CR3/CR4, WRMSR
 * EFER): its TLB effect (SDM 4.10.4.1, the rules of Mmu.write_cr3 and
 * write_cr4) is applied to ptemu's TLB, and Unicorn's TLB is flushed too
 * whenever ptemu's is (QEMU flushes its own on CR3 writes and on some CR4
 * bits, not on PCIDE 1->0; flushing more is always allowed).
 * Returns 0, or -1 when the registers cannot be read.
 */
int ptemu_uc_sync(ptemu_uc_link *l)
{
    uint64_t v[6];
    ptemu_uc_msr efer;
    void *vals[PTEMU_UC_NREGS];
    for (int i = 0; i < 6; i++) {
        v[i] = 0;
        vals[i] = &v[i];
    }
    efer.rid = PTEMU_MSR_EFER;
    efer.value = 0;
    vals[PTEMU_UC_R_EFER] = &efer;
    if (((uc_reg_read_batch_fn)l->reg_read_batch)(l->uc, l->regs, vals, PTEMU_UC_NREGS))
        return -1;

    ptemu_cpu *cpu = l->cpu;
    uint64_t cr0 = v[PTEMU_UC_R_CR0] & 0xffffffffu;
    uint64_t cr3 = v[PTEMU_UC_R_CR3];
    uint64_t cr4 = v[PTEMU_UC_R_CR4] & 0xffffffffu;
    /* SDM 5.5: the CPL is bits 1:0 of CS. */
    uint32_t cpl = (uint32_t)(v[PTEMU_UC_R_CS] & 3);
    uint32_t ac = (uint32_t)(v[PTEMU_UC_R_RFLAGS] >> 18) & 1;
    int uc_flush_needed = 0;

    if (cr0 != l->seen[0]) {
        l->events[PTEMU_UC_EV_CR0]++;
        if ((cpu->cr0 & PTEMU_CR0_PG) && !(cr0 & PTEMU_CR0_PG)) {
            link_tlb_flush(l, PTEMU_FLUSH_ALL, 0, PTEMU_CAUSE_FL_CR0);
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
            link_tlb_flush(l, PTEMU_FLUSH_ALL, 0, PTEMU_CAUSE_FL_CR4);
            uc_flush_needed = 1;
        } else if ((changed & PTEMU_CR4_PAE) || ((cr4 & PTEMU_CR4_SMEP) && !(old & PTEMU_CR4_SMEP))) {
            link_tlb_flush(l, PTEMU_FLUSH_PCID_ALL, pcid_of(cpu->cr3, old), PTEMU_CAUSE_FL_CR4);
            uc_flush_needed = 1;
        }
        cpu->cr4 = cr4;
        l->seen[2] = cr4;
        l->ctx_valid = 0;
    }
    if (cr3 != l->seen[1]) {
        /* MOV CR3: with PCIDE=1 bit 63 asks for no flush and is not stored
         * (QEMU stores it: the engine's value keeps it, ptemu's does not). */
        int noflush = (cr4 & PTEMU_CR4_PCIDE) && (cr3 & PTEMU_CR3_NOFLUSH);
        uint64_t value = (cr4 & PTEMU_CR4_PCIDE) ? cr3 & ~(uint64_t)PTEMU_CR3_NOFLUSH : cr3;
        l->events[PTEMU_UC_EV_CR3]++;
        cpu->cr3 = value;
        if (!noflush) {
            link_tlb_flush(l, PTEMU_FLUSH_PCID, pcid_of(value, cr4), PTEMU_CAUSE_FL_CR3);
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
    if (uc_flush_needed)
        ptemu_uc_flush(l);
    /* RIP is kept for a refused fetch (see ptemu_uc_tlb_fill). */
    l->seen_rip = v[PTEMU_UC_R_RIP];
    return 0;
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
    l->fault_access = access;
    l->fault_exact = 1;
    if (r == PTEMU_VEC_PF) {
        if (access == PTEMU_ACC_FETCH) {
            /* The first byte fetched from the refused page: RIP itself, or
             * the page's start for an instruction that began before it. */
            uint64_t rip = l->seen_rip;
            f.cr2 = (rip & ~(uint64_t)0xfff) == vaddr ? rip : vaddr;
        } else {
            l->fault_exact = 0;
        }
    }
    l->fault = f;
    l->state = PTEMU_UC_FAULTED;
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
