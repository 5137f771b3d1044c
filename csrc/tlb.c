/*
 * tlb.c -- TLBs and paging-structure caches (Intel SDM Vol. 3A 4.10).
 *
 * A ptemu_tlb is a handful of set-associative arrays with LRU replacement,
 * all owned by Python (ffi.new) and described by their geometry:
 *
 *   tier 1:  L1 ITLB arrays (kind FETCH)   L1 DTLB arrays (kind DATA)
 *            one array per page size where real cores split them
 *   tier 2:  unified STLB arrays (FETCH|DATA), possibly several sizes each
 *   psc[2..5]: PDE, PDPTE, PML4E, PML5E caches (4.10.3), tagged by PCID
 *
 * A TLB entry caches the rights combined over the walk, not a decision, so
 * changes of CR0.WP, SMEP, SMAP, RFLAGS.AC or PKRU take effect at once, as
 * on hardware.  It also caches the leaf's D bit: a write through a clean
 * entry walks again (walk.c) so memory gets its D bit (4.8).
 *
 * Tags are va >> shift of the entry's page size (TLB) or level (PSC); an
 * entry matches on one 64-bit key (tag, size, valid bit).  Entries match the current
 * PCID, or any PCID when global (4.10.2.4); PSC entries are never global.
 *
 * Invariant: an array holds at most one valid entry per (tag, size, pcid);
 * fill() overwrites a match before it evicts anything.
 */
#include "ptemu.h"

static inline uint32_t kind_of(uint32_t access)
{
    return access == PTEMU_ACC_FETCH ? PTEMU_KIND_FETCH : PTEMU_KIND_DATA;
}

/* The match key of a page (TLB: size 0..2) or a table region (PSC: size =
 * level); bit 0 keeps every valid key non-zero.  The size field is bits 2:1
 * only: PSC levels 4 and 5 would otherwise spill into the tag's bit 0 and
 * make the PML4E/PML5E caches of two neighbouring regions collide (each PSC
 * array holds a single level, so size & 3 still tells nothing apart there
 * that needs telling). */
static inline uint64_t key_of(uint64_t tag, uint32_t size)
{
    return (tag << 3) | ((uint64_t)(size & 3u) << 1) | 1u;
}

static inline ptemu_tlbe *set_of(const ptemu_tlb_array *a, uint64_t tag)
{
    return a->e + (size_t)(tag & (a->sets - 1)) * a->ways;
}

/* The sizes an array's valid entries have (for ptemu_tlb_array.live). */
static uint32_t live_sizes(const ptemu_tlb_array *a)
{
    uint32_t live = 0;
    size_t n = (size_t)a->sets * a->ways;
    for (size_t i = 0; i < n; i++)
        if (a->e[i].key)
            live |= 1u << (a->e[i].size & 3u);
    return live;
}

int ptemu_tlb_init(ptemu_tlb *t)
{
    if (t->narrays > PTEMU_TLB_MAX_ARRAYS)
        return 0;
    memset(t->probe, 0, sizeof t->probe);
    memset(t->nprobe, 0, sizeof t->nprobe);
    memset(t->fill_at, 0, sizeof t->fill_at);
    for (uint32_t i = 0; i < t->narrays; i++) {
        ptemu_tlb_array *a = &t->arr[i];
        if (a->sets & (a->sets - 1))
            return 0;
        a->nsizes = 0;
        a->live = live_sizes(a);
        for (uint32_t s = 0; s < 3; s++)
            if (a->sizes & (1u << s))
                a->size_list[a->nsizes++] = (uint8_t)s;
    }
    for (uint32_t l = 0; l < 6; l++)
        if (t->psc[l].sets & (t->psc[l].sets - 1))
            return 0;
    for (uint32_t k = 0; k < 2; k++) {
        uint32_t kind = k ? PTEMU_KIND_FETCH : PTEMU_KIND_DATA;
        for (uint32_t tier = 1; tier <= 2; tier++) {
            for (uint32_t i = 0; i < t->narrays; i++) {
                ptemu_tlb_array *a = &t->arr[i];
                if (!a->sets || a->tier != tier || !(a->kinds & kind))
                    continue;
                t->probe[k][t->nprobe[k]++] = (uint8_t)i;
                for (uint32_t s = 0; s < 3; s++)
                    if ((a->sizes & (1u << s)) && !t->fill_at[k][tier - 1][s])
                        t->fill_at[k][tier - 1][s] = (uint8_t)(i + 1);
            }
        }
    }
    t->ready = 1;
    return 1;
}

