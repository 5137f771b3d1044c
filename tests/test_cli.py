"""The `ptemu` command line: demo, translate, tlb, mem, and its errors.

Expected walks follow SDM 4.5 (4-level/5-level walk, leaves), 4.6 (rights)
and 4.7 (#PF error code: P bit 0, W/R bit 1, U/S bit 2); the tlb/mem lines
follow QEMU's monitor.c formats (see tests/test_listings.py).  All derived
by hand from the entries written below.
"""
import io
import os
import shutil
import struct
import subprocess
import sys
import time

import hashlib
import json

import pytest

from ptemu import cli

import elfcore

P, W, U, A, PS, G, NX = 0x1, 0x2, 0x4, 0x20, 0x80, 0x100, 1 << 63


def write_image(path, entries, size=0x10000):
    img = bytearray(size)
    for pa, value in entries:
        struct.pack_into("<Q", img, pa, value)
    path.write_bytes(bytes(img))
    return str(path)


# PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000
ENTRIES = [
    (0x1000, 0x2000 | P | W | U),
    (0x2000, 0x3000 | P | W | U),
    (0x3000, 0x4000 | P | W | U),
    (0x3000 + 8, 0x200000 | PS | P | W | G),        # PD[1]: 2 MiB, supervisor
    (0x4000 + 8 * 5, 0x9000 | P | U | A),           # PT[5]: 4 KiB, user read-only
]


@pytest.fixture
def image(tmp_path):
    return write_image(tmp_path / "ram.img", ENTRIES)


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_translate_walk_level_by_level(capsys, image):
    rc, out, err = run(capsys, "translate", image, "--cr3", "0x1000", "0x5123")
    assert rc == 0 and err == ""
    assert out.splitlines() == [
        "va 0x0000000000005123: read, supervisor, 4-level paging",
        "  PML4E @ 0x0000000000001000 = 0x0000000000002007  P W U",
        "  PDPTE @ 0x0000000000002000 = 0x0000000000003007  P W U",
        "  PDE   @ 0x0000000000003000 = 0x0000000000004007  P W U",
        "  PTE   @ 0x0000000000004028 = 0x0000000000009025  P U A",
        "  => pa 0x0000000000009123  (4 KiB page; read-only, user, executable)",
    ]


def test_translate_faults_and_gp(capsys, image):
    rc, out, err = run(capsys, "translate", image, "--cr3", "4096", "--user", "--access", "w",
                       "0x5123", "0x200000")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    # SDM 4.6: a user write needs R/W=1 everywhere -> protection: P|W|U = 0x7
    assert lines[5] == "  => #PF, error code 0x7 (P W U): protection"
    # SDM 4.6: U/S=0 in the PDE -> a user access faults: P|W|U again
    assert lines[7:] == [
        "va 0x0000000000200000: write, user, 4-level paging",
        "  PML4E @ 0x0000000000001000 = 0x0000000000002007  P W U",
        "  PDPTE @ 0x0000000000002000 = 0x0000000000003007  P W U",
        "  PDE   @ 0x0000000000003008 = 0x0000000000200183  P W PS G",
        "  => #PF, error code 0x7 (P W U): protection",
    ]
    rc, out, err = run(capsys, "translate", image, "--cr3", "0x1000", "--access", "x",
                       "0x6000", "0x800000000000")
    assert rc == 0
    lines = out.splitlines()
    # SDM 4.7: P=0 in the PTE -> P clear; a fetch with NXE=1 sets I/D (0x10)
    assert lines[4] == "  PTE   @ 0x0000000000004030 = 0x0000000000000000  -"
    assert lines[5] == "  => #PF, error code 0x10 (I): not-present at the PTE"
    # SDM 4.5.1: bit 47 set, bits 63:48 clear -> not canonical, #GP(0), no walk
    assert lines[7:] == [
        "va 0x0000800000000000: fetch, supervisor, 4-level paging",
        "  => #GP(0): 0x800000000000 is not canonical for 4-level paging (no walk)",
    ]


def test_translate_does_not_write_the_image(capsys, image):
    before = open(image, "rb").read()
    run(capsys, "translate", image, "--cr3", "0x1000", "--access", "w", "0xffffffff", "0x200000")
    assert open(image, "rb").read() == before


