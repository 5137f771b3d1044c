"""Real programs as workloads: record, store, stream and replay address traces.

Recording (`record`): a command runs under Valgrind's lackey tool
(``--trace-mem=yes``), whose log goes to a pipe (``--log-fd``); the lines are
parsed block by block with numpy as they arrive and written as compressed
chunks, so no text trace ever reaches the disk.

The file format (docs/traces.md has the full account)::

    offset 0   header, 72 bytes, little-endian
               magic "PTEMUTRC" | version u16 | flags u16 (bit 0: complete)
               | header_len u32 | records u64 | reads u64 | writes u64
               | fetches u64 | supervisor u64 | chunks u32 | meta_len u32
               | tail_offset u64
    72         meta: meta_len bytes of UTF-8 JSON ({"command": [...], ...})
    header_len blocks, each a 32-byte block header + payload:
               tag 4s ("CHNK", "PAGE" or "END ") | n u32 | raw_len u32
               | stored_len u32 | crc32 u32 (of the stored payload) | codec u8
               | 3 reserved | first u64 (index of the chunk's first record)
               CHNK x chunks   records, independent of every other chunk
               PAGE            the distinct pages touched, with r/w/x bits
               END             JSON: how the recording ended (exit status ...)

A CHNK payload (before compression) holds n records as three columns:
``kind[n]`` u8 (bits 1:0 access 0 read / 1 write / 2 fetch, bit 2
supervisor), ``size[n]`` u8 (bytes accessed as lackey reports them, 0 when
unknown) and ``delta[n]`` u64, zigzag-coded: a fetch's address minus (the
previous fetch's address + its size), a data access's address minus the
previous data access's address, both predictions starting from 0 in each
chunk.  Sequential code gives delta 0 and a stack or array walk a small
constant, which the codec (zstd, level 3) squeezes to well under a byte.

Reading (`iter_trace`) streams any supported format in chunks of TRACE_DTYPE
records with memory bounded by the chunk size: this format, .npy and .npz
(read member by member, never loaded whole) and text (``r|w|x ADDRESS
[u|s]`` lines or lackey's ``I addr,size`` / `` L`` / `` S`` / `` M`` lines).
`read_trace` is the same reader, concatenated.

Replay (`TraceWorkload`): each trace is one guest process of a
`ptemu.guest.Kernel`, whose address space is built by demand paging.
"""
import json
import os
import shutil
import signal
import struct
import subprocess
import time
import zipfile
import zlib

import numpy as np

from ptemu._files import open_input, progress_bar, show_progress, temp_beside
from ptemu._native import InvalidInput, PtemuError, check_u64
from ptemu.mmu import TRACE_DTYPE
from ptemu.workloads import Record

__all__ = ["MAGIC", "VERSION", "TraceWriter", "TraceSummary", "CorruptTrace", "ValgrindMissing",
           "iter_trace", "read_trace", "write_trace", "trace_summary", "record",
           "RecordResult", "TraceWorkload", "layout_from_pages", "parse_text_block"]

MAGIC = b"PTEMUTRC"
VERSION = 1
PAGE = 4096
ACC_READ, ACC_WRITE, ACC_FETCH = 0, 1, 2
_KIND_SUPERVISOR = 4
_HDR = struct.Struct("<8sHHIQQQQQIIQ")     # 72 bytes
_BLK = struct.Struct("<4sIIIIB3xQ")         # 32 bytes
_FLAG_COMPLETE = 1
_TAG_CHUNK, _TAG_PAGES, _TAG_END = b"CHNK", b"PAGE", b"END "
#: Records per chunk the writer makes: 2.5 MiB of columns before compression,
#: about zstd level 3's 2 MiB window (a larger chunk packs no tighter: 0.334
#: vs 0.341 bytes per access on /bin/ls), and small enough to decode in
#: cache-sized temporaries (docs/traces.md).
CHUNK_RECORDS = 1 << 18
#: The largest chunk a reader accepts (a corrupt count must not allocate GiBs).
_MAX_CHUNK = 1 << 24
#: The user half of a 4-level address space ends here (canonical lower half).
USER_TOP = 0x0000800000000000
_U64 = np.uint64


class CorruptTrace(InvalidInput):
    """A trace file that is truncated or corrupt; .chunk (block number, 0
    first, or None for the header) and .offset (its byte offset)."""

    def __init__(self, path, message, chunk=None, offset=None):
        self.path, self.chunk, self.offset = path, chunk, offset
        where = "header" if chunk is None else "chunk %d at byte offset %d" % (chunk, offset)
        super().__init__("trace %s: %s: %s" % (path, where, message))


class ValgrindMissing(PtemuError):
    """Valgrind is not installed (record needs it)."""


# ---------------------------------------------------------------------------
# Codecs.  zstd is the default: it decodes at GB/s (replay must reach 5 M
# accesses/s with decompression included) and, on the delta columns, packs
# tighter than zlib at any level (docs/traces.md has the figures).  zlib
# (the standard library) is the fallback a writer may pick.
# ---------------------------------------------------------------------------
_CODEC_IDS = {"none": 0, "zstd": 1, "zlib": 2}
_CODEC_NAMES = {v: k for k, v in _CODEC_IDS.items()}


def _zstd():
    try:
        import zstandard
    except ImportError:                       # pragma: no cover - a base dependency
        raise InvalidInput("zstd-compressed traces need the zstandard package: "
                           "pip install zstandard") from None
    return zstandard


class _Codec:
    def __init__(self, codec_id, level=3):
        self.id = codec_id
        self.level = level
        self._c = self._d = None

    def compress(self, raw):
        if self.id == 1:
            if self._c is None:
                self._c = _zstd().ZstdCompressor(level=self.level)
            return self._c.compress(raw)
        if self.id == 2:
            return zlib.compress(raw, min(self.level, 9))
        return bytes(raw)

    def decompress(self, data, raw_len):
        if self.id == 1:
            if self._d is None:
                self._d = _zstd().ZstdDecompressor()
            return self._d.decompress(data, max_output_size=raw_len)
        if self.id == 2:
            return zlib.decompress(data)
        return data


# ---------------------------------------------------------------------------
# Record columns
# ---------------------------------------------------------------------------
def _zigzag(d):
    return (d << _U64(1)) ^ (d.view(np.int64) >> 63).view(_U64)


