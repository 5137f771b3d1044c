"""Memory images: raw files, QEMU dump-guest-memory ELF cores, LiME.

ELF layouts follow the System V gABI (Elf64_Ehdr / Elf64_Phdr, PT_LOAD = 1,
PN_XNUM = 0xffff with the count in section header 0's sh_info); QEMU's
dump-guest-memory writes guest RAM as PT_LOAD segments at p_paddr and its
vCPU state as notes (target/i386/arch_dump.c, see tests/elfcore.py).  LiME
follows its "Memory Range Header Version 1" spec (magic 0x4C694D45, e_addr
inclusive).  Every image here is built by hand with struct; big ones are
sparse files (only the pages written take disk).

A physical address in no range is nonexistent memory: a walk that reads a
paging-structure entry there ends in the defined bus fault (#PF with P and
RSVD, SDM 4.7, cause "outside-memory"; docs/bad-input.md section 1).
"""
import hashlib
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ptemu
from ptemu import images
from ptemu.images import open_image
from ptemu.pagetable import PageTableBuilder, info_tlb, info_mem

import elfcore
from elfcore import write_elf, write_lime, qemu_notes

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
SHDR = struct.Struct("<IIQQQQIIQQ")
PT_LOAD, PT_NOTE = 1, 4


def pattern(n, seed):
    return (np.arange(n, dtype=np.uint32) * 2654435761 + seed).astype(np.uint8).tobytes()


def build_elf(segments, ident=None, xnum=False, pad_to=None):
    """segments: [(p_type, paddr, data, memsz, offset)]; data lands at offset."""
    n = len(segments)
    phoff = 64
    shoff = 0
    if xnum:
        shoff = phoff + n * PHDR.size
    e_ident = ident or (b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8))
    hdr = EHDR.pack(e_ident, 4, 62, 1, 0, phoff, shoff, 0, 64, PHDR.size,
                    0xFFFF if xnum else n, SHDR.size if xnum else 0, 1 if xnum else 0, 0)
    out = bytearray(hdr)
    for (ptype, paddr, data, memsz, off) in segments:
        out += PHDR.pack(ptype, 4, off, 0, paddr, len(data), memsz, 0)
    if xnum:
        out += SHDR.pack(0, 0, 0, 0, 0, 0, 0, n, 0, 0)
    for (_t, _pa, data, _m, off) in segments:
        if len(out) < off + len(data):
            out += bytes(off + len(data) - len(out))
        out[off:off + len(data)] = data
    if pad_to and len(out) < pad_to:
        out += bytes(pad_to - len(out))
    return bytes(out)


def lime_range(start, data, version=1, magic=0x4C694D45):
    return struct.pack("<IIQQ8s", magic, version, start, start + len(data) - 1, bytes(8)) + data


# ---- raw ------------------------------------------------------------------------

def test_raw_image_maps_the_file_read_only(tmp_path):
    data = pattern(0x3000, 7)
    path = tmp_path / "ram.img"
    path.write_bytes(data)
    mem = open_image(path)
    assert isinstance(mem, ptemu.PhysicalMemory) and mem.size == 0x3000
    assert isinstance(mem.array, np.memmap)
    assert mem.read(0x1234, 16) == data[0x1234:0x1244]
    mem.write_u64(0x2000, 0x1122334455667788)        # copy-on-write: not in the file
    assert mem.read_u64(0x2000) == 0x1122334455667788
    assert path.read_bytes() == data


def test_raw_image_writable_writes_through(tmp_path):
    path = tmp_path / "ram.img"
    path.write_bytes(bytes(0x1000))
    mem = open_image(path, writable=True)
    mem.write_u64(8, 0xAABB)
    mem.flush()
    assert path.read_bytes()[8:10] == b"\xbb\xaa"


def test_missing_and_truncated_raw(tmp_path):
    with pytest.raises(ptemu.ImageError, match="no such file"):
        open_image(tmp_path / "nope.img")
    (tmp_path / "odd.img").write_bytes(bytes(0x1001))
    with pytest.raises(ptemu.ImageError, match="4 KiB"):
        open_image(tmp_path / "odd.img")
    with pytest.raises(ptemu.ImageError):
        open_image(tmp_path)                           # a directory


