/*
 * shadow.c -- fast paths of the shadow MMU (mechanisms only).
 *
 * "Python decides, C executes" (DESIGN.md).  The shadow MMU in
 * src/ptemu/hypervisor/shadow.py owns every structure -- the (gfn, role)
 * hash, the rmap, the write-protected set, the flood counters, the cache of
 * level-1 paths -- and decides every policy question.  This file does the
 * one exit that needs no decision, over arrays Python owns and mirrors:
 *
 *   fast path 1, a hidden fault on an existing shadow path (KVM: the
 *   fast_page_fault() idea applied to FNAME(fetch)'s last step).  The real
 *   MMU faulted; the guest's own walk succeeds at a 4 KiB leaf; the level-1
 *   shadow page for the guest table holding that leaf is the one cached
 *   for the 2 MiB region (ptemu_spc_slot, valid for one generation: any
 *   unlink, zap, unsync or root change starts a new one); the guest frame
 *   is backed.  Then the leaf spte is made by the same rule as
 *   shadow.py's make_leaf_spte(), written, its rmap entry logged, every page
 *   on the path counted as used (flood = 0), and the access retried.
 *
 * Everything else declines: a guest walk that faults (a true fault, or a
 * table frame not backed yet), a large guest page, a write the policy must
 * see (to a write-protected table: emulate or unsync; with the guest's
 * CR0.WP=0; a write the guest's rights refuse), an spte that would move or
 * narrow (a flush decision), a full rmap log.  Declining costs only the
 * guest walk: it is side-effect free when it faults (A/D are set only after
 * every check, SDM 4.8 as Bochs orders it), and idempotent when it succeeds,
 * so Python redoes it unchanged.
 *
 * Memory: sptes are words of host memory, read and written through
 * ptemu_load64 / ptemu_mem_store64 (bounds-checked); every index into a
 * Python array is checked against the length Python gave.
 */
#include "ptemu.h"

/* The bit coincidences the walk relies on: R/W and U/S of an entry are the
 * PTEMU_TE_W/U rights bits (walk.c ANDs `rights &= e` over the levels,
 * batch.c indexes its rights table with them), XD (bit 63) shifted down is
 * PTEMU_TE_NX, and a leaf's D is PTEMU_TE_D.  This file builds sptes from
 * TE rights with the same identities (SDM 4.6, tables 4-14..4-20). */
_Static_assert(PTEMU_TE_W == PTEMU_PTE_W, "TE_W must sit at the R/W bit");
_Static_assert(PTEMU_TE_U == PTEMU_PTE_U, "TE_U must sit at the U/S bit");
_Static_assert((PTEMU_PTE_NX >> 63) == PTEMU_TE_NX, "XD >> 63 must be TE_NX");
_Static_assert(PTEMU_TE_D == PTEMU_PTE_D, "TE_D must sit at the D bit");
_Static_assert(PTEMU_PF_W == PTEMU_PTE_W && PTEMU_PF_U == PTEMU_PTE_U,
               "#PF error code W/U bits sit where the entry's R/W, U/S do");

#define SPTE_FRAME   0x000ffffffffff000ULL
#define SPTE_WIDEN   (PTEMU_PTE_A | PTEMU_PTE_W | PTEMU_PTE_D)
#define FAST_TRIES   8        /* fast fixes of one access before Python looks */

uint64_t ptemu_make_leaf_spte(uint64_t hpa, uint32_t acc, uint64_t copy_bits,
                              uint32_t dirty, uint32_t write_protected)
{
    /* P and A: a leaf spte exists only after a guest walk that set A.  W
     * (with D) only once the guest's D is set -- the first write must trap
     * so that the guest walk sets D (SDM 4.8) -- and never onto a frame
     * that is a write-protected guest page table. */
    uint64_t spte = hpa | PTEMU_PTE_P | PTEMU_PTE_A | (acc & PTEMU_TE_U) | copy_bits;
    if ((acc & PTEMU_TE_W) && dirty && !write_protected)
        spte |= PTEMU_PTE_W | PTEMU_PTE_D;
    if (acc & PTEMU_TE_NX)
        spte |= PTEMU_PTE_NX;
    return spte;
}

/* Fast path 1.  Returns 1 when the access may be retried (a new or widened
 * leaf spte, or it was there already), 0 to decline to Python. */
