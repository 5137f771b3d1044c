"""ptemu as the MMU of a Unicorn x86-64 engine (ptemu.unicorn, csrc/ucfill.c).

Each program (machine code as bytes, encodings from the SDM Vol. 2) runs twice
from the same memory image: on Unicorn's own MMU (UC_TLB_CPU, QEMU's x86 walk)
and through ptemu (UC_TLB_VIRTUAL, fills answered in C).  Registers and memory
must be identical at the end -- except where QEMU departs from the SDM, where
the test shows ptemu's SDM answer and cites the section.
"""
import ctypes

import numpy as np
import pytest
from unicorn import Uc, UcError, UC_ARCH_X86, UC_MODE_32, UC_MODE_64, UC_HOOK_INTR, UC_PROT_ALL
from unicorn import x86_const as X

import ptemu
from ptemu.pagetable import PageTableBuilder
from ptemu.unicorn import attach, load_cpu_state

P, W, U, G, A, D, NX = (ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_G, ptemu.PTE_A,
                        ptemu.PTE_D, ptemu.PTE_NX)
RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
MSR_EFER, MSR_STAR = 0xC0000080, 0xC0000081
EFER_SCE = 1

KCODE, KCODE_PA = 0xFFFF800000000000, 0x200000     # supervisor code
UCODE, UCODE_PA = 0x400000, 0x210000               # user code
DATA, DATA_PA = 0x600000, 0x300000                 # eight data pages
PT_ALIAS = 0x700000                                # the page-table frames, mapped writable

GPRS = [getattr(X, "UC_X86_REG_" + r) for r in (
    "RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI", "R8", "R9", "R10", "R11", "R12",
    "R13", "R14", "R15", "RIP", "RFLAGS", "CR2", "CR3")]


# -- a few encodings (SDM Vol. 2) ------------------------------------------------------------
def imm32(v):
    return (v & 0xFFFFFFFF).to_bytes(4, "little")


def mov_imm(reg, value):                 # MOV r64, imm64: REX.W B8+r io
    return bytes([0x48 | (reg >> 3), 0xB8 + (reg & 7)]) + (value & (1 << 64) - 1).to_bytes(8, "little")


def jnz_back(target_offset, here_offset):  # JNZ rel32 (0F 85 cd)
    return b"\x0f\x85" + imm32(target_offset - (here_offset + 6))


MOV_M_RDI_RCX = b"\x48\x89\x0f"          # mov [rdi], rcx
ADD_RAX_M_RDI = b"\x48\x03\x07"          # add rax, [rdi]
MOV_RBX_M_RDI = b"\x48\x8b\x1f"          # mov rbx, [rdi]
MOV_M_RDI_RAX = b"\x48\x89\x07"          # mov [rdi], rax
ADD_RDI_PAGE = b"\x48\x81\xc7" + imm32(0x1000)   # add rdi, 4096
DEC_RCX = b"\x48\xff\xc9"
REP_MOVSB = b"\xf3\xa4"
MOV_CR3_RAX = b"\x0f\x22\xd8"
INVLPG_M_RDI = b"\x0f\x01\x3f"           # invlpg [rdi]
SYSRET = b"\x48\x0f\x07"                 # sysretq
STAC = b"\x0f\x01\xcb"
JMP_RAX = b"\xff\xe0"
NOP = b"\x90"


class Image:
    """One memory image: page tables, code and data, built once per test."""

    def __init__(self, la57=False, size=8 << 20):
        self.mem = ptemu.PhysicalMemory(size)
        self.pt = PageTableBuilder(self.mem, la57=la57, table_start=0x100000, table_end=0x180000)
        self.la57 = la57
        self.pt.map(KCODE, KCODE_PA, flags=P)                       # supervisor, read-only
        for i in range(8):
            self.pt.map(DATA + i * 0x1000, DATA_PA + i * 0x1000, flags=P | W | NX)

    def code(self, va, pa, data, flags=P):
        self.pt.map(va, pa, flags=flags)
        self.mem.write(pa, data)

    def alias_tables(self):
        """Map every page-table frame at PT_ALIAS.. (so code can store entries)."""
        for i, frame in enumerate(list(self.pt.tables)):
            self.pt.map(PT_ALIAS + i * 0x1000, frame, flags=P | W | NX)


