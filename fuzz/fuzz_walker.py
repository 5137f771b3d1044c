#!/usr/bin/env python3
"""Fuzz the walker, the batch API and the access-stream engine (issue 5).

One input builds: a physical memory (its size, possibly invalid; paging
entries whose address fields mostly point at its own pages, with arbitrary
flag, reserved and key bits; raw byte blobs), a CPU state (CR0/CR3/CR4/EFER,
CPL, AC, PKRU, PKRS, MAXPHYADDR -- including combinations CpuState must
refuse), an optional TLB of some geometry, and then a short program of
operations: translate, walk_entries, translate_many (valid and malformed
arrays), run (traces, start, pa outputs -- read-only too), MOV CR0/CR3/CR4,
INVLPG, INVPCID, stores into the tables, register assignments, TLB flushes,
mappings(); sparse layouts (op_sparse): the same memory cut into
segments with holes between them, at arbitrary (unaligned) offsets of one
buffer standing for an image file, with zero-filled tails -- the segment map
of csrc/physmap.c; and the same memory as guest-physical memory behind an
EPT (op_nested) whose entries may be missing, lack rights or be
misconfigured -- the 2-D walk of csrc/ept.c.

Oracles, checked on every input:
  * no crash and no sanitizer report (run it under tools/sanitize.sh);
  * only the documented exceptions: ptemu.InvalidInput, ptemu.PageFault,
    ptemu.GeneralProtection -- anything else is a finding;
  * a call refused with InvalidInput changed neither memory nor the TLB
    (valid entries and statistics);
  * results are well formed (vector 0/13/14 and exit_reason 0 -- nothing
    exits without an EPT --, pa of a fault 0, page offset preserved, run's
    index in range), a probe (update_ad=False) writes no memory,
    translate_many agrees with translate element by element;
  * agreement with the pure-Python reference walker tests/refwalk.py on a
    TLB-less walk (pa, page size, level, #GP/#PF and error code, and the
    memory after the A/D updates), when the state is one refwalk models;
  * sparse memory agrees with plain memory whose holes are zeroed: equal
    walks (results and A/D writes) while every entry read lies wholly in one
    segment, and the bus fault (#PF P|RSVD, cause "outside-memory", at that
    level) where the plain walk read one that does not; translate_many and
    run agree with the scalar walk; with word-aligned boundaries the listings
    (mappings, info tlb, info mem) are equal;
  * nested memory: vector is 0, 13, 14 or PTEMU_VEC_EXIT, exit_reason is
    48/49 exactly where vector is PTEMU_VEC_EXIT (an EPT exit is never read
    as a translation or as an exception), translate_many equals translate
    (EptExit included), run stops at an exit with its reason; a nested
    translation or #PF is the plain walk's, its pa the EPT's host address of
    the plain pa, and with every frame mapped RWX a plain translation inside
    memory translates nested too.

Run:  python fuzz/fuzz_walker.py -max_total_time=60 [CORPUS_DIR]
      tools/sanitize.sh --run python fuzz/fuzz_walker.py ...   (under ASan/UBSan)
      fuzz/run.sh walker 60                                    (the CI time box)
"""
import itertools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ByteInput, Finding, U64, ROOT, main, instrumented, feedback_tree  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tests"))
try:
    import refwalk  # noqa: E402
except ImportError:  # pragma: no cover - refwalk is part of the test suite
    refwalk = None

import ptemu  # noqa: E402
from ptemu import bits  # noqa: E402
from ptemu._native import ffi as _ffi, lib as _lib, EptExit  # noqa: E402
from ptemu.ept import Ept  # noqa: E402

DOCUMENTED = (ptemu.InvalidInput, ptemu.PageFault, ptemu.GeneralProtection)
FAULTS = (ptemu.PageFault, ptemu.GeneralProtection)
VEC_GP, VEC_PF = ptemu.GeneralProtection.vector, ptemu.PageFault.vector
VEC_EXIT = _lib.PTEMU_VEC_EXIT          # an EPT exit's vector field: no exception
EXIT_REASONS = (_lib.PTEMU_EXIT_EPT_VIOLATION, _lib.PTEMU_EXIT_EPT_MISCONFIG)

PAGE = 4096
SIZES = (0x1000, 0x2000, 0x3000, 0x4000, 0x6000, 0x8000)
ODD_SIZES = (0, 4, 8, 12, 0x18, 0x1ff8, 0x2004, 0x2ff8)
HOT_INDEX = (0, 1, 2, 255, 256, 257, 510, 511)
CR4_KNOBS = (bits.CR4_PGE, bits.CR4_PCIDE, bits.CR4_SMEP, bits.CR4_SMAP, bits.CR4_PKE,
             bits.CR4_PKS, bits.CR4_LA57, bits.CR4_PSE)
TRACE = ptemu.TRACE_DTYPE
LONG_CR0 = bits.CR0_PG | bits.CR0_PE
LONG_EFER = bits.EFER_LME | bits.EFER_LMA


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------
def _index(inp):
    b = inp.u8()
    if b & 0x80:
        return ((b & 0x7f) << 2 | inp.u8() & 3) & 511
    return HOT_INDEX[b & 7]


