/*
 * walk.c -- the 4-level and 5-level x86-64 page walk (Intel SDM Vol. 3A
 * 4.5 - 4.8), with the TLB and paging-structure caches of tlb.c in front.
 *
 * One access in, either a translation or a whole fault out:
 *
 *   canonical? --no--> #GP(0), CR2 untouched                      (SDM 4.5.1)
 *      |
 *   TLB hit? --yes--> rights check on the cached rights --> done or #PF
 *      |                (a write through a clean entry walks again, 4.8)
 *   PSC hit? picks the level to start at                          (SDM 4.10.3)
 *      |
 *   level loop: load entry (bounds-checked), P, reserved bits, AND/OR rights
 *      |
 *   rights check (U/S, R/W+WP, XD, SMEP, SMAP, PKU/PKS)           (SDM 4.6)
 *      |
 *   A in every entry read, D in the leaf on a write -- only now, after every
 *   check passed (Bochs order; PTEMU_OPT_EAGER_A asks for QEMU's)  (SDM 4.8)
 *      |
 *   fill paging-structure caches and TLB
 *
 * A paging-structure reference outside physical memory is a defined fault:
 * #PF with P|RSVD (plus W/U/I as usual) and cause PTEMU_CAUSE_BUS.  It is
 * what PC hardware would report after reading the all-ones value that reads
 * of nonexistent memory return (bits 51:MAXPHYADDR of it are reserved); the
 * cause field lets software tell it from a true reserved-bit fault.
 */
#include "ptemu.h"

void ptemu_ctx_init(ptemu_ctx *c, const ptemu_cpu *cpu, ptemu_mem *mem, ptemu_tlb *tlb)
{
    uint32_t m = cpu->maxphyaddr;
    /* MAXPHYADDR is checked in Python; clamp anyway so no shift here is
     * undefined whatever the struct holds. */
    if (m < 13 || m > 52)
        m = 52;
    memset(c, 0, sizeof *c);
    c->mem = mem;
    c->tlb = tlb;
    c->addr_mask = ptemu_addr_mask(m);
    c->nxe = (cpu->efer & PTEMU_EFER_NXE) != 0;
    c->wp = (cpu->cr0 & PTEMU_CR0_WP) != 0;
    c->smep = (cpu->cr4 & PTEMU_CR4_SMEP) != 0;
    c->smap = (cpu->cr4 & PTEMU_CR4_SMAP) != 0;
    c->pke = (cpu->cr4 & PTEMU_CR4_PKE) != 0;
    c->pks = (cpu->cr4 & PTEMU_CR4_PKS) != 0;
    c->pge = (cpu->cr4 & PTEMU_CR4_PGE) != 0;
    c->ac = cpu->ac != 0;
    c->pkru = cpu->pkru;
    c->pkrs = cpu->pkrs;
    c->eager_a = (cpu->options & PTEMU_OPT_EAGER_A) != 0;
    c->pcid = (cpu->cr4 & PTEMU_CR4_PCIDE) ? (uint32_t)(cpu->cr3 & PTEMU_CR3_PCID_MASK) : 0;
    c->top_table = cpu->cr3 & c->addr_mask;

    /* Paging off (CR0.PG=0): linear = physical.  Legacy 32-bit and PAE
     * paging are refused in Python; should such a state reach C anyway it
     * is walked as 4-level, never as something undefined. */
    if (!(cpu->cr0 & PTEMU_CR0_PG)) {
        c->levels = 0;
    } else if (cpu->cr4 & PTEMU_CR4_LA57) {
        c->levels = 5;
    } else {
        c->levels = 4;
    }
    c->canon_bits = c->levels == 5 ? 57 : 48;

    /* Reserved bits (SDM 4.5.4 tables 4-15..4-20; NOTES "Walk"), indexed
     * by level and by the entry's bit 7. */
    uint64_t base = ptemu_rsvd_phys(m) | (c->nxe ? 0 : PTEMU_PTE_NX);
    for (int l = 1; l <= 5; l++)
        c->rsvd[l][0] = c->rsvd[l][1] = base;
    c->rsvd[4][1] |= PTEMU_PTE_PS;  /* PS in a PML4E is reserved */
    c->rsvd[5][1] |= PTEMU_PTE_PS;  /* and in a PML5E */
    c->rsvd[3][1] |= PTEMU_RSVD_1G; /* 1 GiB PDPTE: bits 29:13 */
    c->rsvd[2][1] |= PTEMU_RSVD_2M; /* 2 MiB PDE: bits 20:13 */
    /* level 1: bit 7 is PAT, nothing extra */
    c->nx_mask = c->nxe ? PTEMU_PTE_NX : 0;
}

