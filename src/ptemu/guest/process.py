"""Processes of the guest kernel: spawn, context switch, fork with
copy-on-write, exec and exit (address-space tear-down), wait.

fork (dup_mmap): every private page becomes read-only + COW in parent and
child (the child's copy has A clear, like pte_mkold), then a full TLB flush
of the parent (flush_tlb_mm).  exec/exit: the leaf entries are cleared by
stores (zap_pte_range), frames and tables freed after the CR3 switch that
flushes them from the TLB.
"""
import numpy as np

from ptemu._native import InvalidInput
from ptemu.guest.mm import (
    P, W, A, ADDR, _U64, PTE_COW, PTE_PROTNONE, USER_TABLE, DEFAULT_LAYOUT, _MMAP_BASE,
    Process)

__all__ = ["Processes"]


class Processes:
    """Kernel mixin: the process lifecycle."""

    def _proc(self, pid, alive=True):
        proc = self.procs.get(pid)
        if proc is None or pid == 0:
            raise InvalidInput("no process %r" % (pid,))
        if alive and proc.state != "running":
            raise InvalidInput("process %d has exited" % pid)
        return proc

    def switch_to(self, pid):
        """Schedule pid: a context switch is a CR3 load (new_baseptr)."""
        if pid == self.current:
            return
        proc = self.procs.get(pid)
        if proc is None or proc.state != "running":
            raise InvalidInput("cannot switch to %r: no such running process" % (pid,))
        self._load_cr3(proc.cr3)
        self.current = pid
        self.stats["context_switch"] += 1

    def _set_layout(self, proc, layout):
        proc.vmas = []
        for start, length, prot in (DEFAULT_LAYOUT if layout is None else layout):
            self._add_vma(proc, start, length, prot)

    def spawn(self, layout=None):
        """A new process with a fresh address space (layout: (start,
        length, prot) triples; DEFAULT_LAYOUT if None).  Returns its pid."""
        pid = self._next_pid
        proc = Process(pid, 0, 0)
        self._set_layout(proc, layout)          # validate before allocating
        proc.cr3 = self._new_top()
        self._next_pid += 1
        self.procs[pid] = proc
        self.procs[0].children.add(pid)
        self.stats["spawn"] += 1
        return pid

    def fork(self, pid):
        """Copy-on-write fork of pid; returns the child's pid."""
        parent = self._proc(pid)
        self.switch_to(pid)
        child = Process(self._next_pid, pid, 0)
        child.vmas = [v.copy() for v in parent.vmas]
        child.mmap_next = parent.mmap_next
        self._next_pid += 1
        child.cr3 = self._new_top()
        top = self._read_table(parent.cr3)
        for i in (top[:256] & np.uint64(P)).nonzero()[0].tolist():
            sub = self._copy_table(int(top[i]) & ADDR, self.levels - 1)
            self._write(child.cr3 + 8 * i, sub | USER_TABLE)
        # dup_mmap: the parent's writable entries just became read-only.
        self._flush_tlb()
        self.procs[child.pid] = child
        parent.children.add(child.pid)
        self.stats["fork"] += 1
        return child.pid

    def _copy_table(self, src, level):
        t = self._read_table(src)
        dst = self._alloc_frame(table=True)
        if level == 1:
            self._copy_ptes(t, src, dst)
        else:
            for i in (t & np.uint64(P)).nonzero()[0].tolist():
                sub = self._copy_table(int(t[i]) & ADDR, level - 1)
                self._write(dst + 8 * i, sub | USER_TABLE)
        return dst

    def _copy_ptes(self, t, src, dst):
        """copy_pte_range: each entry with a frame (present or PROT_NONE) of the
        level-1 table t at src becomes read-only + COW there (a store only where
        that changes it) and, with A clear, in the new table at dst; each frame
        but the zero page gains a reference.  In entry order: per entry, the
        store to src, then the one to dst."""
        i = (t & np.uint64(P | PTE_PROTNONE)).nonzero()[0]
        e = t[i]
        frame = e & np.uint64(ADDR)
        has = ((e & np.uint64(P)) != 0) | (frame != 0)
        i, e, frame = i[has], e[has], frame[has]
        if not len(i):
            return
        shared = (e & np.uint64(~W & _U64)) | np.uint64(PTE_COW)
        off = i.astype(np.uint64) * np.uint64(8)
        # Two stores per entry, interleaved; the one to src only if it changes.
        n = len(i)
        at = np.empty(2 * n, dtype=np.uint64)
        values = np.empty(2 * n, dtype=np.uint64)
        keep = np.ones(2 * n, dtype=bool)
        at[0::2] = off + np.uint64(src)
        at[1::2] = off + np.uint64(dst)
        values[0::2] = shared
        values[1::2] = shared & np.uint64(~A & _U64)
        keep[0::2] = shared != e
        self._write_many(at[keep], values[keep])
        self._get_many(frame[frame != np.uint64(self.zero_frame)])
        self.stats["fork_pte"] += len(i)

    def _destroy_mm(self, top):
        """Tear down an address space that no CR3 holds any more (the CR3
        switch away from it flushed its translations)."""
        tables = []
        t = self._read_table(top)
        for i in (t[:256] & np.uint64(P)).nonzero()[0].tolist():
            self._destroy_table(int(t[i]) & ADDR, self.levels - 1, tables)
        tables.append(top)
        self._l1_tables.pop(top, None)
        self._sync()            # no pending update may land in a freed frame
        for gpa in tables:
            self._free_table(gpa)

    def _destroy_table(self, table, level, tables):
        t = self._read_table(table)
        if level == 1:
            self._zap_ptes(t, table)
        else:
            for i in (t & np.uint64(P)).nonzero()[0].tolist():
                self._destroy_table(int(t[i]) & ADDR, level - 1, tables)
        tables.append(table)

    def _zap_ptes(self, t, table):
        """zap_pte_range: each entry with a frame (present or PROT_NONE) of the
        level-1 table t at `table` is cleared by a store (if zap_on_exit) and
        drops its reference to the frame (the zero page aside)."""
        i = (t & np.uint64(P | PTE_PROTNONE)).nonzero()[0]
        e = t[i]
        frame = e & np.uint64(ADDR)
        has = ((e & np.uint64(P)) != 0) | (frame != 0)
        i, frame = i[has], frame[has]
        if not len(i):
            return
        if self.zap_on_exit:
            at = np.uint64(table) + i.astype(np.uint64) * np.uint64(8)
            self._write_many(at, np.zeros(len(at), dtype=np.uint64))
        self._put_many(frame[frame != np.uint64(self.zero_frame)])

    def exec(self, pid, layout=None):
        """Replace pid's address space by a fresh one with `layout`."""
        proc = self._proc(pid)
        self.switch_to(pid)
        old = proc.cr3
        self._set_layout(proc, layout)
        proc.mmap_next = _MMAP_BASE
        proc.cr3 = self._new_top()
        self._load_cr3(proc.cr3)        # exec_mmap: activate the new mm
        self._destroy_mm(old)
        self.stats["exec"] += 1

    def exit(self, pid, code=0):
        """pid exits: its address space is torn down; it stays a zombie
        until its parent wait()s for it.  Its children go to pid 0."""
        proc = self._proc(pid)
        self.switch_to(pid)
        parent = self.procs.get(proc.parent)
        nxt = proc.parent if parent is not None and parent.state == "running" else 0
        self._load_cr3(self.procs[nxt].cr3)
        self.current = nxt
        self.stats["context_switch"] += 1
        self._destroy_mm(proc.cr3)
        proc.cr3 = None
        proc.vmas = []
        proc.state = "zombie"
        proc.exit_code = code
        for c in proc.children:
            if c in self.procs:
                self.procs[c].parent = 0
                self.procs[0].children.add(c)
        proc.children = set()
        self.stats["exit"] += 1

    def wait(self, pid):
        """Reap the zombie pid; its exit code."""
        proc = self.procs.get(pid)
        if proc is None or pid == 0:
            raise InvalidInput("no process %r" % (pid,))
        if proc.state != "zombie":
            raise InvalidInput("process %d has not exited" % pid)
        del self.procs[pid]
        parent = self.procs.get(proc.parent)
        if parent is not None:
            parent.children.discard(pid)
        return proc.exit_code
