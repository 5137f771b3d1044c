/*
 * batch.c -- loops over arrays Python allocated: translate many addresses,
 * run an access stream until the first fault, and the minimal walk the
 * benchmarks measure the full walker against.  Nothing here allocates; the
 * walk context is derived once per call.
 */
#include "ptemu.h"

/* Addresses walked together by the fast path of translate_many. */
#define PTEMU_GROUP 8

/*
 * The common case of a batch without TLB on plain (or sparse) memory, with no side
 * effect: the walk succeeds and every A bit (and D for a write) is already
 * set, so nothing is written.  ok[l] = 1 with pa[l] for each such address;
 * ok[l] = 0 sends it to the full walk -- any fault, any A/D to set -- which
 * gives the exact answer, so this path can only be faster, never different.
 *
 * A walk is a chain of dependent loads; walking up to PTEMU_GROUP addresses
 * level by level puts the independent loads of one level in flight together
 * (as a hardware page walker with several walks outstanding does).
 *
 * Order: these walks write nothing, and the full walks that follow (in
 * index order) write only A/D bits, which no result here depends on except
 * to turn "something to write" into "nothing to write" -- an address this
 * path declined then gets the same answer from the full walk.  So results
 * equal walking the addresses one by one.
 */
static PTEMU_INLINE void fast_walk_group(const ptemu_ctx *c, const uint8_t *base, uint64_t size,
                                         const uint64_t *va, const uint8_t *access,
                                         uint32_t access_all, uint32_t flags, uint32_t m,
                                         uint64_t *pa, uint8_t *ok)
{
    /* Per address: the next table; the AND and the OR of the entries read
     * (R/W, U/S and A must be 1 in all -- their AND; XD in any -- the OR,
     * SDM 4.6, 4.8); the leaf and its level (0: no leaf reached). */
    uint64_t table[PTEMU_GROUP], all[PTEMU_GROUP], any_bits[PTEMU_GROUP], ent[PTEMU_GROUP];
    uint32_t leaf_level[PTEMU_GROUP];
    uint8_t walking[PTEMU_GROUP];
    const uint64_t addr_mask = c->addr_mask;
    int more = 0;

    for (uint32_t l = 0; l < m; l++) {
        uint32_t acc = access ? access[l] : access_all;
        ok[l] = 0;
        walking[l] = acc <= PTEMU_ACC_FETCH && ptemu_canonical(c, va[l]);
        more |= walking[l];
        table[l] = c->top_table;
        all[l] = ~0ULL;
        any_bits[l] = 0;
        leaf_level[l] = 0;
    }
    for (uint32_t level = c->levels; level >= 1 && more; level--) {
        const uint32_t shift = ptemu_level_shift(level);
        const uint64_t rsvd_table = c->rsvd[level][0], rsvd_large = c->rsvd[level][1];
        more = 0;
        for (uint32_t l = 0; l < m; l++) {
            if (!walking[l])
                continue;
            uint64_t epa = table[l] + ((va[l] >> shift) & 511) * 8, e;
            const uint8_t *p = base + epa;
            walking[l] = 0;
            /* Sparse memory (size 0) looks the word up in its segment map
             * on this refusing side only (physmap.c). */
            if (size < 8 || epa > size - 8) {
                p = c->mem->nseg ? ptemu_physmap_word(c->mem, epa) : 0;
                if (!p)
                    continue;
            }
            memcpy(&e, p, 8);
            if (!(e & PTEMU_PTE_P) || (e & ((e & PTEMU_PTE_PS) ? rsvd_large : rsvd_table)))
                continue;
            all[l] &= e;
            any_bits[l] |= e;
            if (level == 1 || (e & PTEMU_PTE_PS)) {
                ent[l] = e;
                leaf_level[l] = level;
                continue;
            }
            table[l] = e & addr_mask;
            walking[l] = 1;
            more = 1;
        }
    }
    for (uint32_t l = 0; l < m; l++) {
        if (!leaf_level[l])
            continue;
        uint32_t acc = access ? access[l] : access_all;
        uint64_t e = ent[l];
        /* PTEMU_TE_W/U sit at the entry's R/W and U/S bits; XD lands on
         * PTEMU_TE_NX (bit 0). */
        uint32_t rights = (uint32_t)(all[l] & (PTEMU_TE_W | PTEMU_TE_U)) |
                          (uint32_t)((any_bits[l] & c->nx_mask) >> 63);
        uint64_t need = PTEMU_PTE_A | (acc == PTEMU_ACC_WRITE ? PTEMU_PTE_D : 0);
        /* D is the leaf's own bit; A must be set in every entry. */
        uint64_t have = (all[l] & PTEMU_PTE_A) | (e & PTEMU_PTE_D);
        if (((have & need) != need && !(flags & PTEMU_IN_NO_AD)) ||
            rights_check(c, acc, flags, rights, (uint32_t)(e >> PTEMU_PTE_PKEY_SHIFT) & 15))
            continue;
        uint64_t sz = 1ULL << ptemu_level_shift(leaf_level[l]);
        pa[l] = (e & addr_mask & ~(sz - 1)) | (va[l] & (sz - 1));
        ok[l] = 1;
    }
}

