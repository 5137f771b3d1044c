/*
 * bits.h -- architectural bit layouts the walker derives its masks from.
 * Public single-bit constants are in ptemu_cdef.h; these are the composite
 * masks, each under the entry format it comes from (after Bochs's paging.cc).
 */
#ifndef PTEMU_BITS_H
#define PTEMU_BITS_H

/*
 * 4-level / 5-level paging entry (SDM 4.5, tables 4-15 .. 4-20)
 *
 *  63  62:59  58:52   51:M      M-1:12      11:9  8  7  6  5  4   3  2  1  0
 * +--+------+------+--------+--------------+----+--+--+--+--+---+---+--+--+--+
 * |XD| PKEY |ignored|reserved| address      |ign |G |PS|D |A |PCD|PWT|US|RW|P |
 * +--+------+------+--------+--------------+----+--+--+--+--+---+---+--+--+--+
 *  XD is reserved when EFER.NXE=0; PKEY is ignored outside leaves and when
 *  neither CR4.PKE nor CR4.PKS is set.  PS is reserved in PML5E and PML4E.
 */
#define PTEMU_BITS_51_0     0x000fffffffffffffULL

/*
 * Large leaves: bit 12 is PAT, then reserved bits up to the frame address.
 *
 *  1 GiB PDPTE:  51:M | M-1:30 frame | 29:13 reserved | 12 PAT | 11:0 flags
 *  2 MiB PDE:    51:M | M-1:21 frame | 20:13 reserved | 12 PAT | 11:0 flags
 */
#define PTEMU_RSVD_1G       0x000000003fffe000ULL   /* bits 29:13 */
#define PTEMU_RSVD_2M       0x00000000001fe000ULL   /* bits 20:13 */

/* Bits 51:M of an entry (M = MAXPHYADDR, 12 < M <= 52). */
static inline uint64_t ptemu_rsvd_phys(uint32_t maxphyaddr)
{
    return PTEMU_BITS_51_0 & ~((1ULL << maxphyaddr) - 1);
}

/* Bits M-1:12: where a table or frame address sits in an entry or CR3. */
static inline uint64_t ptemu_addr_mask(uint32_t maxphyaddr)
{
    return ((1ULL << maxphyaddr) - 1) & ~0xfffULL;
}

#endif