class Run:
    """One program on one MMU: mode "cpu" (Unicorn's) or "ptemu"."""

    def __init__(self, image, mode, begin, until, regs=(), model=None, cpu_kw=None,
                 user_entry=None, watch=True, tlb=True):
        self.mode = mode
        self.mem = ptemu.PhysicalMemory.from_array(image.mem.array.copy())
        self.uc = uc = Uc(UC_ARCH_X86, UC_MODE_64)
        if model is not None:
            uc.ctl_set_cpu_model(model)
        cpu_kw = dict(cpu_kw or {})
        cpu_kw.setdefault("cr3", image.pt.cr3)
        self.cpu = ptemu.CpuState.long_mode(la57=image.la57, **cpu_kw)
        load_cpu_state(uc, self.cpu)
        uc.reg_write(X.UC_X86_REG_RSP, DATA + 0x8000 - 64)
        for r, v in dict(regs).items():
            uc.reg_write(r, v)
        if user_entry is not None:
            # SYSRET to user_entry at CPL 3 (SDM Vol. 2 SYSRET): CS = STAR[63:48] + 16 | 3.
            uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, self.cpu.efer | EFER_SCE))
            uc.reg_write(X.UC_X86_REG_MSR, (MSR_STAR, (0x20 << 48) | (0x08 << 32)))
            uc.reg_write(X.UC_X86_REG_RCX, user_entry)
            uc.reg_write(X.UC_X86_REG_R11, dict(regs).get("rflags", 0x2))
        self.until = until
        self.link = None
        self.intr = []
        if mode == "cpu":
            ptr = ctypes.c_void_p(self.mem.array.ctypes.data).value
            uc.mem_map_ptr(0, self.mem.size, UC_PROT_ALL, ptr)

            def on_intr(uc, intno, _):
                self.intr.append(intno)
                uc.emu_stop()
            uc.hook_add(UC_HOOK_INTR, on_intr)
        else:
            self.mmu = ptemu.Mmu(self.mem, ptemu.CpuState(maxphyaddr=self.cpu.maxphyaddr),
                                 tlb=ptemu.Tlb.default() if tlb else None)
            self.link = attach(uc, self.mmu, watch_blocks=watch)
        self.fault = self._go(begin)

    def _go(self, begin):
        if self.link is not None:
            f = self.link.emu_start(begin, self.until)
            return self._fault_of(f)
        self.intr.clear()
        self.uc.emu_start(begin, self.until)
        return (self.intr[-1], self.reg(X.UC_X86_REG_CR2)) if self.intr else None

    def resume(self):
        if self.link is not None:
            self.fault = self._fault_of(self.link.resume())
        else:
            self.fault = self._go(self.reg(X.UC_X86_REG_RIP))
        return self.fault

    def _fault_of(self, f):
        # #GP loads no CR2 (SDM 6.15): the register as it is, on both MMUs.
        return None if f is None else (f.vector, getattr(f, "cr2", self.reg(X.UC_X86_REG_CR2)))

    def reg(self, r):
        return self.uc.reg_read(r)

    def regs(self):
        return [self.reg(r) for r in GPRS]

    @property
    def error_code(self):
        return self.link.fault.error_code


def same_memory(image, cpu, pt):
    """Memory is identical, but for one departure of QEMU from the SDM: on a
    walk that faults, QEMU has set A in the paging-structure entries it passed
    (test_accessed_bits_on_a_faulting_walk); ptemu sets A only in the entries
    of a translation (SDM 4.8)."""
    diff = np.flatnonzero(cpu.mem.array != pt.mem.array)
    tables = {t >> 12 for t in image.pt.tables}
    for i in diff.tolist():
        assert cpu.fault is not None and i >> 12 in tables and i % 8 == 0, hex(i)
        assert int(cpu.mem.array[i]) == int(pt.mem.array[i]) | A, hex(i)


def both(image, begin, until, **kw):
    """Run on both MMUs; registers and memory must be identical."""
    cpu, pt = Run(image, "cpu", begin, until, **kw), Run(image, "ptemu", begin, until, **kw)
    assert cpu.fault == pt.fault
    assert cpu.regs() == pt.regs()
    same_memory(image, cpu, pt)
    return cpu, pt


def kernel(image, body, epilogue=NOP):
    """Supervisor code at KCODE: body, then the instruction emulation stops at."""
    image.code(KCODE, KCODE_PA, body + epilogue)
    return KCODE, KCODE + len(body)


def user_program(image, body):
    """CPL 3 code: the kernel SYSRETs to `body`; emulation stops at its end
    (Unicorn's SYSCALL only calls hooks, so there is no way back)."""
    image.code(UCODE, UCODE_PA, body + NOP, flags=P | U)
    start, _ = kernel(image, SYSRET)
    return start, UCODE + len(body)


# -- the same programs on both MMUs ---------------------------------------------------------
def loop_over_pages():
    # rdi = DATA; rcx = 8; do { [rdi] = rcx; rax += [rdi]; rdi += 4096 } while (--rcx)
    head = mov_imm(RDI, DATA) + mov_imm(RCX, 8) + mov_imm(RAX, 0)
    body = MOV_M_RDI_RCX + ADD_RAX_M_RDI + ADD_RDI_PAGE + DEC_RCX
    return head + body + jnz_back(len(head), len(head) + len(body))