def _encode(trace, size):
    """The uncompressed CHNK payload of a TRACE_DTYPE array and its sizes."""
    n = len(trace)
    va = trace["va"]
    acc = trace["access"]
    kind = acc | np.where(trace["user"], 0, _KIND_SUPERVISOR).astype(np.uint8)
    fetch = acc == ACC_FETCH
    d = np.empty(n, dtype=_U64)
    vf = va[fetch]
    pred = np.zeros(len(vf), dtype=_U64)
    pred[1:] = vf[:-1] + size[fetch][:-1]
    d[fetch] = vf - pred
    data = ~fetch
    vd = va[data]
    pred = np.zeros(len(vd), dtype=_U64)
    pred[1:] = vd[:-1]
    d[data] = vd - pred
    return b"".join((kind.tobytes(), size.astype(np.uint8).tobytes(),
                     _zigzag(d).astype("<u8").tobytes()))


def _decode(raw, n, path, chunk, offset, first):
    """(TRACE_DTYPE array, sizes) of a CHNK payload; a bad kind byte is
    refused with its record index."""
    buf = np.frombuffer(raw, dtype=np.uint8)
    kind = buf[:n]
    size = buf[n:2 * n]
    z = buf[2 * n:].view("<u8")
    d = z >> _U64(1)                          # unzigzag, in place: fewer temporaries
    sign = z & _U64(1)
    np.negative(sign, out=sign)
    d ^= sign
    del sign
    acc = kind & np.uint8(3)
    bad = (acc > ACC_FETCH) | (kind > 7)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CorruptTrace(path, "record %d has access kind %d (0 read, 1 write, 2 fetch; "
                           "kind byte %#x)" % (first + i, int(acc[i]), int(kind[i])),
                           chunk, offset)
    out = np.empty(n, dtype=TRACE_DTYPE)
    out["access"] = acc
    out["user"] = (kind & np.uint8(_KIND_SUPERVISOR)) == 0
    fetch = acc == ACC_FETCH
    va = out["va"]
    inc = d[fetch]
    inc[1:] += size[fetch][:-1]
    va[fetch] = np.cumsum(inc, out=inc)
    del inc
    data = ~fetch
    inc = d[data]
    va[data] = np.cumsum(inc, out=inc)
    return out, size


def _page_keys(trace):
    """Distinct (page << 4 | bit of its access kind | supervisor bit 3)."""
    key = ((trace["va"] >> _U64(12)) << _U64(4)) \
        | (_U64(1) << trace["access"].astype(_U64)) \
        | np.where(trace["user"], _U64(0), _U64(8))
    return np.unique(key)


def _pages_from_keys(keys):
    """(sorted distinct page numbers, per-page flags: 1 read, 2 write,
    4 fetch, 8 supervisor)."""
    if not len(keys):
        return np.zeros(0, _U64), np.zeros(0, np.uint8)
    pages = keys >> _U64(4)
    flags = (keys & _U64(15)).astype(np.uint8)
    up, idx = np.unique(pages, return_index=True)
    return up, np.bitwise_or.reduceat(flags, idx)


