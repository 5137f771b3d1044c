/*
 * batch.c -- loops over arrays Python allocated: translate many addresses,
 * run an access stream until the first fault, and the minimal walk the
 * benchmarks measure the full walker against.  Nothing here allocates; the
 * walk context is derived once per call.
 */
#include <time.h>

#include "ptemu.h"

/*
 * The common case of translate_many without TLB on plain memory, with no
 * side effect: the walk succeeds and every A bit (and D for a write) is
 * already set, so nothing is written.  quick_walk() returns 1 with *pa for
 * such an address; 0 sends it to the full walk -- any fault, any A/D to set
 * -- which gives the exact answer, so this path can only be faster, never
 * different.  Addresses are taken in index order, each seeing the A/D bits
 * the full walks before it set: the results are those of walking them one
 * by one.
 *
 * One test per level does the work of three: P=1, A=1 (when A/D are
 * updated) and no reserved bit, as (e & mask) == want (SDM 4.5.4, 4.8).  A
 * loop of short independent walks lets the core overlap the loads of
 * several addresses by itself, as a hardware walker with several walks
 * outstanding does.
 */
typedef struct quick {
    const uint8_t *base;
    uint64_t lim;               /* last valid entry address: memory size - 8 */
    uint64_t top, addr_mask, nx_mask;
    uint64_t table_mask[6];     /* by level: reserved bits of a table entry, P, A, PS */
    uint64_t table_want;        /* P, and A when A/D are updated */
    uint64_t leaf_mask[4][3];   /* by level and access kind: reserved bits of the
                                   leaf form, P, A, and D for a write */
    uint64_t leaf_want[3];
    uint32_t mode;              /* flags & (USER|IMPLICIT): the rights table's row */
    uint32_t keys;              /* CR4.PKE or CR4.PKS: the key check runs */
} quick;

static void quick_of(const ptemu_ctx *c, uint32_t flags, quick *q)
{
    const uint64_t a = (flags & PTEMU_IN_NO_AD) ? 0 : PTEMU_PTE_A;
    q->base = c->mem->base;
    q->lim = c->mem->size - 8;      /* size >= 8: see the caller */
    q->top = c->top_table;
    q->addr_mask = c->addr_mask;
    q->nx_mask = c->nx_mask;
    q->table_want = PTEMU_PTE_P | a;
    for (uint32_t l = 1; l <= 5; l++)
        q->table_mask[l] = c->rsvd[l][0] | PTEMU_PTE_P | a | PTEMU_PTE_PS;
    for (uint32_t acc = 0; acc < 3; acc++) {
        const uint64_t d = (acc == PTEMU_ACC_WRITE && a) ? PTEMU_PTE_D : 0;
        q->leaf_want[acc] = PTEMU_PTE_P | a | d;
        /* level 1: bit 7 is PAT; 2 and 3: the large-page form */
        q->leaf_mask[1][acc] = c->rsvd[1][0] | PTEMU_PTE_P | a | d;
        q->leaf_mask[2][acc] = c->rsvd[2][1] | PTEMU_PTE_P | a | d;
        q->leaf_mask[3][acc] = c->rsvd[3][1] | PTEMU_PTE_P | a | d;
    }
    q->mode = flags & (PTEMU_IN_USER | PTEMU_IN_IMPLICIT);
    q->keys = c->pke | c->pks;
}

