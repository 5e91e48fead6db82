"""Log queries (PROTOCOL.md, "Log queries (1.2)"), ``version`` and ``format``.

Black-box through a real server (in-process on port 0, or a ``python -m
gcmd`` process) where a connection matters; the commands over real files
without a socket where the per-connection format is needed (the session of
gcmd.net before its rewrite keeps no settings: see test_format_is_per_connection);
tables for the pure functions (grammar, cursors, JSON lines).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import gevent
import pytest
from gevent.threadpool import ThreadPool
from support import ERROR, LOG_LINES, CommandTable, poll

from gcmd import __version__
from gcmd.config import Config
from gcmd.logs.cursors import (
    FileCursor,
    JournalCursor,
    MemoryCursor,
    file_cursor,
    journal_cursor,
    line_hash,
    memory_cursor,
    parse_cursor,
)
from gcmd.logs.feed import Feed
from gcmd.logs.lines import MAX_LINE, MAX_REPLY, FollowBuffer
from gcmd.logs.memory import MemoryLog
from gcmd.logs.queries import (
    JSON,
    TEXT,
    Pattern,
    Query,
    Shape,
    Usage,
    json_line,
    matching_lines,
    parse_query,
)
from gcmd.logs.readers import FileLog
from gcmd.net.wire import CommandError

pytestmark = pytest.mark.timeout(30)

LASTLOG_USAGE = b"Usage: lastlog [LINES] [LOGS] [grep PATTERN]\n"
FOLLOW_USAGE = b"Usage: follow [LINES] [LOGS] [from CURSORS] [grep PATTERN]\n"
BEGIN_FOLLOW, END_FOLLOW = b"Begin follow\n", b"End follow\n"
FORMAT_USAGE = b"Usage: format text|json\n"
BEGIN, END = b"Begin lastlog\n", b"End lastlog\n"


def lines_of(reply: bytes) -> list[bytes]:
    """The lines of a lastlog block, without Begin/End and newlines."""
    assert reply.startswith(BEGIN) and reply.endswith(END), reply[:200]
    return reply[len(BEGIN):-len(END)].splitlines()


def ask_block(client, request: str) -> list[bytes]:
    client.send(request + "\n")
    return lines_of(b"".join(client.block(END)))


@pytest.fixture
def logs(tmp_path):
    """Three log files: syslog (LOG_LINES), auth, app."""
    syslog = tmp_path / "syslog"
    syslog.write_text("\n".join(LOG_LINES) + "\n")
    auth = tmp_path / "auth.log"
    auth.write_text("".join(f"Nov 25 10:00:{i:02d} lab sshd[{i}]: {'Accepted' if i % 3 else 'Failed'} key\n"
                            for i in range(20)))
    app = tmp_path / "app.log"
    app.write_text("p1\np2\np3\n")
    return syslog, auth, app


@pytest.fixture
def several(make_server, connect, logs):
    """A client of a server of the three logs of ``logs``."""
    return connect(make_server(logfiles=tuple(map(str, logs))))


@pytest.fixture
def table(logs, tmp_path):
    """The commands over the three logs of ``logs``, without a socket (a PlainSession)."""
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    made = CommandTable(Config(host="127.0.0.1", port=0, root=str(root), logfiles=tuple(map(str, logs))))
    yield made
    made.close()


# --- version and format ----------------------------------------------------------------

def test_version_answers_the_version_and_protocol_1_2_without_authentication(gcmd, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    client = gcmd("--token-file", token).client()
    assert client.ask("version") == f"gcmd {__version__} protocol 1.2\n".encode()
    assert client.ask("ping") == b"Authentication required.\n"


@pytest.mark.parametrize(("request_line", "reply"), [
    ("format text", b"OK\n"),
    ("format json", b"OK\n"),
    ("format", FORMAT_USAGE),
    ("format xml", FORMAT_USAGE),
    ("format JSON", FORMAT_USAGE),
    ("format json text", FORMAT_USAGE),
])
def test_format_text_or_json_answers_ok_anything_else_usage(commands, request_line, reply):
    assert commands.ask(request_line) == reply


def test_format_is_per_connection(several, make_server, connect, logs):
    other = connect(make_server(logfiles=tuple(map(str, logs))))
    assert several.ask("format json") == b"OK\n"
    assert json.loads(ask_block(several, "lastlog 1")[0])["line"] == LOG_LINES[-1]
    assert ask_block(other, "lastlog 1") == [LOG_LINES[-1].encode()]


# --- the grammar -------------------------------------------------------------------------

@pytest.mark.parametrize(("arg", "query"), [
    (b"", Query()),
    (b"5", Query(5)),
    (b"+7", Query(7)),
    (b"auth", Query(None, (b"auth",))),
    (b"5 auth,syslog", Query(5, (b"auth", b"syslog"))),
    (b"grep a b  c", Query(pattern=b"a b  c")),
    (b"3 auth grep sshd.*Accepted", Query(3, (b"auth",), pattern=b"sshd.*Accepted")),
    (b"grep grep", Query(pattern=b"grep")),
    (b"grep\t x", Query(pattern=b"x")),
    (b"1000", Query(1000)),
])
def test_lastlog_grammar(arg, query):
    assert parse_query(arg) == query


@pytest.mark.parametrize("arg", [
    b"0", b"1001", b"-5", b"+2000", b"00000000000000000000000000000000005000",
    b"1 syslog x", b"abc 5", b"grep", b"5 grep", b"a,,b", b"a,", b",a", b"a,a", b"a,b,a",
    b",".join(b"l%d" % i for i in range(17)), b"from", b"5 a from c1", b"a b",
])
def test_lastlog_grammar_refuses(arg):
    with pytest.raises(Usage):
        parse_query(arg)


@pytest.mark.parametrize(("arg", "query"), [
    (b"", Query()),
    (b"0", Query(0)),
    (b"20 auth,syslog from f1.1.2.3.0000abcd grep x", Query(20, (b"auth", b"syslog"), (b"f1.1.2.3.0000abcd",),
                                                          b"x")),
    (b"from c1,c2", Query(cursors=(b"c1", b"c2"))),
])
def test_follow_grammar(arg, query):
    assert parse_query(arg, follow=True) == query


@pytest.mark.parametrize("arg", [b"-1", b"1001", b"from", b"from grep x", b"a from c1,c1", b"grep", b"a from c b"])
def test_follow_grammar_refuses(arg):
    with pytest.raises(Usage):
        parse_query(arg, follow=True)


@pytest.mark.parametrize("bad", ["lastlog 0", "lastlog 1001", "lastlog -5", "lastlog 1 syslog x", "lastlog grep",
                                 "lastlog 2 syslog,syslog", "lastlog 2 auth,app,auth",
                                 "lastlog " + ",".join(f"l{i}" for i in range(17))])
def test_a_name_given_twice_more_than_16_logs_or_another_shape_get_the_usage_line(several, bad):
    assert several.ask(bad) == LASTLOG_USAGE


def test_an_unknown_name_in_logs_gets_the_unknown_log_error(several):
    reply = several.ask("lastlog 2 auth,nosuch")
    assert reply.startswith(ERROR) and b"unknown log 'nosuch' (choose from syslog, auth, app, gcmd)" in reply


@pytest.mark.parametrize("name", ["grep", "from"])
def test_grep_and_from_are_reserved_as_log_names(tmp_path, name):
    log = tmp_path / f"{name}.log"
    log.write_text("x\n")
    for arg in (f"--logfile={log}", f"--logfile={name}={log}"):
        proc = subprocess.run([sys.executable, "-m", "gcmd", "--port", "0", "--root", str(tmp_path), arg],
                              check=False, capture_output=True, text=True, timeout=20,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, (proc.returncode, proc.stderr)
        assert f"--logfile: the log name '{name}' is reserved" in proc.stderr


def test_pattern_is_the_rest_of_the_line_spaces_inside_kept_around_stripped(several, logs):
    with open(logs[2], "a") as f:
        f.write("two  spaces here\ntwo spaces here\n")
    assert ask_block(several, "lastlog 5 app grep   two  spaces \t") == [b"two  spaces here"]


# --- several logs ------------------------------------------------------------------------

def test_lastlog_n_a_b_gives_the_last_n_of_each_log_under_its_header_in_the_order_of_logs(several):
    assert ask_block(several, "lastlog 2 app,syslog") == [
        b"==> app <==", b"p2", b"p3", b"==> syslog <==", *(line.encode() for line in LOG_LINES[-2:])]


def test_logs_omitted_is_the_default_log_and_one_log_has_no_header(several):
    assert ask_block(several, "lastlog 2") == [line.encode() for line in LOG_LINES[-2:]]
    assert ask_block(several, "lastlog 2 app") == [b"p2", b"p3"]
    assert ask_block(several, "lastlog 1 app grep p") == [b"p3"]


def test_several_logs_share_the_8_mib_of_a_reply(make_server, connect, tmp_path):
    big = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.log"
        path.write_bytes((b"x" * 60000 + b"\n") * 200)  # 12 MB each
        big.append(f"{name}={path}")
    client = connect(make_server(logfiles=tuple(big)))
    client.send("lastlog 1000 a,b\n")
    reply = b"".join(client.block(END))
    assert len(reply) <= MAX_REPLY + len(BEGIN) + len(END)
    lines = lines_of(reply)
    assert lines[0] == b"==> a <==" and lines[1].startswith(b"== ") and lines[1].endswith(b"older lines left out ==")
    assert b"==> b <==" in lines


# --- grep --------------------------------------------------------------------------------

@pytest.mark.parametrize(("pattern", "matched"), [
    ("accepted", 13),   # no upper-case letter: case-insensitive, as journalctl
    ("Accepted", 13),
    ("ACCEPTED", 0),    # an upper-case letter: case-sensitive
    ("Failed key$", 7),  # $ anchors at the line's end
    ("^Nov 25 10:00:1", 10),
    (r"sshd\[1[0-9]\]", 10),
    ("(a+)+$", 0),
])
def test_only_lines_that_match_are_sent_re2_syntax_smart_case(several, pattern, matched):
    lines = ask_block(several, f"lastlog 1000 auth grep {pattern}")
    assert len(lines) == matched, lines


def test_lastlog_n_grep_gives_the_last_n_lines_that_match(several):
    assert ask_block(several, "lastlog 2 auth grep failed") == [
        b"Nov 25 10:00:15 lab sshd[15]: Failed key", b"Nov 25 10:00:18 lab sshd[18]: Failed key"]


def test_grep_matches_the_line_as_written_before_escaping(several, logs):
    with open(logs[2], "ab") as f:
        f.write(b"esc \x1b[31m red\nbackslash \\x1b plain\n")
    assert ask_block(several, r"lastlog 5 app grep \x1b\[31m") == [b"esc \\x1b[31m red"]
    assert ask_block(several, r"lastlog 5 app grep \\x1b") == [b"backslash \\x1b plain"]


@pytest.mark.parametrize(("pattern", "why"), [
    ("(", b"bad pattern: missing ): ("),
    ("a{2,1}", b"bad pattern: invalid repetition size: {2,1}"),
    ("(?<=x)y", b"bad pattern: invalid perl operator: (?<="),
    ("x" * 1025, b"bad pattern: longer than 1024 bytes"),
])
def test_a_pattern_not_valid_re2_or_longer_than_1024_bytes_gets_bad_pattern(several, pattern, why):
    assert several.ask(f"lastlog auth grep {pattern}") == ERROR + why + b"\n"
    assert several.ask("ping") == b"pong\n"


def test_a_catastrophic_pattern_answers_at_once_while_ping_stays_fast(gcmd, tmp_path):
    log = tmp_path / "aaa.log"
    log.write_bytes(b"start\n" + b"a" * 100_000 + b"!\n" + (b"a" * 100_000 + b"\n") * 20)
    server = gcmd(logfile=log)
    greedy, other = server.client(), server.client()
    started = time.monotonic()
    greedy.send("lastlog 1000 grep (a+)+$\n")
    pings = []
    for _ in range(20):
        sent = time.monotonic()
        assert other.ask("ping") == b"pong\n"
        pings.append(time.monotonic() - sent)
    lines = lines_of(b"".join(greedy.block(END)))
    assert time.monotonic() - started < 2.0
    assert len(lines) == 20 and all(line == b"a" * MAX_LINE + b" [+34464 bytes]" for line in lines)
    assert max(pings) < 0.5, pings


def test_grep_looks_back_through_the_last_64_mib_and_says_so(make_server, connect, tmp_path):
    log = tmp_path / "big.log"
    filler = b"a filler line that does not match, about a hundred bytes long, padded out with words..\n"
    with open(log, "wb") as f:
        f.write(b"needle old\n")
        f.write(filler * ((64 << 20) // len(filler) + 1))
        f.write(b"needle new\n")
    client = connect(make_server(logfiles=(str(log),)))
    assert ask_block(client, "lastlog 5 grep needle") == [b"== searched the last 64 MiB only ==", b"needle new"]
    assert ask_block(client, "lastlog 1 grep needle") == [b"needle new"]  # found N: no note


def test_grep_searches_the_gcmd_log_it_keeps(gcmd):
    client = gcmd().client()
    everything = ask_block(client, "lastlog 1000 gcmd")
    lines = ask_block(client, "lastlog 1000 gcmd grep LISTENING|listening on")
    # the request itself is logged before it runs, and matches
    assert lines[:-1] == [line for line in everything if b"listening on" in line] and lines[:-1]
    assert lines[-1].endswith(b": lastlog 1000 gcmd grep LISTENING|listening on")


@pytest.mark.parametrize(("run", "pattern", "found"), [
    (b"ab\ncd\nab", b"ab", [(0, 2), (6, 8)]),
    (b"a\nb", br"a\sb", []),          # a match across lines is not a line's
    (b"xa\nb\nab", br"a\s*b", [(5, 7)]),
    (b"one\ntwo", b"^two$", [(4, 7)]),
    (b"one\ntwo", rb"\Atwo", [(4, 7)]),       # \A: each line on its own
    (b"", b"x", []),
    (b"x\n\nx", b"^$", [(2, 2)]),
])
def test_matching_lines_table(run, pattern, found):
    assert matching_lines(run, Pattern(pattern)) == found


# --- JSON lines --------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "cut", "line"), [
    (b"plain", 0, '{"log":"a","cursor":"C","line":"plain"}'),
    (b"\x1b[31m\xc3\xa9\x7f\xc2\x9b", 0, '{"log":"a","cursor":"C","line":"\\u001b[31m\\u00e9\\u007f\\u009b"}'),
    (b"\xff\xfe", 0, '{"log":"a","cursor":"C","line":[255,254]}'),
    (b"== x", 0, '{"log":"a","cursor":"C","line":"== x"}'),
    (b"x" * (MAX_LINE + 5), 0, '{"log":"a","cursor":"C","line":"%s","cut":5}' % ("x" * MAX_LINE)),
    (b"x" * (MAX_LINE - 1) + b"\xc3", 7, '{"log":"a","cursor":"C","line":"%s","cut":8}' % ("x" * (MAX_LINE - 1))),
])
def test_json_line_table(raw, cut, line):
    assert json_line("a", "C", raw, cut) == line.encode()


def test_format_json_lines_are_json_objects_the_begin_and_end_lines_and_errors_stay(table):
    assert table.ask("format json") == b"OK\n"
    lines = lines_of(table.ask("lastlog 3"))
    objects = [json.loads(line) for line in lines]
    assert [o["line"] for o in objects] == LOG_LINES[-3:]
    assert all(o["log"] == "syslog" and set(o) == {"log", "cursor", "line"} for o in objects)
    assert table.ask("lastlog 2 nosuch").startswith(ERROR)
    assert table.ask("lastlog 0") == LASTLOG_USAGE


def test_json_line_is_the_line_as_written_and_not_utf_8_comes_back_byte_for_byte(table, logs):
    written = [b"esc \x1b[31m and \\x1b", b"\xff\xfe not utf-8 \xc3(", b"== starts like a note", b"End lastlog",
               b"Begin lastlog", b"End follow", "é ü 漢字".encode()]
    with open(logs[2], "ab") as f:
        f.write(b"\n".join(written) + b"\n")
    table.ask("format json")
    got = []
    for line in lines_of(table.ask(f"lastlog {len(written)} app")):
        assert line.isascii()  # nothing reaches a terminal raw
        value = json.loads(line)["line"]
        got.append(bytes(value) if isinstance(value, list) else value.encode())
    assert got == written


def test_json_line_over_65536_bytes_is_cut_with_cut(table, logs):
    with open(logs[2], "ab") as f:
        f.write(b"y" * 70000 + b"\n")
    table.ask("format json")
    line = json.loads(lines_of(table.ask("lastlog 1 app"))[0])
    assert line["line"] == "y" * MAX_LINE and line["cut"] == 70000 - MAX_LINE


def test_json_cursor_is_ascii_without_spaces_or_commas_at_most_256_bytes(table):
    table.ask("format json")
    for request in ("lastlog 1000", "lastlog 5 auth grep failed", "lastlog 10 gcmd"):
        for line in lines_of(table.ask(request)):
            cursor = json.loads(line)["cursor"]
            assert cursor.isascii() and " " not in cursor and "," not in cursor and len(cursor) <= 256
            parse_cursor(cursor.encode())


def test_json_several_logs_have_no_header_each_line_names_its_log(table):
    table.ask("format json")
    objects = [json.loads(line) for line in lines_of(table.ask("lastlog 2 app,syslog"))]
    assert [(o["log"], o["line"]) for o in objects] == [("app", "p2"), ("app", "p3"),
                                                       ("syslog", LOG_LINES[-2]), ("syslog", LOG_LINES[-1])]


def test_json_the_8_mib_cap_counts_json_lines_left_out_note(table, logs):
    with open(logs[2], "ab") as f:
        f.write((b"\x01" * 60000 + b"\n") * 100)  # 60 kB a line, 360 kB as JSON
    table.ask("format json")
    reply = table.ask("lastlog 1000 app")
    lines = lines_of(reply)
    assert len(reply) <= MAX_REPLY + len(BEGIN) + len(END)
    note = json.loads(lines[0])
    kept = len(lines) - 1
    assert note == {"note": "left_out", "lines": 103 - kept} and kept > 0


def test_json_searched_note(tmp_path):
    log = tmp_path / "big.log"
    with open(log, "wb") as f:
        f.write(b"needle old\n")
        f.write((b"-" * 99 + b"\n") * ((64 << 20) // 100 + 1))
        f.write(b"needle new\n")
    made = CommandTable(Config(host="127.0.0.1", port=0, root=str(tmp_path), logfiles=(f"big={log}",)))
    try:
        made.ask("format json")
        lines = [json.loads(line) for line in lines_of(made.ask("lastlog 3 grep needle"))]
    finally:
        made.close()
    assert lines[0] == {"note": "searched", "bytes": 64 << 20, "log": "big"}
    assert [o["line"] for o in lines[1:]] == ["needle new"]


# --- cursors -----------------------------------------------------------------------------

JOURNALD = "s=" + "a" * 32 + ";i=1a;b=" + "b" * 32 + ";m=3f;t=5e;x=77"


@pytest.mark.parametrize(("text", "cursor"), [
    (b"f1:auth:fe00:20c995:12:82a9010a", FileCursor("auth", 0xFE00, 0x20C995, 0x12, "82a9010a")),
    (b"f1:a.b-c_d:0:0:0:00000000", FileCursor("a.b-c_d", 0, 0, 0, "00000000")),
    (b"m1:gcmd:0123456789abcdef:1f", MemoryCursor("gcmd", "0123456789abcdef", 0x1F)),
    (f"j1:journal:{JOURNALD}".encode(), JournalCursor("journal", JOURNALD)),
])
def test_parse_cursor_table(text, cursor):
    assert parse_cursor(text) == cursor


@pytest.mark.parametrize("text", [
    b"", b"f1", b"f2:a:1:2:3:82a9010a", b"F1:a:1:2:3:82a9010a", b"f1:a:01:2:3:82a9010a", b"f1:a:1:2:3:82a9010",
    b"f1:a:1:2:3:82A9010A", b"f1:a:1:2:3:82a9010a:", b"f1:a:1:2:-3:82a9010a", b"f1:a:1:2:3:82a9010a\n",
    b"f1::1:2:3:82a9010a", b"f1:-a:1:2:3:82a9010a", b"f1:a b:1:2:3:82a9010a", b"f1:a:11111111111111111:2:3:82a9010a",
    b"m1:gcmd:0123:1", b"m1:gcmd:0123456789abcdef:", b"j1:journal:s=1;i=2", f"j1:journal:{JOURNALD};y=1".encode(),
    f"j1:journal:{JOURNALD}:01".encode(), f"j1:journal:{JOURNALD}:".encode(), f"j1:journal:{JOURNALD}:1:2".encode(),
    b"x" * 300, "f1:a:١:2:3:82a9010a".encode(),
])
def test_parse_cursor_refuses_what_gcmd_did_not_make(text):
    with pytest.raises(CommandError, match="^bad cursor$"):
        parse_cursor(text)


def test_cursors_parse_back_to_what_they_name():
    assert parse_cursor(file_cursor("auth", (2049, 77), 1234, b"line", 0).encode()) == FileCursor(
        "auth", 2049, 77, 1234, line_hash(b"line", 0))
    assert parse_cursor(memory_cursor("gcmd", "00ff00ff00ff00ff", 4096).encode()) == MemoryCursor(
        "gcmd", "00ff00ff00ff00ff", 4096)
    assert parse_cursor(journal_cursor("journal", JOURNALD).encode()) == JournalCursor("journal", JOURNALD)
    second_line = JournalCursor("journal", JOURNALD, 1)  # of an entry of several lines
    assert parse_cursor(journal_cursor("journal", second_line.suffix).encode()) == second_line
    assert second_line.suffix == f"{JOURNALD}:1"


def test_a_file_cursor_names_the_file_the_line_end_and_the_line(table, logs):
    table.ask("format json")
    first = json.loads(lines_of(table.ask("lastlog 1 app"))[0])["cursor"]
    cursor = parse_cursor(first.encode())
    st = os.stat(logs[2])
    assert (cursor.log, cursor.device, cursor.inode, cursor.end) == ("app", st.st_dev, st.st_ino, st.st_size - 1)
    logs[2].write_text("p1\np2\nq3\n")  # rewritten in place: same file, same offsets, another line
    assert json.loads(lines_of(table.ask("lastlog 1 app"))[0])["cursor"] != first


# --- follow: the feed over real logs (real files, real tail), no network ------------------

#: appends ``n I`` lines from I = argv[2], RATE a second (argv[3]), a few per write, until killed
WRITER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
n, rate = int(sys.argv[2]), int(sys.argv[3])
start = time.monotonic()
while True:
    due = int((time.monotonic() - start) * rate)
    if due > 0:
        os.write(fd, b"".join(b"n %d\\n" % i for i in range(n, n + due)))
        n += due
        start += due / rate
    time.sleep(0.001)
"""