def test_tlb_and_mem(capsys, image):
    rc, out, err = run(capsys, "tlb", image, "--cr3", "0x1000")
    assert (rc, err) == (0, "")
    assert out == ("0000000000005000: 0000000000009000 ----A--U-\n"
                   "0000000000200000: 0000000000200000 -GP-----W\n")
    rc, out, err = run(capsys, "mem", image, "--cr3", "0x1000")
    assert (rc, err) == (0, "")
    assert out == ("0000000000005000-0000000000006000 0000000000001000 ur-\n"
                   "0000000000200000-0000000000400000 0000000000200000 -rw\n")


def test_la57_selected_by_cr4(capsys, image):
    # With CR4.LA57 the same tables are read one level higher: 0x1000 is the
    # PML5, 0x3000 the PDPT, whose entry 1 (PS=1) is now a 1 GiB page at
    # VA 1 << 30 with PA 0x200183 & 0x3ffffc0000000 = 0.  0x3000[0] -> 0x4000
    # is a PD whose entry 5 (PS=0) points at a zero page table.
    rc, out, err = run(capsys, "tlb", image, "--cr3", "0x1000", "--cr4", "0x1020")
    assert (rc, err) == (0, "")
    assert out == "0000000040000000: 0000000000000000 -GP-----W\n"
    rc, out, _ = run(capsys, "translate", image, "--cr3", "0x1000", "--cr4", "0x1020",
                     "0x40000123")
    assert out.splitlines()[0] == "va 0x0000000040000123: read, supervisor, 5-level paging"
    assert out.splitlines()[1].startswith("  PML5E @ 0x0000000000001000")
    # QEMU's listing ignores reserved bits; the walk does not: bit 21 of a
    # 1 GiB PDPTE is in the reserved range 29:13 (SDM 4.5, table 4-17), so
    # #PF with P|RSVD (SDM 4.7) = 0x9.
    assert out.splitlines()[-1] == "  => #PF, error code 0x9 (P RSVD): reserved-bit at the PDPTE"


def test_paging_off(capsys, image):
    rc, out, _ = run(capsys, "tlb", image, "--cr3", "0", "--cr0", "1", "--efer", "0")
    assert (rc, out) == (0, "PG disabled\n")
    rc, out, _ = run(capsys, "translate", image, "--cr3", "0", "--cr0", "1", "--efer", "0",
                     "0x1234")
    assert out.splitlines()[-1] == "  => pa 0x0000000000001234  (paging off: physical = linear)"


def test_demo(capsys):
    buf = io.StringIO()
    cli.run_demo(buf)
    text = buf.getvalue()
    # direct map: 1 GiB page at PA 0 -> pa = va - 0xffff888000000000 (SDM 4.5, 1 GiB leaf)
    assert "  => pa 0x0000000012345678  (1 GiB page; writable, supervisor, no-execute)" in text
    # user write to a P|U page: P|W|U (SDM 4.7)
    assert "  => #PF, error code 0x7 (P W U): protection\n" in text
    # not present: error code 0 (supervisor read, P=0)
    assert "  => #PF, error code 0x0 (-): not-present at the PDE\n" in text
    # 2 MiB kernel text page, G=1 and PS=1
    assert "ffffffff80000000: 0000000000200000 -GP-----W\n" in text
    assert "0000000000400000-0000000000401000 0000000000001000 ur-\n" in text
    assert run(capsys, "demo", "--walks")[:2] == (0, text)


def test_demo_is_the_textbook_scenario(capsys):
    """`ptemu demo` runs Modern Operating Systems 7.6: two VMs map guest pages
    10, 11, 12 onto different host frames; VM 1's remap of virtual page 7 onto
    guest page 200 traps because its page-table page is write-protected."""
    rc, out, _ = run(capsys, "demo")
    assert rc == 0
    assert "MOV CR3 is intercepted" in out
    assert "host frames in both: none" in out
    assert "write-protected page table" in out
    assert "virtual page 7 -> guest frame 200" in out


# ---- errors -------------------------------------------------------------------------

