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
 * Layout of an array (ptemu_tlb_array.slots): set by set, each set three
 * runs of `ways` words, so that a probe reads only the keys of its set --
 * 1.5 cache lines for a 12-way STLB set, where whole entries took 6 -- and
 * a hit then touches one stamp and one data word:
 *
 *   slots + set * 3 * ways:  key[0 .. ways-1]     see ptemu_cdef.h
 *                            stamp[0 .. ways-1]   LRU clock at last use
 *                            data[0 .. ways-1]    PCID | base | pkey | flags
 *
 * A lookup takes the steps ptemu_tlb_init derives from the geometry
 * (ptemu_tlb.steps: each array in probe order at each page size it holds),
 * only those whose array has its live bit for the size (ptemu_tlb.live_steps,
 * a bit per step, derived again whenever a live bit changes), so that arrays
 * for sizes a workload never used cost only their miss counter.
 *
 * Invariants: an array holds at most one valid entry per (tag, size, pcid);
 * fill() overwrites a match before it evicts anything.  An invalid entry has
 * key 0 and stamp 0, a valid one a stamp >= 1 (the clock counts from 1), so
 * the least recently used way of a set -- the first one, on a tie -- is the
 * first invalid way if there is one: replacement reads the stamps alone.
 * Every set holding a valid entry has its bit in the array's occupancy map
 * (occ, marked by a fill into an invalid way -- any other fill finds its set
 * marked already -- and recomputed by ptemu_tlb_init): a flush sweeps
 * only those sets -- a shadow VM flushes the whole real TLB after a
 * lowered spte, when it holds a handful of entries of its 1,800.
 */
#include "ptemu.h"

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

static inline uint32_t key_size(uint64_t key) { return (uint32_t)(key >> 1) & 3u; }

/* The associativities of real TLB and paging-structure-cache arrays, as
 * constants: at each of them the compiler unrolls the loop over the ways of
 * a set (a compare and a branch per way, which a probe that misses
 * predicts well); any other count takes the loop as written. */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8
#define PTEMU_UNROLL _Pragma("GCC unroll 16")
#else
#define PTEMU_UNROLL
#endif
/* The usual associativities -- 4 (DTLB, PSCs), 12 (STLB), 2 (small PSCs)
 * -- are constants at one call each, so that the compiler unrolls the loop
 * over the ways of a set; any other count takes the loop as written (GCC
 * unrolls only where the count is a constant: PTEMU_UNROLL on a loop of
 * unknown count would add a jump into the unrolled body).  Tests, not a
 * switch: GCC makes a switch a jump table, an indirect branch whose target
 * alternates with the arrays a miss visits. */
#define PTEMU_BY_WAYS(ways, FN, ...)                                          \
    do {                                                                      \
        const uint32_t ways_ = (ways);                                        \
        if (ways_ == 4)       return FN##_n(__VA_ARGS__, 4);                  \
        else if (ways_ == 12) return FN##_n(__VA_ARGS__, 12);                 \
        else if (ways_ == 2)  return FN##_n(__VA_ARGS__, 2);                  \
        return FN##_any(__VA_ARGS__, ways_);                                  \
    } while (0)

/* The first way of a set (row: its key run) that holds key for this PCID
 * -- or for any PCID when its data has global_bit set -- or -1.  A compare
 * and a branch per way: a probe that usually misses predicts them well. */
#define FIND_WAY_BODY                                                         \
    for (uint32_t w = 0; w < ways; w++) {                                     \
        if (row[w] != key)                                                    \
            continue;                                                         \
        const uint64_t data = row[2 * ways + w];                              \
        if (ptemu_td_pcid(data) == pcid || (data & global_bit))               \
            return (int)w;                                                    \
    }                                                                         \
    return -1;

static PTEMU_INLINE int find_way_n(const uint64_t *row, uint64_t key, uint32_t pcid,
                                   uint64_t global_bit, const uint32_t ways)
{
    PTEMU_UNROLL
    FIND_WAY_BODY
}

static inline int find_way_any(const uint64_t *row, uint64_t key, uint32_t pcid,
                               uint64_t global_bit, const uint32_t ways)
{
    FIND_WAY_BODY
}