def test_loop_over_pages_is_identical():
    image = Image()
    begin, until = kernel(image, loop_over_pages())
    cpu, pt = both(image, begin, until)
    assert pt.reg(X.UC_X86_REG_RAX) == sum(range(1, 9))
    # SDM 4.8: each leaf written has A and D set, by ptemu's walk as by QEMU's.
    for i in range(8):
        assert pt.mem.read_u64(image.pt.entry_pa(DATA + i * 0x1000, 1)) & (A | D) == A | D
    s = pt.link.stats
    assert s["fills_by_access"]["w"] >= 8 and s["faults"] == 0
    assert s["tlb"].walks >= 8


def test_user_code_is_identical():
    image = Image()
    image.pt.map(0x800000, 0x380000, flags=P | W | U | NX)
    body = mov_imm(RDI, 0x800010) + mov_imm(RCX, 0x1234) + MOV_M_RDI_RCX + MOV_RBX_M_RDI
    begin, until = user_program(image, body)
    cpu, pt = both(image, begin, until, user_entry=UCODE)
    assert pt.reg(X.UC_X86_REG_RBX) == 0x1234
    assert pt.mem.read_u64(0x380010) == 0x1234


def test_five_level_tables_are_identical():
    image = Image(la57=True)
    begin, until = kernel(image, loop_over_pages())
    cpu, pt = both(image, begin, until, model=X.UC_CPU_X86_ICELAKE_SERVER)
    assert pt.mmu.cpu.levels == 5
    assert pt.reg(X.UC_X86_REG_RAX) == 36


def test_cow_write_fault_then_resume():
    # SDM 4.7: a write to a present read-only page: P|W; CR2 is the address itself.
    image = Image()
    image.pt.map(DATA, DATA_PA, flags=P | NX)                      # read-only now
    body = mov_imm(RDI, DATA + 0x123) + mov_imm(RCX, 7) + MOV_M_RDI_RCX + MOV_RBX_M_RDI
    begin, until = kernel(image, body)
    runs = both(image, begin, until)
    cpu, pt = runs
    assert pt.fault == (14, DATA + 0x123)
    assert pt.error_code == ptemu.PF_P | ptemu.PF_W
    assert pt.reg(X.UC_X86_REG_RIP) == begin + 20                 # the store itself
    for r in runs:                                                 # "copy", then make it writable
        r.mem.write_u64(image.pt.entry_pa(DATA, 1), DATA_PA | P | W | NX | A)
        r.resume()
    assert cpu.regs() == pt.regs()
    same_memory(image, cpu, pt)
    assert pt.reg(X.UC_X86_REG_RBX) == 7 and pt.link.fault is None


def test_user_access_to_supervisor_page():
    # SDM 4.6.1: a user-mode read of a supervisor page: #PF P|U.
    image = Image()
    body = mov_imm(RDI, DATA + 8) + MOV_RBX_M_RDI
    begin, until = user_program(image, body)
    cpu, pt = both(image, begin, until, user_entry=UCODE)
    assert pt.fault == (14, DATA + 8)
    assert pt.error_code == ptemu.PF_P | ptemu.PF_U
    assert pt.mmu.cpu.cpl == 3


def test_nx_fetch_fault():
    # SDM 4.6.1/4.7: a fetch from an XD page: P|I, CR2 = the target (RIP).
    image = Image()
    begin, until = kernel(image, mov_imm(RAX, DATA + 0x40) + JMP_RAX)
    cpu, pt = both(image, begin, until)
    assert pt.fault == (14, DATA + 0x40)
    assert pt.error_code == ptemu.PF_P | ptemu.PF_I


def test_fetch_of_instruction_crossing_into_not_present_page():
    # An instruction that starts on a mapped page and ends on an unmapped one:
    # CR2 is the first byte of the unmapped page (SDM 4.7: the address that faulted).
    image = Image()
    code_va = UCODE
    image.code(code_va, UCODE_PA, b"")
    image.mem.write(UCODE_PA + 0xFFE, mov_imm(RAX, 1)[:2])         # 48 b8 | imm64 on the next page
    begin, until = kernel(image, mov_imm(RAX, code_va + 0xFFE) + JMP_RAX)
    cpu, pt = both(image, begin, until)
    assert pt.fault == (14, code_va + 0x1000)
    assert pt.error_code == ptemu.PF_I                             # not present, fetch


def test_smep_fault():
    # SDM 4.6.1: with CR4.SMEP a supervisor fetch from a user page faults, P|I.
    image = Image()
    image.code(UCODE, UCODE_PA, NOP, flags=P | U)
    begin, until = kernel(image, mov_imm(RAX, UCODE) + JMP_RAX)
    cpu, pt = both(image, begin, until, model=X.UC_CPU_X86_BROADWELL,
                   cpu_kw={"cr4": ptemu.CR4_SMEP})
    assert pt.fault == (14, UCODE)
    assert pt.error_code == ptemu.PF_P | ptemu.PF_I