@pytest.fixture
def pool():
    threads = ThreadPool(2)
    yield threads
    threads.kill()


@pytest.fixture
def file_logs(pool):
    """Make FileLogs over real files; each is closed after the test."""
    made = []

    def make(path) -> FileLog:
        log = FileLog(str(path), pool, 5.0)
        made.append(log)
        return log

    yield make
    for log in made:
        log.close()


@pytest.fixture
def writer(tmp_path):
    """Start a process that appends numbered lines to a file; stopped after the test."""
    procs = []

    def start(path, first: int, rate: int) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(first), str(rate)])
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def numbers(lines: list[bytes]) -> list[int]:
    return [int(line.split()[1]) for line in lines]


def busy(pool: ThreadPool, seconds: float = 0.05) -> None:
    """Keep every thread of ``pool`` busy for a while: a backlog read waits meanwhile,
    and the lines its reader reads in that time reach the feed before the backlog."""
    for _ in range(pool.maxsize):
        pool.spawn(time.sleep, seconds)


@pytest.mark.parametrize("reader_running", [False, True])
def test_follow_n_backlog_then_every_line_after_no_gap_no_repeat_at_the_seam_while_the_log_grows_fast(
        tmp_path, pool, file_logs, writer, reader_running):
    path = tmp_path / "fast.log"
    path.write_text("".join(f"n {i}\n" for i in range(100)))
    writer(path, 100, 5000)
    log = file_logs(path)
    if reader_running:  # another follower already reads the log
        other: list[bytes] = []
        log.subscribe(other.extend)
        poll(lambda: other, 5, "the other follower got nothing")
    for attempt in range(6):
        feed = Feed([("fast", log)], 50)
        got: list[bytes] = []
        if attempt % 2:
            busy(pool)
        feed.subscribe(got.extend)
        poll(lambda got=got: len(got) >= 1000, 10, "fewer than 1000 lines followed")
        feed.unsubscribe(got.extend)
        assert len(feed.backlog) == 50
        seen = numbers(feed.backlog + got)
        assert seen == list(range(seen[0], seen[0] + len(seen))), "a gap or a repeat at the seam"


