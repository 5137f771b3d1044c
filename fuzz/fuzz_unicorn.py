#!/usr/bin/env python3
"""Fuzz ptemu as the MMU of a Unicorn engine (issue 14, csrc/ucfill.c).

One input builds: a 1 MiB physical memory whose paging entries (4- or 5-level,
4 KiB and 2 MiB leaves) carry arbitrary flag, reserved and address bits, a CPU
state (CR4 PGE/SMEP/SMAP/PCIDE, EFER.NXE, CR0.WP), a TLB or none, and a short
program of real instructions from a small set of encodings with fuzzed
operands: loads, stores, rep movsb, jumps, INVLPG, MOV CR3, STAC/CLAC -- so
that the fill callback, the trap probe, the block watch and its tail decoder
all run on hostile tables and hostile code.

Oracles, checked on every input:
  * no crash and no sanitizer report (run it under tools/sanitize.sh);
  * emulation ends normally, with a ptemu fault, or with Unicorn's own UcError
    -- any other exception is a finding;
  * a reported #PF has its CR2 on the refused page, and a TLB-less probe walk
    (update_ad=False) of CR2 with the refused access, from the state the
    engine had, faults with the same error code (checked when the link has no
    TLB, so that no cached entry may legitimately answer);
  * the link counts exactly the faults it reported.

Run:  python fuzz/fuzz_unicorn.py -max_total_time=60 [CORPUS_DIR]
      tools/sanitize.sh --run python fuzz/fuzz_unicorn.py ...   (under ASan/UBSan)
      fuzz/run.sh unicorn 60                                    (the CI time box)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ByteInput, Finding, main  # noqa: E402

import unicorn  # noqa: E402
from unicorn import x86_const as X  # noqa: E402

import ptemu  # noqa: E402
from ptemu.pagetable import PageTableBuilder  # noqa: E402
from ptemu.unicorn import attach, load_cpu_state  # noqa: E402

MEM = 1 << 20
CODE_VA, CODE_PA = 0x400000, 0xF0000
P, W, U, A, D, PS, G, NX = (ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_A, ptemu.PTE_D,
                            ptemu.PTE_PS, ptemu.PTE_G, ptemu.PTE_NX)


def _imm64(reg, v):
    return bytes([0x48 | (reg >> 3), 0xB8 + (reg & 7)]) + (v & (1 << 64) - 1).to_bytes(8, "little")


def _va(inp):
    """A virtual address near the mapped ones, sometimes anywhere."""
    if inp.below(8) == 0:
        return inp.u64()
    return (inp.below(4) << 30 | inp.below(8) << 21 | inp.below(16) << 12 | inp.below(4096))


def _instruction(inp, roots):
    k = inp.below(9)
    if k == 0:
        return _imm64(7, _va(inp)) + b"\x48\x8b\x1f"                   # mov rbx, [rdi]
    if k == 1:
        return _imm64(7, _va(inp)) + b"\x48\x89\x0f"                   # mov [rdi], rcx
    if k == 2:
        return (_imm64(6, _va(inp)) + _imm64(7, _va(inp)) + _imm64(1, inp.below(64))
                + b"\xf3\xa4")                                         # rep movsb
    if k == 3:
        return _imm64(0, _va(inp)) + b"\xff\xe0"                       # jmp rax
    if k == 4:
        return _imm64(7, _va(inp)) + inp.pick((b"\x0f\x01\x3f",       # invlpg [rdi]
                                               b"\x0f\x01\x7f" + bytes([inp.u8()])))  # [rdi+d8]
    if k == 5:
        return _imm64(0, inp.pick(roots) | inp.below(4) | (inp.below(2) << 63)) + b"\x0f\x22\xd8"
    if k == 6:
        return inp.pick((b"\x0f\x01\xcb", b"\x0f\x01\xca"))           # stac / clac
    if k == 7:
        return inp.bytes(inp.below(6))                                 # raw bytes
    return b"\x90"


def _entry(inp):
    e = inp.below(MEM >> 12) << 12
    e |= inp.u8() & (P | W | U | A | D | PS | G | 0x18)
    if inp.below(4) == 0:
        e |= P | W | U
    if inp.below(8) == 0:
        e |= 1 << (40 + inp.below(23))                                 # reserved / NX / key bits
    return e


def one_input(data):
    inp = ByteInput(data)
    la57 = inp.below(6) == 0
    mem = ptemu.PhysicalMemory(MEM)
    pt = PageTableBuilder(mem, la57=la57, table_start=0x1000, table_end=0x40000)
    code = b"".join(_instruction(inp, [0x1000]) for _ in range(1 + inp.below(8)))[:2048]
    pt.map(CODE_VA, CODE_PA, flags=P | U * inp.below(2) | (A if inp.bool() else 0))
    mem.write(CODE_PA, code + b"\x90")
    for _ in range(inp.below(24)):                                     # hostile entries
        try:
            pt.map(_va(inp) & ~0xFFF, inp.below(MEM >> 12) << 12, flags=_entry(inp) & ~PS)
        except ptemu.InvalidInput:
            pass
    for _ in range(inp.below(24)):                                     # raw table words
        mem.write_u64(0x1000 + inp.below(0x3F000 // 8) * 8, _entry(inp))
    roots = [pt.cr3]
    cr4 = sum(b for b in (ptemu.CR4_PGE, ptemu.CR4_SMEP, ptemu.CR4_SMAP, ptemu.CR4_PCIDE)
              if inp.bool())
    efer = ptemu.EFER_LME | ptemu.EFER_LMA | (ptemu.EFER_NXE if inp.bool() else 0)
    cr0 = ptemu.CR0_PG | ptemu.CR0_PE | (ptemu.CR0_WP if inp.bool() else 0)
    cpu = ptemu.CpuState.long_mode(cr3=pt.cr3, la57=la57, cr4=cr4, efer=efer, cr0=cr0)
    with_tlb = inp.bool()
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.ctl_set_cpu_model(X.UC_CPU_X86_ICELAKE_SERVER)
    load_cpu_state(uc, cpu)
    mmu = ptemu.Mmu(mem, ptemu.CpuState(), tlb=ptemu.Tlb.default() if with_tlb else None)
    link = attach(uc, mmu, watch_blocks=inp.below(4) != 0)
    try:
        fault = link.emu_start(CODE_VA, CODE_VA + len(code), 0, 200)
    except unicorn.UcError:
        fault = None
    faults = fault is not None
    for _ in range(3):
        if fault is None:
            break
        if isinstance(fault, ptemu.PageFault):
            c = link._c
            if fault.cr2 >> 12 != int(c.fault_page) >> 12:
                raise Finding("CR2 %#x is not on the refused page %#x" % (fault.cr2,
                                                                       int(c.fault_page)))
            if not with_tlb:
                access = "rwx"[int(c.fault_access)]
                probe = ptemu.Mmu(mem, mmu.cpu.copy())
                try:
                    probe.translate(fault.cr2, access, update_ad=False)
                    raise Finding("a fill was refused at %#x (%s) but a probe walk translates it"
                                  % (fault.cr2, access))
                except ptemu.PageFault as again:
                    if again.error_code != fault.error_code:
                        raise Finding("error code %#x, a probe walk says %#x"
                                      % (fault.error_code, again.error_code))
                except ptemu.GeneralProtection:
                    raise Finding("#PF reported where a probe walk gives #GP")
        # Make the refused page present and writable, as a kernel would, and go on.
        try:
            pt.map(fault.cr2 & ~0xFFF if isinstance(fault, ptemu.PageFault) else CODE_VA,
                   0x80000, flags=P | W | U | A | D)
        except ptemu.InvalidInput:
            fault = None
            break
        link.flush()
        try:
            fault = link.resume()
        except unicorn.UcError:
            fault = None
        faults += fault is not None
    if link.stats["faults"] != faults:
        raise Finding("the link counted %d faults, reported %d" % (link.stats["faults"], faults))


if __name__ == "__main__":
    main(one_input, max_len=1024)
