/*
 * ptemu.h -- the one umbrella header of ptemu's C core.
 *
 * The public contract (structs, constants, entry points) lives in
 * ptemu_cdef.h, which cffi parses as well; this file adds what only the C
 * side needs: fixed-width types, the architectural masks of bits.h, and the
 * walk context shared by walk.c, tlb.c and batch.c.
 *
 * Rules of the core (see shared/DESIGN.md): no Python.h, no global mutable
 * state (cffi releases the GIL on every call), every physical access through
 * ptemu_load64/ptemu_or8, a fault assigned whole.
 */
#ifndef PTEMU_H
#define PTEMU_H

#include <stdint.h>
#include <string.h>

#include "ptemu_cdef.h"
#include "bits.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "ptemu reads paging structures as little-endian host words"
#endif

/*
 * The bit coincidences the core relies on, checked here where every file
 * sees them (SDM 4.6, tables 4-14 .. 4-20):
 *   - R/W and U/S of an entry sit at PTEMU_TE_W/U: walk.c ANDs the rights
 *     over the levels with `rights &= e`, batch.c indexes its rights table
 *     with `all & (TE_W | TE_U)`, shadow.c builds sptes from TE rights;
 *   - XD (bit 63) shifted down is PTEMU_TE_NX: walk.c and batch.c OR
 *     `(e & nx_mask) >> 63` into the rights;
 *   - a leaf's D is PTEMU_TE_D (shadow.c);
 *   - the #PF error code's W/U bits sit where the entry's R/W, U/S do
 *     (shadow.c).
 */
_Static_assert(PTEMU_TE_W == PTEMU_PTE_W, "TE_W must sit at the R/W bit");
_Static_assert(PTEMU_TE_U == PTEMU_PTE_U, "TE_U must sit at the U/S bit");
_Static_assert((PTEMU_PTE_NX >> 63) == PTEMU_TE_NX, "XD >> 63 must be TE_NX");
_Static_assert(PTEMU_TE_D == PTEMU_PTE_D, "TE_D must sit at the D bit");
_Static_assert(PTEMU_PF_W == PTEMU_PTE_W && PTEMU_PF_U == PTEMU_PTE_U,
               "#PF error code W/U bits sit where the entry's R/W, U/S do");

/*
 * Everything a walk needs, derived once from ptemu_cpu per call (or per
 * batch): the walk itself then touches no control register.
 */
typedef struct ptemu_ctx {
    ptemu_mem *mem;
    ptemu_tlb *tlb;           /* NULL: no TLB and no paging-structure caches */
    uint64_t   top_table;     /* CR3 bits M-1:12 */
    uint64_t   addr_mask;     /* bits M-1:12: the address field of an entry */
    uint64_t   rsvd[6][2];    /* reserved bits of a present entry, by level and PS */
    uint64_t   nx_mask;       /* PTEMU_PTE_NX when EFER.NXE=1, else 0 */
    uint32_t   levels;        /* 0 paging off, 4 or 5 */
    uint32_t   canon_bits;    /* 48 or 57 */
    uint32_t   pcid;          /* current PCID (0 when CR4.PCIDE=0) */
    uint32_t   nxe, wp, smep, smap, pke, pks, pge, ac;
    uint32_t   pkru, pkrs;
    uint32_t   eager_a;
    /* Batch loops only (ptemu_ctx_tables): rights_refused() as a table,
     * [access][flags & (USER|IMPLICIT)][rights & (NX|W|U)] -> PTEMU_PF_P or 0. */
    uint32_t   rtab_ready;
    uint8_t    rtab[3][4][8];
} ptemu_ctx;

/* In the unity build (ptemu_all.c) the walk is inlined into each batch loop. */
#if defined(__GNUC__)
#define PTEMU_INLINE __attribute__((always_inline)) inline
/* The rare side of a hot loop: kept out of line, so that the loop's common
 * path keeps its values in registers. */
#define PTEMU_NOINLINE __attribute__((noinline))
#define PTEMU_PREFETCH(p) __builtin_prefetch(p)
#else
#define PTEMU_INLINE inline
#define PTEMU_NOINLINE
#define PTEMU_PREFETCH(p) ((void)(p))
#endif