def test_format_detection_by_magic(tmp_path):
    (tmp_path / "a.bin").write_bytes(build_elf([(PT_LOAD, 0, bytes(16), 16, 0x1000)]))
    (tmp_path / "b.elf").write_bytes(lime_range(0, bytes(16)))
    (tmp_path / "c.lime").write_bytes(bytes(4096))
    assert images.image_format(tmp_path / "a.bin") == "elf"
    assert images.image_format(tmp_path / "b.elf") == "lime"
    assert images.image_format(tmp_path / "c.lime") == "raw"


# ---- ELF: the layouts real dumps have ---------------------------------------------

GiB = 1 << 30
P, W, U, PS, NX = 1, 2, 4, 0x80, 1 << 63


def digest(path):
    """The file's first MiB (where every test writes), its size and mtime."""
    st_ = os.stat(path)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(1 << 20)).hexdigest(), st_.st_size, st_.st_mtime_ns


def test_elf_hole_unaligned_offset_and_zero_tail(tmp_path):
    # RAM at a file offset that is not page aligned (QEMU: 0x498), a hole,
    # the BIOS below 4 GiB, RAM above 4 GiB whose p_memsz > p_filesz.
    low, bios, high = pattern(0x3000, 1), pattern(0x1000, 2), pattern(0x2000, 3)
    path = write_elf(tmp_path / "core.elf",
                     [(0, 0x498, 0x3000, 0x3000), (0xFFFC0000, 0x3498, 0x1000, 0x1000),
                      (4 * GiB, 0x4498, 0x2000, 0x5000)],
                     pokes=[(0x498, low), (0x3498, bios), (0x4498, high)])
    before = digest(path)
    mem = open_image(path)
    assert mem.sparse and mem.format == "elf" and mem.size == 4 * GiB + 0x5000
    assert mem.ranges() == [(0, 0x3000), (0xFFFC0000, 0xFFFC1000), (4 * GiB, 4 * GiB + 0x5000)]
    assert mem.read(0, 0x3000) == low and mem.read(0xFFFC0000, 0x1000) == bios
    assert mem.read(4 * GiB, 0x2000) == high
    assert mem.read(4 * GiB + 0x2000, 0x3000) == bytes(0x3000)      # p_memsz past p_filesz
    assert mem.read_u64(0x2FF8) == struct.unpack("<Q", low[-8:])[0]
    assert mem.read_u64(4 * GiB + 0x1FFC) == struct.unpack("<Q", high[-4:] + bytes(4))[0]
    for pa, n in ((0x3000, 8), (0x2FF8, 16), (0xFFFBFFF8, 8), (4 * GiB + 0x5000, 1)):
        with pytest.raises(ptemu.InvalidInput, match="hole|outside"):
            mem.read(pa, n)
    with pytest.raises(ptemu.InvalidInput, match="hole|outside"):
        mem.read_u64(0x10000)
    with pytest.raises(ptemu.InvalidInput, match="sparse"):
        mem.array
    segs = mem.segments
    assert [(s.pa, s.size, s.backed) for s in segs] == [
        (0, 0x3000, True), (0xFFFC0000, 0x1000, True), (4 * GiB, 0x2000, True),
        (4 * GiB + 0x2000, 0x3000, False)]
    assert segs[0].array[:16].tobytes() == low[:16]
    # Private copy-on-write: the write is seen here, never in the file.
    mem.write_u64(8, 0x1122334455667788)
    mem.write(4 * GiB + 0x1FFC, b"\xAA" * 8)                   # across file bytes and zeros
    assert mem.read_u64(8) == 0x1122334455667788
    assert mem.read(4 * GiB + 0x1FFC, 8) == b"\xAA" * 8
    mem.flush()
    assert digest(path) == before


def test_elf_sparse_writable_writes_through(tmp_path):
    path = write_elf(tmp_path / "core.elf", [(0, 0x498, 0x2000, 0x2000),
                                             (0x10000, 0x2498, 0x1000, 0x1000)])
    mem = open_image(path, writable=True)
    assert mem.sparse
    mem.write_u64(0x10008, 0x0102030405060708)
    mem.flush()
    data = open(path, "rb").read()
    assert data[0x2498 + 8:0x2498 + 16] == bytes([8, 7, 6, 5, 4, 3, 2, 1])


