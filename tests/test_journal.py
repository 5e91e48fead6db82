"""The journal as a log: journalctl's ``short`` lines, cursors, resuming a follow.

Real journal files made by systemd-journal-remote in tmp_path, real
journalctl, a real ``python -m gcmd`` process where a connection matters;
the short format is checked against what the installed journalctl prints
for the same entries.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import poll

from gcmd.logs.cursors import parse_cursor
from gcmd.logs.feed import Feed
from gcmd.logs.journal import HISTORY_READS, JournalLog
from gcmd.logs.journal_short import (
    decode_entry,
    format_bytes,
    short_lines,
    strip_tab_ansi,
)
from gcmd.logs.queries import JSON, Shape

pytestmark = pytest.mark.timeout(60)

JOURNAL_REMOTE = shutil.which("systemd-journal-remote") or next(
    (p for p in ("/lib/systemd/systemd-journal-remote", "/usr/lib/systemd/systemd-journal-remote")
     if os.path.exists(p)), None)
needs_journal = pytest.mark.skipif(
    JOURNAL_REMOTE is None or shutil.which("journalctl") is None,
    reason="needs journalctl and systemd-journal-remote (apt-get install systemd systemd-journal-remote)")

BEGIN_FOLLOW = b"Begin follow\n"


def export(entries: list[dict], first_time: int = 1_700_000_000_000_000) -> bytes:
    """Entries in the journal export format (binary fields where needed)."""
    out = b""
    for n, entry in enumerate(entries):
        out += b"__REALTIME_TIMESTAMP=%d\n" % (first_time + n * 1_000_000)
        for key, value in entry.items():
            value = value if isinstance(value, bytes) else value.encode()
            if b"\n" in value or not value.isascii() or any(b < 32 for b in value):
                out += key.encode() + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"
            else:
                out += key.encode() + b"=" + value + b"\n"
        out += b"\n"
    return out


def write_journal(path, entries: list[dict], first_time: int = 1_700_000_000_000_000) -> None:
    subprocess.run([JOURNAL_REMOTE, "-o", str(path), "-"], input=export(entries, first_time), check=True,
                   capture_output=True, timeout=30)


def numbered(first: int, count: int, word: str = "entry") -> list[dict]:
    return [{"MESSAGE": f"{word} {i}", "SYSLOG_IDENTIFIER": "app", "_PID": str(i), "_HOSTNAME": "lab"}
            for i in range(first, first + count)]


def journalctl(directory, *args: str) -> bytes:
    return subprocess.run(["journalctl", "--directory", str(directory), "--no-pager", "--quiet", "--merge",
                           *args], check=True, capture_output=True, timeout=30).stdout


#: entries whose short lines take each path of journalctl's output_short
EDGE_CASES = [
    {"MESSAGE": "plain", "SYSLOG_IDENTIFIER": "app", "_PID": "41", "_HOSTNAME": "lab"},
    {"MESSAGE": "multi\nline\n\nend\n", "SYSLOG_IDENTIFIER": "app", "_PID": "42", "_HOSTNAME": "lab"},
    {"MESSAGE": "two\nlines", "_HOSTNAME": "lab"},  # "unknown" is not counted in the indent
    {"MESSAGE": "tab\there \x1b[1mbold\x1b[0m", "SYSLOG_IDENTIFIER": "app", "_HOSTNAME": "lab"},
    {"MESSAGE": "tab\there \x1b[1mbold\x1b[0m and \x1b[2Jclear", "SYSLOG_IDENTIFIER": "app", "_HOSTNAME": "lab"},
    {"MESSAGE": "esc \x1b alone", "_COMM": "cm", "SYSLOG_PID": "7", "_HOSTNAME": "lab"},
    {"MESSAGE": b"bad \xff utf8", "_HOSTNAME": "lab"},
    {"MESSAGE": "", "SYSLOG_IDENTIFIER": "e", "_HOSTNAME": "lab"},
    {"MESSAGE": "x" * 2000 + "\x01", "SYSLOG_IDENTIFIER": "big", "_HOSTNAME": "h" * 301},
    {"MESSAGE": "cr\r here", "SYSLOG_IDENTIFIER": "app"},
    {"SYSLOG_IDENTIFIER": "no message"},
    {"MESSAGE": "source time", "SYSLOG_IDENTIFIER": "app", "_SOURCE_REALTIME_TIMESTAMP": "1600000000000000"},
    {"MESSAGE": "üñí", "SYSLOG_IDENTIFIER": "äpp", "_PID": "x y"},
    {"MESSAGE": "c1 \u0085 char", "SYSLOG_IDENTIFIER": "app"},
]


@needs_journal
@pytest.mark.parametrize("tz", ["UTC", "America/New_York"])
def test_short_lines_are_what_journalctl_prints(tmp_path, tz):
    before = os.environ.get("TZ")
    os.environ["TZ"] = tz
    time.tzset()  # local time as journalctl sees it (a server reads TZ when it starts)
    try:
        check_short_lines(tmp_path)
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


def check_short_lines(tmp_path) -> None:
    write_journal(tmp_path / "a.journal", EDGE_CASES)
    printed = journalctl(tmp_path, "--output", "short").splitlines()
    ours = []
    for raw in journalctl(tmp_path, "--output", "json", "--all").splitlines():
        ours += decode_entry(raw, 0)[1]
    assert ours == printed


#: entries where journalctl 252 does more than the cases above show: carriage
#: returns at a line's end are dropped, not a reason for a blob; a source time
#: is read as strtoull reads it and must be below 2^55 microseconds
CARRIAGE_RETURNS_AND_ODD_TIMES = [
    {"MESSAGE": "crlf\r\nline\r\n", "SYSLOG_IDENTIFIER": "app"},
    {"MESSAGE": "ends with cr\r\r", "SYSLOG_IDENTIFIER": "app"},
    {"MESSAGE": "\r", "SYSLOG_IDENTIFIER": "app"},
    {"MESSAGE": "cr then colour\x1b[1m\r", "SYSLOG_IDENTIFIER": "app"},
    {"MESSAGE": "cr before colour\r\x1b[1m", "SYSLOG_IDENTIFIER": "app"},
    {"MESSAGE": "cr\r inside", "SYSLOG_IDENTIFIER": "app"},
    {"MESSAGE": "far future", "SYSLOG_IDENTIFIER": "app", "_SOURCE_REALTIME_TIMESTAMP": "253402214399999999"},
    {"MESSAGE": "just below 2^55", "SYSLOG_IDENTIFIER": "app", "_SOURCE_REALTIME_TIMESTAMP": str((1 << 55) - 1)},
    {"MESSAGE": "2^55", "SYSLOG_IDENTIFIER": "app", "_SOURCE_REALTIME_TIMESTAMP": str(1 << 55)},
    {"MESSAGE": "hex", "SYSLOG_IDENTIFIER": "app", "_SOURCE_REALTIME_TIMESTAMP": "0x5af3107a4000"},
    {"MESSAGE": "plus", "SYSLOG_IDENTIFIER": "app", "_SOURCE_REALTIME_TIMESTAMP": "+1600000000000000"},
    {"MESSAGE": "blank", "SYSLOG_IDENTIFIER": "app", "_SOURCE_REALTIME_TIMESTAMP": " 1600000000000000"},
    {"MESSAGE": "blank after", "SYSLOG_IDENTIFIER": "app", "_SOURCE_REALTIME_TIMESTAMP": "1600000000000000 "},
    {"MESSAGE": "octal", "SYSLOG_IDENTIFIER": "app", "_SOURCE_REALTIME_TIMESTAMP": "0100000000"},
    {"MESSAGE": "minus", "SYSLOG_IDENTIFIER": "app", "_SOURCE_REALTIME_TIMESTAMP": "-1"},
]


@needs_journal
def test_short_lines_of_carriage_returns_and_odd_times_are_what_journalctl_prints(tmp_path):
    write_journal(tmp_path / "a.journal", CARRIAGE_RETURNS_AND_ODD_TIMES)
    printed = journalctl(tmp_path, "--output", "short").split(b"\n")[:-1]  # a \r is no line end here
    ours = []
    for raw in journalctl(tmp_path, "--output", "json", "--all").splitlines():
        ours += decode_entry(raw, 0)[1]
    assert ours == printed


@pytest.mark.parametrize("message, stripped", [
    (b"plain", b"plain"),
    (b"a\tb", b"a        b"),
    (b"\x1b[1;31mred\x1b[0m", b"red"),
    (b"\x1b[2Jclear", b"\x1b[2Jclear"),          # not a colour: stays
    (b"\x1b]8;;http://x\x07link", b"link"),      # OSC to BEL
    (b"end \x1b", b"end \x1b"),
    (b"\x1bX", b"\x1bX"),
    (b"a\r\nb\r", b"a\nb"),                  # a CR before a newline or at the end goes
    (b"a\r\rb", b"a\r\rb"),
    (b"a\r\t", b"a\r        "),
])
def test_strip_tab_ansi(message, stripped):
    assert strip_tab_ansi(message) == stripped


@pytest.mark.parametrize("size, text", [
    (0, b"0B"), (1023, b"1023B"), (1024, b"1.0K"), (2001, b"1.9K"), (1536, b"1.5K"),
    (1024 * 1024, b"1.0M"), (5 * 1024 ** 3 + 1024 ** 3 // 2, b"5.5G"),
])
def test_format_bytes_is_systemds(size, text):
    assert format_bytes(size) == text


@pytest.mark.parametrize("raw, cut, cursor, lines", [
    (b'{"__CURSOR":"s=1;i=2","MESSAGE":"m","__REALTIME_TIMESTAMP":"0"}', 0, "s=1;i=2", [b" unknown: m"]),  # no time, no name
    (b'{"__CURSOR":"s=1;i=3"}', 0, "s=1;i=3", []),                    # no MESSAGE: not shown
    (b'{"__CURSOR":"s=1;i=4","MESSAGE":"' + b"y" * 100, 70000, "s=1;i=4",
     [b"[70133 bytes of journal entry not shown]"]),
    (b"not json", 0, None, [b"not json"]),
])
def test_decode_entry(raw, cut, cursor, lines):
    assert decode_entry(raw, cut) == (cursor, lines)


def test_short_lines_of_a_message_given_twice_shows_the_last():
    entry = {"MESSAGE": ["first", "second"], "SYSLOG_IDENTIFIER": "app", "__REALTIME_TIMESTAMP": "0"}
    assert short_lines(entry)[0].endswith(b"app: second")


# --- through a real gcmd ------------------------------------------------------------

def json_client(server, timeout: float = 10.0):
    """A client of the gcmd process ``server`` that asked for JSON lines (``format json``)."""
    client = server.client(timeout=timeout)
    assert client.ask("format json") == b"OK\n"
    return client


def ask_json(client, request: str) -> list[dict]:
    client.send(request + "\n")
    block = b"".join(client.block(b"End lastlog\n"))
    return [json.loads(line) for line in block.splitlines()[1:-1]]


def follow_lines(client, count: int) -> list[dict]:
    return [json.loads(client.line()) for _ in range(count)]


@pytest.fixture
def journal_dir(tmp_path):
    directory = tmp_path / "journal"
    directory.mkdir()
    return directory


@needs_journal
def test_a_real_server_serves_the_journal_as_journalctl_prints_it(gcmd, journal_dir):
    write_journal(journal_dir / "a.journal", EDGE_CASES)
    server = gcmd("--logfile", f"journal:{journal_dir}")
    printed = journalctl(journal_dir, "--output", "short").splitlines()
    client = server.client()
    client.send(f"lastlog {len(printed)} journal\n")
    block = b"".join(client.block(b"End lastlog\n"))
    assert block.splitlines()[1:-1] == printed


@needs_journal
def test_journal_lines_in_json_carry_journalds_cursor(gcmd, journal_dir):
    write_journal(journal_dir / "a.journal", numbered(0, 5))
    server = gcmd("--logfile", f"journal:{journal_dir}")
    client = json_client(server)
    objects = ask_json(client, "lastlog 3 journal")
    assert [o["line"].rsplit(" ", 1)[1] for o in objects] == ["2", "3", "4"]
    journald = [json.loads(line)["__CURSOR"] for line in journalctl(journal_dir, "-o", "json").splitlines()]
    assert [o["cursor"] for o in objects] == [f"j1:journal:{c}" for c in journald[2:]]


@needs_journal
def test_follow_from_a_kept_cursor_sends_every_entry_after_it_then_the_live_ones_once(gcmd, journal_dir):
    write_journal(journal_dir / "a.journal", numbered(0, 20))
    server = gcmd("--logfile", f"journal:{journal_dir}")
    client = json_client(server)
    cursor = ask_json(client, "lastlog 20 journal")[9]["cursor"]  # entry 9
    assert client.ask(f"follow journal from {cursor}") == BEGIN_FOLLOW
    got = follow_lines(client, 10)
    assert [o["line"].rsplit(" ", 1)[1] for o in got] == [str(i) for i in range(10, 20)]
    write_journal(journal_dir / "b.journal", numbered(20, 3), 1_700_001_000_000_000)
    got = follow_lines(client, 3)
    assert [o["line"].rsplit(" ", 1)[1] for o in got] == ["20", "21", "22"]
    assert all(o["cursor"].startswith("j1:journal:s=") for o in got)


@needs_journal
def test_follow_from_a_cursor_older_than_the_kept_lines_reads_the_journal_from_it(gcmd, journal_dir):
    write_journal(journal_dir / "a.journal", numbered(0, 1500))
    journald = json.loads(journalctl(journal_dir, "-o", "json").splitlines()[99])["__CURSOR"]  # entry 99
    server = gcmd("--logfile", f"journal:{journal_dir}")
    client = json_client(server)
    assert client.ask(f"follow journal from j1:journal:{journald}") == BEGIN_FOLLOW
    got = follow_lines(client, 1400)
    assert [int(o["line"].rsplit(" ", 1)[1]) for o in got] == list(range(100, 1500))
    write_journal(journal_dir / "b.journal", numbered(1500, 2), 1_700_010_000_000_000)
    got = follow_lines(client, 2)
    assert [o["line"].rsplit(" ", 1)[1] for o in got] == ["1500", "1501"]  # none twice


@needs_journal
def test_a_cursor_survives_a_restart_of_gcmd_and_one_vacuumed_away_is_lost(gcmd, journal_dir):
    write_journal(journal_dir / "a.journal", numbered(0, 5))
    server = gcmd("--logfile", f"journal:{journal_dir}")
    client = json_client(server)
    cursor = ask_json(client, "lastlog 5 journal")[2]["cursor"]
    client.close()
    server.stop()
    write_journal(journal_dir / "b.journal", numbered(5, 2), 1_700_001_000_000_000)
    server = gcmd("--logfile", f"journal:{journal_dir}")
    client = json_client(server)
    assert client.ask(f"follow journal from {cursor}") == BEGIN_FOLLOW
    assert [o["line"].rsplit(" ", 1)[1] for o in follow_lines(client, 4)] == ["3", "4", "5", "6"]
    client.close()
    server.stop()
    (journal_dir / "a.journal").unlink()  # as journald's vacuum does with the oldest file
    server = gcmd("--logfile", f"journal:{journal_dir}")
    client = server.client()
    assert client.ask(f"follow journal from {cursor}") == BEGIN_FOLLOW
    assert client.line() == b"== cursor lost: journal ==\n"
    assert client.line().endswith(b"entry 5\n")  # the oldest entry the journal still holds
    assert client.line().endswith(b"entry 6\n")


@needs_journal
def test_a_cursor_of_another_log_is_a_bad_cursor(gcmd, journal_dir):
    write_journal(journal_dir / "a.journal", numbered(0, 3))
    server = gcmd("--logfile", f"journal:{journal_dir}")
    client = json_client(server)
    cursor = ask_json(client, "lastlog 1 journal")[0]["cursor"]
    other = cursor.replace("j1:journal:", "j1:syslog:")
    assert client.ask(f"follow journal from {other}") == b"An error occured : bad cursor\n"
    syslog_cursor = ask_json(client, "lastlog 1 syslog")[0]["cursor"]
    assert client.ask(f"follow journal from {syslog_cursor.replace(':syslog:', ':journal:')}") == (
        b"An error occured : bad cursor\n")


def reader_pids() -> list[int]:
    """Live children of this test process (a JournalLog's reader is one)."""
    pid = os.getpid()
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


@needs_journal
def test_a_restarted_journal_reader_goes_on_after_its_last_entry_and_loses_none(journal_dir):
    write_journal(journal_dir / "a.journal", numbered(0, 3))
    log = JournalLog(f"journal:{journal_dir}", 5.0)
    got: list[bytes] = []
    try:
        log.start()
        log.subscribe(got.extend)
        [pid] = reader_pids()
        os.kill(pid, 9)
        write_journal(journal_dir / "b.journal", numbered(3, 2), 1_700_001_000_000_000)  # while it is down
        poll(lambda: log.stats.reader_restarts >= 1, 15, "the reader was not started again")
        write_journal(journal_dir / "c.journal", numbered(5, 1), 1_700_002_000_000_000)
        poll(lambda: any(line.endswith(b"entry 5") for line in got), 10, f"entry 5 never came: {got!r}")
        assert [line.rsplit(b" ", 1)[1] for line in got] == [b"3", b"4", b"5"]  # none lost, none twice
    finally:
        log.close()


@needs_journal
def test_an_entry_with_a_time_of_thousands_of_digits_does_not_stop_the_reader(journal_dir):
    write_journal(journal_dir / "a.journal", [
        {"MESSAGE": "odd time", "SYSLOG_IDENTIFIER": "app", "_SOURCE_REALTIME_TIMESTAMP": "1" * 5000},
        *numbered(1, 1)])
    log = JournalLog(f"journal:{journal_dir}", 5.0)
    got: list[bytes] = []
    try:
        log.start()
        assert [line.split(b" ", 3)[3] for line in log.lastlog(5)] == [b"app: odd time", b"lab app[1]: entry 1"]
        log.subscribe(got.extend)
        write_journal(journal_dir / "b.journal", numbered(2, 1), 1_700_001_000_000_000)
        poll(lambda: got, 10, "the reader read no new entry")
        assert got[0].endswith(b"entry 2")
    finally:
        log.close()


def entry_numbers(lines: list[bytes]) -> list[int]:
    """The N of each ``entry N`` line of a feed's JSON lines."""
    return [int(json.loads(line)["line"].rsplit(" ", 1)[1]) for line in lines]


@needs_journal
def test_a_resume_while_the_reader_lags_sends_each_entry_once(journal_dir):
    write_journal(journal_dir / "a.journal", numbered(0, 1500))
    journald = json.loads(journalctl(journal_dir, "-o", "json").splitlines()[99])["__CURSOR"]  # entry 99
    log = JournalLog(f"journal:{journal_dir}", 10.0)
    got: list[bytes] = []
    try:
        log.start()
        log.lastlog(1)
        [reader] = reader_pids()
        os.kill(reader, signal.SIGSTOP)  # a reader behind: it has not read what is written now
        try:
            # journal-remote writes another file: entries of another seqnum ID, as from another machine
            write_journal(journal_dir / "b.journal", numbered(1500, 3), 1_700_010_000_000_000)
            feed = Feed([("journal", log)], format="json",
                        cursors={"journal": parse_cursor(f"j1:journal:{journald}".encode())})
            feed.subscribe(got.extend)
        finally:
            os.kill(reader, signal.SIGCONT)
        poll(lambda: any(line.endswith(b"entry 1502") for line in log.recent.numbered()[0]), 10,
             "the reader did not catch up")
        write_journal(journal_dir / "c.journal", numbered(1503, 1), 1_700_020_000_000_000)
        poll(lambda: got and got[-1].endswith(b'entry 1503"}'), 10, f"entry 1503 never came: {got[-3:]!r}")
        assert entry_numbers(feed.backlog) == list(range(100, 1503))
        assert entry_numbers(got) == [1503]  # none of the resumed ones again
    finally:
        log.close()


@needs_journal
def test_a_reader_that_died_in_the_middle_of_an_entry_goes_on_with_that_entry_whole(journal_dir, tmp_path,
                                                                                    monkeypatch):
    write_journal(journal_dir / "a.journal", numbered(0, 5))
    printed = journalctl(journal_dir, "-o", "json", "--all").splitlines()
    # a journalctl that prints its backlog, stops in the middle of entry 2 (killed,
    # crashed) and exits; the next one is the real journalctl
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "journalctl"
    script.write_text(f"""#!/bin/sh
case " $* " in *" --follow "*) ;; *) exec {shutil.which("journalctl")} "$@" ;; esac
if [ ! -e {tmp_path}/died ]; then
    : > {tmp_path}/died
    for a; do shift; [ "$a" = --follow ] || set -- "$@" "$a"; done
    {shutil.which("journalctl")} "$@" | head -c {len(printed[0]) + len(printed[1]) + 2 + 40}
    exit 1
fi
exec {shutil.which("journalctl")} "$@"
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    log = JournalLog(f"journal:{journal_dir}", 5.0)
    try:
        log.start()
        poll(lambda: log.stats.reader_restarts >= 1, 15, "the reader was not started again")
        poll(lambda: len(log.recent) >= 5, 10, f"the entries after the restart never came: {log.recent.numbered()}")
        assert [line.rsplit(b" ", 2)[1:] for line in log.lastlog(10)] == [
            [b"entry", str(i).encode()] for i in range(5)]
    finally:
        log.close()


@needs_journal
def test_a_follow_resumed_after_the_first_line_of_an_entry_of_three_gets_the_other_two(journal_dir):
    write_journal(journal_dir / "a.journal", [
        {"MESSAGE": "first\nsecond\nthird", "SYSLOG_IDENTIFIER": "app", "_HOSTNAME": "lab"}, *numbered(1, 1)])
    log = JournalLog(f"journal:{journal_dir}", 5.0)
    try:
        log.start()
        kept = [json.loads(line) for line in log.query(4, None, Shape(JSON, "journal"))]
        assert [o["line"].strip().rsplit(" ", 1)[-1] for o in kept] == ["first", "second", "third", "1"]
        feed = Feed([("journal", log)], format="json", cursors={"journal": parse_cursor(kept[0]["cursor"].encode())})
        feed.subscribe(lambda lines: None)
        assert [json.loads(line)["line"].strip().rsplit(" ", 1)[-1] for line in feed.backlog] == [
            "second", "third", "1"]
    finally:
        log.close()


@needs_journal
def test_a_follow_resumed_inside_an_entry_older_than_the_kept_lines_gets_the_rest_of_it(gcmd, journal_dir):
    entries = [{"MESSAGE": "first\nsecond\nthird", "SYSLOG_IDENTIFIER": "app", "_HOSTNAME": "lab"},
               *numbered(1, 1200)]
    write_journal(journal_dir / "a.journal", entries)
    journald = json.loads(journalctl(journal_dir, "-o", "json").splitlines()[0])["__CURSOR"]
    server = gcmd("--logfile", f"journal:{journal_dir}")
    client = json_client(server)
    # the cursor of "second", the entry being older than the 1000 lines kept: journalctl --cursor reads it
    assert client.ask(f"follow journal from j1:journal:{journald}:1") == BEGIN_FOLLOW
    got = follow_lines(client, 3)
    assert [o["line"].strip().rsplit(" ", 1)[-1] for o in got] == ["third", "1", "2"]
    assert got[0]["cursor"] == f"j1:journal:{journald}"  # the entry's last line: journald's cursor alone


@needs_journal
def test_a_journal_that_never_goes_quiet_is_ready_once_its_backlog_is_read(journal_dir, tmp_path, monkeypatch):
    write_journal(journal_dir / "a.journal", numbered(0, 5))
    # a journalctl whose follow prints the backlog, then a new entry every 20 ms
    # for ever: its output never pauses long enough to tell the backlog's end
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "journalctl"
    script.write_text(f"""#!/bin/sh
case " $* " in *" --follow "*) ;; *) exec {shutil.which("journalctl")} "$@" ;; esac
for a; do shift; [ "$a" = --follow ] || set -- "$@" "$a"; done
{shutil.which("journalctl")} "$@"
exec {sys.executable} -c '
import json, time
for n in range(10**6):
    print(json.dumps({{"__CURSOR": "s=1;i=%x" % n, "__REALTIME_TIMESTAMP": "1800000000000000",
                      "MESSAGE": "busy %d" % n}}), flush=True)
    time.sleep(0.02)'
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    log = JournalLog(f"journal:{journal_dir}", 5.0)
    try:
        log.start()
        lines = log.lastlog(5)  # before: "lastlog timed out after 5 s"
        assert lines[0].endswith(b"entry 0") or b"busy" in lines[-1]
        assert any(line.endswith(b"entry 4") for line in lines)
    finally:
        log.close()