void ptemu_ctx_init(ptemu_ctx *c, const ptemu_cpu *cpu, ptemu_mem *mem, ptemu_tlb *tlb);
int  ptemu_ctx_translate(const ptemu_ctx *c, uint64_t va, uint32_t access, uint32_t flags,
                         ptemu_walk_out *out, ptemu_fault *fault);

void ptemu_ctx_tables(ptemu_ctx *c);

/* The context for a call through an Mmu handle: its cache, derived again
 * (with the rights table) when m->cpu, m->mem or m->tlb changed since; with
 * no cache, derived into *scratch, with the rights table when tables is 1. */
const ptemu_ctx *ptemu_mmu_ctx(ptemu_mmu *m, ptemu_ctx *scratch, int tables);
/* The same over any cache (NULL: derived into *scratch). */
const ptemu_ctx *ptemu_cached_ctx(ptemu_ctx_cache *cache, const ptemu_cpu *cpu,
                                  ptemu_mem *mem, ptemu_tlb *tlb, ptemu_ctx *scratch,
                                  int tables);
/* ptemu_run over a context already derived, with its rights table
 * (ptemu_cached_ctx(..., 1)). */
uint64_t ptemu_ctx_run(const ptemu_ctx *c, const ptemu_trace_rec *trace, uint64_t n,
                       uint64_t start, uint64_t *pa, ptemu_fault *fault);

uint32_t ptemu_resolve_flags(const ptemu_cpu *cpu, uint32_t flags);

/* SDM 4.5.1 / 3.3.7.1: bits 63:47 (63:56) must all equal bit 47 (56). */
static inline int ptemu_canonical(const ptemu_ctx *c, uint64_t va)
{
    int64_t s = (int64_t)(va << (64 - c->canon_bits)) >> (64 - c->canon_bits);
    return (uint64_t)s == va;
}

/* tlb.c */

/* What ptemu_tlb_lookup() found: the key word of the entry that answers
 * (its stamp is way[ways], its data word way[2 * ways], see tlb.c), and a
 * copy of its data; way is NULL on a miss. */
typedef struct ptemu_tlb_hit {
    uint64_t *way;
    uint64_t  data;         /* PTEMU_TD_* word */
    uint32_t  ways;
    uint32_t  size;         /* PTEMU_SIZE_* */
} ptemu_tlb_hit;

static inline uint32_t ptemu_td_flags(uint64_t data) { return (uint32_t)data & 0xffu; }
static inline uint32_t ptemu_td_pkey(uint64_t data)
{
    return (uint32_t)(data >> PTEMU_TD_PKEY_SHIFT) & 15u;
}
static inline uint64_t ptemu_td_base(uint64_t data) { return data & PTEMU_TD_BASE_MASK; }
static inline uint32_t ptemu_td_pcid(uint64_t data)
{
    return (uint32_t)(data >> PTEMU_TD_PCID_SHIFT);
}

/* An entry leaves an array: key 0 (invalid) and stamp 0, so that it is the
 * oldest of its set for replacement without a second test. */
static inline void ptemu_tlb_drop(uint64_t *way, uint32_t ways)
{
    way[0] = 0;
    way[ways] = 0;
}

/* Probe the arrays for an access kind in order; a second-level hit is
 * copied to the first level.  Counts the lookup, hits and misses. */
int  ptemu_tlb_lookup(ptemu_tlb *t, uint64_t va, uint32_t access, uint32_t pcid,
                      ptemu_tlb_hit *h);

/* The probe a batch loop makes inline: the first array probed for an access
 * kind (a first-level one), at its first page size -- where nearly all
 * hits come from.  Its geometry is fixed once ptemu_tlb_init() ran, so the
 * loop derives this once (ptemu_tlb_hot_of) and keeps it in locals. */