/* Error-code bits that describe the access itself (SDM 4.7): W/R, U/S, and
 * I/D only when instruction fetches can be told apart (NXE or SMEP). */
static inline uint32_t access_bits(const ptemu_ctx *c, uint32_t access, uint32_t flags)
{
    /* Products, not branches: the access kind of a stream is unpredictable. */
    return (uint32_t)(access == PTEMU_ACC_WRITE) * PTEMU_PF_W |
           (uint32_t)((flags & PTEMU_IN_USER) != 0) * PTEMU_PF_U |
           (uint32_t)(access == PTEMU_ACC_FETCH && (c->nxe | c->smep)) * PTEMU_PF_I;
}

/*
 * The access-rights decision of SDM 4.6 over rights combined across all
 * levels (W and U ANDed, NX ORed), without protection keys: 1 when the
 * access is refused.
 */
static inline int rights_refused(const ptemu_ctx *c, uint32_t access, uint32_t flags,
                                 uint32_t rights)
{
    int upage = (rights & PTEMU_TE_U) != 0;
    int writable = (rights & PTEMU_TE_W) != 0;
    int nx = (rights & PTEMU_TE_NX) != 0;

    if (flags & PTEMU_IN_USER) {
        /* 4.6.1: user-mode accesses need a user-mode address; writes R/W
         * everywhere; fetches XD clear everywhere. */
        if (!upage)
            return 1;
        if (access == PTEMU_ACC_WRITE && !writable)
            return 1;
        return access == PTEMU_ACC_FETCH && nx;
    }
    if (access == PTEMU_ACC_FETCH) {
        /* Supervisor fetch: XD; SMEP forbids user-mode addresses. */
        return nx || (upage && c->smep);
    }
    /* Supervisor data access: SMAP forbids user-mode addresses unless
     * RFLAGS.AC=1 on an explicit access; writes need R/W when WP=1. */
    if (upage && c->smap && ((flags & PTEMU_IN_IMPLICIT) || !c->ac))
        return 1;
    return access == PTEMU_ACC_WRITE && !writable && c->wp;
}

/* 4.6.2: protection keys, data accesses only (fetches never).  PKRU for
 * user-mode addresses with CR4.PKE, PKRS for supervisor-mode addresses
 * with CR4.PKS.  WD blocks writes by user-mode accesses, and by
 * supervisor-mode accesses when CR0.WP=1.  1 when the key check fails. */
static inline int key_refused(const ptemu_ctx *c, uint32_t access, uint32_t flags,
                              uint32_t rights, uint32_t pkey)
{
    if (access == PTEMU_ACC_FETCH)
        return 0;
    uint32_t reg;
    if (rights & PTEMU_TE_U) {
        if (!c->pke)
            return 0;
        reg = c->pkru;
    } else {
        if (!c->pks)
            return 0;
        reg = c->pkrs;
    }
    uint32_t ad = (reg >> (2 * pkey)) & 1;
    uint32_t wd = (reg >> (2 * pkey + 1)) & 1;
    return ad || (wd && access == PTEMU_ACC_WRITE && ((flags & PTEMU_IN_USER) || c->wp));
}

/*
 * Batch loops decide rights by table: rights_refused() for every access
 * kind, mode (flags & (USER|IMPLICIT)) and combination of NX/W/U, computed
 * once per call -- the same function, so one logic serves both.
 */
void ptemu_ctx_tables(ptemu_ctx *c)
{
    for (uint32_t a = 0; a < 3; a++)
        for (uint32_t m = 0; m < 4; m++)
            for (uint32_t r = 0; r < 8; r++)
                c->rtab[a][m][r] = rights_refused(c, a, m, r) ? (uint8_t)PTEMU_PF_P : 0;
    c->rtab_ready = 1;
}

/*
 * Returns 0 when the access is allowed, else the protection-fault bits: P,
 * plus PK when the key check fails -- which the SDM (4.7) reports whether
 * or not another check failed too.
 */
static PTEMU_INLINE uint32_t keys_check(const ptemu_ctx *c, uint32_t access, uint32_t flags,
                                        uint32_t rights, uint32_t pkey, uint32_t ec)
{
    if ((c->pke | c->pks) && key_refused(c, access, flags, rights, pkey))
        ec = PTEMU_PF_P | PTEMU_PF_PK;
    return ec;
}