def _entry(inp, npages):
    """A paging-structure entry: flags, an address (mostly one of our own
    pages), and sometimes XD, a protection key or reserved bits."""
    ctl = inp.u8()
    flags = inp.u16() & 0xfff & ~bits.PTE_PS
    if ctl & 7:                                          # present 7 times in 8
        flags |= bits.PTE_P
    where = ctl >> 3 & 7
    if where == 0:
        addr = inp.u64() & 0x000ffffffffff000          # anywhere in 52 bits
    elif where == 1:
        addr = (inp.u8() % (npages + 2)) * PAGE          # own pages, or just past the end
    else:
        addr = (inp.u8() % npages) * PAGE
    if ctl & 0xc0 == 0xc0:                               # a 2 MiB / 1 GiB leaf
        flags |= bits.PTE_PS
    high = 0
    ctl2 = inp.u8()
    if ctl2 & 1:
        high |= bits.PTE_NX
    if ctl2 & 2:
        high |= (ctl2 >> 2 & 15) << bits.PTE_PKEY_SHIFT
    if ctl2 & 0xc0 == 0xc0 and ctl2 & 2 == 0:           # reserved bits, 1 time in 8
        high |= inp.u64() & 0x7ff0000000000000 | (inp.u16() & 0x1ff) << 12
    return (addr | flags | high) & U64


def _va(inp, ctx):
    """A virtual address: one a path was built for, or indices from a hot
    set; canonical most of the time."""
    ctl = inp.u8()
    if ctl & 0xe0 == 0xe0:
        return inp.u64()                                  # anything at all
    la57 = ctx.la57
    if ctl & 0x18 and ctx.vas:
        va = ctx.vas[inp.u8() % len(ctx.vas)]
        if ctl & 0x20:
            va ^= inp.u16() & 0xfff if ctl & 1 else (inp.u8() & 7) << 12
        return va
    levels = 5 if la57 else 4
    va = inp.u16() & 0xfff if ctl & 1 else 0
    for level in range(1, levels + 1):
        va |= _index(inp) << (12 + 9 * (level - 1))
    width = 12 + 9 * levels
    if va >> (width - 1) & 1 and not ctl & 6 == 6:
        va |= U64 & ~((1 << width) - 1)                   # sign-extend
    elif ctl & 6 == 6:
        va |= U64 & ~((1 << width) - 1)                   # upper half, maybe bit w-1 clear
    return va & U64


