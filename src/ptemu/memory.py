"""PhysicalMemory: the byte array page walks read and A/D updates write.

Four kinds, one class: plain (one array from physical address 0: zero-filled,
wrapped, or a memory-mapped raw image), sparse (the ranges of an ELF core or
LiME image, each wherever it lies in the one mapping of the file, with holes
between them: csrc/physmap.c), a view (frames scattered in a host memory, the
p2m of a VM) and nested (behind an EPT).
"""
import collections
import os

import numpy as np

from ptemu._native import ffi, lib, InvalidInput, ImageError, check_u64

__all__ = ["PhysicalMemory", "Segment"]

# One range of physical memory and the numpy array (shared, never a copy)
# that holds its bytes; `backed` is False for the zero-filled part of an ELF
# segment past its file bytes (p_memsz > p_filesz).
Segment = collections.namedtuple("Segment", "pa size array backed")


class PhysicalMemory:
    """Zero-filled physical memory of `size` bytes (a multiple of 8, > 0).

    `.array` is the shared numpy uint8 view the C core walks; `.read`/`.write`
    and the u64 accessors are bounds-checked and raise InvalidInput when a
    range leaves memory.  `.segments` lists the ranges that exist (one for
    plain memory, several for a sparse image).
    """

    NO_FRAME = lib.PTEMU_NO_FRAME

    def __init__(self, size=None, *, _array=None, _path=None):
        if _array is None:
            size = check_u64(size, "memory size")
            self._check_size(size)
            _array = np.zeros(size, dtype=np.uint8)
        self._blank(_path, "raw" if _path else None)
        self._array = _array
        self._keep = ffi.from_buffer("uint8_t[]", _array, require_writable=True)
        self._c.base = self._keep
        self._c.size = len(_array)

    def _blank(self, path=None, fmt=None):
        """Every attribute at its default and a zeroed ptemu_mem: what each
        constructor starts from before it sets its own kind's fields."""
        self._array = None
        self.path = path
        self.host = None
        self.frames = None
        self.ept = None
        self._segments = None
        self.cpus = []
        self.format = fmt
        self._c = ffi.new("ptemu_mem *")
        return self

    @classmethod
    def view(cls, host, frames):
        """A physical address space whose 4 KiB frames live scattered in `host`.

        frames: a uint64 numpy array, one entry per frame of this space: the
        byte offset in host of that frame (4 KiB aligned), or
        PhysicalMemory.NO_FRAME where nothing backs it.  The array is live:
        whoever owns it (a hypervisor's p2m) may back frames later.  Walks
        and A/D updates through the view land in host memory; an address in
        an unbacked frame is outside memory.
        """
        if not isinstance(host, PhysicalMemory) or host.frames is not None:
            raise InvalidInput("a view needs a plain PhysicalMemory as host")
        if (not isinstance(frames, np.ndarray) or frames.dtype != np.uint64 or frames.ndim != 1
                or not frames.flags.c_contiguous or not len(frames)):
            raise InvalidInput("frames must be a non-empty 1-D C-contiguous uint64 numpy array")
        backed = frames[frames != cls.NO_FRAME]
        if len(backed) and (int(backed.max()) + 4096 > host.size or (backed % 4096).any()):
            raise InvalidInput("frames must be 4 KiB aligned offsets inside host memory")
        if host._segments is not None:
            raise InvalidInput("a view needs a plain PhysicalMemory as host, not a sparse image")
        self = cls.__new__(cls)._blank()
        self.host = host
        self.frames = frames
        self._keep = (host._keep, ffi.from_buffer("uint64_t[]", frames))
        self._c.base = host._c.base
        self._c.size = host._c.size
        self._c.frames = self._keep[1]
        self._c.nframes = len(frames)
        return self

    @staticmethod
    def _check_size(size):
        if size == 0:
            raise InvalidInput("physical memory size must be positive")
        if size % 8:
            raise InvalidInput("physical memory size %#x is not a multiple of 8 "
                               "(paging entries are 8-byte words)" % size)

    @classmethod
    def from_array(cls, array):
        """Wrap an existing writable uint8 numpy array (shared, not copied)."""
        if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 1:
            raise InvalidInput("PhysicalMemory.from_array needs a 1-D uint8 numpy array")
        if not array.flags.c_contiguous or not array.flags.writeable:
            raise InvalidInput("PhysicalMemory.from_array needs a C-contiguous, writable array")
        cls._check_size(len(array))
        return cls(_array=array)

    @classmethod
    def from_file(cls, path, writable=False):
        """Open a memory image -- raw, QEMU ELF core or LiME -- without reading it.

        The format is told by magic (ptemu.images.open_image, which this is);
        opening costs the same for any size: the file is memory-mapped, and
        an ELF or LiME image gets a segment map over that one mapping.  With
        writable=False (the default) the mapping is private copy-on-write: A/D
        updates land in private copies of the touched pages and never reach
        the file.  writable=True writes them through.  `.cpus` holds the vCPU
        register sets an ELF core's QEMU notes carry.
        """
        # The one reference upward (memory -> images): the format readers
        # live with the other image code, and this name is the API's.
        from ptemu.images import open_image
        return open_image(path, writable=writable)

    @classmethod
    def _from_raw_file(cls, path, writable=False):
        """Memory-map a raw physical-memory image: byte i of the file is
        physical address i.  The file's size must be a positive multiple of
        4096 (a raw RAM image is whole pages; anything else is taken for a
        truncated image)."""
        path = os.fspath(path)
        st = cls._stat_image(path, writable)
        if st.st_size % 4096:
            raise ImageError("image %s is %d bytes, not a whole number of 4 KiB pages "
                             "(truncated?)" % (path, st.st_size))
        return cls(_array=cls._map_file(path, writable), _path=path)

    @staticmethod
    def _stat_image(path, writable):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ImageError("image %s: no such file" % path) from None
        except OSError as exc:
            raise ImageError("image %s: %s" % (path, exc.strerror or exc)) from None
        if not os.path.isfile(path):
            raise ImageError("image %s: not a regular file" % path)
        if st.st_size == 0:
            raise ImageError("image %s is empty" % path)
        if not os.access(path, os.R_OK) or (writable and not os.access(path, os.W_OK)):
            raise ImageError("image %s: permission denied" % path)
        return st

    @staticmethod
    def _map_file(path, writable):
        # mode "c" is MAP_PRIVATE: the OS copies a page when it is first
        # written, and only that page; "r+" is MAP_SHARED, writing through.
        try:
            return np.memmap(path, dtype=np.uint8, mode="r+" if writable else "c")
        except (OSError, ValueError) as exc:
            raise ImageError("image %s: cannot map it: %s"
                             % (path, getattr(exc, "strerror", None) or exc)) from None

    @classmethod
    def _from_segments(cls, path, ranges, writable=False, fmt="elf", _file=None):
        """Sparse memory over one mapping of the file at `path`.

        ranges: [(pa, file_offset, filesz, memsz)], sorted by pa, not
        overlapping, every file byte inside the file (the image readers
        check all of it, naming what is wrong).  Bytes pa..pa+filesz are the
        file's from file_offset, at any alignment; pa+filesz..pa+memsz read
        as zeros (an ELF segment longer than its file part) from zero-filled
        memory that the OS backs only as it is written (it also holds the
        last < 8 file bytes when filesz ends inside a word, so with
        writable=True a write there stays in memory).  Addresses in no
        range are outside memory: a walk that reaches one takes the defined
        bus fault, read/write raise InvalidInput.  (_file: a writable uint8
        array standing for the file's mapping -- the fuzz harness's layouts.)
        """
        path = os.fspath(path)
        if _file is None:
            cls._stat_image(path, writable)
        end = 0
        for pa, off, filesz, memsz in ranges:
            if pa < end or filesz > memsz or not memsz or pa + memsz > 1 << 64:
                raise InvalidInput("image %s: segment map ranges must be sorted, non-empty "
                                   "and disjoint (at %#x)" % (path, pa))
            end = pa + memsz
        filemap = cls._map_file(path, writable) if _file is None else _file
        tail = sum(memsz - filesz + 7 for _pa, _off, filesz, memsz in ranges if memsz > filesz)
        zeros = np.zeros(tail, dtype=np.uint8) if tail else None   # calloc: pages on first write
        parts, z = [], 0
        for pa, off, filesz, memsz in ranges:
            if filesz and len(filemap) < off + filesz:
                raise InvalidInput("image %s: range at %#x leaves the file" % (path, pa))
            if memsz > filesz:
                # The zero tail starts at the word boundary at or below the
                # file part's end, holding the (< 8) file bytes before it, so
                # that no word of one segment straddles two parts (the C core
                # finds a word wholly in one part or not at all).
                split = max(pa, (pa + filesz) & ~7)
                head = pa + filesz - split
                zeros[z:z + head] = filemap[off + split - pa:off + filesz]
                filesz = split - pa
            if filesz:
                prev = parts[-1] if parts else None
                if prev and prev[3] and prev[0] + prev[1] == pa and prev[4] + prev[1] == off:
                    # Back to back in memory and in the file: one segment.
                    parts[-1] = (prev[0], prev[1] + filesz, filemap, True, prev[4])
                else:
                    parts.append((pa, filesz, filemap, True, off))
            if memsz > filesz:
                parts.append((pa + filesz, memsz - filesz, zeros, False, z))
                z += memsz - filesz
        self = cls.__new__(cls)._blank(path, fmt)
        self._filemap = filemap
        self._segments = [Segment(pa, n, arr[o:o + n], backed) for pa, n, arr, backed, o in parts]
        # The C core trusts host..host+size: each array must hold its segment.
        if any(len(seg.array) != seg.size for seg in self._segments):
            raise InvalidInput("image %s: a range does not fit its backing" % path)
        segs = ffi.new("ptemu_seg[]", len(parts))
        bufs = [ffi.from_buffer("uint8_t[]", seg.array, require_writable=True)
                for seg in self._segments]
        for i, (seg, buf) in enumerate(zip(self._segments, bufs)):
            segs[i].pa = seg.pa
            segs[i].size = seg.size
            segs[i].host = buf
        self._keep = (ffi.from_buffer("uint8_t[]", filemap, require_writable=True), segs, bufs)
        self._c.base = self._keep[0]
        self._c.size = 0            # see csrc/physmap.c: sparse memory is never plain
        self._c.segs = segs
        self._c.nseg = len(parts)
        self._end = end
        return self

    @classmethod
    def nested(cls, ept, size):
        """Guest-physical memory of `size` bytes behind an EPT (ptemu.ept.Ept):
        walks over it are 2-D walks, every guest-physical reference translated
        by the EPT in host memory; an EPT violation is a VM exit (EptViolation)."""
        size = check_u64(size, "guest memory size")
        cls._check_size(size)
        self = cls.__new__(cls)._blank()
        self.host = ept.host
        self.ept = ept
        self._nested_size = size
        self._keep = (ept.host._keep, ept._c)
        self._c.base = ept.host._c.base
        self._c.size = ept.host._c.size
        self._c.ept = ept._c
        return self

    @property
    def c_handle(self):
        """The `ptemu_mem *` describing this memory, to pass to C entry points
        (it and the buffers it points into live as long as this object)."""
        return self._c

    @property
    def sparse(self):
        """True for a sparse image (ranges with holes, csrc/physmap.c)."""
        return self._segments is not None

    @property
    def segments(self):
        """The ranges of physical memory that exist, ascending, as
        Segment(pa, size, array, backed) -- `array` the shared uint8 view of
        the range's bytes.  Plain memory is one segment from 0; None for a
        view or nested memory (their frames are not ranges of one array)."""
        if self._segments is not None:
            return list(self._segments)
        if self._array is not None:
            return [Segment(0, len(self._array), self._array, True)]
        return None

    def ranges(self):
        """[(start, end)] (end exclusive) of the memory that exists, adjacent
        segments merged; the gaps between them are the holes."""
        out = []
        for seg in self.segments or [Segment(0, self.size, None, True)]:
            if out and out[-1][1] == seg.pa:
                out[-1] = (out[-1][0], seg.pa + seg.size)
            else:
                out.append((seg.pa, seg.pa + seg.size))
        return out

    @property
    def size(self):
        """Bytes of this physical address space: for a sparse image, one past
        its highest byte (holes included)."""
        if self._segments is not None:
            return self._end
        if self.frames is not None:
            return len(self.frames) * 4096
        if self._c.ept != ffi.NULL:
            return self._nested_size
        return int(self._c.size)

    @property
    def array(self):
        """The shared uint8 numpy array (None for a view: it is not contiguous).

        A sparse image has no such array -- its ranges lie apart in the file,
        with holes between them -- so this refuses with InvalidInput; each
        range's own array is in `.segments`."""
        if self._segments is not None:
            raise InvalidInput("image %s is sparse (%d ranges with holes between them): it has "
                               "no single array; use .read/.write or each range's array in "
                               ".segments" % (self.path, len(self.ranges())))
        return self._array

    def _segment_at(self, pa):
        """(index, segment) of the segment holding byte pa, or (index of the
        next one, None)."""
        segs = self._segments
        lo, hi = 0, len(segs)
        while lo < hi:
            mid = (lo + hi) // 2
            if segs[mid].pa + segs[mid].size <= pa:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(segs) and segs[lo].pa <= pa:
            return lo, segs[lo]
        return lo, None

    def _host_offset(self, pa):
        """Offset in the backing array of physical address pa, or None."""
        if self.ept is not None:
            return self.ept.host_address(pa) if pa < self.size else None
        if self.frames is None:
            return pa if pa < self.size else None
        fn = pa >> 12
        if fn >= len(self.frames):
            return None
        f = int(self.frames[fn])
        return None if f == self.NO_FRAME else f + (pa & 0xFFF)

    def table(self, pa):
        """The 4 KiB-aligned table at pa as 512 uint64 (a live numpy view; a copy
        for a table of sparse memory that crosses from one part into the next),
        or None when it is not wholly inside memory."""
        if pa % 4096:
            raise InvalidInput("a table address must be 4 KiB aligned, not %#x" % pa)
        if self._segments is not None:
            i, seg = self._segment_at(pa)
            if seg is None:
                return None
            if pa + 4096 <= seg.pa + seg.size:
                return seg.array[pa - seg.pa:pa - seg.pa + 4096].view(np.uint64)
            # The table runs on into the next part -- the zero tail of an ELF
            # segment whose file bytes end inside it, or an adjacent range:
            # whole if the parts leave no gap up to its end, and then read
            # through the C core's bounds check (a copy, not a live view).
            end, segs = seg.pa + seg.size, self._segments
            while end < pa + 4096:
                i += 1
                if i == len(segs) or segs[i].pa != end:
                    return None
                end += segs[i].size
            return self.gather_u64(np.arange(pa, pa + 4096, 8, dtype=np.uint64))
        off = self._host_offset(pa)
        buf = self._array if self.host is None else self.host._array
        if off is None or off + 4096 > len(buf):
            return None
        return buf[off:off + 4096].view(np.uint64)

    def __len__(self):
        return self.size

    def __repr__(self):
        if self.frames is not None:
            return "PhysicalMemory.view(%d frames)" % len(self.frames)
        if self._segments is not None:
            return "PhysicalMemory(%#x, %r, %s, %d ranges)" % (
                self.size, self.path, self.format, len(self.ranges()))
        return "PhysicalMemory(%#x%s)" % (self.size, ", %r" % self.path if self.path else "")

    def _range(self, pa, n):
        pa = check_u64(pa, "physical address")
        n = check_u64(n, "length")
        if pa + n > self.size:
            raise InvalidInput("physical range %#x..%#x is outside memory (size %#x)"
                               % (pa, pa + n, self.size))
        return pa, n

    def _chunks(self, pa, n):
        """(backing array, offset, start in request, length) per frame."""
        if self._segments is not None:
            i, seg = self._segment_at(pa)
            done = 0
            while done < n:
                cur = pa + done
                if seg is None or seg.pa > cur:
                    raise InvalidInput("physical address %#x is in a hole of image %s "
                                       "(no range holds it)" % (cur, self.path))
                step = min(n - done, seg.pa + seg.size - cur)
                yield seg.array, cur - seg.pa, done, step
                done += step
                i += 1
                seg = self._segments[i] if i < len(self._segments) else None
            return
        if self.frames is None and self.ept is None:
            yield self._array, pa, 0, n
            return
        done = 0
        while done < n:
            cur = pa + done
            step = min(n - done, 4096 - (cur & 0xFFF))
            off = self._host_offset(cur)
            if off is None:
                raise InvalidInput("physical address %#x is in a frame nothing backs" % cur)
            yield self.host._array, off, done, step
            done += step

    def read(self, pa, n):
        pa, n = self._range(pa, n)
        return b"".join(arr[off:off + k].tobytes() for arr, off, _, k in self._chunks(pa, n))

    def write(self, pa, data):
        data = np.frombuffer(bytes(data), dtype=np.uint8)
        pa, n = self._range(pa, len(data))
        chunks = list(self._chunks(pa, n))  # all checked before anything is written
        for arr, off, start, k in chunks:
            arr[off:off + k] = data[start:start + k]

    def _nested_offset(self, pa, n):
        off = self._host_offset(pa) if pa + n <= self.size else None
        if off is None or (pa & 0xFFF) + n > 4096:
            raise InvalidInput("u64 at %#x is not backed through the EPT" % pa)
        return off

    def read_u64(self, pa):
        value = ffi.new("uint64_t *")
        pa = check_u64(pa, "physical address")
        if self.ept is not None:  # a side-effect-free EPT lookup, not an EPT walk
            return self.host.read_u64(self._nested_offset(pa, 8))
        if not lib.ptemu_mem_load64(self._c, pa, value):
            if self._segments is not None and pa + 8 <= self.size:
                # Not one segment's: a hole, or a word across a boundary.
                return int.from_bytes(self.read(pa, 8), "little")
            raise InvalidInput("u64 at %#x is outside memory (size %#x)" % (pa, self.size))
        return int(value[0])

    def write_u64(self, pa, value):
        pa = check_u64(pa, "physical address")
        value = check_u64(value, "value")
        if self.ept is not None:
            return self.host.write_u64(self._nested_offset(pa, 8), value)
        if not lib.ptemu_mem_store64(self._c, pa, value):
            if self._segments is not None and pa + 8 <= self.size:
                return self.write(pa, value.to_bytes(8, "little"))
            raise InvalidInput("u64 at %#x is outside memory (size %#x)" % (pa, self.size))

    def gather_u64(self, pas):
        """The words at physical addresses `pas` (uint64 array) through the C
        core's bounds check, 0 where a word is outside memory (the listings
        read tables of sparse memory through this)."""
        pas = np.ascontiguousarray(pas, dtype=np.uint64)
        out = np.empty(len(pas), dtype=np.uint64)
        lib.ptemu_mem_gather64(self._c, ffi.from_buffer("uint64_t[]", pas), len(pas),
                               ffi.from_buffer("uint64_t[]", out))
        return out

    def flush(self):
        """Write a writable memory-mapped image back to its file."""
        if self._segments is not None:
            if isinstance(self._filemap, np.memmap):
                self._filemap.flush()
        elif self._array is not None and isinstance(self._array, np.memmap):
            self._array.flush()