static PTEMU_INLINE uint32_t rights_check(const ptemu_ctx *c, uint32_t access, uint32_t flags,
                                          uint32_t rights, uint32_t pkey)
{
    uint32_t ec = c->rtab_ready
        ? c->rtab[access][flags & (PTEMU_IN_USER | PTEMU_IN_IMPLICIT)][rights & 7]
        : (rights_refused(c, access, flags, rights) ? PTEMU_PF_P : 0);
    return keys_check(c, access, flags, rights, pkey, ec);
}

/* rights_check() where ptemu_ctx_tables() is known to have run (a batch
 * loop's hit path): the table alone, no test for it. */
static PTEMU_INLINE uint32_t rights_check_tab(const ptemu_ctx *c, uint32_t access,
                                              uint32_t flags, uint32_t rights, uint32_t pkey)
{
    uint32_t ec = c->rtab[access][flags & (PTEMU_IN_USER | PTEMU_IN_IMPLICIT)][rights & 7];
    return keys_check(c, access, flags, rights, pkey, ec);
}

static inline int page_fault(const ptemu_ctx *c, ptemu_fault *f, uint64_t va,
                             uint32_t ec, uint32_t cause, uint32_t level)
{
    ptemu_set_fault(f, PTEMU_VEC_PF, ec, va, cause, level);
    /* SDM 4.10.4.1: a #PF invalidates the TLB entries for the faulting page
     * and the paging-structure-cache entries of the current PCID, so a fault
     * caused only by stale cached state does not recur. */
    if (c->tlb)
        ptemu_tlb_flush(c->tlb, PTEMU_FLUSH_INVLPG, c->pcid, va, PTEMU_FLUSHED_BY_PF);
    return PTEMU_VEC_PF;
}

/* A VM exit for the EPT, recorded by ept.c; the guest sees nothing, so no
 * vector: PTEMU_VEC_EXIT, and the exit reason (48 violation, 49
 * misconfiguration) in fault.exit_reason. */
static PTEMU_NOINLINE int ept_exit_fault(ptemu_fault *f, const ptemu_ept *x, uint64_t va)
{
    return ptemu_set_ept_exit(f, x, va);
}

/* Every outcome reports what the walk read: nothing yet. */
static PTEMU_INLINE void walk_out_begin(ptemu_walk_out *o, uint64_t va)
{
    o->va = va;
    o->nentries = 0;
    o->mem_refs = 0;
    o->tlb_hit = 0;
}

/* A TLB hit that cannot serve this access by itself (SDM 4.8: a write
 * through an entry cached with D=0 must set D in memory; nested: the
 * combined mapping lacks the EPT right, so the exit, or a changed EPT, must
 * come from memory).  The rights check comes first. */
static PTEMU_INLINE int hit_needs_walk(uint64_t data, uint32_t access, const ptemu_ept *ept)
{
    /* & and |, not && and ||: the access kind of a stream is unpredictable. */
    int dirty_rewalk = (access == PTEMU_ACC_WRITE) & !(data & PTEMU_TE_D);
    return dirty_rewalk | (ept && !(data & (access == PTEMU_ACC_WRITE ? PTEMU_TE_EPT_W
                                            : access == PTEMU_ACC_FETCH ? PTEMU_TE_EPT_X
                                            : PTEMU_TE_EPT_R)));
}

/* The address a TLB entry gives for va. */
static PTEMU_INLINE uint64_t hit_pa(const ptemu_tlb_hit *h, uint64_t va)
{
    return ptemu_td_base(h->data) | (va & ((1ULL << ptemu_level_shift(h->size + 1u)) - 1));
}

/* The level loop of a walk from `*level` at `table`: the entries read go
 * to epas[]/ents[] (*n of them), the rights combined down to each to
 * rights_at[]; returns PTEMU_CAUSE_NONE with the leaf in *e and its level
 * in *level, or why the walk stopped there.  plain and set_a_now are
 * constants at each call, so each call site gets its own loop. */