def test_smap_fault_and_stac():
    # SDM 4.6.1: with CR4.SMAP a supervisor read of a user page faults (P) unless
    # RFLAGS.AC=1 (STAC) -- read from the engine at each fill.
    image = Image()
    image.pt.map(0x800000, 0x380000, flags=P | W | U | NX)
    image.mem.write_u64(0x380000, 0x55)
    body = mov_imm(RDI, 0x800000) + MOV_RBX_M_RDI
    begin, until = kernel(image, body)
    kw = dict(model=X.UC_CPU_X86_BROADWELL, cpu_kw={"cr4": ptemu.CR4_SMAP})
    cpu, pt = both(image, begin, until, **kw)
    assert pt.fault == (14, 0x800000) and pt.error_code == ptemu.PF_P
    image2 = Image()
    image2.pt.map(0x800000, 0x380000, flags=P | W | U | NX)
    image2.mem.write_u64(0x380000, 0x55)
    begin, until = kernel(image2, STAC + body)
    cpu, pt = both(image2, begin, until, **kw)
    assert pt.fault is None and pt.reg(X.UC_X86_REG_RBX) == 0x55


def test_fault_inside_rep_movsb_crossing_a_page():
    # rep movsb from page 0 to the end of page 1 and on into page 2, read-only:
    # the fault comes at the first byte of page 2, with RCX/RSI/RDI of that
    # iteration (SDM Vol. 2 MOVS: the registers are updated per iteration).
    image = Image()
    image.pt.map(DATA + 0x2000, DATA_PA + 0x2000, flags=P | NX)
    body = (mov_imm(RSI, DATA) + mov_imm(RDI, DATA + 0x2000 - 5) + mov_imm(RCX, 16)
            + REP_MOVSB)
    image.mem.write(DATA_PA, bytes(range(1, 17)))
    begin, until = kernel(image, body)
    cpu, pt = both(image, begin, until)
    assert pt.fault == (14, DATA + 0x2000)
    assert pt.error_code == ptemu.PF_P | ptemu.PF_W
    assert pt.reg(X.UC_X86_REG_RCX) == 11 and pt.reg(X.UC_X86_REG_RDI) == DATA + 0x2000
    assert pt.mem.read(DATA_PA + 0x2000 - 5, 5) == bytes(range(1, 6))


def test_not_present_write_reports_the_exact_address():
    image = Image()
    body = mov_imm(RDI, 0x900ABC) + MOV_M_RDI_RCX
    begin, until = kernel(image, body)
    cpu, pt = both(image, begin, until)
    assert pt.fault == (14, 0x900ABC) and pt.error_code == ptemu.PF_W


def test_mov_cr3_switches_address_space():
    # Two address spaces map DATA onto different frames; the code switches CR3.
    image = Image()
    other = PageTableBuilder(image.mem, table_start=0x180000, table_end=0x1C0000)
    other.map(KCODE, KCODE_PA, flags=P)
    other.map(DATA, DATA_PA + 0x7000, flags=P | W | NX)
    image.mem.write_u64(DATA_PA, 0x111)
    image.mem.write_u64(DATA_PA + 0x7000, 0x222)
    body = (mov_imm(RDI, DATA) + b"\x48\x8b\x17"                   # mov rdx, [rdi]
            + mov_imm(RAX, other.cr3) + MOV_CR3_RAX + MOV_RBX_M_RDI)
    begin, until = kernel(image, body)
    cpu, pt = both(image, begin, until)
    assert (pt.reg(X.UC_X86_REG_RDX), pt.reg(X.UC_X86_REG_RBX)) == (0x111, 0x222)
    assert pt.link.stats["events"]["cr3"] == 1 and pt.mmu.cpu.cr3 == other.cr3


# -- where QEMU departs from the SDM ----------------------------------------------------------
def test_accessed_bits_on_a_faulting_walk():
    # SDM 4.8: A is set in the entries used for a translation; a walk that ends in
    # a not-present PTE produces none, and ptemu (as Intel parts, and Bochs) sets
    # no A bit.  QEMU sets A in the upper levels as it passes them.
    image = Image()
    va = 0xA00000
    image.pt.entry_pa(va, 1, create=True)                           # tables, PTE P=0
    begin, until = kernel(image, mov_imm(RDI, va) + MOV_RBX_M_RDI)
    cpu, pt = Run(image, "cpu", begin, until), Run(image, "ptemu", begin, until)
    assert cpu.fault == pt.fault == (14, va)
    upper = [image.pt.entry_pa(va, lvl) for lvl in (4, 3, 2)]
    assert all(pt.mem.read_u64(e) & A == 0 for e in upper)           # ptemu: SDM
    assert all(cpu.mem.read_u64(e) & A for e in upper)               # QEMU: eager A


def test_reserved_bit_only_in_a_present_entry():
    # SDM 4.5.4/4.7: reserved bits are checked only in present entries: a P=0 PTE
    # with bit 51 set is "not present" (W only); with P=1 it is P|W|RSVD.
    image = Image()
    image.pt.set_entry(DATA, 1, DATA_PA | W | (1 << 51))
    image.pt.set_entry(DATA + 0x1000, 1, DATA_PA | P | W | (1 << 51))
    for va, ec in ((DATA, ptemu.PF_W), (DATA + 0x1000, ptemu.PF_P | ptemu.PF_W | ptemu.PF_RSVD)):
        begin, until = kernel(image, mov_imm(RDI, va) + MOV_M_RDI_RCX)
        pt = Run(image, "ptemu", begin, until, cpu_kw={"maxphyaddr": 40})
        assert pt.fault == (14, va) and pt.error_code == ec


