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
 *   unlink, zap, unsync, sync or root change starts a new one); the guest frame
 *   is backed.  Then the leaf spte is made by the same rule as
 *   shadow.py's make_leaf_spte(), written, its rmap entry logged, every page
 *   on the path counted as used (flood = 0), and the access retried.
 *
 *   fast path 2, a guest store into a write-protected level-1 guest table
 *   (KVM kvm_mmu_pte_write for the common case).  The real MMU refused the
 *   store; the guest's walk (as a probe: it owes no A or D bit) allows it
 *   and reaches a frame that is a write-protected guest page table; the
 *   shadow of the store's own mapping is already what a fill would make;
 *   every shadow page of the frame is an in-sync level-1 page whose flood
 *   count stays below the zap threshold.  Then the store is emulated: the
 *   word lands in guest memory and each shadow page's spte for that entry
 *   is rebuilt from the new gpte by the rule of shadow.py's leaf_from_gpte,
 *   through set_spte's rules (rmap changes logged, a lowered or moved spte
 *   flushes the real TLB once).  Unsync on, a guest CR0.WP=0 write, a
 *   non-level-1 or over-flooded page, more shadow pages than C tracks, a
 *   fill that would change the shadow, memory pressure (a fill would make
 *   room first): Python.
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

/* sptes are built from TE rights by the bit identities ptemu.h asserts
 * (TE_W/U at R/W and U/S, XD >> 63 = TE_NX, TE_D at D; SDM 4.6). */

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

/* 1 when gfn's shadow pages (gfn_sp, as Python mirrors gfn_sps) include the
 * one at host frame f. */
static int gfn_has_sp(const ptemu_shadow_ctx *ctx, uint64_t gfn, uint64_t f)
{
    if (gfn >= ctx->nframes)
        return 0;
    uint32_t nsp = ctx->gfn_nsp[gfn];
    if (nsp > PTEMU_GFN_SPS)
        return 0;                          /* more than C tracks: Python's */
    for (uint32_t k = 0; k < nsp; k++)
        if (ctx->gfn_sp[gfn * PTEMU_GFN_SPS + k] == f + 1)
            return 1;
    return 0;
}

/* The shadow walk of shadow_descend and direct_descend (KVM
 * for_each_shadow_entry): from the current root, one link per guest entry
 * w->entry[0..nlinks-1] above the leaf; each spte must link, with exactly
 * P|W|U|A, the (gfn, role) page _descend wants -- sp_key of the child's frame
 * holding gfn << 20 | role for the gfn the entry names and the role it
 * gives (the current mode's bits; the level; the rights inherited so far),
 * and gfn_sp listing it under that gfn.  path[0..nlinks] gets the frames,
 * root first; returns the last, or NO_FRAME where _descend would link. */
static uint64_t descend_links(const ptemu_shadow_ctx *ctx, ptemu_mem *hmem, uint64_t va,
                              const ptemu_walk_out *w, uint32_t levels, uint32_t nlinks,
                              uint64_t *path)
{
    /* A root of the current mode; the path goes to the log; no room to make
     * (the shadow limit, host memory pressure: Python makes it first). */
    if (!ctx->root_key || levels < 4 || levels > 5 || nlinks >= levels ||
        !ctx->path_log || ctx->path_log_len >= ctx->path_log_cap ||
        (ctx->root_key & ((1ULL << PTEMU_SP_KEY_SHIFT) - 1)) != ctx->root_role ||
        !ctx->hash_room || *ctx->host_free < PTEMU_FILL_MIN_FREE)
        return PTEMU_NO_FRAME;
    uint64_t f = ctx->root_hpa >> 12;
    if (f >= ctx->nhost)
        return PTEMU_NO_FRAME;
    uint8_t nxe = ctx->sp_info[f] & PTEMU_SPI_NXE;
    /* The mode bits of every role (NXE, WP, LA57): the root's, the current mode's. */
    uint64_t base = ctx->root_role & ~(uint64_t)0x7f;
    uint32_t acc = PTEMU_TE_W | PTEMU_TE_U;
    path[0] = f;
    for (uint32_t k = 0; k < nlinks; k++) {
        uint32_t level = levels - k;               /* of the page at path[k] */
        uint64_t e = w->entry[k], spte;
        acc &= (uint32_t)(e & (PTEMU_TE_W | PTEMU_TE_U)) | PTEMU_TE_NX;
        if (nxe && (e & PTEMU_PTE_NX))
            acc |= PTEMU_TE_NX;
        if (!ptemu_load64(hmem, (f << 12) + 8 * ((va >> (12 + 9 * (level - 1))) & 511), &spte))
            return PTEMU_NO_FRAME;
        uint64_t child = (spte & SPTE_FRAME) >> 12;
        uint64_t key = (((e & ctx->amask) >> 12) << PTEMU_SP_KEY_SHIFT) | base |
                       (level - 1) | ((uint64_t)acc << PTEMU_ROLE_ACC_SHIFT);
        if ((spte & ~SPTE_FRAME) != (PTEMU_PTE_P | PTEMU_PTE_W | PTEMU_PTE_U | PTEMU_PTE_A) ||
            child >= ctx->nhost || ctx->sp_key[child] != key ||
            !gfn_has_sp(ctx, (e & ctx->amask) >> 12, child))
            return PTEMU_NO_FRAME;                  /* missing or another role: link */
        f = child;
        path[k + 1] = f;
    }
    return f;
}