/* Probe one array for va at every page size it holds. */
static PTEMU_INLINE ptemu_tlbe *probe(ptemu_tlb_array *a, uint64_t va, uint32_t pcid)
{
    const uint32_t ways = a->ways, nsizes = a->nsizes;
    const uint64_t set_mask = a->sets - 1;
    for (uint32_t k = 0; k < nsizes; k++) {
        uint32_t s = a->size_list[k];
        if (!(a->live & (1u << s)))
            continue;
        uint64_t tag = va >> ptemu_level_shift(s + 1);
        uint64_t key = key_of(tag, s);
        ptemu_tlbe *row = a->e + (size_t)(tag & set_mask) * ways;
        for (uint32_t w = 0; w < ways; w++) {
            if (row[w].key == key && (row[w].pcid == pcid || (row[w].flags & PTEMU_TE_G))) {
                row[w].stamp = ++a->clock;
                return &row[w];
            }
        }
    }
    return NULL;
}

/* Install an entry in its set: over a matching one (same key and PCID),
 * else the first invalid way, else the least recently used (stamps of
 * valid entries are >= 1, so an invalid way counts as oldest). */
static PTEMU_INLINE ptemu_tlbe *array_fill(ptemu_tlb_array *a, uint64_t key, uint64_t base,
                                           uint32_t pcid, uint32_t size, uint32_t flags,
                                           uint32_t pkey)
{
    const uint32_t ways = a->ways;
    ptemu_tlbe *row = a->e + (size_t)((key >> 3) & (a->sets - 1)) * ways;
    ptemu_tlbe *victim = row;
    uint64_t oldest = ~0ULL;
    for (uint32_t w = 0; w < ways; w++) {
        uint64_t k = row[w].key;
        if (k == key && row[w].pcid == pcid) {
            victim = &row[w];
            goto install;
        }
        uint64_t age = k ? row[w].stamp : 0;
        if (age < oldest) {
            oldest = age;
            victim = &row[w];
        }
    }
    if (victim->key)
        a->evictions++;
install:
    a->live |= 1u << (size & 3u);
    victim->key = key;
    victim->base = base;
    victim->stamp = ++a->clock;
    victim->pcid = (uint16_t)pcid;
    victim->size = (uint8_t)size;
    victim->flags = (uint8_t)flags;
    victim->pkey = (uint8_t)pkey;
    a->fills++;
    return victim;
}

PTEMU_INLINE ptemu_tlbe *ptemu_tlb_lookup(ptemu_tlb *t, uint64_t va, uint32_t access,
                                          uint32_t pcid)
{
    if (!t->ready && !ptemu_tlb_init(t))
        return NULL;
    const uint32_t k = access == PTEMU_ACC_FETCH, nprobe = t->nprobe[k];
    t->lookups[access]++;
    for (uint32_t i = 0; i < nprobe; i++) {
        ptemu_tlb_array *a = &t->arr[t->probe[k][i]];
        ptemu_tlbe *e = probe(a, va, pcid);
        if (!e) {
            a->misses++;
            continue;
        }
        a->hits++;
        if (a->tier == 1) {
            t->l1_hits[access]++;
            return e;
        }
        t->l2_hits[access]++;
        /* Second-level hit: refill the first level, as the STLB does. */
        uint32_t l1 = t->fill_at[k][0][e->size];
        return l1 ? array_fill(&t->arr[l1 - 1], e->key, e->base, e->pcid, e->size, e->flags,
                               e->pkey)
                  : e;
    }
    t->misses[access]++;
    return NULL;
}

void ptemu_tlb_fill(ptemu_tlb *t, uint64_t va, uint32_t access, uint32_t pcid,
                    uint32_t size, uint64_t base, uint32_t flags, uint32_t pkey)
{
    if (!t->ready && !ptemu_tlb_init(t))
        return;
    uint64_t key = key_of(va >> ptemu_level_shift(size + 1), size);
    uint32_t k = access == PTEMU_ACC_FETCH;
    for (uint32_t tier = 0; tier < 2; tier++) {
        uint32_t i = t->fill_at[k][tier][size];
        if (i)
            array_fill(&t->arr[i - 1], key, base, pcid, size, flags, pkey);
    }
}

int ptemu_psc_lookup(ptemu_tlb *t, uint64_t va, uint32_t pcid, uint32_t levels,
                     uint32_t *level, uint64_t *table, uint32_t *rights)
{
    /* Deepest first: a PDE-cache hit leaves only the PTE to read. */
    for (uint32_t l = 2; l <= levels && l <= 5; l++) {
        ptemu_tlb_array *a = &t->psc[l];
        if (!a->sets)
            continue;
        uint64_t tag = va >> ptemu_level_shift(l);
        uint64_t key = key_of(tag, l);
        ptemu_tlbe *row = set_of(a, tag);
        for (uint32_t w = 0; w < a->ways; w++) {
            ptemu_tlbe *e = &row[w];
            if (e->key == key && e->pcid == pcid) {
                e->stamp = ++a->clock;
                a->hits++;
                *level = l - 1;
                *table = e->base;
                *rights = e->flags;
                return 1;
            }
        }
        a->misses++;
    }
    return 0;
}