static PTEMU_INLINE uint32_t walk_levels(const ptemu_ctx *c, uint64_t va, const int plain,
                                         const int set_a_now, uint32_t *level_io, uint64_t table,
                                         uint32_t *rights_io, uint64_t *epas, uint64_t *ents,
                                         uint32_t *rights_at, uint32_t *n_out, uint64_t *e_out,
                                         uint64_t *and_out)
{
    /* Locals, so that stores (A-bit byte stores may alias anything) cannot
     * force reloads of the context. */
    const ptemu_mem *mem = c->mem;
    const ptemu_ept *ept = mem->ept;
    const uint8_t *pbase = mem->base;
    const uint64_t psize = mem->size;
    const uint64_t addr_mask = c->addr_mask, nx_mask = c->nx_mask;
    uint32_t level = *level_io, rights = *rights_io, n = 0, cause = PTEMU_CAUSE_NONE;
    uint64_t e = 0, and_all = ~0ULL;
    for (;;) {
        uint64_t epa = table + ((va >> ptemu_level_shift(level)) & 511) * 8;
        if (plain) {
            if (psize < 8 || epa > psize - 8) {
                cause = PTEMU_CAUSE_BUS;
                break;
            }
            memcpy(&e, pbase + epa, 8);
        } else if (!ptemu_load64(mem, epa, &e)) {
            cause = ept && ept->pending ? PTEMU_CAUSE_EPT : PTEMU_CAUSE_BUS;
            break;
        }
        epas[n] = epa;
        ents[n] = e;
        n++;
        and_all &= e;
        if (!(e & PTEMU_PTE_P)) {
            cause = PTEMU_CAUSE_NOT_PRESENT;
            break;
        }
        if (e & c->rsvd[level][(e >> 7) & 1]) {
            cause = PTEMU_CAUSE_RSVD;
            break;
        }
        /* 4.6: R/W and U/S ANDed over levels (their bit positions are
         * PTEMU_TE_W/U), XD ORed (bit 63 lands on PTEMU_TE_NX = bit 0);
         * ptemu.h asserts both coincidences. */
        rights &= (uint32_t)e | ~(uint32_t)(PTEMU_TE_W | PTEMU_TE_U);
        rights |= (uint32_t)((e & nx_mask) >> 63);
        rights_at[n - 1] = rights;
        /* PS in PML4E/PML5E was rejected above as reserved; at level 1
         * bit 7 is PAT. */
        if (level == 1 || (e & PTEMU_PTE_PS))
            break;
        /* QEMU order marks a non-leaf entry once it passed P and reserved
         * bits; the leaf only after the rights check, like the default. */
        if (set_a_now && !(e & PTEMU_PTE_A)) {
            if (!ptemu_or8(c->mem, epa, (uint8_t)PTEMU_PTE_A)) {
                cause = PTEMU_CAUSE_EPT;
                break;
            }
            ents[n - 1] = e | PTEMU_PTE_A;
        }
        table = e & addr_mask;
        level--;
    }
    *level_io = level;
    *rights_io = rights;
    *n_out = n;
    *e_out = e;
    *and_out = and_all;     /* the AND of the entries as read */
    return cause;
}

/*
 * A translation once the TLB was probed: hit is what ptemu_tlb_lookup()
 * found for this access (hit->way NULL: a miss, or no TLB), so that batch loops
 * can take the common hit themselves and hand everything else here without
 * probing (and counting) twice.  va is canonical, paging is on.  entries:
 * 0 when the caller reads only o->pa (run's loop), so that nothing else of
 * o -- the entries read, the level, the leaf... -- is written.
 */
