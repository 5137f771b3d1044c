"""Physical-memory images: raw, QEMU `dump-guest-memory` ELF cores, LiME.

    open_image(path, writable=False) -> PhysicalMemory   (= PhysicalMemory.from_file)

The format is told by magic, not by file name:

    b"\\x7fELF"   ELF64 core (QEMU `dump-guest-memory` without -z/-l/-s/-w):
                 every PT_LOAD segment holds guest RAM at p_paddr;
                 p_filesz bytes from p_offset, zeros up to p_memsz.  PT_NOTE
                 segments carry per vCPU an NT_PRSTATUS note ("CORE") and a
                 QEMUCPUState note ("QEMU", type 0) with CR0..CR4.
    b"EMiL"      LiME (0x4C694D45 as a little-endian u32): a run of 32-byte
                 range headers, each followed by e_addr - s_addr + 1 bytes.
    otherwise    raw: byte i of the file is physical address i.

Every format opens in O(1) -- the headers are read, the file is memory-mapped,
nothing is copied -- and resident memory grows only with the pages touched:

- raw, and an ELF/LiME image whose ranges tile memory from 0 back to back in
  the file: one np.memmap is physical memory (plain PhysicalMemory);
- any other ELF/LiME layout -- holes (a PC's PCI hole, RAM above 4 GiB),
  ranges at unaligned file offsets, p_memsz > p_filesz -- is sparse memory:
  one mapping of the file and a segment map the C core resolves on every
  physical access (csrc/physmap.c).  An address in no range is outside
  memory: a walk that reaches it takes the defined bus fault (#PF P|RSVD,
  cause "outside-memory"), read/write raise InvalidInput.

writable=False (the default) maps the file privately, copy-on-write: A/D
updates land in private copies of the touched pages, never in the file.
writable=True writes them through (the zero-filled tail of an ELF segment has
no file bytes and stays in memory).

`image.cpus` lists the vCPU register sets of an ELF core's notes (ImageCpu);
`CpuState.from_image(image, cpu=0)` makes one the paging state.

Everything malformed raises ImageError, with the path and what is wrong, and
the file is never written.
"""
import os
import struct

import numpy as np

from ptemu._files import open_input
from ptemu._native import ImageError, InvalidInput
from ptemu.memory import PhysicalMemory

__all__ = ["open_image", "read_elf_ranges", "read_elf", "read_lime_ranges", "image_format",
           "ImageCpu", "ELF_MAGIC", "LIME_MAGIC", "QEMU_CPUSTATE_SIZE"]

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

# Elf64_Nhdr: n_namesz, n_descsz, n_type; name and desc each padded to 4.
_NHDR = struct.Struct("<III")

_PT_LOAD = 1
_PT_NOTE = 4
_NT_PRSTATUS = 1
_PN_XNUM = 0xFFFF
# Notes are read whole; QEMU writes ~0.8 KiB per vCPU.  A bound keeps a
# hostile header from making open_image read gigabytes.
_MAX_NOTES = 64 << 20

# QEMU's target/i386/arch_dump.c, QEMUCPUState version 1: version, size, then
# rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags, ten QEMUCPUSegment
# (selector, limit, flags, pad: u32; base: u64) cs ds es fs gs ss ldt tr gdt
# idt, then cr[0..4]: 432 bytes.  Fields added later go at the end without a
# new version ("tools may identify their presence by checking size"): QEMU
# 7.2 appended kernel_gs_base (440 bytes).
_QEMU_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
              "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
_QEMU_SEGS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
_QEMU_HEAD = struct.Struct("<II18Q")
_QEMU_SEG = struct.Struct("<IIIIQ")
_QEMU_CR = struct.Struct("<5Q")
QEMU_CPUSTATE_SIZE = _QEMU_HEAD.size + 10 * _QEMU_SEG.size + _QEMU_CR.size   # 432
_QEMU_KGS_END = QEMU_CPUSTATE_SIZE + 8
# x86_64_elf_prstatus of arch_dump.c: pad1[32], pid, pad2[76], then the 27
# registers of x86_64_user_regs_struct, pad3[8]: 336 bytes.
_PRSTATUS_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax",
                  "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "rflags", "rsp", "ss",
                  "fs_base", "gs_base", "ds", "es", "fs", "gs")
_PRSTATUS_SIZE = 336
_PRSTATUS_REGS_AT = 112
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


