"""Write a small dump laid out as QEMU's `dump-guest-memory` writes a PC guest.

    python examples/make_dump.py core.elf

RAM at 0..2 MiB (at a file offset that is not page aligned, as in QEMU's
dumps), a hole, 2 MiB of RAM at 4 GiB holding the page tables, and one vCPU
note (QEMUCPUState) with CR0, CR3 and CR4; the file is sparse.  Then try
`ptemu info core.elf`, `ptemu tlb core.elf`, `ptemu gva2gpa core.elf 0x401234`.
"""
import struct
import sys

import ptemu
from ptemu.pagetable import PageTableBuilder

GiB = 1 << 30
P, W, U, G, NX = ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_G, ptemu.PTE_NX
RANGES = [(0, 2 << 20), (4 * GiB, 2 << 20)]           # (physical address, size)

mem = ptemu.PhysicalMemory(4 * GiB + (2 << 20))        # zero pages cost nothing
b = PageTableBuilder(mem, table_start=4 * GiB, table_end=4 * GiB + (1 << 20))
b.map(0x400000, 0x100000, flags=P | U)                            # user code
b.map(0x7FFFFFFDE000, 0x101000, flags=P | W | U | NX)             # user stack
b.map(0xFFFFFFFF80000000, 0, 2 << 20, flags=P | W | G)            # kernel text, 2 MiB

# QEMUCPUState version 1 (QEMU target/i386/arch_dump.c): version, size, 18
# registers, 10 segments of 24 bytes, cr[0..4].
state = struct.pack("<II18Q", 1, 432, *[0] * 16, 0xFFFFFFFF81000000, 2) + bytes(240) + \
    struct.pack("<5Q", 0x80050033, 0, 0, b.cr3, 0x3606E0)
note = struct.pack("<III", 5, len(state), 0) + b"QEMU\0\0\0\0" + state
phoff, nph = 64, 1 + len(RANGES)
note_at = phoff + 56 * nph
data_at = note_at + len(note)                          # 0x... not page aligned
with open(sys.argv[1] if len(sys.argv) > 1 else "core.elf", "wb") as f:
    f.write(struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 4, 62, 1, 0,
                        phoff, 0, 0, 64, 56, nph, 0, 0, 0))
    f.write(struct.pack("<IIQQQQQQ", 4, 0, note_at, 0, 0, len(note), 0, 0))
    off = data_at
    for pa, size in RANGES:
        f.write(struct.pack("<IIQQQQQQ", 1, 7, off, 0, pa, size, size, 0))
        off += size
    f.write(note)
    off = data_at
    for pa, size in RANGES:
        for page in range(pa, pa + size, 4096):        # only the pages that hold data
            chunk = mem.array[page:page + 4096]
            if chunk.any():
                f.seek(off + page - pa)
                f.write(chunk.tobytes())
        off += size
    f.truncate(off)