static PTEMU_INLINE int translate_looked_up(const ptemu_ctx *c, uint64_t va, uint32_t access,
                                            uint32_t flags, ptemu_tlb *tlb,
                                            const ptemu_tlb_hit *hit, const int entries,
                                            ptemu_walk_out *o, ptemu_fault *f)
{
    if (entries)
        walk_out_begin(o, va);
    uint32_t acc_ec = access_bits(c, access, flags);
    ptemu_ept *ept = c->mem->ept;
    uint64_t ept_refs0 = 0;
    if (ept) {
        ept->pending = 0;
        ept_refs0 = ept->refs;
    }

    if (hit->way) {
        uint32_t prot = rights_check(c, access, flags, ptemu_td_flags(hit->data),
                                     ptemu_td_pkey(hit->data));
        if (prot)
            return page_fault(c, f, va, prot | acc_ec, PTEMU_CAUSE_PROT, 0);
        if (!hit_needs_walk(hit->data, access, ept)) {
            o->pa = hit_pa(hit, va);
            if (!entries)
                return PTEMU_OK;
            o->page_size = 1ULL << ptemu_level_shift(hit->size + 1u);
            o->level = hit->size + 1u;
            o->rights = ptemu_td_flags(hit->data) & (PTEMU_TE_W | PTEMU_TE_U | PTEMU_TE_NX);
            o->leaf = 0;
            o->first_level = o->level;
            o->tlb_hit = 1;
            return PTEMU_OK;
        }
        if (access == PTEMU_ACC_WRITE && !(hit->data & PTEMU_TE_D))
            tlb->dirty_rewalks++;
        ptemu_tlb_drop(hit->way, hit->ways);
    }
    /* A miss (not a rewalk): no TLB or PSC entry matches va in this PCID,
     * so the fills below need not look for one. */
    const int absent = !hit->way;
    if (tlb)
        tlb->walks++;

    uint32_t level = c->levels;
    uint64_t table = c->top_table;
    uint32_t rights = PTEMU_TE_W | PTEMU_TE_U;
    if (tlb)
        ptemu_psc_lookup(tlb, va, c->pcid, c->levels, &level, &table, &rights);
    const uint32_t first_level = level;

    /* Plain memory -- no frame table, no EPT, no segment map -- is read
     * directly with the same bounds check as ptemu_word(). */
    const ptemu_mem *mem = c->mem;
    const int plain = !mem->frames && !mem->ept && !mem->nseg;
    const uint64_t addr_mask = c->addr_mask;
    const int set_a_now = c->eager_a && !(flags & PTEMU_IN_NO_AD);
    uint64_t epas[PTEMU_MAX_LEVELS], ents[PTEMU_MAX_LEVELS];
    uint32_t rights_at[PTEMU_MAX_LEVELS];   /* combined rights down to entry i */
    uint32_t n = 0, cause;
    uint64_t e = 0, and_all;
    /* The usual case (plain memory, A/D after the checks) as a loop of its
     * own, free of the tests for the others. */
    if (plain && !set_a_now)
        cause = walk_levels(c, va, 1, 0, &level, table, &rights, epas, ents, rights_at, &n, &e,
                            &and_all);
    else
        cause = walk_levels(c, va, plain, set_a_now, &level, table, &rights, epas, ents,
                            rights_at, &n, &e, &and_all);
    const uint32_t mem_refs = n + (uint32_t)(ept ? ept->refs - ept_refs0 : 0);
    if (entries) {
        for (uint32_t i = 0; i < n; i++) {
            o->entry_pa[i] = epas[i];
            o->entry[i] = ents[i];
        }
        o->nentries = n;
        o->mem_refs = mem_refs;
        o->first_level = first_level;
    }
    if (tlb)
        tlb->walk_refs += mem_refs;
    if (cause == PTEMU_CAUSE_EPT)
        return ept_exit_fault(f, ept, va);
    if (cause == PTEMU_CAUSE_BUS)
        return page_fault(c, f, va, PTEMU_PF_P | PTEMU_PF_RSVD | acc_ec, cause, level);
    if (cause == PTEMU_CAUSE_NOT_PRESENT)
        return page_fault(c, f, va, acc_ec, cause, level);
    if (cause == PTEMU_CAUSE_RSVD)
        return page_fault(c, f, va, PTEMU_PF_P | PTEMU_PF_RSVD | acc_ec, cause, level);

    uint32_t pkey = (uint32_t)(e >> PTEMU_PTE_PKEY_SHIFT) & 15;
    uint32_t prot = rights_check(c, access, flags, rights, pkey);
    if (prot)
        return page_fault(c, f, va, prot | acc_ec, PTEMU_CAUSE_PROT, 0);

    uint64_t size = 1ULL << ptemu_level_shift(level);
    uint32_t ept_rights = 0;
    /* The frame field: bits M-1:shift; for large pages this drops PAT
     * (bit 12) and the reserved bits below the frame. */
    uint64_t base = e & addr_mask & ~(size - 1);

    if (!(flags & PTEMU_IN_NO_AD)) {
        /* 4.8: every check has passed; now set A everywhere and D in the
         * leaf on a write.  Entries were in bounds when loaded. */
        /* Usually every A is set already: one test for all of them (an
         * entry whose A the eager order set counts as clear here, and the
         * loop then finds it set). */
        for (uint32_t i = 0; !(and_all & PTEMU_PTE_A) && i < n; i++) {
            if (!(ents[i] & PTEMU_PTE_A)) {
                if (!ptemu_or8(c->mem, epas[i], (uint8_t)PTEMU_PTE_A))
                    return ept_exit_fault(f, ept, va);
                ents[i] |= PTEMU_PTE_A;
                if (entries)
                    o->entry[i] = ents[i];
            }
        }
        if (access == PTEMU_ACC_WRITE && !(ents[n - 1] & PTEMU_PTE_D)) {
            if (!ptemu_or8(c->mem, epas[n - 1], (uint8_t)PTEMU_PTE_D))
                return ept_exit_fault(f, ept, va);
            ents[n - 1] |= PTEMU_PTE_D;
            if (entries)
                o->entry[n - 1] = ents[n - 1];
            /* A recursive slot: the leaf's word may also have served as a
             * table entry above; report it as memory now holds it. */
            for (uint32_t i = 0; entries && i + 1 < n; i++)
                if (epas[i] == epas[n - 1])
                    o->entry[i] = ents[i] |= PTEMU_PTE_D;
        }
    }

    uint32_t tlb_size = level - 1;
    if (ept) {
        /* Nested paging: the guest-physical address the guest walk gave
         * goes through the EPT too (the last of the (n+1)(m+1)-1
         * references).  The combined mapping is cached at 4 KiB: never
         * larger than either the guest's or the EPT's page. */
        uint64_t gpa = base | (va & (size - 1)), hpa;
        uint32_t erights = 0;
        uint64_t r0 = ept->refs;
        if (!ptemu_ept_walk(ept, gpa, access, PTEMU_EQ_GLA_VALID | PTEMU_EQ_TRANSLATED, &hpa,
                            &erights))
            return ept_exit_fault(f, ept, va);
        if (entries)
            o->mem_refs += (uint32_t)(ept->refs - r0);
        if (tlb)
            tlb->walk_refs += ept->refs - r0;
        ept->exit_gpa = gpa;    /* for the caller: the guest-physical address */
        base = hpa & ~0xfffULL;
        size = 4096;
        tlb_size = PTEMU_SIZE_4K;
        ept_rights = (erights & PTEMU_EPT_R ? PTEMU_TE_EPT_R : 0) |
                     (erights & PTEMU_EPT_W ? PTEMU_TE_EPT_W : 0) |
                     (erights & PTEMU_EPT_X ? PTEMU_TE_EPT_X : 0);
    }

    o->pa = base | (va & (size - 1));
    const uint64_t leaf = ents[n - 1];
    if (entries) {
        o->page_size = ept ? 1ULL << ptemu_level_shift(level) : size;
        o->level = level;
        o->leaf = leaf;
        o->rights = rights;
    }

    if (tlb) {
        /* Cache what was used: one PSC entry per non-leaf entry read (all
         * have A=1 now, SDM 4.10.3.1), then the translation itself.  The
         * PSC levels filled are all below the one ptemu_psc_lookup() hit
         * (or all, on no hit): each was probed for va just now and missed. */
        for (uint32_t i = 0; i + 1 < n; i++)
            ptemu_psc_fill(tlb, first_level - i, va, c->pcid, ents[i] & addr_mask, rights_at[i],
                           1);
        uint32_t tflags = rights | ept_rights;
        if (leaf & PTEMU_PTE_D)
            tflags |= PTEMU_TE_D;
        if (c->pge && (leaf & PTEMU_PTE_G))
            tflags |= PTEMU_TE_G;
        ptemu_tlb_fill(tlb, va, access, c->pcid, tlb_size, base, tflags, pkey, absent);
    }
    return PTEMU_OK;
}

