"""Virtual memory areas of the guest kernel: mmap, munmap, mprotect.

Anonymous private memory, demand paged (the fault handler maps it).  munmap
and permission changes end with INVLPG for each changed present page, or one
full flush when more than `flush_ceiling` pages changed (Linux's
tlb_single_page_flush_ceiling, 33).
"""
import bisect

from ptemu._native import InvalidInput, check_u64
from ptemu.guest.mm import (
    PAGE, P, W, NX, ADDR, _U64, PTE_COW, PTE_PROTNONE, Vma, _check_prot)

__all__ = ["Vmas"]


class Vmas:
    """Kernel mixin: the VMA list of each process and its system calls."""

    def _check_range(self, start, length):
        start = check_u64(start, "address")
        length = check_u64(length, "length")
        if start % PAGE or length % PAGE or not length:
            raise InvalidInput("address %#x and length %#x must be page aligned, length > 0"
                               % (start, length))
        if start + length > self.user_top:
            raise InvalidInput("range %#x+%#x leaves the user half" % (start, length))
        return start, start + length

    def _add_vma(self, proc, start, length, prot):
        start, end = self._check_range(start, length)
        prot = _check_prot(prot)
        i = bisect.bisect_left([v.start for v in proc.vmas], start)
        if (i > 0 and proc.vmas[i - 1].end > start) or (i < len(proc.vmas)
                                                       and proc.vmas[i].start < end):
            raise InvalidInput("range %#x-%#x overlaps a mapping" % (start, end))
        proc.vmas.insert(i, Vma(start, end, prot))

    def find_vma(self, pid, va):
        """The Vma of pid containing va, or None."""
        return self._find_vma(self._proc(pid), va)

    @staticmethod
    def _find_vma(proc, va):
        vmas = proc.vmas
        lo, hi = 0, len(vmas)
        while lo < hi:
            mid = (lo + hi) // 2
            v = vmas[mid]
            if va < v.start:
                hi = mid
            elif va >= v.end:
                lo = mid + 1
            else:
                return v
        return None

    def _split(self, proc, start, end):
        """Split VMAs at start and end; the VMAs inside [start, end)."""
        out = []
        new = []
        for v in proc.vmas:
            if v.end <= start or v.start >= end:
                new.append(v)
                continue
            if v.start < start:
                new.append(Vma(v.start, start, v.prot))
            mid = Vma(max(v.start, start), min(v.end, end), v.prot)
            new.append(mid)
            out.append(mid)
            if v.end > end:
                new.append(Vma(end, v.end, v.prot))
        proc.vmas = new
        return out

    def mmap(self, pid, length, prot="rw", addr=None):
        """Anonymous private memory, demand paged; returns its address."""
        proc = self._proc(pid)
        length = check_u64(length, "length")
        if addr is None:
            addr = proc.mmap_next
            proc.mmap_next = addr + length + PAGE       # a guard gap
        self._add_vma(proc, addr, length, prot)
        self.stats["mmap"] += 1
        return addr

    def munmap(self, pid, addr, length):
        """Unmap [addr, addr+length): clear the entries by stores, free the
        frames, then INVLPG each page that was present (or flush all)."""
        proc = self._proc(pid)
        start, end = self._check_range(addr, length)
        self.switch_to(pid)
        inside = self._split(proc, start, end)
        proc.vmas = [v for v in proc.vmas if v not in inside]
        flush = []
        for va, epa, e in self._leaves(proc.cr3, start, end):
            self._write(epa, 0)
            frame = e & ADDR
            if frame != self.zero_frame:
                self._put(frame)
            if e & P:
                flush.append(va)
        self._flush_pages(flush)
        self.stats["munmap"] += 1

    def mprotect(self, pid, addr, length, prot):
        """Change the rights of [addr, addr+length) (every page must be
        mapped); changed present entries are invalidated as munmap does."""
        proc = self._proc(pid)
        start, end = self._check_range(addr, length)
        prot = _check_prot(prot)
        covered = start
        for v in proc.vmas:
            if v.end <= covered or v.start >= end:
                continue
            if v.start > covered:
                break
            covered = v.end
        if covered < end:
            raise InvalidInput("mprotect: %#x-%#x is not wholly mapped" % (start, end))
        self.switch_to(pid)
        for v in self._split(proc, start, end):
            v.prot = prot
        flush = []
        for va, epa, e in self._leaves(proc.cr3, start, end):
            new = self._protect_pte(e, prot)
            if new != e:
                self._write(epa, new)
                if e & P:
                    flush.append(va)
        self._flush_pages(flush)
        self.stats["mprotect"] += 1

    @staticmethod
    def _protect_pte(e, prot):
        if not prot:
            return ((e & ~P & _U64) | PTE_PROTNONE) if e & P else e
        if not e & P:
            e = (e & ~PTE_PROTNONE & _U64) | P
        e &= ~(W | NX) & _U64
        if "w" in prot and not e & PTE_COW:
            e |= W
        if "x" not in prot:
            e |= NX
        return e