def test_lines_that_do_not_match_never_reach_the_follower(tmp_path, file_logs):
    path = tmp_path / "app.log"
    path.write_text("keep 0\ndrop 0\n")
    feed = Feed([("app", file_logs(path))], 5, Pattern(b"^keep"))
    calls: list[list[bytes]] = []
    feed.subscribe(calls.append)
    assert feed.backlog == [b"keep 0"]
    with open(path, "a") as f:
        f.write("".join(f"drop {i}\n" for i in range(1000)) + "keep 1\n")
    poll(lambda: calls, 5, "nothing followed")
    gevent.sleep(0.1)
    assert calls == [[b"keep 1"]]


def test_feeds_that_ask_for_the_same_lines_share_one_filtering_of_each_batch(tmp_path, file_logs):
    path = tmp_path / "app.log"
    path.write_text("x\n")
    log = file_logs(path)
    feeds = [Feed([("app", log)], 0, Pattern(b"keep")) for _ in range(3)]
    feeds += [Feed([("app", log)], 0, Pattern(b"other")), Feed([("app", log)], 0, Pattern(b"keep"), JSON)]
    calls: list[list[list[bytes]]] = [[] for _ in feeds]
    for feed, got in zip(feeds, calls):
        feed.subscribe(got.append)
    with open(path, "a") as f:
        f.write("keep 1\nother 1\n")
    poll(lambda: all(calls), 5, "a feed got nothing")
    assert calls[0] == [[b"keep 1"]] and calls[0][0] is calls[1][0] is calls[2][0]  # filtered once
    assert calls[3] == [[b"other 1"]]
    assert json.loads(calls[4][0][0])["line"] == "keep 1"