/* One address of a batch through the full translation; 1 when it faulted. */
static inline int translate_one(const ptemu_ctx *c, uint64_t va, uint32_t acc, uint32_t flags,
                                uint64_t *pa, uint8_t *vector, uint32_t *error_code)
{
    ptemu_walk_out o;
    ptemu_fault f;
    int r;
    if (acc > PTEMU_ACC_FETCH) {
        /* Validated in Python; here only kept from indexing stats. */
        r = ptemu_set_fault(&f, PTEMU_VEC_GP, 0, 0, PTEMU_CAUSE_NONE, 0);
    } else {
        r = ptemu_ctx_translate(c, va, acc, flags, &o, &f);
    }
    if (r == PTEMU_OK) {
        *pa = o.pa;
        *vector = 0;
        *error_code = 0;
        return 0;
    }
    *pa = 0;
    *vector = (uint8_t)f.vector;
    *error_code = f.error_code;
    return 1;
}

uint64_t ptemu_translate_many(const ptemu_cpu *cpu, ptemu_mem *mem, ptemu_tlb *tlb,
                              const uint64_t *va, const uint8_t *access,
                              uint32_t access_all, uint32_t flags, uint64_t n,
                              uint64_t *pa, uint8_t *vector, uint32_t *error_code)
{
    ptemu_ctx c;
    uint64_t faults = 0;
    ptemu_ctx_init(&c, cpu, mem, tlb);
    ptemu_ctx_tables(&c);
    flags = ptemu_resolve_flags(cpu, flags);
    if (tlb || mem->frames || mem->ept || !c.levels || c.eager_a) {
        for (uint64_t i = 0; i < n; i++)
            faults += translate_one(&c, va[i], access ? access[i] : access_all, flags, &pa[i],
                                    &vector[i], &error_code[i]);
        return faults;
    }
    for (uint64_t i = 0; i < n; i += PTEMU_GROUP) {
        uint32_t m = n - i < PTEMU_GROUP ? (uint32_t)(n - i) : PTEMU_GROUP;
        uint8_t ok[PTEMU_GROUP];
        fast_walk_group(&c, mem->base, mem->size, va + i, access ? access + i : NULL, access_all,
                        flags, m, pa + i, ok);
        for (uint32_t l = 0; l < m; l++) {
            uint64_t k = i + l;
            if (ok[l]) {
                vector[k] = 0;
                error_code[k] = 0;
            } else {
                faults += translate_one(&c, va[k], access ? access[k] : access_all, flags,
                                        &pa[k], &vector[k], &error_code[k]);
            }
        }
    }
    return faults;
}