def test_elf_back_to_back_segments_are_one_mapping(tmp_path):
    a, b = pattern(0x1000, 3), pattern(0x2000, 4)
    path = write_elf(tmp_path / "core.elf", [(0x1000, 0x2000, 0x2000, 0x2000),
                                             (0x0, 0x1000, 0x1000, 0x1000)],
                     pokes=[(0x1000, a), (0x2000, b)])
    mem = open_image(path)
    assert not mem.sparse and isinstance(mem.array, np.memmap) and mem.size == 0x3000
    assert mem.read(0, 0x3000) == a + b
    before = digest(path)
    mem.write_u64(0, 1)                                   # private copy
    assert digest(path) == before
    wmem = open_image(path, writable=True)
    wmem.write_u64(0x1000, 0x0102030405060708)
    wmem.flush()
    assert open(path, "rb").read()[0x2000:0x2008] == bytes([8, 7, 6, 5, 4, 3, 2, 1])


def test_elf_pn_xnum(tmp_path):
    # e_phnum = PN_XNUM: the real count is sh_info of section header 0.
    path = tmp_path / "core.elf"
    path.write_bytes(build_elf([(PT_LOAD, 0x0, pattern(0x1000, 5), 0x1000, 0x1000),
                                (PT_LOAD, 0x3000, pattern(0x1000, 6), 0x1000, 0x2000)],
                               xnum=True))
    mem = open_image(path)
    assert mem.size == 0x4000
    assert mem.read(0x3000, 0x1000) == pattern(0x1000, 6)


def test_walk_into_a_hole_is_the_bus_fault(tmp_path):
    # PML4 at 0x1000 -> PDPT at 0x2000 whose entry 0 points at a PD in the
    # hole 0x10000..: that entry cannot be read -> #PF P|RSVD (SDM 4.7), as
    # for a table past the end of plain memory; entry 1 reaches a 1 GiB leaf.
    tables = bytearray(0x3000)
    struct.pack_into("<Q", tables, 0x1000, 0x2000 | P | W)
    struct.pack_into("<Q", tables, 0x2000, 0x10000 | P | W)
    struct.pack_into("<Q", tables, 0x2008, 0x40000000 | PS | P | W)
    path = write_elf(tmp_path / "core.elf", [(0, 0x498, 0x3000, 0x3000),
                                             (0x20000, 0x3498, 0x1000, 0x1000)],
                     pokes=[(0x498, bytes(tables))])
    mmu = ptemu.Mmu(open_image(path), ptemu.CpuState.long_mode(cr3=0x1000))
    with pytest.raises(ptemu.PageFault) as exc:
        mmu.translate(0x1234, "w")
    assert exc.value.error_code == ptemu.PF_P | ptemu.PF_RSVD | ptemu.PF_W
    assert exc.value.cause == "outside-memory" and exc.value.level == 2
    assert mmu.translate(GiB + 0x1234).pa == GiB + 0x1234
    res = mmu.translate_many(np.array([0x1234, GiB + 8], dtype=np.uint64))
    assert res.vector.tolist() == [14, 0] and res.error_code[0] == ptemu.PF_P | ptemu.PF_RSVD
    trace = np.zeros(2, dtype=ptemu.TRACE_DTYPE)
    trace["va"] = [GiB + 8, 0x1234]
    r = mmu.run(trace)
    assert r.index == 1 and r.error_code == ptemu.PF_P | ptemu.PF_RSVD


def _dump_pair(tmp_path, layout, tail=0):
    """Page tables built in plain memory, then written twice: as a raw image
    and as a sparse ELF holding only `layout` [(pa, size)] (the last range
    with `tail` zero bytes past its file part).  Returns (cr3, raw, elf)."""
    top = max(pa + n for pa, n in layout)
    mem = ptemu.PhysicalMemory(top)                     # calloc: only touched pages count
    rng = np.random.default_rng(11)
    b = PageTableBuilder(mem, table_start=layout[-1][0], table_end=layout[-1][0] + 0x100000)
    flags = [P, P | W, P | U, P | W | U | NX]
    for i in range(600):                                # 4 KiB pages over several tables
        va = (0x7F0000000000 + int(rng.integers(0, 1 << 26))) & ~0xFFF
        b.map(va, int(rng.integers(0, top >> 12)) << 12, flags=flags[i % 4])
    for i in range(8):
        b.map(0xFFFF888000000000 + i * (2 << 20), i << 21, 2 << 20, flags=P | W | NX)
    b.map(0xFFFFFFFF80000000 - GiB, 0, GiB, flags=P | W)
    raw = tmp_path / "mem.raw"
    with open(raw, "wb") as f:
        for pa, data in elfcore.memory_pokes(mem, layout):   # zeros elsewhere
            f.seek(pa)
            f.write(data)
        f.truncate(top)
    loads, pokes, off = [], [], 0x1003                  # odd offsets: any alignment
    for k, (pa, n) in enumerate(layout):
        fs = n - tail if k == len(layout) - 1 else n
        loads.append((pa, off, fs, n))
        pokes += [(off + p - pa, d) for p, d in elfcore.memory_pokes(mem, [(pa, fs)])]
        off += fs + 0x11
    elf = write_elf(tmp_path / "mem.elf", loads, pokes=pokes)
    return b.cr3, str(raw), elf