def test_a_follow_with_a_backlog_gets_the_lines_written_after_a_copytruncate(tmp_path, file_logs):
    path = tmp_path / "app.log"
    path.write_text("".join(f"old line {i:04d} of some length\n" for i in range(100)))
    feed = Feed([("app", file_logs(path))], 1)
    got: list[bytes] = []
    feed.subscribe(got.extend)
    assert feed.backlog == [b"old line 0099 of some length"]
    with open(path, "a") as f:
        f.write("one more\n")
    poll(lambda: got == [b"one more"], 5, f"the live line never came: {got!r}")
    with open(path, "r+") as f:  # logrotate's copytruncate; the new lines end before the old ones did
        f.truncate(0)
    poll(lambda: os.path.getsize(path) == 0)
    with open(path, "a") as f:
        f.write("new 1\nnew 2\n")
    poll(lambda: got[-1:] == [b"new 2"], 5, f"the lines after the truncation never came: {got!r}")
    assert got == [b"one more", b"new 1", b"new 2"]


def test_follow_several_logs_headers_when_the_log_changes(tmp_path, file_logs):
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text("a0\n")
    b.write_text("b0\n")
    feed = Feed([("a", file_logs(a)), ("b", file_logs(b))], 1)
    got: list[bytes] = []
    feed.subscribe(got.extend)
    assert feed.backlog == [b"==> a <==", b"a0", b"==> b <==", b"b0"]
    for path, line in ((b, "b1"), (b, "b2"), (a, "a1"), (b, "b3")):
        with open(path, "a") as f:
            f.write(line + "\n")
        poll(lambda line=line: line.encode() in got, 5, f"{line} not followed")
    assert got == [b"b1", b"b2", b"==> a <==", b"a1", b"==> b <==", b"b3"]