static PTEMU_INLINE int find_way(const uint64_t *row, uint32_t ways, uint64_t key,
                                 uint32_t pcid, uint64_t global_bit)
{
    PTEMU_BY_WAYS(ways, find_way, row, key, pcid, global_bit);
}

/* The least recently used way of a set: the smallest stamp, the first one
 * on a tie (an invalid way has stamp 0, so it is taken first).  Stamps are
 * at most the array's clock; while it is below 2^60 (no run comes near:
 * the clock counts uses) and ways <= 16, the smallest of stamp * 16 + way
 * is exactly that way, found with one compare and one conditional move per
 * way -- selects, not branches, since which way is oldest is
 * unpredictable. */
static PTEMU_INLINE uint32_t oldest_way_n(const uint64_t *stamp, const uint32_t ways)
{
    uint64_t best = stamp[0] << 4;
    PTEMU_UNROLL
    for (uint32_t w = 1; w < ways; w++) {
        const uint64_t k = (stamp[w] << 4) | w;
        best = k < best ? k : best;
    }
    return (uint32_t)best & 15u;
}

/* The same choice for any count and clock: the smallest stamp, kept with
 * masks so that the compiler cannot turn the selects into branches. */
static inline uint32_t oldest_way_any(const uint64_t *stamp, const uint32_t ways)
{
    uint64_t oldest = stamp[0];
    uint32_t v = 0;
    for (uint32_t w = 1; w < ways; w++) {
        const uint64_t older = (uint64_t)0 - (uint64_t)(stamp[w] < oldest);
        oldest ^= (oldest ^ stamp[w]) & older;
        v ^= (v ^ w) & (uint32_t)older;
    }
    return v;
}

/* The victim of a fill in a set of `a` (stamp: its stamp run). */
static PTEMU_INLINE uint32_t oldest_way(const ptemu_tlb_array *a, const uint64_t *stamp,
                                        uint32_t ways)
{
    if (a->clock >= (1ULL << 60))
        return oldest_way_any(stamp, ways);
    PTEMU_BY_WAYS(ways, oldest_way, stamp);
}

/* find_way() for a probe that usually hits (the first-level one; ways <=
 * 64): the ways holding the key are found as a bit mask, without a branch
 * per way, since which way hits is unpredictable and a mispredicted loop
 * exit costs more than comparing every way.  (A probe that usually misses,
 * a second-level one or a fill's, predicts the loop's branches well.) */
static PTEMU_INLINE uint64_t key_mask(const uint64_t *row, uint32_t ways, uint64_t key)
{
    uint64_t m = 0;
    for (uint32_t w = ways; w-- > 0;)   /* last way first: no variable shifts */
        m = (m << 1) | (row[w] == key);
    return m;
}

static PTEMU_INLINE int find_way_hit(const uint64_t *row, uint32_t ways, uint64_t key,
                                     uint32_t pcid, uint64_t global_bit)
{
    /* The usual first-level associativities as constants, so that the
     * compiler unrolls the compares. */
    uint64_t m = ways == 4 ? key_mask(row, 4, key)
               : ways == 8 ? key_mask(row, 8, key)
               : key_mask(row, ways, key);
    for (; m; m &= m - 1) {
        const uint32_t w = ptemu_ctz64(m);
        const uint64_t data = row[2 * ways + w];
        /* | and not ||: one branch, taken nearly always (one PCID per key). */
        if ((ptemu_td_pcid(data) == pcid) | ((data & global_bit) != 0))
            return (int)w;
    }
    return -1;
}

/* The key run of the set a tag indexes (stamps follow at + ways, data at
 * + 2 * ways). */
/* The set a tag indexes, and a set's words (keys, stamps, data). */
static inline size_t set_of(const ptemu_tlb_array *a, uint64_t tag)
{
    return (size_t)(tag & (a->sets - 1));
}

static inline uint64_t *row_at(const ptemu_tlb_array *a, size_t set)
{
    return a->slots + set * 3u * a->ways;
}

static inline uint64_t *row_of(const ptemu_tlb_array *a, uint64_t tag)
{
    return row_at(a, set_of(a, tag));
}