/* levels is a constant at each call, so the level loop unrolls. */
static PTEMU_INLINE int quick_walk(const ptemu_ctx *c, const quick *q, const uint32_t levels,
                                   uint64_t va, uint32_t acc, uint64_t *pa)
{
    const uint32_t cb = levels == 5 ? 57 : 48;
    if ((uint64_t)((int64_t)(va << (64 - cb)) >> (64 - cb)) != va)
        return 0;
    uint64_t table = q->top, all = ~0ULL, any = 0, e = 0;
    uint32_t level = levels;
    for (;; level--) {
        const uint64_t epa = table + ((va >> ptemu_level_shift(level)) & 511) * 8;
        if (epa > q->lim)
            return 0;
        memcpy(&e, q->base + epa, 8);
        all &= e;
        any |= e;
        if (level == 1) {
            if ((e & q->leaf_mask[1][acc]) != q->leaf_want[acc])
                return 0;
            break;
        }
        if ((e & q->table_mask[level]) != q->table_want) {
            /* Not a plain table entry: a large leaf (PS in a PDPTE or PDE),
             * or anything the full walk must look at. */
            if (level > 3 || !(e & PTEMU_PTE_PS) ||
                (e & q->leaf_mask[level][acc]) != q->leaf_want[acc])
                return 0;
            break;
        }
        table = e & q->addr_mask;
    }
    /* 4.6: R/W and U/S ANDed (at the PTEMU_TE_W/U bit positions), XD ORed
     * (bit 63 onto PTEMU_TE_NX): the coincidences ptemu.h asserts. */
    const uint32_t rights = (uint32_t)(all & (PTEMU_TE_W | PTEMU_TE_U)) |
                            (uint32_t)((any & q->nx_mask) >> 63);
    if (c->rtab[acc][q->mode][rights] ||
        (q->keys && keys_check(c, acc, q->mode, rights,
                               (uint32_t)(e >> PTEMU_PTE_PKEY_SHIFT) & 15, 0)))
        return 0;
    const uint64_t off = (1ULL << ptemu_level_shift(level)) - 1;
    *pa = (e & q->addr_mask & ~off) | (va & off);
    return 1;
}

/* One address of a batch through the full translation; 1 when it faulted
 * (or exited).  zeroed: vector, exit_reason and error_code are known to hold
 * 0, written only on a fault.  exit_reason may be NULL where the memory has
 * no EPT (no exit can happen; the caller zeroes the array). */
static PTEMU_INLINE int translate_one(const ptemu_ctx *c, uint64_t va, uint32_t acc,
                                      uint32_t flags, uint64_t *pa, uint8_t *vector,
                                      uint16_t *exit_reason, uint32_t *error_code,
                                      const int zeroed)
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
        if (!zeroed) {
            *vector = 0;
            if (exit_reason)
                *exit_reason = 0;
            *error_code = 0;
        }
        return 0;
    }
    *pa = 0;
    *vector = (uint8_t)f.vector;
    if (exit_reason)
        *exit_reason = (uint16_t)f.exit_reason;
    *error_code = f.error_code;
    return 1;
}

/* The full walk of one address, out of line: keeps the quick loop's
 * registers. */
static PTEMU_NOINLINE int translate_one_slow(const ptemu_ctx *c, uint64_t va, uint32_t acc,
                                             uint32_t flags, uint64_t *pa, uint8_t *vector,
                                             uint16_t *exit_reason, uint32_t *error_code,
                                             int zeroed)
{
    return zeroed ? translate_one(c, va, acc, flags, pa, vector, exit_reason, error_code, 1)
                  : translate_one(c, va, acc, flags, pa, vector, exit_reason, error_code, 0);
}

/*
 * quick_walk() for QUICK_LANES addresses at once, level by level: the loads
 * of one level are independent and in flight together -- what keeps walks
 * whose tables sit in DRAM from waiting on one load at a time (a hardware
 * walker keeps several walks outstanding for the same reason).  It costs
 * more instructions than quick_walk() one address at a time, which is the
 * better choice where the tables sit in cache; quick_loop() measures both.
 * ok[l] = 1 with pa[l] exactly where quick_walk() gives them.
 */
#define QUICK_LANES 8