class ImageCpu:
    """One vCPU's registers as an image carries them.

    `index` (0-based, the order of the notes), `pid` (NT_PRSTATUS pr_pid:
    QEMU writes the CPU index + 1; None without that note), `cr0`..`cr4`
    (None without a QEMU note), `regs` (name -> value: the QEMU note's
    general registers, rip and rflags, or NT_PRSTATUS's), `segments` (name ->
    (selector, limit, flags, base) from the QEMU note), `kernel_gs_base`
    (newer QEMUCPUState only, else None), `note_size` (the QEMUCPUState size).
    """

    __slots__ = ("index", "pid", "cr0", "cr2", "cr3", "cr4", "regs", "segments",
                 "kernel_gs_base", "note_size")

    def __init__(self, index):
        self.index = index
        self.pid = None
        self.cr0 = self.cr2 = self.cr3 = self.cr4 = None
        self.regs = {}
        self.segments = {}
        self.kernel_gs_base = None
        self.note_size = None

    @property
    def has_control_registers(self):
        return self.cr3 is not None

    def to_dict(self):
        return {"index": self.index, "pid": self.pid, "cr0": self.cr0, "cr2": self.cr2,
                "cr3": self.cr3, "cr4": self.cr4, "kernel_gs_base": self.kernel_gs_base,
                "note_size": self.note_size, "regs": dict(self.regs)}

    def __repr__(self):
        if self.cr3 is None:
            return "ImageCpu(%d, no control registers)" % self.index
        return "ImageCpu(%d, cr0=%#x, cr3=%#x, cr4=%#x)" % (self.index, self.cr0, self.cr3,
                                                            self.cr4)


def open_image(path, writable=False):
    """A PhysicalMemory for the image at `path` (raw, ELF core or LiME), in O(1).

    writable=False (the default): A/D updates go to private copy-on-write
    pages.  writable=True writes them through to the file.  `.format` is
    "raw", "elf" or "lime"; `.cpus` the ImageCpu list (empty but for ELF
    cores with notes).
    """
    path = os.fspath(path)
    fmt = image_format(path)
    if fmt == "raw":
        return PhysicalMemory._from_raw_file(path, writable=writable)
    size = os.stat(path).st_size
    cpus = []
    with _open(path) as f:
        if fmt == "elf":
            ranges, cpus = read_elf(f, size, path)
        else:
            ranges = read_lime_ranges(f, size, path)
    mem = _memory_from_ranges(path, ranges, writable, fmt)
    mem.format = fmt
    mem.cpus = cpus
    return mem


def _open(path):
    return open_input(path, "image", ImageError)


def _read_exact(f, offset, n, path, what):
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise ImageError("image %s is truncated: the %s at offset %#x needs %d bytes, "
                         "the file ends after %d" % (path, what, offset, n, len(data)))
    return data


def read_elf_ranges(f, file_size, path="<elf>"):
    """[(paddr, offset, filesz, memsz)] of an ELF64 core's PT_LOAD segments."""
    return read_elf(f, file_size, path)[0]