/* The fill cache missed (another region's slot, or a generation step since:
 * an unlink, zap, unsync, sync or root change anywhere).  When every shadow
 * page on va's path under the current root exists with the role shadow.py's
 * _descend would look for (the same key: gfn << 20 | role, from sp_key) --
 * so that _descend would link nothing -- write
 * the slot as _cache_path would and return it; else NULL (Python builds).
 * The level-1 page must be the only page of its frame; an unsync page's slot
 * gets its snapshot (gsnap_addr, which shadow.py sets in try_unsync and
 * clears in sync_page and zap), an in-sync one none -- and a page that is
 * neither known unsync nor write-protected is declined.  Making room (the shadow limit, host memory
 * pressure) is policy that Python does before its descent: then C declines. */
static ptemu_spc_slot *shadow_descend(ptemu_shadow_ctx *ctx, ptemu_mem *hmem, uint64_t va,
                                      const ptemu_walk_out *w)
{
    uint32_t levels = (uint32_t)(ctx->root_role & 7);
    uint64_t path[5];
    if (w->nentries != levels)
        return NULL;
    uint64_t f = descend_links(ctx, hmem, va, w, levels, levels - 1, path);
    if (f == PTEMU_NO_FRAME)
        return NULL;
    uint64_t l1_gfn = w->entry_pa[levels - 1] >> 12;
    if (l1_gfn >= ctx->nframes || ctx->gfn_nsp[l1_gfn] != 1)
        return NULL;
    uint64_t snap = ctx->gsnap_addr[f];
    if (!snap && !ctx->wp[l1_gfn])
        return NULL;                                /* neither in sync nor known unsync */
    ptemu_spc_slot *slot = &ctx->spc[(va >> 21) & ctx->spc_mask];
    slot->tag = (va >> 21) + 1;
    slot->gen = ctx->gen;
    slot->l1_base = f << 12;
    slot->l1_gfn = l1_gfn;
    slot->npath = levels;
    for (uint32_t k = 0; k < levels; k++)
        slot->path[k] = path[k];
    slot->gsnap = (uint64_t *)(uintptr_t)snap;     /* as _cache_path: gsnap_c or NULL */
    /* shadow.py's _pcache gets the path too (as a Python descent caches it):
     * a later Python fill in the region then makes no room either. */
    uint64_t *log = &ctx->path_log[PTEMU_PATH_LOG_WORDS * ctx->path_log_len++];
    log[0] = va >> 21;
    log[1] = ctx->gen;
    log[2] = levels;
    for (uint32_t k = 0; k < 5; k++)
        log[3 + k] = k < levels ? path[k] : 0;
    ctx->path_walks++;
    return slot;
}

/* The guest large-leaf bits a direct page's sptes carry (shadow.py leafbits). */
#define DIRECT_COPY  (PTEMU_PTE_PWT | PTEMU_PTE_PCD | PTEMU_PTE_G | \
                      (0xfULL << PTEMU_PTE_PKEY_SHIFT))

/* Fast path 1 for a guest 2 MiB leaf (the kernel's direct map): shadow.py's
 * fill through _direct_leaf_page, when it would link nothing.  The shadow
 * path from the current root down to the page of the guest table holding
 * the leaf must exist with the roles _descend wants (as shadow_descend
 * checks it), and under it, at va's index, the direct level-1 page of the
 * role direct_role gives (the leaf's rights, W only once its D is set; its
 * key, G and caching bits), keyed by the base frame of the 2 MiB range.
 * Returns that page's host frame and the path (root first, npath pages,
 * without the direct page), or NO_FRAME: Python builds or makes room. */