def remap_program(image, flags, flush, va=DATA):
    """Read va, store a new PTE for it (through the table alias), `flush`, read again."""
    image.pt.map(va, DATA_PA, flags=flags)
    image.alias_tables()
    pte = image.pt.entry_pa(va, 1)
    frame = image.pt.tables.index(pte & ~0xFFF)
    image.mem.write_u64(DATA_PA, 0xAAAA)
    image.mem.write_u64(DATA_PA + 0x7000, 0xBBBB)
    body = (mov_imm(RDI, va) + b"\x48\x8b\x17"                     # mov rdx, [rdi]: cached
            + mov_imm(RSI, PT_ALIAS + frame * 0x1000 + (pte & 0xFFF))
            + mov_imm(RAX, DATA_PA + 0x7000 | flags | A | D) + b"\x48\x89\x06"  # mov [rsi], rax
            + flush + MOV_RBX_M_RDI)
    return kernel(image, body)


def test_global_entry_survives_mov_cr3():
    # SDM 4.10.4.1: MOV CR3 (PCIDE=0) invalidates the TLB entries of PCID 0 except
    # global ones (CR4.PGE=1, G=1): the stale global translation may still be
    # used, and ptemu's TLB uses it.  QEMU flushes everything on a CR3 write.
    image = Image()
    flush = mov_imm(RAX, image.pt.cr3) + MOV_CR3_RAX
    begin, until = remap_program(image, P | W | NX | G, flush)
    kw = dict(cpu_kw={"cr4": ptemu.CR4_PGE})
    cpu, pt = Run(image, "cpu", begin, until, **kw), Run(image, "ptemu", begin, until, **kw)
    assert pt.reg(X.UC_X86_REG_RBX) == 0xAAAA                      # ptemu: the global entry
    assert cpu.reg(X.UC_X86_REG_RBX) == 0xBBBB                     # QEMU: walked again
    assert pt.link.stats["events"]["cr3_same"] == 1


def test_non_global_entry_is_flushed_by_same_value_mov_cr3():
    # The same MOV CR3 of an unchanged value flushes a non-global entry (SDM
    # 4.10.4.1); the block watch sees it although no register value changed.
    image = Image()
    flush = mov_imm(RAX, image.pt.cr3) + MOV_CR3_RAX
    begin, until = remap_program(image, P | W | NX, flush)
    cpu, pt = both(image, begin, until, cpu_kw={"cr4": ptemu.CR4_PGE})
    assert pt.reg(X.UC_X86_REG_RBX) == 0xBBBB
    unwatched = Run(image, "ptemu", begin, until, cpu_kw={"cr4": ptemu.CR4_PGE}, watch=False)
    assert unwatched.reg(X.UC_X86_REG_RBX) == 0xAAAA               # not seen: stale entry


def test_invlpg_executed_by_the_code():
    # SDM 4.10.4.1: INVLPG invalidates the page, global entries included.
    image = Image()
    begin, until = remap_program(image, P | W | NX | G, INVLPG_M_RDI)
    cpu, pt = both(image, begin, until, cpu_kw={"cr4": ptemu.CR4_PGE})
    assert pt.reg(X.UC_X86_REG_RBX) == 0xBBBB
    assert pt.link.stats["events"]["invlpg"] == 1
    assert pt.mmu.tlb.stats.flushes_by_cause["invlpg"] == 1


def test_pcid_entries_survive_a_no_flush_switch():
    # SDM 4.10.4.1: with CR4.PCIDE=1, MOV CR3 with bit 63 set invalidates
    # nothing; entries of PCID 1 survive a switch to PCID 2 and back.  (QEMU keeps
    # no PCID tags, and its walk does not even mask bit 63: ptemu only.)
    image = Image()
    cr3 = image.pt.cr3
    flush = (mov_imm(RAX, cr3 | 2) + MOV_CR3_RAX
             + mov_imm(RAX, cr3 | 1 | 1 << 63) + MOV_CR3_RAX)
    begin, until = remap_program(image, P | W | NX, flush)
    kw = dict(cpu_kw={"cr4": ptemu.CR4_PCIDE, "cr3": cr3 | 1})
    pt = Run(image, "ptemu", begin, until, **kw)
    assert pt.reg(X.UC_X86_REG_RBX) == 0xAAAA and pt.mmu.cpu.cr3 == cr3 | 1
    # Without bit 63 the switch back flushes PCID 1: the new entry is walked.
    flush = (mov_imm(RAX, cr3 | 2) + MOV_CR3_RAX + mov_imm(RAX, cr3 | 1) + MOV_CR3_RAX)
    image2 = Image()
    begin, until = remap_program(image2, P | W | NX, flush)
    pt = Run(image2, "ptemu", begin, until, **kw)
    assert pt.reg(X.UC_X86_REG_RBX) == 0xBBBB