PTEMU_INLINE int ptemu_ctx_translate(const ptemu_ctx *c, uint64_t va, uint32_t access,
                                     uint32_t flags, ptemu_walk_out *o, ptemu_fault *f)
{
    if (c->mem->ept)    /* a probe writes no EPT A/D bits either */
        c->mem->ept->no_ad = (flags & PTEMU_IN_NO_AD) != 0;

    if (c->levels == 0) {
        walk_out_begin(o, va);
        o->pa = va;
        if (c->mem->ept) {
            /* SDM 29.3.1: with CR0.PG = 0 the linear address is a
             * guest-physical address, still translated by EPT. */
            ptemu_ept *x = c->mem->ept;
            uint64_t r0 = x->refs;
            x->pending = 0;
            if (!ptemu_ept_walk(x, va, access, PTEMU_EQ_GLA_VALID | PTEMU_EQ_TRANSLATED,
                                &o->pa, NULL))
                return ept_exit_fault(f, x, va);
            o->mem_refs = (uint32_t)(x->refs - r0);
            x->exit_gpa = va;
        }
        o->page_size = 4096;
        o->leaf = 0;
        o->level = 0;
        o->first_level = 0;
        o->rights = PTEMU_TE_W | PTEMU_TE_U;
        return PTEMU_OK;
    }

    if (!ptemu_canonical(c, va)) {
        walk_out_begin(o, va);      /* no entry was read */
        return ptemu_set_fault(f, PTEMU_VEC_GP, 0, 0, PTEMU_CAUSE_NONCANON, 0);
    }

    ptemu_tlb *tlb = (flags & PTEMU_IN_NO_AD) ? NULL : c->tlb;
    ptemu_tlb_hit h = { NULL, 0, 0, 0 };
    if (tlb)
        ptemu_tlb_lookup(tlb, va, access, c->pcid, &h);
    return translate_looked_up(c, va, access, flags, tlb, &h, 1, o, f);
}