/* The occupancy bit of a set (ptemu_tlb_array.occ). */
static inline void occ_mark(ptemu_tlb_array *a, size_t set)
{
    a->occ[(set >> 6) & (PTEMU_TLB_OCC_WORDS - 1u)] |= 1ull << (set & 63u);
}

static inline int occ_has(const ptemu_tlb_array *a, size_t set)
{
    return (int)(a->occ[(set >> 6) & (PTEMU_TLB_OCC_WORDS - 1u)] >> (set & 63u)) & 1;
}

/* From the entries themselves: the sizes an array's valid entries have
 * (ptemu_tlb_array.live) and the sets that hold one (occ). */
static void derive_occupancy(ptemu_tlb_array *a)
{
    uint32_t live = 0;
    memset(a->occ, 0, sizeof a->occ);
    for (size_t set = 0; set < a->sets; set++) {
        const uint64_t *row = row_at(a, set);
        for (uint32_t w = 0; w < a->ways; w++)
            if (row[w]) {
                live |= 1u << key_size(row[w]);
                occ_mark(a, set);
            }
    }
    a->live = live;
}

_Static_assert(sizeof(((ptemu_tlb *)0)->steps[0]) / sizeof(ptemu_tlb_step) <= 32,
               "ptemu_tlb.live_steps has one bit per lookup step");

/* ptemu_tlb.live_steps from the arrays' live bits. */
static PTEMU_NOINLINE void derive_live_steps(ptemu_tlb *t)
{
    for (uint32_t k = 0; k < 2; k++) {
        uint32_t m = 0;
        for (uint32_t j = 0; j < t->nsteps[k]; j++) {
            const ptemu_tlb_step *st = &t->steps[k][j];
            if (t->arr[st->arr].live & (1u << st->size))
                m |= 1u << j;
        }
        t->live_steps[k] = m;
    }
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
        derive_occupancy(a);
        for (uint32_t s = 0; s < 3; s++)
            if (a->sizes & (1u << s))
                a->size_list[a->nsizes++] = (uint8_t)s;
    }
    for (uint32_t l = 0; l < 6; l++) {
        if (t->psc[l].sets & (t->psc[l].sets - 1))
            return 0;
        derive_occupancy(&t->psc[l]);
    }
    memset(t->steps, 0, sizeof t->steps);
    memset(t->nsteps, 0, sizeof t->nsteps);
    for (uint32_t k = 0; k < 2; k++) {
        uint32_t kind = k ? PTEMU_KIND_FETCH : PTEMU_KIND_DATA;
        for (uint32_t tier = 1; tier <= 2; tier++) {
            for (uint32_t i = 0; i < t->narrays; i++) {
                ptemu_tlb_array *a = &t->arr[i];
                if (!a->sets || !a->nsizes || a->tier != tier || !(a->kinds & kind))
                    continue;
                for (uint32_t j = 0; j < a->nsizes; j++) {
                    ptemu_tlb_step *st = &t->steps[k][t->nsteps[k]++];
                    st->arr = (uint8_t)i;
                    st->pos = t->nprobe[k];
                    st->size = a->size_list[j];
                    st->shift = (uint8_t)ptemu_level_shift(st->size + 1u);
                    st->last = j + 1 == a->nsizes;
                }
                t->probe[k][t->nprobe[k]++] = (uint8_t)i;
                for (uint32_t s = 0; s < 3; s++)
                    if ((a->sizes & (1u << s)) && !t->fill_at[k][tier - 1][s])
                        t->fill_at[k][tier - 1][s] = (uint8_t)(i + 1);
            }
        }
    }
    derive_live_steps(t);
    t->ready = 1;
    return 1;
}

/* Install an entry in its set: over a matching one (same key and PCID),
 * else in the least recently used way (an invalid one if any), keeping the
 * occupancy map's invariant (the file's comment).  absent:
 * the caller knows no entry matches, so only the stamps are read. */