# -- the link's own operations ----------------------------------------------------------------
def test_dirty_clear_page_is_handed_out_read_only():
    # SDM 4.8: D is set by the first write; a page read first comes back for it.
    image = Image()
    body = mov_imm(RDI, DATA) + MOV_RBX_M_RDI + MOV_M_RDI_RAX
    begin, until = kernel(image, body)
    cpu, pt = both(image, begin, until)
    s = pt.link.stats["fills_by_access"]
    assert s["r"] >= 1 and s["w"] == 1
    assert pt.mem.read_u64(image.pt.entry_pa(DATA, 1)) & D


def test_outside_operations_and_stats():
    image = Image()
    image.mem.write_u64(DATA_PA, 0x11)
    image.mem.write_u64(DATA_PA + 0x7000, 0x22)
    begin, until = kernel(image, mov_imm(RDI, DATA) + MOV_RBX_M_RDI)
    pt = Run(image, "ptemu", begin, until)
    assert pt.reg(X.UC_X86_REG_RBX) == 0x11
    image.pt.map(DATA, DATA_PA + 0x7000, flags=P | W | NX)
    pt.mem.write_u64(image.pt.entry_pa(DATA, 1), DATA_PA + 0x7000 | P | W | NX)
    pt.link.emu_start(begin, until)
    assert pt.reg(X.UC_X86_REG_RBX) == 0x11                        # stale until invalidated
    pt.link.invlpg(DATA)
    pt.link.emu_start(begin, until)
    assert pt.reg(X.UC_X86_REG_RBX) == 0x22
    pt.link.write_cr3(image.pt.cr3)
    assert pt.reg(X.UC_X86_REG_CR3) == image.pt.cr3
    pt.link.flush()
    s = pt.link.stats
    assert s["tlb"].flushes_by_cause["invlpg"] == 1 and s["tlb"].flushes_by_cause["cr3"] == 1
    assert s["tlb"].flushes_by_cause["user"] == 1 and s["flushes"] >= 3
    assert s["fills"] >= 3 and s["faults"] == 0


def test_without_a_tlb_every_fill_walks():
    image = Image()
    begin, until = kernel(image, loop_over_pages())
    pt = Run(image, "ptemu", begin, until, tlb=False)
    assert pt.reg(X.UC_X86_REG_RAX) == 36 and pt.link.stats["tlb"] is None


def test_memory_from_file_is_shared(tmp_path):
    image = Image()
    begin, until = kernel(image, loop_over_pages())
    path = tmp_path / "ram.img"
    image.mem.array.tofile(path)
    mem = ptemu.PhysicalMemory.from_file(path)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    mmu = ptemu.Mmu(mem, ptemu.CpuState(), tlb=ptemu.Tlb.default())
    load_cpu_state(uc, ptemu.CpuState.long_mode(cr3=image.pt.cr3))
    link = attach(uc, mmu)
    assert link.emu_start(begin, until) is None
    assert mem.read_u64(DATA_PA + 0x7000) == 1                     # the code's store, no copy
    assert np.fromfile(path, dtype=np.uint8)[DATA_PA + 0x7000] == 0   # private mapping


# -- bad input ----------------------------------------------------------------------------------
def _mmu(size=1 << 20, **kw):
    return ptemu.Mmu(ptemu.PhysicalMemory(size), ptemu.CpuState(**kw))


def test_bad_input():
    with pytest.raises(ptemu.InvalidInput, match="x86-64"):
        attach(Uc(UC_ARCH_X86, UC_MODE_32), _mmu())
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0x10000, 0x1000)
    with pytest.raises(ptemu.InvalidInput, match="already has memory"):
        attach(uc, _mmu())
    with pytest.raises(ptemu.InvalidInput, match="4 KiB"):
        attach(Uc(UC_ARCH_X86, UC_MODE_64), _mmu(4104))
    with pytest.raises(ptemu.InvalidInput, match="unicorn.Uc"):
        attach(object(), _mmu())
    with pytest.raises(ptemu.InvalidInput, match="ptemu.Mmu"):
        attach(Uc(UC_ARCH_X86, UC_MODE_64), object())
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    attach(uc, _mmu())
    with pytest.raises(ptemu.InvalidInput, match="already attached"):
        attach(uc, _mmu())


def test_memory_too_large_for_the_engine(tmp_path):
    # 4 GiB + 4 KiB of sparse image with MAXPHYADDR 32: past the last address.
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        f.truncate((1 << 32) + 4096)
    mmu = ptemu.Mmu(ptemu.PhysicalMemory.from_file(path), ptemu.CpuState(maxphyaddr=32))
    with pytest.raises(ptemu.InvalidInput, match="too large"):
        attach(Uc(UC_ARCH_X86, UC_MODE_64), mmu)


