"""Real x86-64 machine code on ptemu's MMU: Unicorn runs the instructions,
ptemu answers every TLB fill (page walk, A/D bits, #PF error code).

    pip install "ptemu[unicorn]" && python examples/unicorn_demo.py

The program (bytes below, no assembler needed) runs in three acts:
  1. a kernel loop that writes and sums four pages;
  2. a store into a copy-on-write page: #PF, a tiny "kernel" in Python copies
     the frame, maps the copy writable, and resumes the store;
  3. SYSRET to user mode, where the code reads a supervisor page: #PF.
"""
import unicorn
from unicorn import x86_const as X

import ptemu
from ptemu.pagetable import PageTableBuilder
from ptemu.unicorn import attach, load_cpu_state

P, W, U, NX, A, D = ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_NX, ptemu.PTE_A, ptemu.PTE_D
KCODE, UCODE, DATA, COW, SECRET = 0xFFFF800000000000, 0x400000, 0x600000, 0x700000, 0x800000


def imm64(reg, value):                       # MOV r64, imm64 (REX.W B8+r)
    return bytes([0x48 | (reg >> 3), 0xB8 + (reg & 7)]) + value.to_bytes(8, "little")


RAX, RCX, RBX, RDI = 0, 1, 3, 7
LOOP = (imm64(RDI, DATA) + imm64(RCX, 4) + imm64(RAX, 0)
        + b"\x48\x89\x0f"                    # 1: mov [rdi], rcx
        + b"\x48\x03\x07"                    #    add rax, [rdi]
        + b"\x48\x81\xc7\x00\x10\x00\x00"    #    add rdi, 4096
        + b"\x48\xff\xc9"                    #    dec rcx
        + b"\x75\xee")                       #    jnz 1b (-18)
COW_STORE = imm64(RDI, COW + 0x10) + imm64(RBX, 0xC0FFEE) + b"\x48\x89\x1f"   # mov [rdi], rbx
TO_USER = imm64(RCX, UCODE) + imm64(11, 0x2) + b"\x48\x0f\x07"             # rcx, r11; sysretq
USER = imm64(RDI, SECRET) + b"\x48\x8b\x07"                                # mov rax, [rdi]


def main():
    mem = ptemu.PhysicalMemory(4 << 20)
    pt = PageTableBuilder(mem, table_start=0x100000, table_end=0x140000)
    kernel_code = LOOP + COW_STORE + TO_USER
    pt.map(KCODE, 0x200000, flags=P)                         # kernel code, read-only
    mem.write(0x200000, kernel_code)
    pt.map(UCODE, 0x201000, flags=P | U)                     # user code
    mem.write(0x201000, USER + b"\x90")
    for i in range(4):
        pt.map(DATA + i * 0x1000, 0x300000 + i * 0x1000, flags=P | W | NX)
    pt.map(COW, 0x310000, flags=P | U | NX)                  # shared frame, read-only
    mem.write(0x310000, b"parent's page ")
    pt.map(SECRET, 0x320000, flags=P | W | NX)               # supervisor only

    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    load_cpu_state(uc, ptemu.CpuState.long_mode(cr3=pt.cr3))
    uc.reg_write(X.UC_X86_REG_MSR, (0xC0000080, uc.reg_read(X.UC_X86_REG_MSR, 0xC0000080) | 1))
    uc.reg_write(X.UC_X86_REG_MSR, (0xC0000081, 0x20 << 48))  # STAR: SYSRET to CS 0x33
    mmu = ptemu.Mmu(mem, ptemu.CpuState(), tlb=ptemu.Tlb.default())
    link = attach(uc, mmu)
    print("ptemu %s is the MMU of Unicorn %s (4-level paging, CR3 %#x)"
          % (ptemu.__version__, unicorn.__version__, pt.cr3))

    print("\n1. The kernel writes and sums four pages:")
    end_loop = KCODE + len(LOOP)
    assert link.emu_start(KCODE, end_loop) is None
    print("   rax = %d (4+3+2+1); each page's PTE now has A and D set by ptemu's walk:"
          % uc.reg_read(X.UC_X86_REG_RAX))
    for i in range(4):
        e = mem.read_u64(pt.entry_pa(DATA + i * 0x1000, 1))
        print("     PTE of %#x = %#018x  A=%d D=%d" % (DATA + i * 0x1000, e, bool(e & A),
                                                        bool(e & D)))

    print("\n2. A store into the copy-on-write page at %#x:" % COW)
    end_cow = end_loop + len(COW_STORE)
    fault = link.emu_start(end_loop, end_cow)
    print("   emulation stopped: %s" % fault)
    print("   RIP = %#x (the store), CR2 = %#x" % (uc.reg_read(X.UC_X86_REG_RIP),
                                                 uc.reg_read(X.UC_X86_REG_CR2)))
    mem.write(0x330000, mem.read(0x310000, 4096))            # copy the frame...
    mem.write_u64(pt.entry_pa(COW, 1), 0x330000 | P | W | U | NX)   # ...map the copy writable
    print("   the Python kernel copies frame 0x310000 to 0x330000, maps it writable, resumes")
    assert link.resume() is None
    print("   the store completed: the copy holds %#x at +0x10, the parent's frame still "
          "reads %r" % (mem.read_u64(0x330010), mem.read(0x310000, 14).decode()))

    print("\n3. SYSRET to user mode; the user code reads the supervisor page %#x:" % SECRET)
    fault = link.emu_start(end_cow, UCODE + len(USER))
    print("   CPL %d: %s" % (mmu.cpu.cpl, fault))

    s = link.stats
    print("\nlink.stats: %d fills (%d reads, %d writes, %d fetches), %d faults, "
          "%d flushes of Unicorn's TLB;" % (s["fills"], s["fills_by_access"]["r"],
                                            s["fills_by_access"]["w"], s["fills_by_access"]["x"],
                                            s["faults"], s["flushes"]))
    t = s["tlb"]
    print("ptemu's TLB: %d lookups, %d hits, %d walks (%d memory references), "
          "%d invalidations by #PF" % (t.lookups, t.hits, t.walks, t.walk_refs,
                                       t.fault_invalidations))


if __name__ == "__main__":
    main()