static PTEMU_INLINE void quick_group(const ptemu_ctx *c, const quick *q, const uint32_t levels,
                                     const uint64_t *va, const uint32_t *acc, uint64_t *pa,
                                     int *ok)
{
    const uint32_t cb = levels == 5 ? 57 : 48;
    uint64_t table[QUICK_LANES], all[QUICK_LANES], any[QUICK_LANES], leaf[QUICK_LANES];
    uint32_t leaf_level[QUICK_LANES];
    int walking[QUICK_LANES];
    for (uint32_t l = 0; l < QUICK_LANES; l++) {
        walking[l] = acc[l] <= PTEMU_ACC_FETCH &&
                     (uint64_t)((int64_t)(va[l] << (64 - cb)) >> (64 - cb)) == va[l];
        table[l] = q->top;
        all[l] = ~0ULL;
        any[l] = 0;
        leaf[l] = 0;
        leaf_level[l] = 0;
    }
    for (uint32_t level = levels; level >= 1; level--) {
        const uint32_t shift = ptemu_level_shift(level);
        for (uint32_t l = 0; l < QUICK_LANES; l++) {
            if (!walking[l])
                continue;
            const uint64_t epa = table[l] + ((va[l] >> shift) & 511) * 8;
            uint64_t e;
            if (epa > q->lim) {
                walking[l] = 0;
                continue;
            }
            memcpy(&e, q->base + epa, 8);
            all[l] &= e;
            any[l] |= e;
            if (level == 1) {
                walking[l] = 0;
                if ((e & q->leaf_mask[1][acc[l]]) == q->leaf_want[acc[l]]) {
                    leaf[l] = e;
                    leaf_level[l] = 1;
                }
                continue;
            }
            if ((e & q->table_mask[level]) != q->table_want) {
                /* as in quick_walk(): a large leaf, or the full walk's case */
                walking[l] = 0;
                if (level <= 3 && (e & PTEMU_PTE_PS) &&
                    (e & q->leaf_mask[level][acc[l]]) == q->leaf_want[acc[l]]) {
                    leaf[l] = e;
                    leaf_level[l] = level;
                }
                continue;
            }
            table[l] = e & q->addr_mask;
        }
    }
    for (uint32_t l = 0; l < QUICK_LANES; l++) {
        ok[l] = 0;
        if (!leaf_level[l])
            continue;
        const uint64_t e = leaf[l];
        const uint32_t rights = (uint32_t)(all[l] & (PTEMU_TE_W | PTEMU_TE_U)) |
                                (uint32_t)((any[l] & q->nx_mask) >> 63);
        if (c->rtab[acc[l]][q->mode][rights] ||
            (q->keys && keys_check(c, acc[l], q->mode, rights,
                                   (uint32_t)(e >> PTEMU_PTE_PKEY_SHIFT) & 15, 0)))
            continue;
        const uint64_t off = (1ULL << ptemu_level_shift(leaf_level[l])) - 1;
        pa[l] = (e & q->addr_mask & ~off) | (va[l] & off);
        ok[l] = 1;
    }
}

/* One address of quick_loop(): its quick result, or the full walk. */
static PTEMU_INLINE uint64_t quick_store(const ptemu_ctx *c, uint64_t k, uint64_t va,
                                         uint32_t acc, uint32_t flags, int ok, uint64_t p,
                                         uint64_t *pa, uint8_t *vector, uint32_t *error_code,
                                         const int zeroed)
{
    if (ok) {
        pa[k] = p;
        if (!zeroed) {
            vector[k] = 0;
            error_code[k] = 0;
        }
        return 0;
    }
    /* No EPT on the quick path (translate_many_ctx): no exit reason. */
    return (uint64_t)translate_one_slow(c, va, acc, flags, &pa[k], &vector[k], NULL,
                                        &error_code[k], zeroed);
}

/*
 * quick_walk() for one access kind, as the one-at-a-time loop runs it: what
 * it reads of quick, for that kind, in a structure passed by value, so that
 * the compiler keeps it in registers (no store through pa or vector can
 * change it), and the rights table's row as a bitmask.
 */
typedef struct quick1 {
    const uint8_t *base;
    uint64_t lim, top, addr_mask, nx_mask;
    uint64_t table_mask[6], table_want;
    uint64_t leaf_mask[4], leaf_want;
    /* bit r: rights r (PTEMU_TE_NX|W|U) refused, c->rtab[acc][mode][r]; bits
     * 15:8 all 1 when the key check runs, so that (refused >> r) & 0x101
     * tests both at once */
    uint32_t refused;
} quick1;

static PTEMU_INLINE quick1 quick1_of(const ptemu_ctx *c, const quick *q, uint32_t acc)
{
    quick1 k;
    k.base = q->base;
    k.lim = q->lim;
    k.top = q->top;
    k.addr_mask = q->addr_mask;
    k.nx_mask = q->nx_mask;
    for (uint32_t l = 0; l < 6; l++)
        k.table_mask[l] = q->table_mask[l];
    k.table_want = q->table_want;
    k.leaf_mask[0] = 0;
    for (uint32_t l = 1; l < 4; l++)
        k.leaf_mask[l] = q->leaf_mask[l][acc];
    k.leaf_want = q->leaf_want[acc];
    k.refused = q->keys ? 0xff00u : 0;
    for (uint32_t r = 0; r < 8; r++)
        if (c->rtab[acc][q->mode][r])
            k.refused |= 1u << r;
    return k;
}