typedef struct ptemu_tlb_hot {
    ptemu_tlb_array *a;     /* NULL: no such array; ptemu_tlb_hot_hit() never hits */
    uint64_t *slots;
    uint64_t  set_mask;
    uint64_t  key_low;      /* the size and valid bits of a key */
    uint64_t  offset_mask;  /* page size - 1 */
    uint32_t  stride;       /* words per set: 3 * ways */
    uint32_t  ways;
    uint32_t  shift;        /* of the tag: log2 of the page size */
    uint32_t  size;         /* PTEMU_SIZE_* */
    uint32_t  live_bit;     /* 1 << size: the array's live bit for it */
} ptemu_tlb_hot;

void ptemu_tlb_hot_of(ptemu_tlb *t, uint32_t access, ptemu_tlb_hot *hot);
/* When ptemu_tlb_lookup() would find va in hot's array at its size: does
 * what that lookup does (counts, stamps) and returns the entry's key word,
 * with its data word in *data.  Otherwise NULL, and nothing was changed or
 * counted: ptemu_tlb_lookup() decides. */
uint64_t *ptemu_tlb_hot_hit(ptemu_tlb *t, const ptemu_tlb_hot *hot, uint64_t va,
                            uint32_t access, uint32_t pcid, uint64_t *data);
/* ptemu_tlb_lookup() after ptemu_tlb_hot_hit() found nothing (hot->a set):
 * the same outcome, without probing the hot array's first size again. */
int  ptemu_tlb_lookup_after_hot(ptemu_tlb *t, uint64_t va, uint32_t access, uint32_t pcid,
                                ptemu_tlb_hit *h);

/* absent: the caller's lookup of va in this PCID has just missed in every
 * array, so no entry can match and the fill skips looking for one. */
void ptemu_tlb_fill(ptemu_tlb *t, uint64_t va, uint32_t access, uint32_t pcid,
                    uint32_t size, uint64_t base, uint32_t flags, uint32_t pkey, int absent);
int  ptemu_psc_lookup(ptemu_tlb *t, uint64_t va, uint32_t pcid, uint32_t levels,
                      uint32_t *level, uint64_t *table, uint32_t *rights);
/* absent: as for ptemu_tlb_fill, after ptemu_psc_lookup() missed at level. */
void ptemu_psc_fill(ptemu_tlb *t, uint32_t level, uint64_t va, uint32_t pcid,
                    uint64_t table, uint32_t rights, int absent);

/* The index of the lowest set bit of m (m != 0). */
static inline uint32_t ptemu_ctz64(uint64_t m)
{
#if defined(__GNUC__)
    return (uint32_t)__builtin_ctzll(m);
#else
    uint32_t n = 0;
    while (!(m & 1)) {
        m >>= 1;
        n++;
    }
    return n;
#endif
}

/* The shift of the address bits that index a table at `level` (1 = PT):
 * also log2 of the region one entry at that level maps. */
static inline uint32_t ptemu_level_shift(uint32_t level) { return 12u + 9u * (level - 1u); }

/* A fault is assigned whole, so no stale field of an earlier one survives
 * (an exception: no exit reason); returns the vector. */
static inline int ptemu_set_fault(ptemu_fault *f, uint32_t vector, uint32_t error_code,
                                  uint64_t cr2, uint32_t cause, uint32_t level)
{
    ptemu_fault nf;
    nf.vector = vector;
    nf.error_code = error_code;
    nf.cr2 = cr2;
    nf.cause = cause;
    nf.level = level;
    nf.exit_reason = 0;
    nf.pad = 0;
    *f = nf;
    return (int)vector;
}

/* A VM exit instead of a fault (an EPT violation or misconfiguration that
 * ept.c recorded in x), assigned whole the same way: no exception vector,
 * the exit reason in its own field; returns PTEMU_VEC_EXIT. */
static inline int ptemu_set_ept_exit(ptemu_fault *f, const ptemu_ept *x, uint64_t va)
{
    ptemu_fault nf;
    nf.vector = PTEMU_VEC_EXIT;
    nf.error_code = (uint32_t)x->exit_qual;
    nf.cr2 = va;
    nf.cause = PTEMU_CAUSE_EPT;
    nf.level = x->exit_level;
    nf.exit_reason = x->exit_reason;
    nf.pad = 0;
    *f = nf;
    return PTEMU_VEC_EXIT;
}