def _memory(inp):
    """A PhysicalMemory (or the InvalidInput a bad size must give)."""
    ctl = inp.u8()
    size = ODD_SIZES[ctl >> 1 & 7] if ctl & 1 and ctl & 0x10 else SIZES[(ctl >> 1 & 7) % 6]
    if size == 0 or size % 8:
        try:
            ptemu.PhysicalMemory(size)
        except ptemu.InvalidInput:
            return None
        raise Finding("PhysicalMemory(%d) was accepted" % size)
    mem = ptemu.PhysicalMemory(size)
    npages = max(1, size // PAGE)
    words = mem.array[:size // 8 * 8].view(np.uint64)
    for _ in range(inp.below(40)):
        slot = (inp.u8() % npages) * 512 + _index(inp)
        if slot < len(words):
            words[slot] = _entry(inp, npages)
    if inp.u8() & 0xf == 0:                               # a raw blob somewhere
        blob = inp.bytes(inp.below(64))
        off = inp.u16() % size
        blob = blob[:size - off]
        mem.array[off:off + len(blob)] = np.frombuffer(blob, np.uint8)
    return mem


def _cpu_args(inp, npages):
    """Keyword arguments of a CpuState: mostly 64-bit mode with some of the
    CR4/EFER knobs, sometimes raw register values (InvalidInput expected
    for unmodelled or contradictory states)."""
    ctl = inp.u8()
    kw = {}
    if ctl & 0xf == 0xf:
        kw.update(cr0=inp.u64() if ctl & 8 else inp.u32(), cr4=inp.u32() if ctl & 0x10 else 0,
                  efer=inp.u16() & 0xfff)
    elif ctl & 0xf == 0xe:
        kw.update(cr0=0, cr4=0, efer=0)                   # paging off
    else:
        knobs = inp.u8()
        cr4 = bits.CR4_PAE
        for i, k in enumerate(CR4_KNOBS):
            if knobs >> i & 1:
                cr4 |= k
        cr0 = LONG_CR0 | (bits.CR0_WP if ctl & 8 else 0)
        efer = LONG_EFER | (bits.EFER_NXE if ctl & 0x10 else 0)
        if ctl & 0x20 and ctl & 0x40:
            efer &= ~bits.EFER_LMA                        # given or not: hardware sets it
        kw.update(cr0=cr0, cr4=cr4, efer=efer)
    cr3 = (inp.u8() % (npages + 1 if npages > 2 else npages)) * PAGE
    c3 = inp.u8()
    if c3 & 1:
        cr3 |= inp.u16() & 0xfff                          # PCID or PWT/PCD
    if c3 & 0x6 == 0x6:
        cr3 = inp.u64()
    kw["cr3"] = cr3
    m = inp.u8()
    kw["maxphyaddr"] = 32 + m % 21 if m < 0xf0 else m % 64 + (0 if m & 1 else 40)
    c = inp.u8()
    kw["cpl"] = c & 3 if c < 0xfc else (-1 if c == 0xfc else c)
    kw["ac"] = bool(c & 4)
    p = inp.u8()
    kw["pkru"] = inp.u32() if p & 1 else 0
    kw["pkrs"] = inp.u32() if p & 2 else 0
    if p & 0xfc == 0xfc:
        kw["pkru"] = inp.u64() | 1 << 40                  # too wide
    kw["eager_accessed"] = bool(p & 0x10) and bool(p & 0x20)
    return kw


def _paths(inp, ctx):
    """Write whole walks: for a few addresses, an entry at every level from
    CR3 down, each pointing at another of our pages (with the usual odd
    bits), so that random bytes reach deep walks and leaves."""
    mem = ctx.mem
    size = mem.size
    npages = max(1, size // PAGE)
    words = mem.array[:size // 8 * 8].view(np.uint64)
    levels = 5 if ctx.la57 else 4
    for _ in range(1 + inp.below(4)):
        va = _va(inp, ctx)
        ctx.vas.append(va)
        table = ctx.cpu.cr3 & 0x000ffffffffff000
        for level in range(levels, 0, -1):
            slot = (table + ((va >> (12 + 9 * (level - 1))) & 511) * 8) >> 3
            if slot >= len(words):
                break
            e = _entry(inp, npages)
            if level > 3 or level == 1:
                e &= ~bits.PTE_PS if level > 3 and not e >> 62 & 1 else U64
            words[slot] = e
            if not e & bits.PTE_P or e & bits.PTE_PS and level <= 3:
                break
            table = e & 0x000ffffffffff000


def _tlb(inp):
    k = inp.below(8)
    if k < 3:
        return None
    if k < 5:
        return ptemu.Tlb.simple(entries=16, ways=4, psc=bool(k & 1))
    if k == 5:
        return ptemu.Tlb.default()
    if k == 6:
        return ptemu.Tlb([ptemu.TlbArray("one", 1, "unified", ("4K", "2M", "1G"), 1, 1)],
                         psc={2: (1, 1), 4: (1, 1)})
    return ptemu.Tlb([ptemu.TlbArray("d", 1, "data", ("4K",), 4, 2),
                      ptemu.TlbArray("i", 1, "fetch", ("2M", "1G"), 2, 2),
                      ptemu.TlbArray("s", 2, "unified", ("4K", "2M"), 8, 2)],
                     psc={3: (2, 2), 5: (2, 1)})


ACCESSES = ("r", "w", "x")


def _access(inp):
    b = inp.u8()
    if b == 0xff:
        return "q"                                        # not an access kind
    return ACCESSES[b % 3]


def _user(inp):
    b = inp.u8() % 4
    return (None, True, False, None)[b]


# ---------------------------------------------------------------------------
# Feedback: distinct harness branches for distinct C outcomes, so that the
# coverage-guided engine (which sees Python coverage only) keeps inputs that
# reach new walk results -- small binary trees of `if`s over 6-bit
# signatures (atheris instruments a function in time that grows fast with
# its size, so several small trees rather than one big one).
# ---------------------------------------------------------------------------
_fb_fault = feedback_tree(6, "fault_cause_level")
_fb_ec = feedback_tree(6, "fault_error_code")
_fb_ok = feedback_tree(6, "translation_kind")
_fb_misc = feedback_tree(5, "misc")
_CAUSES = {"not-present": 1, "reserved-bit": 2, "protection": 3, "outside-memory": 4}


def _feedback(sig):
    _fb_misc(sig)


def _note_fault(exc):
    if isinstance(exc, ptemu.GeneralProtection):
        _fb_misc(1)
    else:
        _fb_fault(_CAUSES.get(exc.cause, 0) | (exc.level & 7) << 3)
        _fb_ec(exc.error_code & 0x3f)


def _note_ok(t, acc):
    _fb_ok((t.level & 3) | t.tlb_hit << 2 | t.rights << 3 & 0x38)
    _fb_misc(8 | ACCESSES.index(acc) << 1 | (t.tlb_hit and t.rights & 1))


# ---------------------------------------------------------------------------
# The program
# ---------------------------------------------------------------------------
class Ctx:
    __slots__ = ("mem", "cpu", "tlb", "mmu", "la57", "vas")

    def snapshot(self):
        """Memory, the whole TLB (counters and every entry) and the CPU
        state, as bytes."""
        parts = [self.mem.array.tobytes(), bytes(_ffi.buffer(self.cpu.c_handle))]
        tlb = self.tlb
        if tlb is not None:
            parts.append(bytes(_ffi.buffer(tlb.c_handle)))
            parts.extend(bytes(_ffi.buffer(k)) for k in tlb._keep)
        return parts


def _refused(ctx, what, fn, *args, **kw):
    """Call fn; an InvalidInput must leave memory, TLB and CPU as they were."""
    before = ctx.snapshot()
    try:
        return fn(*args, **kw)
    except ptemu.InvalidInput:
        if ctx.snapshot() != before:
            raise Finding("%s raised InvalidInput but changed memory, TLB or CPU state" % what)
        return None


def _check_translation(t, va):
    if t.page_size not in (PAGE, 1 << 21, 1 << 30):
        raise Finding("page size %#x" % t.page_size)
    if (t.pa ^ va) & (t.page_size - 1) and t.level:
        raise Finding("page offset of %#x not preserved in %#x" % (va, t.pa))
    if not 0 <= t.pa <= U64 or not 0 <= t.level <= 3:
        raise Finding("malformed translation %r" % (t,))


def op_translate(inp, ctx):
    va = _va(inp, ctx)
    acc = _access(inp)
    user = _user(inp)
    f = inp.u8()
    update_ad = not f & 1
    implicit = f & 6 == 6
    probe_mem = ctx.mem.array.tobytes() if not update_ad else None
    try:
        t = _refused(ctx, "translate", ctx.mmu.translate, va, acc, user, update_ad, implicit)
    except FAULTS as exc:
        _note_fault(exc)
        t = None
    else:
        if t is not None:
            _check_translation(t, va)
            _note_ok(t, acc)
    if probe_mem is not None and ctx.mem.array.tobytes() != probe_mem:
        raise Finding("translate(update_ad=False) wrote memory")


def op_walk_entries(inp, ctx):
    va = _va(inp, ctx)
    before = ctx.mem.array.tobytes()
    try:
        entries, res = ctx.mmu.walk_entries(va, _access(inp), _user(inp))
    except (ptemu.GeneralProtection, ptemu.InvalidInput):
        return
    if len(entries) > 5:
        raise Finding("walk_entries returned %d entries" % len(entries))
    if ctx.mem.array.tobytes() != before:
        raise Finding("walk_entries wrote memory")


def _bad_array(inp, arr):
    """Some malformed version of arr, or arr itself."""
    k = inp.u8()
    if k < 0xe0:
        return arr, False
    k &= 7
    if k == 0:
        return arr.astype(np.int64), True
    if k == 1:
        return arr.astype(arr.dtype.newbyteorder(">")), True
    if k == 2:
        return np.repeat(arr, 2)[::2], len(arr) > 1
    if k == 3:
        return arr.reshape(1, -1), True
    if k == 4:
        return list(arr.tolist()), False                  # a list is fine for vas
    if k == 5:
        return arr.astype(np.float64), True
    if k == 6:
        ro = arr.copy()
        ro.flags.writeable = False
        return ro, False                                  # read-only input is fine
    return arr.astype(np.uint32), True


def op_translate_many(inp, ctx):
    n = inp.below(17)
    vas = np.array([_va(inp, ctx) for _ in range(n)], dtype=np.uint64)
    vas, bad = _bad_array(inp, vas)
    a = inp.u8()
    if a < 0xc0:
        access = ACCESSES[a % 3]
    else:
        access = np.array([inp.below(3) if a & 1 else inp.u8() % 4 for _ in range(n)],
                          dtype=np.uint8)
        if a & 0x1e == 0x1e:
            access = np.array([ACCESSES[x % 3].encode() for x in access], dtype="S1")
    user = _user(inp)
    update_ad = not inp.u8() & 1
    before = ctx.mem.array.tobytes() if not update_ad else None
    res = _refused(ctx, "translate_many", ctx.mmu.translate_many, vas, access, user, update_ad)
    if res is None:
        return
    if bad:
        raise Finding("translate_many accepted a malformed vas array")
    m = len(res.pa)
    if not (len(res.vector) == len(res.error_code) == len(res.exit_reason) == m == n):
        raise Finding("translate_many result lengths")
    if res.pa.dtype != np.uint64 or res.vector.dtype != np.uint8 or \
            res.error_code.dtype != np.uint32 or res.exit_reason.dtype != np.uint16:
        raise Finding("translate_many result dtypes")
    if not np.isin(res.vector, (0, VEC_GP, VEC_PF)).all():
        raise Finding("vector outside 0/13/14: %r" % res.vector)
    if res.exit_reason.any():
        raise Finding("an exit reason without an EPT: %r" % res.exit_reason)
    if (res.pa[res.vector != 0] != 0).any() or (res.error_code[res.vector == 0] != 0).any():
        raise Finding("a fault with a pa, or a translation with an error code")
    if (res.error_code[res.vector == VEC_GP] != 0).any():
        raise Finding("#GP with a non-zero error code")
    for v in res.vector.tolist():
        _feedback(16 | v & 15)
    if before is not None:
        if ctx.mem.array.tobytes() != before:
            raise Finding("translate_many(update_ad=False) wrote memory")
        if ctx.tlb is None and n:
            # A TLB-less probe is a pure function of memory and state: it
            # must match translate() element by element.
            accs = [access] * n if isinstance(access, str) else \
                [ACCESSES[int(x)] if not isinstance(x, bytes) else x.decode() for x in
                 (access.tolist() if access.dtype != np.dtype("S1") else list(access))]
            for i, va in enumerate(np.asarray(vas, dtype=np.uint64).tolist()):
                try:
                    t = ctx.mmu.translate(va, accs[i], user, update_ad=False)
                    got = (0, t.pa, 0)
                except ptemu.PageFault as exc:
                    got = (VEC_PF, 0, exc.error_code)
                except ptemu.GeneralProtection:
                    got = (VEC_GP, 0, 0)
                want = (int(res.vector[i]), int(res.pa[i]), int(res.error_code[i]))
                if got != want:
                    raise Finding("translate_many[%d] %r != translate %r for va %#x"
                                  % (i, want, got, va))


def op_run(inp, ctx):
    n = inp.below(17)
    trace = np.zeros(n, dtype=TRACE)
    for i in range(n):
        trace[i] = (_va(inp, ctx), inp.below(3) if inp.u8() < 0xfe else 3, inp.bool())
    k = inp.u8()
    start = k % (n + 1) if k < 0xf8 else (n + 1 + (k & 3) if k & 4 else -1)
    p = inp.u8() & 7
    pa = None
    bad = start > n or start < 0 or trace["access"].max(initial=0) > 2
    if p == 1:
        pa = np.full(n, 0x5a5a, dtype=np.uint64)
    elif p == 2:
        pa = np.zeros(n, dtype=np.uint64)
        pa.flags.writeable = False
        bad = True
    elif p == 3:
        pa = np.zeros(n + 1, dtype=np.uint64)
        bad = True
    elif p == 4:
        pa = np.zeros(n, dtype=np.int64)
        bad = True
    t = trace
    if inp.u8() == 0xff:
        t = trace.astype([("va", "<u8"), ("access", "u1"), ("user", "?")])  # packed
        bad = True
    res = _refused(ctx, "run", ctx.mmu.run, t, start, pa)
    if res is None:
        return
    if bad:
        raise Finding("run accepted bad arguments (start %r, pa %r)" % (start, p))
    if not start <= res.index <= n:
        raise Finding("run index %d outside %d..%d" % (res.index, start, n))
    if res.exit_reason:
        raise Finding("run reported an exit reason without an EPT: %r" % (res,))
    if res.index < n:
        if res.vector not in (VEC_GP, VEC_PF) or not isinstance(res.fault, FAULTS):
            raise Finding("run stopped without a fault: %r" % (res,))
        if res.vector == VEC_PF and res.cr2 != int(trace["va"][res.index]):
            raise Finding("run's CR2 %#x is not the faulting va" % res.cr2)
        _note_fault(res.fault)
    elif res.vector != 0:
        raise Finding("run completed with vector %d" % res.vector)
    if pa is not None and n and res.index > start:
        done = pa[start:res.index]
        if ctx.cpu.levels == 0 and (done != trace["va"][start:res.index]).any():
            raise Finding("paging off: pa != va")


def op_cr3(inp, ctx):
    k = inp.u8()
    v = (inp.u8() % 12) * PAGE | (inp.u16() & 0xfff if k & 1 else 0)
    if k & 2:
        v |= 1 << 63
    if k & 0xf0 == 0xf0:
        v = inp.u64()
    try:
        _refused(ctx, "write_cr3", ctx.mmu.write_cr3, v)
    except ptemu.GeneralProtection:
        pass


def op_cr4(inp, ctx):
    k = inp.u8()
    v = ctx.cpu.cr4 ^ CR4_KNOBS[k & 7]
    if k & 0x80:
        v = inp.u64() if k & 0x40 else inp.u32()
    try:
        _refused(ctx, "write_cr4", ctx.mmu.write_cr4, v)
    except ptemu.GeneralProtection:
        pass
    ctx.la57 = bool(ctx.cpu.cr4 & bits.CR4_LA57)


def op_cr0(inp, ctx):
    k = inp.u8()
    v = ctx.cpu.cr0 ^ (bits.CR0_WP if k & 1 else 0) ^ (bits.CR0_PG if k & 2 else 0)
    if k & 0xf0 == 0xf0:
        v = inp.u64()
    try:
        _refused(ctx, "write_cr0", ctx.mmu.write_cr0, v)
    except ptemu.GeneralProtection:
        pass


def op_invlpg(inp, ctx):
    _refused(ctx, "invlpg", ctx.mmu.invlpg, _va(inp, ctx))


def op_invpcid(inp, ctx):
    k = inp.u8()
    kind = k % 4 if k < 0xf0 else k % 9
    pcid = inp.u16() & (0xfff if k & 0x10 else 0x1fff)
    if not k & 0x20:
        pcid &= 7
    try:
        _refused(ctx, "invpcid", ctx.mmu.invpcid, kind, pcid, _va(inp, ctx))
    except ptemu.GeneralProtection:
        pass


def op_store(inp, ctx):
    size = ctx.mem.size
    k = inp.u8()
    pa = (inp.u8() % max(1, size // PAGE)) * PAGE + _index(inp) * 8
    if k & 0x80:
        pa = inp.u64() if k & 0x40 else size - (k & 0xf)
    value = _entry(inp, max(1, size // PAGE)) if k & 1 else inp.u64()
    if k & 0x3c == 0x3c:
        value = -value - 1 if k & 2 else value + (1 << 64)
    _refused(ctx, "write_u64", ctx.mem.write_u64, pa, value)


def op_assign(inp, ctx):
    k = inp.below(8)
    cpu = ctx.cpu
    v = inp.u32()
    names = ("cpl", "ac", "pkru", "pkrs", "maxphyaddr", "cr3", "eager_accessed", "efer")
    name = names[k]
    if name == "cpl":
        v = v & 3 if v & 0x100 else v % 6 - 1
    elif name == "maxphyaddr":
        v = v % 64
    elif name == "cr3":
        v = inp.u64() if v & 1 else (v >> 1) % 12 * PAGE
    elif name in ("ac", "eager_accessed"):
        v = bool(v & 1)
    elif name == "efer":
        v = cpu.efer ^ (bits.EFER_NXE if v & 1 else 0) ^ (v & 0x1000 if v & 2 else 0)
    _refused(ctx, "CpuState.%s =" % name, setattr, cpu, name, v)


def op_tlb(inp, ctx):
    if ctx.tlb is None:
        return
    k = inp.below(3)
    if k == 0:
        ctx.tlb.flush_all()
        if ctx.tlb.valid_entries():
            raise Finding("flush_all left valid entries")
    elif k == 1:
        s = ctx.tlb.stats
        if s.hits != s.l1_hits + s.l2_hits or s.lookups < s.hits:
            raise Finding("inconsistent TLB statistics %r" % (s,))
    else:
        ctx.tlb.reset_stats()


def op_mappings(inp, ctx):
    before = ctx.mem.array.tobytes()
    last = None
    for m in itertools.islice(ctx.mmu.mappings(), 32):
        key = m.va      # ascending sign-extended order: the lower half, then the upper
        if last is not None and key <= last:
            raise Finding("mappings() out of order at %#x" % m.va)
        last = key
    if ctx.mem.array.tobytes() != before:
        raise Finding("mappings() wrote memory")


def _reference_state_ok(cpu):
    return (refwalk is not None and not cpu.eager_accessed)


def op_reference(inp, ctx):
    """One TLB-less walk against tests/refwalk.py, A/D bits included."""
    cpu = ctx.cpu
    if not _reference_state_ok(cpu):
        return
    va = _va(inp, ctx)
    acc = ACCESSES[inp.below(3)]
    user = _user(inp)
    f = inp.u8()
    implicit = f & 6 == 6
    update_ad = not f & 1
    image = ctx.mem.array.tobytes()
    copy = ptemu.PhysicalMemory(len(image))
    copy.array[:] = ctx.mem.array
    mmu = ptemu.Mmu(copy, cpu)
    try:
        t = mmu.translate(va, acc, user, update_ad=update_ad, implicit=implicit)
        got = ("ok", t.pa, t.page_size, t.level)
    except ptemu.PageFault as exc:
        got = ("pf", exc.error_code)
    except ptemu.GeneralProtection:
        got = ("gp",)
    out, after = refwalk.walk_cpu(image, cpu, va, acc, user=user, implicit=implicit,
                                  update_ad=update_ad)
    want = out.as_tuple()[:4] if out.as_tuple()[0] == "ok" else out.as_tuple()[:2]
    if got != want:
        raise Finding("va %#x %s user=%r implicit=%r: ptemu %r, refwalk %r (cpu %r)"
                      % (va, acc, user, implicit, got, want, cpu))
    if copy.array.tobytes() != bytes(after):
        raise Finding("va %#x %s: memory after the walk differs from refwalk's (A/D bits)"
                      % (va, acc))


def _sparse_layout(inp, size):
    """Segments [(pa, file offset, filesz, memsz)] over 0..size with holes,
    and the length of the 'file' they lie in: boundaries mostly 8-aligned
    (sometimes not), offsets anywhere, sometimes a tail past the file part."""
    cuts = sorted({(inp.u16() * 8 if inp.u8() & 7 else inp.u16()) % size
                   for _ in range(1 + inp.below(7))} | {0, size})
    segs, off = [], inp.below(64)
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        if b <= a or (k and inp.u8() & 3 == 0):      # this piece is a hole
            continue
        n = b - a
        fs = n - (inp.below(n + 1) if inp.u8() & 7 == 0 else 0)
        segs.append((a, off, fs, n))
        off += fs + inp.below(24)
    return segs, off


def _parts(segs):
    """The runs of bytes the C core sees for `segs` (PhysicalMemory._from_segments's
    rule): a segment's file part up to the word boundary at or below its end, then
    its zero tail as a part of its own; file parts back to back in memory and in
    the file are one run."""
    parts = []
    for a, off, fs, m in segs:
        if m > fs:
            split = max(a, (a + fs) & ~7)
            fs = split - a
        if fs:
            if parts and parts[-1][2] is not None and parts[-1][0] + parts[-1][1] == a \
                    and parts[-1][2] + parts[-1][1] == off:
                parts[-1] = (parts[-1][0], parts[-1][1] + fs, parts[-1][2])
            else:
                parts.append((a, fs, off))
        if m > fs:
            parts.append((a + fs, m - fs, None))
    return parts


def _inside_one(segs, pa):
    """A word is in memory when all its 8 bytes lie in one run (physmap.c)."""
    return any(a <= pa and pa + 8 <= a + n for a, n, _off in _parts(segs))


def op_sparse(inp, ctx):
    """The memory as a sparse image; see the module docstring's oracle."""
    plain = ctx.mem
    size = plain.size
    segs, flen = _sparse_layout(inp, size)
    if not segs:
        return
    ref = ptemu.PhysicalMemory(size)                    # holes zeroed
    file = np.zeros(max(flen, 1), dtype=np.uint8)
    for a, off, fs, m in segs:
        ref.array[a:a + m] = plain.array[a:a + m]
        ref.array[a + fs:a + m] = 0                     # a zero tail reads zeros
        file[off:off + fs] = plain.array[a:a + fs]
    sp = ptemu.PhysicalMemory._from_segments("<fuzz>", segs, _file=file)
    for a, _off, _fs, m in segs:
        if sp.read(a, m) != ref.read(a, m):
            raise Finding("sparse read of %#x..%#x differs from the bytes it holds" % (a, a + m))
    cpu = ctx.cpu
    vas = [_va(inp, ctx) for _ in range(1 + inp.below(6))]
    acc = ACCESSES[inp.below(3)]
    update_ad = bool(inp.u8() & 1)
    m_ref, m_sp = ptemu.Mmu(ref, cpu), ptemu.Mmu(sp, cpu)
    got = []
    any_hole = False
    for va in vas:
        try:
            entries, _res = m_ref.walk_entries(va, acc)
        except ptemu.GeneralProtection:
            entries = []
        outcome = []
        for m in (m_ref, m_sp):
            try:
                t = m.translate(va, acc, update_ad=update_ad)
                outcome.append(("ok", t.pa, t.page_size, t.level))
            except ptemu.PageFault as exc:
                outcome.append(("pf", exc.error_code, exc.cause, exc.level))
            except ptemu.GeneralProtection:
                outcome.append(("gp",))
        got.append(outcome[1])
        levels = cpu.levels
        hole = [i for i, (epa, _v) in enumerate(entries) if not _inside_one(segs, epa)]
        any_hole = any_hole or bool(hole)
        if hole:
            level = levels - hole[0]
            o = outcome[1]
            if not (o[0] == "pf" and o[2] == "outside-memory" and o[3] == level
                    and o[1] & (bits.PF_P | bits.PF_RSVD) == bits.PF_P | bits.PF_RSVD):
                raise Finding("va %#x %s: the level-%d entry at %#x is in a hole, sparse walk "
                              "gave %r" % (va, acc, level, entries[hole[0]][0], o))
        elif outcome[0] != outcome[1]:
            raise Finding("va %#x %s: plain %r, sparse %r (segments %r)"
                          % (va, acc, outcome[0], outcome[1], segs))
        # Past a hole the plain reference may set A bits eagerly that the
        # sparse walk, stopped there, does not: memory is compared only while
        # every walk so far stayed in memory.
        for a, _off, _fs, m in segs:
            if not any_hole and sp.read(a, m) != ref.read(a, m):
                raise Finding("va %#x %s: memory after the walk differs in %#x..%#x"
                              % (va, acc, a, a + m))
    # The batch paths over the same memory, now that A/D are where they end up.
    arr = np.array(vas, dtype=np.uint64)
    res = m_sp.translate_many(arr, acc, update_ad=False)
    for k, va in enumerate(vas):
        try:
            pa = m_sp.translate(va, acc, update_ad=False).pa
            want = (0, pa)
        except ptemu.MmuFault as exc:
            want = (exc.vector, 0)
        if (int(res.vector[k]), int(res.pa[k])) != want:
            raise Finding("translate_many of sparse memory at %#x: %r, scalar %r"
                          % (va, (int(res.vector[k]), int(res.pa[k])), want))
    trace = np.zeros(len(vas), dtype=TRACE)
    trace["va"] = arr
    trace["access"] = ACCESSES.index(acc)
    runs = [ptemu.Mmu(m, cpu, ptemu.Tlb.default() if ctx.tlb else None).run(trace)
            for m in (ref, sp)]
    if not 0 <= runs[1].index <= len(vas):
        raise Finding("run over sparse memory returned index %d" % runs[1].index)
    # Where a walk reaches a hole the sparse walk stops there; the plain one
    # reads zeros on and (with QEMU's eager A) may set A bits above it, so
    # memory is compared only for walks that stay in memory.
    if runs[0].index < runs[1].index or (runs[0].index == runs[1].index and not any_hole and any(
            sp.read(a, m) != ref.read(a, m) for a, _o, _f, m in segs)):
        raise Finding("run over sparse memory went further (%d) than plain (%d), or wrote "
                      "other A/D bits" % (runs[1].index, runs[0].index))
    if cpu.paging and all(a % 8 == 0 and m % 8 == 0 for a, _o, _f, m in segs):
        from ptemu.pagetable import info_tlb, info_mem
        if (info_tlb(m_sp), info_mem(m_sp)) != (info_tlb(m_ref), info_mem(m_ref)):
            raise Finding("listings of sparse memory differ from plain (segments %r)" % segs)
        # mappings() skips a table not wholly in memory (PhysicalMemory.table)
        if all(a % PAGE == 0 and m % PAGE == 0 for a, _o, _f, m in segs) and \
                list(m_sp.mappings()) != list(m_ref.mappings()):
            raise Finding("mappings() of sparse memory differ from plain (segments %r)" % segs)


NESTED_TABLES = 8          # EPT table frames: one per level for guest memory this small


def _host_frame(g, npages):
    """Host frame of guest frame g: reversed, so a skipped EPT lands wrong."""
    return npages - 1 - g


def _outcome(mmu, va, acc):
    """(vector, exit_reason, pa, error_code) of one probe translate()."""
    try:
        return (0, 0, mmu.translate(va, acc, update_ad=False).pa, 0)
    except EptExit as exc:
        if exc.vector != VEC_EXIT or exc.exit_reason not in EXIT_REASONS:
            raise Finding("EptExit with vector %r, exit reason %r" % (exc.vector, exc.exit_reason))
        return (VEC_EXIT, exc.exit_reason, 0, exc.qualification & 0xffffffff)
    except ptemu.GeneralProtection:
        return (VEC_GP, 0, 0, 0)
    except ptemu.PageFault as exc:
        return (VEC_PF, 0, 0, exc.error_code)


def op_nested(inp, ctx):
    """The memory as guest-physical memory behind an EPT; see the module
    docstring's oracle."""
    plain = ctx.mem
    size = plain.size
    if size % PAGE:
        return
    npages = size // PAGE
    host = ptemu.PhysicalMemory(size + NESTED_TABLES * PAGE)
    ept = Ept(host, size, size + NESTED_TABLES * PAGE, levels=5 if inp.bool() else 4,
              ad=inp.bool())
    all_rwx = True
    for g in range(npages):
        ctl = inp.u8()
        hpa = _host_frame(g, npages) * PAGE
        host.array[hpa:hpa + PAGE] = plain.array[g * PAGE:(g + 1) * PAGE]
        if ctl < 0xc0:                                  # mapped RWX, write-back
            ept.map(g * PAGE, hpa)
            continue
        all_rwx = False
        if ctl < 0xf0:                                  # fewer rights (010b, 110b misconfigure)
            ept.map(g * PAGE, hpa, rwx=ctl & 7)
        elif ctl < 0xff:                                # a reserved memory type: misconfigured
            ept.map(g * PAGE, hpa, memtype=7)
        # 0xff: not mapped at all
    gmem = ptemu.PhysicalMemory.nested(ept, size)
    cpu = ctx.cpu
    m_n, m_p = ptemu.Mmu(gmem, cpu), ptemu.Mmu(plain, cpu)
    vas = [_va(inp, ctx) for _ in range(1 + inp.below(6))]
    acc = ACCESSES[inp.below(3)]
    res = m_n.translate_many(np.array(vas, dtype=np.uint64), acc, update_ad=False)
    if not np.isin(res.vector, (0, VEC_GP, VEC_PF, VEC_EXIT)).all():
        raise Finding("nested vector outside 0/13/14/VEC_EXIT: %r" % res.vector)
    if ((res.exit_reason != 0) != (res.vector == VEC_EXIT)).any() or \
            not np.isin(res.exit_reason, (0,) + EXIT_REASONS).all():
        raise Finding("exit reasons %r for vectors %r" % (res.exit_reason, res.vector))
    if (res.ok != ((res.vector == 0) & (res.exit_reason == 0))).any() or \
            (res.pa[~res.ok] != 0).any():
        raise Finding("an exit or fault read as a translation: %r" % (res,))
    for k, va in enumerate(vas):
        got = _outcome(m_n, va, acc)
        want = (int(res.vector[k]), int(res.exit_reason[k]), int(res.pa[k]),
                int(res.error_code[k]))
        if got != want:
            raise Finding("nested translate_many[%d] %r != translate %r for va %#x"
                          % (k, want, got, va))
        _feedback(32 | got[1] & 1 | (got[0] == VEC_PF) << 1)
        ref = _outcome(m_p, va, acc)
        if got[0] == 0:
            if ref[0] != 0 or ept.host_address(ref[2]) != got[2]:
                raise Finding("va %#x %s: nested pa %#x, plain %r (EPT of it %r)"
                              % (va, acc, got[2], ref, ref[0] == 0 and ept.host_address(ref[2])))
        elif got[0] == VEC_PF and ref != got:
            raise Finding("va %#x %s: nested #PF %r, plain %r" % (va, acc, got, ref))
        elif all_rwx and ref[0] == 0 and ref[2] < size:
            raise Finding("va %#x %s: plain translates to %#x inside memory, every frame "
                          "mapped RWX, nested %r" % (va, acc, ref[2], got))
    trace = np.zeros(len(vas), dtype=TRACE)
    trace["va"] = vas
    trace["access"] = ACCESSES.index(acc)
    run = ptemu.Mmu(gmem, cpu, ptemu.Tlb.default() if inp.bool() else None).run(trace)
    if run.index == len(vas):
        if run.vector or run.exit_reason or run.fault is not None:
            raise Finding("nested run completed with %r" % (run,))
    elif run.vector == VEC_EXIT:
        if not isinstance(run.fault, EptExit) or run.exit_reason != run.fault.exit_reason:
            raise Finding("nested run stopped at an exit: %r" % (run,))
    elif run.vector not in (VEC_GP, VEC_PF) or run.exit_reason or \
            not isinstance(run.fault, FAULTS):
        raise Finding("nested run stopped with %r" % (run,))


def _instrument_ops():
    g = globals()
    for name in [n for n in g if n.startswith("op_") or n.startswith("_") and n[1:2].islower()
                 and n != "_instrument_ops" and callable(g[n])
                 and getattr(g[n], "__module__", None) == __name__]:
        g[name] = instrumented(g[name])


_instrument_ops()

OPS = (op_translate, op_translate, op_translate, op_translate_many, op_run, op_cr3, op_cr4,
       op_cr0, op_invlpg, op_invpcid, op_store, op_assign, op_tlb, op_walk_entries,
       op_mappings, op_reference, op_reference, op_translate_many, op_sparse, op_nested)


@instrumented
def one_input(data):
    inp = ByteInput(data)
    mem = _memory(inp)
    if mem is None:
        return
    npages = max(1, mem.size // PAGE)
    kw = _cpu_args(inp, npages)
    try:
        cpu = ptemu.CpuState(**kw)
    except ptemu.InvalidInput:
        _feedback(0)
        return
    ctx = Ctx()
    ctx.mem, ctx.cpu, ctx.tlb = mem, cpu, _tlb(inp)
    ctx.la57 = bool(cpu.cr4 & bits.CR4_LA57)
    ctx.vas = []
    _paths(inp, ctx)
    ctx.mmu = ptemu.Mmu(mem, cpu, ctx.tlb)
    for _ in range(1 + inp.below(8)):
        op = OPS[inp.u8() % len(OPS)]
        try:
            op(inp, ctx)
        except Finding:
            raise
        except DOCUMENTED:
            # Documented exceptions are fine wherever the op did not expect
            # them (e.g. a walk faulting inside a helper).
            pass
        if inp.left == 0:
            break


if __name__ == "__main__":
    main(one_input, max_len=2048)