/* 1 when every rights r (PTEMU_TE_NX|W|U) gets the same answer with NX set
 * and clear, and no key check runs: then the walk need not OR the XD bits
 * (4.6: only fetches look at them). */
static inline int quick1_nx_free(const quick1 *k)
{
    return k->refused < 0x100u && ((k->refused ^ (k->refused >> 1)) & 0x55u) == 0;
}

/* The tail of quick_walk1() at the level the leaf sat: the rights (and key)
 * check, then the address.  level is a constant at each call. */
static PTEMU_INLINE int quick1_leaf(const ptemu_ctx *c, const quick1 k, uint32_t acc,
                                    uint32_t mode, const int nx, const uint32_t level,
                                    uint64_t va, uint64_t e, uint64_t all, uint64_t any,
                                    uint64_t *pa)
{
    /* 4.6: R/W and U/S ANDed (at the PTEMU_TE_W/U bit positions), XD ORed
     * (bit 63 onto PTEMU_TE_NX): the coincidences ptemu.h asserts.  With
     * nx = 0 bit 0 is left 0, which quick1_nx_free() found to change no
     * answer. */
    uint32_t rights = (uint32_t)(all & (PTEMU_TE_W | PTEMU_TE_U));
    if (nx)
        rights |= (uint32_t)((any & k.nx_mask) >> 63);
    if ((k.refused >> rights) & 0x101u) {
        if ((k.refused >> rights) & 1u ||
            keys_check(c, acc, mode, rights, (uint32_t)(e >> PTEMU_PTE_PKEY_SHIFT) & 15, 0))
            return 0;
    }
    if (level == 1) {
        /* addr_mask holds bits M-1:12 only: nothing below bit 12 to clear */
        *pa = (e & k.addr_mask) | (va & 0xfffu);
    } else {
        const uint64_t off = (1ULL << ptemu_level_shift(level)) - 1;
        *pa = (e & k.addr_mask & ~off) | (va & off);
    }
    return 1;
}

/* quick_walk() with quick1: the same answers (1 with *pa, or 0). */
static PTEMU_INLINE int quick_walk1(const ptemu_ctx *c, const quick1 k, uint32_t acc,
                                    uint32_t mode, const uint32_t levels, const int nx,
                                    uint64_t va, uint64_t *pa)
{
    /* canonical (4.5.1): va + 2^(cb-1) below 2^cb, as an unsigned sum */
    const uint32_t cb = levels == 5 ? 57 : 48;
    if ((va + (1ULL << (cb - 1))) >> cb)
        return 0;
    uint64_t table = k.top, all = ~0ULL, any = 0;
    for (uint32_t level = levels;; level--) {
        const uint64_t epa = table + ((va >> ptemu_level_shift(level)) & 511) * 8;
        uint64_t e;
        if (epa > k.lim)
            return 0;
        memcpy(&e, k.base + epa, 8);
        all &= e;
        if (nx)
            any |= e;
        if (level == 1) {
            if ((e & k.leaf_mask[1]) != k.leaf_want)
                return 0;
            return quick1_leaf(c, k, acc, mode, nx, 1, va, e, all, any, pa);
        }
        if ((e & k.table_mask[level]) != k.table_want) {
            /* Not a plain table entry: a large leaf (PS in a PDPTE or PDE),
             * or anything the full walk must look at. */
            if (level > 3 || !(e & PTEMU_PTE_PS) || (e & k.leaf_mask[level]) != k.leaf_want)
                return 0;
            return level == 3 ? quick1_leaf(c, k, acc, mode, nx, 3, va, e, all, any, pa)
                              : quick1_leaf(c, k, acc, mode, nx, 2, va, e, all, any, pa);
        }
        table = e & k.addr_mask;
    }
}

/* Addresses [i, end) one at a time, all of one access kind acc (access
 * NULL), or each of its own (acc ignored).  nx: see quick1_nx_free(). */
