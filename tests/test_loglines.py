"""Log lines on the wire: escaping, cutting, the lastlog cap, follow buffers (pure tables)."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gcmd.logs.lines import (
    FOLLOW_BUFFER,
    MAX_LINE,
    MAX_REPLY,
    Batch,
    FollowBuffer,
    LineSplitter,
    Recent,
    lastlog_lines,
    wire_line,
)


@pytest.mark.parametrize("raw, wire", [
    (b"plain ascii line", b"plain ascii line"),
    (b"", b""),
    (b"tab\there back\\slash", b"tab\there back\\slash"),
    (b"progress 10%\rprogress 100%", rb"progress 10%\x0dprogress 100%"),
    (b"\x1b[31mred\x1b[0m and \x07bell", rb"\x1b[31mred\x1b[0m and \x07bell"),
    (b"nul\x00 del\x7f", rb"nul\x00 del\x7f"),
    (b"vt\x0b ff\x0c", rb"vt\x0b ff\x0c"),
    ("café ok".encode(), "café ok".encode()),
    (b"\xff\xfe not utf-8", rb"\xff\xfe not utf-8"),
    (b"\xc2\x9b c1 csi, \xc2\x85 nel, \xc2\xa0 nbsp", "\\x9b c1 csi, \\x85 nel, \xa0 nbsp".encode()),
    (b"\xed\xa0\x80 an encoded surrogate", rb"\xed\xa0\x80 an encoded surrogate"),
    (b"caf\xc3", rb"caf\xc3"),
    (b"not == at the start", b"not == at the start"),
    (b"=", b"="),
    (b"= not two", b"= not two"),
    (b"Begin lastlog ", b"Begin lastlog "),
    (b"Begin lastlog\r", rb"Begin lastlog\x0d"),
    (b"End follow.", b"End follow."),
    (b"Begin follow", b"Begin follow"),
    (b"Begin logs", b"Begin logs"),
])
def test_wire_line_escapes_controls_and_non_utf8_only(raw, wire):
    assert wire_line(raw) == wire


@pytest.mark.parametrize("raw", [
    b"==", b"== forged server line", b"===", b"==\x1b", b"Begin lastlog", b"End lastlog", b"End follow",
    b"==" + b"x" * 100_000,
])
def test_wire_line_drops_server_and_forged_lines(raw):
    assert wire_line(raw) is None


@pytest.mark.parametrize("raw, cut, wire", [
    (b"y" * 100_000, 0, b"y" * 65536 + b" [+34464 bytes]"),
    (b"y" * 65536, 0, b"y" * 65536),
    (b"y" * 65537, 0, b"y" * 65536 + b" [+1 bytes]"),
    (b"y" * 65536, 10, b"y" * 65536 + b" [+10 bytes]"),
    # a character split by the cut is escaped like any byte that is not UTF-8
    (b"a" * 65535 + "é".encode() + b"zz", 0, b"a" * 65535 + rb"\xc3 [+3 bytes]"),
    (b"\x1b" * 70_000, 0, rb"\x1b" * 65536 + b" [+4464 bytes]"),
])
def test_wire_line_cuts_long_lines(raw, cut, wire):
    assert wire_line(raw, cut) == wire


@pytest.mark.parametrize("lines, count, block", [
    ([b"a", b"b", b"c"], 2, [b"b", b"c"]),
    ([b"a", b"b", b"c"], 10, [b"a", b"b", b"c"]),
    ([b"a", None, b"c"], 2, [b"c"]),  # a dropped line counts among the N, as with tail | grep -v
    ([None, None], 2, []),
    ([], 5, []),
    ([b"a"], 0, []),
])
def test_lastlog_lines_table(lines, count, block):
    assert lastlog_lines(lines, count) == block


def test_lastlog_lines_leaves_out_the_oldest_beyond_8_mib():
    lines = [b"%04d " % i + b"x" * 8995 for i in range(1000)]  # 9,000-byte lines, 9,001 as sent
    block = lastlog_lines(lines, 1000)
    assert block[0].startswith(b"== ") and block[0].endswith(b" older lines left out ==")
    left_out = int(block[0].split()[1])
    assert block[1:] == lines[left_out:]
    assert sum(len(line) + 1 for line in block) <= MAX_REPLY
    assert left_out == 1000 - (MAX_REPLY - len(block[0]) - 1) // 9001 == 69
    assert lastlog_lines(lines, 900) == lines[100:]  # 8.1 MB fit: no marker


def test_lastlog_lines_makes_room_for_its_marker():
    lines = [b"%d" % i * 9 for i in range(1, 6)]  # 10 bytes each as sent
    assert lastlog_lines(lines, 5, limit=50) == lines
    # 4 lines fit in 49; the marker (29 bytes as sent) then needs two more left out
    assert lastlog_lines(lines, 5, limit=49) == [b"== 3 older lines left out ==", b"4" * 9, b"5" * 9]
    assert lastlog_lines(lines, 5, limit=29) == [b"== 5 older lines left out =="]


@pytest.mark.parametrize("chunks, lines", [
    ([b"a\nb\n"], [b"a", b"b"]),
    ([b"a", b"b\n", b"c"], [b"ab"]),
    ([b"a\n", b"\n", b"\n"], [b"a", b"", b""]),
    ([b"x\r\n"], [rb"x\x0d"]),
    ([b"== no\nyes\nEnd follow\n"], [None, b"yes", None]),
    ([b"\xc3", b"\xa9\n"], ["é".encode()]),  # a character split between reads is whole again
    ([b"y" * 40_000, b"y" * 40_000, b"y" * 20_000 + b"\nnext\n"], [b"y" * 65536 + b" [+34464 bytes]", b"next"]),
    ([b"y" * 70_000, b"y" * 5, b"\n"], [b"y" * 65536 + b" [+4469 bytes]"]),
    ([b"y" * 65536, b"\n"], [b"y" * 65536]),
])
def test_line_splitter_cuts_on_newline_only(chunks, lines):
    splitter = LineSplitter()
    got = []
    for chunk in chunks:
        got += splitter.feed(chunk)
    assert got == lines


def test_line_splitter_keeps_64_kib_of_a_line_that_never_ends():
    splitter = LineSplitter()
    for _ in range(1000):
        assert splitter.feed(b"z" * 10_000) == []
    assert len(splitter._head) == MAX_LINE
    assert splitter.feed(b"\n") == [b"z" * 65536 + b" [+%d bytes]" % (10_000_000 - 65536)]


lines_strategy = st.lists(st.one_of(st.none(), st.binary(max_size=12)), max_size=60)


@given(lines=lines_strategy, count=st.integers(1, 25), keep=st.integers(1, 20), limit=st.integers(30, 120))
@example(lines=[b"\0" * 8, b"\0" * 9, b"\0" * 10, b""], count=4, keep=4, limit=30)  # lines pushed out, then the marker's room
@settings(max_examples=500)
def test_recent_answers_as_the_whole_log_would(lines, count, keep, limit):
    recent = Recent(lines=keep, limit=limit)
    recent.extend(lines)
    if count <= keep:
        assert recent.last(count) == lastlog_lines(lines, count, limit)


def test_recent_keeps_1000_lines():
    recent = Recent()
    recent.extend(b"line %d" % i for i in range(1500))
    assert len(recent) == 1000
    assert recent.last(3) == [b"line 1497", b"line 1498", b"line 1499"]


# --- follow buffers -------------------------------------------------------------

def drain(buffer: FollowBuffer) -> list[bytes]:
    out = b""
    while buffer:
        out += buffer.take()
    return out.split(b"\n")[:-1]


@pytest.mark.parametrize("pushes, limit, sent, drops", [
    ([[b"a", b"b"]], 100, [b"a", b"b"], [0]),
    # 6 lines of 10 bytes as sent fill 60; the seventh drops the oldest, and
    # the marker (22 bytes as sent) needs three more dropped
    ([[b"%d" % i * 9 for i in range(1, 7)], [b"7" * 9]], 60,
     [b"== 4 lines dropped ==", b"5" * 9, b"6" * 9, b"7" * 9], [0, 4]),
    # drops before the marker is taken add up in one marker
    ([[b"%d" % i * 9 for i in range(1, 7)], [b"7" * 9], [b"8" * 9, b"9" * 9]], 60,
     [b"== 6 lines dropped ==", b"7" * 9, b"8" * 9, b"9" * 9], [0, 4, 2]),
    ([[b"x" * 60]], 40, [b"== 1 lines dropped =="], [1]),  # too big even alone
])
def test_follow_buffer_drops_the_oldest_behind_one_marker(pushes, limit, sent, drops):
    buffer = FollowBuffer(limit)
    assert [buffer.push(lines) for lines in pushes] == drops
    assert buffer.pending <= limit
    assert drain(buffer) == sent


def test_follow_buffer_marker_taken_then_new_drops_make_a_new_marker():
    buffer = FollowBuffer(60)
    buffer.push([b"%d" % i * 9 for i in range(1, 8)])
    assert buffer.take(25) == b"== 4 lines dropped ==\n"  # the marker counts in take's limit
    assert buffer.push([b"a" * 9, b"b" * 9, b"c" * 9]) == 0
    assert buffer.push([b"d" * 9]) == 4
    assert drain(buffer) == [b"== 4 lines dropped ==", b"b" * 9, b"c" * 9, b"d" * 9]


def test_follow_buffer_take_gives_whole_lines_up_to_its_limit():
    buffer = FollowBuffer()
    buffer.push([b"a" * 99] * 10)
    assert buffer.take(250) == (b"a" * 99 + b"\n") * 2
    assert buffer.take(10) == b"a" * 99 + b"\n"  # at least one line
    assert buffer.pending == 700
    assert FollowBuffer().take() == b"" and not FollowBuffer()


def test_follow_buffer_keeps_a_shared_batch_unchanged():
    lines = [b"a" * 9, b"b" * 9, b"c" * 9, b"d" * 9]
    batch = Batch(lines)
    assert batch.sent == 40
    first, second = FollowBuffer(32), FollowBuffer()
    assert first.push(batch) == 3 and second.push(batch) == 0
    assert first.take() == b"== 3 lines dropped ==\n" + b"d" * 9 + b"\n"
    assert second.take(15) == b"a" * 9 + b"\n" and second.take() == b"".join(l + b"\n" for l in lines[1:])
    assert batch == lines


def test_follow_buffer_default_limit_is_one_mib():
    buffer = FollowBuffer()
    line = b"x" * 1023
    assert buffer.push([line] * 1024) == 0 and buffer.pending == FOLLOW_BUFFER
    assert buffer.push([line]) == 2  # the line and its marker need two lines' room
    assert buffer.pending <= FOLLOW_BUFFER


@given(batches=st.lists(st.lists(st.integers(0, 30), max_size=8), max_size=30),
       takes=st.lists(st.integers(1, 80), max_size=30), limit=st.integers(40, 200), shared=st.booleans())
def test_follow_buffer_loses_nothing_uncounted_and_keeps_order(batches, takes, limit, shared):
    buffer = FollowBuffer(limit)
    pushed, sent, dropped = 0, [], 0
    for i, batch in enumerate(batches):
        lines = [b"%d" % (pushed + j) + b"." * size for j, size in enumerate(batch)]
        if shared:
            lines = Batch(lines)
        pushed += len(lines)
        dropped += buffer.push(lines)
        assert buffer.pending <= limit
        if i < len(takes):
            sent += buffer.take(takes[i]).split(b"\n")[:-1]
    sent += drain(buffer)
    markers = [int(line.split()[1]) for line in sent if line.startswith(b"== ")]
    numbers = [int(line.split(b".")[0]) for line in sent if not line.startswith(b"== ")]
    assert sum(markers) == dropped
    assert numbers == sorted(numbers)
    assert len(numbers) + dropped == pushed