static PTEMU_INLINE uint64_t *array_fill(ptemu_tlb *t, ptemu_tlb_array *a, uint64_t key,
                                         uint64_t data, int absent)
{
    const uint32_t ways = a->ways;
    const size_t set = set_of(a, key >> 3);
    uint64_t *row = row_at(a, set);
    uint32_t v;
    int w;
    if (!absent && (w = find_way(row, ways, key, ptemu_td_pcid(data), 0)) >= 0) {
        v = (uint32_t)w;
    } else {
        v = oldest_way(a, row + ways, ways);
        /* A valid victim (or a match, above) means the set held an entry,
         * so its occupancy bit is set already: only a fill into an invalid
         * way -- rare once the array is warm -- may have to set it. */
        if (row[v])
            a->evictions++;
        else
            occ_mark(a, set);
    }
    const uint32_t live_bit = 1u << key_size(key);
    if (!(a->live & live_bit)) {    /* a size new to the array: steps to take again */
        a->live |= live_bit;
        derive_live_steps(t);
    }
    row[v] = key;
    row[ways + v] = ++a->clock;
    row[2 * ways + v] = data;
    a->fills++;
    return &row[v];
}

static inline uint64_t data_of(uint32_t pcid, uint64_t base, uint32_t flags, uint32_t pkey)
{
    return ((uint64_t)pcid << PTEMU_TD_PCID_SHIFT) | base |
           ((uint64_t)(pkey & 15u) << PTEMU_TD_PKEY_SHIFT) | (flags & 0xffu);
}

/* The misses of a lookup that ended before the step-th of its steps (or,
 * with step = nsteps, went through them all), when it took them from the
 * first-th on: one for each array whose steps it passed, counted at its
 * last one (ptemu_tlb_lookup_after_hot counts the hot array's when the hot
 * probe was its only size). */
static PTEMU_INLINE void count_misses(ptemu_tlb *t, uint32_t k, uint32_t first, uint32_t step)
{
    const ptemu_tlb_step *const steps = t->steps[k];
    const uint32_t from = first < t->nsteps[k] ? steps[first].pos : t->nprobe[k];
    const uint32_t to = step < t->nsteps[k] ? steps[step].pos : t->nprobe[k];
    for (uint32_t p = from; p < to; p++)
        t->arr[t->probe[k][p]].misses++;
}

/* ptemu_tlb_lookup() once the lookup is counted, from the first-th of its
 * steps on (the arrays in probe order, each at the page sizes it holds):
 * the steps live_steps says may find something, each one set probe, then
 * a miss for each array passed -- so that a miss pays nothing but that
 * counter for the arrays and sizes a workload never used. */
static PTEMU_INLINE int lookup_from(ptemu_tlb *t, uint64_t va, uint32_t access, uint32_t pcid,
                                    uint32_t first, ptemu_tlb_hit *h)
{
    h->way = NULL;
    const uint32_t k = access == PTEMU_ACC_FETCH;
    const ptemu_tlb_step *const steps = t->steps[k];
    for (uint32_t m = t->live_steps[k] >> first << first; m; m &= m - 1) {
        const uint32_t j = ptemu_ctz64(m);
        const ptemu_tlb_step st = steps[j];
        ptemu_tlb_array *a = &t->arr[st.arr];
        const uint32_t ways = a->ways;
        const uint64_t tag = va >> st.shift;
        uint64_t *row = row_of(a, tag);
        const int w = find_way(row, ways, key_of(tag, st.size), pcid, PTEMU_TE_G);
        if (w < 0)
            continue;
        count_misses(t, k, first, j);
        row[ways + w] = ++a->clock;
        h->way = &row[w];
        h->data = row[2 * ways + w];
        h->ways = ways;
        h->size = st.size;
        a->hits++;
        if (a->tier == 1) {
            t->l1_hits[access]++;
            return 1;
        }
        t->l2_hits[access]++;
        /* Second-level hit: refill the first level, as the STLB does, and
         * answer with that copy.  The first level was just probed for va
         * and missed, so it holds no match for the current PCID; an entry
         * of another PCID (a global one) may still meet one there. */
        const uint32_t l1 = t->fill_at[k][0][st.size];
        if (l1) {
            h->way = array_fill(t, &t->arr[l1 - 1], *h->way, h->data,
                                ptemu_td_pcid(h->data) == pcid);
            h->ways = t->arr[l1 - 1].ways;
        }
        return 1;
    }
    count_misses(t, k, first, t->nsteps[k]);
    t->misses[access]++;
    return 0;
}