uint32_t ptemu_resolve_flags(const ptemu_cpu *cpu, uint32_t flags)
{
    if (flags & PTEMU_IN_CPL) {
        flags &= ~(uint32_t)PTEMU_IN_CPL;
        if (cpu->cpl == 3 && !(flags & PTEMU_IN_IMPLICIT))
            flags |= PTEMU_IN_USER;
    }
    if (flags & PTEMU_IN_IMPLICIT)   /* implicit accesses are supervisor-mode */
        flags &= ~(uint32_t)PTEMU_IN_USER;
    return flags;
}

int ptemu_translate(const ptemu_cpu *cpu, ptemu_mem *mem, ptemu_tlb *tlb,
                    const ptemu_walk_in *in, ptemu_walk_out *out, ptemu_fault *fault)
{
    ptemu_ctx c;
    ptemu_ctx_init(&c, cpu, mem, tlb);
    if (in->access > PTEMU_ACC_FETCH) {
        /* Python validates the kind; C still refuses to guess. */
        return ptemu_set_fault(fault, PTEMU_VEC_GP, 0, 0, PTEMU_CAUSE_NONE, 0);
    }
    return ptemu_ctx_translate(&c, in->va, in->access, ptemu_resolve_flags(cpu, in->flags),
                               out, fault);
}

/* What ptemu_ctx_cache holds: the key the context was derived from, then
 * the context. */
typedef struct ctx_cached {
    uint64_t  cpu[sizeof(ptemu_cpu) / 8];   /* the ptemu_cpu, word by word */
    ptemu_mem *mem;
    ptemu_tlb *tlb;
    uint64_t  valid;
    ptemu_ctx ctx;
} ctx_cached;

_Static_assert(sizeof(ctx_cached) <= sizeof(ptemu_ctx_cache), "ptemu_ctx_cache too small");
_Static_assert(sizeof(ptemu_cpu) % 8 == 0, "ptemu_cpu has whole words");

const ptemu_ctx *ptemu_cached_ctx(ptemu_ctx_cache *cache, const ptemu_cpu *cpu_state,
                                  ptemu_mem *mem, ptemu_tlb *tlb, ptemu_ctx *scratch,
                                  int tables)
{
    if (!cache) {
        ptemu_ctx_init(scratch, cpu_state, mem, tlb);
        if (tables)
            ptemu_ctx_tables(scratch);
        return scratch;
    }
    ctx_cached *cc = (ctx_cached *)(void *)cache;
    uint64_t cpu[sizeof(ptemu_cpu) / 8], diff = 0;
    memcpy(cpu, cpu_state, sizeof cpu);
    /* Every byte of the state, so that no field a walk reads can go stale
     * (the mode bits, CR3's table and PCID, PKRU, AC, MAXPHYADDR...). */
    for (size_t i = 0; i < sizeof cpu / 8; i++)
        diff |= cpu[i] ^ cc->cpu[i];
    if (diff | !cc->valid | (cc->mem != mem) | (cc->tlb != tlb)) {
        ptemu_ctx_init(&cc->ctx, cpu_state, mem, tlb);
        ptemu_ctx_tables(&cc->ctx);
        memcpy(cc->cpu, cpu, sizeof cpu);
        cc->mem = mem;
        cc->tlb = tlb;
        cc->valid = 1;
    }
    return &cc->ctx;
}

