"""The `ptemu` command.

    ptemu demo [--walks]               the textbook shadow-paging scenario (--walks:
                                       hand-built page walks, level by level)
    ptemu translate IMAGE --cr3 X [--cr0 X] [--cr4 X] [--efer X] [--user]
                          [--access r|w|x] [--maxphyaddr N] VA...
    ptemu tlb IMAGE --cr3 X [...]      QEMU monitor `info tlb` of the image
    ptemu mem IMAGE --cr3 X [...]      QEMU monitor `info mem` of the image
    ptemu study [CONFIG.toml] [--workload W ...] [--modes native,shadow,...]
                [--accesses N] [--seed S] [--cost-model F] [--json F] [--csv F]
                [--plot F.png] [--jobs N] [--scheduler tcp://HOST:PORT] [--quiet]
                                       the same workloads under every paging mode,
                                       side by side (docs/study.md)

IMAGE is a raw physical-memory image, a QEMU `dump-guest-memory` ELF core or
a LiME file (ptemu.images.open_image), opened read-only: the walks write no
A/D bit anywhere.  Numbers are hex (0x...) or decimal.  The default CPU is
64-bit mode with CR0 = PG|PE|WP, CR4 = PAE, EFER = LME|LMA|NXE; CR4.LA57
(0x1000) selects 5-level paging.

Every error is one line on stderr, "ptemu: error: ...", and a non-zero exit
status (2 for usage errors, 1 for the rest); no traceback.  A page fault or
#GP in `translate` is a result, not an error: it is printed and the exit
status stays 0.
"""
import argparse
import io
import os
import sys

from ptemu import bits
from ptemu._native import PtemuError, InvalidInput, GeneralProtection, MmuFault, decode_error_code
from ptemu.memory import PhysicalMemory
from ptemu.mmu import CpuState, Mmu
from ptemu.pagetable import PageTableBuilder, iter_info_tlb, iter_info_mem, info_tlb, info_mem
from ptemu import images

__all__ = ["main", "run_demo", "print_walk"]

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


def _number(text):
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "bad number %r (write hex as 0x... or decimal)" % text) from None
    if value < 0 or value >> 64:
        raise argparse.ArgumentTypeError("number %r does not fit in 64 bits" % text)
    return value


def _build_parser():
    p = _Parser(prog="ptemu", description="A reference x86-64 MMU emulator.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", help="shadow paging as Modern Operating Systems 7.6 tells it: "
                                     "two VMs, their shadow tables, every exit")
    d.add_argument("--walks", action="store_true",
                   help="instead: walk a small hand-built image, level by level")
    d.set_defaults(func=_cmd_demo)

    def image_cmd(name, help_, func):
        c = sub.add_parser(name, help=help_)
        c.add_argument("image", metavar="IMAGE", help="raw, QEMU ELF dump or LiME image")
        c.add_argument("--cr3", type=_number, required=True, help="CR3 (root table address)")
        c.add_argument("--cr0", type=_number, default=DEFAULT_CR0,
                       help="CR0 (default %#x: PG|PE|WP)" % DEFAULT_CR0)
        c.add_argument("--cr4", type=_number, default=DEFAULT_CR4,
                       help="CR4 (default %#x: PAE; add 0x1000 for LA57)" % DEFAULT_CR4)
        c.add_argument("--efer", type=_number, default=DEFAULT_EFER,
                       help="EFER (default %#x: LME|LMA|NXE)" % DEFAULT_EFER)
        c.add_argument("--maxphyaddr", type=_number, default=52,
                       help="physical-address width, 32..52 (default 52)")
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
    _add_study_parser(sub)
    return p


# -- walks, printed ------------------------------------------------------------