static PTEMU_INLINE uint64_t quick_range1(const ptemu_ctx *c, const quick *q,
                                          const uint32_t levels, const int nx,
                                          const uint64_t *va, const uint8_t *access,
                                          uint32_t acc, uint32_t flags, uint64_t i, uint64_t end,
                                          uint64_t *pa, uint8_t *vector, uint32_t *error_code,
                                          const int zeroed)
{
    uint64_t faults = 0;
    const uint32_t mode = q->mode;
    if (!access) {
        const quick1 k = quick1_of(c, q, acc);
        for (; i < end; i++) {
            const uint64_t v = va[i];
            uint64_t p = 0;
            const int ok = quick_walk1(c, k, acc, mode, levels, nx, v, &p);
            faults += quick_store(c, i, v, acc, flags, ok, p, pa, vector, error_code, zeroed);
        }
        return faults;
    }
    const quick1 k0 = quick1_of(c, q, 0), k1 = quick1_of(c, q, 1), k2 = quick1_of(c, q, 2);
    for (; i < end; i++) {
        const uint64_t v = va[i];
        const uint32_t a = access[i];
        uint64_t p = 0;
        int ok = 0;
        if (a == PTEMU_ACC_READ)
            ok = quick_walk1(c, k0, a, mode, levels, 1, v, &p);
        else if (a == PTEMU_ACC_WRITE)
            ok = quick_walk1(c, k1, a, mode, levels, 1, v, &p);
        else if (a == PTEMU_ACC_FETCH)
            ok = quick_walk1(c, k2, a, mode, levels, 1, v, &p);
        faults += quick_store(c, i, v, a, flags, ok, p, pa, vector, error_code, zeroed);
    }
    return faults;
}

/* Addresses [i, end) one at a time (grouped = 0) or QUICK_LANES at a time.
 * The addresses a group declines take the full walk after it, in index
 * order.  Quick results do not depend on what those full walks write (A/D
 * bits only, which a quick walk needs set and which stay set), so the
 * results are those of one address after another either way. */
static PTEMU_INLINE uint64_t quick_range(const ptemu_ctx *c, const quick *q, const uint32_t levels,
                                         const int grouped, const uint64_t *va,
                                         const uint8_t *access, uint32_t access_all,
                                         uint32_t flags, uint64_t i, uint64_t end, uint64_t *pa,
                                         uint8_t *vector, uint32_t *error_code, const int zeroed)
{
    uint64_t faults = 0;
    for (; grouped && i + QUICK_LANES <= end; i += QUICK_LANES) {
        uint32_t acc[QUICK_LANES];
        uint64_t p[QUICK_LANES];
        int ok[QUICK_LANES];
        for (uint32_t l = 0; l < QUICK_LANES; l++)
            acc[l] = access ? access[i + l] : access_all;
        quick_group(c, q, levels, va + i, acc, p, ok);
        for (uint32_t l = 0; l < QUICK_LANES; l++)
            faults += quick_store(c, i + l, va[i + l], acc[l], flags, ok[l], p[l], pa, vector,
                                  error_code, zeroed);
    }
    if (i >= end)
        return faults;
    if (!access && access_all > PTEMU_ACC_FETCH) {
        for (; i < end; i++)
            faults += quick_store(c, i, va[i], access_all, flags, 0, 0, pa, vector, error_code,
                                  zeroed);
        return faults;
    }
    if (!access) {
        quick1 k = quick1_of(c, q, access_all);
        if (quick1_nx_free(&k))
            return faults + quick_range1(c, q, levels, 0, va, NULL, access_all, flags, i, end,
                                         pa, vector, error_code, zeroed);
    }
    return faults + quick_range1(c, q, levels, 1, va, access, access_all, flags, i, end, pa,
                                 vector, error_code, zeroed);
}

/*
 * Which is faster -- one address at a time (fewest instructions: tables in
 * cache) or grouped (most loads in flight: tables in DRAM) -- depends on the
 * CPU, its caches and the image, so a long batch times both on two chunks
 * each and takes the faster for the next QUICK_REPROBE chunks.  Only the speed
 * depends on the choice, never a result.  Short batches go grouped (which
 * runs both walks: the groups, then the remainder one by one).
 */
#define QUICK_CHUNK 4096
#define QUICK_REPROBE 64

static inline uint64_t quick_clock_ns(void)
{
#if defined(CLOCK_MONOTONIC)
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) == 0)
        return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
#endif
    return 0;
}

