"""Memory images: raw files, QEMU dump-guest-memory ELF cores, LiME.

ELF layouts follow the System V gABI (Elf64_Ehdr / Elf64_Phdr, PT_LOAD = 1,
PN_XNUM = 0xffff with the count in section header 0's sh_info); QEMU's
dump-guest-memory writes guest RAM as PT_LOAD segments at p_paddr.  LiME
follows its "Memory Range Header Version 1" spec (magic 0x4C694D45, e_addr
inclusive).  Every image here is built by hand with struct.
"""
import struct

import numpy as np
import pytest

import ptemu
from ptemu import images
from ptemu.images import open_image

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


# ---- ELF ------------------------------------------------------------------------

def test_elf_two_segments_with_a_gap_are_copied(tmp_path):
    # RAM below a hole and above it, as QEMU dumps a PC with a PCI hole.
    low, high = pattern(0x2000, 1), pattern(0x1000, 2)
    path = tmp_path / "core.elf"
    path.write_bytes(build_elf([
        (PT_NOTE, 0, b"CORE" * 8, 32, 0x200),             # not memory
        (PT_LOAD, 0x0, low, 0x2000, 0x1000),
        (PT_LOAD, 0x10000, high, 0x2000, 0x3000),         # p_memsz > p_filesz: zeros
    ]))
    mem = open_image(path)
    assert mem.size == 0x12000
    assert mem.read(0, 0x2000) == low
    assert mem.read(0x2000, 0xE000) == bytes(0xE000)      # the gap reads as zeros
    assert mem.read(0x10000, 0x1000) == high
    assert mem.read(0x11000, 0x1000) == bytes(0x1000)
    assert mem.path == str(path)
    with pytest.raises(ptemu.InvalidInput, match="writable"):
        open_image(path, writable=True)


def test_elf_back_to_back_segments_are_one_mapping(tmp_path):
    a, b = pattern(0x1000, 3), pattern(0x2000, 4)
    path = tmp_path / "core.elf"
    path.write_bytes(build_elf([(PT_LOAD, 0x1000, b, 0x2000, 0x2000),
                                (PT_LOAD, 0x0, a, 0x1000, 0x1000)]))
    mem = open_image(path)
    assert isinstance(mem.array, np.memmap) and mem.size == 0x3000
    assert mem.read(0, 0x3000) == a + b
    before = path.read_bytes()
    mem.write_u64(0, 1)                                   # private copy
    assert path.read_bytes() == before
    wmem = open_image(path, writable=True)
    wmem.write_u64(0x1000, 0x0102030405060708)
    wmem.flush()
    assert path.read_bytes()[0x2000:0x2008] == bytes([8, 7, 6, 5, 4, 3, 2, 1])


def test_elf_pn_xnum(tmp_path):
    # e_phnum = PN_XNUM: the real count is sh_info of section header 0.
    path = tmp_path / "core.elf"
    path.write_bytes(build_elf([(PT_LOAD, 0x0, pattern(0x1000, 5), 0x1000, 0x1000),
                                (PT_LOAD, 0x3000, pattern(0x1000, 6), 0x1000, 0x2000)],
                               xnum=True))
    mem = open_image(path)
    assert mem.size == 0x4000
    assert mem.read(0x3000, 0x1000) == pattern(0x1000, 6)


def test_truncated_elf_segment(tmp_path):
    data = build_elf([(PT_LOAD, 0, pattern(0x2000, 1), 0x2000, 0x1000)])
    path = tmp_path / "core.elf"
    path.write_bytes(data[:0x2800])                       # segment needs up to 0x3000
    with pytest.raises(ptemu.ImageError, match=r"truncated.*PT_LOAD segment 0.*0x3000"):
        open_image(path)


def test_truncated_elf_headers(tmp_path):
    path = tmp_path / "core.elf"
    path.write_bytes(b"\x7fELF" + bytes(20))
    with pytest.raises(ptemu.ImageError, match="truncated.*ELF header"):
        open_image(path)
    full = build_elf([(PT_LOAD, 0, bytes(8), 8, 0x1000)] * 3)
    path.write_bytes(full[:64 + 56 + 10])                 # program headers cut short
    with pytest.raises(ptemu.ImageError, match="program header table"):
        open_image(path)