static uint64_t direct_descend(const ptemu_shadow_ctx *ctx, ptemu_mem *hmem, uint64_t va,
                               const ptemu_walk_out *w, uint64_t *path, uint32_t *npath,
                               uint32_t *dacc)
{
    uint32_t levels = (uint32_t)(ctx->root_role & 7);
    if (w->nentries + 1 != levels)
        return PTEMU_NO_FRAME;
    /* _descend's path: one link per guest entry above the leaf. */
    uint64_t f = descend_links(ctx, hmem, va, w, levels, w->nentries - 1, path), spte;
    if (f == PTEMU_NO_FRAME)
        return PTEMU_NO_FRAME;
    uint64_t base = ctx->root_role & ~(uint64_t)0x7f;    /* the mode bits of every role */
    *npath = w->nentries;
    /* direct_role, then the direct level-1 page under the level-2 page. */
    uint64_t leaf = w->leaf;
    uint32_t d = (leaf & PTEMU_PTE_D) ? w->rights : w->rights & ~(uint32_t)PTEMU_TE_W;
    uint64_t role = base | PTEMU_ROLE_DIRECT | ((uint64_t)d << PTEMU_ROLE_ACC_SHIFT) |
                    (((leaf >> PTEMU_PTE_PKEY_SHIFT) & 0xf) << PTEMU_ROLE_PKEY_SHIFT) |
                    ((leaf & PTEMU_PTE_G) ? PTEMU_ROLE_G : 0) |
                    ((leaf & PTEMU_PTE_PWT) ? PTEMU_ROLE_PWT : 0) |
                    ((leaf & PTEMU_PTE_PCD) ? PTEMU_ROLE_PCD : 0) | 1;
    uint64_t dgfn = (w->pa >> 12) & ~(uint64_t)511;
    if (!ptemu_load64(hmem, (f << 12) + 8 * ((va >> 21) & 511), &spte))
        return PTEMU_NO_FRAME;
    uint64_t child = (spte & SPTE_FRAME) >> 12;
    if ((spte & ~SPTE_FRAME) != (PTEMU_PTE_P | PTEMU_PTE_W | PTEMU_PTE_U | PTEMU_PTE_A) ||
        child >= ctx->nhost || ctx->sp_key[child] != ((dgfn << PTEMU_SP_KEY_SHIFT) | role))
        return PTEMU_NO_FRAME;
    *dacc = d;
    return child;
}

/* Fast path 1.  Returns 1 when the access may be retried (a new or widened
 * leaf spte, or it was there already), 0 to decline to Python, -1 when the
 * guest's own walk faults with a #PF the guest must get (gf filled: fast
 * path 5 hands it to Python's injection). */