def test_follow_json_lines_carry_the_cursor_lastlog_gives_the_same_line(tmp_path, file_logs):
    path = tmp_path / "app.log"
    path.write_bytes(b"old\n")
    log = file_logs(path)
    feed = Feed([("app", log)], 1, None, JSON)
    got: list[bytes] = []
    feed.subscribe(got.extend)
    with open(path, "ab") as f:
        f.write(b"new \xff\n== not dropped\n")
    poll(lambda: len(got) == 2, 5, "not followed")
    live = [json.loads(line) for line in got]
    assert json.loads(feed.backlog[0])["line"] == "old"
    assert [o["line"] for o in live] == [list(b"new \xff"), "== not dropped"]
    lastlog = [json.loads(line) for line in log.query(2, None, Shape(JSON, "app"))]
    assert [o["cursor"] for o in lastlog] == [o["cursor"] for o in live]
    assert feed.dropped_marker(12) == b'{"note":"dropped","lines":12}'


def test_a_follow_buffer_says_what_it_dropped_with_its_marker():
    buffer = FollowBuffer(60, marker=lambda n: b'{"note":"dropped","lines":%d}' % n)
    buffer.push([b"x" * 20, b"y" * 20, b"z" * 20])
    assert buffer.take() == b'{"note":"dropped","lines":2}\n' + b"z" * 20 + b"\n"
    text = FollowBuffer(60)
    text.push([b"x" * 20, b"y" * 20, b"z" * 20])
    assert text.take() == b"== 2 lines dropped ==\n" + b"z" * 20 + b"\n"


