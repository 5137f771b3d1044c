"""The `ptemu` command.

    ptemu demo [--walks]               the textbook shadow-paging scenario (--walks:
                                       hand-built page walks, level by level)
    ptemu translate IMAGE [CPU] [--user] [--access r|w|x] [--json] VA...
    ptemu tlb IMAGE [CPU] [--json]      QEMU monitor `info tlb` of the image
    ptemu mem IMAGE [CPU] [--json]      QEMU monitor `info mem` of the image
    ptemu gva2gpa IMAGE [CPU] VA        QEMU monitor `gva2gpa`
    ptemu info IMAGE [--json]           format, ranges and holes, vCPUs

    CPU:  [--cpu N] [--cr3 X] [--cr0 X] [--cr4 X] [--efer X] [--maxphyaddr N]
    ptemu trace record -o OUT [--max N] -- CMD [ARGS...]
                                       record CMD's memory accesses (Valgrind lackey)
    ptemu trace info FILE              a trace file's counts, pages, footprint, command
    ptemu study [CONFIG.toml] [--workload W ...] [--modes native,shadow,...]
                [--accesses N] [--seed S] [--cost-model F] [--json F] [--csv F]
                [--plot F.png] [--jobs N] [--scheduler tcp://HOST:PORT] [--quiet]
                                       the same workloads under every paging mode,
                                       side by side (docs/study.md)

IMAGE is a raw physical-memory image, a QEMU `dump-guest-memory` ELF core or
a LiME file (ptemu.images.open_image), opened read-only: the walks write no
A/D bit anywhere.  Numbers are hex (0x...) or decimal.

The CPU state comes from the image when it carries one (an ELF core's QEMU
notes: vCPU --cpu N, default 0; CpuState.from_image infers EFER as
LME|LMA|NXE for a guest with CR0.PG and CR4.PAE); each flag given overrides
its register.  An image without notes needs --cr3; the other registers then
default to 64-bit mode: CR0 = PG|PE|WP, CR4 = PAE, EFER = LME|LMA|NXE.
CR4.LA57 (0x1000) selects 5-level paging.

Every error is one line on stderr, "ptemu: error: ...", and a non-zero exit
status: 2 for bad input (usage, a malformed image, a CPU state ptemu refuses,
a vCPU the image does not have), 1 for the rest; no traceback.  A page fault
or #GP in `translate` is a result, not an error: it is printed and the exit
status stays 0.
"""
import argparse
import io
import json
import os
import sys

from ptemu import bits
from ptemu._files import check_output
from ptemu._native import PtemuError, InvalidInput, GeneralProtection, MmuFault, decode_error_code
from ptemu.memory import PhysicalMemory
from ptemu.mmu import CpuState, Mmu
from ptemu.pagetable import (PageTableBuilder, iter_info_tlb, iter_info_mem, info_tlb, info_mem,
                             iter_info_tlb_columns, flag_letters)
from ptemu import images

__all__ = ["main", "run_demo", "print_walk", "walk_record", "qemu_gva2gpa"]

DEFAULT_CR0 = bits.CR0_PG | bits.CR0_PE | bits.CR0_WP
DEFAULT_CR4 = bits.CR4_PAE
DEFAULT_EFER = bits.EFER_LME | bits.EFER_LMA | bits.EFER_NXE

_LEVEL_NAMES = {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}
_ACCESS_NAMES = {"r": "read", "w": "write", "x": "fetch"}
_PAGE_NAMES = {1 << 12: "4 KiB", 1 << 21: "2 MiB", 1 << 30: "1 GiB"}