def assert_one_line_error(rc, out, err, *fragments):
    assert rc != 0
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("ptemu: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, err


def test_error_missing_file(capsys, tmp_path):
    assert_one_line_error(*run(capsys, "tlb", str(tmp_path / "nope.img"), "--cr3", "0x1000"),
                          "no such file")


def test_error_cr3_outside_image(capsys, image):
    assert_one_line_error(*run(capsys, "mem", image, "--cr3", "0x10000"),
                          "outside the image")
    assert_one_line_error(*run(capsys, "translate", image, "--cr3", "0x7fff000", "0"),
                          "outside the image")


def test_error_bad_numbers(capsys, image):
    assert_one_line_error(*run(capsys, "tlb", image, "--cr3", "0xzz"), "--cr3", "0xzz")
    assert_one_line_error(*run(capsys, "translate", image, "--cr3", "0x1000", "banana"),
                          "banana")
    assert_one_line_error(*run(capsys, "tlb", image, "--cr3", str(1 << 64)), "64 bits")


@pytest.mark.parametrize("argv", [
    ["translate", "IMG", "--cpu", "-1", "0x1000"],
    ["gva2gpa", "IMG", "--cr3", "0x1000", "-1"],
    ["tlb", "IMG", "--cr3", "-4096"],
    ["trace", "record", "-o", "OUT", "--max", "-3", "--", "/bin/true"],
    ["study", "--seed", "-1"],
    ["study", "--jobs", "-2"],
])
def test_error_negative_numbers_say_so(capsys, image, tmp_path, argv):
    # One number parser for every command: a negative number is named as
    # negative, not as one that "does not fit in 64 bits".
    argv = [image if a == "IMG" else str(tmp_path / "t.ptrace") if a == "OUT" else a
            for a in argv]
    assert_one_line_error(*run(capsys, *argv), "must not be negative")
    assert not (tmp_path / "t.ptrace").exists()


def test_error_counts_below_their_minimum(capsys, tmp_path):
    out = tmp_path / "t.ptrace"
    assert_one_line_error(*run(capsys, "trace", "record", "-o", str(out), "--max", "0", "--",
                               "/bin/true"), "--max", "at least 1")
    assert_one_line_error(*run(capsys, "study", "--accesses", "1e6"), "--accesses", "1e6")
    assert not out.exists()


def test_error_bad_flag_combinations(capsys, image):
    # CR0.PG without CR4.PAE would be legacy 32-bit paging (not modelled)
    assert_one_line_error(*run(capsys, "tlb", image, "--cr3", "0x1000", "--cr4", "0"),
                          "PAE")
    # SDM 4.1.1: LA57 is a form of IA-32e paging; it needs PAE
    assert_one_line_error(*run(capsys, "mem", image, "--cr3", "0x1000", "--cr4", "0x1000"),
                          "LA57")
    assert_one_line_error(*run(capsys, "translate", image, "--cr3", "0x1000",
                               "--maxphyaddr", "60", "0"), "maxphyaddr")
    # CR3 bits 62:MAXPHYADDR are reserved (SDM 4.5.2)
    assert_one_line_error(*run(capsys, "translate", image, "--cr3", hex(0x1000 | 1 << 40),
                               "--maxphyaddr", "36", "0"), "reserved")


def test_error_usage(capsys, image):
    assert_one_line_error(*run(capsys))
    assert_one_line_error(*run(capsys, "frobnicate"), "frobnicate")
    rc, out, err = run(capsys, "tlb", image)      # a raw image has no vCPU notes
    assert_one_line_error(rc, out, err, "--cr3", "no vCPU state")
    assert rc == 2
    assert_one_line_error(*run(capsys, "translate", image, "--cr3", "0x1000", "--access", "q",
                               "0"), "q")


def test_error_truncated_elf(capsys, tmp_path):
    hdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF" + bytes([2, 1, 1]) + bytes(9), 4, 62, 1,
                      0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 4, 0x1000, 0, 0, 0x10000, 0x10000, 0)
    path = tmp_path / "core.elf"
    path.write_bytes(hdr + ph + bytes(0x2000))
    assert_one_line_error(*run(capsys, "tlb", str(path), "--cr3", "0x1000"), "truncated")


# ---- QEMU dumps: CPU state from the notes, holes, info, gva2gpa, --json ----------------

GiB = 1 << 30
CPU0 = dict(cr0=0x80050033, cr3=0x1000, cr4=0x6E0, rip=0xFFFFFFFF81000000)
CPU1 = dict(cr0=0x80050033, cr3=0x3000, cr4=0x6E0)


@pytest.fixture
def dump(tmp_path):
    """ENTRIES as a QEMU dump: RAM 0..64 KiB at the unaligned file offset
    0x1498, a hole up to 4 GiB, 4 KiB of RAM there; two vCPUs (CR3 0x1000
    and 0x3000)."""
    low = bytearray(0x10000)
    for pa, value in ENTRIES:
        struct.pack_into("<Q", low, pa, value)
    return elfcore.write_elf(tmp_path / "core.elf",
                             [(0, 0x1498, 0x10000, 0x10000), (4 * GiB, 0x11498, 0x1000, 0x1000)],
                             notes=elfcore.qemu_notes([CPU0, CPU1]), pokes=[(0x1498, bytes(low))])