# --- follow through a server ------------------------------------------------------------

def read_until(client, last: bytes) -> list[bytes]:
    got = []
    while not got or got[-1] != last:
        got.append(client.line())
    return got


def test_follow_n_logs_grep_gives_the_backlog_then_the_matching_new_lines(several, logs):
    several.send("follow 2 app,auth grep failed|^p\n")
    assert read_until(several, b"Nov 25 10:00:18 lab sshd[18]: Failed key\n") == [
        BEGIN_FOLLOW, b"==> app <==\n", b"p2\n", b"p3\n", b"==> auth <==\n",
        b"Nov 25 10:00:15 lab sshd[15]: Failed key\n", b"Nov 25 10:00:18 lab sshd[18]: Failed key\n"]
    with open(logs[2], "a") as f:
        f.write("nothing\np4\n")
    assert several.line() == b"==> app <==\n"
    assert several.line() == b"p4\n"
    assert several.ask("ping") == END_FOLLOW
    assert several.line() == b"pong\n"


def test_follow_with_one_log_and_no_new_words_is_1_1(several, logs):
    assert several.ask("follow app") == BEGIN_FOLLOW
    with open(logs[2], "a") as f:
        f.write("p4\n")
    assert several.line() == b"p4\n"
    assert several.ask("") == END_FOLLOW