class _Usage(Exception):
    """A command-line error; main prints it as one line."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage and "prog: error: ..." and exits; we want one
    # line, always starting "ptemu: error:", and main to return the status.
    def error(self, message):
        raise _Usage(message)


def _integer(minimum=0, bits=64):
    """An argparse type: a decimal or 0x... integer in [minimum, 2**bits).
    The one number parser of the command line (addresses, registers, counts)."""
    def parse(text):
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(
                "bad number %r (write hex as 0x... or decimal)" % text) from None
        if value < 0 <= minimum:
            raise argparse.ArgumentTypeError("%r must not be negative" % text)
        if value < minimum:
            raise argparse.ArgumentTypeError("must be at least %d, not %r" % (minimum, text))
        if value >> bits:
            raise argparse.ArgumentTypeError("number %r does not fit in %d bits" % (text, bits))
        return value
    return parse


_number = _integer()


def _build_parser():
    p = _Parser(prog="ptemu", description="A reference x86-64 MMU emulator.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", help="shadow paging as Modern Operating Systems 7.6 tells it: "
                                     "two VMs, their shadow tables, every exit")
    d.add_argument("--walks", action="store_true",
                   help="instead: walk a small hand-built image, level by level")
    d.set_defaults(func=_cmd_demo)

    def image_cmd(name, help_, func, json_=True):
        c = sub.add_parser(name, help=help_)
        c.add_argument("image", metavar="IMAGE", help="raw, QEMU ELF dump or LiME image")
        c.add_argument("--cpu", type=_number, default=None,
                       help="the image's vCPU whose registers to use (default 0)")
        c.add_argument("--cr3", type=_number, default=None,
                       help="CR3 (root table address; needed when the image has no vCPU notes)")
        c.add_argument("--cr0", type=_number, default=None,
                       help="CR0 (default: the image's, else %#x: PG|PE|WP)" % DEFAULT_CR0)
        c.add_argument("--cr4", type=_number, default=None,
                       help="CR4 (default: the image's, else %#x: PAE; add 0x1000 for LA57)"
                       % DEFAULT_CR4)
        c.add_argument("--efer", type=_number, default=None,
                       help="EFER (default: inferred from CR0.PG and CR4.PAE, else %#x: "
                       "LME|LMA|NXE)" % DEFAULT_EFER)
        c.add_argument("--maxphyaddr", type=_number, default=52,
                       help="physical-address width, 32..52 (default 52)")
        if json_:
            c.add_argument("--json", action="store_true", help="JSON instead of text")
        c.set_defaults(func=func)
        return c

    t = image_cmd("translate", "translate virtual addresses, showing every level",
                  _cmd_translate)
    t.add_argument("--user", action="store_true", help="user-mode access (CPL 3)")
    t.add_argument("--access", choices=("r", "w", "x"), default="r",
                   help="read, write or fetch (default r)")
    t.add_argument("vas", metavar="VA", nargs="+", type=_number, help="virtual address")
    image_cmd("tlb", "the QEMU monitor's `info tlb` listing", _cmd_tlb)
    image_cmd("mem", "the QEMU monitor's `info mem` listing", _cmd_mem)
    g = image_cmd("gva2gpa", "the QEMU monitor's `gva2gpa VA`", _cmd_gva2gpa, json_=False)
    g.add_argument("va", metavar="VA", type=_number, help="guest virtual address")
    i = sub.add_parser("info", help="an image's format, physical ranges and holes, and vCPUs")
    i.add_argument("image", metavar="IMAGE", help="raw, QEMU ELF dump or LiME image")
    i.add_argument("--json", action="store_true", help="JSON instead of text")
    i.set_defaults(func=_cmd_info)
    _add_trace_commands(sub)
    _add_study_parser(sub)
    return p


# -- walks, printed ------------------------------------------------------------

def walk_record(mmu, va, access="r", user=False):
    """One side-effect-free walk of va as a dict: the entries read (level,
    entry address, value, top first) and the outcome -- "pa" with the page
    size and rights, or the fault ("gp", or "pf" with error code, cause and
    level).  print_walk prints it; --json writes it."""
    levels = mmu.cpu.levels
    rec = {"va": va, "access": access, "user": bool(user), "levels": levels, "entries": []}
    try:
        entries, result = mmu.walk_entries(va, access, user)
    except GeneralProtection:
        rec["fault"] = {"vector": GeneralProtection.vector, "error_code": 0,
                        "cause": "non-canonical"}
        return rec
    # Without a TLB the walk starts at the top level and reads down.
    rec["entries"] = [{"level": level, "pa": epa, "value": value}
                      for level, (epa, value) in zip(range(levels, 0, -1), entries)]
    if isinstance(result, MmuFault):
        rec["fault"] = {"vector": result.vector, "error_code": result.error_code,
                        "cause": result.cause, "level": result.level}
    else:
        rec["pa"] = result.pa
        if levels:
            rec.update(page_size=result.page_size, writable=result.writable,
                       user_page=result.user, executable=result.executable)
    return rec


def print_walk(mmu, va, out, access="r", user=False):
    """Print one side-effect-free walk of va: every entry read, then the PA
    or the fault.  Returns the walk_record."""
    rec = walk_record(mmu, va, access, user)
    levels = rec["levels"]
    out.write("va %#018x: %s, %s, %s\n" % (
        va, _ACCESS_NAMES[access], "user" if user else "supervisor",
        "%d-level paging" % levels if levels else "paging off"))
    fault = rec.get("fault")
    if fault and fault["vector"] == GeneralProtection.vector:
        out.write("  => #GP(0): %#x is not canonical for %d-level paging (no walk)\n"
                  % (va, levels))
        return rec
    for e in rec["entries"]:
        out.write("  %-5s @ %#018x = %#018x  %s\n" % (
            _LEVEL_NAMES[e["level"]], e["pa"], e["value"], bits.decode_entry(e["value"])))
    if fault:
        where = ""
        if fault["level"]:
            where = " at the %s" % _LEVEL_NAMES.get(fault["level"], "level %d" % fault["level"])
        out.write("  => #PF, error code %#x (%s): %s%s\n" % (
            fault["error_code"], decode_error_code(fault["error_code"]), fault["cause"], where))
        return rec
    if not levels:
        out.write("  => pa %#018x  (paging off: physical = linear)\n" % rec["pa"])
        return rec
    out.write("  => pa %#018x  (%s page; %s, %s, %s)\n" % (
        rec["pa"], _PAGE_NAMES.get(rec["page_size"], "%#x" % rec["page_size"]),
        "writable" if rec["writable"] else "read-only",
        "user" if rec["user_page"] else "supervisor",
        "executable" if rec["executable"] else "no-execute"))
    return rec


def run_demo(out):
    """Build a small 4-level image in memory and walk it, writing to `out`.

    The image: a user code page (read-only), a user stack page (no-execute),
    a global 2 MiB kernel text page and a 1 GiB direct-map page.  It shows
    the four walks, a protection fault and a not-present fault with their
    error codes, and the QEMU `info tlb` / `info mem` listings.
    """
    mem = PhysicalMemory(4 << 20)
    b = PageTableBuilder(mem, table_start=0x100000, table_end=0x200000)
    P, W, U, G, NX = bits.PTE_P, bits.PTE_W, bits.PTE_U, bits.PTE_G, bits.PTE_NX
    b.map(0x400000, 0x201000, flags=P | U)                          # user code
    b.map(0x7ffffffde000, 0x202000, flags=P | W | U | NX)           # user stack
    b.map(0xffffffff80000000, 0x200000, 1 << 21, flags=P | W | G)   # kernel text
    b.map(0xffff888000000000, 0, 1 << 30, flags=P | W | G | NX)     # direct map
    cpu = CpuState.long_mode(cr3=b.cr3, cr4=bits.CR4_PGE)
    mmu = Mmu(mem, cpu)
    out.write("ptemu demo: 4-level tables at %#x..%#x, CR3 = %#x\n"
              "(CR0 = %#x, CR4 = %#x, EFER = %#x)\n\n"
              % (b.tables[0], b.tables[-1] + 0xfff, cpu.cr3, cpu.cr0, cpu.cr4, cpu.efer))
    for va, access, user in ((0x400123, "x", True), (0x7ffffffdeff8, "w", True),
                             (0xffffffff80123456, "r", False),
                             (0xffff888012345678, "w", False)):
        print_walk(mmu, va, out, access, user)
        out.write("\n")
    out.write("A user write to the read-only code page (SDM 4.6: R/W=0 at the leaf):\n")
    print_walk(mmu, 0x400123, out, "w", True)
    out.write("\nA read of an address nothing maps (SDM 4.7: P=0 in the error code):\n")
    print_walk(mmu, 0x600000, out, "r", False)
    out.write("\nQEMU `info tlb`:\n")
    out.write(info_tlb(mmu))
    out.write("\nQEMU `info mem`:\n")
    out.write(info_mem(mmu))


# -- commands -------------------------------------------------------------------

def _cmd_demo(args, out):
    if args.walks:
        run_demo(out)
    else:
        from ptemu.hypervisor.demo import run_demo as run_textbook_demo
        run_textbook_demo(out)
    return 0


def _cpu_state(args, mem):
    """The CpuState for an image command: the image's vCPU (--cpu) when it
    has notes, each register flag overriding; else the flags and defaults."""
    regs = {k: getattr(args, k) for k in ("cr0", "cr3", "cr4") if getattr(args, k) is not None}
    if mem.cpus:
        return CpuState.from_image(mem, 0 if args.cpu is None else args.cpu, efer=args.efer,
                                   maxphyaddr=args.maxphyaddr, **regs)
    if args.cpu is not None:
        raise InvalidInput("%s carries no vCPU state (no QEMU notes), so there is no vCPU %d; "
                           "give --cr3 instead" % (args.image, args.cpu))
    if args.cr3 is None:
        raise InvalidInput("%s carries no vCPU state (no QEMU notes): give --cr3 (and --cr0, "
                           "--cr4, --efer if not 64-bit defaults)" % args.image)
    return CpuState(cr0=regs.get("cr0", DEFAULT_CR0), cr3=0, cr4=regs.get("cr4", DEFAULT_CR4),
                    efer=DEFAULT_EFER if args.efer is None else args.efer,
                    maxphyaddr=args.maxphyaddr)


def _open_mmu(args, qemu_root=False):
    mem = images.open_image(args.image, writable=False)
    cpu = _cpu_state(args, mem)
    cr3 = cpu.cr3 if args.cr3 is None else args.cr3
    mmu = Mmu(mem, cpu)
    if cpu.paging:
        try:
            mmu.write_cr3(cr3)          # refuses reserved CR3 bits (#GP) like MOV CR3
        except GeneralProtection as exc:
            raise InvalidInput("CR3 %#x: %s" % (cr3, exc)) from None
        m = 50 if qemu_root else args.maxphyaddr   # QEMU masks CR3 with bits 49:12
        root = cr3 & ((1 << m) - 1) & ~0xFFF
        if not _inside(mem, root, 4096):
            raise InvalidInput(
                "CR3 %#x points outside the image: its root table %#x..%#x is not in the "
                "memory of %s (%s)" % (cr3, root, root + 0xfff, args.image, _ranges_text(mem)))
    else:
        cpu.cr3 = cr3
    return mmu


def _inside(mem, pa, n):
    return any(start <= pa and pa + n <= end for start, end in mem.ranges())


def _ranges_text(mem):
    return ", ".join("%#x..%#x" % (a, b - 1) for a, b in mem.ranges())


def _hex(v):
    return "%#x" % v


def _write_json(obj, out):
    json.dump(obj, out, indent=1)
    out.write("\n")


def _cpu_json(cpu):
    return {"cr0": _hex(cpu.cr0), "cr3": _hex(cpu.cr3), "cr4": _hex(cpu.cr4),
            "efer": _hex(cpu.efer), "levels": cpu.levels}


def _cmd_translate(args, out):
    mmu = _open_mmu(args)
    if args.json:
        recs = [walk_record(mmu, va, args.access, args.user) for va in args.vas]
        for r in recs:
            r["va"] = _hex(r["va"])
            for e in r["entries"]:
                e["pa"], e["value"] = _hex(e["pa"]), _hex(e["value"])
            if "pa" in r:
                r["pa"] = _hex(r["pa"])
        _write_json({"image": args.image, "cpu": _cpu_json(mmu.cpu), "walks": recs}, out)
        return 0
    for i, va in enumerate(args.vas):
        if i:
            out.write("\n")
        print_walk(mmu, va, out, args.access, args.user)
    return 0


def _write_lines(pieces, out):
    # The listings come in pieces of many whole lines (a numpy chunk each).
    for piece in pieces:
        out.write(piece)


def _json_list(head, items, out):
    """{head..., "NAME": [items]} with the list streamed, one item a line, so
    that a listing of millions of mappings never sits in memory whole."""
    name, fields = head
    text = json.dumps(fields, indent=1)
    out.write(text[:-2] + ',\n "%s": [' % name)
    sep = "\n  "
    for item in items:
        out.write(sep + json.dumps(item))
        sep = ",\n  "
    out.write("\n ]\n}\n")


def _cmd_tlb(args, out):
    mmu = _open_mmu(args, qemu_root=True)
    if not args.json:
        _write_lines(iter_info_tlb(mmu), out)
        return 0

    def mappings():
        for va, pa, flags, level in iter_info_tlb_columns(mmu):
            for v, p, f, lv in zip(va.tolist(), pa.tolist(), flag_letters(flags),
                                   level.tolist()):
                yield {"va": _hex(v), "pa": _hex(p), "page_size": 1 << (12 + 9 * (lv - 1)),
                       "flags": f}
    _json_list(("mappings", {"image": args.image, "cpu": _cpu_json(mmu.cpu),
                             "paging": mmu.cpu.paging}), mappings(), out)
    return 0


def _cmd_mem(args, out):
    mmu = _open_mmu(args, qemu_root=True)
    if not args.json:
        _write_lines(iter_info_mem(mmu), out)
        return 0

    def ranges():
        if not mmu.cpu.paging:
            return
        for piece in iter_info_mem(mmu):
            for line in piece.splitlines():
                span, size, prot = line.split()
                start, end = span.split("-")
                yield {"start": _hex(int(start, 16)), "end": _hex(int(end, 16)),
                       "size": _hex(int(size, 16)), "prot": prot}
    _json_list(("ranges", {"image": args.image, "cpu": _cpu_json(mmu.cpu),
                           "paging": mmu.cpu.paging}), ranges(), out)
    return 0


# What target/i386/helper.c x86_cpu_get_phys_page_attrs_debug() does for the
# monitor: a walk that follows only P and PS (no rights, no reserved bits, no
# A/D), entries masked with PG_ADDRESS_MASK (bits 51:12), a non-present entry
# or a non-canonical address "Unmapped"; a read outside RAM reads 0.
_PG_ADDRESS_MASK = 0x000FFFFFFFFFF000


def qemu_gva2gpa(mem, cpu, va):
    """The guest-physical address QEMU's `gva2gpa` gives for va, or None."""
    if not cpu.paging:
        return va

    def load(pa):
        return int(mem.gather_u64([pa & ((1 << 64) - 1)])[0])
    width = 57 if cpu.levels == 5 else 48
    top = va >> (width - 1)
    if top not in (0, (1 << (65 - width)) - 1):
        return None
    table = cpu.cr3 & ~0xFFF
    for level in range(cpu.levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        e = load(table + ((va >> shift) & 0x1FF) * 8)
        if not e & bits.PTE_P:
            return None
        # PS counts in a PDPTE and a PDE only (QEMU does not look at it above).
        if level == 1 or (level <= 3 and e & bits.PTE_PS):
            break
        table = e & _PG_ADDRESS_MASK
    size = 1 << shift
    frame = e & _PG_ADDRESS_MASK & ~(size - 1)
    return frame | (va & ~0xFFF & (size - 1)) | (va & 0xFFF)


def _cmd_gva2gpa(args, out):
    mmu = _open_mmu(args, qemu_root=True)
    gpa = qemu_gva2gpa(mmu.memory, mmu.cpu, args.va)
    # hmp_gva2gpa (monitor/hmp-cmds-target.c): "gpa: 0x%" HWADDR_PRIx or "Unmapped"
    out.write("Unmapped\n" if gpa is None else "gpa: 0x%x\n" % gpa)
    return 0


_FORMAT_NAMES = {"raw": "raw physical memory", "elf": "ELF core (QEMU dump-guest-memory)",
                 "lime": "LiME"}


def _paging_mode(c):
    if c.cr0 is None:
        return "unknown (no control registers)"
    if not c.cr0 & bits.CR0_PG:
        return "paging off"
    if not c.cr4 & bits.CR4_PAE:
        return "32-bit paging (not modelled)"
    return "5-level" if c.cr4 & bits.CR4_LA57 else "4-level"


def _image_info(mem, path):
    ranges = mem.ranges()
    holes = [(a[1], b[0]) for a, b in zip(ranges, ranges[1:])]
    return {
        "image": path, "format": mem.format, "size": mem.size,
        "present": sum(b - a for a, b in ranges),
        "ranges": [{"start": _hex(a), "end": _hex(b - 1), "size": _hex(b - a)} for a, b in ranges],
        "holes": [{"start": _hex(a), "end": _hex(b - 1), "size": _hex(b - a)} for a, b in holes],
        "cpus": [dict(index=c.index, pid=c.pid, paging=_paging_mode(c),
                      **{k: None if getattr(c, k) is None else _hex(getattr(c, k))
                         for k in ("cr0", "cr2", "cr3", "cr4")},
                      rip=_hex(c.regs["rip"]) if "rip" in c.regs else None,
                      note_size=c.note_size) for c in mem.cpus],
    }


def _size_text(n):
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return "%.4g %s" % (n / (1 << shift), unit)
    return "%d bytes" % n


def _cmd_info(args, out):
    mem = images.open_image(args.image, writable=False)
    info = _image_info(mem, args.image)
    if args.json:
        _write_json(info, out)
        return 0
    out.write("%s: %s, %s in %d range%s, physical addresses up to %#x\n"
              % (args.image, _FORMAT_NAMES[info["format"]], _size_text(info["present"]),
                 len(info["ranges"]), "s" if len(info["ranges"]) != 1 else "", info["size"] - 1))
    spans = sorted([("range", r) for r in info["ranges"]] + [("hole", r) for r in info["holes"]],
                   key=lambda kr: int(kr[1]["start"], 16))
    for kind, r in spans:
        out.write("  %-5s %#018x-%#018x  %s\n" % (kind, int(r["start"], 16), int(r["end"], 16),
                                                 _size_text(int(r["size"], 16))))
    if not info["cpus"]:
        out.write("vCPUs: none in the image (give --cr3 to translate, tlb, mem, gva2gpa)\n")
    for c in info["cpus"]:
        if c["cr3"] is None:
            out.write("vCPU %d: no QEMU note (no control registers)\n" % c["index"])
        else:
            out.write("vCPU %d: CR3 %s, CR0 %s, CR4 %s, %s, RIP %s\n" % (
                c["index"], c["cr3"], c["cr0"], c["cr4"], c["paging"], c["rip"]))
    return 0


# -- trace record / trace info (ptemu.traces) -------------------------------------

def _add_trace_commands(sub):
    t = sub.add_parser("trace", help="record a real program's memory accesses (Valgrind "
                                      "lackey) or describe a trace file")
    tsub = t.add_subparsers(dest="trace_command", metavar="SUBCOMMAND")
    tsub.required = True
    r = tsub.add_parser("record", help="run CMD under valgrind --tool=lackey and write its "
                                        "accesses to a trace file",
                        usage="ptemu trace record -o OUT [--max N] -- CMD [ARGS...]")
    r.add_argument("-o", "--output", required=True, metavar="OUT", help="the trace file")
    r.add_argument("--max", type=_integer(minimum=1), default=None, metavar="N",
                   help="stop (and kill CMD) after N accesses")
    r.add_argument("--codec", choices=("zstd", "zlib"), default="zstd",
                   help="chunk compression (default zstd)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD",
                   help="the command and its arguments, after --")
    r.set_defaults(func=_cmd_trace_record)
    i = tsub.add_parser("info", help="accesses by kind, distinct pages, footprint, the "
                                      "command recorded, bytes per access")
    i.add_argument("file", metavar="FILE", help="a trace file (any format ptemu reads)")
    i.add_argument("--json", action="store_true", help="one JSON object instead")
    i.set_defaults(func=_cmd_trace_info)


def _cmd_trace_record(args, out):
    from ptemu import traces
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise _Usage("trace record: no command given (ptemu trace record -o OUT -- CMD ...)")
    check_output(args.output, "trace record -o", _Usage)    # before CMD runs, not after
    try:
        res = traces.record(cmd, args.output, max_accesses=args.max, codec=args.codec)
    except traces.ValgrindMissing as exc:
        raise _Usage(str(exc)) from None
    except InvalidInput as exc:
        raise _Usage(str(exc)) from None
    if res.path is None:
        # CMD never ran: valgrind could not start it.  Nothing was written.
        tail = [ln for ln in res.valgrind_log if ln.strip("=0123456789 ")][-2:]
        sys.stderr.write("ptemu: error: valgrind could not run `%s` (exit status %s)%s; "
                         "nothing written to %s\n"
                         % (" ".join(cmd), res.exit_status if res.signal is None else res.signal,
                            ": " + " / ".join(tail) if tail else "", args.output))
        return 1
    what = "%s accesses of `%s` to %s (%s bytes%s)" % (
        format(res.records, ","), " ".join(cmd), res.path, format(res.file_bytes, ","),
        ", %.2f bytes per access" % (res.file_bytes / res.records) if res.records else "")
    if res.stopped == "max":
        fate = "stopped after --max %d accesses: CMD was killed" % args.max
    elif res.signal is not None:
        fate = "CMD was killed by %s; the trace is valid and holds what it ran" % res.signal
    elif res.exit_status:
        fate = ("CMD failed with exit status %d; the trace is valid and holds what it ran"
                % res.exit_status)
    else:
        fate = "CMD exited with status 0"
    sys.stderr.write("ptemu: recorded %s; %s\n" % (what, fate))
    return 0


def _cmd_trace_info(args, out):
    from ptemu import traces
    try:
        s = traces.trace_summary(args.file)
    except InvalidInput as exc:
        raise _Usage(str(exc)) from None
    fl = s.page_flags
    info = {"file": s.path, "format": s.format, "codec": s.codec, "chunks": s.chunks,
            "complete": s.complete, "command": s.command, "accesses": int(s.records),
            "reads": int(s.reads), "writes": int(s.writes), "fetches": int(s.fetches),
            "supervisor": int(s.supervisor), "distinct_pages": int(len(s.pages)),
            "code_pages": int(((fl & 4) != 0).sum()),
            "written_pages": int(((fl & 2) != 0).sum()),
            "footprint_bytes": int(s.footprint_bytes), "file_bytes": int(s.file_bytes),
            "bytes_per_access": (round(s.file_bytes / s.records, 4) if s.records else None),
            "npy_bytes_per_access": 16, "end": s.end}
    if args.json:
        _write_json(info, out)
        return 0
    n = max(s.records, 1)
    end = s.end or {}
    fate = ""
    if end.get("stopped") == "max":
        fate = "stopped by --max"
    elif end.get("signal"):
        fate = "killed by %s" % end["signal"]
    elif end.get("exit_status") is not None:
        fate = "exit status %d" % end["exit_status"]
    lines = [
        ("file", "%s (%s%s%s)" % (s.path, s.format, ", %s" % s.codec if s.codec else "",
                                  ", %d chunks" % s.chunks if s.chunks is not None else "")),
        ("command", (" ".join(s.command) if s.command else "-") + (" [%s]" % fate
                                                                   if fate else "")),
        ("accesses", "%s: %s reads (%.1f%%), %s writes (%.1f%%), %s fetches (%.1f%%)%s" % (
            format(s.records, ","), format(s.reads, ","), 100.0 * s.reads / n,
            format(s.writes, ","), 100.0 * s.writes / n, format(s.fetches, ","),
            100.0 * s.fetches / n,
            ", %s supervisor" % format(s.supervisor, ",") if s.supervisor else "")),
        ("pages", "%s distinct (%s code, %s written)" % (
            format(info["distinct_pages"], ","), format(info["code_pages"], ","),
            format(info["written_pages"], ","))),
        ("footprint", "%s bytes (%.1f MiB)" % (format(info["footprint_bytes"], ","),
                                              info["footprint_bytes"] / 2.0 ** 20)),
        ("size", "%s bytes: %s bytes per access (a .npy of TRACE_DTYPE: 16)" % (
            format(s.file_bytes, ","),
            "%.3f" % (s.file_bytes / s.records) if s.records else "-")),
    ]
    for k, v in lines:
        out.write("%-10s %s\n" % (k, v))
    return 0


# -- ptemu study ------------------------------------------------------------------

def _add_study_parser(sub):
    s = sub.add_parser("study", help="the same workloads under native, shadow, unsync, "
                                     "paravirtual and nested paging, side by side")
    s.add_argument("config", metavar="CONFIG.toml", nargs="?",
                   help="the grid: workloads x modes x knobs x seeds (docs/study.md)")
    s.add_argument("--workload", action="append", metavar="W",
                   help="context-switch, fork, mmap-churn, tlb-miss or trace:PATH "
                        "(repeat for more; default: the config's, else the four built-in)")
    s.add_argument("--modes", metavar="M,M,...",
                   help="comma-separated, of native,shadow,unsync,paravirt,nested "
                        "(default: all)")
    s.add_argument("--accesses", type=_number, metavar="N",
                   help="guest accesses per cell (default: the config's, else 100000)")
    s.add_argument("--seed", type=_number, metavar="S", help="one seed for every cell")
    s.add_argument("--cost-model", metavar="F.toml", help="cost-model overrides (TOML)")
    s.add_argument("--json", metavar="F", help="write the whole result as JSON")
    s.add_argument("--csv", metavar="F", help="write the rows as CSV")
    s.add_argument("--plot", metavar="F.png", help='write the figure (pip install "ptemu[plot]")')
    s.add_argument("--jobs", type=_number, metavar="N",
                   help="local worker processes (default: all cores)")
    s.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help='run the cells on a Dask cluster (pip install "ptemu[dask]")')
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_cmd_study)