def test_missing_extra_names_the_install(monkeypatch):
    import ptemu.unicorn as pu
    monkeypatch.setattr(pu, "_unicorn", None)
    with pytest.raises(ImportError, match=r'pip install "ptemu\[unicorn\]"'):
        attach(None, None)


def test_other_engine_errors_still_propagate():
    # An instruction Unicorn cannot run is not a ptemu fault: UcError reaches the caller.
    image = Image()
    begin, until = kernel(image, b"\x0f\x0b")                      # UD2
    with pytest.raises(UcError):
        Run(image, "ptemu", begin, until)


def test_example_runs(capsys):
    import pathlib
    import runpy
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "unicorn_demo.py"
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert "rax = 10 (4+3+2+1)" in out
    assert "#PF at 0x700010, error code 0x3 (P W)" in out and "holds 0xc0ffee" in out
    assert "CPL 3: #PF at 0x800000, error code 0x5 (P U)" in out


R8 = 8


@pytest.mark.parametrize("form", ["rdi", "r8+disp8", "rip+disp32", "rax+rcx*8+disp32",
                                  "rex-lookalike"])
def test_invlpg_operand_forms(form):
    # The block watch decodes INVLPG's ModRM/SIB/displacement (SDM Vol. 2 2.1.5)
    # and takes the operand from the registers once the block ran.
    image = Image()
    if form == "rdi":
        flush = INVLPG_M_RDI
    elif form == "r8+disp8":                                   # 41 0f 01 78 10: [r8+0x10]
        flush = mov_imm(R8, DATA - 0x10) + b"\x41\x0f\x01\x78\x10"
    elif form == "rip+disp32":                                 # 0f 01 3d d32: [rip+d32]
        # rip after the instruction is until (the end of the body): known below.
        flush = None
    elif form == "rax+rcx*8+disp32":                           # 0f 01 bc c8 d32
        flush = (mov_imm(RAX, DATA - 0x100 - 8 * 3) + mov_imm(RCX, 3)
                 + b"\x0f\x01\xbc\xc8" + imm32(0x100))
    else:                                                      # mov r9, 0x41; invlpg [rdi]
        flush = b"\x49\xc7\xc1\x41\x00\x00\x00" + INVLPG_M_RDI  # a 0x41 byte before 0f 01
    va = DATA
    if flush is None:                                          # a page within 2 GiB of RIP
        va = KCODE + 0x100000
        _, until = remap_program(Image(), P | W | NX | G, b"\x0f\x01\x3d" + imm32(0), va)
        flush = b"\x0f\x01\x3d" + imm32(va - (until - len(MOV_RBX_M_RDI)))
    begin, until = remap_program(image, P | W | NX | G, flush, va)
    cpu, pt = both(image, begin, until, cpu_kw={"cr4": ptemu.CR4_PGE})
    assert pt.reg(X.UC_X86_REG_RBX) == 0xBBBB
    assert pt.link.stats["events"]["invlpg"] == 1


def test_resume_needs_a_run():
    link = attach(Uc(UC_ARCH_X86, UC_MODE_64), _mmu())
    with pytest.raises(ptemu.InvalidInput, match="resume"):
        link.resume()


def test_write_cr4_from_outside_flushes_on_pge_change():
    # SDM 4.10.4.1: a MOV to CR4 that changes PGE invalidates everything, globals too.
    image = Image()
    image.pt.map(DATA, DATA_PA, flags=P | W | NX | G)
    image.mem.write_u64(DATA_PA, 0x11)
    image.mem.write_u64(DATA_PA + 0x7000, 0x22)
    begin, until = kernel(image, mov_imm(RDI, DATA) + MOV_RBX_M_RDI)
    pt = Run(image, "ptemu", begin, until, cpu_kw={"cr4": ptemu.CR4_PGE})
    pt.mem.write_u64(image.pt.entry_pa(DATA, 1), DATA_PA + 0x7000 | P | W | NX | G)
    pt.link.write_cr3(image.pt.cr3)                        # globals survive this...
    pt.link.emu_start(begin, until)
    assert pt.reg(X.UC_X86_REG_RBX) == 0x11
    pt.link.write_cr4(pt.mmu.cpu.cr4 & ~ptemu.CR4_PGE)     # ...not this
    assert pt.reg(X.UC_X86_REG_CR4) & ptemu.CR4_PGE == 0
    pt.link.emu_start(begin, until)
    assert pt.reg(X.UC_X86_REG_RBX) == 0x22
    assert pt.link.stats["tlb"].flushes_by_cause["cr4"] == 1