@pytest.mark.parametrize("bad", ["follow -1", "follow 1001", "follow a b", "follow from", "follow grep",
                                 "follow app,app", "follow app from"])
def test_follow_any_other_shape_gets_the_follow_usage_line(several, bad):
    assert several.ask(bad) == FOLLOW_USAGE


@pytest.mark.parametrize("cursors", ["nonsense", "f1:auth:1:2:3:0000abcd", "f1:app:1:2:3:0000abcd,f1:app:1:2:4:0000abcd"])
def test_a_cursor_gcmd_did_not_make_or_of_a_log_not_in_logs_gets_bad_cursor(several, cursors):
    assert several.ask(f"follow app from {cursors}") == ERROR + b"bad cursor\n"


def test_follow_n_of_the_gcmd_log_gives_its_last_lines_then_the_new_ones(gcmd):
    server = gcmd()
    client, other = server.client(), server.client()
    assert client.ask("ping") == b"pong\n" and other.ask("ping") == b"pong\n"  # both admitted and logged
    kept = ask_block(client, "lastlog 2 gcmd")
    client.send("follow 2 gcmd\n")
    assert client.line() == BEGIN_FOLLOW
    backlog = [client.line()[:-1], client.line()[:-1]]
    assert backlog[0] == kept[1] and backlog[1].endswith(b": follow 2 gcmd")  # the request is logged first
    other.ask("ping")
    assert client.line().endswith(b": ping\n")
    assert client.ask("") == END_FOLLOW


# --- resuming a follow ---------------------------------------------------------------------

def json_lines(lines: list[bytes]) -> list[dict]:
    return [json.loads(line) for line in lines]


def cursor_of_line(log, name: str, line: str) -> str:
    """The cursor lastlog gives the last line ``line`` of the log."""
    found = [o for o in json_lines(log.query(1000, None, Shape(JSON, name))) if o.get("line") == line]
    return found[-1]["cursor"]


def test_follow_from_a_cursor_gives_every_line_after_it_then_the_live_lines(tmp_path, file_logs):
    path = tmp_path / "app.log"
    path.write_text("p1\np2\np3\n")
    log = file_logs(path)
    cursor = cursor_of_line(log, "app", "p2")
    with open(path, "a") as f:
        f.write("p4\np5\n")
    feed = Feed([("app", log)], 0, None, JSON, {"app": parse_cursor(cursor.encode())})
    got: list[bytes] = []
    feed.subscribe(got.extend)
    assert [o["line"] for o in json_lines(feed.backlog)] == ["p3", "p4", "p5"]
    with open(path, "a") as f:
        f.write("p6\n")
    poll(lambda: got, 5, "not followed")
    assert [o["line"] for o in json_lines(got)] == ["p6"]


def test_a_follow_resumed_with_the_last_cursor_received_misses_nothing_and_repeats_nothing(
        tmp_path, pool, file_logs, writer):
    path = tmp_path / "fast.log"
    path.write_text("n 0\n")
    writer(path, 1, 5000)
    log = file_logs(path)
    received: list[dict] = []
    cursor = None
    for attempt in range(6):  # a client that loses its connection five times, and comes back
        cursors = {"fast": parse_cursor(cursor.encode())} if cursor else {}
        feed = Feed([("fast", log)], 0 if cursor else 1, None, JSON, cursors)
        got: list[bytes] = []
        if attempt % 2:
            busy(pool)
        feed.subscribe(got.extend)
        poll(lambda got=got: len(got) >= 500, 10, "fewer than 500 lines followed")
        feed.unsubscribe(got.extend)
        part = json_lines(feed.backlog + got)
        assert all("note" not in o for o in part), part[:3]
        received += part
        cursor = received[-1]["cursor"]
    seen = [int(o["line"].split()[1]) for o in received]
    assert seen == list(range(seen[0], seen[0] + len(seen))), "a gap or a repeat across the reconnections"


def rotate_create(path):
    os.rename(path, f"{path}.1")
    path.write_text("new 1\nnew 2\n")


def copytruncate(path):
    with open(path, "r+") as f:
        f.truncate(0)
    with open(path, "a") as f:
        f.write("new 1\nnew 2\n")


def rewrite_in_place(path):
    text = path.read_text()
    path.write_text(text.replace("p2", "q2"))


