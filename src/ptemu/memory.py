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

    def __init__(self, size=None, *, _array=None, _path=None):
        if _array is None:
            size = check_u64(size, "memory size")
            self._check_size(size)
            _array = np.zeros(size, dtype=np.uint8)
        self._array = _array
        self.path = _path
        self._c = ffi.new("ptemu_mem *")
        self._keep = ffi.from_buffer("uint8_t[]", _array, require_writable=True)
        self._c.base = self._keep
        self._c.size = len(_array)

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

    @property
    def size(self):
        return int(self._c.size)

    @property
    def array(self):
        return self._array

    def __len__(self):
        return self.size

    def __repr__(self):
        return "PhysicalMemory(%#x%s)" % (self.size, ", %r" % self.path if self.path else "")

    def _range(self, pa, n):
        pa = check_u64(pa, "physical address")
        n = check_u64(n, "length")
        if pa + n > self.size:
            raise InvalidInput("physical range %#x..%#x is outside memory (size %#x)"
                               % (pa, pa + n, self.size))
        return pa, n

    def read(self, pa, n):
        pa, n = self._range(pa, n)
        return self._array[pa:pa + n].tobytes()

    def write(self, pa, data):
        data = bytes(data)
        pa, n = self._range(pa, len(data))
        self._array[pa:pa + n] = np.frombuffer(data, dtype=np.uint8)

    def read_u64(self, pa):
        value = ffi.new("uint64_t *")
        pa = check_u64(pa, "physical address")
        if not lib.ptemu_mem_load64(self._c, pa, value):
            raise InvalidInput("u64 at %#x is outside memory (size %#x)" % (pa, self.size))
        return int(value[0])

    def write_u64(self, pa, value):
        pa = check_u64(pa, "physical address")
        value = check_u64(value, "value")
        if not lib.ptemu_mem_store64(self._c, pa, value):
            raise InvalidInput("u64 at %#x is outside memory (size %#x)" % (pa, self.size))

    def flush(self):
        """Write a writable memory-mapped image back to its file."""
        if isinstance(self._array, np.memmap):
            self._array.flush()