def read_elf(f, file_size, path="<elf>"):
    """(ranges, cpus) of an ELF64 core: ranges [(paddr, offset, filesz, memsz)]
    of its PT_LOAD segments, cpus the ImageCpu list of its notes.

    Raises ImageError for anything but a little-endian ELF64 file, for a
    segment whose file bytes extend past the end of the file, and for a
    malformed note.
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
    if e_phoff + e_phnum * e_phentsize > file_size:      # before reading any of it
        raise ImageError("image %s is truncated: the program header table (%d entries at "
                         "offset %#x) needs file bytes up to %#x but the file is %#x bytes"
                         % (path, e_phnum, e_phoff, e_phoff + e_phnum * e_phentsize, file_size))
    table = _read_exact(f, e_phoff, e_phnum * e_phentsize, path, "program header table")
    ranges, notes = [], []
    for i in range(e_phnum):
        p_type, _fl, off, _va, paddr, filesz, memsz, _al = _PHDR.unpack_from(
            table, i * e_phentsize)
        if p_type == _PT_NOTE and filesz:
            if off + filesz > file_size:
                raise ImageError("image %s is truncated: PT_NOTE segment %d needs file bytes "
                                 "%#x..%#x but the file is %#x bytes"
                                 % (path, i, off, off + filesz, file_size))
            if filesz > _MAX_NOTES:
                raise ImageError("image %s: PT_NOTE segment %d is %#x bytes, more than the %#x "
                                 "any dump's notes need (not a memory dump?)"
                                 % (path, i, filesz, _MAX_NOTES))
            notes.append((off, filesz))
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
    return ranges, _read_cpus(f, notes, path)


def _iter_notes(f, notes, path):
    """(name, type, desc, file offset) of every note in the PT_NOTE segments."""
    for seg_off, seg_size in notes:
        data = _read_exact(f, seg_off, seg_size, path, "PT_NOTE segment")
        pos = 0
        while pos + _NHDR.size <= seg_size:
            namesz, descsz, ntype = _NHDR.unpack_from(data, pos)
            name_at = pos + _NHDR.size
            desc_at = name_at + (namesz + 3) // 4 * 4
            nxt = desc_at + (descsz + 3) // 4 * 4
            if desc_at + descsz > seg_size:
                raise ImageError("image %s: the note at offset %#x (%d-byte name, %d-byte "
                                 "desc) runs past the end of its PT_NOTE segment"
                                 % (path, seg_off + pos, namesz, descsz))
            name = bytes(data[name_at:name_at + namesz]).rstrip(b"\0")
            yield name, ntype, data[desc_at:desc_at + descsz], seg_off + pos
            pos = nxt


def _read_cpus(f, notes, path):
    """The ImageCpu list: the i-th QEMU note and the i-th NT_PRSTATUS note
    are vCPU i (QEMU writes every NT_PRSTATUS, then every QEMU note, in CPU
    order: dump/dump.c write_elf64_notes)."""
    qemu, prstatus = [], []
    for name, ntype, desc, at in _iter_notes(f, notes, path):
        if name == b"QEMU" and ntype == 0:
            qemu.append(_qemu_cpustate(desc, at, path))
        elif name == b"CORE" and ntype == _NT_PRSTATUS:
            if len(desc) != _PRSTATUS_SIZE:
                raise ImageError("image %s: the NT_PRSTATUS note at offset %#x has %d bytes, "
                                 "not %d (x86-64 elf_prstatus)"
                                 % (path, at, len(desc), _PRSTATUS_SIZE))
            pid = struct.unpack_from("<I", desc, 32)[0]
            vals = struct.unpack_from("<27Q", desc, _PRSTATUS_REGS_AT)
            prstatus.append((pid, dict(zip(_PRSTATUS_REGS, vals))))
    cpus = []
    for i in range(max(len(qemu), len(prstatus))):
        cpu = qemu[i] if i < len(qemu) else ImageCpu(i)
        cpu.index = i
        if i < len(prstatus):
            cpu.pid = prstatus[i][0]
            for name, value in prstatus[i][1].items():
                cpu.regs.setdefault(name, value)
        cpus.append(cpu)
    return cpus


def _qemu_cpustate(desc, at, path):
    n = len(desc)
    if n < 8:
        raise ImageError("image %s: the QEMU note at offset %#x has %d bytes, too few for "
                         "QEMUCPUState's version and size" % (path, at, n))
    version, size = struct.unpack_from("<II", desc, 0)
    if version != 1:
        raise ImageError("image %s: the QEMU note at offset %#x is QEMUCPUState version %d; "
                         "only version 1 is known" % (path, at, version))
    if size != n or size < QEMU_CPUSTATE_SIZE:
        raise ImageError("image %s: the QEMU note at offset %#x has %d bytes and says "
                         "QEMUCPUState is %d; version 1 needs both equal and at least %d"
                         % (path, at, n, size, QEMU_CPUSTATE_SIZE))
    cpu = ImageCpu(0)
    cpu.note_size = size
    head = _QEMU_HEAD.unpack_from(desc, 0)
    cpu.regs = dict(zip(_QEMU_REGS, head[2:]))
    for k, name in enumerate(_QEMU_SEGS):
        sel, limit, flags, _pad, base = _QEMU_SEG.unpack_from(
            desc, _QEMU_HEAD.size + k * _QEMU_SEG.size)
        cpu.segments[name] = (sel, limit, flags, base)
    cpu.cr0, _cr1, cpu.cr2, cpu.cr3, cpu.cr4 = _QEMU_CR.unpack_from(
        desc, _QEMU_HEAD.size + 10 * _QEMU_SEG.size)
    if size >= _QEMU_KGS_END:
        cpu.kernel_gs_base = struct.unpack_from("<Q", desc, QEMU_CPUSTATE_SIZE)[0]
    return cpu


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
            raise ImageError("image %s: ranges at physical %#x..%#x and %#x overlap"
                             % (path, pa0, pa0 + m0 - 1, pa1))
    end = ranges[-1][0] + ranges[-1][3]
    if end > 1 << 64:
        raise ImageError("image %s: the range at physical %#x ends past 2**64"
                         % (path, ranges[-1][0]))

    # One plain mapping is possible when physical memory 0..end is exactly
    # the file bytes first_offset..first_offset+end: ranges start at 0, are
    # fully backed by the file, back to back both in memory and in the file,
    # and end on a whole word.  It is the fastest kind (the walk's direct
    # path); every other layout is the segment map, just as cheap to open.
    single = ranges[0][0] == 0 and end % 8 == 0 and all(
        fs == ms for _pa, _off, fs, ms in ranges) and all(
        a[0] + a[3] == b[0] and a[1] + a[2] == b[1] for a, b in zip(ranges, ranges[1:]))
    if single:
        try:
            arr = np.memmap(path, dtype=np.uint8, mode="r+" if writable else "c",
                            offset=ranges[0][1], shape=(end,))
        except (OSError, ValueError) as exc:
            raise ImageError("image %s: cannot map it: %s" % (path, exc)) from None
        mem = PhysicalMemory.from_array(arr)
        mem.path = path
        return mem
    try:
        return PhysicalMemory._from_segments(path, ranges, writable=writable, fmt=fmt)
    except InvalidInput as exc:      # the readers checked all of it; say it as theirs
        raise ImageError(str(exc)) from None