void ptemu_psc_fill(ptemu_tlb *t, uint32_t level, uint64_t va, uint32_t pcid,
                    uint64_t table, uint32_t rights)
{
    if (level < 2 || level > 5 || !t->psc[level].sets)
        return;
    array_fill(&t->psc[level], key_of(va >> ptemu_level_shift(level), level), table, pcid,
               level, rights, 0);
}

/* Does a flush of `kind` remove this TLB entry?  (SDM 4.10.4.1) */
static inline int tlb_entry_goes(const ptemu_tlbe *e, uint32_t kind, uint32_t pcid, uint64_t va)
{
    int global = (e->flags & PTEMU_TE_G) != 0;
    switch (kind) {
    case PTEMU_FLUSH_ALL:
        return 1;
    case PTEMU_FLUSH_NONGLOBAL:
        return !global;
    case PTEMU_FLUSH_PCID:
        return e->pcid == pcid && !global;
    case PTEMU_FLUSH_PCID_ALL:
        return e->pcid == pcid;
    case PTEMU_FLUSH_INVLPG:
        /* The page containing va at the entry's own size: a large page
         * covering the address goes too; global entries in every PCID. */
        return (e->key >> 3) == (va >> ptemu_level_shift(e->size + 1u)) &&
               (e->pcid == pcid || global);
    case PTEMU_FLUSH_ADDR:
        return (e->key >> 3) == (va >> ptemu_level_shift(e->size + 1u)) &&
               e->pcid == pcid && !global;
    }
    return 1;   /* unknown kind: dropping more is always allowed */
}

static inline int psc_entry_goes(const ptemu_tlbe *e, uint32_t kind, uint32_t pcid)
{
    if (kind == PTEMU_FLUSH_ALL || kind == PTEMU_FLUSH_NONGLOBAL)
        return 1;
    /* Per-PCID kinds drop every PSC entry of the PCID (4.10.4.1), and so
     * does INVLPG.  For INVPCID type 0 and a #PF the SDM requires only the
     * entries the address would use; dropping all of the PCID's is more,
     * which invalidation may always do. */
    return e->pcid == pcid;
}

static void sweep(ptemu_tlb_array *a, int is_psc, uint32_t kind, uint32_t pcid, uint64_t va)
{
    size_t n = (size_t)a->sets * a->ways;
    uint32_t live = 0;
    for (size_t i = 0; i < n; i++) {
        ptemu_tlbe *e = &a->e[i];
        if (!e->key)
            continue;
        if (is_psc ? psc_entry_goes(e, kind, pcid) : tlb_entry_goes(e, kind, pcid, va))
            e->key = 0;
        else
            live |= 1u << (e->size & 3u);
    }
    a->live = live;
}

void ptemu_tlb_flush(ptemu_tlb *t, uint32_t kind, uint32_t pcid, uint64_t va, uint32_t cause)
{
    if (cause < PTEMU_NFLUSH_CAUSES)
        t->flushes[cause]++;
    if (cause == PTEMU_CAUSE_FL_PF)
        t->fault_invalidations++;
    uint32_t n = t->narrays < PTEMU_TLB_MAX_ARRAYS ? t->narrays : PTEMU_TLB_MAX_ARRAYS;
    for (uint32_t i = 0; i < n; i++) {
        ptemu_tlb_array *a = &t->arr[i];
        if (!a->sets)
            continue;
        if (kind == PTEMU_FLUSH_INVLPG || kind == PTEMU_FLUSH_ADDR) {
            /* Only the sets va indexes can hold its page. */
            for (uint32_t s = 0; s < 3; s++) {
                if (!(a->sizes & (1u << s)))
                    continue;
                ptemu_tlbe *row = set_of(a, va >> ptemu_level_shift(s + 1));
                for (uint32_t w = 0; w < a->ways; w++)
                    if (row[w].key && tlb_entry_goes(&row[w], kind, pcid, va))
                        row[w].key = 0;
            }
        } else {
            sweep(a, 0, kind, pcid, va);
        }
    }
    for (uint32_t l = 2; l <= 5; l++)
        if (t->psc[l].sets)
            sweep(&t->psc[l], 1, kind, pcid, va);
}

uint64_t ptemu_tlb_count_valid(const ptemu_tlb *t, int which)
{
    uint64_t count = 0;
    for (uint32_t i = 0; i < PTEMU_TLB_MAX_ARRAYS + 6; i++) {
        const ptemu_tlb_array *a;
        if (i < PTEMU_TLB_MAX_ARRAYS) {
            if (i >= t->narrays || (which >= 0 && which != (int)i))
                continue;
            a = &t->arr[i];
        } else {
            uint32_t level = i - PTEMU_TLB_MAX_ARRAYS;
            if (which != 100 + (int)level)
                continue;
            a = &t->psc[level];
        }
        size_t n = (size_t)a->sets * a->ways;
        for (size_t k = 0; k < n; k++)
            count += a->e[k].key != 0;
    }
    return count;
}
