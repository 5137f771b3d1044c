/*
 * paravirt.c -- the fast path of the paravirtual mmu_update hypercall.
 *
 * "Python decides, C executes" (DESIGN.md).  hypervisor/paravirt.py is the
 * readable account of a hypercall: it checks the batch's shape, validates
 * every entry by Xen's rules (as its module docstring states them), writes
 * the entries into the guest's tables and lets the shadow pages of those
 * tables follow (shadow.py pte_written, without flood detection: the guest
 * said what it writes).  This file does the same for the common batch, over
 * the arrays the shadow MMU owns and mirrors for csrc/shadow.c
 * (ptemu_shadow_ctx: p2m, wp, gfn_sp/gfn_nsp, sp_info, h2g, rmap_log):
 *
 *   1. the whole batch is validated first, with nothing written: every
 *      entry address an aligned word inside guest memory whose frame is
 *      backed; every present value pointing inside the VM and never mapping
 *      a guest page-table frame writable through a known leaf (a level-1
 *      table's entry, or a large-page entry of a level-2/3 table); every
 *      shadow page of the frames written an in-sync one C can see (at most
 *      PTEMU_GFN_SPS per frame, no unsync page anywhere), and no entry of a
 *      level-2+ table whose shadow has a child there changing (an unlink
 *      edits Python's children/parents);
 *   2. then, item by item in batch order, the word lands in guest memory
 *      and each level-1 shadow page of its frame gets the spte shadow.py's
 *      leaf_from_gpte would make, through set_spte's rules (shadow.c: the
 *      rmap changes logged, a lowered or moved spte asks for one flush of
 *      the real TLB, which Python's commit() then does).
 *
 * Anything else declines -- a refused entry (Python raises
 * HypercallRejected naming it), an unbacked frame (backing is Python's), a
 * frame with more shadow pages than C tracks, an unlink, unsync pages, too
 * little room in the rmap log -- and declining writes nothing, so Python
 * redoes the batch from the start and reaches the same result.  An entry
 * Python would refuse is always declined (the checks here are the same or
 * stricter), so a batch C applies is one Python applies too.
 *
 * Memory: guest words and sptes are read and written through ptemu_load64 /
 * ptemu_mem_store64 on host memory (bounds-checked); every index into a
 * Python array is checked against the length Python gave (nframes, nhost).
 */
#include "ptemu.h"

#define PV_FRAME_SHIFT 12
#define PV_LEVEL(spi)  (((spi) >> PTEMU_SPI_LEVEL_SHIFT) & 7)

/* The levels (bit L set for a shadow page of level L) of the non-direct
 * shadow pages of guest frame gfn, or -1 when C cannot tell (more pages
 * than it tracks, a bad index).  0: the frame is no shadowed table. */
static int pv_levels(const ptemu_shadow_ctx *ctx, uint64_t gfn)
{
    uint32_t nsp = ctx->gfn_nsp[gfn];
    if (nsp > PTEMU_GFN_SPS)
        return -1;
    int mask = 0;
    const uint64_t *sps = &ctx->gfn_sp[gfn * PTEMU_GFN_SPS];
    for (uint32_t k = 0; k < nsp; k++) {
        uint64_t f = sps[k] - 1;
        if (sps[k] == 0 || f >= ctx->nhost)
            return -1;
        uint8_t spi = ctx->sp_info[f];
        if ((spi & PTEMU_SPI_DIRECT) || PV_LEVEL(spi) == 0)
            return -1;                  /* never: gfn_sps holds live non-direct pages */
        mask |= 1 << PV_LEVEL(spi);
    }
    return mask;
}

/* 1 when some guest frame in [base, base + span) is a shadowed table
 * (paravirt.py: `for pt in gfn_sps: if base <= pt < base + span`); the
 * caller has checked base + span <= nframes. */
static int pv_any_table(const ptemu_shadow_ctx *ctx, uint64_t base, uint64_t span)
{
    for (uint64_t g = base; g < base + span; g++)
        if (ctx->gfn_nsp[g])
            return 1;
    return 0;
}

/* paravirt.py validate_entry for (gpa, value): 1 when it may be written,
 * 0 when Python must look (it refuses, or C cannot tell).  mask: the levels
 * of the shadow pages of gpa's frame (pv_levels). */
static int pv_entry_ok(const ptemu_shadow_ctx *ctx, int mask, uint64_t value)
{
    if (!(value & PTEMU_PTE_P))
        return 1;
    uint64_t nframes = ctx->nframes;
    uint64_t target = (value & ctx->amask) >> PV_FRAME_SHIFT;
    int large = (value & PTEMU_PTE_PS) ? mask & ((1 << 2) | (1 << 3)) : 0;
    if (large) {
        /* A large-page entry of a level-2 (2 MiB) or level-3 (1 GiB) table:
         * the whole range must be inside the VM and, when writable, hold no
         * guest page table (Xen: no writable mapping of a page-table page). */
        for (unsigned lv = 2; lv <= 3; lv++) {
            if (!(large & (1 << lv)))
                continue;
            uint64_t span = 1ULL << (9 * (lv - 1));
            uint64_t base = target & ~(span - 1);
            if (base >= nframes)
                return 0;
            if (value & PTEMU_PTE_W) {
                /* A range that runs past the end may hold a table frame
                 * beyond memory (a guest CR3 may name one): Python looks. */
                if (base + span > nframes || pv_any_table(ctx, base, span))
                    return 0;
            }
        }
        return 1;
    }
    if (target >= nframes)
        return 0;
    /* A leaf of a level-1 table mapping a page-table frame writable. */
    if ((value & PTEMU_PTE_W) && (mask & (1 << 1)) && ctx->gfn_nsp[target])
        return 0;
    return 1;
}

