"""`ptemu demo`: the shadow-page-table scenario of Modern Operating Systems
(Tanenbaum & Bos, 4th ed., section 7.6, "Memory virtualization"), run for real.

Two VMs share one host.  VM 1's guest OS maps its virtual pages 7, 4, 3 onto
its guest-physical pages 10, 11, 12 and loads CR3; the load traps, and as the
guest touches those pages the hypervisor backs them with host frames and
builds a shadow page table mapping 7, 4, 3 onto those host frames.  VM 2 maps
its virtual pages 4, 5, 6 onto ITS guest-physical pages 10, 11, 12: other
host frames, its own shadow.  Then VM 1 remaps virtual page 7 onto
guest-physical page 200 with a plain store into its page table: the store
traps, because the hypervisor write-protected that page-table page, and the
shadow follows.  Every exit is printed with its reason.
"""
from ptemu import bits
from ptemu.bits import decode_entry
from ptemu.hypervisor.host import Hypervisor

__all__ = ["run_demo", "TextbookDemo"]

P, W, U = bits.PTE_P, bits.PTE_W, bits.PTE_U
PAGE = 4096
ADDR = 0x000FFFFFFFFFF000
# Guest-physical layout of both guests' page tables (frame numbers).
PML4, PDPT, PD, PT = 1, 2, 3, 4
#: The guest kernel maps its own page-table page here, to edit it with stores.
PT_WINDOW = 0x10
_LEVEL = {4: "PML4", 3: "PDPT", 2: "PD", 1: "PT"}


def _build_guest(vm, mappings, out):
    """The guest OS writes its tables with paging off (vm.phys), 4-level."""
    ph = vm.phys
    ph.write_u64(PML4 * PAGE, PDPT * PAGE | P | W | U)
    ph.write_u64(PDPT * PAGE, PD * PAGE | P | W | U)
    ph.write_u64(PD * PAGE, PT * PAGE | P | W | U)
    for vpage, gfn in mappings:
        ph.write_u64(PT * PAGE + 8 * vpage, gfn * PAGE | P | W | U)
        # A word in each page that says whose memory it is: VM id, guest frame.
        ph.write_u64(gfn * PAGE, vm.id << 32 | gfn)
    ph.write_u64(PT * PAGE + 8 * PT_WINDOW, PT * PAGE | P | W)