PTEMU_INLINE int ptemu_tlb_lookup(ptemu_tlb *t, uint64_t va, uint32_t access, uint32_t pcid,
                                  ptemu_tlb_hit *h)
{
    h->way = NULL;
    if (!t->ready && !ptemu_tlb_init(t))
        return 0;
    t->lookups[access]++;
    return lookup_from(t, va, access, pcid, 0, h);
}

/* This, ptemu_tlb_fill and the PSC lookup and fill are inlined into the
 * walk (unity build, ptemu_all.c): a miss makes each of them once or more,
 * and as calls each paid for saving the caller's registers. */
PTEMU_INLINE int ptemu_tlb_lookup_after_hot(ptemu_tlb *t, uint64_t va, uint32_t access,
                                            uint32_t pcid, ptemu_tlb_hit *h)
{
    /* The hot probe was step 0; when that was its array's only size, the
     * array has missed. */
    const ptemu_tlb_step *st0 = &t->steps[access == PTEMU_ACC_FETCH][0];
    t->lookups[access]++;
    t->arr[st0->arr].misses += st0->last;
    return lookup_from(t, va, access, pcid, 1, h);
}

void ptemu_tlb_hot_of(ptemu_tlb *t, uint32_t access, ptemu_tlb_hot *hot)
{
    const uint32_t k = access == PTEMU_ACC_FETCH;
    memset(hot, 0, sizeof *hot);
    if ((!t->ready && !ptemu_tlb_init(t)) || !t->nprobe[k])
        return;
    ptemu_tlb_array *a = &t->arr[t->probe[k][0]];
    if (a->tier != 1 || !a->nsizes || a->ways > 64)   /* see find_way_hit() */
        return;
    hot->a = a;
    hot->slots = a->slots;
    hot->set_mask = a->sets - 1;
    hot->size = a->size_list[0];
    hot->live_bit = 1u << hot->size;
    hot->key_low = key_of(0, hot->size);
    hot->shift = ptemu_level_shift(hot->size + 1);
    hot->offset_mask = (1ULL << hot->shift) - 1;
    hot->ways = a->ways;
    hot->stride = 3u * a->ways;
}

/* ptemu_tlb_hot_hit() for `ways` ways: a constant for the usual 4-way
 * first-level data array, so that the stamp and data words of the way
 * found are addressed from the set with no arithmetic on the count. */
static PTEMU_INLINE uint64_t *hot_hit_n(ptemu_tlb *t, const ptemu_tlb_hot *hot,
                                        ptemu_tlb_array *a, uint64_t va, uint32_t access,
                                        uint32_t pcid, uint64_t *data, const uint32_t ways)
{
    const uint64_t tag = va >> hot->shift;
    const uint64_t key = (tag << 3) | hot->key_low;
    uint64_t *row = hot->slots + (size_t)(tag & hot->set_mask) * (3u * ways);
    int w = find_way_hit(row, ways, key, pcid, PTEMU_TE_G);
    if (w < 0)
        return NULL;
    /* What ptemu_tlb_lookup() would do: its first probe finds this. */
    row[ways + w] = ++a->clock;
    t->lookups[access]++;
    a->hits++;
    t->l1_hits[access]++;
    *data = row[2 * ways + w];
    return &row[w];
}

PTEMU_INLINE uint64_t *ptemu_tlb_hot_hit(ptemu_tlb *t, const ptemu_tlb_hot *hot, uint64_t va,
                                         uint32_t access, uint32_t pcid, uint64_t *data)
{
    ptemu_tlb_array *const a = hot->a;
    if (!a || !(a->live & hot->live_bit))
        return NULL;
    if (hot->ways == 4)
        return hot_hit_n(t, hot, a, va, access, pcid, data, 4);
    return hot_hit_n(t, hot, a, va, access, pcid, data, hot->ways);
}

PTEMU_INLINE void ptemu_tlb_fill(ptemu_tlb *t, uint64_t va, uint32_t access, uint32_t pcid,
                                 uint32_t size, uint64_t base, uint32_t flags, uint32_t pkey,
                                 int absent)
{
    if (!t->ready && !ptemu_tlb_init(t))
        return;
    uint64_t key = key_of(va >> ptemu_level_shift(size + 1), size);
    uint64_t data = data_of(pcid, base, flags, pkey);
    /* The two tiers one after the other, not a loop: the second is a
     * fill of its own, whose branches predict apart from the first's. */
    const uint8_t (*at)[3] = t->fill_at[access == PTEMU_ACC_FETCH];
    const uint32_t l1 = at[0][size], l2 = at[1][size];
    if (l1)
        array_fill(t, &t->arr[l1 - 1], key, data, absent);
    if (l2)
        array_fill(t, &t->arr[l2 - 1], key, data, absent);
}