def test_listings_of_a_sparse_image_equal_the_raw_image(tmp_path):
    # RAM below the PCI hole, the BIOS, RAM above 4 GiB with the tables.
    layout = [(0, 0x200000), (0xFFFC0000, 0x40000), (4 * GiB, 0x400000)]
    cr3, raw, elf = _dump_pair(tmp_path, layout, tail=0x100000)
    out = []
    for path in (raw, elf):
        mem = open_image(path)
        mmu = ptemu.Mmu(mem, ptemu.CpuState.long_mode(cr3=cr3))
        maps = list(mmu.mappings())
        vas = np.array([m.va + 0x18 for m in maps], dtype=np.uint64)
        res = mmu.translate_many(vas, "w")
        out.append((info_tlb(mmu), info_mem(mmu), maps, res.pa.tolist(), res.vector.tolist()))
    assert open_image(elf).sparse and not open_image(raw).sparse
    assert len(out[0][2]) > 600 and out[0][0].count("\n") == len(out[0][2])
    assert out[0] == out[1]


def test_elf_notes_several_vcpus_and_a_newer_cpustate(tmp_path):
    cpus = [dict(cr0=0x80050033, cr3=0x1000, cr4=0x3606E0, cr2=0x7F00DEAD, rip=0xFFFFFFFF81000000),
            dict(cr0=0x80050033, cr3=0x5000 | 3, cr4=0x3626E0, rip=0x401000),
            # QEMU >= 7.2 appends kernel_gs_base; a later QEMU may append more.
            dict(cr0=0x80050033, cr3=0x2000, cr4=0x3606E0, size=440,
                 extra=struct.pack("<Q", 0xFFFF888100000000)),
            dict(cr0=0x11, cr3=0, cr4=0, size=512)]
    path = write_elf(tmp_path / "core.elf", [(0, 0x2000, 0x10000, 0x10000)],
                     notes=qemu_notes(cpus))
    mem = open_image(path)
    assert [(c.index, c.pid, c.cr0, c.cr3, c.cr4, c.note_size) for c in mem.cpus] == [
        (0, 1, 0x80050033, 0x1000, 0x3606E0, 432), (1, 2, 0x80050033, 0x5003, 0x3626E0, 432),
        (2, 3, 0x80050033, 0x2000, 0x3606E0, 440), (3, 4, 0x11, 0, 0, 512)]
    assert mem.cpus[0].cr2 == 0x7F00DEAD and mem.cpus[0].regs["rip"] == 0xFFFFFFFF81000000
    assert mem.cpus[2].kernel_gs_base == 0xFFFF888100000000 and mem.cpus[0].kernel_gs_base is None
    assert mem.cpus[1].segments["cs"][0] == 0x10
    # EFER inferred (not in the notes): CR0.PG and CR4.PAE -> LME|LMA, and NXE.
    c0 = ptemu.CpuState.from_image(mem)
    assert (c0.cr0, c0.cr3, c0.cr4) == (0x80050033, 0x1000, 0x3606E0)
    assert c0.efer == ptemu.EFER_LME | ptemu.EFER_LMA | ptemu.EFER_NXE and c0.levels == 4
    c1 = ptemu.CpuState.from_image(mem, cpu=1)
    assert c1.cr3 == 0x5003 and c1.levels == 4           # CR4.PCIDE: PCID 3 stays in CR3
    c3 = ptemu.CpuState.from_image(mem, cpu=3)          # protected mode, paging off
    assert c3.levels == 0 and c3.efer == ptemu.EFER_NXE
    assert ptemu.CpuState.from_image(mem, efer=ptemu.EFER_LME).efer & ptemu.EFER_NXE == 0
    assert ptemu.CpuState.from_image(mem, cr3=0x9000).cr3 == 0x9000
    with pytest.raises(ptemu.InvalidInput, match="4 vCPUs.*no vCPU 4"):
        ptemu.CpuState.from_image(mem, cpu=4)
    with pytest.raises(ptemu.InvalidInput, match="no vCPU state"):
        ptemu.CpuState.from_image(ptemu.PhysicalMemory(4096))