@pytest.mark.parametrize("change", [rotate_create, copytruncate, rewrite_in_place])
def test_a_log_that_no_longer_holds_the_cursors_line_begins_with_cursor_lost_then_its_oldest_line(
        tmp_path, file_logs, change):
    path = tmp_path / "app.log"
    path.write_text("p1\np2\np3\n")
    log = file_logs(path)
    cursor = parse_cursor(cursor_of_line(log, "app", "p2").encode())
    change(path)
    feed = Feed([("app", log)], 0, None, JSON, {"app": cursor})
    feed.subscribe(lambda lines: None)
    feed.unsubscribe(None)
    objects = json_lines(feed.backlog)
    assert objects[0] == {"note": "cursor_lost", "log": "app"}
    assert [o["line"] for o in objects[1:]] == [line for line in path.read_text().splitlines()]


@pytest.mark.parametrize("change", [rotate_create, copytruncate, rewrite_in_place])
def test_a_real_server_resume_after_a_rotation_or_rewrite_says_cursor_lost_then_sends_the_file_now_there_once(
        gcmd, tmp_path, change):
    path = tmp_path / "app.log"
    path.write_text("p1\np2\np3\n")
    client = gcmd("--logfile", f"app={path}").client()
    assert client.ask("format json") == b"OK\n"
    client.send("lastlog 3 app\n")
    cursor = json.loads(client.block(b"End lastlog\n")[2])["cursor"]  # of p2
    change(path)
    assert client.ask(f"follow app from {cursor}") == b"Begin follow\n"
    assert json.loads(client.line()) == {"note": "cursor_lost", "log": "app"}
    with open(path, "a") as f:
        f.write("last\n")
    got = [json.loads(client.line())["line"]]
    while got[-1] != "last":
        got.append(json.loads(client.line())["line"])
    assert got == path.read_text().splitlines()  # each line of the file now at the path, once


def test_cursor_lost_in_text_and_for_the_gcmd_log_of_another_process():
    memory = MemoryLog()
    feed = Feed([("gcmd", memory)], 0, None, TEXT, {"gcmd": MemoryCursor("gcmd", "0" * 16, 5)})
    feed.subscribe(lambda lines: None)
    feed.unsubscribe(None)
    assert feed.backlog == [b"== cursor lost: gcmd =="]


def test_follow_from_cursors_through_a_server(several, logs, table):
    table.ask("format json")
    cursor = json.loads(lines_of(table.ask("lastlog 2 app"))[0])["cursor"]  # of p2
    with open(logs[2], "a") as f:
        f.write("p4\n")
    several.send(f"follow 1 app,syslog from {cursor}\n")
    assert read_until(several, (LOG_LINES[-1] + "\n").encode()) == [
        BEGIN_FOLLOW, b"==> app <==\n", b"p3\n", b"p4\n", b"==> syslog <==\n", (LOG_LINES[-1] + "\n").encode()]
    assert several.ask("") == END_FOLLOW
    assert several.ask("follow gcmd from " + cursor) == ERROR + b"bad cursor\n"
    assert several.ask("follow app from m1:app:0123456789abcdef:1") == ERROR + b"bad cursor\n"


# --- the same, black-box: a real gcmd process, a writer appending 5,000 lines a second -----

def follow_json(server, request: str, count: int) -> list[dict]:
    """``count`` JSON lines of a follow (the backlog first), then the client resets."""
    client = server.client(timeout=10)
    assert client.ask("format json") == b"OK\n"
    assert client.ask(request) == BEGIN_FOLLOW
    objects = [json.loads(client.line()) for _ in range(count)]
    client.reset()  # the connection is lost in the middle of the stream
    return objects


def test_a_real_server_follow_n_has_no_gap_and_no_repeat_at_the_seam_while_5000_lines_a_second_come(
        gcmd, tmp_path, writer):
    path = tmp_path / "fast.log"
    path.write_text("".join(f"n {i}\n" for i in range(100)))
    server = gcmd("--logfile", f"fast={path}")
    writer(path, 100, 5000)
    for _ in range(3):
        objects = follow_json(server, "follow 50 fast", 1050)
        assert all("note" not in o for o in objects), objects[:3]
        seen = [int(o["line"].split()[1]) for o in objects]
        assert seen == list(range(seen[0], seen[0] + len(seen))), "a gap or a repeat at the seam"


def test_a_real_server_follow_resumed_from_the_last_cursor_after_a_reset_misses_nothing_and_repeats_nothing(
        gcmd, tmp_path, writer):
    path = tmp_path / "fast.log"
    path.write_text("n 0\n")
    server = gcmd("--logfile", f"fast={path}")
    writer(path, 1, 5000)
    received = follow_json(server, "follow 1 fast", 500)
    for _ in range(4):  # four more connections, each resumed where the last one broke
        received += follow_json(server, f"follow fast from {received[-1]['cursor']}", 500)
    assert all("note" not in o for o in received), [o for o in received if "note" in o][:3]
    seen = [int(o["line"].split()[1]) for o in received]
    assert seen == list(range(seen[0], seen[0] + len(seen))), "a gap or a repeat across the reconnections"
