"""Real programs as workloads (issue 10): the trace format, streaming
readers, Valgrind lackey recording and replay through the guest kernel.

Format expectations are derived by hand from docs/traces.md (header
fields, the zigzag-coded per-stream deltas); the recordings are of real
programs (/bin/ls, python3 -c, sh); replay is checked against the rights
and A/D rules of the SDM (Vol. 3A 4.6, 4.7, 4.8) and, on a real recording,
for identical guest-visible results on native, shadow, unsync, paravirt and
nested machines.
"""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ptemu import InvalidInput, TRACE_DTYPE, PTE_P, PTE_W, PTE_U, PTE_NX, PTE_A, PTE_D
from ptemu import traces
from ptemu.traces import (TraceWriter, CorruptTrace, iter_trace, read_trace, write_trace,
                          trace_summary, parse_text_block, layout_from_pages, TraceWorkload)
from ptemu import workloads
from ptemu.guest import NativeMachine, Kernel, USER_TOP
from ptemu.cli import main

HAVE_VALGRIND = shutil.which("valgrind") is not None


@pytest.fixture(scope="module", autouse=True)
def _children_without_sanitizers():
    """Under tools/sanitize.sh the ASan/UBSan runtimes are in LD_PRELOAD for
    this interpreter; valgrind and the programs it records are not built for
    them (and ASan cannot run under valgrind), so their environment goes
    without it.  This process keeps the runtimes it has already loaded."""
    saved = {k: os.environ.pop(k) for k in ("LD_PRELOAD",)
             if os.environ.get("PTEMU_SANITIZED") and k in os.environ}
    yield
    os.environ.update(saved)
needs_valgrind = pytest.mark.skipif(not HAVE_VALGRIND, reason="valgrind is not installed "
                                    "(.ci/run installs it: apt-get install -y valgrind)")
PAGE = 4096
MODES = ("native", "shadow", "unsync", "paravirt", "nested")


def recs(*items, user=True):
    t = np.zeros(len(items), dtype=TRACE_DTYPE)
    for i, (acc, va) in enumerate(items):
        t[i] = (va, {"r": 0, "w": 1, "x": 2}[acc], user)
    return t


def make_machine(mode, mem=8 << 20):
    if mode == "native":
        return NativeMachine(mem)
    from ptemu.hypervisor import Hypervisor
    hv = Hypervisor(64 << 20)
    if mode == "unsync":
        return hv.create_vm(mem, paging="shadow", unsync=True)
    return hv.create_vm(mem, paging=mode)


# ---------------------------------------------------------------------------
# The format, by hand
# ---------------------------------------------------------------------------
def test_header_and_chunk_layout_by_hand(tmp_path):
    """docs/traces.md: the 72-byte header, the meta JSON, then a CHNK block
    whose payload (codec none) is kind[n] | size[n] | zigzag(delta)[n]."""
    p = tmp_path / "t.ptrace"
    t = recs(("x", 0x1000), ("x", 0x1003), ("r", 0x7000), ("w", 0x7008), ("x", 0x0ff0))
    t["user"][4] = False
    size = np.array([3, 2, 8, 8, 4], np.uint8)
    with TraceWriter(p, command=["prog", "arg"], codec="none") as w:
        w.append(t, size)
    data = p.read_bytes()
    (magic, version, flags, header_len, records, reads, writes, fetches, sup, chunks,
     meta_len, tail) = struct.unpack_from("<8sHHIQQQQQIIQ", data, 0)
    assert (magic, version, flags) == (b"PTEMUTRC", 1, 1)
    assert (records, reads, writes, fetches, sup, chunks) == (5, 1, 1, 3, 1, 1)
    assert header_len == 72 + meta_len
    assert json.loads(data[72:header_len])["command"] == ["prog", "arg"]
    tag, n, raw_len, stored_len, crc, codec, first = struct.unpack_from("<4sIIIIB3xQ", data,
                                                                         header_len)
    assert (tag, n, raw_len, stored_len, codec, first) == (b"CHNK", 5, 50, 50, 0, 0)
    payload = data[header_len + 32:header_len + 32 + 50]
    assert crc == zlib.crc32(payload)
    assert list(payload[:5]) == [2, 2, 0, 1, 2 | 4]          # access | supervisor << 2
    assert list(payload[5:10]) == [3, 2, 8, 8, 4]
    zz = struct.unpack("<5Q", payload[10:])
    # fetch: 0x1000 - 0; 0x1003 - (0x1000 + 3) = 0; 0x0ff0 - (0x1003 + 2) = -0x15
    # data: 0x7000 - 0; 0x7008 - 0x7000 = 8.  zigzag: 2d for d >= 0, -2d - 1 below.
    assert zz == (0x2000, 0, 0xe000, 16, 2 * 0x15 - 1)
    assert tail == header_len + 32 + 50
    back, sz = next(iter_trace(p, with_size=True))
    assert (back == t).all() and sz.tolist() == size.tolist()