def test_prstatus_without_qemu_note(tmp_path):
    path = write_elf(tmp_path / "core.elf", [(0, 0x1000, 0x1000, 0x1000)],
                     notes=elfcore.note(b"CORE", 1, elfcore.prstatus(1, {"rip": 0x1234})))
    mem = open_image(path)
    assert len(mem.cpus) == 1 and mem.cpus[0].cr3 is None and mem.cpus[0].regs["rip"] == 0x1234
    with pytest.raises(ptemu.InvalidInput, match="no QEMU note"):
        ptemu.CpuState.from_image(mem)


# ---- bad input: one ImageError naming the path and the problem; file untouched -------

def _bad(path, *fragments):
    before = digest(path)
    with pytest.raises(ptemu.ImageError) as exc:
        open_image(path)
    msg = str(exc.value)
    assert str(path) in msg and "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    assert digest(path) == before


@pytest.mark.parametrize("cpu, fragment", [
    (dict(cr3=0x1000, declared=440), "says QEMUCPUState is 440"),   # size field disagrees
    (dict(cr3=0x1000, size=400), "has 400 bytes"),                    # too short for v1
    (dict(cr3=0x1000, version=2), "version 2"),
])
def test_bad_qemu_note(tmp_path, cpu, fragment):
    version = cpu.pop("version", 1)
    desc = elfcore.qemu_cpustate(version=version, **cpu)
    path = write_elf(tmp_path / "core.elf", [(0, 0x1000, 0x1000, 0x1000)],
                     notes=elfcore.note(b"QEMU", 0, desc))
    _bad(path, "QEMU note", fragment)


def test_bad_prstatus_size_and_truncated_note(tmp_path):
    path = write_elf(tmp_path / "a.elf", [(0, 0x1000, 0x1000, 0x1000)],
                     notes=qemu_notes([dict(cr3=0x1000)], prstatus_size=300))
    _bad(path, "NT_PRSTATUS", "300 bytes")
    notes = qemu_notes([dict(cr3=0x1000)])
    path = write_elf(tmp_path / "b.elf", [(0, 0x1000, 0x1000, 0x1000)], notes=notes)
    # the PT_NOTE segment claims fewer bytes than its last note needs
    data = bytearray(open(path, "rb").read())
    ph = elfcore.PHDR.unpack_from(data, 64)
    elfcore.PHDR.pack_into(data, 64, *ph[:5], ph[5] - 8, *ph[6:])
    open(path, "wb").write(bytes(data))
    _bad(path, "runs past the end of its PT_NOTE segment")


def test_truncated_elf_segment(tmp_path):
    path = write_elf(tmp_path / "core.elf", [(0, 0x1000, 0x2000, 0x2000)], file_size=0x2800)
    _bad(path, "truncated", "PT_LOAD segment 0", "0x3000")
    big = write_elf(tmp_path / "big.elf", [(0, 0x1000, 0x1000, 0x1000),
                                           (4 * GiB, 0x2000, 4 * GiB, 4 * GiB)],
                    file_size=0x3000)
    _bad(big, "truncated", "PT_LOAD segment 1")
    notes = write_elf(tmp_path / "n.elf", [(0, 0x1000, 0x1000, 0x1000)],
                      notes=qemu_notes([{}]), note_offset=0x2000, file_size=0x2010)
    _bad(notes, "truncated", "PT_NOTE")


def test_oversized_notes_and_program_header_count(tmp_path):
    # A (sparse) file with a 1 GiB PT_NOTE: refused before anything is read.
    path = write_elf(tmp_path / "n.elf", [(0, 0x1000, 0x1000, 0x1000)], notes=b"x" * 12,
                     note_offset=0x2000, file_size=0x2000 + GiB)
    data = bytearray(open(path, "rb").read(0x1000))
    ph = elfcore.PHDR.unpack_from(data, 64)
    elfcore.PHDR.pack_into(data, 64, *ph[:5], GiB, *ph[6:])
    with open(path, "r+b") as f:
        f.write(bytes(data))
    _bad(path, "PT_NOTE segment 0 is 0x40000000 bytes")
    # e_phnum of 60000 entries: past the end of the file, refused unread.
    data[56:58] = struct.pack("<H", 60000)
    small = tmp_path / "p.elf"
    small.write_bytes(bytes(data) + bytes(0x1000))
    _bad(small, "truncated", "program header table (60000 entries")


