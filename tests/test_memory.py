"""PhysicalMemory (API.md "Memory"): zero-filled buffers, bounds-checked
accessors, the shared numpy view, and memory-mapped image files.

Entries are little-endian 64-bit words (SDM Vol. 3A 4.5: paging-structure
entries are 8 bytes; x86 is little-endian), so read_u64/write_u64 and the
byte view must agree in that order.
"""
import os

import numpy as np
import pytest

import ptemu
from ptemu import CpuState, Mmu, PhysicalMemory
from ptemu.pagetable import PageTableBuilder

P, W, U, A, D = ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_A, ptemu.PTE_D


# ------------------------------------------------------------ construction --

def test_zero_filled():
    mem = PhysicalMemory(1 << 16)
    assert mem.size == 1 << 16 == len(mem)
    assert mem.read(0, 1 << 16) == bytes(1 << 16)
    assert mem.read_u64((1 << 16) - 8) == 0


@pytest.mark.parametrize("size", [0, 4, 12, 4097, -8, -1])
def test_bad_sizes_raise_invalid_input(size):
    """Size 0, not a multiple of 8 (entries are 8-byte words), or negative."""
    with pytest.raises(ptemu.InvalidInput):
        PhysicalMemory(size)


@pytest.mark.parametrize("size", [1.5, "4096", None, True])
def test_non_integer_size_invalid(size):
    with pytest.raises(ptemu.InvalidInput):
        PhysicalMemory(size)


def test_invalid_input_is_value_error():
    with pytest.raises(ValueError):
        PhysicalMemory(3)


@pytest.mark.parametrize("size", [8, 24, 0x5008])
def test_small_and_odd_sizes_accepted(size):
    mem = PhysicalMemory(size)
    assert mem.size == size
    mem.write_u64(size - 8, 0x1122334455667788)
    assert mem.read_u64(size - 8) == 0x1122334455667788


# ------------------------------------------------------- bounds checks -----

def test_read_write_bounds():
    mem = PhysicalMemory(0x1000)
    assert mem.read(0xff8, 8) == bytes(8)
    assert mem.read(0x1000, 0) == b""
    mem.write(0xffc, b"\1\2\3\4")
    with pytest.raises(ptemu.InvalidInput):
        mem.read(0xffc, 8)
    with pytest.raises(ptemu.InvalidInput):
        mem.read(0x1000, 1)
    with pytest.raises(ptemu.InvalidInput):
        mem.write(0xffd, b"\0\0\0\0")
    with pytest.raises(ptemu.InvalidInput):
        mem.write(1 << 64, b"\0")
    with pytest.raises(ptemu.InvalidInput):
        mem.read(-1, 1)
    with pytest.raises(ptemu.InvalidInput):
        mem.read((1 << 64) - 1, 2)        # would wrap around in 64 bits
    assert mem.read(0xffc, 4) == b"\1\2\3\4"


def test_u64_bounds():
    mem = PhysicalMemory(0x1000)
    mem.write_u64(0xff8, 1)
    assert mem.read_u64(0xff8) == 1
    for pa in (0xff9, 0xffc, 0x1000, (1 << 64) - 1, (1 << 64) - 8):
        with pytest.raises(ptemu.InvalidInput):
            mem.read_u64(pa)
        with pytest.raises(ptemu.InvalidInput):
            mem.write_u64(pa, 0)
    for pa in (-8, 1 << 64):
        with pytest.raises(ptemu.InvalidInput):
            mem.read_u64(pa)


@pytest.mark.parametrize("value", [-1, 1 << 64, 2.0, "1"])
def test_write_u64_bad_values(value):
    mem = PhysicalMemory(64)
    with pytest.raises(ptemu.InvalidInput):
        mem.write_u64(0, value)
    assert mem.read_u64(0) == 0


def test_unaligned_u64_inside_is_fine():
    """Physical accessors are byte-addressed; an unaligned word inside
    memory is read and written like any other."""
    mem = PhysicalMemory(64)
    mem.write_u64(3, 0xffee_ddcc_bbaa_9988)
    assert mem.read(3, 8) == bytes.fromhex("8899aabbccddeeff")
    assert mem.read_u64(3) == 0xffee_ddcc_bbaa_9988


# ------------------------------------------------------------- sharing -----

def test_array_is_shared_little_endian():
    mem = PhysicalMemory(64)
    arr = mem.array
    assert arr.dtype == np.uint8 and arr.shape == (64,)
    mem.write_u64(8, 0x0102030405060708)
    assert arr[8:16].tolist() == [8, 7, 6, 5, 4, 3, 2, 1]
    arr[16:24] = [0xef, 0xbe, 0xad, 0xde, 0, 0, 0, 0]
    assert mem.read_u64(16) == 0xdeadbeef
    assert mem.array is arr or np.shares_memory(mem.array, arr)


