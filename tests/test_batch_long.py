"""translate_many over a long batch (issue 12): batches of at least four
chunks of csrc/batch.c's quick loop time its two strategies (one address at
a time, and QUICK_LANES at a time) and go on with the faster, so a long
batch runs both, in an order that depends on the machine.  Either way the
result must be that of translating the addresses one after another (API.md):
the same pa, vector and error code for each, and the same A/D bits set in
memory (SDM 4.8: A in every entry a successful walk used, D in the leaf of a
write) -- checked here against scalar translate on a copy of the memory.

The image (PageTableBuilder) maps 96 pages, 4 KiB, 2 MiB and 1 GiB, with
every combination of R/W, U/S, XD, A and D in the leaves, and tables whose A
bit is clear for some; a third of the addresses fall outside them (not
present) or are non-canonical (#GP).
"""
import numpy as np

import ptemu
from ptemu.pagetable import PageTableBuilder

N = 20_000     # >= 4 chunks of 4096: the loop times both of its strategies (x y y x)


def _image(seed):
    rng = np.random.default_rng(seed)
    mem = ptemu.PhysicalMemory(4 << 20)
    b = PageTableBuilder(mem, table_start=2 << 20)
    vas = []
    for k in range(96):
        size = (4096, 4096, 2 << 20, 1 << 30)[k % 4]
        va = (int(rng.integers(1, 1 << 20)) << 30) + (k % 7) * size
        va &= (1 << 47) - 1
        va -= va % size
        flags = ptemu.PTE_P
        for bit in (ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_A, ptemu.PTE_D, ptemu.PTE_NX):
            if rng.random() < 0.6:
                flags |= bit
        tflags = ptemu.PTE_P | ptemu.PTE_W | ptemu.PTE_U | (ptemu.PTE_A if k % 3 else 0)
        try:
            b.map(va, (k + 1) * size, page_size=size, flags=flags, table_flags=tflags)
        except ptemu.InvalidInput:
            continue
        vas.append(va)
    return mem, b.cr3, vas, rng


def test_long_batch_equals_one_by_one():
    mem, cr3, pages, rng = _image(12)
    # Each 4096-address chunk (the loop's unit: one strategy per chunk) uses
    # pages of its own, so the A/D bits its walks set are set by no later
    # chunk: whichever strategy ran it, memory shows what it did.
    chunks = (N + 4095) // 4096
    per = len(pages) // chunks
    choice = (np.arange(N) // 4096) * per + rng.integers(0, per, size=N)
    vas = np.array([pages[i] + int(o) for i, o in
                    zip(choice, rng.integers(0, 4096, size=N))], dtype=np.uint64)
    stray = rng.random(N) < 0.25
    vas[stray] = rng.integers(0, 1 << 47, size=int(stray.sum()), dtype=np.uint64)
    noncanon = rng.random(N) < 0.03
    vas[noncanon] |= np.uint64(1 << 50)
    access = rng.integers(0, 3, size=N, dtype=np.uint8)
    twin = ptemu.PhysicalMemory(mem.size)
    twin.array[:] = mem.array
    cpu = ptemu.CpuState.long_mode(cr3=cr3, cpl=3)
    res = ptemu.Mmu(mem, cpu).translate_many(vas, access)
    one = ptemu.Mmu(twin, cpu.copy())
    pa, vec, ec = [], [], []
    for va, acc in zip(vas.tolist(), access.tolist()):
        try:
            pa.append(one.translate(va, "rwx"[acc]).pa)
            vec.append(0)
            ec.append(0)
        except ptemu.MmuFault as exc:
            pa.append(0)
            vec.append(exc.vector)
            ec.append(exc.error_code)
    assert res.vector.tolist() == vec
    assert res.error_code.tolist() == ec
    assert res.pa.tolist() == pa
    assert np.array_equal(mem.array, twin.array)     # the same A/D bits set
    # the batch exercised what it claims to: successes, faults, #GP, A/D writes
    assert 0 < vec.count(0) < N and 13 in vec and 14 in vec
    assert not np.array_equal(mem.array, _image(12)[0].array)