def test_truncated_elf_headers(tmp_path):
    path = tmp_path / "core.elf"
    path.write_bytes(b"\x7fELF" + bytes(20))
    _bad(path, "truncated", "ELF header")
    full = build_elf([(PT_LOAD, 0, bytes(8), 8, 0x1000)] * 3)
    path.write_bytes(full[:64 + 56 + 10])                 # program headers cut short
    _bad(path, "program header table")


def test_bad_elf_kinds(tmp_path):
    path = tmp_path / "x.elf"
    path.write_bytes(build_elf([(PT_LOAD, 0, bytes(8), 8, 0x1000)],
                               ident=b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8)))
    _bad(path, "64-bit")
    path.write_bytes(build_elf([(PT_NOTE, 0, bytes(12), 12, 0x1000)]))
    _bad(path, "no PT_LOAD")
    write_elf(path, [(0, 0x1000, 0x1000, 0x1000), (0x800, 0x2000, 0x1000, 0x1000)])
    _bad(path, "overlap", "0x800")
    write_elf(path, [(4 * GiB, 0x1000, 0x1000, 0x3000), (4 * GiB + 0x2000, 0x2000, 0x10, 0x10)])
    _bad(path, "overlap")                                 # p_memsz reaches the next range


def test_elf_image_walks(tmp_path):
    # A 4-level walk (SDM 4.5) over tables that live in the second segment.
    hi = bytearray(0x4000)                                # paddr 0x100000..0x104000
    for off, val in [(0x0000, 0x101000 | P | W), (0x1000, 0x102000 | P | W),
                     (0x2000, 0x103000 | P | W), (0x3000 + 8 * 5, 0x7000 | P)]:
        struct.pack_into("<Q", hi, off, val)
    path = tmp_path / "core.elf"
    path.write_bytes(build_elf([(PT_LOAD, 0, pattern(0x8000, 9), 0x8000, 0x1000),
                                (PT_LOAD, 0x100000, bytes(hi), 0x4000, 0x9000)]))
    mmu = ptemu.Mmu(open_image(path), ptemu.CpuState.long_mode(cr3=0x100000))
    assert mmu.translate(0x5123).pa == 0x7123


def test_sparse_memory_is_no_host_of_a_view_or_an_ept(tmp_path):
    # Frame tables and EPTs address host memory as one array from 0.
    path = write_elf(tmp_path / "core.elf", [(0, 0x1498, 0x1000, 0x1000),
                                             (0x10000, 0x2498, 0x1000, 0x1000)])
    mem = open_image(path)
    with pytest.raises(ptemu.InvalidInput, match="plain PhysicalMemory"):
        ptemu.PhysicalMemory.view(mem, np.zeros(1, dtype=np.uint64))
    from ptemu.ept import Ept
    with pytest.raises(ptemu.InvalidInput, match="plain PhysicalMemory"):
        Ept(mem)


def test_from_file_opens_every_format(tmp_path):
    path = write_elf(tmp_path / "core.elf", [(0, 0x1498, 0x1000, 0x1000)],
                     notes=qemu_notes([dict(cr3=0x1000)]))
    mem = ptemu.PhysicalMemory.from_file(path)
    assert mem.format == "elf" and mem.cpus[0].cr3 == 0x1000 and mem.sparse is False
    write_lime(tmp_path / "m.lime", [(0x1000, 0x1000)])
    assert ptemu.PhysicalMemory.from_file(tmp_path / "m.lime").ranges() == [(0x1000, 0x2000)]


# ---- LiME -----------------------------------------------------------------------

def test_lime_ranges_with_holes_above_4g(tmp_path):
    a, b = pattern(0x1000, 11), pattern(0x2000, 12)
    path = tmp_path / "mem.lime"
    write_lime(path, [(0x0, 0x1000), (4 * GiB, 0x200000)],
               pokes=[(0, a), (4 * GiB + 0x1000, b)])
    mem = open_image(path)
    assert mem.sparse and mem.format == "lime" and mem.size == 4 * GiB + 0x200000
    assert mem.read(0, 0x1000) == a and mem.read(4 * GiB + 0x1000, 0x2000) == b
    with pytest.raises(ptemu.InvalidInput, match="hole"):
        mem.read(0x1000, 8)