static PTEMU_INLINE uint64_t quick_loop(const ptemu_ctx *c, const quick *q, const uint32_t levels,
                                        const uint64_t *va, const uint8_t *access,
                                        uint32_t access_all, uint32_t flags, uint64_t n,
                                        uint64_t *pa, uint8_t *vector, uint32_t *error_code,
                                        const int zeroed)
{
#define QUICK_RANGE(g, from, to) \
    quick_range(c, q, levels, g, va, access, access_all, flags, from, to, pa, vector, \
                error_code, zeroed)
    uint64_t faults = 0, i = 0;
    int grouped = 1, first = 0;
    uint32_t until_probe = 0;
    while (i < n) {
        if (!until_probe && n - i >= 4 * QUICK_CHUNK) {
            /* Each strategy times two chunks, in the order x y y x, and
             * its faster one counts: the first chunk may pay for caches
             * the others find warm, and another job may take the core
             * during any one of them.  x alternates from probe to probe. */
            uint64_t t[5], best[2];
            t[0] = quick_clock_ns();
            for (uint32_t k = 0; k < 4; k++) {
                const int g = (k == 0 || k == 3) ? first : !first;
                const uint64_t from = i + k * QUICK_CHUNK;
                faults += g ? QUICK_RANGE(1, from, from + QUICK_CHUNK)
                            : QUICK_RANGE(0, from, from + QUICK_CHUNK);
                t[k + 1] = quick_clock_ns();
            }
            /* best[1]: grouped, best[0]: one at a time */
            const uint64_t x0 = t[1] - t[0], y0 = t[2] - t[1], y1 = t[3] - t[2],
                           x1 = t[4] - t[3];
            best[first] = x0 < x1 ? x0 : x1;
            best[!first] = y0 < y1 ? y0 : y1;
            grouped = best[1] < best[0];
            first = !first;
            i += 4 * QUICK_CHUNK;
            until_probe = QUICK_REPROBE;
            continue;
        }
        const uint64_t end = n - i < QUICK_CHUNK ? n : i + QUICK_CHUNK;
        faults += grouped ? QUICK_RANGE(1, i, end) : QUICK_RANGE(0, i, end);
        i = end;
        if (until_probe)
            until_probe--;
    }
    return faults;
#undef QUICK_RANGE
}

static uint64_t translate_many_ctx(const ptemu_ctx *c, const ptemu_cpu *cpu, const uint64_t *va,
                                   const uint8_t *access, uint32_t access_all, uint32_t flags,
                                   uint64_t n, uint64_t *pa, uint8_t *vector,
                                   uint16_t *exit_reason, uint32_t *error_code, int zeroed)
{
    uint64_t faults = 0;
    const ptemu_mem *mem = c->mem;
    flags = ptemu_resolve_flags(cpu, flags);
    if (c->tlb || mem->frames || mem->ept || !c->levels || c->eager_a || mem->size < 8) {
        for (uint64_t i = 0; i < n; i++)
            faults += translate_one_slow(c, va[i], access ? access[i] : access_all, flags,
                                         &pa[i], &vector[i], &exit_reason[i], &error_code[i],
                                         zeroed);
        return faults;
    }
    /* Memory with no EPT from here on: the quick loops never write an exit
     * reason, and none can be nonzero. */
    if (!zeroed && n)
        memset(exit_reason, 0, n * sizeof *exit_reason);
    quick q;
    quick_of(c, flags, &q);
    if (c->levels == 5)
        return zeroed ? quick_loop(c, &q, 5, va, access, access_all, flags, n, pa, vector,
                                   error_code, 1)
                      : quick_loop(c, &q, 5, va, access, access_all, flags, n, pa, vector,
                                   error_code, 0);
    return zeroed ? quick_loop(c, &q, 4, va, access, access_all, flags, n, pa, vector,
                               error_code, 1)
                  : quick_loop(c, &q, 4, va, access, access_all, flags, n, pa, vector,
                               error_code, 0);
}

uint64_t ptemu_translate_many(const ptemu_cpu *cpu, ptemu_mem *mem, ptemu_tlb *tlb,
                              const uint64_t *va, const uint8_t *access,
                              uint32_t access_all, uint32_t flags, uint64_t n,
                              uint64_t *pa, uint8_t *vector, uint16_t *exit_reason,
                              uint32_t *error_code)
{
    ptemu_ctx c;
    ptemu_ctx_init(&c, cpu, mem, tlb);
    ptemu_ctx_tables(&c);
    return translate_many_ctx(&c, cpu, va, access, access_all, flags, n, pa, vector,
                              exit_reason, error_code, 0);
}