/* ept.c: an EPT walk, and the host location of a guest-physical word. */
int ptemu_ept_walk(ptemu_ept *x, uint64_t gpa, uint32_t access, uint32_t qual_extra,
                   uint64_t *hpa, uint32_t *rights_out);
uint8_t *ptemu_word_ept(const ptemu_mem *m, uint64_t gpa, uint32_t access);

/* physmap.c: where the word at pa lives in sparse memory (m->nseg > 0), or 0
 * when it is not wholly inside one segment. */
uint8_t *ptemu_physmap_word(const ptemu_mem *m, uint64_t pa);

/* Where an 8-byte word at physical address pa lives in memory, or 0 when
 * any byte of it is outside memory.  The one bounds check of the core:
 * overflow-safe for any pa and any size (a size below 8 admits nothing).
 * Through a frame table the word must also stay inside its 4 KiB frame;
 * behind an EPT, the EPT walk decides (and may record a VM exit). */
static inline uint8_t *ptemu_word_acc(const ptemu_mem *m, uint64_t pa, uint32_t access)
{
    if (m->ept)
        return ptemu_word_ept(m, pa, access);
    if (m->frames) {
        uint64_t fn = pa >> 12;
        if (fn >= m->nframes || (pa & 0xfff) > 0xff8 || m->frames[fn] == PTEMU_NO_FRAME)
            return 0;
        pa = m->frames[fn] + (pa & 0xfff);
    }
    /* Sparse memory has size 0, so that it takes the refusing branch and
     * costs plain memory nothing; a path that reads base and size directly
     * sees no memory at all rather than the wrong bytes. */
    if (m->size < 8 || pa > m->size - 8)
        return m->nseg ? ptemu_physmap_word(m, pa) : 0;
    return m->base + pa;
}

static inline uint8_t *ptemu_word(const ptemu_mem *m, uint64_t pa)
{
    return ptemu_word_acc(m, pa, PTEMU_ACC_READ);
}

static inline int ptemu_load64(const ptemu_mem *m, uint64_t pa, uint64_t *v)
{
    const uint8_t *p = ptemu_word(m, pa);
    if (!p)
        return 0;
    memcpy(v, p, 8);
    return 1;
}

/* Setting A or D: OR into the entry's low byte, so a bit another agent set
 * meanwhile is never cleared (hardware uses a locked RMW, SDM 4.8).  Returns
 * 0 only when the write is refused (behind an EPT that forbids it). */
static inline int ptemu_or8(ptemu_mem *m, uint64_t pa, uint8_t bits)
{
    uint8_t *p = ptemu_word_acc(m, pa, PTEMU_ACC_WRITE);
    if (!p)
        return 0;
    *p |= bits;
    return 1;
}

/* The same for bits 15:0 (EPT A and D are bits 8 and 9). */
static inline void ptemu_or16(ptemu_mem *m, uint64_t pa, uint16_t bits)
{
    uint8_t *p = ptemu_word_acc(m, pa, PTEMU_ACC_WRITE);
    if (p) {
        p[0] |= (uint8_t)bits;
        p[1] |= (uint8_t)(bits >> 8);
    }
}

/* Shared helpers of the shadow fast paths (shadow.c), for paravirt.c: the
 * spte a level-1 shadow page (sp_info spi) holds for gpte (shadow.py
 * leaf_from_gpte), and the one leaf-spte writer (shadow.py set_spte: rmap
 * changes to ctx->rmap_log, *flush when a translation was lowered or moved;
 * the caller leaves room in the log for two entries). */
uint64_t ptemu_shadow_spte_from_gpte(const ptemu_shadow_ctx *ctx, uint8_t spi, uint64_t gpte);
int ptemu_shadow_set_spte(ptemu_shadow_ctx *ctx, ptemu_mem *hmem, uint64_t addr, uint64_t new,
                          int *flush);

#endif