def test_lime_adjacent_ranges_and_single_range(tmp_path):
    a, b = pattern(0x1000, 13), pattern(0x1000, 14)
    path = tmp_path / "mem.lime"
    path.write_bytes(lime_range(0x0, a) + lime_range(0x1000, b))
    mem = open_image(path)
    # the second range's data is 32 header bytes after the first's: two segments
    assert mem.read(0, 0x2000) == a + b and mem.sparse and mem.ranges() == [(0, 0x2000)]
    path.write_bytes(lime_range(0x0, a + b))
    mem = open_image(path)
    # one range from 0: the file after the header is physical memory
    assert isinstance(mem.array, np.memmap) and mem.read(0, 0x2000) == a + b


def test_lime_errors(tmp_path):
    path = tmp_path / "mem.lime"
    path.write_bytes(lime_range(0, bytes(0x1000), version=2))
    _bad(path, "version 2")
    path.write_bytes(lime_range(0, bytes(0x1000))[:0x800])
    _bad(path, "truncated")
    path.write_bytes(lime_range(0, bytes(0x1000)) + b"junkjunkjunkjunkjunkjunkjunkjunk")
    _bad(path, "bad LiME magic")
    path.write_bytes(elfcore.lime_header(0x2000, 0x1000) + bytes(0x1000))
    _bad(path, "ends (0x1000) before it starts (0x2000)")
    path.write_bytes(lime_range(0x1000, bytes(0x2000)) + lime_range(0x2000, bytes(0x1000)))
    _bad(path, "overlap")


# ---- the segment map against a model (hypothesis) ----------------------------------

@st.composite
def layouts(draw):
    """Ranges [(pa, file offset, filesz, memsz)] with holes, at any alignment,
    some with zero tails, and the file bytes they lie in."""
    n = draw(st.integers(1, 5))
    pa, off, out = draw(st.integers(0, 64)), draw(st.integers(0, 40)), []
    for _ in range(n):
        memsz = draw(st.integers(1, 300))
        filesz = memsz - draw(st.sampled_from([0, 0, 1, 7, 9, memsz]))
        filesz = max(0, filesz)
        out.append((pa, off, filesz, memsz))
        pa += memsz + draw(st.sampled_from([0, 0, 1, 8, 13, 1 << 32]))
        off += filesz + draw(st.sampled_from([0, 0, 3, 8]))
    file = np.frombuffer(draw(st.binary(min_size=off, max_size=off)), dtype=np.uint8).copy()
    return out, file


def _model(ranges, file):
    """byte address -> value, for every byte that exists."""
    m = {}
    for pa, off, fs, ms in ranges:
        for i in range(ms):
            m[pa + i] = int(file[off + i]) if i < fs else 0
    return m


@settings(max_examples=150, deadline=None)
@given(layouts(), st.data())
def test_segment_map_matches_a_byte_model(lay, data):
    ranges, file = lay
    mem = ptemu.PhysicalMemory._from_segments("<model>", ranges, _file=file.copy())
    model = _model(ranges, file)
    addrs = sorted(model)
    probes = [a + d for a in addrs[::7] + [r[0] for r in ranges] + [r[0] + r[3] for r in ranges]
              for d in (-9, -8, -1, 0, 1, 7)] + [data.draw(st.integers(0, 1 << 33))]
    probes = sorted({p for p in probes if p >= 0})
    got = mem.gather_u64(np.array(probes, dtype=np.uint64))
    for pa, g in zip(probes, got.tolist()):
        exists = all(pa + i in model for i in range(8))
        want = sum(model[pa + i] << (8 * i) for i in range(8)) if exists else None
        # The C core answers the word itself or "outside" (0), never other bytes:
        assert g in (0, want) if exists else g == 0, hex(pa)
        # ... and the word itself whenever it lies in one range's file part
        # or one range's zero tail (split at the word boundary, physmap.c).
        for rpa, _off, fs, ms in ranges:
            split = max(rpa, (rpa + fs) & ~7) if ms > fs else rpa + ms
            if rpa <= pa and pa + 8 <= split or split <= pa and pa + 8 <= rpa + ms:
                assert g == want, hex(pa)
        if exists:
            assert mem.read(pa, 8) == bytes((want >> (8 * i)) & 255 for i in range(8))
        else:
            with pytest.raises(ptemu.InvalidInput):
                mem.read(pa, 8)