def journalctl_noting_reads(tmp_path, monkeypatch) -> Path:
    """Put on PATH a journalctl that writes ``start`` and ``end`` to the file it returns around
    each ``--cursor`` read (held 0.3 s, so that reads overlap), and is the real one otherwise."""
    bin_dir, noted = tmp_path / "bin", tmp_path / "reads"
    bin_dir.mkdir()
    noted.touch()
    script = bin_dir / "journalctl"
    script.write_text(f"""#!/bin/sh
case " $* " in *" --cursor "*) ;; *) exec {shutil.which("journalctl")} "$@" ;; esac
echo start >> {noted}
sleep 0.3
{shutil.which("journalctl")} "$@"
status=$?
echo end >> {noted}
exit $status
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return noted


def resumed_together(server, cursors: list[str]) -> list[list[int]]:
    """Clients that send ``follow journal from CURSOR`` at once: the entry numbers each gets
    until entry 1499."""
    clients = [json_client(server, timeout=30) for _ in cursors]
    for client, cursor in zip(clients, cursors):
        client.send(f"follow journal from {cursor}\n")
    got = []
    for client in clients:
        assert client.line() == BEGIN_FOLLOW
        numbers = [int(json.loads(client.line())["line"].rsplit(" ", 1)[1])]
        while numbers[-1] != 1499:
            numbers.append(int(json.loads(client.line())["line"].rsplit(" ", 1)[1]))
        got.append(numbers)
    return got


@needs_journal
def test_resumes_of_one_old_cursor_at_once_share_one_journalctl_read(gcmd, journal_dir, tmp_path, monkeypatch):
    write_journal(journal_dir / "a.journal", numbered(0, 1500))
    journald = json.loads(journalctl(journal_dir, "-o", "json").splitlines()[99])["__CURSOR"]  # not kept
    noted = journalctl_noting_reads(tmp_path, monkeypatch)
    server = gcmd("--logfile", f"journal:{journal_dir}")
    got = resumed_together(server, [f"j1:journal:{journald}"] * 8)
    assert got == [list(range(100, 1500))] * 8  # each missed line once
    # the first read, and the next one shared by those that came while it ran
    assert 1 <= noted.read_text().split().count("start") <= 2


@needs_journal
def test_resumes_of_many_old_cursors_run_at_most_four_journalctl_reads_at_once(gcmd, journal_dir, tmp_path,
                                                                              monkeypatch):
    write_journal(journal_dir / "a.journal", numbered(0, 1500))
    printed = journalctl(journal_dir, "-o", "json").splitlines()
    noted = journalctl_noting_reads(tmp_path, monkeypatch)
    server = gcmd("--logfile", f"journal:{journal_dir}")
    first = range(90, 100)
    cursors = [f"j1:journal:{json.loads(printed[n])['__CURSOR']}" for n in first]
    assert resumed_together(server, cursors) == [list(range(n + 1, 1500)) for n in first]
    running, most = 0, 0
    for event in noted.read_text().split():
        running += 1 if event == "start" else -1
        most = max(most, running)
    assert noted.read_text().split().count("start") == 10
    assert 1 < most <= HISTORY_READS  # they overlap, and no more than that many run
