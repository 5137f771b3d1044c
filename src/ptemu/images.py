"""Physical-memory images: raw, QEMU `dump-guest-memory` ELF cores, LiME.

    open_image(path, writable=False) -> PhysicalMemory

The format is told by magic, not by file name:

    b"\\x7fELF"   ELF64 core (QEMU `dump-guest-memory` without -z/-l/-s/-w):
                 every PT_LOAD segment holds guest RAM at p_paddr;
                 p_filesz bytes from p_offset, zeros up to p_memsz.
    b"EMiL"      LiME (0x4C694D45 as a little-endian u32): a run of 32-byte
                 range headers, each followed by e_addr - s_addr + 1 bytes.
    otherwise    raw: byte i of the file is physical address i.

A raw image is memory-mapped (PhysicalMemory.from_file).  An ELF or LiME
image is memory-mapped too when its ranges tile physical memory from 0 with
no gap and lie back to back in the file (then one np.memmap at the first
range's offset *is* physical memory); otherwise the ranges are copied into
zero-filled memory, which only private copies allow (writable=False).

Physical addresses above the ranges' end do not exist; gaps between ranges
read as zeros.  Everything malformed raises ImageError, with the path and
what is wrong.
"""
import os
import struct

import numpy as np

from ptemu._native import ImageError, InvalidInput
from ptemu.memory import PhysicalMemory

__all__ = ["open_image", "read_elf_ranges", "read_lime_ranges", "image_format",
           "ELF_MAGIC", "LIME_MAGIC"]

ELF_MAGIC = b"\x7fELF"
LIME_MAGIC = 0x4C694D45
LIME_VERSION = 1

# Elf64_Ehdr fields used (System V gABI): e_ident[16], e_type, e_machine,
# e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize, e_phentsize,
# e_phnum, e_shentsize, e_shnum, e_shstrndx.
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
# Elf64_Phdr: p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
_PHDR = struct.Struct("<IIQQQQQQ")
# Elf64_Shdr up to sh_info (for PN_XNUM): name, type, flags, addr, offset, size, link, info
_SHDR_HEAD = struct.Struct("<IIQQQQII")
# lime_mem_range_header: magic, version, s_addr, e_addr, reserved[8]
_LIME = struct.Struct("<IIQQ8s")

_PT_LOAD = 1
_PN_XNUM = 0xFFFF
_ELFCLASS64 = 2
_ELFDATA2LSB = 1


def image_format(path):
    """'elf', 'lime' or 'raw', from the file's first bytes."""
    with _open(path) as f:
        head = f.read(4)
    if head == ELF_MAGIC:
        return "elf"
    if len(head) == 4 and struct.unpack("<I", head)[0] == LIME_MAGIC:
        return "lime"
    return "raw"


def open_image(path, writable=False):
    """A PhysicalMemory for the image at `path` (raw, ELF core or LiME).

    writable=False (the default): A/D updates go to a private copy.
    writable=True writes them through to the file; for ELF and LiME that
    needs the single-mapping layout (see the module docstring).
    """
    path = os.fspath(path)
    fmt = image_format(path)
    if fmt == "raw":
        return PhysicalMemory.from_file(path, writable=writable)
    size = os.stat(path).st_size
    with _open(path) as f:
        ranges = read_elf_ranges(f, size, path) if fmt == "elf" else \
            read_lime_ranges(f, size, path)
    return _memory_from_ranges(path, ranges, writable, fmt)