uint64_t ptemu_mmu_translate_many(ptemu_mmu *m, const uint64_t *va, const uint8_t *access,
                                  uint32_t access_all, uint32_t flags, uint64_t n,
                                  uint64_t *pa, uint8_t *vector, uint16_t *exit_reason,
                                  uint32_t *error_code)
{
    ptemu_ctx scratch;
    const ptemu_ctx *c = ptemu_mmu_ctx(m, &scratch, 1);
    return translate_many_ctx(c, m->cpu, va, access, access_all, flags, n, pa, vector,
                              exit_reason, error_code, 1);
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
 * is none) and drops it.  lim: memory size - 8 (the caller checked size >=
 * 8), so that one compare bounds each load; levels is a constant at each
 * call, so that the level loop unrolls. */
static PTEMU_INLINE void prefetch_leaf(uint64_t top, uint64_t addr_mask, const uint32_t levels,
                                       const uint8_t *base, uint64_t lim, uint64_t va)
{
    uint64_t table = top;
    for (uint32_t level = levels; level > 1; level--) {
        uint64_t epa = table + ((va >> ptemu_level_shift(level)) & 511) * 8, e;
        if (epa > lim)
            return;
        memcpy(&e, base + epa, 8);
        if ((e & (PTEMU_PTE_P | PTEMU_PTE_PS)) != PTEMU_PTE_P)
            return;     /* not present, or a large page: no leaf table to go to */
        table = e & addr_mask;
    }
    uint64_t epa = table + ((va >> 12) & 511) * 8;
    if (epa <= lim)
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

static uint64_t run_ctx(const ptemu_ctx *cp, const ptemu_trace_rec *trace, uint64_t n,
                        uint64_t start, uint64_t *pa, ptemu_fault *fault)
{
    const ptemu_ctx c = *cp;
    ptemu_mem *const mem = c.mem;
    ptemu_tlb *const tlb = c.tlb;
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
    /* Only plain memory of at least one entry is prefetched from (a frame
     * table or a segment map would need their lookup first). */
    const int can_prefetch = own_hits && !mem->frames && !mem->nseg && mem->size >= 8;
    const uint8_t *const pbase = mem->base;
    const uint64_t plim = mem->size - 8;
    uint32_t window_misses = 0, prefetching = 0;
    for (uint64_t i = start; i < n; i++) {
        if ((i & (RUN_WINDOW - 1)) == 0) {
            prefetching = can_prefetch && window_misses >= RUN_WINDOW_MISSES;
            window_misses = 0;
        }
        if (prefetching && n - i > RUN_AHEAD) {
            if (hc.levels == 4)
                prefetch_leaf(hc.top_table, hc.addr_mask, 4, pbase, plim, trace[i + RUN_AHEAD].va);
            else
                prefetch_leaf(hc.top_table, hc.addr_mask, 5, pbase, plim, trace[i + RUN_AHEAD].va);
        }
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

uint64_t ptemu_run(const ptemu_cpu *cpu, ptemu_mem *mem, ptemu_tlb *tlb,
                   const ptemu_trace_rec *trace, uint64_t n, uint64_t start,
                   uint64_t *pa, ptemu_fault *fault)
{
    ptemu_ctx c;
    ptemu_ctx_init(&c, cpu, mem, tlb);
    ptemu_ctx_tables(&c);
    return run_ctx(&c, trace, n, start, pa, fault);
}

uint64_t ptemu_ctx_run(const ptemu_ctx *c, const ptemu_trace_rec *trace, uint64_t n,
                       uint64_t start, uint64_t *pa, ptemu_fault *fault)
{
    return run_ctx(c, trace, n, start, pa, fault);
}

uint64_t ptemu_mmu_run(ptemu_mmu *m, const ptemu_trace_rec *trace, uint64_t n,
                       uint64_t start, uint64_t *pa)
{
    ptemu_ctx scratch;
    return run_ctx(ptemu_mmu_ctx(m, &scratch, 1), trace, n, start, pa, &m->fault);
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