/*
 * A TLB miss waits for its leaf paging-structure entry, mostly from DRAM.
 * While misses are frequent, ptemu_run starts that load RUN_AHEAD accesses
 * early: it reads the access's upper-level entries (bounds-checked, mostly
 * cached) and prefetches the leaf entry's line.  Nothing is written and no
 * TLB or PSC state is touched: only the speed can change.
 */
#define RUN_AHEAD 16
#define RUN_WINDOW 64           /* accesses over which slow ones (misses) are counted */
#define RUN_WINDOW_MISSES 4     /* prefetch in the next window when at least this many */

/* Always inlined: as a call, GCC finds it free of side effects (a prefetch
 * is none) and drops it. */
static PTEMU_INLINE void prefetch_leaf(const ptemu_ctx *c, const uint8_t *base, uint64_t size,
                                       uint64_t va)
{
    uint64_t table = c->top_table;
    for (uint32_t level = c->levels; level > 1; level--) {
        uint64_t epa = table + ((va >> ptemu_level_shift(level)) & 511) * 8, e;
        if (size < 8 || epa > size - 8)
            return;
        memcpy(&e, base + epa, 8);
        if ((e & (PTEMU_PTE_P | PTEMU_PTE_PS)) != PTEMU_PTE_P)
            return;     /* not present, or a large page: no leaf table to go to */
        table = e & c->addr_mask;
    }
    uint64_t epa = table + ((va >> 12) & 511) * 8;
    if (size >= 8 && epa <= size - 8)
        PTEMU_PREFETCH(base + epa);
}

/* How ptemu_run hands an access to run_slow. */
enum run_from {
    RUN_WHOLE,          /* nothing done yet: the whole translation */
    RUN_AFTER_HOT,      /* the hot probe missed: the rest of the lookup, then the walk */
    RUN_FROM_HIT        /* a hot hit that faults or must rewalk */
};

/* ptemu_run's accesses that its loop does not finish itself -- all but
 * the usable hits in the first array probed.  Out of line, so that the
 * loop keeps its registers. */
static PTEMU_NOINLINE int run_slow(const ptemu_ctx *c, uint64_t va, uint32_t acc,
                                   uint32_t flags, enum run_from from, const ptemu_tlb_hit *hit,
                                   uint64_t *pa, ptemu_fault *fault)
{
    ptemu_walk_out o;
    ptemu_tlb_hit h;
    int r;
    if (from == RUN_WHOLE) {
        r = ptemu_ctx_translate(c, va, acc, flags, &o, fault);
    } else {
        if (from == RUN_AFTER_HOT) {
            ptemu_tlb_lookup_after_hot(c->tlb, va, acc, c->pcid, &h);
            hit = &h;
        }
        r = translate_looked_up(c, va, acc, flags, c->tlb, hit, 0, &o, fault);
    }
    if (r == PTEMU_OK && pa)
        *pa = o.pa;
    return r;
}

