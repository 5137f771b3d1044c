/*
 * physmap.c -- sparse physical memory: the segment map of an image file.
 *
 * A real memory dump is not one run of bytes from physical address 0.  A
 * QEMU `dump-guest-memory` ELF core of a PC holds RAM below the PCI hole,
 * the BIOS just under 4 GiB and RAM again from 4 GiB; its first segment
 * starts at a file offset such as 0x498, which no page-aligned mapping can
 * start at.  Copying such an image into one zero-filled array costs the
 * whole of guest RAM in time and resident memory before the first walk.
 *
 * Instead Python maps the file once (copy-on-write unless the caller asks to
 * write through) and hands C this table, sorted by physical address:
 *
 *     physical                                     host
 *     0x000000000 +-----------+  segs[0] ------->  file mapping + 0x498
 *                 |    RAM    |
 *     0x0c0000000 +-----------+
 *                 |   (hole)  |   no segment: outside memory
 *     0x0fffc0000 +-----------+  segs[1] ------->  file mapping + ...
 *                 |   BIOS    |
 *     0x100000000 +-----------+  segs[2] ------->  file mapping + ...
 *                 |    RAM    |
 *                 +-----------+  segs[3] ------->  zero-filled memory
 *                 | (p_memsz  |                    (ELF p_memsz > p_filesz)
 *                 |  past the |
 *                 |  file)    |
 *                 +-----------+
 *
 * Such a ptemu_mem has size 0: ptemu_word_acc() (ptemu.h) tests the bounds of
 * plain memory first and comes here only when that test refuses, so plain
 * memory pays nothing for this file, and any path that reads base/size
 * directly sees no memory at all -- never the wrong bytes.
 *
 * Resident memory grows only with the pages walks touch: the OS reads a page
 * of the file when a load first reaches it, and copies it only when an A/D
 * update first writes it.
 *
 * No last-hit cache: a ptemu_mem may be shared by Mmus in several threads
 * (cffi releases the GIL), and a dump has a handful of segments, so the
 * binary search is two or three compares.
 */
#include "ptemu.h"

/* A word is inside memory only when all 8 bytes are inside one segment: a
 * word that straddles two segments, or a segment and a hole, is outside
 * (paging-structure entries are 8-byte aligned, so this only matters for a
 * segment boundary that is not). */
uint8_t *ptemu_physmap_word(const ptemu_mem *m, uint64_t pa)
{
    const ptemu_seg *s = m->segs;
    uint64_t lo = 0, hi = m->nseg;
    if (!hi || pa < s[0].pa)
        return 0;
    /* Invariant: s[lo].pa <= pa, and hi == nseg or s[hi].pa > pa. */
    while (hi - lo > 1) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (s[mid].pa <= pa)
            lo = mid;
        else
            hi = mid;
    }
    uint64_t off = pa - s[lo].pa;
    if (s[lo].size < 8 || off > s[lo].size - 8)
        return 0;
    return s[lo].host + off;
}

uint64_t ptemu_mem_gather64(const ptemu_mem *mem, const uint64_t *pa, uint64_t n,
                            uint64_t *out)
{
    uint64_t outside = 0;
    for (uint64_t i = 0; i < n; i++) {
        /* Behind an EPT a load is an EPT walk that may record an exit: a
         * listing must not, so that memory reads as outside. */
        const uint8_t *p = mem->ept ? 0 : ptemu_word(mem, pa[i]);
        if (p) {
            memcpy(&out[i], p, 8);
        } else {
            out[i] = 0;
            outside++;
        }
    }
    return outside;
}