PTEMU_INLINE int ptemu_psc_lookup(ptemu_tlb *t, uint64_t va, uint32_t pcid, uint32_t levels,
                                  uint32_t *level, uint64_t *table, uint32_t *rights)
{
    /* Deepest first: a PDE-cache hit leaves only the PTE to read. */
    for (uint32_t l = 2; l <= levels && l <= 5; l++) {
        ptemu_tlb_array *a = &t->psc[l];
        if (!a->sets)
            continue;
        const uint32_t ways = a->ways;
        uint64_t tag = va >> ptemu_level_shift(l);
        uint64_t key = key_of(tag, l);
        uint64_t *row = row_of(a, tag);
        int w = find_way(row, ways, key, pcid, 0);     /* PSC entries are never global */
        if (w >= 0) {
            const uint64_t data = row[2 * ways + w];
            row[ways + w] = ++a->clock;
            a->hits++;
            *level = l - 1;
            *table = ptemu_td_base(data);
            *rights = ptemu_td_flags(data);
            return 1;
        }
        a->misses++;
    }
    return 0;
}

PTEMU_INLINE void ptemu_psc_fill(ptemu_tlb *t, uint32_t level, uint64_t va, uint32_t pcid,
                                 uint64_t table, uint32_t rights, int absent)
{
    if (level < 2 || level > 5 || !t->psc[level].sets)
        return;
    array_fill(t, &t->psc[level], key_of(va >> ptemu_level_shift(level), level),
               data_of(pcid, table, rights, 0), absent);
}

/* Does a flush of `kind` remove this TLB entry?  (SDM 4.10.4.1) */
static inline int tlb_entry_goes(uint64_t key, uint64_t data, uint32_t kind, uint32_t pcid,
                                 uint64_t va)
{
    int global = (data & PTEMU_TE_G) != 0;
    uint32_t epcid = ptemu_td_pcid(data);
    switch (kind) {
    case PTEMU_FLUSH_ALL:
        return 1;
    case PTEMU_FLUSH_NONGLOBAL:
        return !global;
    case PTEMU_FLUSH_PCID:
        return epcid == pcid && !global;
    case PTEMU_FLUSH_PCID_ALL:
        return epcid == pcid;
    case PTEMU_FLUSH_INVLPG:
        /* The page containing va at the entry's own size: a large page
         * covering the address goes too; global entries in every PCID. */
        return (key >> 3) == (va >> ptemu_level_shift(key_size(key) + 1u)) &&
               (epcid == pcid || global);
    case PTEMU_FLUSH_ADDR:
        return (key >> 3) == (va >> ptemu_level_shift(key_size(key) + 1u)) &&
               epcid == pcid && !global;
    }
    return 1;   /* unknown kind: dropping more is always allowed */
}

static inline int psc_entry_goes(uint64_t data, uint32_t kind, uint32_t pcid)
{
    if (kind == PTEMU_FLUSH_ALL || kind == PTEMU_FLUSH_NONGLOBAL)
        return 1;
    /* Per-PCID kinds drop every PSC entry of the PCID (4.10.4.1), and so
     * does INVLPG.  For INVPCID type 0 and a #PF the SDM requires only the
     * entries the address would use; dropping all of the PCID's is more,
     * which invalidation may always do. */
    return ptemu_td_pcid(data) == pcid;
}

/* Drop the entries a flush of `kind` removes from the sets the occupancy
 * map says may hold one (the others hold none); a set left empty loses its
 * bit when no other set shares it. */