# ---------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------
class TraceWriter:
    """Write a trace file incrementally: `append(trace, size=None)` any
    number of times, then `close(**end)` (end: JSON-able facts about how the
    recording ended, kept in the END block).  As a context manager it
    closes on exit, so an exception still leaves a valid file of what was
    appended (its END block says so)."""

    def __init__(self, path, command=None, codec="zstd", level=3, chunk_records=CHUNK_RECORDS,
                 meta=None):
        if codec not in _CODEC_IDS:
            raise InvalidInput("codec must be one of %s, not %r" % (sorted(_CODEC_IDS), codec))
        if not isinstance(chunk_records, int) or not 1 <= chunk_records <= _MAX_CHUNK:
            raise InvalidInput("chunk_records must be an int in 1..%d" % _MAX_CHUNK)
        self.path = os.fspath(path)
        self._codec = _Codec(_CODEC_IDS[codec], level)
        self.chunk_records = chunk_records
        info = dict(meta or {})
        info.update({"command": [str(c) for c in command] if command is not None else None,
                     "codec": codec, "level": level, "chunk_records": chunk_records,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self._meta = json.dumps(info, sort_keys=True).encode("utf-8")
        self._fh = open(self.path, "wb")
        self._pending, self._npending = [], 0
        self.records = 0
        self.by_kind = np.zeros(3, dtype=np.int64)
        self.supervisor = 0
        self.chunks = 0
        self._keys = np.zeros(0, dtype=_U64)
        self.closed = False
        self._header(0, 0)
        self._fh.write(self._meta)

    def _header(self, flags, tail):
        self._fh.seek(0)
        self._fh.write(_HDR.pack(MAGIC, VERSION, flags, _HDR.size + len(self._meta),
                                 self.records, int(self.by_kind[0]), int(self.by_kind[1]),
                                 int(self.by_kind[2]), self.supervisor, self.chunks,
                                 len(self._meta), tail))

    def _block(self, tag, n, raw, first=0):
        stored = self._codec.compress(raw)
        self._fh.write(_BLK.pack(tag, n, len(raw), len(stored), zlib.crc32(stored),
                                 self._codec.id, first))
        self._fh.write(stored)

    def append(self, trace, size=None):
        """Append TRACE_DTYPE records (size: bytes per access, uint8-able,
        or None for unknown)."""
        if self.closed:
            raise InvalidInput("append to a closed TraceWriter")
        if not isinstance(trace, np.ndarray) or trace.dtype != TRACE_DTYPE or trace.ndim != 1:
            raise InvalidInput("TraceWriter.append needs a 1-D TRACE_DTYPE array")
        if len(trace) and int(trace["access"].max()) > ACC_FETCH:
            i = int(np.flatnonzero(trace["access"] > ACC_FETCH)[0])
            raise InvalidInput("record %d has access kind %d (0 read, 1 write, 2 fetch)"
                               % (self.records + self._npending + i, int(trace["access"][i])))
        if size is None:
            size = np.zeros(len(trace), dtype=np.uint8)
        else:
            size = np.asarray(size)
            if size.shape != trace.shape:
                raise InvalidInput("size must have one entry per record")
            if len(size) and (int(size.min()) < 0 or int(size.max()) > 255):
                raise InvalidInput("sizes must be 0..255 bytes")
            size = size.astype(np.uint8)
        if not len(trace):
            return
        self._pending.append((trace, size))
        self._npending += len(trace)
        if self._npending >= self.chunk_records:
            self._flush(final=False)

    def _flush(self, final):
        if not self._pending:
            return
        tr = np.concatenate([p[0] for p in self._pending])
        sz = np.concatenate([p[1] for p in self._pending])
        self._pending, self._npending = [], 0
        c = self.chunk_records
        stop = len(tr) if final else len(tr) - len(tr) % c
        for i in range(0, stop, c):
            t, s = tr[i:i + c], sz[i:i + c]
            self._block(_TAG_CHUNK, len(t), _encode(t, s), self.records)
            self.records += len(t)
            self.by_kind += np.bincount(t["access"], minlength=3)[:3]
            self.supervisor += int(np.count_nonzero(~t["user"]))
            self._keys = np.union1d(self._keys, _page_keys(t))
            self.chunks += 1
        if stop < len(tr):
            self._pending, self._npending = [(tr[stop:], sz[stop:])], len(tr) - stop

    def close(self, **end):
        """Write the last chunk, the page summary and the END block, then the
        final header (counts, complete flag).  Returns the file's size."""
        if self.closed:
            return os.path.getsize(self.path)
        try:
            self._flush(final=True)
            pages, flags = _pages_from_keys(self._keys)
            tail = self._fh.tell()
            dp = np.diff(pages, prepend=_U64(0)).astype("<u8") if len(pages) else pages
            self._block(_TAG_PAGES, len(pages), dp.tobytes() + flags.tobytes())
            self._block(_TAG_END, 0, json.dumps(end, sort_keys=True, default=str).encode())
            size = self._fh.tell()
            self._header(_FLAG_COMPLETE, tail)
        finally:
            self._fh.close()
            self.closed = True
        return size

    def __enter__(self):
        return self

    def __exit__(self, etype, exc, tb):
        if etype is None:
            self.close()
        else:
            self.close(error="%s: %s" % (etype.__name__, exc))
        return False


# ---------------------------------------------------------------------------
# The reader of this format
# ---------------------------------------------------------------------------
class _TraceFile:
    """An open trace file of this format: header, meta, blocks."""

    def __init__(self, path):
        self.path = path
        self.size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(_HDR.size)
            if len(head) < _HDR.size:
                raise CorruptTrace(path, "truncated: %d bytes, the header alone is %d"
                                   % (len(head), _HDR.size))
            (magic, self.version, self.flags, self.header_len, self.records, reads, writes,
             fetches, self.supervisor, self.chunks, meta_len, self.tail) = _HDR.unpack(head)
            if magic != MAGIC:
                raise CorruptTrace(path, "not a ptemu trace (magic %r)" % magic)
            if self.version != VERSION:
                raise CorruptTrace(path, "format version %d; this ptemu reads version %d"
                                   % (self.version, VERSION))
            if self.header_len != _HDR.size + meta_len or self.header_len > self.size:
                raise CorruptTrace(path, "header length %d (meta %d) does not fit a file of "
                                   "%d bytes" % (self.header_len, meta_len, self.size))
            try:
                self.meta = json.loads(fh.read(meta_len).decode("utf-8"))
            except ValueError as exc:
                raise CorruptTrace(path, "unreadable meta JSON (%s)" % exc) from None
        self.by_kind = (reads, writes, fetches)
        self.complete = bool(self.flags & _FLAG_COMPLETE)
        if self.complete and (reads + writes + fetches != self.records
                              or self.supervisor > self.records):
            raise CorruptTrace(path, "counts do not add up: %d reads + %d writes + %d fetches "
                               "!= %d records" % (reads, writes, fetches, self.records))
        if self.complete and self.tail < self.header_len:
            raise CorruptTrace(path, "tail offset %d inside the header" % self.tail)
        self._codecs = {}

    def _codec(self, cid, chunk, off):
        c = self._codecs.get(cid)
        if c is None:
            if cid not in _CODEC_NAMES:
                raise CorruptTrace(self.path, "unknown codec %d" % cid, chunk, off)
            c = self._codecs[cid] = _Codec(cid)
        return c

    def _read_block(self, fh, chunk, off):
        """(tag, n, payload, first) of the block at off, verified."""
        tag, n, raw_len, stored, cid, first = self._read_stored(fh, chunk, off)
        try:
            raw = self._codec(cid, chunk, off).decompress(stored, raw_len)
        except CorruptTrace:
            raise
        except Exception as exc:
            raise CorruptTrace(self.path, "cannot decompress (%s)" % exc, chunk, off) from None
        if len(raw) != raw_len:
            raise CorruptTrace(self.path, "decompressed to %d bytes, not %d"
                               % (len(raw), raw_len), chunk, off)
        return tag, n, raw, first

    def _read_stored(self, fh, chunk, off):
        """(tag, n, raw_len, stored payload, codec, first) of the block at off,
        its header and checksum verified, not decompressed."""
        head = fh.read(_BLK.size)
        if len(head) < _BLK.size:
            raise CorruptTrace(self.path, "truncated: the file ends %d bytes into the block "
                               "header" % len(head), chunk, off)
        tag, n, raw_len, stored_len, crc, cid, first = _BLK.unpack(head)
        if tag not in (_TAG_CHUNK, _TAG_PAGES, _TAG_END):
            raise CorruptTrace(self.path, "bad block tag %r" % tag, chunk, off)
        if tag == _TAG_CHUNK and (n > _MAX_CHUNK or raw_len != 10 * n):
            raise CorruptTrace(self.path, "%d records in %d bytes is not a chunk" % (n, raw_len),
                               chunk, off)
        if tag == _TAG_PAGES and raw_len != 9 * n:
            raise CorruptTrace(self.path, "%d pages in %d bytes" % (n, raw_len), chunk, off)
        if raw_len > 16 * _MAX_CHUNK or stored_len > 16 * _MAX_CHUNK:
            raise CorruptTrace(self.path, "block of %d bytes is too large" % raw_len, chunk, off)
        stored = fh.read(stored_len)
        if len(stored) < stored_len:
            raise CorruptTrace(self.path, "truncated: %d of %d payload bytes present"
                               % (len(stored), stored_len), chunk, off)
        if zlib.crc32(stored) != crc:
            raise CorruptTrace(self.path, "checksum mismatch (corrupt payload)", chunk, off)
        return tag, n, raw_len, stored, cid, first

    def verify_chunks(self):
        """Check every CHNK block's header, order and checksum without
        decompressing one (what `trace info` does before it answers from the
        header): a corrupt or truncated chunk is CorruptTrace naming it."""
        with open(self.path, "rb") as fh:
            fh.seek(self.header_len)
            seen = 0
            for i in range(self.chunks):
                off = fh.tell()
                tag, n, _, _, _, first = self._read_stored(fh, i, off)
                if tag != _TAG_CHUNK or first != seen:
                    raise CorruptTrace(self.path, "expected chunk %d (record %d), found a %r "
                                       "block starting at record %d" % (i, seen, tag, first),
                                       i, off)
                seen += n
            if seen != self.records or fh.tell() != self.tail:
                raise CorruptTrace(self.path, "the header promises %d records in %d chunks "
                                   "ending at byte %d; the chunks hold %d, ending at %d"
                                   % (self.records, self.chunks, self.tail, seen, fh.tell()),
                                   self.chunks, fh.tell())

    def chunks_iter(self):
        """(trace, size) of every CHNK block, in order."""
        with open(self.path, "rb") as fh:
            fh.seek(self.header_len)
            i = 0
            seen = 0
            while True:
                off = fh.tell()
                if off >= self.size or (self.complete and off >= self.tail):
                    break
                tag, n, raw, first = self._read_block(fh, i, off)
                if tag != _TAG_CHUNK:
                    break
                if first != seen:
                    raise CorruptTrace(self.path, "starts at record %d, expected %d"
                                       % (first, seen), i, off)
                yield _decode(raw, n, self.path, i, off, first)
                seen += n
                i += 1
            if self.complete and (i != self.chunks or seen != self.records):
                raise CorruptTrace(self.path, "truncated: the header promises %d chunks (%d "
                                   "records), the file holds %d (%d)"
                                   % (self.chunks, self.records, i, seen), i, fh.tell())

    def tail_blocks(self):
        """(pages, flags, end dict) from the PAGE and END blocks; None when
        the file was never closed (no tail)."""
        if not self.complete:
            return None
        if self.tail + _BLK.size > self.size:
            raise CorruptTrace(self.path, "truncated: the file (%d bytes) ends before its PAGE "
                               "block" % self.size, self.chunks, self.tail)
        with open(self.path, "rb") as fh:
            fh.seek(self.tail)
            tag, n, raw, _ = self._read_block(fh, self.chunks, self.tail)
            if tag != _TAG_PAGES:
                raise CorruptTrace(self.path, "expected the PAGE block", self.chunks, self.tail)
            buf = np.frombuffer(raw, dtype=np.uint8)
            pages = np.cumsum(buf[:8 * n].view("<u8"), dtype=_U64)
            flags = buf[8 * n:].copy()
            off = fh.tell()
            tag, _, raw, _ = self._read_block(fh, self.chunks + 1, off)
            if tag != _TAG_END:
                raise CorruptTrace(self.path, "expected the END block", self.chunks + 1, off)
            try:
                end = json.loads(raw.decode("utf-8"))
            except ValueError as exc:
                raise CorruptTrace(self.path, "unreadable END JSON (%s)" % exc,
                                   self.chunks + 1, off) from None
        return pages, flags, end


# ---------------------------------------------------------------------------
# Text traces: one parser, with a numpy fast path for lackey's lines
# ---------------------------------------------------------------------------
_OPS = {"r": [ACC_READ], "w": [ACC_WRITE], "x": [ACC_FETCH],
        "0": [ACC_READ], "1": [ACC_WRITE], "2": [ACC_FETCH],
        # Valgrind lackey: instruction fetch, load, store, modify (load + store)
        "i": [ACC_FETCH], "l": [ACC_READ], "s": [ACC_WRITE], "m": [ACC_READ, ACC_WRITE]}
_MODES = {"u": True, "user": True, "s": False, "k": False, "kernel": False,
          "supervisor": False}
_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i
_DEC = np.full(256, 255, dtype=np.uint8)
_DEC[48:58] = np.arange(10)


def _parse_addr(tok, where):
    tok = tok.split(",", 1)[0]
    try:
        return check_u64(int(tok, 16), "address")
    except ValueError:
        raise InvalidInput("%s: %r is not a hexadecimal address" % (where, tok)) from None
    except InvalidInput as exc:
        raise InvalidInput("%s: %s" % (where, exc)) from None


def _parse_lines(lines, path, lineno, user, log):
    """The general text parser, line by line (see the module docstring)."""
    vas, accs, users, sizes = [], [], [], []
    for lineno, line in enumerate(lines, lineno):
        if line.startswith("=="):
            if log is not None:
                log.append(line.rstrip())
            continue
        text = line.split("#", 1)[0].strip()
        if not text or text.startswith("--"):
            continue                              # blank, comment, valgrind banner
        where = "%s:%d" % (path, lineno)
        toks = text.split()
        if len(toks) == 1:
            ops, addr, mode = [ACC_READ], toks[0], None
        elif len(toks) in (2, 3):
            ops = _OPS.get(toks[0].lower())
            if ops is None:
                raise InvalidInput("%s: unknown access %r (r/w/x, 0/1/2 or lackey "
                                   "I/L/S/M)" % (where, toks[0]))
            addr = toks[1]
            mode = toks[2].lower() if len(toks) == 3 else None
        else:
            raise InvalidInput("%s: expected 'ACCESS ADDRESS [u|s]', got %r" % (where, text))
        if mode is not None and mode not in _MODES:
            raise InvalidInput("%s: unknown mode %r (u or s)" % (where, mode))
        va = _parse_addr(addr, where)
        size = 0
        if "," in addr:
            s = addr.split(",", 1)[1]
            size = int(s) if s.isdigit() and int(s) < 256 else 0
        for op in ops:
            vas.append(va)
            accs.append(op)
            users.append(user if mode is None else _MODES[mode])
            sizes.append(size)
    out = np.zeros(len(vas), dtype=TRACE_DTYPE)
    out["va"] = np.array(vas, dtype=_U64)
    out["access"] = np.array(accs, dtype=np.uint8)
    out["user"] = np.array(users, dtype=bool)
    return out, np.array(sizes, dtype=np.uint8)


def _parse_lackey(buf, user, log):
    """The fast path: (trace, sizes) when every line of buf (bytes ending in
    a newline) is a lackey access line, blank or a "=="/"--" line; None
    when any other line is there (the general parser takes the block)."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    ends = np.flatnonzero(raw == 10)
    if not len(ends):
        return np.zeros(0, TRACE_DTYPE), np.zeros(0, np.uint8)
    b = np.concatenate([raw, np.zeros(4, np.uint8)])      # starts + 2 stays inside
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    c0, c1, c2 = b[starts], b[starts + 1], b[starts + 2]
    ln = ends - starts
    is_i = (c0 == 73) & (c1 == 32) & (c2 == 32)                       # "I  "
    is_d = (c0 == 32) & ((c1 == 76) | (c1 == 83) | (c1 == 77)) & (c2 == 32)  # " L ", " S ", " M "
    msg = (ln >= 2) & (c0 == 61) & (c1 == 61)                         # "==pid== ..."
    skip = (ln == 0) | msg | ((ln >= 2) & (c0 == 45) & (c1 == 45))
    is_acc = (is_i | is_d) & (ln >= 6)
    if not (is_acc | skip).all():
        return None
    if log is not None and msg.any():
        for s, e in zip(starts[msg].tolist(), ends[msg].tolist()):
            log.append(bytes(buf[s:e]).decode("ascii", "replace"))
    s = starts[is_acc] + 3
    e = ends[is_acc]
    if not len(s):
        return np.zeros(0, TRACE_DTYPE), np.zeros(0, np.uint8)
    commas = np.flatnonzero(raw == 44)
    j = np.searchsorted(commas, s)
    if not len(commas) or (j >= len(commas)).any():
        return None
    comma = commas[j]
    alen = comma - s
    slen = e - comma - 1
    if len(s) and ((comma >= e).any() or alen.min() < 1 or alen.max() > 16
                   or slen.min() < 1 or slen.max() > 3):
        return None
    m = len(s)
    va = np.zeros(m, dtype=_U64)
    dig = _HEX[b]
    for k in range(int(alen.max()) if m else 0):
        valid = alen > k
        dv = dig[np.where(valid, comma - 1 - k, 0)]
        if (dv[valid] == 255).any():
            return None
        va |= np.where(valid, dv, 0).astype(_U64) << _U64(4 * k)
    dec = _DEC[b]
    size = np.zeros(m, dtype=np.int64)
    for k in range(int(slen.max()) if m else 0):
        valid = slen > k
        dv = dec[np.where(valid, e - 1 - k, 0)]
        if (dv[valid] == 255).any():
            return None
        size += np.where(valid, dv, 0).astype(np.int64) * (10 ** k)
    c = c0[is_acc]
    k1 = c1[is_acc]
    code = np.where(c == 73, ACC_FETCH, np.where(k1 == 83, ACC_WRITE, ACC_READ)).astype(np.uint8)
    modify = k1 == 77
    reps = 1 + modify.astype(np.int64)
    out = np.empty(m + int(modify.sum()), dtype=TRACE_DTYPE)
    out["va"] = np.repeat(va, reps)
    acc = np.repeat(code, reps)
    firsts = np.cumsum(reps) - reps
    acc[firsts[modify] + 1] = ACC_WRITE          # M: the load, then the store
    out["access"] = acc
    out["user"] = user
    return out, np.repeat(np.minimum(size, 255).astype(np.uint8), reps)


def parse_text_block(buf, path="<text>", lineno=1, user=True, log=None):
    """(TRACE_DTYPE records, sizes) of a block of whole text lines (bytes).

    Lackey's own lines take a numpy fast path; a block holding any other
    kind of line goes to the general parser, which names path:line on an
    error.  Valgrind's "==pid==" lines are appended to `log` (a list) if
    given.
    """
    if buf and not buf.endswith(b"\n"):
        buf = buf + b"\n"
    fast = _parse_lackey(buf, user, log)
    if fast is not None:
        return fast
    lines = buf.decode("ascii", errors="replace").split("\n")[:-1]
    return _parse_lines(lines, path, lineno, user, log)


# ---------------------------------------------------------------------------
# .npy / .npz, streamed
# ---------------------------------------------------------------------------
class _NpyStream:
    """A 1-D array stored in .npy form on a file object, read piece by piece."""

    def __init__(self, fh, where):
        self.fh, self.where = fh, where
        fmt = np.lib.format
        try:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(fh)
            else:
                shape, fortran, dtype = fmt._read_array_header(fh, version)
        except (ValueError, OSError, EOFError) as exc:
            raise InvalidInput("trace %s: not a readable .npy (%s)" % (where, exc)) from None
        if dtype.hasobject:
            raise InvalidInput("trace %s: object arrays are not traces" % where)
        if len(shape) != 1:
            raise InvalidInput("trace %s: the array must be 1-D, not of shape %s"
                               % (where, shape))
        self.dtype, self.n, self.pos = dtype, shape[0], 0

    def read(self, k):
        k = min(k, self.n - self.pos)
        nbytes = k * self.dtype.itemsize
        data = self.fh.read(nbytes)
        if len(data) < nbytes:
            raise InvalidInput("trace %s: truncated .npy: %d of %d records present"
                               % (self.where, self.pos + len(data) // max(1, self.dtype.itemsize),
                                  self.n))
        self.pos += k
        return np.frombuffer(data, dtype=self.dtype)


def _codes(acc, path, base):
    """Access codes 0/1/2 from integer codes or b'r'/b'w'/b'x'; a bad one is
    refused with its index."""
    if acc.dtype.kind == "S":
        codes = np.full(len(acc), 255, dtype=np.uint8)
        low = np.char.lower(acc)
        for ch, code in ((b"r", 0), (b"w", 1), (b"x", 2)):
            codes[low == ch] = code
        acc = codes
    if acc.dtype.kind not in "uib":
        raise InvalidInput("%s: 'access' must be integer codes or b'r'/b'w'/b'x'" % path)
    bad = (acc < 0) | (acc > 2) if acc.dtype.kind == "i" else acc > 2
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidInput("%s: record %d has access kind %r (0 read, 1 write, 2 fetch)"
                           % (path, base + i, acc[i].item()))
    return acc.astype(np.uint8)


def _va_array(va, path, base):
    if va.dtype.kind not in "ui":
        raise InvalidInput("%s: 'va' must be a 1-D integer array" % path)
    if va.dtype.kind == "i" and len(va) and int(va.min()) < 0:
        i = int(np.flatnonzero(va < 0)[0])
        raise InvalidInput("%s: record %d has a negative address" % (path, base + i))
    return va.astype(_U64)


def _iter_arrays(streams, path, chunk, user):
    """TRACE_DTYPE pieces from .npy streams: {"trace": s} (structured or
    plain addresses) or {"va": s, ["access": s], ["user": s]}."""
    if "trace" in streams:
        s = streams["trace"]
        names = s.dtype.names
        if names and set(("va", "access", "user")) <= set(names):
            cols = {"va": s, "access": s, "user": s}
            pick = {"va": "va", "access": "access", "user": "user"}
        elif s.dtype.kind in "ui":
            cols, pick = {"va": s}, {"va": None}
        else:
            raise InvalidInput("%s: 'trace' must be a TRACE_DTYPE array or integer addresses"
                               % path)
    else:
        if "va" not in streams:
            raise InvalidInput("%s: no 'trace' or 'va' array" % path)
        cols = {k: streams[k] for k in ("va", "access", "user") if k in streams}
        pick = {k: None for k in cols}
        for k, s in cols.items():
            if s.n != cols["va"].n:
                raise InvalidInput("%s: '%s' and 'va' differ in length" % (path, k))
    n = cols["va"].n
    base = 0
    while base < n:
        k = min(chunk, n - base)
        got = {}
        for name, s in cols.items():
            if id(s) not in got:
                got[id(s)] = s.read(k)
        def col(name):
            a = got[id(cols[name])]
            return a if pick[name] is None else a[pick[name]]
        out = np.empty(k, dtype=TRACE_DTYPE)
        out["va"] = _va_array(col("va"), path, base)
        out["access"] = _codes(col("access"), path, base) if "access" in cols else ACC_READ
        out["user"] = np.asarray(col("user"), dtype=bool) if "user" in cols else user
        yield out, np.zeros(k, np.uint8)
        base += k


def _iter_npz(path, chunk, user):
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidInput("trace %s: not a readable .npz (%s)" % (path, exc)) from None
    with zf:
        names = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
        wanted = ["trace"] if "trace" in names else [k for k in ("va", "access", "user")
                                                     if k in names]
        handles = [zf.open(names[k]) for k in wanted]
        try:
            streams = {k: _NpyStream(h, "%s:%s" % (path, k)) for k, h in zip(wanted, handles)}
            yield from _iter_arrays(streams, path, chunk, user)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise InvalidInput("trace %s: not a readable .npz (%s)" % (path, exc)) from None
        finally:
            for h in handles:
                h.close()


def _iter_npy(path, chunk, user):
    with open(path, "rb") as fh:
        yield from _iter_arrays({"trace": _NpyStream(fh, path)}, path, chunk, user)


def _iter_text(path, chunk, user, log=None):
    block = max(4096, chunk * 16)
    lineno = 1
    rest = b""
    with open(path, "rb") as fh:
        while True:
            data = fh.read(block)
            if not data:
                break
            data = rest + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            rest = data[cut:]
            piece = data[:cut]
            yield parse_text_block(piece, path, lineno, user, log)
            lineno += piece.count(b"\n")
    if rest:
        yield parse_text_block(rest, path, lineno, user, log)


def _format_of(path):
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic == MAGIC:
        return "ptemu"
    if magic.startswith(b"\x93NUMPY"):
        return "npy"
    if magic.startswith(b"PK"):
        return "npz"
    if path.endswith(".npz"):
        raise InvalidInput("trace %s: not a readable .npz (not a zip file)" % path)
    if path.endswith(".npy"):
        raise InvalidInput("trace %s: not a readable .npy (no NUMPY magic)" % path)
    return "text"


def _rechunk(pieces, chunk):
    """Pieces of exactly `chunk` records (the last may be shorter), none
    empty: slices of the format's own pieces, joined only across their
    boundaries."""
    held_t, held_s, held = [], [], 0
    for tr, sz in pieces:
        i = 0
        if held:
            i = min(chunk - held, len(tr))
            held_t.append(tr[:i])
            held_s.append(sz[:i])
            held += i
            if held < chunk:
                continue
            yield np.concatenate(held_t), np.concatenate(held_s)
            held_t, held_s, held = [], [], 0
        while len(tr) - i >= chunk:
            yield tr[i:i + chunk], sz[i:i + chunk]
            i += chunk
        if i < len(tr):
            held_t, held_s, held = [tr[i:]], [sz[i:]], len(tr) - i
    if held:
        yield np.concatenate(held_t), np.concatenate(held_s)


def _check_path(path):
    open_input(path, "trace", InvalidInput).close()
    return os.fspath(path)


def _iter_pieces(path, chunk, user):
    fmt = _format_of(path)
    if fmt == "ptemu":
        return _TraceFile(path).chunks_iter()
    if fmt == "npy":
        return _iter_npy(path, chunk, user)
    if fmt == "npz":
        return _iter_npz(path, chunk, user)
    return _iter_text(path, chunk, user)


def iter_trace(path, chunk=1 << 16, user=True, with_size=False):
    """Stream the trace file at `path` as TRACE_DTYPE arrays of `chunk`
    records (the last one may be shorter) (with_size: (records, sizes) pairs; sizes are bytes per
    access, 0 where the format does not say).

    Every format (this one, .npy, .npz, text) is read piece by piece, so
    memory stays bounded by the chunk size, whatever the trace's length.
    `user` is the mode of records whose format does not say.
    """
    path = _check_path(path)
    if not isinstance(chunk, int) or chunk < 1:
        raise InvalidInput("chunk must be a positive int")
    for tr, sz in _rechunk(_iter_pieces(path, chunk, user), chunk):
        if len(tr):
            yield (tr, sz) if with_size else tr


def read_trace(path, user=True):
    """The whole trace file as one TRACE_DTYPE array (iter_trace, joined).

    .npz: an array 'trace' (TRACE_DTYPE-like, or plain addresses) or arrays
    'va' (+ optional 'access': 0/1/2 or b'r'/b'w'/b'x', 'user').  .npy: the
    same as 'trace'.  A ptemu trace file (docs/traces.md).  Anything else is
    text (see the module docstring).  `user` is the mode of records that do
    not say.
    """
    pieces = list(iter_trace(path, chunk=1 << 20, user=user))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=TRACE_DTYPE)


def write_trace(path, trace, command=None, size=None, codec="zstd"):
    """Write a TRACE_DTYPE array: .npz (array 'trace') or .npy by the
    suffix, else this module's compressed format.  Returns the path."""
    if not isinstance(trace, np.ndarray) or trace.dtype != TRACE_DTYPE:
        raise InvalidInput("write_trace needs a TRACE_DTYPE array")
    path = os.fspath(path)
    if path.endswith(".npz"):
        np.savez(path, trace=trace)
    elif path.endswith(".npy"):
        np.save(path, trace)
    else:
        with TraceWriter(path, command=command, codec=codec) as w:
            w.append(trace, size)
    return path


# ---------------------------------------------------------------------------
# Summaries: counts, pages, the command
# ---------------------------------------------------------------------------
class TraceSummary(Record):
    """path, format, records, reads, writes, fetches, supervisor, pages
    (sorted page numbers), page_flags (1 read, 2 write, 4 fetch, 8
    supervisor), command, end (how the recording ended), file_bytes,
    chunks, complete."""

    @property
    def bytes_per_access(self):
        return self.file_bytes / self.records if self.records else float("nan")

    @property
    def footprint_bytes(self):
        return PAGE * len(self.pages)


def trace_summary(path, user=True):
    """A TraceSummary of the file.  A complete file of this format answers
    from its header and PAGE/END blocks, every chunk's checksum checked but
    none decompressed; any other file is read through."""
    path = _check_path(path)
    fmt = _format_of(path)
    out = TraceSummary(path=path, format=fmt, file_bytes=os.path.getsize(path), command=None,
                       end=None, chunks=None, complete=True, codec=None)
    if fmt == "ptemu":
        tf = _TraceFile(path)
        out.update(command=tf.meta.get("command"), codec=tf.meta.get("codec"),
                   chunks=tf.chunks, complete=tf.complete)
        tail = tf.tail_blocks()
        if tail is not None:
            tf.verify_chunks()
            pages, flags, end = tail
            out.update(records=tf.records, reads=tf.by_kind[0], writes=tf.by_kind[1],
                       fetches=tf.by_kind[2], supervisor=tf.supervisor, pages=pages,
                       page_flags=flags, end=end)
            return out
    counts = np.zeros(3, dtype=np.int64)
    sup = n = 0
    keys = np.zeros(0, dtype=_U64)
    for tr in iter_trace(path, chunk=1 << 20, user=user):
        n += len(tr)
        counts += np.bincount(tr["access"], minlength=3)[:3]
        sup += int(np.count_nonzero(~tr["user"]))
        keys = np.union1d(keys, _page_keys(tr))
    pages, flags = _pages_from_keys(keys)
    out.update(records=n, reads=int(counts[0]), writes=int(counts[1]), fetches=int(counts[2]),
               supervisor=sup, pages=pages, page_flags=flags)
    return out


# ---------------------------------------------------------------------------
# Recording with Valgrind lackey
# ---------------------------------------------------------------------------
class RecordResult(Record):
    """path, command, records, exit_status (CMD's, None if killed),
    signal (the signal that ended it, or None), stopped ("max" when --max
    cut it short, else None), seconds, file_bytes, valgrind_log (its
    "==pid==" lines)."""

    @property
    def ok(self):
        return self.exit_status == 0 or self.stopped == "max"


INSTALL_HINT = ("valgrind is not installed: install it with `apt-get install valgrind` "
                "(Debian/Ubuntu; `dnf install valgrind` on Fedora)")


def record(command, out, max_accesses=None, codec="zstd", level=3,
           chunk_records=CHUNK_RECORDS, stdout=None, stderr=None, progress=None,
           valgrind="valgrind"):
    """Run `command` (a list) under Valgrind lackey and write its accesses
    to the trace file `out`.  lackey's log comes through a pipe and is
    converted as it arrives.  max_accesses stops the recording (and the
    command) after that many accesses.  Returns a RecordResult; CMD's
    failure is a result (the trace stays valid), not an exception.

    The trace is written beside `out` and renamed over it when the
    recording ends (also when it is interrupted: the END block says how),
    unless CMD never ran (valgrind could not start it: no access and a
    failing status): then nothing is written, an existing `out` stays as
    it was, and the result's path is None.
    """
    command = [os.fspath(c) for c in command]
    if not command:
        raise InvalidInput("no command to record")
    if max_accesses is not None and (not isinstance(max_accesses, int) or max_accesses < 1):
        raise InvalidInput("max_accesses must be a positive int")
    exe = shutil.which(valgrind)
    if exe is None:
        raise ValgrindMissing(INSTALL_HINT)
    bar = progress_bar(show_progress(progress), total=max_accesses, desc="recording",
                       unit="acc", unit_scale=True, leave=False)
    rfd, wfd = os.pipe()
    try:
        # A larger pipe lets valgrind run ahead while a block is parsed
        # (Linux: up to /proc/sys/fs/pipe-max-size, 1 MiB by default).
        import fcntl
        fcntl.fcntl(wfd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (ImportError, OSError):
        pass
    argv = [exe, "--tool=lackey", "--trace-mem=yes", "--log-fd=%d" % wfd] + command
    t0 = time.perf_counter()
    log = []
    stopped = None
    fd, tmp = temp_beside(out)
    os.close(fd)
    try:
        writer = TraceWriter(tmp, command=command, codec=codec, level=level,
                             chunk_records=chunk_records,
                             meta={"recorder": "valgrind --tool=lackey --trace-mem=yes"})
    except BaseException:
        os.unlink(tmp)
        raise

    def land(records, ran):
        if records or ran:
            os.replace(tmp, out)
            return True
        os.unlink(tmp)
        return False
    try:
        try:
            proc = subprocess.Popen(argv, pass_fds=(wfd,), stdin=subprocess.DEVNULL,
                                    stdout=stdout, stderr=stderr)
        finally:
            os.close(wfd)
        with os.fdopen(rfd, "rb", buffering=0) as pipe:
            rest = b""
            lineno = 1
            while True:
                data = pipe.read(1 << 20)
                if not data:
                    if not rest:
                        break
                    data, rest = rest + b"\n", b""      # a last line with no newline
                else:
                    data = rest + data
                cut = data.rfind(b"\n") + 1
                rest = data[cut:]
                if not cut:
                    continue
                block = data[:cut]
                tr, sz = parse_text_block(block, "<lackey>", lineno, True, log)
                lineno += block.count(b"\n")
                if max_accesses is not None and writer.records + writer._npending + len(tr) \
                        >= max_accesses:
                    k = max_accesses - writer.records - writer._npending
                    writer.append(tr[:k], sz[:k])
                    stopped = "max"
                    proc.kill()
                    break
                writer.append(tr, sz)
                bar.update(len(tr))
        rc = proc.wait()
    except BaseException as exc:
        bar.close()
        try:
            proc.kill()
            proc.wait()
        except Exception:
            pass
        writer.close(error="%s: %s" % (type(exc).__name__, exc), stopped="error")
        land(writer.records, False)
        raise
    seconds = time.perf_counter() - t0
    bar.close()
    records = writer.records + writer._npending
    status = rc if rc >= 0 else None
    sig = None
    if rc < 0:
        sig = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
        if stopped == "max":
            sig = None             # our own kill, not CMD's fate
    end = {"exit_status": status, "signal": sig, "stopped": stopped, "seconds": seconds,
           "valgrind_log": log[-40:]}
    size = writer.close(**end)
    if not land(records, status == 0 or stopped == "max"):
        size = 0
    return RecordResult(path=os.fspath(out) if size else None, command=command,
                        records=records, exit_status=status, signal=sig, stopped=stopped,
                        seconds=seconds, file_bytes=size, valgrind_log=log)


# ---------------------------------------------------------------------------
# Replay through the guest kernel
# ---------------------------------------------------------------------------
def layout_from_pages(pages, flags, merge_gap=16):
    """The user-half VMAs (start, length, prot) for the touched pages:
    pages the trace fetches from and never writes are "rx", pages it only
    reads or writes are "rw", pages it both writes and fetches (code that
    is written, e.g. a JIT) are "rwx".  Runs of the same prot with gaps of
    at most merge_gap untouched pages become one VMA.  Pages at or above
    the user top are left out (the guest cannot map them for a process)."""
    pages = np.asarray(pages, dtype=_U64)
    flags = np.asarray(flags, dtype=np.uint8)
    keep = pages < _U64(USER_TOP >> 12)
    pages, flags = pages[keep], flags[keep]
    if not len(pages):
        return ()
    fetch = (flags & 4) != 0
    write = (flags & 2) != 0
    prot = np.where(fetch & write, 2, np.where(fetch, 1, 0))
    names = ("rw", "rx", "rwx")
    brk = np.flatnonzero((np.diff(pages.astype(np.int64)) > merge_gap + 1)
                         | (np.diff(prot) != 0)) + 1
    starts = np.concatenate([[0], brk])
    ends = np.concatenate([brk, [len(pages)]]) - 1
    out = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        lo, hi = int(pages[s]), int(pages[e]) + 1
        out.append((lo * PAGE, (hi - lo) * PAGE, names[int(prot[s])]))
    return tuple(out)


class _Stream:
    """One process's trace, handed out in pieces of at most k records."""

    def __init__(self, path, chunk, user):
        self._it = iter_trace(path, chunk=chunk, user=user)
        self._cur = None
        self._pos = 0

    def take(self, k):
        if self._cur is None or self._pos >= len(self._cur):
            self._cur = next(self._it, None)
            self._pos = 0
            if self._cur is None:
                return None
            self._cur["user"] = True        # replayed at CPL 3 (see TraceWorkload)
        piece = self._cur[self._pos:self._pos + k]
        self._pos += len(piece)
        return piece


class TraceWorkload:
    """Recorded programs replayed as guest processes of a ptemu.guest.Kernel.

    path_or_paths: one trace file (any format iter_trace reads) or a list;
    each is one process, and with several they run round-robin, switching
    every `slice` accesses (a context switch is the kernel's CR3 load).
    total: replay at most this many accesses in all (None: every record).
    exit_at_end: a process whose trace ends exits (and is reaped).

    The address space is built by demand paging.  The VMAs come from the
    pages each trace touches (layout_from_pages: fetched-from pages r-x,
    data pages rw- and NX); no page is mapped before its first touch, which
    is a guest #PF the kernel's handler resolves: a read maps the shared
    zero page read-only, a write a fresh zeroed frame, so a write to a page
    first mapped by a read is a protection fault, resolved as a COW break
    and counted (`protection_faults`).  Every record is replayed as a user
    access (CPL 3): the trace is the process's; supervisor records are
    counted, and an address the guest cannot map for a process
    (non-canonical: #GP; the kernel half: #PF) is a guest fault the kernel
    sees and reports (SIGSEGV, `guest_faults`), never a crash: the replay
    counts it and goes on with the next record.

    The result (a WorkloadResult) adds to accesses/faults/seconds/kernel/
    machine: processes, demand_faults, protection_faults, guest_faults
    (by kind: noncanonical, kernel_half, unmapped), supervisor_records.
    """

    def __init__(self, path_or_paths, slice=100_000, total=None, chunk=1 << 16,
                 exit_at_end=False, user=True):
        if isinstance(path_or_paths, (str, bytes, os.PathLike)):
            paths = [path_or_paths]
        else:
            paths = list(path_or_paths)
        if not paths:
            raise InvalidInput("TraceWorkload needs at least one trace")
        if not isinstance(slice, int) or slice < 1:
            raise InvalidInput("slice must be a positive int")
        if not isinstance(chunk, int) or chunk < 1:
            raise InvalidInput("chunk must be a positive int")
        if total is not None and (not isinstance(total, int) or total < 1):
            raise InvalidInput("total must be a positive int or None")
        self.paths = [_check_path(p) for p in paths]
        self.slice, self.total, self.chunk = slice, total, chunk
        self.exit_at_end, self.user = bool(exit_at_end), user
        self.summaries = [trace_summary(p, user=user) for p in self.paths]
        self.layouts = [layout_from_pages(s.pages, s.page_flags) for s in self.summaries]
        user_pages = sum(int(np.count_nonzero(s.pages < _U64(USER_TOP >> 12)))
                         for s in self.summaries)
        #: Guest memory the replay needs at most (twice every touched user
        #: page, for its frame and tables, and 16 MiB for the kernel's own
        #: frames); ptemu study sizes the machine by it.
        self.guest_memory_bytes = PAGE * (2 * user_pages + 4096)
        self.pids = None

    @property
    def records(self):
        n = sum(s.records for s in self.summaries)
        return n if self.total is None else min(n, self.total)

    def setup(self, kernel):
        self.pids = [kernel.spawn(layout) for layout in self.layouts]

    def run(self, kernel):
        """Replay every trace; a WorkloadResult."""
        from ptemu.workloads import WorkloadResult, _snapshot
        from ptemu.guest import SegmentationFault
        from ptemu._native import GeneralProtection
        if self.pids is None:
            self.setup(kernel)
        st = kernel.stats
        before = {k: st.get(k, 0) for k in ("page_fault", "pf_zero_page", "pf_demand_zero",
                                             "pf_cow_copy", "pf_cow_reuse")}
        guest = {"noncanonical": 0, "kernel_half": 0, "unmapped": 0}
        first_faults = []
        t0 = time.perf_counter()
        streams = [_Stream(p, self.chunk, self.user) for p in self.paths]
        live = list(range(len(streams)))
        budget = self.total if self.total is not None else -1
        step = self.slice if len(streams) > 1 else 1 << 62
        done = 0
        while live and budget:
            for i in list(live):
                pid, s = self.pids[i], streams[i]
                k = step
                while k > 0 and budget:
                    piece = s.take(k if budget < 0 else min(k, budget))
                    if piece is None:
                        live.remove(i)
                        if self.exit_at_end:
                            kernel.exit(pid)
                            kernel.wait(pid)
                        break
                    k -= len(piece)
                    done += len(piece)
                    if budget > 0:
                        budget -= len(piece)
                    start = 0
                    while True:
                        try:
                            kernel.run(pid, piece, start)
                            break
                        except SegmentationFault as exc:
                            va = exc.va
                            if isinstance(exc.fault, GeneralProtection):
                                kind = "noncanonical"
                            elif va is not None and va >= USER_TOP:
                                kind = "kernel_half"
                            else:
                                kind = "unmapped"
                            guest[kind] += 1
                            if len(first_faults) < 8:
                                first_faults.append((pid, kind, va))
                            start = exc.index + 1
                            if start >= len(piece):
                                break
                if not budget:
                    break
        delta = {k: st.get(k, 0) - v for k, v in before.items()}
        unresolved = guest["kernel_half"] + guest["unmapped"]
        return WorkloadResult(
            accesses=done, faults=delta["page_fault"] - unresolved,
            seconds=time.perf_counter() - t0, kernel=_snapshot(st),
            machine=_snapshot(kernel.machine.stats), processes=len(self.paths),
            demand_faults=delta["pf_zero_page"] + delta["pf_demand_zero"],
            protection_faults=delta["pf_cow_copy"] + delta["pf_cow_reuse"],
            guest_faults=guest, first_guest_faults=first_faults,
            supervisor_records=sum(int(s.supervisor) for s in self.summaries))
