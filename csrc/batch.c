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
 * The common case of a batch without TLB on plain memory, with no side
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
            walking[l] = 0;
            if (size < 8 || epa > size - 8)
                continue;
            memcpy(&e, base + epa, 8);
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

uint64_t ptemu_run(const ptemu_cpu *cpu, ptemu_mem *mem, ptemu_tlb *tlb,
                   const ptemu_trace_rec *trace, uint64_t n, uint64_t start,
                   uint64_t *pa, ptemu_fault *fault)
{
    ptemu_ctx c;
    ptemu_walk_out o;
    ptemu_ctx_init(&c, cpu, mem, tlb);
    ptemu_ctx_tables(&c);
    /* With paging on, a TLB and no EPT, the loop takes a usable TLB hit
     * itself; the rest -- misses, faults, rewalks -- continues in the one
     * translation path from the entry the lookup found. */
    const int own_hits = tlb && c.levels && !mem->ept;
    for (uint64_t i = start; i < n; i++) {
        uint64_t va = trace[i].va;
        uint32_t acc = trace[i].access;
        if (acc > PTEMU_ACC_FETCH) {
            ptemu_set_fault(fault, PTEMU_VEC_GP, 0, 0, PTEMU_CAUSE_NONE, 0);
            return i;
        }
        uint32_t flags = trace[i].user ? PTEMU_IN_USER : 0;
        int r;
        if (own_hits && ptemu_canonical(&c, va)) {
            ptemu_tlbe *e = ptemu_tlb_lookup(tlb, va, acc, c.pcid);
            if (e && !rights_check(&c, acc, flags, e->flags, e->pkey) &&
                !hit_needs_walk(e, acc, NULL)) {
                if (pa)
                    pa[i] = hit_pa(e, va);
                continue;
            }
            r = translate_looked_up(&c, va, acc, flags, tlb, e, &o, fault);
        } else {
            r = ptemu_ctx_translate(&c, va, acc, flags, &o, fault);
        }
        if (r != PTEMU_OK)
            return i;
        if (pa)
            pa[i] = o.pa;
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