def _open(path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ImageError("image %s: no such file" % path) from None
    except IsADirectoryError:
        raise ImageError("image %s: not a regular file" % path) from None
    except OSError as exc:
        raise ImageError("image %s: %s" % (path, exc.strerror or exc)) from None


def _read_exact(f, offset, n, path, what):
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise ImageError("image %s is truncated: the %s at offset %#x needs %d bytes, "
                         "the file ends after %d" % (path, what, offset, n, len(data)))
    return data


def read_elf_ranges(f, file_size, path="<elf>"):
    """[(paddr, offset, filesz, memsz)] of an ELF64 core's PT_LOAD segments.

    Raises ImageError for anything but a little-endian ELF64 file, and for
    a segment whose file bytes extend past the end of the file.
    """
    eh = _EHDR.unpack(_read_exact(f, 0, _EHDR.size, path, "ELF header"))
    ident, e_phoff, e_shoff, e_phentsize, e_phnum = eh[0], eh[5], eh[6], eh[9], eh[10]
    if ident[:4] != ELF_MAGIC:
        raise ImageError("image %s is not an ELF file" % path)
    if ident[4] != _ELFCLASS64:
        raise ImageError("image %s: only 64-bit ELF cores are supported (EI_CLASS=%d)"
                         % (path, ident[4]))
    if ident[5] != _ELFDATA2LSB:
        raise ImageError("image %s: only little-endian ELF cores are supported (EI_DATA=%d)"
                         % (path, ident[5]))
    if e_phnum == _PN_XNUM:
        # More program headers than e_phnum can hold (QEMU writes this for
        # many RAM blocks): the count is in section header 0's sh_info.
        if not e_shoff:
            raise ImageError("image %s: e_phnum is PN_XNUM but there is no section header"
                             % path)
        e_phnum = _SHDR_HEAD.unpack(_read_exact(f, e_shoff, _SHDR_HEAD.size, path,
                                                "section header 0"))[7]
    if e_phnum and e_phentsize < _PHDR.size:
        raise ImageError("image %s: e_phentsize %d is smaller than an Elf64_Phdr (%d)"
                         % (path, e_phentsize, _PHDR.size))
    table = _read_exact(f, e_phoff, e_phnum * e_phentsize, path, "program header table")
    ranges = []
    for i in range(e_phnum):
        p_type, _fl, off, _va, paddr, filesz, memsz, _al = _PHDR.unpack_from(
            table, i * e_phentsize)
        if p_type != _PT_LOAD or memsz == 0:
            continue
        if filesz > memsz:
            raise ImageError("image %s: PT_LOAD segment %d has p_filesz %#x > p_memsz %#x"
                             % (path, i, filesz, memsz))
        if off + filesz > file_size:
            raise ImageError("image %s is truncated: PT_LOAD segment %d (paddr %#x) needs "
                             "file bytes %#x..%#x but the file is %#x bytes"
                             % (path, i, paddr, off, off + filesz, file_size))
        ranges.append((paddr, off, filesz, memsz))
    if not ranges:
        raise ImageError("image %s: ELF file has no PT_LOAD segment (not a memory dump?)"
                         % path)
    return ranges


def read_lime_ranges(f, file_size, path="<lime>"):
    """[(paddr, offset, filesz, memsz)] of a LiME file's ranges (e_addr inclusive)."""
    ranges = []
    pos = 0
    while pos < file_size:
        magic, version, s_addr, e_addr, _res = _LIME.unpack(
            _read_exact(f, pos, _LIME.size, path, "LiME range header"))
        if magic != LIME_MAGIC:
            raise ImageError("image %s: bad LiME magic %#x at offset %#x (expected %#x)"
                             % (path, magic, pos, LIME_MAGIC))
        if version != LIME_VERSION:
            raise ImageError("image %s: LiME header version %d at offset %#x is not supported "
                             "(only version 1)" % (path, version, pos))
        if e_addr < s_addr:
            raise ImageError("image %s: LiME range at offset %#x ends (%#x) before it starts "
                             "(%#x)" % (path, pos, e_addr, s_addr))
        n = e_addr - s_addr + 1
        data = pos + _LIME.size
        if data + n > file_size:
            raise ImageError("image %s is truncated: LiME range %#x..%#x needs file bytes "
                             "%#x..%#x but the file is %#x bytes"
                             % (path, s_addr, e_addr, data, data + n, file_size))
        ranges.append((s_addr, data, n, n))
        pos = data + n
    if not ranges:
        raise ImageError("image %s: LiME file holds no range" % path)
    return ranges


def _memory_from_ranges(path, ranges, writable, fmt):
    ranges = sorted(ranges)
    for (pa0, _o0, _f0, m0), (pa1, _o1, _f1, _m1) in zip(ranges, ranges[1:]):
        if pa0 + m0 > pa1:
            raise ImageError("image %s: ranges at physical %#x and %#x overlap" % (path, pa0, pa1))
    end = ranges[-1][0] + ranges[-1][3]
    size = (end + 7) & ~7           # PhysicalMemory holds whole 8-byte words

    # One mapping is possible when physical memory 0..end is exactly the
    # file bytes first_offset..first_offset+end: ranges start at 0, are fully
    # backed by the file, and are back to back both in memory and in the file.
    single = ranges[0][0] == 0 and size == end and all(
        fs == ms for _pa, _off, fs, ms in ranges) and all(
        a[0] + a[3] == b[0] and a[1] + a[2] == b[1] for a, b in zip(ranges, ranges[1:]))
    if single:
        try:
            arr = np.memmap(path, dtype=np.uint8, mode="r+" if writable else "c",
                            offset=ranges[0][1], shape=(size,))
        except (OSError, ValueError) as exc:
            raise ImageError("image %s: cannot map it: %s" % (path, exc)) from None
        mem = PhysicalMemory.from_array(arr)
        mem.path = path
        return mem
    if writable:
        raise InvalidInput("image %s: writable=True needs %s ranges that tile physical memory "
                           "from 0 back to back in the file; this one must be copied, so it "
                           "opens read-only (writable=False)" % (path, fmt.upper()))
    try:
        arr = np.zeros(size, dtype=np.uint8)
    except (MemoryError, ValueError):
        raise ImageError("image %s: physical memory up to %#x is too large to build" %
                         (path, end)) from None
    try:
        src = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise ImageError("image %s: cannot map it: %s" % (path, exc)) from None
    for pa, off, filesz, _memsz in ranges:
        arr[pa:pa + filesz] = src[off:off + filesz]
    del src
    mem = PhysicalMemory.from_array(arr)
    mem.path = path
    return mem

