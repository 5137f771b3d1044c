/*
 * ept.c -- the EPT walk (Intel SDM Vol. 3C ch. 29 "EPT") and what the guest
 * walk needs of it for nested paging.
 *
 * With nested paging a guest's page walk (walk.c) runs over guest-physical
 * memory: each guest paging-structure reference, and the final address, is
 * a guest-physical address that the EPT walk here turns into a host-physical
 * one.  A 4-level guest on a 4-level EPT therefore costs up to
 * (4+1)*(4+1)-1 = 24 memory references per TLB miss (Bhargava et al.,
 * ASPLOS 2008).  walk.c reaches this file only through ptemu_word_ept() when
 * a ptemu_mem carries an EPT; the native path pays one predictable branch.
 *
 * EPT entry (SDM tables 29-1 .. 29-6)
 *
 *  63  62:52   51:M     M-1:12        11  10   9  8  7   6    5:3   2  1  0
 * +--+------+--------+--------------+---+---+--+--+--+----+------+--+--+--+
 * |SV| ign  |reserved| address      |ign|XU |D |A |PS|IPAT| type |X |W |R |
 * +--+------+--------+--------------+---+---+--+--+--+----+------+--+--+--+
 *  Present: any of bits 2:0.  Misconfigured: W without R (bits 2:0 = 010b
 *  or 110b); reserved bits set (51:M; 7:3 in a PML4E/PML5E; 6:3 in a
 *  non-leaf PDPTE/PDE; 29:12 in a 1 GiB leaf; 20:12 in a 2 MiB leaf); a leaf
 *  memory type of 2, 3 or 7.  Execute-only (100b) is allowed (the capability
 *  is reported by all processors that ptemu models).
 */
#include "ptemu.h"

#define EPT_RSVD_UPPER   0x00000000000000f8ULL   /* bits 7:3 of a PML4E/PML5E */
#define EPT_RSVD_TABLE   0x0000000000000078ULL   /* bits 6:3 of a non-leaf entry */
#define EPT_RSVD_1G      0x000000003ffff000ULL   /* bits 29:12 */
#define EPT_RSVD_2M      0x00000000001ff000ULL   /* bits 20:12 */

static int ept_exit(ptemu_ept *x, uint32_t reason, uint64_t gpa, uint64_t qual, uint32_t level)
{
    x->pending = 1;
    x->exit_reason = reason;
    x->exit_gpa = gpa;
    x->exit_qual = qual;
    x->exit_level = level;
    return 0;
}

/* EPT permission bits an access needs: guest paging-structure accesses are
 * reads, or writes when EPT A/D flags are on (SDM 29.3.3.2), and writes when
 * they set guest A/D bits. */
static inline uint32_t needed(uint32_t access)
{
    return access == PTEMU_ACC_WRITE ? PTEMU_EPT_W
         : access == PTEMU_ACC_FETCH ? PTEMU_EPT_X : PTEMU_EPT_R;
}

/*
 * The EPT walk.  qual_extra: the GLA-valid / translated bits of the exit
 * qualification.  *rights_out (may be NULL): R/W/X ANDed over the walk.
 */
