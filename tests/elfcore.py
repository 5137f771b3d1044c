"""Hand-built memory images for the tests, the fuzz harness and the benchmarks.

ELF cores follow the System V gABI (Elf64_Ehdr, Elf64_Phdr: PT_LOAD = 1,
PT_NOTE = 4; Elf64_Nhdr with name and desc padded to 4 bytes) and QEMU's
dump-guest-memory layout (target/i386/arch_dump.c): per vCPU an NT_PRSTATUS
note named "CORE" (x86_64_elf_prstatus, 336 bytes: pr_pid at 32, the 27
registers of user_regs_struct at 112) and, after all of those, a "QEMU" note
of type 0 holding QEMUCPUState (version 1; 432 bytes, 440 with
kernel_gs_base).  LiME follows its "Memory Range Header Version 1" spec.

Files are written sparse: only the bytes given are written, the rest of each
segment is a hole of the file system, so a "4 GiB" dump takes no disk.
"""
import struct

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
NHDR = struct.Struct("<III")
LIME = struct.Struct("<IIQQ8s")
PT_LOAD, PT_NOTE = 1, 4
NT_PRSTATUS = 1
LIME_MAGIC = 0x4C694D45
QEMU_SIZE = 432

_QEMU_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
              "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
_PR_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax",
            "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "rflags", "rsp", "ss",
            "fs_base", "gs_base", "ds", "es", "fs", "gs")


def note(name, ntype, desc):
    """One Elf64 note: header, name (NUL-terminated) and desc, each padded to 4."""
    nm = name + b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return NHDR.pack(len(nm), len(desc), ntype) + pad(nm) + pad(desc)


def qemu_cpustate(cr0=0, cr2=0, cr3=0, cr4=0, size=QEMU_SIZE, version=1, declared=None,
                  regs=None, extra=b""):
    """A QEMUCPUState: `size` bytes long (extra fields zero, or `extra` at
    offset 432), whose size field says `declared` (default: size)."""
    regs = regs or {}
    head = struct.pack("<II18Q", version, size if declared is None else declared,
                       *[regs.get(r, 0) for r in _QEMU_REGS])
    segs = b"".join(struct.pack("<IIIIQ", 0x10 + 8 * k, 0xffffffff, 0xa09b00, 0, 0)
                    for k in range(10))
    body = head + segs + struct.pack("<5Q", cr0, 0, cr2, cr3, cr4)
    body += extra
    return body + bytes(size - len(body)) if size > len(body) else body[:size]


def prstatus(pid, regs=None, size=336):
    regs = regs or {}
    d = bytearray(max(size, 336))
    struct.pack_into("<I", d, 32, pid)
    struct.pack_into("<27Q", d, 112, *[regs.get(r, 0) for r in _PR_REGS])
    return bytes(d[:size])


def qemu_notes(cpus, prstatus_size=336):
    """The PT_NOTE payload QEMU writes for vCPU register dicts `cpus` (each
    may hold cr0, cr2, cr3, cr4, rip, size, declared, extra): every
    NT_PRSTATUS first, then every QEMU note."""
    out = b"".join(note(b"CORE", NT_PRSTATUS,
                        prstatus(i + 1, {"rip": c.get("rip", 0)}, prstatus_size))
                   for i, c in enumerate(cpus))
    for c in cpus:
        kw = {k: c[k] for k in ("cr0", "cr2", "cr3", "cr4", "size", "declared", "extra")
              if k in c}
        out += note(b"QEMU", 0, qemu_cpustate(regs={"rip": c.get("rip", 0)}, **kw))
    return out


def write_elf(path, loads, notes=b"", pokes=(), file_size=None, phoff=64, note_offset=None):
    """An ELF64 core at path.  loads: [(paddr, offset, filesz, memsz)];
    pokes: [(file offset, bytes)] written into the file; file_size: truncate
    to (default: the end of the last segment's file bytes)."""
    phdrs = [(PT_LOAD, 6, off, 0, pa, fs, ms, 0) for pa, off, fs, ms in loads]
    if notes:
        at = note_offset if note_offset is not None else phoff + PHDR.size * (len(loads) + 1)
        phdrs.insert(0, (PT_NOTE, 0, at, 0, 0, len(notes), 0, 0))
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    hdr = EHDR.pack(ident, 4, 62, 1, 0, phoff, 0, 0, 64, PHDR.size, len(phdrs), 0, 0, 0)
    end = max([off + fs for _pa, off, fs, _ms in loads] + [0])
    with open(path, "wb") as f:
        f.write(hdr)
        f.seek(phoff)
        for ph in phdrs:
            f.write(PHDR.pack(*ph))
        if notes:
            f.seek(at)
            f.write(notes)
            end = max(end, at + len(notes))
        for off, data in pokes:
            f.seek(off)
            f.write(data)
            end = max(end, off + len(data))
        f.truncate(end if file_size is None else file_size)
    return str(path)


def lime_header(start, end):
    return LIME.pack(LIME_MAGIC, 1, start, end, bytes(8))


def write_lime(path, ranges, pokes=()):
    """A LiME file: ranges [(start, size)] back to back, each after its
    32-byte header; pokes [(physical address, bytes)] land in their range.
    Returns {start: file offset of its data}."""
    where, pos = {}, 0
    with open(path, "wb") as f:
        for start, size in ranges:
            f.seek(pos)
            f.write(lime_header(start, start + size - 1))
            where[start] = pos + LIME.size
            pos += LIME.size + size
        for pa, data in pokes:
            start = max(s for s, n in ranges if s <= pa)
            f.seek(where[start] + pa - start)
            f.write(data)
        f.truncate(pos)
    return where


def memory_pokes(mem, ranges):
    """The non-zero 4 KiB pages of a PhysicalMemory inside `ranges`
    [(pa, size)] (page aligned), as (pa, bytes): what a dump of that memory
    must hold."""
    import numpy as np
    out = []
    for pa, size in ranges:
        pages = mem.array[pa:pa + size].reshape(-1, 4096)
        for k in np.flatnonzero(pages.any(axis=1)):
            out.append((pa + int(k) * 4096, pages[k].tobytes()))
    return out