trace_records = st.lists(st.tuples(st.integers(0, 2 ** 64 - 1), st.integers(0, 2),
                                   st.booleans(), st.integers(0, 255)), max_size=60)


@settings(max_examples=40)
@given(trace_records, st.integers(1, 9), st.sampled_from(["zstd", "zlib", "none"]),
       st.integers(1, 17))
def test_roundtrip_property(tmp_path_factory, items, chunk_records, codec, chunk):
    """Any records (any 64-bit address, kind, mode, size) come back exactly,
    across chunk boundaries and for every read chunk size."""
    p = tmp_path_factory.mktemp("rt") / "t.ptrace"
    t = np.zeros(len(items), TRACE_DTYPE)
    size = np.zeros(len(items), np.uint8)
    for i, (va, acc, user, sz) in enumerate(items):
        t[i] = (va, acc, user)
        size[i] = sz
    with TraceWriter(p, codec=codec, chunk_records=chunk_records) as w:
        w.append(t[:len(t) // 2], size[:len(t) // 2])
        w.append(t[len(t) // 2:], size[len(t) // 2:])
    pieces = list(iter_trace(p, chunk=chunk, with_size=True))
    assert all(0 < len(a) <= chunk for a, _ in pieces)
    back = np.concatenate([a for a, _ in pieces]) if pieces else np.zeros(0, TRACE_DTYPE)
    assert (back == t).all() and len(back) == len(t)
    if pieces:
        assert np.concatenate([s for _, s in pieces]).tolist() == size.tolist()
    s = trace_summary(p)
    assert (s.records, s.reads, s.writes, s.fetches) == (
        len(t), int((t["access"] == 0).sum()), int((t["access"] == 1).sum()),
        int((t["access"] == 2).sum()))
    assert s.pages.tolist() == sorted(set((t["va"] >> np.uint64(12)).tolist()))


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------
def _three_chunks(tmp_path, codec="zstd"):
    p = tmp_path / "c.ptrace"
    t = recs(*[("r", 0x10000 + 8 * i) for i in range(30)])
    with TraceWriter(p, codec=codec, chunk_records=10) as w:
        w.append(t)
    data = p.read_bytes()
    header_len = struct.unpack_from("<I", data, 12)[0]
    offs = [header_len]
    for _ in range(3):
        stored = struct.unpack_from("<I", data, offs[-1] + 12)[0]
        offs.append(offs[-1] + 32 + stored)
    return p, data, offs


def test_truncated_file_names_the_chunk_and_offset(tmp_path):
    p, data, offs = _three_chunks(tmp_path)
    # Cut inside chunk 1's payload, inside chunk 2's block header, at a block boundary.
    for cut, chunk, off in ((offs[1] + 40, 1, offs[1]), (offs[2] + 5, 2, offs[2]),
                            (offs[2], 2, offs[2])):
        p.write_bytes(data[:cut])
        with pytest.raises(CorruptTrace, match="chunk %d at byte offset %d: truncated"
                           % (chunk, off)) as ei:
            list(iter_trace(p))
        assert (ei.value.chunk, ei.value.offset) == (chunk, off)
    p.write_bytes(data[:40])
    with pytest.raises(CorruptTrace, match="header: truncated"):
        read_trace(p)


def test_corrupt_payload_and_bad_magic(tmp_path):
    p, data, offs = _three_chunks(tmp_path)
    bad = bytearray(data)
    bad[offs[1] + 32 + 3] ^= 0xff
    p.write_bytes(bytes(bad))
    with pytest.raises(CorruptTrace, match="chunk 1 at byte offset %d: checksum" % offs[1]):
        read_trace(p)
    bad = bytearray(data)
    bad[offs[2]:offs[2] + 4] = b"XXXX"
    p.write_bytes(bytes(bad))
    with pytest.raises(CorruptTrace, match="chunk 2 at byte offset %d: bad block tag"
                       % offs[2]):
        read_trace(p)
    bad = bytearray(data)
    bad[0] = ord("Q")
    p.write_bytes(bytes(bad))
    with pytest.raises(InvalidInput):        # no magic: read as text, which it is not
        read_trace(p)


def test_trace_info_finds_a_corrupt_chunk_without_decompressing(tmp_path, capsys, monkeypatch):
    """`trace info` answers from the header and PAGE/END blocks, but a file
    whose chunk payload was damaged (a complete, otherwise valid file) is
    refused, naming the chunk and its offset, as a replay would refuse it;
    checking takes the checksums only (no chunk is decompressed)."""
    p, data, offs = _three_chunks(tmp_path)
    assert main(["trace", "info", str(p)]) == 0
    capsys.readouterr()
    bad = bytearray(data)
    bad[offs[2] + 32 + 1] ^= 0x40
    p.write_bytes(bytes(bad))
    calls = []
    real = traces._Codec.decompress
    monkeypatch.setattr(traces._Codec, "decompress",
                        lambda self, *a: calls.append(a) or real(self, *a))
    assert main(["trace", "info", str(p)]) == 2
    assert len(calls) == 2                 # the PAGE and END blocks, no chunk
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "chunk 2 at byte offset %d: checksum mismatch" % offs[2] in err
    bad = bytearray(data)                  # chunk 1 says it starts at record 11, not 10
    struct.pack_into("<Q", bad, offs[1] + 24, 11)
    p.write_bytes(bytes(bad))
    with pytest.raises(CorruptTrace, match="chunk 1 at byte offset %d: expected chunk 1"
                       % offs[1]):
        traces.trace_summary(p)


def test_out_of_range_kind_is_refused_with_its_index(tmp_path):
    p, data, offs = _three_chunks(tmp_path, codec="none")
    bad = bytearray(data)
    payload = offs[1] + 32
    bad[payload + 4] = 3                    # record 10 + 4 of the file
    struct.pack_into("<I", bad, offs[1] + 16, zlib.crc32(bytes(bad[payload:payload + 100])))
    p.write_bytes(bytes(bad))
    with pytest.raises(CorruptTrace, match="chunk 1 at byte offset %d: record 14 has access "
                       "kind 3" % offs[1]):
        read_trace(p)
    np.savez(tmp_path / "k.npz", va=np.arange(5, dtype=np.uint64),
             access=np.array([0, 1, 2, 7, 0]))
    with pytest.raises(InvalidInput, match="record 3 has access kind 7"):
        read_trace(tmp_path / "k.npz")
    bad_t = recs(("r", 1), ("r", 2))
    bad_t["access"][1] = 9
    with pytest.raises(InvalidInput, match="record 1 has access kind 9"):
        write_trace(tmp_path / "w.ptrace", bad_t)
    (tmp_path / "t.txt").write_text("r 0x1000\nq 0x2000\n")
    with pytest.raises(InvalidInput, match="t.txt:2"):
        read_trace(tmp_path / "t.txt")


@settings(max_examples=80)
@given(st.data())
def test_hostile_files_give_a_clear_error_or_a_valid_trace(tmp_path_factory, data):
    """Random truncations and byte changes of a valid file (header, block
    headers, payloads): reading either succeeds with TRACE_DTYPE records of
    valid kinds or raises InvalidInput; nothing else escapes."""
    d = tmp_path_factory.mktemp("hostile")
    _, good, offs = _three_chunks(d, codec=data.draw(st.sampled_from(["zstd", "zlib", "none"])))
    bad = bytearray(good[:data.draw(st.integers(0, len(good)))])
    for _ in range(data.draw(st.integers(0, 4))):
        if bad:
            i = data.draw(st.integers(0, len(bad) - 1))
            bad[i] = data.draw(st.integers(0, 255))
    p = d / "h.ptrace"
    p.write_bytes(bytes(bad))
    try:
        t = read_trace(p)
        s = trace_summary(p)
    except InvalidInput:
        return
    assert t.dtype == TRACE_DTYPE and (t["access"] <= 2).all()
    assert s.records >= 0


def test_a_writer_that_dies_leaves_a_valid_file(tmp_path):
    p = tmp_path / "d.ptrace"
    with pytest.raises(RuntimeError):
        with TraceWriter(p, chunk_records=4) as w:
            w.append(recs(*[("w", 0x5000 + i) for i in range(10)]))
            raise RuntimeError("boom")
    assert len(read_trace(p)) == 10
    assert "boom" in trace_summary(p).end["error"]


# ---------------------------------------------------------------------------
# Every format, streamed
# ---------------------------------------------------------------------------
def _all_formats(tmp_path, t):
    paths = {}
    paths["ptemu"] = write_trace(tmp_path / "a.ptrace", t)
    paths["npy"] = write_trace(tmp_path / "a.npy", t)
    paths["npz"] = write_trace(tmp_path / "a.npz", t)
    np.savez(tmp_path / "cols.npz", va=t["va"], access=t["access"], user=t["user"])
    paths["npz-columns"] = str(tmp_path / "cols.npz")
    txt = tmp_path / "a.txt"
    txt.write_text("".join("%s %#x %s\n" % ("rwx"[a], v, "u" if u else "s")
                           for v, a, u in t.tolist()))
    paths["text"] = str(txt)
    return paths


def test_iter_trace_streams_every_format(tmp_path):
    rng = np.random.default_rng(3)
    t = np.zeros(1000, TRACE_DTYPE)
    t["va"] = rng.integers(0, 1 << 47, 1000, dtype=np.uint64)
    t["access"] = rng.integers(0, 3, 1000)
    t["user"] = rng.random(1000) < 0.8
    for fmt, path in _all_formats(tmp_path, t).items():
        pieces = list(iter_trace(path, chunk=64))
        assert [len(x) for x in pieces[:-1]] == [64] * (len(pieces) - 1), fmt
        assert (np.concatenate(pieces) == t).all(), fmt
        assert (read_trace(path) == t).all(), fmt
        assert (workloads.read_trace(path) == t).all(), fmt
        assert trace_summary(path).records == 1000, fmt


def test_iter_trace_memory_stays_bounded(tmp_path):
    """A 2 M-record trace (32 MB as .npy, .npz) streams in 4096-record
    chunks with numpy's allocations (tracked by tracemalloc) far below the
    file's size."""
    n = 2_000_000
    t = np.zeros(n, TRACE_DTYPE)
    t["va"] = np.arange(n, dtype=np.uint64) * np.uint64(64)
    t["access"] = np.arange(n) % 3
    t["user"] = True
    paths = [write_trace(tmp_path / "m.npy", t), write_trace(tmp_path / "m.ptrace", t)]
    np.savez(tmp_path / "m.npz", va=t["va"], access=t["access"])
    paths.append(str(tmp_path / "m.npz"))
    del t
    for path in paths:
        tracemalloc.start()
        total = 0
        for piece in iter_trace(path, chunk=4096):
            total += len(piece)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert total == n
        # the ptemu format decodes whole 256 Ki-record chunks (4 MiB of
        # records, about 18 MiB with the temporaries); .npy/.npz read 4096
        # records at a time.
        limit = 24 << 20 if path.endswith(".ptrace") else 4 << 20
        assert peak < limit, (path, peak)


lackey_line = st.one_of(
    st.tuples(st.just("I "), st.integers(0, 2 ** 64 - 1), st.integers(1, 15)),
    st.tuples(st.sampled_from([" L", " S", " M"]), st.integers(0, 2 ** 64 - 1),
              st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 255, 999])))


@settings(max_examples=60)
@given(st.lists(st.one_of(lackey_line, st.sampled_from(["==12== Lackey", "", "--7-- x"])),
                max_size=40), st.booleans())
def test_lackey_fast_path_matches_the_general_parser(lines, upper):
    text = []
    for ln in lines:
        if isinstance(ln, str):
            text.append(ln)
        else:
            k, va, size = ln
            h = "%08x" % va
            text.append("%s %s,%d" % (k, h.upper() if upper else h, size))
    buf = ("\n".join(text) + "\n").encode() if text else b""
    fast = traces._parse_lackey(buf, True, None)
    assert fast is not None
    slow = traces._parse_lines(buf.decode().split("\n")[:-1] if buf else [], "x", 1, True, None)
    assert (fast[0] == slow[0]).all() and len(fast[0]) == len(slow[0])
    expect = np.minimum([s for ln in lines if not isinstance(ln, str)
                         for s in ([ln[2]] * (2 if ln[0] == " M" else 1))], 255)
    assert fast[1].tolist() == list(expect)


def test_mixed_text_block_takes_the_general_parser():
    tr, size = parse_text_block(b"I  00401000,3\nw 0x2000 s\n M 10,4\n")
    assert tr["va"].tolist() == [0x401000, 0x2000, 0x10, 0x10]
    assert tr["access"].tolist() == [2, 1, 0, 1]
    assert tr["user"].tolist() == [True, False, True, True]
    assert size.tolist() == [3, 0, 4, 4]


# ---------------------------------------------------------------------------
# Recording real programs
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    if not HAVE_VALGRIND:
        pytest.skip("valgrind is not installed (.ci/run installs it)")
    d = tmp_path_factory.mktemp("rec")
    out = {}
    with open(os.devnull, "w") as null:
        out["ls"] = traces.record(["/bin/ls", "-l", "/"], d / "ls.ptrace",
                                  max_accesses=40_000, stdout=null)
        out["py"] = traces.record([sys.executable, "-c", "x = [i * i for i in range(10**6)]"],
                                  d / "py.ptrace", max_accesses=40_000, stdout=null)
    return out


@needs_valgrind
def test_record_ls_and_python(recordings):
    for name, r in recordings.items():
        assert r.records == 40_000 and r.stopped == "max", name
        s = trace_summary(r.path)
        assert s.records == 40_000 and s.command == r.command
        assert s.end["stopped"] == "max"
        # a real program fetches, reads and writes, all in the user half
        assert min(s.reads, s.writes, s.fetches) > 100
        assert int(s.pages.max()) < USER_TOP >> 12 and s.supervisor == 0
        assert s.bytes_per_access < 3.0, (name, s.bytes_per_access)
        t = read_trace(r.path)
        assert len(t) == 40_000 and t["user"].all()


@needs_valgrind
def test_pipe_conversion_equals_lackeys_own_log(tmp_path):
    """A real lackey log (valgrind --log-file of /bin/true) fed through the
    pipe in odd-sized pieces (a stand-in `valgrind` replays it on --log-fd,
    since two real runs differ: ASLR, AT_RANDOM) converts to exactly what
    the general line parser makes of the file; the stand-in's exit status
    is reported."""
    log = tmp_path / "true.lackey"
    subprocess.run(["valgrind", "--tool=lackey", "--trace-mem=yes", "--log-file=%s" % log,
                    "/bin/true"], check=True, capture_output=True)
    fake = tmp_path / "fake-valgrind"
    fake.write_text("#!%s\nimport os, sys\n"
                    "fd = int([a for a in sys.argv if a.startswith('--log-fd=')][0][9:])\n"
                    "data = open(%r, 'rb').read()\n"
                    "i, k = 0, 1\n"
                    "while i < len(data):\n"
                    "    os.write(fd, data[i:i + k]); i += k; k = k * 7 %% 100003 + 1\n"
                    "sys.exit(5)\n" % (sys.executable, str(log)))
    fake.chmod(0o755)
    r = traces.record(["/bin/true"], tmp_path / "true.ptrace", valgrind=str(fake))
    slow = traces._parse_lines(log.read_text().splitlines(), str(log), 1, True, None)
    fast, size = next(iter_trace(r.path, chunk=1 << 22, with_size=True))
    assert r.exit_status == 5 and r.stopped is None
    assert len(fast) == len(slow[0]) > 10_000
    assert (fast == slow[0]).all() and (size == slow[1]).all()
    assert any("Command: /bin/true" in ln for ln in r.valgrind_log)


@needs_valgrind
def test_failing_and_killed_commands_leave_valid_traces(tmp_path):
    r = traces.record(["/bin/sh", "-c", "exit 3"], tmp_path / "f.ptrace")
    assert r.exit_status == 3 and r.signal is None and not r.ok
    assert len(read_trace(r.path)) == r.records > 1000
    assert trace_summary(r.path).end["exit_status"] == 3
    r = traces.record(["/bin/sh", "-c", "kill -SEGV $$"], tmp_path / "k.ptrace")
    assert r.signal == "SIGSEGV" and r.exit_status is None
    assert len(read_trace(r.path)) == r.records > 1000


@needs_valgrind
def test_cli_record_and_info(tmp_path, capsys):
    out = tmp_path / "cli.ptrace"
    assert main(["trace", "record", "-o", str(out), "--max", "5000", "--", "/bin/sh", "-c",
                 "exit 4"]) == 0
    err = capsys.readouterr().err
    assert "5,000 accesses" in err and "--max 5000" in err
    assert main(["trace", "record", "-o", str(out), "--", "/bin/sh", "-c", "exit 4"]) == 0
    err = capsys.readouterr().err
    assert "exit status 4" in err and "the trace is valid" in err
    assert main(["trace", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "/bin/sh -c exit 4 [exit status 4]" in text
    assert "bytes per access" in text and "distinct" in text
    assert main(["trace", "info", "--json", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    s = trace_summary(out)
    assert info["accesses"] == s.records == info["reads"] + info["writes"] + info["fetches"]
    assert info["distinct_pages"] == len(s.pages)
    assert info["footprint_bytes"] == PAGE * len(s.pages)


def test_cli_without_valgrind_and_bad_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["trace", "record", "-o", str(tmp_path / "x"), "--", "ls"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apt-get install valgrind" in err
    p, data, offs = _three_chunks(tmp_path)
    p.write_bytes(data[:offs[2] + 7])
    assert main(["trace", "info", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chunk" in err and "byte offset" in err
    assert main(["trace", "record", "-o", str(tmp_path / "x")]) == 2
    assert main(["trace", "info", str(tmp_path / "missing")]) == 2


def test_cli_refuses_an_unwritable_output_before_cmd_runs(tmp_path, capsys):
    """`-o` into a missing directory is bad input (one line, status 2),
    found before valgrind starts (so no `ran` file appears), not an OSError
    after it; a directory given as a trace names itself as one."""
    ran = tmp_path / "ran"
    out = tmp_path / "no" / "such" / "dir" / "t.ptrace"
    assert main(["trace", "record", "-o", str(out), "--", "/bin/sh", "-c",
                 "touch %s" % ran]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no directory" in err and str(out) in err
    assert not ran.exists() and not out.parent.exists()
    assert main(["trace", "record", "-o", str(tmp_path), "--", "/bin/true"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["trace", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory" in err and "no such file" not in err


@needs_valgrind
def test_record_of_a_cmd_that_never_ran_writes_nothing(tmp_path, capsys):
    """valgrind cannot start CMD: one line saying so, status 1, and an
    existing OUT left as it was (it used to be replaced by an empty trace);
    a recording that ran lands under OUT with no temporary file left."""
    out = tmp_path / "t.ptrace"
    out.write_bytes(b"an older recording")
    assert main(["trace", "record", "-o", str(out), "--", str(tmp_path / "no-such-cmd")]) == 1
    err = capsys.readouterr().err.splitlines()
    ours = [ln for ln in err if ln.startswith("ptemu")]
    assert len(ours) == 1 and "could not run" in ours[0] and "nothing written" in ours[0]
    assert out.read_bytes() == b"an older recording"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.ptrace"]
    res = traces.record(["/bin/sh", "-c", "exit 3"], out, progress=False)
    assert res.path == str(out) and res.exit_status == 3 and res.records > 0
    assert trace_summary(out).records == res.records
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.ptrace"]


@needs_valgrind
@pytest.mark.skipif(os.environ.get("PTEMU_SANITIZED") == "1",
                    reason="a child interpreter with the sanitized extension needs the "
                    "ASan runtime preloaded, and valgrind under it must not have it")
def test_record_progress_is_tqdm_on_a_terminal_only(tmp_path):
    """Recording shows the same tqdm progress as a study (ptemu._files), on
    stderr when it is a terminal (a pty with a size here) and not when it is
    a pipe; the one-line summary comes either way."""
    from ptyrun import run_on_a_pty
    argv = [sys.executable, "-m", "ptemu.cli", "trace", "record", "-o",
            str(tmp_path / "t.ptrace"), "--max", "60000", "--", "/bin/true"]
    p, err = run_on_a_pty(argv, stdout=subprocess.DEVNULL)
    assert p.returncode == 0
    assert b"recording:" in err and b"acc/s" in err and b"ptemu: recorded 60,000" in err
    p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    assert p.returncode == 0 and p.stderr.decode().startswith("ptemu: recorded 60,000")
    assert p.stderr.count(b"\n") == 1


@needs_valgrind
def test_study_on_a_real_recording_in_every_mode(tmp_path, capsys, monkeypatch):
    """The three features together, as a user runs them: `ptemu trace record`
    of a real program, then `ptemu study` over it in all five modes from a
    config file in another directory that names the trace relative to itself
    (as it names its cost model), with --json and --csv. The guest sees the
    same program in every mode: the same accesses and guest #PFs; the JSON
    rows carry the fields of shared/API.md's Study section."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    assert main(["trace", "record", "-o", str(sweep / "true.ptrace"), "--max", "40000",
                 "--", "/bin/true"]) == 0
    (sweep / "s.toml").write_text(
        '[study]\nworkloads = ["trace:true.ptrace"]\naccesses = 30000\n'
        'modes = ["native", "shadow", "unsync", "paravirt", "nested"]\n')
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    rc = main(["study", "sweep/s.toml", "--jobs", "1", "--quiet", "--json", "r.json",
               "--csv", "r.csv"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == "", err
    assert len(out.splitlines()) == 6 and "true.ptrace" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert set(doc) == {"ptemu_version", "config", "cost_model", "rows"}
    rows = doc["rows"]
    assert [r["mode"] for r in rows] == ["native", "shadow", "unsync", "paravirt", "nested"]
    api = ("workload mode accesses exits exits_by_reason guest_page_faults tlb_lookups "
           "tlb_misses tlb_miss_rate walks walk_refs refs_per_walk refs_per_access "
           "shadow_pages_peak modelled_cycles modelled_cycles_by_component "
           "modelled_cycles_per_access overhead_vs_native wall_s").split()
    for r in rows:
        assert all(k in r for k in api), [k for k in api if k not in r]
        assert sum(r["exits_by_reason"].values()) == r["exits"]
        assert set(r["modelled_cycles_by_component"]) == {"tlb", "walks", "exits",
                                                          "guest_faults", "hypercalls"}
    assert {r["accesses"] for r in rows} == {30000}
    assert len({r["guest_page_faults"] for r in rows}) == 1 and rows[0]["guest_page_faults"] > 0
    assert rows[0]["exits"] == rows[4]["exits"] == 0 < rows[1]["exits"]
    assert rows[0]["overhead_vs_native"] == 1.0
    csv_head = (tmp_path / "r.csv").read_text().splitlines()[0].split(",")
    assert csv_head[:3] == ["workload", "mode", "accesses"] and "exits_page_fault" in csv_head
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 6


# ---------------------------------------------------------------------------
# Replay through the guest kernel
# ---------------------------------------------------------------------------
def test_layout_from_pages():
    pages = np.array([0x400, 0x401, 0x403, 0x500, 0x501, 0x600, 0x7fffffffe,
                      (0xffff800000000000 >> 12)], np.uint64)
    flags = np.array([4, 5, 4, 1, 2, 6, 3, 1], np.uint8)
    assert layout_from_pages(pages, flags, merge_gap=1) == (
        (0x400000, 4 * PAGE, "rx"), (0x500000, 2 * PAGE, "rw"), (0x600000, PAGE, "rwx"),
        (0x7fffffffe000, PAGE, "rw"))


def test_replay_demand_paging_rights_and_faults(tmp_path):
    """One hand-built trace, its faults and entries derived from SDM 4.6-4.8:
    code pages present, user, read-only, executable; data pages NX; the
    first touch of each page a not-present #PF; a write after a read a
    protection #PF (COW break of the zero page); non-canonical (#GP) and
    kernel-half addresses reported as guest faults."""
    code, data, fresh = 0x400000, 0x10000000, 0x20000000
    t = recs(("x", code), ("x", code + 4), ("r", data), ("r", data + 8), ("w", data + 16),
             ("w", fresh), ("r", fresh + 8), ("r", 0x0001000000000000),
             ("r", 0xffff888000000000), ("x", code + 8))
    p = write_trace(tmp_path / "h.ptrace", t)
    w = TraceWorkload(p)
    assert w.layouts[0] == ((code, PAGE, "rx"), (data, PAGE, "rw"), (fresh, PAGE, "rw"))
    k = Kernel(NativeMachine(8 << 20), record_faults=True)
    res = w.run(k)
    pid = w.pids[0]
    assert res.accesses == 10
    # fetch, read, write-after-read: not-present U|I, U, then P|W|U; fresh write W|U
    assert k.fault_log == [(pid, code, 0x14), (pid, data, 0x4), (pid, data + 16, 0x7),
                           (pid, fresh, 0x6), (pid, 0xffff888000000000, 0x5)]
    assert res.demand_faults == 3 and res.protection_faults == 1 and res.faults == 4
    assert res.guest_faults == {"noncanonical": 1, "kernel_half": 1, "unmapped": 0}
    assert k.stats["segv"] == 2 and k.stats["user_accesses"] == 8
    e = k.pte(pid, code)
    assert e & (PTE_P | PTE_U | PTE_A) == PTE_P | PTE_U | PTE_A and not e & (PTE_W | PTE_NX)
    for va in (data, fresh):
        e = k.pte(pid, va)
        assert e & (PTE_P | PTE_W | PTE_U | PTE_NX | PTE_A | PTE_D) == \
            PTE_P | PTE_W | PTE_U | PTE_NX | PTE_A | PTE_D


def test_replay_several_processes_round_robin(tmp_path):
    a = write_trace(tmp_path / "a.npy", recs(*[("r", 0x10000000 + 64 * i) for i in range(250)]))
    b = write_trace(tmp_path / "b.ptrace", recs(*[("w", 0x10000000 + 64 * i)
                                                  for i in range(100)]))
    w = TraceWorkload([a, b], slice=40, exit_at_end=True)
    k = Kernel(NativeMachine(8 << 20))
    res = w.run(k)
    assert res.accesses == 350 and res.processes == 2
    # Switches: idle>a, then a>b, b>a, a>b, b>a, a>b (b's third slice: 20
    # records, its end), b's exit (to its parent, idle), idle>a; a then runs
    # alone (no switch) and exits: 9.
    assert k.stats["context_switch"] == 9
    assert k.stats["exit"] == 2 and list(k.procs) == [0]
    assert TraceWorkload(a, total=100).run(Kernel(NativeMachine(8 << 20))).accesses == 100


def _replay(mode, paths, paravirt=None, **kw):
    m = make_machine(mode, mem=16 << 20)
    k = Kernel(m, record_faults=True, paravirt=paravirt)
    w = TraceWorkload(paths, **kw)
    res = w.run(k)
    res = {key: v for key, v in res.items() if key not in ("seconds", "machine")}
    # A paravirtual kernel sends the same pte writes in mmu_update batches:
    # the one counter only it keeps.
    assert (res["kernel"].pop("mmu_update_batches", 0) > 0) == (k.paravirt)
    touched = [(pid, int(va)) for pid, s in zip(w.pids, w.summaries)
               for va in s.pages[s.pages < (USER_TOP >> 12)] << np.uint64(12)]
    leaves = [k.pte(pid, va) for pid, va in touched]          # A/D bits included
    loads = [k.load(pid, va) for pid, va in touched[::7]]
    tables = k.snapshot_tables()
    memory = hashlib.sha256(k.phys.read(0, m.memory_bytes)).hexdigest()
    return {"result": res, "fault_log": list(k.fault_log), "leaves": leaves, "loads": loads,
            "tables": tables, "memory": memory}


@needs_valgrind
def test_real_recording_identical_in_every_mode(recordings):
    """ls and python3 as two processes switching every 3000 accesses give
    the same guest-visible results on all five machines: the kernel's
    counters and the workload's, the fault sequence (error code and CR2,
    SDM 4.7), every touched page's leaf entry with its A/D bits (SDM 4.8)
    and the values loaded.  Every page-table frame and all of guest memory
    equal those of the native machine running the same kernel (the
    paravirtual kernel updates its tables by hypercall, not through its
    direct map, so its own kernel-half entries collect fewer A bits)."""
    pytest.importorskip("ptemu.hypervisor")
    paths = [recordings["ls"].path, recordings["py"].path]
    ref = _replay("native", paths, slice=3000)
    ref_pv = _replay("native", paths, paravirt=True, slice=3000)
    r = ref["result"]
    assert r["accesses"] == 80_000 and r["faults"] > 20 and r["protection_faults"] > 0
    assert r["kernel"]["context_switch"] > 20
    assert any(e & PTE_D for e in ref["leaves"]) and all(e & PTE_A for e in ref["leaves"])
    for mode in MODES:
        got = _replay(mode, paths, slice=3000)
        for key in ("result", "fault_log", "leaves", "loads"):
            assert got[key] == ref[key], (mode, key)
        same = ref_pv if mode == "paravirt" else ref
        assert got["tables"] == same["tables"], mode
        assert got["memory"] == same["memory"], mode


def test_trace_workload_takes_just_a_path_in_any_format(tmp_path):
    t = recs(("x", 0x400000), ("w", 0x600000), ("r", 0x600008))
    for fmt, path in _all_formats(tmp_path, t).items():
        w = workloads.TraceWorkload(path)
        res = w.run(Kernel(NativeMachine(8 << 20)))
        assert res.accesses == 3 and res.faults == 2, fmt
    with pytest.raises(InvalidInput):
        TraceWorkload(tmp_path / "none.ptrace")
    with pytest.raises(InvalidInput):
        TraceWorkload([])