def _guest_tables(vm, out, indent="    "):
    ph = vm.phys
    out.write("%sguest page tables (in guest-physical memory), CR3 = %#x:\n"
              % (indent, PML4 * PAGE))
    for gfn, level in ((PML4, 4), (PDPT, 3), (PD, 2), (PT, 1)):
        entries = [(i, ph.read_u64(gfn * PAGE + 8 * i)) for i in range(512)]
        entries = [(i, e) for i, e in entries if e]
        out.write("%s  %-4s at guest frame %3d:" % (indent, _LEVEL[level], gfn))
        if level > 1:
            i, e = entries[0]
            out.write(" [%d] -> guest frame %d\n" % (i, (e & ADDR) // PAGE))
            continue
        out.write("\n")
        for i, e in entries:
            what = ("the page table itself (the kernel's window)" if i == PT_WINDOW
                    else "virtual page %d" % i)
            out.write("%s      [%3d] %-44s -> guest frame %3d  %s\n"
                      % (indent, i, what, (e & ADDR) // PAGE, decode_entry(e & ~ADDR)))


def _shadow_tables(vm, out, indent="    "):
    sh = vm.shadow
    root = sh.root
    out.write("%sshadow page tables (in host memory; the real CR3 = host frame %d):\n"
              % (indent, root.hpa // PAGE))

    def show(sp, depth):
        tab = sh.table(sp)
        pad = indent + "  " * (depth + 1)
        out.write("%s%-4s shadowing guest frame %3d, at host frame %3d:\n"
                  % (pad, _LEVEL[sp.level], sp.gfn, sp.hpa // PAGE))
        for i in range(512):
            e = int(tab[i])
            if not e:
                continue
            if sp.level > 1:
                show(sp.children[i], depth + 1)
            else:
                hframe = (e & ADDR) // PAGE
                gfn = vm.h2g[hframe]
                out.write("%s    [%3d] virtual page %3d -> host frame %3d (guest frame %3d)  "
                          "%s\n" % (pad, i, i, hframe, gfn, decode_entry(e & ~ADDR & ~bits.PTE_NX)
                                    + ("" if e & W else "   <- read-only")))

    show(root, 0)


def _frames(vm):
    return ", ".join("%d->%d" % (gfn, vm.p2m[gfn] // PAGE)
                     for gfn in range(len(vm.p2m)) if vm.p2m[gfn] != vm.view.NO_FRAME)


class TextbookDemo:
    """The scenario in steps (run_demo runs them all; the tests check between).

    hv: the Hypervisor (1 MiB of host memory); vm1, vm2: the two VMs (1 MiB of
    guest-physical memory each).  Steps: boot(vm, mappings), together(),
    remap(), summary().
    """

    VM1_MAPPINGS = ((7, 10), (4, 11), (3, 12))
    VM2_MAPPINGS = ((4, 10), (5, 11), (6, 12))
    REMAP = (7, 200)

    def __init__(self, out):
        self.out = out
        self.hv = Hypervisor(1 << 20)
        self.say("ptemu demo: memory virtualization with shadow page tables")
        self.say("(Tanenbaum & Bos, Modern Operating Systems, 4th ed., section 7.6)")
        self.say()
        self.say("The host has %d KiB of memory: %d host frames, handed out lowest first, each"
                 % (self.hv.host.size // 1024, self.hv.free_frames))
        self.say("guest frame backed when the guest first touches it.")
        self.vm1 = self.hv.create_vm(256 * PAGE)
        self.vm2 = self.hv.create_vm(256 * PAGE)
        for vm in (self.vm1, self.vm2):
            vm.log_exits(self._logger(vm))
        self.say("VM 1 and VM 2 each get 1 MiB of guest-physical memory (guest frames 0..255).")

    def say(self, text=""):
        self.out.write(text + "\n")

    def _logger(self, vm):
        out = self.out

        def log(rec):
            if isinstance(rec, tuple) and len(rec) == 2:          # a host frame handed out
                out.write("        host frame chosen: %s\n" % rec[1])
            else:
                out.write("    VM %d %s\n" % (vm.id, rec))
        return log

    def boot(self, vm, mappings):
        say = self.say
        out = self.out
        say()
        say("== VM %d ==" % vm.id)
        say("1. The guest OS of VM %d writes its page tables into its guest-physical memory"
            % vm.id)
        say("   (4-level tables in guest frames %d..%d, paging off: plain writes) and maps"
            % (PML4, PT))
        for vpage, gfn in mappings:
            say("       virtual page %d -> guest-physical page %d" % (vpage, gfn))
        _build_guest(vm, mappings, out)
        _guest_tables(vm, out)
        say("2. VM %d loads CR3 = %#x.  MOV CR3 is intercepted:" % (vm.id, PML4 * PAGE))
        vm.vcpu.write_cr3(PML4 * PAGE)
        say("3. The guest runs and touches its pages; each first touch is a hidden fault")
        say("   (the shadow lacks what the guest's tables have): the hypervisor walks the")
        say("   guest's tables, backs the guest frame, and fills the shadow.")
        for vpage, gfn in mappings:
            value = vm.vcpu.load_u64(vpage * PAGE)
            say("    -> VM %d reads virtual page %d: %#x (VM %d, guest frame %d)"
                % (vm.id, vpage, value, value >> 32, value & 0xFFFFFFFF))
        say("4. Now the MMU translates VM %d's virtual pages straight to host frames:" % vm.id)
        _shadow_tables(vm, out)
        say("   (guest page-table pages are mapped read-only in every shadow: they are")
        say("   write-protected, so the guest cannot change a mapping behind the hypervisor)")

    def together(self):
        say = self.say
        vm1, vm2 = self.vm1, self.vm2
        say()
        say("== Two guests, one host ==")
        say("Both VMs use guest-physical pages 10, 11, 12; the hypervisor cannot give VM 2")
        say("VM 1's host frames, so it backed VM 2's with other free frames:")
        for vm in (vm1, vm2):
            say("    VM %d guest frame -> host frame: %s" % (vm.id, _frames(vm)))
            say("    VM %d host frames (memory and shadow pages): %s"
                % (vm.id, sorted(vm.host_frames())))
        shared = vm1.host_frames() & vm2.host_frames()
        say("    host frames in both: %s" % (sorted(shared) if shared else "none"))

    def remap(self):
        say = self.say
        vm1 = self.vm1
        vpage, gfn = self.REMAP
        say()
        say("== VM 1 remaps virtual page %d onto guest-physical page %d ==" % (vpage, gfn))
        say("The guest kernel stores the new entry into its page table, through its window at")
        say("virtual page %d (a plain MOV, no hypercall).  The page-table page is write-"
            % PT_WINDOW)
        say("protected in the shadow, so the store traps; the hypervisor emulates it and")
        say("updates the shadow:")
        vm1.vcpu.store_u64(PT_WINDOW * PAGE + 8 * vpage, gfn * PAGE | P | W | U)
        say("    -> the guest's entry for virtual page %d now reads %#x"
            % (vpage, vm1.phys.read_u64(PT * PAGE + 8 * vpage)))
        say("    -> the shadow entry for virtual page %d was dropped (the new entry is not yet"
            % vpage)
        say("       accessed, so the guest's walk must set its A bit first); VM 1 flushes the")
        say("       page from its TLB (INVLPG) and writes it:")
        vm1.vcpu.invlpg(vpage * PAGE)
        vm1.vcpu.store_u64(vpage * PAGE, 0x200200)
        say("    -> VM 1 writes %#x to virtual page %d and reads back %#x"
            % (0x200200, vpage, vm1.vcpu.load_u64(vpage * PAGE)))
        _shadow_tables(vm1, self.out)
        say("   (virtual page %d -> guest frame %d -> host frame %d; the host frame of guest"
            % (vpage, gfn, vm1.gpa_to_hpa(gfn * PAGE) // PAGE))
        say("   frame 10 still belongs to VM 1, which may map it again)")

    def summary(self):
        say = self.say
        say()
        say("== Exits by reason ==")
        for vm in (self.vm1, self.vm2):
            st = vm.stats
            say("    VM %d: %s" % (vm.id, ", ".join("%s %d" % (r, n) for r, n in
                                                    st.exits_by_reason().items() if n)))
            say("          hidden faults fixed %d, writes emulated %d, shadow pages %d, "
                "guest frames backed %d" % (st["pf_fixed"], st["pf_emulate"],
                                            st["shadow_pages"], st["frames_backed"]))


def run_demo(out):
    """Run the textbook scenario and write it, step by step, to `out`."""
    d = TextbookDemo(out)
    d.boot(d.vm1, d.VM1_MAPPINGS)
    d.boot(d.vm2, d.VM2_MAPPINGS)
    d.together()
    d.remap()
    d.summary()
    return 0