def test_commands_take_the_cpu_state_from_the_dump(capsys, dump, image):
    # The same listing as the raw image with --cr3 0x1000 (test_tlb_and_mem).
    rc, out, err = run(capsys, "tlb", dump)
    assert (rc, err) == (0, "")
    assert out == run(capsys, "tlb", image, "--cr3", "0x1000")[1]
    assert out == ("0000000000005000: 0000000000009000 ----A--U-\n"
                   "0000000000200000: 0000000000200000 -GP-----W\n")
    assert run(capsys, "mem", dump)[1] == run(capsys, "mem", image, "--cr3", "0x1000")[1]
    # vCPU 1: CR3 0x3000 = the PD above, read as a PML4: entry 0 -> 0x4000
    # (the PT, as a PDPT: entry 0 is 0, so nothing); entry 1 has PS=1, which
    # QEMU ignores in a PML4E -> a "PDPT" at 0x200000, in the hole: reads 0.
    assert run(capsys, "tlb", dump, "--cpu", "1")[:2] == (0, "")
    # An explicit flag overrides the note.
    assert run(capsys, "tlb", dump, "--cpu", "1", "--cr3", "0x1000")[1] == out
    rc, out, _ = run(capsys, "translate", dump, "0x5123")
    assert out.splitlines()[-1] == "  => pa 0x0000000000009123  (4 KiB page; read-only, user, executable)"


def test_info(capsys, dump):
    rc, out, err = run(capsys, "info", dump)
    assert (rc, err) == (0, "")
    assert out.splitlines() == [
        "%s: ELF core (QEMU dump-guest-memory), 68 KiB in 2 ranges, physical addresses up to "
        "0x100000fff" % dump,
        "  range 0x0000000000000000-0x000000000000ffff  64 KiB",
        "  hole  0x0000000000010000-0x00000000ffffffff  4 GiB",
        "  range 0x0000000100000000-0x0000000100000fff  4 KiB",
        "vCPU 0: CR3 0x1000, CR0 0x80050033, CR4 0x6e0, 4-level, RIP 0xffffffff81000000",
        "vCPU 1: CR3 0x3000, CR0 0x80050033, CR4 0x6e0, 4-level, RIP 0x0",
    ]
    rc, out, _ = run(capsys, "info", dump, "--json")
    info = json.loads(out)
    assert info["format"] == "elf" and info["size"] == 4 * GiB + 0x1000
    assert info["present"] == 0x11000
    assert info["holes"] == [{"start": "0x10000", "end": "0xffffffff", "size": "0xffff0000"}]
    assert [c["cr3"] for c in info["cpus"]] == ["0x1000", "0x3000"]
    assert [c["pid"] for c in info["cpus"]] == [1, 2]


def test_info_raw_and_lime(capsys, image, tmp_path):
    rc, out, _ = run(capsys, "info", image)
    assert out.splitlines()[0] == "%s: raw physical memory, 64 KiB in 1 range, physical " \
        "addresses up to 0xffff" % image
    assert out.splitlines()[-1].startswith("vCPUs: none in the image")
    lime = tmp_path / "m.lime"
    elfcore.write_lime(lime, [(0x1000, 0x1000), (0x100000, 0x2000)])
    info = json.loads(run(capsys, "info", str(lime), "--json")[1])
    assert info["format"] == "lime" and [r["start"] for r in info["ranges"]] == ["0x1000",
                                                                                 "0x100000"]