static int shadow_fast_fill(ptemu_shadow_ctx *ctx, ptemu_mem *hmem, uint64_t va,
                            uint32_t access, uint32_t flags, ptemu_fault *gf)
{
    ptemu_walk_in in;
    ptemu_walk_out w;
    in.va = va;
    in.access = access;
    in.flags = flags;
    if (ptemu_translate(ctx->gcpu, ctx->gmem, NULL, &in, &w, gf) != PTEMU_OK)
        /* A true fault -- but a table frame not backed yet (BUS) is the
         * hypervisor's to back first, and a #GP is not a guest walk's. */
        return gf->vector == PTEMU_VEC_PF && gf->cause != PTEMU_CAUSE_BUS ? -1 : 0;
    if (!(ctx->enabled & PTEMU_FP_HIDDEN_FAULT))
        return 0;                          /* fast path 5 alone: the fill is Python's */
    if ((w.level != 1 && w.level != 2) || w.nentries == 0)
        return 0;                          /* a guest 1 GiB page: Python */
    uint64_t gfn = w.pa >> 12;
    if (gfn >= ctx->nframes)
        return 0;                          /* MMIO */
    if (access == PTEMU_ACC_WRITE &&
        (!(w.rights & PTEMU_TE_W) || ctx->wp[gfn] || !ctx->role_wp))
        return 0;                          /* emulate or unsync: policy */
    const ptemu_spc_slot *slot = NULL;
    uint64_t path[5], hpa, spte, addr, dframe = PTEMU_NO_FRAME;
    const uint64_t *upath;
    uint32_t npath;
    if (w.level == 2) {
        /* A guest 2 MiB page: its direct level-1 page, reached on the real
         * shadow tables (no slot), when nothing is to be linked. */
        uint32_t dacc;
        dframe = direct_descend(ctx, hmem, va, &w, path, &npath, &dacc);
        if (dframe == PTEMU_NO_FRAME)
            return 0;                      /* the path must be built: Python */
        hpa = ctx->p2m[gfn];
        if (hpa == PTEMU_NO_FRAME || (hpa >> 12) >= ctx->nhost)
            return 0;                      /* backing a frame is Python's */
        spte = ptemu_make_leaf_spte(hpa, dacc, w.leaf & DIRECT_COPY, 1, ctx->wp[gfn]);
        addr = (dframe << 12) + 8 * ((va >> 12) & 511);
        upath = path;
    } else {
        slot = &ctx->spc[(va >> 21) & ctx->spc_mask];
        if (slot->tag != (va >> 21) + 1 || slot->gen != ctx->gen ||
            slot->l1_gfn != w.entry_pa[w.nentries - 1] >> 12) {
            slot = shadow_descend(ctx, hmem, va, &w);
            if (!slot)
                return 0;                  /* the path must be built: Python */
        }
        if (slot->npath > 5)
            return 0;
        hpa = ctx->p2m[gfn];
        if (hpa == PTEMU_NO_FRAME || (hpa >> 12) >= ctx->nhost)
            return 0;                      /* backing a frame is Python's */
        spte = ptemu_make_leaf_spte(hpa, w.rights, w.leaf & ctx->leaf_copy,
                                    (w.leaf & PTEMU_PTE_D) != 0, ctx->wp[gfn]);
        addr = slot->l1_base + 8 * ((va >> 12) & 511);
        upath = slot->path;
        npath = slot->npath;
    }
    uint64_t old;
    if (!ptemu_load64(hmem, addr, &old))
        return 0;
    if (old) {
        if (old == spte) {
            ctx->pf_spurious++;
            if (slot && slot->gsnap)
                slot->gsnap[(va >> 12) & 511] = w.leaf;
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
    /* An unsync page remembers the gpte this spte was made from (resync at
     * the guest's INVLPG or CR3 load compares against it). */
    if (slot && slot->gsnap)
        slot->gsnap[(va >> 12) & 511] = w.leaf;
    ctx->pf_fixed++;
used:
    /* A use of every page on the path: their write-flooding counts restart
     * (KVM clears write_flooding_count on each page a fault walks; the
     * direct page under a 2 MiB leaf is no page of the path, as in _use). */
    for (uint32_t k = 0; k < npath; k++)
        if (upath[k] < ctx->nhost)
            ctx->flood[upath[k]] = 0;
    if (dframe != PTEMU_NO_FRAME) {
        /* shadow.py's _pcache[~(va >> 21)] gets the path and the direct page,
         * as _direct_leaf_page caches them (room checked above). */
        uint64_t *log = &ctx->path_log[PTEMU_PATH_LOG_WORDS * ctx->path_log_len++];
        log[0] = va >> 21;
        log[1] = ctx->gen;
        log[2] = (npath + 1) | PTEMU_PATH_LOG_DIRECT;
        for (uint32_t k = 0; k < 5; k++)
            log[3 + k] = k < npath ? path[k] : k == npath ? dframe : 0;
    }
    return 1;
}

uint64_t ptemu_shadow_run(ptemu_shadow_ctx *ctx, const ptemu_cpu *cpu, ptemu_mem *mem,
                          ptemu_tlb *tlb, const ptemu_trace_rec *trace, uint64_t n,
                          uint64_t start, ptemu_fault *fault)
{
    uint64_t i = start, last = n;
    uint32_t tries = 0;
    ctx->gfault_valid = 0;
    /* The walk context, derived once (a fill changes sptes, not the real
     * CPU state), and kept across calls in run_cache: deriving it and its
     * rights table costs about 1,400 instructions, once per exit. */
    ptemu_ctx scratch;
    const ptemu_ctx *c = ptemu_cached_ctx(ctx->run_cache, cpu, mem, tlb, &scratch, 1);
    for (;;) {
        uint64_t idx = ptemu_ctx_run(c, trace, n, i, NULL, fault);
        if (idx >= n || fault->vector != PTEMU_VEC_PF ||
            !(ctx->enabled & (PTEMU_FP_HIDDEN_FAULT | PTEMU_FP_TRUE_FAULT)))
            return idx;
        if (idx == last) {
            if (++tries > FAST_TRIES)
                return idx;
        } else {
            last = idx;
            tries = 0;
        }
        const ptemu_trace_rec *r = &trace[idx];
        ptemu_fault gf;
        int got = shadow_fast_fill(ctx, mem, fault->cr2, r->access,
                                   r->user ? PTEMU_IN_USER : 0, &gf);
        if (got <= 0) {
            /* Fast path 5: the guest's walk faults, so the exit is a true
             * fault.  Python injects it (it decides; C only saves it a second
             * walk that would fault the same way: a faulting walk is
             * side-effect free, SDM 4.8 as Bochs orders it). */
            if (got < 0 && (ctx->enabled & PTEMU_FP_TRUE_FAULT)) {
                ctx->gfault = gf;
                ctx->gfault_valid = 1;
            }
            return idx;
        }
        i = idx;
    }
}

int ptemu_shadow_translate(ptemu_shadow_ctx *ctx, ptemu_mmu *m, uint64_t va,
                           uint32_t access, uint32_t flags)
{
    int r = ptemu_mmu_translate(m, va, access, flags);
    for (uint32_t tries = 0; r == PTEMU_VEC_PF && tries < FAST_TRIES; tries++) {
        ptemu_fault gf;
        if (!(ctx->enabled & PTEMU_FP_HIDDEN_FAULT) ||
            shadow_fast_fill(ctx, m->mem, va, access, flags, &gf) <= 0)
            break;
        r = ptemu_mmu_translate(m, va, access, flags);
    }
    return r;
}

/* ---- fast path 2: a store into a write-protected level-1 guest table ------- */

/* shadow.py leaf_from_gpte: the spte a level-1 shadow page (spi) holds for gpte. */
static uint64_t spte_from_gpte(const ptemu_shadow_ctx *ctx, uint8_t spi, uint64_t gpte)
{
    uint64_t rsvd = ctx->rsvd_phys | ((spi & PTEMU_SPI_NXE) ? 0 : PTEMU_PTE_NX);
    /* Not present, A clear (the walk that sets A must happen first), or a
     * reserved bit: no spte, the access faults and the walk decides. */
    if (!(gpte & PTEMU_PTE_P) || !(gpte & PTEMU_PTE_A) || (gpte & rsvd))
        return 0;
    uint64_t gfn = (gpte & ctx->amask) >> 12;
    if (gfn >= ctx->nframes || ctx->p2m[gfn] == PTEMU_NO_FRAME)
        return 0;                         /* outside the VM, or not backed yet */
    if ((ctx->p2m[gfn] >> 12) >= ctx->nhost)
        return 0;                         /* never: set_spte indexes h2g with it */
    uint32_t acc = (spi & PTEMU_SPI_ACC_MASK) &
                   (((uint32_t)gpte & (PTEMU_TE_W | PTEMU_TE_U)) | PTEMU_TE_NX);
    if ((spi & PTEMU_SPI_NXE) && (gpte & PTEMU_PTE_NX))
        acc |= PTEMU_TE_NX;
    return ptemu_make_leaf_spte(ctx->p2m[gfn], acc, gpte & ctx->leaf_copy,
                                (gpte & PTEMU_PTE_D) != 0, ctx->wp[gfn]);
}

static void rmap_log(ptemu_shadow_ctx *ctx, uint64_t word, uint64_t addr)
{
    ctx->rmap_log[2 * ctx->rmap_log_len] = word;
    ctx->rmap_log[2 * ctx->rmap_log_len + 1] = addr;
    ctx->rmap_log_len++;
}

/* shadow.py set_spte: write the leaf spte at host address addr; the rmap
 * changes go to the log; *flush when the real TLB may hold a translation
 * that was lowered or moved.  Returns 1 when the word changed. */
static int set_spte(ptemu_shadow_ctx *ctx, ptemu_mem *hmem, uint64_t addr, uint64_t new,
                    int *flush)
{
    uint64_t old;
    if (!ptemu_load64(hmem, addr, &old) || old == new)
        return 0;
    if (old) {
        if (((old ^ new) & ~SPTE_WIDEN) || (old & ~new & PTEMU_PTE_W))
            *flush = 1;
        if (new && !((old ^ new) & SPTE_FRAME)) {
            ptemu_mem_store64(hmem, addr, new);       /* same frame: rmap unchanged */
            return 1;
        }
        uint64_t f = (old & SPTE_FRAME) >> 12;
        if (f < ctx->nhost && ctx->h2g[f] != PTEMU_NO_FRAME)
            rmap_log(ctx, ctx->h2g[f] | PTEMU_RMAP_REMOVE, addr);
    }
    if (new)            /* new is spte_from_gpte's: its frame is below nhost */
        rmap_log(ctx, ctx->h2g[(new & SPTE_FRAME) >> 12], addr);
    ptemu_mem_store64(hmem, addr, new);
    return 1;
}

/* 1 when a fill for this walk (use=False) would leave the shadow as it is:
 * the store's own leaf spte is there, on the path a fill would take. */
static int fill_is_noop(const ptemu_shadow_ctx *ctx, ptemu_mmu *m, uint64_t va,
                        const ptemu_walk_out *w, uint64_t hpa)
{
    uint64_t spte, cur;
    if (w->level == 1) {
        const ptemu_spc_slot *slot = &ctx->spc[(va >> 21) & ctx->spc_mask];
        if (slot->tag != (va >> 21) + 1 || slot->gen != ctx->gen ||
            slot->l1_gfn != w->entry_pa[w->nentries - 1] >> 12)
            return 0;
        spte = ptemu_make_leaf_spte(hpa, w->rights, w->leaf & ctx->leaf_copy, 1, 1);
        return ptemu_load64(m->mem, slot->l1_base + 8 * ((va >> 12) & 511), &cur) &&
               cur == spte;
    }
    if (w->level != 2)
        return 0;
    /* A guest 2 MiB page (the kernel's direct map): the direct level-1 page
     * reached on the real tables must have the role a fill would pick now
     * that the leaf is dirty (rights with W), and hold the spte it would make. */
    ptemu_walk_in in = { va, PTEMU_ACC_READ, PTEMU_IN_CPL | PTEMU_IN_NO_AD };
    ptemu_walk_out rw;
    ptemu_fault rf;
    if (ptemu_translate(m->cpu, m->mem, NULL, &in, &rw, &rf) != PTEMU_OK ||
        rw.level != 1 || rw.nentries == 0)
        return 0;
    uint64_t frame = rw.entry_pa[rw.nentries - 1] >> 12;
    if (frame >= ctx->nhost)
        return 0;
    uint8_t want = (uint8_t)((w->rights & PTEMU_SPI_ACC_MASK) | PTEMU_SPI_DIRECT |
                             (1 << PTEMU_SPI_LEVEL_SHIFT));
    if ((ctx->sp_info[frame] & ~PTEMU_SPI_NXE) != want)
        return 0;
    spte = ptemu_make_leaf_spte(hpa, w->rights, w->leaf & DIRECT_COPY, 1, 1);
    return rw.leaf == spte;
}

static int shadow_fast_pt_write(ptemu_shadow_ctx *ctx, ptemu_mmu *m, ptemu_tlb *tlb,
                                uint64_t va, uint64_t value)
{
    if (ctx->allow_unsync || !ctx->role_wp || !ctx->hash_room || *ctx->host_free < PTEMU_FILL_MIN_FREE)
        return 0;
    ptemu_walk_in in = { va, PTEMU_ACC_WRITE, PTEMU_IN_CPL | PTEMU_IN_NO_AD };
    ptemu_walk_out w;
    ptemu_fault gf;
    if (ptemu_translate(ctx->gcpu, ctx->gmem, NULL, &in, &w, &gf) != PTEMU_OK ||
        w.nentries == 0 || !(w.rights & PTEMU_TE_W) || !(w.leaf & PTEMU_PTE_D))
        return 0;
    for (uint32_t k = 0; k < w.nentries; k++)
        if (!(w.entry[k] & PTEMU_PTE_A))
            return 0;                      /* the walk owes an A bit: Python's walk */
    uint64_t gpa = w.pa, gfn = gpa >> 12;
    if (gfn >= ctx->nframes || !ctx->wp[gfn] || (gpa & 7))
        return 0;
    uint64_t hpa = ctx->p2m[gfn];
    uint32_t nsp = ctx->gfn_nsp[gfn];
    if (hpa == PTEMU_NO_FRAME || nsp == 0 || nsp > PTEMU_GFN_SPS ||
        ctx->rmap_log_len + 2 * PTEMU_GFN_SPS > ctx->rmap_log_cap ||
        !fill_is_noop(ctx, m, va, &w, hpa))
        return 0;
    const uint64_t *sps = &ctx->gfn_sp[gfn * PTEMU_GFN_SPS];
    for (uint32_t k = 0; k < nsp; k++) {
        uint64_t f = sps[k] - 1;
        /* Level 1 only (a store into an upper table unlinks: Python), and the
         * third emulated write without a use zaps the page (flooding). */
        if (f >= ctx->nhost || (ctx->sp_info[f] & (PTEMU_SPI_DIRECT | (7 << PTEMU_SPI_LEVEL_SHIFT)))
                                   != (1 << PTEMU_SPI_LEVEL_SHIFT) || ctx->flood[f] + 1 >= PTEMU_FLOOD_ZAP)
            return 0;
    }
    uint64_t old, at = hpa + (gpa & 0xfff);
    if (!ptemu_load64(m->mem, at, &old) || !ptemu_mem_store64(m->mem, at, value))
        return 0;
    ctx->pte_write++;
    int flush = 0;
    for (uint32_t k = 0; k < nsp; k++) {
        uint64_t f = sps[k] - 1;
        ctx->flood[f]++;
        if (old == value)
            continue;
        uint64_t spte = spte_from_gpte(ctx, ctx->sp_info[f], value);
        if (set_spte(ctx, m->mem, (f << 12) + (gpa & 0xff8), spte, &flush) && spte)
            ctx->pte_updated++;
    }
    if (flush) {
        ptemu_tlb_flush(tlb, PTEMU_FLUSH_ALL, 0, 0, PTEMU_FLUSHED_BY_USER);
        ctx->tlb_flush++;
    }
    ctx->pf_emulate++;
    return 1;
}

int ptemu_shadow_store(ptemu_shadow_ctx *ctx, ptemu_mmu *m, ptemu_tlb *tlb, uint64_t va,
                       uint64_t value)
{
    int r = ptemu_shadow_translate(ctx, m, va, PTEMU_ACC_WRITE, PTEMU_IN_CPL);
    if (r == PTEMU_OK)
        return ptemu_mem_store64(m->mem, m->out->pa, value) ? PTEMU_OK : PTEMU_VEC_PF;
    if (r != PTEMU_VEC_PF || !(ctx->enabled & PTEMU_FP_PT_WRITE) ||
        !shadow_fast_pt_write(ctx, m, tlb, va, value))
        return r;
    return PTEMU_OK;
}

/* ---- store streams ---------------------------------------------------------- */

uint64_t ptemu_store_stream(ptemu_mmu *m, const ptemu_store_rec *s, uint64_t n,
                            uint64_t start)
{
    for (uint64_t i = start; i < n; i++) {
        /* An unaligned address is the caller's to refuse (InvalidInput). */
        if ((s[i].va & 7) ||
            ptemu_mmu_translate(m, s[i].va, PTEMU_ACC_WRITE, PTEMU_IN_CPL) != PTEMU_OK ||
            !ptemu_mem_store64(m->mem, m->out->pa, s[i].value))
            return i;
    }
    return n;
}

uint64_t ptemu_shadow_store_stream(ptemu_shadow_ctx *ctx, ptemu_mmu *m, ptemu_tlb *tlb,
                                   const ptemu_store_rec *s, uint64_t n, uint64_t start)
{
    ctx->stream_vector = 0;
    for (uint64_t i = start; i < n; i++) {
        /* Leave room in the rmap log for one more store's changes. */
        if ((s[i].va & 7) || ctx->rmap_log_len + 2 * PTEMU_GFN_SPS + 1 > ctx->rmap_log_cap)
            return i;
        int r = ptemu_shadow_store(ctx, m, tlb, s[i].va, s[i].value);
        if (r != PTEMU_OK) {
            ctx->stream_vector = (uint32_t)r;   /* Python takes the exit from here */
            return i;
        }
    }
    return n;
}

/* ---- fast path 3: INVLPG with the shadow in sync ---------------------------- */

int ptemu_shadow_invlpg(ptemu_shadow_ctx *ctx, ptemu_mem *hmem, const ptemu_cpu *cpu,
                        ptemu_tlb *tlb, uint64_t va)
{
    if (!(ctx->enabled & PTEMU_FP_INVLPG))
        return 0;
    /* A non-canonical address invalidates nothing (SDM 4.10.4.1: INVLPG of a
     * non-canonical address is a no-op, not a fault). */
    unsigned width = (cpu->cr4 & PTEMU_CR4_LA57) ? 57 : 48;
    uint64_t top = va >> (width - 1);
    if (top != 0 && top != (1ULL << (65 - width)) - 1)
        return 1;
    int flush = 0;
    if (ctx->unsync_pages) {
        /* An unsync level-1 page may hold a stale spte for va: resync that one
         * entry from the guest's table (FNAME(invlpg)).  The page is the one
         * the fill cache has for va's 2 MiB region under the current root;
         * without a valid slot, Python walks the shadow. */
        const ptemu_spc_slot *slot = &ctx->spc[(va >> 21) & ctx->spc_mask];
        if (slot->tag != (va >> 21) + 1 || slot->gen != ctx->gen ||
            ctx->rmap_log_len + 2 > ctx->rmap_log_cap)
            return 0;
        if (slot->gsnap) {
            uint64_t idx = (va >> 12) & 511, gpte, f = slot->l1_base >> 12;
            if (slot->l1_gfn >= ctx->nframes || ctx->p2m[slot->l1_gfn] == PTEMU_NO_FRAME ||
                f >= ctx->nhost ||
                !ptemu_load64(hmem, ctx->p2m[slot->l1_gfn] + 8 * idx, &gpte))
                return 0;
            if (gpte != slot->gsnap[idx]) {
                slot->gsnap[idx] = gpte;
                set_spte(ctx, hmem, slot->l1_base + 8 * idx,
                         spte_from_gpte(ctx, ctx->sp_info[f], gpte), &flush);
                ctx->sync_entry++;
            }
        }
    }
    uint32_t pcid = (cpu->cr4 & PTEMU_CR4_PCIDE) ? (uint32_t)(cpu->cr3 & PTEMU_CR3_PCID_MASK) : 0;
    if (tlb) {
        ptemu_tlb_flush(tlb, PTEMU_FLUSH_INVLPG, pcid, va, PTEMU_FLUSHED_BY_INVLPG);
        if (flush) {        /* a lowered or moved spte: the whole real TLB, once */
            ptemu_tlb_flush(tlb, PTEMU_FLUSH_ALL, 0, 0, PTEMU_FLUSHED_BY_USER);
            ctx->tlb_flush++;
        }
    }
    return 1;
}

/* ---- an unsync page's resync (shadow.py sync_page's entries) ---------------- */

int ptemu_shadow_sync_page(ptemu_shadow_ctx *ctx, ptemu_mem *hmem, uint64_t sp_hpa,
                           uint64_t gfn, const uint64_t *gsnap, int *flush)
{
    /* Room in the rmap log for a removal and an addition per entry, a guest
     * table inside the VM and backed, and a level-1, non-direct shadow page
     * of Python's (sp_info) -- else Python does it. */
    if (!gsnap || !flush || ctx->rmap_log_len + 2 * 512 > ctx->rmap_log_cap ||
        (sp_hpa & 0xfff) || (sp_hpa >> 12) >= ctx->nhost || gfn >= ctx->nframes ||
        ctx->p2m[gfn] == PTEMU_NO_FRAME || (ctx->p2m[gfn] >> 12) >= ctx->nhost)
        return 0;
    uint8_t spi = ctx->sp_info[sp_hpa >> 12];
    if ((spi & (PTEMU_SPI_DIRECT | (7 << PTEMU_SPI_LEVEL_SHIFT))) != (1 << PTEMU_SPI_LEVEL_SHIFT))
        return 0;
    uint64_t gbase = ctx->p2m[gfn];
    /* In index order, as Python's loop over flatnonzero: every present spte
     * whose gpte changed since the snapshot is remade from the gpte now
     * (leaf_from_gpte: dropped when it may not exist), by set_spte's rules. */
    for (uint64_t idx = 0; idx < 512; idx++) {
        uint64_t spte, gpte;
        if (!ptemu_load64(hmem, sp_hpa + 8 * idx, &spte) ||
            !ptemu_load64(hmem, gbase + 8 * idx, &gpte))
            return -1;                  /* never: both frames are below nhost */
        if (spte && gpte != gsnap[idx])
            set_spte(ctx, hmem, sp_hpa + 8 * idx, spte_from_gpte(ctx, spi, gpte), flush);
    }
    return 1;
}

/* ---- fast path 4: MOV CR3 to a cached root ------------------------------------ */

_Static_assert(PTEMU_PREV_ROOTS_MAX == 64, "prev_key/prev_hpa are 64 long");

int ptemu_shadow_cr3(ptemu_shadow_ctx *ctx, ptemu_cpu *g, ptemu_cpu *real, ptemu_tlb *tlb,
                     uint64_t value)
{
    if (!(ctx->enabled & PTEMU_FP_CR3) || !ctx->root_key)
        return 0;
    uint32_t pcide = (g->cr4 & PTEMU_CR4_PCIDE) != 0;
    uint32_t m = g->maxphyaddr;
    if (m < 13 || m > 52)               /* as ptemu_ctx_init: no shift below is UB */
        m = 52;
    /* SDM 4.5.2 / 2.5: bits 62:MAXPHYADDR are reserved, and bit 63 too unless
     * CR4.PCIDE=1 (then it asks not to flush and is not stored): #GP, Python. */
    uint64_t rsvd = ((1ULL << 63) - 1) & ~((1ULL << m) - 1);
    if (value & (pcide ? rsvd : rsvd | PTEMU_CR3_NOFLUSH))
        return 0;
    int noflush = pcide && (value & PTEMU_CR3_NOFLUSH);
    if (!noflush && ctx->unsync_pages)
        return 0;                       /* a flushing load syncs them: Python */
    uint64_t cr3 = value & ~PTEMU_CR3_NOFLUSH;
    uint64_t key = (((cr3 & ctx->amask) >> 12) << PTEMU_SP_KEY_SHIFT) | ctx->root_role;
    int ret = 1;
    if (key != ctx->root_key) {
        uint32_t i, n = ctx->nprev;
        if (n > PTEMU_PREV_ROOTS_MAX || ctx->prev_max > PTEMU_PREV_ROOTS_MAX)
            return 0;
        for (i = 0; i < n && ctx->prev_key[i] != key; i++)
            ;
        if (i == n) {
            /* Not cached: a root still in the hash (KVM kvm_mmu_get_page's hit)
             * needs no page made -- nor room, under no memory pressure. */
            uint64_t gfn = (cr3 & ctx->amask) >> 12;
            if (gfn >= ctx->nframes || ctx->top_key[gfn] != key || !ctx->hash_room ||
                *ctx->host_free < PTEMU_FILL_MIN_FREE)
                return 0;               /* a new root, or room to make: Python */
            if (ctx->prev_max) {        /* the old root to the front, the list kept short */
                uint32_t keep = n < ctx->prev_max ? n : ctx->prev_max - 1;
                for (uint32_t k = keep; k > 0; k--) {
                    ctx->prev_key[k] = ctx->prev_key[k - 1];
                    ctx->prev_hpa[k] = ctx->prev_hpa[k - 1];
                }
                ctx->prev_key[0] = ctx->root_key;
                ctx->prev_hpa[0] = ctx->root_hpa;
                ctx->nprev = keep + 1;
            }
            ctx->root_key = key;
            ctx->root_hpa = ctx->top_hpa[gfn];
            ctx->gen++;
            ret = 3;
            goto load;
        }
        uint64_t hpa = ctx->prev_hpa[i];
        /* prev_roots, most recent first: the old root goes to the front, the
         * hit leaves the list, the list keeps at most prev_max. */
        for (uint32_t k = i; k > 0; k--) {
            ctx->prev_key[k] = ctx->prev_key[k - 1];
            ctx->prev_hpa[k] = ctx->prev_hpa[k - 1];
        }
        ctx->prev_key[0] = ctx->root_key;     /* (a hit means prev_max >= 1) */
        ctx->prev_hpa[0] = ctx->root_hpa;
        ctx->root_key = key;
        ctx->root_hpa = hpa;
        ctx->gen++;                     /* the fill cache was the old root's */
        ret = 2;
    }
load:
    g->cr3 = cr3;
    uint32_t pcid = pcide ? (uint32_t)(cr3 & PTEMU_CR3_PCID_MASK) : 0;
    real->cr3 = ctx->root_hpa | pcid;
    /* The guest's MOV CR3 flush (SDM 4.10.4.1) on the real TLB: the non-global
     * entries and paging-structure caches of the PCID. */
    if (!noflush && tlb)
        ptemu_tlb_flush(tlb, PTEMU_FLUSH_PCID, pcid, 0, PTEMU_FLUSHED_BY_CR3);
    return ret;
}

/* ---- shared with paravirt.c (declared in ptemu.h) ----------------------------- */

uint64_t ptemu_shadow_spte_from_gpte(const ptemu_shadow_ctx *ctx, uint8_t spi, uint64_t gpte)
{
    return spte_from_gpte(ctx, spi, gpte);
}

int ptemu_shadow_set_spte(ptemu_shadow_ctx *ctx, ptemu_mem *hmem, uint64_t addr, uint64_t new,
                          int *flush)
{
    return set_spte(ctx, hmem, addr, new, flush);
}
