"""The log service: exact lastlog, shared readers, rotation, the journal, the server's own log.

Real files in tmp_path, real tail and journalctl, in this test's gevent hub.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import signal
import subprocess
import threading
import time

import gevent
import pytest
from gevent.threadpool import ThreadPool
from support import poll

from gcmd.logs.journal import JournalLog
from gcmd.logs.lines import MAX_REPLY, LineSplitter, Recent, lastlog_lines, wire_line
from gcmd.logs.memory import MemoryLog
from gcmd.logs.readers import DRAIN_QUIET, FileLog
from gcmd.logs.sources import Logs, default_source, log_sources, parse_logfile
from gcmd.logs.tailing import restart_delays
from gcmd.net.wire import CommandError

JOURNAL_REMOTE = shutil.which("systemd-journal-remote") or next(
    (p for p in ("/lib/systemd/systemd-journal-remote", "/usr/lib/systemd/systemd-journal-remote")
     if os.path.exists(p)), None)
needs_journal_remote = pytest.mark.skipif(
    JOURNAL_REMOTE is None, reason="needs systemd-journal-remote (apt-get install systemd-journal-remote)")


def children() -> list[int]:
    """Live children of this test process (every reader is one)."""
    pid = os.getpid()
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def append(path, *lines: str) -> None:
    with open(path, "ab") as f:
        f.write(b"".join(line.encode() + b"\n" for line in lines))


@pytest.fixture
def pool():
    threads = ThreadPool(2)
    yield threads
    threads.kill()


@pytest.fixture
def open_log(pool):
    """Make FileLogs; each is closed after the test, and leaves no process behind."""
    logs = []

    def make(path, timeout: float = 5.0, threads: ThreadPool = pool) -> FileLog:
        log = FileLog(str(path), threads, timeout)
        logs.append(log)
        return log

    yield make
    for log in logs:
        log.close()
    assert children() == []


def follow(log) -> list[bytes]:
    got: list[bytes] = []
    log.subscribe(got.extend)
    return got


def until_seen(got: list[bytes], last: bytes, timeout: float = 5.0) -> list[bytes]:
    poll(lambda: last in got, timeout, f"{last!r} not followed within {timeout} s; got {got[-5:]!r}")
    return got


# --- lastlog --------------------------------------------------------------------

def test_lastlog_sees_every_line_appended_before_it(tmp_path, open_log):
    path = tmp_path / "syslog"
    path.write_text("".join(f"old {i}\n" for i in range(50)))
    log = open_log(path)
    for i in range(100):
        append(path, f"fresh line {i}")
        assert log.lastlog(1) == [f"fresh line {i}".encode()], i
    assert log.lastlog(3) == [b"fresh line 97", b"fresh line 98", b"fresh line 99"]


def test_lastlog_reads_again_a_file_rewritten_in_place_with_old_timestamps(tmp_path, open_log):
    path = tmp_path / "app.log"
    path.write_bytes(b"first 1\nfirst 2\n")
    before = os.stat(path)
    log = open_log(path)
    assert log.lastlog(2) == [b"first 1", b"first 2"]
    with open(path, "r+b") as f:  # same size, same inode
        f.write(b"again 1\nagain 2\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size and os.stat(path).st_mtime_ns == before.st_mtime_ns
    assert log.lastlog(2) == [b"again 1", b"again 2"]


def test_lastlog_reads_the_file_the_path_names_after_rotation_and_copytruncate(tmp_path, open_log):
    path = tmp_path / "syslog"
    path.write_text("before 1\nbefore 2\n")
    log = open_log(path)
    assert log.lastlog(5) == [b"before 1", b"before 2"]
    os.rename(path, tmp_path / "syslog.1")  # logrotate "create"
    append(path, "after rotation")
    assert log.lastlog(5) == [b"after rotation"]
    with open(path, "r+b") as f:  # logrotate "copytruncate"
        f.truncate(0)
    assert log.lastlog(5) == []
    append(path, "after truncation")
    assert log.lastlog(5) == [b"after truncation"]


@pytest.mark.parametrize("content, count, lines", [
    (b"", 10, []),
    (b"\n", 10, [b""]),
    (b"a\n\n", 10, [b"a", b""]),
    (b"no final newline", 10, [b"no final newline"]),
    (b"a\nb\nlast without newline", 2, [b"b", b"last without newline"]),
    (b"a\nb\nc\n", 1, [b"c"]),
    (b"a\n== server\nEnd follow\nb\n", 3, [b"b"]),  # dropped lines count among the N, as tail | grep -v
    ((b"progress 10%\rprogress 100%\n"
      b"\x1b[31mred\x1b[0m and \x07bell\n"
      b"tab\there back\\slash\n"
      b"caf\xc3\xa9 ok, \xff\xfe not utf-8, \xc2\x9b c1\n"
      b"nul\x00 del\x7f\n"
      b"no final newline"), 6,
     [rb"progress 10%\x0dprogress 100%", rb"\x1b[31mred\x1b[0m and \x07bell", b"tab\there back\\slash",
      "café ok, ".encode() + rb"\xff\xfe not utf-8, \x9b c1", rb"nul\x00 del\x7f", b"no final newline"]),
    (b"short\n" + b"y" * 100_000 + b"\nlast\n", 3, [b"short", b"y" * 65536 + b" [+34464 bytes]", b"last"]),
    (b"x\n" * 100_000, 1000, [b"x"] * 1000),
    # 2 MB of long lines: each read on its own, its first 64 KiB only
    (b"first\n" + (b"z" * 100_000 + b"\n") * 20, 21, [b"first"] + [b"z" * 65536 + b" [+34464 bytes]"] * 20),
])
def test_lastlog_is_tail_n_less_dropped_lines_escaped(tmp_path, open_log, content, count, lines):
    path = tmp_path / "odd.log"
    path.write_bytes(content)
    assert open_log(path).lastlog(count) == lines


def test_lastlog_of_long_lines_keeps_to_8_mib_with_a_marker(tmp_path, open_log):
    path = tmp_path / "long.log"
    forged = [f"== forged {i}" for i in range(10)]
    long_lines = [f"{i:04d} ".encode() + b"x" * 8995 for i in range(990)]  # 9,000 bytes
    path.write_bytes("".join(line + "\n" for line in forged).encode() + b"".join(l + b"\n" for l in long_lines))
    log = open_log(path)
    block = log.lastlog(1000)
    # 931 lines of 9,001 bytes as sent and the marker fit in 8 MiB; the dropped lines are not counted
    assert block == [b"== 59 older lines left out =="] + long_lines[59:]
    assert sum(len(line) + 1 for line in block) <= MAX_REPLY
    assert block == lastlog_lines([wire_line(line.encode()) for line in forged] + long_lines, 1000)
    assert log.lastlog(900) == long_lines[90:]


def test_lastlog_of_a_huge_file_reads_only_its_end(tmp_path, open_log):
    path = tmp_path / "huge.log"
    with open(path, "wb") as f:
        f.truncate(16 << 30)  # 16 GiB, sparse
        f.seek(0, os.SEEK_END)
        f.write(b"\nthe end 1\nthe end 2\n")
    log = open_log(path)
    started = time.monotonic()
    assert log.lastlog(2) == [b"the end 1", b"the end 2"]
    assert time.monotonic() - started < 1


def test_lastlog_of_a_missing_file_tells_the_client_what_and_the_operator_what_to_do(tmp_path, open_log, caplog):
    log = open_log(tmp_path / "nope" / "syslog")
    for attempt in (lambda: log.lastlog(10), lambda: log.subscribe(print)):
        with pytest.raises(CommandError) as error:
            attempt()
        assert str(error.value) == (f"cannot read the log file '{tmp_path}/nope/syslog' (--logfile): "
                                    "No such file or directory")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [(f"cannot read the log file '{tmp_path}/nope/syslog': No such file or directory "
                        "(start gcmd with --logfile PATH to serve another log)")]


def test_a_log_file_error_that_another_path_cannot_fix_has_no_hint(tmp_path, open_log, caplog):
    path = tmp_path / "syslog"
    path.write_text("x\n")
    log = open_log(path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    spare = []
    try:  # every descriptor taken: the read cannot open the file
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        with contextlib.suppress(OSError):
            while True:
                spare.append(os.open(os.devnull, os.O_RDONLY))
        with pytest.raises(CommandError) as error:
            log.lastlog(1)
    finally:
        for fd in spare:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert str(error.value) == f"cannot read the log file '{path}' (--logfile): Too many open files"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"cannot read the log file '{path}': Too many open files"]
    assert log.lastlog(1) == [b"x"]


def test_a_directory_is_refused_at_once(tmp_path, open_log):
    log = open_log(tmp_path)
    for attempt in (lambda: log.lastlog(10), lambda: log.subscribe(print)):
        with pytest.raises(CommandError, match=f"^cannot read the log file '{tmp_path}' \\(--logfile\\): Is a directory"):
            attempt()


def test_start_warns_when_the_file_cannot_be_read(tmp_path, open_log, caplog):
    open_log(tmp_path / "missing.log").start()
    assert "cannot read the log file" in caplog.text and "missing.log" in caplog.text


def test_a_fifo_times_out_without_holding_a_thread_then_serves_what_its_reader_read(tmp_path, open_log):
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    one_thread = ThreadPool(1)
    try:
        log = open_log(fifo, timeout=0.5, threads=one_thread)
        started = time.monotonic()
        with pytest.raises(CommandError, match=r"^lastlog timed out after 0\.5 s$"):
            log.lastlog(5)
        assert time.monotonic() - started < 2
        regular = tmp_path / "regular.log"
        regular.write_text("still served\n")
        assert open_log(regular, threads=one_thread).lastlog(1) == [b"still served"]  # the one thread is free
        # the reader holds the FIFO open for reading: a writer does not block
        writer = poll(lambda: _open_writer(fifo), 5, "the FIFO has no reader")
        os.write(writer, b"through 1\nthrough 2\n")
        os.close(writer)
        poll(lambda: log.lastlog(5) == [b"through 1", b"through 2"], 5)
    finally:
        one_thread.kill()


def _open_writer(fifo) -> int | None:
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None


# --- follow ---------------------------------------------------------------------

def test_followers_get_every_new_line_once_in_order_from_one_reader(tmp_path, open_log):
    path = tmp_path / "syslog"
    path.write_bytes(b"old line\nbegun before, ")
    log = open_log(path)
    followers = [follow(log) for _ in range(200)]
    assert log.stats.followers == 200 and len(children()) == 1
    append(path, "ended after", *[f"new {i}" for i in range(1000)])
    for got in followers:
        until_seen(got, b"new 999")
    expected = [b"begun before, ended after"] + [b"new %d" % i for i in range(1000)]
    assert all(got == expected for got in followers)
    assert len(children()) == 1 and log.stats.lines_read == 1001


def test_a_follower_that_raises_does_not_stop_the_others(tmp_path, open_log, caplog):
    path = tmp_path / "syslog"
    path.write_text("")
    log = open_log(path)
    first = follow(log)
    log.subscribe(lambda lines: 1 / 0)
    last = follow(log)
    append(path, "one")
    append(path, "two")
    until_seen(last, b"two")
    assert first == last == [b"one", b"two"]
    assert "ZeroDivisionError" in caplog.text


def test_unsubscribed_gets_nothing_more(tmp_path, open_log):
    path = tmp_path / "syslog"
    path.write_text("")
    log = open_log(path)
    gone, stays = [], follow(log)
    log.subscribe(gone.append)
    log.unsubscribe(gone.append)
    append(path, "after")
    until_seen(stays, b"after")
    assert gone == [] and log.stats.followers == 1


def test_follow_goes_on_with_the_new_file_after_rotation(tmp_path, open_log):
    path = tmp_path / "syslog"
    path.write_text("")
    log = open_log(path)
    got = follow(log)
    append(path, "before rotation")
    until_seen(got, b"before rotation")
    os.rename(path, tmp_path / "syslog.1")  # logrotate "create"
    append(tmp_path / "syslog.1", "late in the old file")
    append(path, "after rotation")
    started = time.monotonic()
    until_seen(got, b"after rotation", timeout=2)
    assert time.monotonic() - started < 2
    append(path, "more")
    until_seen(got, b"more")
    assert sorted(got) == sorted([b"before rotation", b"late in the old file", b"after rotation", b"more"])
    poll(lambda: len(children()) == 1, DRAIN_QUIET + 3, "the old reader still runs")


def test_follow_gets_what_a_slow_application_writes_to_the_renamed_file(tmp_path, open_log):
    path = tmp_path / "syslog"
    path.write_text("")
    log = open_log(path)
    got = follow(log)
    append(path, "before rotation")
    until_seen(got, b"before rotation")
    os.rename(path, tmp_path / "syslog.1")  # logrotate "create"
    path.write_text("")
    written = [b"before rotation"]
    started = time.monotonic()
    while time.monotonic() - started < 3:  # the application reopens its log 3 s later
        written.append(f"late {len(written)}".encode())
        append(tmp_path / "syslog.1", written[-1].decode())
        gevent.sleep(0.25)
    written.append(b"after reopening")
    append(path, "after reopening")
    until_seen(got, b"after reopening", timeout=2)
    poll(lambda: len(got) == len(written), 2, f"lost: {sorted(set(written) - set(got))}")
    assert sorted(got) == sorted(written)
    poll(lambda: len(children()) == 1, DRAIN_QUIET + 3, "the old reader still runs")


def test_follow_goes_on_after_copytruncate(tmp_path, open_log):
    path = tmp_path / "syslog"
    path.write_text("")
    log = open_log(path)
    got = follow(log)
    append(path, "before truncation")
    until_seen(got, b"before truncation")
    with open(path, "r+b") as f:  # logrotate "copytruncate"
        f.truncate(0)
    gevent.sleep(0.2)
    append(path, "after truncation")
    until_seen(got, b"after truncation", timeout=2)
    assert got == [b"before truncation", b"after truncation"]


def test_a_killed_reader_starts_again_with_back_off_and_loses_no_line(tmp_path, open_log, caplog):
    path = tmp_path / "syslog"
    path.write_text("")
    log = open_log(path)
    got = follow(log)
    waits = []
    for round_ in range(2):
        (reader,) = children()
        os.kill(reader, signal.SIGKILL)
        killed = time.monotonic()
        append(path, f"while dead {round_}")
        poll(lambda dead=reader: children() and children() != [dead], 5, "the reader did not start again")
        waits.append(time.monotonic() - killed)
    append(path, "after")
    until_seen(got, b"after")
    assert got == [b"while dead 0", b"while dead 1", b"after"]
    assert log.stats.reader_restarts == 2
    assert waits[0] >= 0.1 and waits[1] >= 0.2, waits  # 0.1 s, doubling
    assert "exited with status -9" in caplog.text


def leave_and_close(log, since_fork: int | None, turns: int) -> bool:
    """A follower of ``log`` leaves ``turns`` hub turns after its request (``since_fork``
    None) or after its reader's process appeared; then the log is closed. Whether
    the follower was still waiting for its reader when it left."""
    follower = gevent.spawn(log.subscribe, print)
    if since_fork is not None:
        while not children() and not follower.ready():
            gevent.sleep(0)
    for _ in range(turns):
        gevent.sleep(0)
    waiting = not follower.ready()
    follower.kill()
    log.close()
    return waiting


@pytest.mark.parametrize("since_fork", [None, True], ids=["since-the-request", "since-the-fork"])
def test_a_follower_that_leaves_while_its_reader_starts_leaves_no_process(tmp_path, open_log, since_fork):
    # every moment, one hub turn apart, until the follower no longer waits
    path = tmp_path / "syslog"
    path.write_text("x\n")
    turns = 0
    while leave_and_close(open_log(path), since_fork, turns) and turns < 5000:
        assert children() == [], f"a reader was left by a follower that left after {turns} turns"
        turns += 1 if turns < 20 else turns // 10
    assert children() == []


def test_a_reader_that_keeps_failing_is_restarted_less_and_less_often_down_to_every_5_minutes():
    delays = restart_delays()
    assert [next(delays) for _ in range(14)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 51.2,
                                                 102.4, 204.8, 300, 300]


def test_close_stops_every_reader(tmp_path, open_log):
    logs = []
    for i in range(3):
        (tmp_path / f"l{i}.log").write_text("")
        logs.append(open_log(tmp_path / f"l{i}.log"))
        follow(logs[-1])
    assert len(children()) == 3
    for log in logs:
        log.close()
    assert children() == []


# --- the server's own log -------------------------------------------------------

@pytest.fixture
def memory():
    handler = MemoryLog()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("gcmd.test.memory")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield handler, logger
    logger.removeHandler(handler)


def test_memory_log_keeps_lines_and_sends_them_in_the_hub_thread(memory, pool):
    handler, logger = memory
    hub_thread = threading.get_ident()
    got, threads = [], set()

    def subscriber(lines):
        threads.add(threading.get_ident())
        got.extend(lines)

    handler.subscribe(subscriber)
    logger.info("from the hub")
    pool.spawn(logger.info, "from a pool thread").get()
    pool.spawn(logger.info, "two\nlines \x1b[1m").get()
    until_seen(got, b"lines \\x1b[1m")
    assert got == [b"from the hub", b"from a pool thread", b"two", b"lines \\x1b[1m"]
    assert threads == {hub_thread}
    assert handler.lastlog(3) == [b"from a pool thread", b"two", b"lines \\x1b[1m"]
    assert handler.stats.lines_read == 4 and handler.source == "memory"


def _logged_texts(total: int) -> list[list[str]]:
    """Batches of texts as a LineBatch hands them over, ``total`` lines or a few more:
    some of several lines, some that the protocol drops, some long."""
    batches, n = [], 0
    while n < total:
        texts = []
        for _ in range(n % 7 + 1):
            kind = n % 97
            texts.append("End lastlog" if kind == 3 else "== forged" if kind == 5 else
                         f"trace {n}\n  at line {n}" if kind == 11 else f"line {n} " + "x" * (n % 300))
            n += 1
        batches.append(texts)
    return batches


@pytest.mark.parametrize("total", [900, 2500, 3000, 3500, 4200, 5000, 7000])
@pytest.mark.parametrize("count", [1, 1000, 1001, 1500, 2000, 2500])
def test_memory_log_unfollowed_answers_as_if_it_remembered_every_line(total, count):
    handler, every = MemoryLog(), Recent()
    batches = _logged_texts(total)
    for texts in batches:
        handler.emit_texts(texts)
        every.extend(LineSplitter().feed(("\n".join(texts) + "\n").encode()))
    assert handler.lastlog(count) == every.last(count)
    assert handler.stats.lines_read == sum(text.count("\n") + 1 for texts in batches for text in texts)


def test_memory_log_subscriber_that_logs_does_not_recurse(memory):
    handler, logger = memory
    got = []

    def noisy(lines):
        got.extend(lines)
        if len(got) < 3:
            logger.info("seen %d", len(got))

    handler.subscribe(noisy)
    logger.info("start")
    poll(lambda: len(got) >= 3, 5)
    assert got == [b"start", b"seen 1", b"seen 2"]


def test_memory_log_keeps_the_last_1000_lines(memory):
    handler, logger = memory
    for i in range(1200):
        logger.info("line %d", i)
    assert handler.lastlog(1000)[0] == b"line 200" and len(handler.lastlog(1000)) == 1000


# --- the journal ----------------------------------------------------------------

def journal_file(path, first: int, count: int, word: str = "journal message") -> None:
    export = b"".join(
        b"__REALTIME_TIMESTAMP=%d\nMESSAGE=%s %d\nSYSLOG_IDENTIFIER=app\n_PID=4%d\n"
        b"_HOSTNAME=lab\nPRIORITY=6\n\n" % (1_700_000_000_000_000 + i * 1_000_000, word.encode(), i, i)
        for i in range(first, first + count))
    subprocess.run([JOURNAL_REMOTE, "-o", str(path), "-"], input=export, check=True, capture_output=True,
                   timeout=30)


@needs_journal_remote
def test_journal_files_serve_lastlog_and_follow(tmp_path):
    jdir = tmp_path / "journal"
    jdir.mkdir()
    journal_file(jdir / "a.journal", 0, 5)
    log = JournalLog(f"journal:{jdir}", 5.0)
    try:
        log.start()
        lines = log.lastlog(2)
        assert len(lines) == 2 and lines[0].endswith(b"journal message 3") and lines[1].endswith(b"journal message 4")
        assert b"lab app[44]: " in lines[1]
        got = follow(log)
        journal_file(jdir / "b.journal", 10, 2, "later")
        poll(lambda: len(got) == 2, 10, f"the new entries were not followed; got {got!r}")
        assert got[0].endswith(b"later 10") and got[1].endswith(b"later 11")
        assert log.lastlog(3)[0].endswith(b"journal message 4")
        assert len(children()) == 1
    finally:
        log.close()
    assert children() == []


def test_journal_that_cannot_be_read_says_why(tmp_path):
    log = JournalLog(f"journal:{tmp_path}/none", 5.0)
    try:
        log.start()
        with pytest.raises(CommandError, match="cannot read the log 'journal:.*/none'.*No such file"):
            log.lastlog(5)
    finally:
        log.close()
    assert children() == []


# --- which logs -----------------------------------------------------------------

@pytest.mark.parametrize("arg, parsed", [
    ("/var/log/syslog", ("syslog", "/var/log/syslog")),
    ("/var/log/auth.log", ("auth", "/var/log/auth.log")),
    ("/tmp/app.2026.log", ("app", "/tmp/app.2026.log")),
    ("relative.log", ("relative", "relative.log")),
    ("sec=/var/log/auth.log", ("sec", "/var/log/auth.log")),
    ("a=b=c", ("a", "b=c")),
    ("/srv/x=y.log", ("x=y", "/srv/x=y.log")),  # a path holding '=': the part before it is no name
    ("journal", ("journal", "journal")),
    ("journal:/var/log/journal", ("journal", "journal:/var/log/journal")),
    ("j2=journal:/tmp/j", ("j2", "journal:/tmp/j")),
    ("bad name=/tmp/x.log", ("bad name", "/tmp/x.log")),
])
def test_parse_logfile(arg, parsed):
    assert parse_logfile(arg) == parsed


@pytest.mark.parametrize("args, named", [  # the cases of the conformance suite, and more
    (["a=/tmp/x.log", "a=/tmp/y.log"], "'a'"),
    (["/tmp/one/app.log", "/tmp/two/app.log"], "'app' (/tmp/one/app.log, /tmp/two/app.log)"),
    (["bad name=/tmp/x.log"], "'bad name'"),
    (["-x=/tmp/x.log"], "'-x'"),
    (["gcmd=/tmp/x.log"], "'gcmd'"),
    (["/tmp/.hidden.log"], "'.hidden.log'"),
    (["journal", "journal:/tmp/j"], "'journal'"),
    (["/tmp/gcmd.log"], "'gcmd'"),
    (["=/tmp/x.log"], "''"),
    (["x" * 65 + "=/tmp/x.log"], "'" + "x" * 65 + "'"),
    (["app="], "'app='"),
    (["j=journal:"], "'j=journal:'"),
])
def test_bad_or_repeated_log_names_are_refused_by_name(args, named):
    with pytest.raises(ValueError) as error:
        log_sources(args)
    assert named in str(error.value) and "\n" not in str(error.value)


def test_log_sources_in_order():
    assert log_sources(["/var/log/syslog", "sec=/var/log/auth.log", "journal", "x" * 64 + "=/a"]) == [
        ("syslog", "/var/log/syslog"), ("sec", "/var/log/auth.log"), ("journal", "journal"),
        ("x" * 64, "/a")]


def test_logs_registry(tmp_path, pool):
    (tmp_path / "syslog").write_text("s1\n")
    (tmp_path / "auth.log").write_text("a1\na2\n")
    memory = MemoryLog()
    logs = Logs(log_sources([str(tmp_path / "syslog"), f"sec={tmp_path}/auth.log"]), memory, pool, 5.0)
    try:
        logs.start()
        assert logs.default == "syslog"
        assert logs.listing() == [("syslog", f"{tmp_path}/syslog"), ("sec", f"{tmp_path}/auth.log"),
                                  ("gcmd", "memory")]
        assert logs.get(None).lastlog(5) == [b"s1"]
        assert logs.get(b"sec").lastlog(1) == [b"a2"] and logs.get("gcmd") is memory
        with pytest.raises(CommandError, match=r"^unknown log 'nosuch' \(choose from syslog, sec, gcmd\)$"):
            logs.get(b"nosuch")
        with pytest.raises(CommandError) as error:
            logs.get(b"\x1b[2J" + b"z" * 100)
        assert str(error.value).startswith("unknown log '\\x1b[2J" + "z" * 57 + "...' (choose from")
        follow(logs.get(None))
        assert logs.stats()["syslog"].followers == 1 and set(logs.stats()) == {"syslog", "sec", "gcmd"}
    finally:
        logs.close()
    assert children() == []


def test_without_sources_the_default_is_gcmd(pool):
    memory = MemoryLog()
    logs = Logs([], memory, pool, 5.0)
    assert logs.default == "gcmd" and logs.get(None) is memory and logs.listing() == [("gcmd", "memory")]


def test_the_default_is_the_first_readable_file_else_the_journal_or_none(tmp_path):
    (tmp_path / "messages").write_text("m\n")
    assert default_source((str(tmp_path / "syslog"), str(tmp_path / "messages"))) == ("messages",
                                                                                      f"{tmp_path}/messages")
    assert default_source((str(tmp_path / "syslog"),)) in (None, ("journal", "journal"))


class _Dies(JournalLog):
    """A journal whose reader prints its backlog, says why it fails, and exits, every time."""

    def argv(self, reader):
        return ["sh", "-c", "echo entry; echo 'out of inotify watches' >&2; exit 1"]


@pytest.mark.parametrize("kind", ["unreadable", "dies after its backlog"])
def test_a_reader_that_keeps_failing_is_warned_about_once(tmp_path, caplog, kind):
    log = JournalLog(f"journal:{tmp_path}/none", 5.0) if kind == "unreadable" else _Dies("journal", 5.0)
    try:
        log.start()
        poll(lambda: log.stats.reader_restarts >= 3, 10, "the reader was not started again")
    finally:
        log.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings  # four exits, each with its message on stderr
    assert "says:" in warnings[0]
    assert ("No such file" if kind == "unreadable" else "out of inotify watches") in warnings[0]
    assert "exited with status 1" in warnings[1]


class _RestartFails(JournalLog):
    """A journal whose reader prints an entry and exits, and then cannot be started again."""

    def __init__(self, missing: str, command_timeout: float) -> None:
        super().__init__("journal", command_timeout)
        self.missing = missing
        self.starts = 0

    def argv(self, reader):
        self.starts += 1
        return ["sh", "-c", "echo entry; exit 1"] if self.starts == 1 else [self.missing]


def test_a_missing_journalctl_is_named_with_what_to_install(monkeypatch, caplog):
    monkeypatch.setenv("PATH", "/nonexistent")
    log = JournalLog("journal", 5.0)
    try:
        log.start()
        with pytest.raises(CommandError) as error:
            log.lastlog(5)
    finally:
        log.close()
    assert str(error.value) == "cannot read the log 'journal': cannot start journalctl: not found (install systemd)"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [str(error.value)]


@pytest.mark.timeout(20)
def test_a_journal_whose_reader_cannot_start_again_says_so_at_once(tmp_path, caplog):
    log = _RestartFails(str(tmp_path / "no-such-program"), 600.0)  # a wait would outlast the test
    try:
        log.start()
        poll(lambda: "cannot start the reader of the log 'journal' again" in caplog.text, 10)
        for ask in (lambda: log.lastlog(5), lambda: log.subscribe(lambda lines: None)):
            with pytest.raises(CommandError, match="^cannot read the log 'journal': cannot start "
                                                   ".*/no-such-program: not found$"):
                ask()
        assert log.stats.followers == 0
    finally:
        log.close()
    assert children() == []