static PTEMU_INLINE void sweep_marked(ptemu_tlb_array *a, int is_psc, uint32_t kind,
                                       uint32_t pcid, uint64_t va, const int all)
{
    const uint32_t ways = a->ways;
    const size_t sets = a->sets;
    const uint32_t words = sets >= PTEMU_TLB_OCC_BITS ? PTEMU_TLB_OCC_WORDS
                                                      : (uint32_t)(sets + 63u) / 64u;
    uint32_t live = 0;
    for (uint32_t i = 0; i < words; i++) {
        uint64_t bits = a->occ[i], keep = 0;
        while (bits) {
            const uint32_t b = ptemu_ctz64(bits);
            bits &= bits - 1;
            for (size_t set = (size_t)i * 64u + b; set < sets; set += PTEMU_TLB_OCC_BITS) {
                uint64_t *row = row_at(a, set);
                for (uint32_t w = 0; w < ways; w++) {
                    uint64_t key = row[w], data = row[2 * ways + w];
                    if (all) {
                        row[ways + w] = key ? 0 : row[ways + w];
                        row[w] = 0;
                    } else if (!key) {
                        continue;
                    } else if (is_psc ? psc_entry_goes(data, kind, pcid)
                                      : tlb_entry_goes(key, data, kind, pcid, va)) {
                        ptemu_tlb_drop(&row[w], ways);
                    } else {
                        live |= 1u << key_size(key);
                        keep |= 1ull << b;
                    }
                }
            }
        }
        a->occ[i] = keep;
    }
    a->live = live;
}

/* A flush's sweep of one array.  When every valid entry goes (ALL;
 * NONGLOBAL in a PSC) the marked sets are cleared without a test per way
 * (sweep_marked specialised for it): the same words as a drop of each valid
 * way, key and stamp to 0, an invalid way's stamp left as it is. */
static void sweep(ptemu_tlb_array *a, int is_psc, uint32_t kind, uint32_t pcid, uint64_t va)
{
    if (kind == PTEMU_FLUSH_ALL || (is_psc && kind == PTEMU_FLUSH_NONGLOBAL))
        sweep_marked(a, is_psc, kind, pcid, va, 1);
    else
        sweep_marked(a, is_psc, kind, pcid, va, 0);
}

void ptemu_tlb_flush(ptemu_tlb *t, uint32_t kind, uint32_t pcid, uint64_t va, uint32_t cause)
{
    if (!t->ready)
        ptemu_tlb_init(t);      /* slots written from outside: live and occ again */
    if (cause < PTEMU_NFLUSH_CAUSES)
        t->flushes[cause]++;
    if (cause == PTEMU_FLUSHED_BY_PF)
        t->fault_invalidations++;
    uint32_t n = t->narrays < PTEMU_TLB_MAX_ARRAYS ? t->narrays : PTEMU_TLB_MAX_ARRAYS;
    for (uint32_t i = 0; i < n; i++) {
        ptemu_tlb_array *a = &t->arr[i];
        if (!a->sets || !a->live)       /* absent, or surely empty */
            continue;
        if (kind == PTEMU_FLUSH_INVLPG || kind == PTEMU_FLUSH_ADDR) {
            /* Only the sets va indexes can hold its page, at the sizes
             * that may have an entry, when the set may hold one. */
            const uint32_t ways = a->ways;
            for (uint32_t s = 0; s < 3; s++) {
                if (!(a->live & (1u << s)))
                    continue;
                const size_t set = set_of(a, va >> ptemu_level_shift(s + 1));
                if (!occ_has(a, set))
                    continue;
                uint64_t *row = row_at(a, set);
                for (uint32_t w = 0; w < ways; w++)
                    if (row[w] && tlb_entry_goes(row[w], row[2 * ways + w], kind, pcid, va))
                        ptemu_tlb_drop(&row[w], ways);
            }
        } else {
            sweep(a, 0, kind, pcid, va);
        }
    }
    if (kind != PTEMU_FLUSH_INVLPG && kind != PTEMU_FLUSH_ADDR)
        derive_live_steps(t);   /* the sweeps may have cleared live bits */
    for (uint32_t l = 2; l <= 5; l++)
        if (t->psc[l].sets && t->psc[l].live)
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
        for (size_t set = 0; set < a->sets; set++) {
            const uint64_t *row = row_at(a, set);
            for (uint32_t w = 0; w < a->ways; w++)
                count += row[w] != 0;
        }
    }
    return count;
}