def _cmd_study(args, out):
    from ptemu import study
    try:
        if args.jobs is not None and args.jobs < 1:
            raise study.StudyError("--jobs must be at least 1")
        if args.plot:
            study.require("matplotlib", "plot", "--plot")
        if args.scheduler:
            study.require("distributed", "dask", "--scheduler")
        for opt, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
            if path:                    # refused before the study runs, not after
                check_output(path, opt, study.StudyError)
        modes = None
        if args.modes is not None:
            modes = [m.strip() for m in args.modes.split(",") if m.strip()]
            if not modes:
                raise study.StudyError("--modes names no mode")
        result = study.run_study(args.config, workloads=args.workload, modes=modes,
                                 accesses=args.accesses, seed=args.seed,
                                 cost_model=args.cost_model, jobs=args.jobs,
                                 scheduler=args.scheduler,
                                 progress=False if args.quiet else None)
    except InvalidInput as exc:
        raise _Usage(str(exc)) from None
    out.write(result.table())
    for path, write in ((args.json, result.to_json), (args.csv, result.to_csv),
                        (args.plot, result.plot)):
        if path:
            write(path)
    return 0


def _error(message):
    message = " ".join(str(message).split())   # one line, whatever the message
    sys.stderr.write("ptemu: error: %s\n" % message)


def main(argv=None):
    """Run the ptemu command; returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except _Usage as exc:
        _error(exc)
        return 2
    except SystemExit as exc:         # --help
        return exc.code if isinstance(exc.code, int) else 0
    out = sys.stdout
    try:
        return args.func(args, out)
    except (_Usage, PtemuError) as exc:
        # Bad input (ImageError, InvalidInput) is status 2; an error that is
        # not the input's fault (a missing extra, a dead worker) says its own.
        _error(exc)
        return getattr(exc, "exit_status", 2)
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            return _broken_pipe()
        _error(exc)
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


def _broken_pipe():
    # `ptemu tlb big.img | head`: the reader left.  Point stdout at /dev/null
    # so the interpreter's final flush does not complain, and exit quietly.
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return 1
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