const ptemu_ctx *ptemu_mmu_ctx(ptemu_mmu *m, ptemu_ctx *scratch, int tables)
{
    return ptemu_cached_ctx(m->cache, m->cpu, m->mem, m->tlb, scratch, tables);
}

int ptemu_mmu_translate(ptemu_mmu *m, uint64_t va, uint32_t access, uint32_t flags)
{
    if (access > PTEMU_ACC_FETCH)   /* as ptemu_translate() */
        return ptemu_set_fault(&m->fault, PTEMU_VEC_GP, 0, 0, PTEMU_CAUSE_NONE, 0);
    ptemu_ctx scratch;
    const ptemu_ctx *c = ptemu_mmu_ctx(m, &scratch, 0);
    return ptemu_ctx_translate(c, va, access, ptemu_resolve_flags(m->cpu, flags), m->out,
                               &m->fault);
}

/*
 * The scalar common case without a TLB, on plain memory, A/D after the
 * checks: walk_levels() reading only, straight into the output.  It writes
 * nothing to memory, so anything it does not finish -- a fault, an A or D
 * bit to set -- is left to the full walk, which reads the same entries again
 * and decides; 1 when it finished (o filled as translate_looked_up() fills
 * it), 0 to take the full walk.
 */
static PTEMU_INLINE int translate_quick(const ptemu_ctx *c, uint64_t va, uint32_t access,
                                        uint32_t flags, ptemu_walk_out *o)
{
    uint32_t level = c->levels, rights = PTEMU_TE_W | PTEMU_TE_U, n;
    uint32_t rights_at[PTEMU_MAX_LEVELS];
    uint64_t e, and_all;
    if (walk_levels(c, va, 1, 0, &level, c->top_table, &rights, o->entry_pa, o->entry,
                    rights_at, &n, &e, &and_all) != PTEMU_CAUSE_NONE)
        return 0;
    if (rights_check(c, access, flags, rights, (uint32_t)(e >> PTEMU_PTE_PKEY_SHIFT) & 15))
        return 0;
    /* 4.8: A in every entry read, D in the leaf on a write: all set already? */
    if (!(flags & PTEMU_IN_NO_AD) &&
        (!(and_all & PTEMU_PTE_A) | ((access == PTEMU_ACC_WRITE) & !(e & PTEMU_PTE_D))))
        return 0;
    const uint64_t size = 1ULL << ptemu_level_shift(level);
    o->pa = (e & c->addr_mask & ~(size - 1)) | (va & (size - 1));
    o->page_size = size;
    o->leaf = e;
    o->level = level;
    o->rights = rights;
    o->nentries = n;
    o->mem_refs = n;
    o->tlb_hit = 0;
    o->first_level = c->levels;
    return 1;
}

uint64_t ptemu_mmu_translate_one(ptemu_mmu *m)
{
    ptemu_walk_out *o = m->out;
    const uint64_t va = o->va;
    const uint32_t access = m->access;
    if (access > PTEMU_ACC_FETCH) {     /* as ptemu_translate() */
        ptemu_set_fault(&m->fault, PTEMU_VEC_GP, 0, 0, PTEMU_CAUSE_NONE, 0);
        return 0;
    }
    ptemu_ctx scratch;
    const ptemu_ctx *c = ptemu_mmu_ctx(m, &scratch, 0);
    const uint32_t flags = ptemu_resolve_flags(m->cpu, m->flags);
    const ptemu_mem *mem = c->mem;
    const int quick = !(c->tlb || c->eager_a || mem->frames || mem->ept || mem->nseg ||
                        !c->levels) && ptemu_canonical(c, va);
    if (!(quick && translate_quick(c, va, access, flags, o)) &&
        ptemu_ctx_translate(c, va, access, flags, o, &m->fault) != PTEMU_OK)
        return 0;
    if (!o->pa)     /* a translation to 0: say "no fault", whole */
        ptemu_set_fault(&m->fault, 0, 0, 0, PTEMU_CAUSE_NONE, 0);
    return o->pa;
}

int ptemu_abi_version(void)
{
    return PTEMU_ABI_VERSION;
}

int ptemu_mem_load64(const ptemu_mem *mem, uint64_t pa, uint64_t *value)
{
    return ptemu_load64(mem, pa, value);
}

int ptemu_mem_store64(ptemu_mem *mem, uint64_t pa, uint64_t value)
{
    uint8_t *p = ptemu_word(mem, pa);
    if (!p)
        return 0;
    memcpy(p, &value, 8);
    return 1;
}
