"""PhysicalMemory: the byte array page walks read and A/D updates write."""
import os

import numpy as np

from ptemu._native import ffi, lib, InvalidInput, ImageError, check_u64

__all__ = ["PhysicalMemory"]


class PhysicalMemory:
    """Zero-filled physical memory of `size` bytes (a multiple of 8, > 0).

    `.array` is the shared numpy uint8 view the C core walks; `.read`/`.write`
    and the u64 accessors are bounds-checked and raise InvalidInput when a
    range leaves memory.
    """

    NO_FRAME = lib.PTEMU_NO_FRAME

    def __init__(self, size=None, *, _array=None, _path=None):
        if _array is None:
            size = check_u64(size, "memory size")
            self._check_size(size)
            _array = np.zeros(size, dtype=np.uint8)
        self._array = _array
        self.path = _path
        self.frames = None
        self.host = None
        self.ept = None
        self._c = ffi.new("ptemu_mem *")
        self._keep = ffi.from_buffer("uint8_t[]", _array, require_writable=True)
        self._c.base = self._keep
        self._c.size = len(_array)

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
        self = cls.__new__(cls)
        self._array = None
        self.path = None
        self.host = host
        self.frames = frames
        self.ept = None
        self._c = ffi.new("ptemu_mem *")
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
        """Memory-map a raw physical-memory image without reading it.

        With writable=False (the default) the mapping is private
        copy-on-write: A/D updates land in a private copy of the touched pages
        and never reach the file.  writable=True writes them through.
        The file's size must be a positive multiple of 4096 (a raw RAM image
        is whole pages; anything else is taken for a truncated image).
        """
        path = os.fspath(path)
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
        if st.st_size % 4096:
            raise ImageError("image %s is %d bytes, not a whole number of 4 KiB pages "
                             "(truncated?)" % (path, st.st_size))
        if not os.access(path, os.R_OK) or (writable and not os.access(path, os.W_OK)):
            raise ImageError("image %s: permission denied" % path)
        try:
            arr = np.memmap(path, dtype=np.uint8, mode="r+" if writable else "c")
        except OSError as exc:
            raise ImageError("image %s: %s" % (path, exc.strerror or exc)) from None
        return cls(_array=arr, _path=path)

    @classmethod
    def nested(cls, ept, size):
        """Guest-physical memory of `size` bytes behind an EPT (ptemu.ept.Ept):
        walks over it are 2-D walks, every guest-physical reference translated
        by the EPT in host memory; an EPT violation is a VM exit (EptViolation)."""
        size = check_u64(size, "guest memory size")
        cls._check_size(size)
        self = cls.__new__(cls)
        self._array = None
        self.path = None
        self.host = ept.host
        self.frames = None
        self.ept = ept
        self._nested_size = size
        self._c = ffi.new("ptemu_mem *")
        self._keep = (ept.host._keep, ept._c)
        self._c.base = ept.host._c.base
        self._c.size = ept.host._c.size
        self._c.ept = ept._c
        return self

    @property
    def size(self):
        """Bytes of this physical address space."""
        if self.frames is not None:
            return len(self.frames) * 4096
        if self._c.ept != ffi.NULL:
            return self._nested_size
        return int(self._c.size)

    @property
    def array(self):
        """The shared uint8 numpy array (None for a view: it is not contiguous)."""
        return self._array

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
        """The 4 KiB-aligned table at pa as 512 uint64 (a live numpy view), or None
        when it is not wholly inside memory."""
        if pa % 4096:
            raise InvalidInput("a table address must be 4 KiB aligned, not %#x" % pa)
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
            raise InvalidInput("u64 at %#x is outside memory (size %#x)" % (pa, self.size))
        return int(value[0])

    def write_u64(self, pa, value):
        pa = check_u64(pa, "physical address")
        value = check_u64(value, "value")
        if self.ept is not None:
            return self.host.write_u64(self._nested_offset(pa, 8), value)
        if not lib.ptemu_mem_store64(self._c, pa, value):
            raise InvalidInput("u64 at %#x is outside memory (size %#x)" % (pa, self.size))

    def flush(self):
        """Write a writable memory-mapped image back to its file."""
        if self._array is not None and isinstance(self._array, np.memmap):
            self._array.flush()