uint64_t ptemu_run(const ptemu_cpu *cpu, ptemu_mem *mem, ptemu_tlb *tlb,
                   const ptemu_trace_rec *trace, uint64_t n, uint64_t start,
                   uint64_t *pa, ptemu_fault *fault)
{
    ptemu_ctx c;
    ptemu_ctx_init(&c, cpu, mem, tlb);
    ptemu_ctx_tables(&c);
    /* With paging on, a TLB and no EPT, the loop takes the common hit --
     * in the first array probed, usable as it is -- itself.  Everything
     * else goes to the one translation path (run_slow), told how far the
     * loop got: a miss there continues the lookup, a hit there that faults
     * or must rewalk starts the translation from that entry. */
    const int own_hits = tlb && c.levels && !mem->ept;
    ptemu_tlb_hot hot[2];   /* by access kind: 0 data, 1 fetch */
    memset(hot, 0, sizeof hot);
    if (own_hits) {
        ptemu_tlb_hot_of(tlb, PTEMU_ACC_READ, &hot[0]);
        ptemu_tlb_hot_of(tlb, PTEMU_ACC_FETCH, &hot[1]);
    }
    /* What the hit path reads of the context, in a copy that no call sees,
     * so that the compiler may keep it in registers across the loop. */
    const ptemu_ctx hc = c;
    const int can_prefetch = own_hits && !mem->frames;
    uint32_t window_misses = 0, prefetching = 0;
    for (uint64_t i = start; i < n; i++) {
        if ((i & (RUN_WINDOW - 1)) == 0) {
            prefetching = can_prefetch && window_misses >= RUN_WINDOW_MISSES;
            window_misses = 0;
        }
        if (prefetching && n - i > RUN_AHEAD)
            prefetch_leaf(&hc, mem->base, mem->size, trace[i + RUN_AHEAD].va);
        uint64_t va = trace[i].va;
        uint32_t acc = trace[i].access;
        if (acc > PTEMU_ACC_FETCH) {
            ptemu_set_fault(fault, PTEMU_VEC_GP, 0, 0, PTEMU_CAUSE_NONE, 0);
            return i;
        }
        uint32_t flags = trace[i].user ? PTEMU_IN_USER : 0;
        ptemu_tlb_hit h;
        enum run_from from = RUN_WHOLE;
        if (own_hits && ptemu_canonical(&hc, va)) {
            const ptemu_tlb_hot *g = &hot[acc == PTEMU_ACC_FETCH];
            uint64_t data;
            uint64_t *way = ptemu_tlb_hot_hit(tlb, g, va, acc, hc.pcid, &data);
            if (way) {
                if (!(rights_check_tab(&hc, acc, flags, ptemu_td_flags(data), ptemu_td_pkey(data)) |
                      (uint32_t)hit_needs_walk(data, acc, NULL))) {
                    if (pa)
                        pa[i] = ptemu_td_base(data) | (va & g->offset_mask);
                    continue;
                }
                /* Counted already: a fault or a rewalk from this entry. */
                h.way = way;
                h.data = data;
                h.ways = g->ways;
                h.size = g->size;
                from = RUN_FROM_HIT;
            } else if (g->a) {
                from = RUN_AFTER_HOT;
            }
        }
        window_misses++;
        if (run_slow(&c, va, acc, flags, from, &h, pa ? &pa[i] : NULL, fault) != PTEMU_OK)
            return i;
    }
    return n;
}

/*
 * The baseline: what any page walk must do at the least -- index, load
 * (still bounds-checked), test P and PS.  No rights, no reserved bits, no
 * A/D, no canonical check.  Unmapped addresses give ~0.  Plain memory only
 * (no frame table, no EPT: those return n, all unmapped).
 */
uint64_t ptemu_minimal_walk_many(const ptemu_mem *mem, uint64_t cr3, uint32_t levels,
                                 const uint64_t *va, uint64_t n, uint64_t *pa)
{
    const uint64_t mask = 0x000ffffffffff000ULL;
    const uint8_t *base = mem->base;
    const uint64_t size = mem->size;
    uint64_t unmapped = 0;
    if (mem->frames || mem->ept) {
        for (uint64_t i = 0; i < n; i++)
            pa[i] = ~0ULL;
        return n;
    }
    if (levels != 5)
        levels = 4;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t table = cr3 & mask, e = 0, v = va[i];
        uint32_t level = levels;
        for (;;) {
            uint64_t epa = table + ((v >> ptemu_level_shift(level)) & 511) * 8;
            if (size < 8 || epa > size - 8) {
                e = 0;
                break;
            }
            memcpy(&e, base + epa, 8);
            if (!(e & PTEMU_PTE_P)) {
                e = 0;
                break;
            }
            if (level == 1 || (e & PTEMU_PTE_PS))
                break;
            table = e & mask;
            level--;
        }
        if (!e) {
            pa[i] = ~0ULL;
            unmapped++;
        } else {
            uint64_t sz = 1ULL << ptemu_level_shift(level);
            pa[i] = (e & mask & ~(sz - 1)) | (v & (sz - 1));
        }
    }
    return unmapped;
}