int ptemu_ept_walk(ptemu_ept *x, uint64_t gpa, uint32_t access, uint32_t qual_extra,
                   uint64_t *hpa, uint32_t *rights_out)
{
    uint32_t m = x->maxphyaddr;
    if (m < 13 || m > 52)
        m = 52;
    const uint64_t addr_mask = ptemu_addr_mask(m);
    const uint64_t rsvd = ptemu_rsvd_phys(m);
    const uint32_t levels = ((x->eptp >> 3) & 7) == 4 ? 5 : 4;
    const uint32_t need = needed(access);
    const uint64_t qual_access = access == PTEMU_ACC_WRITE ? PTEMU_EQ_WRITE
                               : access == PTEMU_ACC_FETCH ? PTEMU_EQ_FETCH : PTEMU_EQ_READ;
    uint64_t table = x->eptp & addr_mask;
    uint64_t epas[PTEMU_MAX_LEVELS];
    uint32_t rights = PTEMU_EPT_R | PTEMU_EPT_W | PTEMU_EPT_X, n = 0, level = levels;
    uint64_t e;

    x->walks++;
    /* Guest-physical addresses are at most MAXPHYADDR bits wide, and a
     * 4-level EPT translates only 48 of them (SDM Vol. 3C 29.3.2): a wider
     * address is an EPT violation, never an alias of the address with its
     * top bits cut off. */
    if (gpa >> (levels == 4 && m > 48 ? 48 : m))
        return ept_exit(x, PTEMU_EXIT_EPT_VIOLATION, gpa, qual_access | qual_extra, levels);
    for (;;) {
        uint64_t epa = table + ((gpa >> ptemu_level_shift(level)) & 511) * 8;
        /* An EPT table outside host memory is the hypervisor's own error:
         * reported as a misconfiguration, never read. */
        if (!ptemu_load64(x->host, epa, &e))
            return ept_exit(x, PTEMU_EXIT_EPT_MISCONFIG, gpa, 0, level);
        x->refs++;
        epas[n++] = epa;
        uint32_t rwx = (uint32_t)e & 7;
        if (!rwx)   /* not present */
            return ept_exit(x, PTEMU_EXIT_EPT_VIOLATION, gpa, qual_access | qual_extra, level);
        if (rwx == PTEMU_EPT_W || rwx == (PTEMU_EPT_W | PTEMU_EPT_X))
            return ept_exit(x, PTEMU_EXIT_EPT_MISCONFIG, gpa, 0, level);
        int leaf = level == 1 || (level <= 3 && (e & PTEMU_EPT_PS));
        uint64_t bad = rsvd;
        if (level >= 4)
            bad |= EPT_RSVD_UPPER;
        else if (!leaf)
            bad |= EPT_RSVD_TABLE;
        else if (level == 3)
            bad |= EPT_RSVD_1G;
        else if (level == 2)
            bad |= EPT_RSVD_2M;
        if (e & bad)
            return ept_exit(x, PTEMU_EXIT_EPT_MISCONFIG, gpa, 0, level);
        if (leaf) {
            uint32_t type = (uint32_t)(e >> PTEMU_EPT_MT_SHIFT) & 7;
            if (type == 2 || type == 3 || type == 7)
                return ept_exit(x, PTEMU_EXIT_EPT_MISCONFIG, gpa, 0, level);
        }
        rights &= rwx;
        if (leaf)
            break;
        table = e & addr_mask;
        level--;
    }
    if (rights_out)
        *rights_out = rights;
    if ((rights & need) != need)
        return ept_exit(x, PTEMU_EXIT_EPT_VIOLATION, gpa,
                        qual_access | qual_extra | ((uint64_t)rights << 3), 0);
    if ((x->eptp & PTEMU_EPTP_AD) && !x->no_ad) {
        /* SDM 29.3.5: A in every EPT entry used, D in the leaf on a write. */
        for (uint32_t i = 0; i < n; i++)
            ptemu_or16(x->host, epas[i], (uint16_t)PTEMU_EPT_A);
        if (access == PTEMU_ACC_WRITE)
            ptemu_or16(x->host, epas[n - 1], (uint16_t)PTEMU_EPT_D);
    }
    uint64_t size = 1ULL << ptemu_level_shift(level);
    *hpa = (e & addr_mask & ~(size - 1)) | (gpa & (size - 1));
    return 1;
}

int ptemu_ept_translate(ptemu_ept *ept, uint64_t gpa, uint32_t access, uint64_t *hpa)
{
    if (access > PTEMU_ACC_FETCH)
        return 0;
    ept->pending = 0;
    return ptemu_ept_walk(ept, gpa, access, 0, hpa, NULL);
}

uint8_t *ptemu_word_ept(const ptemu_mem *m, uint64_t gpa, uint32_t access)
{
    uint64_t hpa;
    uint32_t extra = PTEMU_EQ_GLA_VALID;
    /* Paging-structure accesses with EPT A/D on count as writes; an EPT
     * violation on one sets both bit 0 and bit 1 of the exit qualification
     * (SDM 29.3.3.2 and the note to table 28-7). */
    if (access == PTEMU_ACC_READ && (m->ept->eptp & PTEMU_EPTP_AD)) {
        access = PTEMU_ACC_WRITE;
        extra |= PTEMU_EQ_READ;
    }
    if (!ptemu_ept_walk(m->ept, gpa, access, extra, &hpa, NULL))
        return 0;
    const ptemu_mem *h = m->ept->host;
    if (h->size < 8 || hpa > h->size - 8)
        return 0;
    return h->base + hpa;
}