def test_plain_emu_start_then_link_fault_and_resume():
    # A harness may call uc.emu_start itself: a refusal is Unicorn's UcError,
    # and link.fault then says which fault it was.
    image = Image()
    image.pt.map(DATA, DATA_PA, flags=P | NX)
    begin, until = kernel(image, mov_imm(RDI, DATA + 0x18) + MOV_M_RDI_RCX)
    pt = Run(image, "ptemu", until, until + 1)                # attached; ran the last NOP
    with pytest.raises(UcError):
        pt.uc.emu_start(begin, until)
    assert pt.link.fault.cr2 == DATA + 0x18 and pt.link.fault.error_code == 3
    pt.mem.write_u64(image.pt.entry_pa(DATA, 1), DATA_PA | P | W | NX)
    assert pt.link.resume(until=until) is None
    assert pt.reg(X.UC_X86_REG_RIP) == until


def test_engine_and_link_are_freed_together():
    import gc
    import weakref
    image = Image()
    begin, until = kernel(image, loop_over_pages())
    pt = Run(image, "ptemu", begin, until)
    ref = weakref.ref(pt.uc)
    del pt
    gc.collect()
    assert ref() is None


def test_non_canonical_data_address_is_gp():
    # SDM 3.3.7.1: a non-canonical linear address is #GP(0), no walk, CR2 unchanged;
    # ptemu reports the address itself (found by the probe).
    image = Image()
    begin, until = kernel(image, mov_imm(RDI, 0x0000800000000ABC) + MOV_RBX_M_RDI)
    cpu, pt = both(image, begin, until)
    assert pt.fault == (13, 0)
    assert isinstance(pt.link.fault, ptemu.GeneralProtection)
    assert pt.link.fault.va == 0x0000800000000ABC


MOV_CR4_RAX = b"\x0f\x22\xe0"


def test_mov_cr4_clearing_pge_flushes_globals():
    # SDM 4.10.4.1: a MOV to CR4 that changes PGE invalidates all TLB entries,
    # global ones included -- on ptemu's TLB, seen as a CR4 change at the next fill.
    image = Image()
    cr4 = ptemu.CpuState.long_mode(cr4=ptemu.CR4_PGE).cr4
    flush = mov_imm(RAX, cr4 & ~ptemu.CR4_PGE) + MOV_CR4_RAX
    begin, until = remap_program(image, P | W | NX | G, flush)
    cpu, pt = both(image, begin, until, cpu_kw={"cr4": ptemu.CR4_PGE})
    assert pt.reg(X.UC_X86_REG_RBX) == 0xBBBB
    assert pt.link.stats["events"]["cr4"] == 1
    assert pt.mmu.tlb.stats.flushes_by_cause["cr4"] == 1 and not pt.mmu.cpu.cr4 & ptemu.CR4_PGE


# -- random programs on both MMUs (hypothesis; QEMU's walk as the reference) -----------------
from hypothesis import event, given, settings, strategies as st  # noqa: E402

PAGE_FLAGS = st.sampled_from([0, P, P | W, P | U, P | W | U, P | NX, P | W | NX, P | W | U | NX])
OPS = st.lists(st.tuples(st.sampled_from(["load", "store", "movsb"]), st.integers(0, 7),
                         st.integers(0, 4095), st.integers(0, 7), st.integers(1, 40)),
               min_size=1, max_size=6)


def _random_program(ops):
    code = b""
    for kind, page, offset, page2, count in ops:
        va = DATA + page * 0x1000 + offset
        if kind == "load":
            code += mov_imm(RDI, va) + b"\x48\x8b\x1f"                 # mov rbx, [rdi]
        elif kind == "store":
            code += mov_imm(RDI, va) + mov_imm(RCX, va) + MOV_M_RDI_RCX
        else:
            code += (mov_imm(RSI, DATA + page2 * 0x1000 + offset) + mov_imm(RDI, va)
                     + mov_imm(RCX, count) + REP_MOVSB)
    return code


@settings(max_examples=max(5, settings.default.max_examples // 4))
@given(flags=st.lists(PAGE_FLAGS, min_size=8, max_size=8), ops=OPS, user=st.booleans(),
       wp=st.booleans(), smap=st.booleans())
def test_random_programs_are_identical(flags, ops, user, wp, smap):
    # SDM 4.6/4.7/4.8 on both walks: the same faults (vector and CR2), registers
    # and memory (A bits of faulting walks aside, see same_memory).
    image = Image()
    for i, f in enumerate(flags):
        image.pt.map(DATA + i * 0x1000, DATA_PA + i * 0x1000, flags=f)
    image.mem.write(DATA_PA, bytes(range(256)) * 128)
    code = _random_program(ops)
    cpu_kw = {"cr0": ptemu.CR0_PG | ptemu.CR0_PE | (ptemu.CR0_WP if wp else 0),
              "cr4": ptemu.CR4_SMAP if smap else 0}
    kw = dict(cpu_kw=cpu_kw, model=X.UC_CPU_X86_BROADWELL)
    if user:
        begin, until = user_program(image, code)
        kw["user_entry"] = UCODE
    else:
        begin, until = kernel(image, code)
    cpu, pt = both(image, begin, until, **kw)
    event("fault %s" % (pt.link.fault.error_code if pt.fault else None))