static int shadow_fast_fill(ptemu_shadow_ctx *ctx, ptemu_mem *hmem, uint64_t va,
                            uint32_t access, uint32_t flags)
{
    ptemu_walk_in in;
    ptemu_walk_out w;
    ptemu_fault gf;
    in.va = va;
    in.access = access;
    in.flags = flags;
    if (ptemu_translate(ctx->gcpu, ctx->gmem, NULL, &in, &w, &gf) != PTEMU_OK)
        return 0;                          /* a true fault, or a table not backed */
    if (w.level != 1 || w.nentries == 0)
        return 0;                          /* a large guest page: direct pages */
    uint64_t gfn = w.pa >> 12;
    if (gfn >= ctx->nframes)
        return 0;                          /* MMIO */
    if (access == PTEMU_ACC_WRITE &&
        (!(w.rights & PTEMU_TE_W) || ctx->wp[gfn] || !ctx->role_wp))
        return 0;                          /* emulate or unsync: policy */
    const ptemu_spc_slot *slot = &ctx->spc[(va >> 21) & ctx->spc_mask];
    if (slot->tag != (va >> 21) + 1 || slot->gen != ctx->gen ||
        slot->l1_gfn != w.entry_pa[w.nentries - 1] >> 12 || slot->npath > 5)
        return 0;                          /* the path must be built: Python */
    uint64_t hpa = ctx->p2m[gfn];
    if (hpa == PTEMU_NO_FRAME)
        return 0;                          /* backing a frame is Python's */
    uint64_t spte = ptemu_make_leaf_spte(hpa, w.rights, w.leaf & ctx->leaf_copy,
                                         (w.leaf & PTEMU_PTE_D) != 0, ctx->wp[gfn]);
    uint64_t addr = slot->l1_base + 8 * ((va >> 12) & 511);
    uint64_t old;
    if (!ptemu_load64(hmem, addr, &old))
        return 0;
    if (old) {
        if (old == spte) {
            ctx->pf_spurious++;
            goto used;
        }
        if (((old ^ spte) & ~SPTE_WIDEN) || (old & ~spte))
            return 0;                      /* moved or narrowed: a flush decision */
        /* Only A, W, D added: the same frame, the same rmap entry, and no
         * flush (a TLB entry may be narrower than its spte, never wider). */
    } else {
        if (ctx->rmap_log_len >= ctx->rmap_log_cap)
            return 0;
        ctx->rmap_log[2 * ctx->rmap_log_len] = gfn;
        ctx->rmap_log[2 * ctx->rmap_log_len + 1] = addr;
        ctx->rmap_log_len++;
    }
    if (!ptemu_mem_store64(hmem, addr, spte))
        return 0;                          /* cannot happen: the load passed */
    ctx->pf_fixed++;
used:
    /* A use of every page on the path: their write-flooding counts restart
     * (KVM clears write_flooding_count on each page a fault walks). */
    for (uint32_t k = 0; k < slot->npath; k++)
        if (slot->path[k] < ctx->nhost)
            ctx->flood[slot->path[k]] = 0;
    return 1;
}

uint64_t ptemu_shadow_run(ptemu_shadow_ctx *ctx, const ptemu_cpu *cpu, ptemu_mem *mem,
                          ptemu_tlb *tlb, const ptemu_trace_rec *trace, uint64_t n,
                          uint64_t start, ptemu_fault *fault)
{
    uint64_t i = start, last = n;
    uint32_t tries = 0;
    for (;;) {
        uint64_t idx = ptemu_run(cpu, mem, tlb, trace, n, i, NULL, fault);
        if (idx >= n || fault->vector != PTEMU_VEC_PF ||
            !(ctx->enabled & PTEMU_FP_HIDDEN_FAULT))
            return idx;
        if (idx == last) {
            if (++tries > FAST_TRIES)
                return idx;
        } else {
            last = idx;
            tries = 0;
        }
        const ptemu_trace_rec *r = &trace[idx];
        if (!shadow_fast_fill(ctx, mem, fault->cr2, r->access,
                              r->user ? PTEMU_IN_USER : 0))
            return idx;
        i = idx;
    }
}

int ptemu_shadow_translate(ptemu_shadow_ctx *ctx, ptemu_mmu *m, uint64_t va,
                           uint32_t access, uint32_t flags)
{
    int r = ptemu_mmu_translate(m, va, access, flags);
    for (uint32_t tries = 0; r == PTEMU_VEC_PF && tries < FAST_TRIES; tries++) {
        if (!(ctx->enabled & PTEMU_FP_HIDDEN_FAULT) ||
            !shadow_fast_fill(ctx, m->mem, va, access, flags))
            break;
        r = ptemu_mmu_translate(m, va, access, flags);
    }
    return r;
}