def test_bad_elf_kinds(tmp_path):
    path = tmp_path / "x.elf"
    path.write_bytes(build_elf([(PT_LOAD, 0, bytes(8), 8, 0x1000)],
                               ident=b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8)))
    with pytest.raises(ptemu.ImageError, match="64-bit"):
        open_image(path)
    path.write_bytes(build_elf([(PT_NOTE, 0, bytes(8), 8, 0x1000)]))
    with pytest.raises(ptemu.ImageError, match="no PT_LOAD"):
        open_image(path)
    path.write_bytes(build_elf([(PT_LOAD, 0, bytes(0x1000), 0x1000, 0x1000),
                                (PT_LOAD, 0x800, bytes(0x1000), 0x1000, 0x2000)]))
    with pytest.raises(ptemu.ImageError, match="overlap"):
        open_image(path)


def test_elf_image_walks(tmp_path):
    # A 4-level walk (SDM 4.5) over tables that live in the second segment.
    P, W = 1, 2
    hi = bytearray(0x4000)                                # paddr 0x100000..0x104000
    for i, (off, val) in enumerate([(0x0000, 0x101000 | P | W), (0x1000, 0x102000 | P | W),
                                    (0x2000, 0x103000 | P | W), (0x3000 + 8 * 5, 0x7000 | P)]):
        struct.pack_into("<Q", hi, off, val)
    path = tmp_path / "core.elf"
    path.write_bytes(build_elf([(PT_LOAD, 0, pattern(0x8000, 9), 0x8000, 0x1000),
                                (PT_LOAD, 0x100000, bytes(hi), 0x4000, 0x9000)]))
    mmu = ptemu.Mmu(open_image(path), ptemu.CpuState.long_mode(cr3=0x100000))
    assert mmu.translate(0x5123).pa == 0x7123


# ---- LiME -----------------------------------------------------------------------

def test_lime_two_ranges(tmp_path):
    a, b = pattern(0x1000, 11), pattern(0x2000, 12)
    path = tmp_path / "mem.lime"
    path.write_bytes(lime_range(0x0, a) + lime_range(0x4000, b))
    mem = open_image(path)
    assert mem.size == 0x6000                             # e_addr 0x5fff inclusive
    assert mem.read(0, 0x1000) == a
    assert mem.read(0x1000, 0x3000) == bytes(0x3000)
    assert mem.read(0x4000, 0x2000) == b


def test_lime_adjacent_ranges_and_single_range(tmp_path):
    a, b = pattern(0x1000, 13), pattern(0x1000, 14)
    path = tmp_path / "mem.lime"
    path.write_bytes(lime_range(0x0, a) + lime_range(0x1000, b))
    mem = open_image(path)
    # the second range's data is 32 header bytes after the first's: copied
    assert mem.read(0, 0x2000) == a + b
    assert not isinstance(mem.array, np.memmap)
    path.write_bytes(lime_range(0x0, a + b))
    mem = open_image(path)
    # one range from 0: the file after the header is physical memory
    assert isinstance(mem.array, np.memmap) and mem.read(0, 0x2000) == a + b


def test_lime_errors(tmp_path):
    path = tmp_path / "mem.lime"
    path.write_bytes(lime_range(0, bytes(0x1000), version=2))
    with pytest.raises(ptemu.ImageError, match="version 2"):
        open_image(path)
    path.write_bytes(lime_range(0, bytes(0x1000))[:0x800])
    with pytest.raises(ptemu.ImageError, match="truncated"):
        open_image(path)
    path.write_bytes(lime_range(0, bytes(0x1000)) + b"junkjunkjunkjunkjunkjunkjunkjunk")
    with pytest.raises(ptemu.ImageError, match="bad LiME magic"):
        open_image(path)