def test_walker_sees_array_writes():
    """The C walker reads the same buffer: an entry written through .array
    is used by the next translation (SDM 4.5: entries are read from memory)."""
    mem = PhysicalMemory(1 << 16)
    b = PageTableBuilder(mem)
    b.map(0x1000, 0x8000, flags=P | W)
    mmu = Mmu(mem, CpuState.long_mode(cr3=b.cr3))
    assert mmu.translate(0x1000).pa == 0x8000
    pte = b.entry_pa(0x1000, 1)
    mem.array[pte:pte + 8] = np.frombuffer((0x9000 | P | W).to_bytes(8, "little"), np.uint8)
    assert mmu.translate(0x1000).pa == 0x9000


def test_from_array_shares():
    arr = np.zeros(4096, dtype=np.uint8)
    mem = PhysicalMemory.from_array(arr)
    mem.write_u64(0, 0xabcd)
    assert arr[0] == 0xcd and arr[1] == 0xab
    with pytest.raises(ptemu.InvalidInput):
        PhysicalMemory.from_array(np.zeros(12, dtype=np.uint8))
    with pytest.raises(ptemu.InvalidInput):
        PhysicalMemory.from_array(np.zeros(16, dtype=np.uint16))


# ---------------------------------------------------------- image files ----

def make_image(path):
    """A 64 KiB raw image with one 4 KiB mapping VA -> 0x8000, no A/D yet."""
    mem = PhysicalMemory(1 << 16)
    b = PageTableBuilder(mem)
    b.map(0x0000_0000_4020_3000, 0x8000, flags=P | W | U)
    path.write_bytes(mem.array.tobytes())
    return b.cr3, b.entry_pa(0x0000_0000_4020_3000, 1)


VA_IMG = 0x0000_0000_4020_3000


def test_sparse_4g_file_opens_and_reads_high(tmp_path):
    """from_file maps without reading: a sparse 4 GiB file opens; a read near
    the top returns its (zero) contents."""
    p = tmp_path / "sparse.img"
    with open(p, "wb") as f:
        f.truncate(4 << 30)
        f.seek((4 << 30) - 4096)
        f.write((0x1234_5678_9abc_def0).to_bytes(8, "little"))
    mem = PhysicalMemory.from_file(p)
    assert mem.size == 4 << 30
    assert mem.read_u64((4 << 30) - 4096) == 0x1234_5678_9abc_def0
    assert mem.read_u64((4 << 30) - 8) == 0
    assert mem.read(3 << 30, 16) == bytes(16)
    with pytest.raises(ptemu.InvalidInput):
        mem.read_u64(4 << 30)


def test_from_file_readonly_keeps_ad_out_of_file(tmp_path):
    """writable=False (default): A/D written by a walk (SDM 4.8) land in the
    private mapping -- visible to later reads of this memory -- but never in
    the file."""
    p = tmp_path / "ro.img"
    cr3, pte = make_image(p)
    original = p.read_bytes()
    mem = PhysicalMemory.from_file(p)
    mmu = Mmu(mem, CpuState.long_mode(cr3=cr3))
    assert mmu.translate(VA_IMG + 5, "w").pa == 0x8005
    assert mem.read_u64(pte) == 0x8000 | P | W | U | A | D
    mem.flush()
    del mmu, mem
    assert p.read_bytes() == original


def test_from_file_writable_writes_through(tmp_path):
    """writable=True: A/D reach the file after flush()."""
    p = tmp_path / "rw.img"
    cr3, pte = make_image(p)
    mem = PhysicalMemory.from_file(p, writable=True)
    mmu = Mmu(mem, CpuState.long_mode(cr3=cr3))
    mmu.translate(VA_IMG, "w")
    mem.flush()
    data = p.read_bytes()
    assert int.from_bytes(data[pte:pte + 8], "little") == 0x8000 | P | W | U | A | D
    # the PML4E at cr3 + 0 got A as well
    assert int.from_bytes(data[cr3:cr3 + 8], "little") & A


def test_missing_file(tmp_path):
    with pytest.raises(ptemu.ImageError):
        PhysicalMemory.from_file(tmp_path / "nope.img")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.img"
    p.write_bytes(b"")
    with pytest.raises(ptemu.ImageError):
        PhysicalMemory.from_file(p)


@pytest.mark.parametrize("size", [8, 4095, 4100, 8192 + 8])
def test_size_not_page_multiple(tmp_path, size):
    p = tmp_path / "odd.img"
    p.write_bytes(bytes(size))
    with pytest.raises(ptemu.ImageError):
        PhysicalMemory.from_file(p)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ptemu.ImageError):
        PhysicalMemory.from_file(tmp_path)


def test_image_error_is_oserror(tmp_path):
    with pytest.raises(OSError):
        PhysicalMemory.from_file(os.fspath(tmp_path / "missing"))