def test_gva2gpa_prints_what_qemu_prints(capsys, dump, image, tmp_path):
    # hmp_gva2gpa: "gpa: 0x%" HWADDR_PRIx "\n" of the debug walk's frame plus
    # the page offset, or "Unmapped".
    assert run(capsys, "gva2gpa", dump, "0x5123") == (0, "gpa: 0x9123\n", "")
    assert run(capsys, "gva2gpa", dump, "0x212345")[1] == "gpa: 0x212345\n"   # 2 MiB page
    assert run(capsys, "gva2gpa", dump, "0x6000")[1] == "Unmapped\n"          # PTE P=0
    assert run(capsys, "gva2gpa", dump, "0x800000000000")[1] == "Unmapped\n"  # not canonical
    # The debug walk ignores reserved bits and rights (target/i386/helper.c
    # x86_cpu_get_phys_page_attrs_debug): a PTE with bit 45 set, reserved
    # with MAXPHYADDR 40 (SDM 4.5.4) so a real walk faults, still maps.
    img = write_image(tmp_path / "r.img", ENTRIES[:3] + [(0x4000 + 8 * 7, 1 << 45 | 0x7000 | P)])
    assert run(capsys, "gva2gpa", img, "--cr3", "0x1000", "--maxphyaddr", "40",
               "0x7abc")[1] == "gpa: 0x200000007abc\n"
    out = run(capsys, "translate", img, "--cr3", "0x1000", "--maxphyaddr", "40", "0x7abc")[1]
    assert "reserved-bit" in out
    # 5-level: the tables read one level higher make PDPT entry 1 a 1 GiB
    # page at VA 1 << 30 (see test_la57_selected_by_cr4): frame 0x200183 &
    # bits 51:30 = 0, plus the offset inside the 1 GiB page.
    assert run(capsys, "gva2gpa", image, "--cr3", "0x1000", "--cr4", "0x1020",
               "0x40000123")[1] == "gpa: 0x123\n"
    # Paging off: the address itself; a zero address prints as 0x0.
    assert run(capsys, "gva2gpa", img, "--cr3", "0", "--cr0", "1", "--efer", "0",
               "0")[1] == "gpa: 0x0\n"


def test_json_outputs(capsys, dump):
    walks = json.loads(run(capsys, "translate", dump, "--json", "--access", "w", "--user",
                           "0x5123", "0x800000000000")[1])
    assert walks["cpu"] == {"cr0": "0x80050033", "cr3": "0x1000", "cr4": "0x6e0",
                            "efer": "0xd00", "levels": 4}
    w0, w1 = walks["walks"]
    assert [e["pa"] for e in w0["entries"]] == ["0x1000", "0x2000", "0x3000", "0x4028"]
    # SDM 4.6/4.7: a user write to a read-only page: P|W|U
    assert w0["fault"] == {"vector": 14, "error_code": 7, "cause": "protection", "level": 0}
    assert w1["fault"]["vector"] == 13 and w1["entries"] == []
    tlb = json.loads(run(capsys, "tlb", dump, "--json")[1])
    assert tlb["mappings"] == [
        {"va": "0x5000", "pa": "0x9000", "page_size": 4096, "flags": "----A--U-"},
        {"va": "0x200000", "pa": "0x200000", "page_size": 2 << 20, "flags": "-GP-----W"}]
    mem = json.loads(run(capsys, "mem", dump, "--json")[1])
    assert mem["ranges"] == [
        {"start": "0x5000", "end": "0x6000", "size": "0x1000", "prot": "ur-"},
        {"start": "0x200000", "end": "0x400000", "size": "0x200000", "prot": "-rw"}]
    off = json.loads(run(capsys, "tlb", dump, "--json", "--cr0", "1", "--efer", "0")[1])
    assert off["paging"] is False and off["mappings"] == []


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_bad_dumps_exit_2_with_one_line(capsys, dump, tmp_path):
    before = _digest(dump)
    rc, out, err = run(capsys, "tlb", dump, "--cpu", "2")
    assert_one_line_error(rc, out, err, dump, "2 vCPUs", "no vCPU 2")
    assert rc == 2
    cases = {
        "size.elf": dict(notes=elfcore.note(b"QEMU", 0, elfcore.qemu_cpustate(cr3=0x1000,
                                                                            declared=440))),
        "eof.elf": dict(file_size=0x1800),
        "overlap.elf": dict(extra=[(0x800, 0x1000, 0x100, 0x100)]),
    }
    for name, kw in cases.items():
        path = elfcore.write_elf(tmp_path / name, [(0, 0x1000, 0x1000, 0x1000)] + kw.pop(
            "extra", []), **kw)
        h = _digest(path)
        for cmd in (["info", path], ["tlb", path, "--cr3", "0x1000"], ["gva2gpa", path, "0"]):
            rc, out, err = run(capsys, *cmd)
            assert_one_line_error(rc, out, err, path)
            assert rc == 2, (name, err)
        assert _digest(path) == h
    lime = tmp_path / "bad.lime"
    lime.write_bytes(elfcore.lime_header(0x2000, 0x1fff - 0x1000) + bytes(0x1000))
    rc, out, err = run(capsys, "info", str(lime))
    assert_one_line_error(rc, out, err, str(lime), "before it starts")
    assert rc == 2
    assert _digest(dump) == before