int ptemu_pv_mmu_update(ptemu_shadow_ctx *ctx, ptemu_mem *hmem, const uint64_t *items,
                        uint64_t n)
{
    if (!(ctx->enabled & PTEMU_FP_MMU_UPDATE) || ctx->unsync_pages || n == 0 ||
        ctx->nframes == 0 || ctx->nframes > (UINT64_MAX >> PV_FRAME_SHIFT))
        return PTEMU_PV_DECLINE;
    uint64_t size = ctx->nframes << PV_FRAME_SHIFT;
    uint64_t log_need = 0;
    /* 1. Validate the whole batch; nothing is written before every item passed. */
    for (uint64_t i = 0; i < n; i++) {
        uint64_t gpa = items[2 * i], value = items[2 * i + 1];
        if ((gpa & 7) || gpa > size - 8)
            return PTEMU_PV_DECLINE;    /* not an aligned entry inside guest memory */
        uint64_t gfn = gpa >> PV_FRAME_SHIFT;
        uint64_t hpa = ctx->p2m[gfn];
        if (hpa == PTEMU_NO_FRAME || (hpa >> PV_FRAME_SHIFT) >= ctx->nhost)
            return PTEMU_PV_DECLINE;    /* backing the table's frame is Python's */
        int mask = pv_levels(ctx, gfn);
        if (mask < 0 || !pv_entry_ok(ctx, mask, value))
            return PTEMU_PV_DECLINE;
        if (mask & ~(1 << 1)) {
            /* A level-2+ shadow with a child at this index would unlink it
             * if the entry changes.  (C never unlinks, so the children and
             * the words compared here stay as they are for the whole batch.) */
            uint64_t cur;
            if (!ptemu_load64(hmem, hpa + (gpa & 0xfff), &cur))
                return PTEMU_PV_DECLINE;
            if (cur != value) {
                const uint64_t *sps = &ctx->gfn_sp[gfn * PTEMU_GFN_SPS];
                for (uint32_t k = 0; k < ctx->gfn_nsp[gfn]; k++) {
                    uint64_t f = sps[k] - 1, spte;
                    if (PV_LEVEL(ctx->sp_info[f]) == 1)
                        continue;
                    if (!ptemu_load64(hmem, (f << PV_FRAME_SHIFT) + (gpa & 0xff8), &spte) ||
                        spte)
                        return PTEMU_PV_DECLINE;
                }
            }
        }
        if (mask & (1 << 1))
            log_need += 2 * (uint64_t)ctx->gfn_nsp[gfn];   /* set_spte: a remove and an add */
    }
    if (log_need > ctx->rmap_log_cap)
        return PTEMU_PV_DECLINE;
    if (ctx->rmap_log_len + log_need > ctx->rmap_log_cap)
        return PTEMU_PV_LOG_FULL;       /* Python takes the log in and asks again */

    /* 2. Apply, in batch order (vm.guest_write, then shadow.py pte_written). */
    int flush = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t gpa = items[2 * i], value = items[2 * i + 1];
        uint64_t gfn = gpa >> PV_FRAME_SHIFT;
        uint64_t at = ctx->p2m[gfn] + (gpa & 0xfff), old;
        if (!ptemu_load64(hmem, at, &old) || !ptemu_mem_store64(hmem, at, value))
            return PTEMU_PV_DECLINE;    /* cannot happen: checked above, unchanged since */
        uint32_t nsp = ctx->gfn_nsp[gfn];
        if (!nsp)
            continue;
        ctx->pte_write++;
        if (old == value)
            continue;
        const uint64_t *sps = &ctx->gfn_sp[gfn * PTEMU_GFN_SPS];
        for (uint32_t k = 0; k < nsp; k++) {
            uint64_t f = sps[k] - 1;
            uint8_t spi = ctx->sp_info[f];
            if (PV_LEVEL(spi) != 1)
                continue;               /* no child there (checked): nothing to drop */
            uint64_t spte = ptemu_shadow_spte_from_gpte(ctx, spi, value);
            if (ptemu_shadow_set_spte(ctx, hmem, (f << PV_FRAME_SHIFT) + (gpa & 0xff8), spte,
                                      &flush) && spte)
                ctx->pte_updated++;
        }
    }
    return flush ? PTEMU_PV_DONE_FLUSH : PTEMU_PV_DONE;
}

int ptemu_pv_mmu_update1(ptemu_shadow_ctx *ctx, ptemu_mem *hmem, uint64_t gpa,
                         uint64_t value)
{
    uint64_t item[2] = { gpa, value };
    return ptemu_pv_mmu_update(ctx, hmem, item, 1);
}