def print_walk(mmu, va, out, access="r", user=False):
    """Print one side-effect-free walk of va: every entry read, then the PA
    or the fault.  Returns the Translation or the fault."""
    levels = mmu.cpu.levels
    out.write("va %#018x: %s, %s, %s\n" % (
        va, _ACCESS_NAMES[access], "user" if user else "supervisor",
        "%d-level paging" % levels if levels else "paging off"))
    try:
        entries, result = mmu.walk_entries(va, access, user)
    except GeneralProtection:
        out.write("  => #GP(0): %#x is not canonical for %d-level paging (no walk)\n"
                  % (va, levels))
        return GeneralProtection(va)
    # Without a TLB the walk starts at the top level and reads down.
    for level, (epa, value) in zip(range(levels, 0, -1), entries):
        out.write("  %-5s @ %#018x = %#018x  %s\n" % (
            _LEVEL_NAMES[level], epa, value, bits.decode_entry(value)))
    if isinstance(result, MmuFault):
        where = ""
        if result.level:
            where = " at the %s" % _LEVEL_NAMES.get(result.level, "level %d" % result.level)
        out.write("  => #PF, error code %#x (%s): %s%s\n" % (
            result.error_code, decode_error_code(result.error_code), result.cause, where))
        return result
    if not levels:
        out.write("  => pa %#018x  (paging off: physical = linear)\n" % result.pa)
        return result
    out.write("  => pa %#018x  (%s page; %s, %s, %s)\n" % (
        result.pa, _PAGE_NAMES.get(result.page_size, "%#x" % result.page_size),
        "writable" if result.writable else "read-only",
        "user" if result.user else "supervisor",
        "executable" if result.executable else "no-execute"))
    return result


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


def _open_mmu(args, qemu_root=False):
    # The state first: a bad flag combination is reported before the image
    # is even opened.
    cpu = CpuState(cr0=args.cr0, cr3=0, cr4=args.cr4, efer=args.efer,
                   maxphyaddr=args.maxphyaddr)
    mem = images.open_image(args.image, writable=False)
    mmu = Mmu(mem, cpu)
    if cpu.paging:
        try:
            mmu.write_cr3(args.cr3)     # refuses reserved CR3 bits (#GP) like MOV CR3
        except GeneralProtection as exc:
            raise InvalidInput("--cr3 %#x: %s" % (args.cr3, exc)) from None
        m = 50 if qemu_root else args.maxphyaddr   # QEMU masks CR3 with bits 49:12
        root = args.cr3 & ((1 << m) - 1) & ~0xFFF
        if root + 4096 > mem.size:
            raise InvalidInput(
                "CR3 %#x points outside the image: its root table %#x..%#x is past the end "
                "of %s (%#x bytes)" % (args.cr3, root, root + 0xfff, args.image, mem.size))
    else:
        cpu.cr3 = args.cr3
    return mmu


def _cmd_translate(args, out):
    mmu = _open_mmu(args)
    for i, va in enumerate(args.vas):
        if i:
            out.write("\n")
        print_walk(mmu, va, out, args.access, args.user)
    return 0


def _write_lines(pieces, out):
    # The listings come in pieces of many whole lines (a numpy chunk each).
    for piece in pieces:
        out.write(piece)


def _cmd_tlb(args, out):
    _write_lines(iter_info_tlb(_open_mmu(args, qemu_root=True)), out)
    return 0


def _cmd_mem(args, out):
    _write_lines(iter_info_mem(_open_mmu(args, qemu_root=True)), out)
    return 0


# -- ptemu study ------------------------------------------------------------------

def _study_count(text):
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a whole number" % text) from None
    if value < 0:
        raise argparse.ArgumentTypeError("%r: a count must not be negative" % text)
    return value


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
    s.add_argument("--accesses", type=_study_count, metavar="N",
                   help="guest accesses per cell (default: the config's, else 100000)")
    s.add_argument("--seed", type=_study_count, metavar="S", help="one seed for every cell")
    s.add_argument("--cost-model", metavar="F.toml", help="cost-model overrides (TOML)")
    s.add_argument("--json", metavar="F", help="write the whole result as JSON")
    s.add_argument("--csv", metavar="F", help="write the rows as CSV")
    s.add_argument("--plot", metavar="F.png", help='write the figure (pip install "ptemu[plot]")')
    s.add_argument("--jobs", type=_study_count, metavar="N",
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
            # Refused before the study runs, not after.
            d = os.path.dirname(os.path.abspath(path)) if path else None
            if d and not os.path.isdir(d):
                raise study.StudyError("%s %s: no directory %s" % (opt, path, d))
            if d and not os.access(d, os.W_OK):
                raise study.StudyError("%s %s: directory %s is not writable" % (opt, path, d))
            if path and os.path.isdir(path):
                raise study.StudyError("%s %s: is a directory" % (opt, path))
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
    except _Usage as exc:
        _error(exc)
        return 2
    except (PtemuError, OSError) as exc:
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