# ---- big sparse images ---------------------------------------------------------------

def test_sparse_multi_gib_image_is_fast(capsys, tmp_path):
    # 4 GiB, almost all holes; tables at 3 GiB map 2 MiB of 4 KiB pages at
    # VA 0xffff800000000000 and one 1 GiB page at VA 0.
    path = tmp_path / "big.img"
    base = 3 << 30
    with open(path, "wb") as f:
        f.truncate(4 << 30)
        entries = [(base, (base + 0x1000) | P | W),                     # PML4[0]
                   (base + 8 * 256, (base + 0x2000) | P | W),           # PML4[256]
                   (base + 0x1000, 0x40000000 | PS | P | W | NX),       # 1 GiB at VA 0
                   (base + 0x2000, (base + 0x3000) | P | W),            # PDPT -> PD
                   (base + 0x3000, (base + 0x4000) | P | W)]            # PD -> PT
        entries += [(base + 0x4000 + 8 * i, (i << 12) | P | W) for i in range(512)]
        for pa, value in entries:
            f.seek(pa)
            f.write(struct.pack("<Q", value))
    t0 = time.perf_counter()
    rc, out, err = run(capsys, "tlb", str(path), "--cr3", hex(base))
    rc2, out2, err2 = run(capsys, "mem", str(path), "--cr3", hex(base))
    elapsed = time.perf_counter() - t0
    assert (rc, err, rc2, err2) == (0, "", 0, "")
    lines = out.splitlines()
    assert len(lines) == 513
    assert lines[0] == "0000000000000000: 0000000040000000 X-P-----W"
    assert lines[1] == "ffff800000000000: 0000000000000000 --------W"
    assert lines[-1] == "ffff8000001ff000: 00000000001ff000 --------W"
    assert out2 == ("0000000000000000-0000000040000000 0000000040000000 -rw\n"
                    "ffff800000000000-ffff800000200000 0000000000200000 -rw\n")
    assert elapsed < 5.0, elapsed


# ---- the installed console script ------------------------------------------------------

def _console_script():
    exe = shutil.which("ptemu", path=os.path.dirname(sys.executable)) or shutil.which("ptemu")
    if exe is None:
        pytest.skip("the ptemu console script is not installed")
    return exe


def test_console_script(image):
    exe = _console_script()
    r = subprocess.run([exe, "mem", image, "--cr3", "0x1000"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == ("0000000000005000-0000000000006000 0000000000001000 ur-\n"
                        "0000000000200000-0000000000400000 0000000000200000 -rw\n")
    r = subprocess.run([exe, "tlb", image + ".missing", "--cr3", "0x1000"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.startswith("ptemu: error: ") and r.stderr.count("\n") == 1


# ---- the README shows real runs ------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_block(start):
    text = open(os.path.join(ROOT, "README.md")).read()
    at = text.index("```\n" + start)
    return text[at + 4:text.index("\n```\n", at + 4)]


def test_readme_demo_excerpt_is_a_real_run(capsys):
    excerpt = _readme_block("ptemu demo: memory")
    rc, out, _ = run(capsys, "demo")
    lines, pos = out.splitlines(), 0
    for line in excerpt.splitlines():
        if line != "...":
            pos = lines.index(line, pos) + 1          # ValueError: not in the run, in order
    heads = [ln for ln in excerpt.splitlines() if ln.startswith("== ")]
    assert len(heads) == len(set(heads)), heads
    assert "prints all %d lines" % len(lines) in open(os.path.join(ROOT, "README.md")).read()


def test_readme_command_line_examples_are_real_runs(capsys, tmp_path, monkeypatch):
    block = _readme_block("$ python examples/make_dump.py core.elf")
    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "make_dump.py"), "core.elf"],
                   check=True, timeout=120)
    cmds = []
    for line in block.splitlines():
        if line.startswith("$ "):
            cmds.append([line[2:], []])
        else:
            cmds[-1][1].append(line)
    for cmd, want in cmds[1:]:
        head = None
        if " | head -" in cmd:
            cmd, n = cmd.split(" | head -")
            head = int(n)
        status = cmd.endswith("; echo $?")
        argv = cmd.replace("; echo $?", "").split()[1:]
        rc, out, err = run(capsys, *argv)
        got = (out + err).splitlines()
        if head:
            got = got[:head]
        if status:
            got.append(str(rc))
        assert got == want, cmd
