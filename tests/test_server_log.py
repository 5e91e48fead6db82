"""The server log: the same lines as before by either way in, and an output that never stalls the hub."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import gevent
import gevent.socket
import gevent.ssl
import pytest
from gevent.threadpool import ThreadPool
from support import PONG, Client, free_port, make_certificate, poll, wait_for

from gcmd.config import Config
from gcmd.logs.memory import MemoryLog
from gcmd.net.server import GcmdServer
from gcmd.process.tlsfiles import tls_context
from gcmd.serverlog.formats import JsonFormatter, LineFormatter, TextFormatter
from gcmd.serverlog.output import LogOutput, line_chunks, write_whole_lines
from gcmd.serverlog.setup import (
    FLUSH_AFTER,
    LineHandler,
    line_run,
    reopen_output,
    setup_logging,
)

# --- the formatters of gcmd 1.1 and client_cn, the reference the lines are compared with ---

class OldText(logging.Formatter):
    def __init__(self, context: str = "-") -> None:
        super().__init__()
        self.context = context
        self._second = None
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S%z", time.localtime(second))
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname}: {message}"
        line = f"{self._stamp} [{getattr(record, 'context', self.context)}] {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class OldJson(logging.Formatter):
    def __init__(self, context: str = "-") -> None:
        super().__init__()
        self.context = context

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.created)),
            "level": record.levelname.lower(),
            "context": getattr(record, "context", self.context),
            "logger": record.name,
            "message": record.getMessage(),
        }
        client_cn = getattr(record, "client_cn", None)
        if client_cn is not None:
            event["client_cn"] = client_cn
        if record.exc_info:
            event["traceback"] = self.formatException(record.exc_info)
        return json.dumps(event)


def _failure():
    try:
        raise ValueError("bad \"value\"\n\x1b[31m")
    except ValueError:
        return sys.exc_info()


NOW = time.time()
#: (seconds from now, level, message, args, context or None, with a traceback[, client_cn])
RECORDS = [
    (0.0, logging.INFO, "Cmd received from %s : %s", ("127.0.0.1", "ping"), "Session,0,127.0.0.1", False),
    (0.1, logging.INFO, "Cmd received from %s : %s", ("::1", "auth ***"), "Session,w2:17,::1", False),
    (0.2, logging.INFO, "Cmd received from %s : %s", ("6.6.6.6", "forged\\x0d2011 [-] \\x1b[31mroot"),
     "Session,9,6.6.6.6", False),
    (1.0, logging.INFO, "Cmd received from %s : %s", ("127.0.0.1", 'hello "json" \\x5c é 日本 100%'),
     "Session,3,127.0.0.1", False),
    (1.5, logging.INFO, "Cmd received from %s : %s", ("127.0.0.1", ""), "Session,4,127.0.0.1", False),
    (-3600.0, logging.INFO, "gcmd %s listening on %s port %d", ("1.1", "127.0.0.1", 9), None, False),
    (2.0, logging.WARNING, "log file %s does not exist", ("/var/log/syslog",), None, False),
    (2.0, logging.ERROR, "internal error serving %s", ("127.0.0.1",), "Session,5,127.0.0.1", True),
    (3.0, logging.DEBUG, "settings: %s", ("token=***",), None, False),
    (3.0, logging.INFO, "two\nlines \t\\ tab", (), "Session,6,127.0.0.1", False),
    (86400.5, logging.CRITICAL, "100%% %s", ("done",), "-", False),
    (4.0, logging.INFO, "Cmd received from %s : %s", ("127.0.0.1", "ping"), "Session,7,127.0.0.1", False,
     "alice"),
    (4.0, logging.DEBUG, "Cmd received from %s : %s", ("127.0.0.1", "ping"), "Session,8,127.0.0.1", False,
     'CN "\u00e9\x1b'),
    (4.5, logging.DEBUG, "ping: %d bytes in, %d bytes out, %.3f ms", (5, 5, 0.01), "Session,8,127.0.0.1",
     False),
    (5.0, logging.WARNING, "Refused TLS connection from %s: %s", ("127.0.0.1", "no certificate"),
     "Session,9,127.0.0.1", False, "mallory"),
]


def records() -> list[logging.LogRecord]:
    made = []
    for offset, level, msg, args, context, failed, *client_cn in RECORDS:
        extra = None if context is None else {"context": context}
        if client_cn:
            extra["client_cn"] = client_cn[0]
        record = logging.getLogger("gcmd.net.client").makeRecord(
            "gcmd.net.client", level, __file__, 1, msg, args, _failure() if failed else None, extra=extra)
        record.created = NOW + offset
        made.append(record)
    return made


@pytest.mark.parametrize(("new", "old"), [(TextFormatter, OldText), (JsonFormatter, OldJson)])
@pytest.mark.parametrize("default_context", ["-", "w2"])
def test_formatters_write_the_lines_of_before_from_a_record_or_its_parts(new, old, default_context):
    mine, reference = new(default_context), old(default_context)
    for record in records():
        expected = reference.format(record)
        assert mine.format(record) == expected
        if record.exc_info is None and hasattr(record, "context"):
            client_cn = getattr(record, "client_cn", None)
            assert mine.line(record.created, record.levelno, record.levelname, record.name,
                             record.context, record.getMessage(), None, client_cn) == expected
            if record.levelno in (logging.DEBUG, logging.INFO):
                extra = {"context": record.context} | ({} if client_cn is None else {"client_cn": client_cn})
                # the lines of a LineRun: their start, and the rest of each
                message = record.getMessage()
                parts = [(record.created, record.levelno, "", [message], extra)] * 2
                assert mine.batch_lines(record.name, parts) == [expected] * 2
                head, tail = message[:len(message) // 2], message[len(message) // 2:]
                run = (record.created, record.levelno, head, [tail, tail, tail], extra)
                assert mine.batch_lines(record.name, [run]) == ["\n".join([expected] * 3)]
                assert LineFormatter.batch_lines(mine, record.name, [run]) == ["\n".join([expected] * 3)]


@pytest.mark.parametrize("formatter", [TextFormatter, JsonFormatter])
def test_a_batch_of_sessions_parts_in_turn_gives_each_line_as_made_alone(formatter):
    mine = formatter("-")
    alice = {"context": "Session,1,127.0.0.1", "client_cn": "alice"}
    other = {"context": "Session,2,127.0.0.1"}
    heard = "Cmd received from 127.0.0.1 : "
    parts = [(NOW, logging.INFO, heard, ["ping"], alice),
             (NOW, logging.INFO, heard, ["help", "stats"], other),
             (NOW + 0.5, logging.DEBUG, "ping: ", ["5 bytes in"], alice),  # the same extra, another start
             (NOW + 0.7, logging.INFO, heard, ["quit"], alice),
             (NOW + 0.8, logging.INFO, heard, ["ping", "ping"], other),
             (NOW + 1.2, logging.INFO, heard, ["ping"], alice)]  # the next second
    expected = ["\n".join(mine.line(created, level, logging.getLevelName(level), "gcmd.net.client", extra["context"],
                                    head + tail, None, extra.get("client_cn")) for tail in tails)
                for created, level, head, tails, extra in parts]
    assert mine.batch_lines("gcmd.net.client", parts) == expected


# --- both ways in reach every handler with the same line --------------------------------

@pytest.fixture
def log_tree(tmp_path):
    """Make a logger tree as gcmd's: an output (text) and a MemoryLog on ``gcmdtest``.

    Made by the test itself: pytest gives a logger that does not propagate
    its own handler when a test begins, and a LineRun would take the usual
    way to it (it is not a LineHandler).
    """
    tree = logging.getLogger("gcmdtest")
    outputs = []

    def make() -> tuple[logging.Logger, LogOutput, MemoryLog, Path]:
        output = LogOutput(open(tmp_path / "out.log", "a", encoding="utf-8"))  # noqa: SIM115 - closed below
        output.setFormatter(TextFormatter())
        memory = MemoryLog()
        memory.setFormatter(TextFormatter())
        tree.handlers[:] = [output, memory]
        tree.setLevel(logging.INFO)
        tree.propagate = False
        outputs.append(output)
        return tree, output, memory, tmp_path / "out.log"

    yield make
    tree.handlers[:] = []
    tree.propagate = True
    for output in outputs:
        output.close()
        output.stream.close()


STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d{4}"


def test_a_run_reaches_the_output_and_the_memory_log_with_the_line_of_a_record(log_tree):
    _, output, memory, path = log_tree()
    session = logging.getLogger("gcmdtest.session")
    context = {"context": "Session,1,127.0.0.1"}
    run = line_run(session, logging.INFO, "Cmd received from 127.0.0.1 : ", context)
    for request in ["ping", "auth ***", "hello \\x1b[2J é 100%s"]:
        run.add(request)
        session.info("Cmd received from %s : %s", "127.0.0.1", request, extra=context)
    session.warning("between")
    line_run(session, logging.INFO, "Cmd received from ::1 : ", context).add("stats")
    output.flush()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 8
    for fast, usual in zip(lines[0:6:2], lines[1:6:2]):
        assert re.fullmatch(STAMP + r" \[Session,1,127\.0\.0\.1\] Cmd received from 127\.0\.0\.1 : .*", fast)
        assert fast[25:] == usual[25:]  # the time stamps may be a second apart
    assert lines[6].endswith("[-] WARNING: between") and lines[7].endswith("from ::1 : stats")
    # the gcmd log holds the same lines, as wire lines
    assert memory.lastlog(8) == [line.encode() for line in lines]
    assert memory.stats.lines_read == 8


def test_runs_of_lines_keep_the_order_logged_with_the_lines_between_them(log_tree):
    _, output, memory, path = log_tree()
    session = logging.getLogger("gcmdtest.session")
    first, second = {"context": "Session,1,127.0.0.1"}, {"context": "Session,2,::1"}
    run = line_run(session, logging.INFO, "Cmd received from 127.0.0.1 : ", first)
    other = line_run(session, logging.INFO, "Cmd received from ::1 : ", second)
    assert line_run(session, logging.DEBUG, "not logged", first) is None
    run.add("a1")
    run.add("a2 \\x1b")
    assert run.tails == ["a1", "a2 \\x1b"]  # one part of the batch
    other.add("b1")
    run.add("a3")
    session.warning("between")
    run.add("a4")
    line_run(session, logging.INFO, "plain ", second).add("c1")
    run.add("a5")
    poll(lambda: not run.batch.lines)  # the batch goes out by itself, within milliseconds
    run.add("a6")
    output.flush()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [line[25:] for line in lines] == [
        "[Session,1,127.0.0.1] Cmd received from 127.0.0.1 : a1",
        "[Session,1,127.0.0.1] Cmd received from 127.0.0.1 : a2 \\x1b",
        "[Session,2,::1] Cmd received from ::1 : b1",
        "[Session,1,127.0.0.1] Cmd received from 127.0.0.1 : a3",
        "[-] WARNING: between",
        "[Session,1,127.0.0.1] Cmd received from 127.0.0.1 : a4",
        "[Session,2,::1] plain c1",
        "[Session,1,127.0.0.1] Cmd received from 127.0.0.1 : a5",
        "[Session,1,127.0.0.1] Cmd received from 127.0.0.1 : a6",
    ]
    assert memory.lastlog(9) == [line.encode() for line in lines]
    assert memory.stats.lines_read == 9


class Handed(LineHandler):
    """A handler that keeps each hand-over of lines (``emit_texts``) whole, and when it came
    (time.monotonic())."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(TextFormatter())
        self.handed: list[list[str]] = []
        self.at: list[float] = []

    def emit_texts(self, texts: list[str]) -> None:
        self.handed.append(list(texts))
        self.at.append(time.monotonic())


def test_every_batch_of_lines_waits_flush_after_not_only_the_first():
    # a libev timer started again once it has run fires at the next loop iteration
    # (gevent/gevent#1890): each batch's lines went out one or two at a time
    tree, handler = logging.getLogger("gcmdtest.batches"), Handed()
    tree.handlers[:], tree.propagate = [handler], False
    tree.setLevel(logging.INFO)
    run = line_run(tree, logging.INFO, "Cmd received from 127.0.0.1 : ", {"context": "Session,1,127.0.0.1"})
    other = line_run(tree, logging.INFO, "Cmd received from ::1 : ", {"context": "Session,2,::1"})
    try:
        for batch in range(4):
            started, before = time.monotonic(), len(handler.handed)
            for request in range(10):  # one line of each client an event-loop iteration, as a server logs them
                run.add(f"ping {batch}.{request}")
                other.add(f"ping {batch}.{request}")
                gevent.sleep(0.0002)  # sleep(0) would run no timer
            elapsed = time.monotonic() - started
            poll(lambda before=before: sum(map(len, handler.handed[before:])) == 20)
            # the first hand-over waited FLUSH_AFTER for more lines (a little less: the clock's grain)
            assert handler.at[before] - started >= FLUSH_AFTER * 0.9, (batch, handler.at[before] - started)
            assert len(handler.handed) - before <= 1 + elapsed / FLUSH_AFTER, (batch, elapsed)
    finally:
        tree.handlers[:], tree.propagate = [], True
    lines = [line for texts in handler.handed for text in texts for line in text.splitlines()]
    assert len(lines) == 80 and lines[-1].endswith("[Session,2,::1] Cmd received from ::1 : ping 3.9")


def test_a_run_of_lines_takes_the_usual_way_when_a_handler_cannot_take_lines(log_tree):
    tree, output, _, path = log_tree()
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    context = {"context": "Session,2,127.0.0.1"}
    run = line_run(logging.getLogger("gcmdtest.session"), logging.INFO, "Cmd received from 127.0.0.1 : ", context)
    run.add("before 100%")  # batched, then replayed as records
    assert run.tails == ["before 100%"]
    tree.addHandler(Keep())
    run.add("after %s")  # the same part: records when the batch goes out
    poll(lambda: len(seen) == 2)
    output.flush()
    assert seen == ["Cmd received from 127.0.0.1 : before 100%", "Cmd received from 127.0.0.1 : after %s"]
    assert [line[25:] for line in path.read_text().splitlines()] == [
        "[Session,2,127.0.0.1] Cmd received from 127.0.0.1 : before 100%",
        "[Session,2,127.0.0.1] Cmd received from 127.0.0.1 : after %s"]
    tree.removeHandler(tree.handlers[-1])


def test_lines_take_the_usual_way_when_a_handler_cannot_take_lines(log_tree):
    tree, output, memory, path = log_tree()
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    tree.addHandler(Keep())
    context = {"context": "Session,2,127.0.0.1"}
    line_run(logging.getLogger("gcmdtest.session"), logging.INFO, "Cmd received from 127.0.0.1 : ", context).add("ping")
    output.flush()
    assert [record.getMessage() for record in seen] == ["Cmd received from 127.0.0.1 : ping"]
    assert path.read_text().endswith("[Session,2,127.0.0.1] Cmd received from 127.0.0.1 : ping\n")
    assert memory.lastlog(1)[0].endswith(b"Cmd received from 127.0.0.1 : ping")
    tree.removeHandler(seen and tree.handlers[-1])
    output.addFilter(lambda record: "secret" not in record.getMessage())
    line_run(logging.getLogger("gcmdtest.session"), logging.INFO, "Cmd received from 127.0.0.1 : ", context).add(
        "secret")
    output.flush()
    assert "secret" not in path.read_text() and memory.lastlog(1)[0].endswith(b": secret")


def test_a_run_in_another_thread_takes_the_usual_way_to_the_same_handlers(log_tree):
    _, output, memory, path = log_tree()
    session = logging.getLogger("gcmdtest.session")
    context = {"context": "Session,3,127.0.0.1"}
    run = line_run(session, logging.INFO, "Cmd received from 127.0.0.1 : ", context)
    pool = ThreadPool(1)
    try:
        run.add("first")
        pool.spawn(lambda: line_run(session, logging.INFO, "Cmd received from 127.0.0.1 : ", context).add(
            "second")).get()
        run.add("third")
    finally:
        pool.kill()
    gevent.sleep(0)  # the other thread's line reaches the handlers through the hub
    output.flush()
    expected = [f"[Session,3,127.0.0.1] Cmd received from 127.0.0.1 : {word}" for word in ("first", "second", "third")]
    assert [line[25:] for line in path.read_text().splitlines()] == expected
    assert [line[25:].decode() for line in memory.lastlog(3)] == expected


def test_lines_of_the_hub_and_of_other_threads_are_written_in_the_order_logged(log_tree):
    tree, output, memory, path = log_tree()
    pool = ThreadPool(2)
    try:
        for i in range(50):
            tree.info("hub %d", i)
            pool.spawn(tree.info, "thread %d", i).get()
    finally:
        pool.kill()
    output.flush()
    expected = [f"{kind} {i}" for i in range(50) for kind in ("hub", "thread")]
    assert [line.split("] ", 1)[1] for line in path.read_text().splitlines()] == expected
    gevent.sleep(0)  # the other threads' lines reach the gcmd log through the hub
    assert [line.split(b"] ", 1)[1].decode() for line in memory.lastlog(100)] == expected


def test_reopen_writes_the_earlier_lines_to_the_old_file_and_closes_it(log_tree):
    tree, output, _, path = log_tree()
    for i in range(3):
        tree.info("before %d", i)
    old = output.stream
    path.rename(path.with_suffix(".1"))
    reopen_output(output, str(path))
    tree.info("after")
    output.flush()
    assert [line[25:] for line in path.with_suffix(".1").read_text().splitlines()] == [
        "[-] before 0", "[-] before 1", "[-] before 2"]
    assert path.read_text().endswith("[-] after\n") and old.closed


# --- a server's request lines by the fast way: --quiet-from and client certificates -------

class LoggedServer:
    """An in-process server logging as ``gcmd`` does (setup_logging: a LogOutput to a
    file, and the gcmd log), whose request lines are counted if they become records."""

    def __init__(self, tmp_path: Path, monkeypatch, level: str, fmt: str, ssl_context=None,
                 **settings) -> None:
        self.path = tmp_path / "gcmd.log"
        (tmp_path / "root").mkdir(exist_ok=True)
        self.output = setup_logging(level, fmt, open(self.path, "a", encoding="utf-8"))  # noqa: SIM115
        self.records: list[logging.LogRecord] = []
        make_record = logging.Logger.makeRecord

        def counted(logger, *args, **kw):
            record = make_record(logger, *args, **kw)
            if record.msg.startswith("Cmd received"):
                self.records.append(record)
            return record

        monkeypatch.setattr(logging.Logger, "makeRecord", counted)
        self.server = GcmdServer(Config(host="127.0.0.1", port=0, root=str(tmp_path / "root"),
                                        **settings), ssl_context)
        self.server.start()

    def client(self, source: str = "127.0.0.1", context=None) -> Client:
        sock = gevent.socket.socket(gevent.socket.AF_INET, gevent.socket.SOCK_STREAM)
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.server.port))
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname="localhost")
        return Client(self.server.port, sock=sock)

    def lines(self) -> list[str]:
        self.output.flush()
        return self.path.read_text(encoding="utf-8").splitlines()

    def stop(self) -> None:
        self.server.shutdown()
        self.output.close()
        self.output.stream.close()


@pytest.fixture
def logged_server(tmp_path, monkeypatch):
    logger = logging.getLogger("gcmd")
    saved = logger.handlers[:], logger.level, logger.propagate
    # setup_logging turns these off for the process
    switches = ("logThreads", "logProcesses", "logMultiprocessing", "_srcfile")
    saved_switches = {name: getattr(logging, name) for name in switches}
    servers: list[LoggedServer] = []

    def start(level: str, fmt: str = "text", ssl_context=None, **settings) -> LoggedServer:
        server = LoggedServer(tmp_path, monkeypatch, level, fmt, ssl_context, **settings)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    logger.handlers[:], level, logger.propagate = saved
    logger.setLevel(level)
    for name, value in saved_switches.items():
        setattr(logging, name, value)


def _ask_and_leave(client: Client, requests: list[str]) -> None:
    for request in requests:
        assert client.ask(request) == PONG
    client.send(b"exit\n")
    assert client.closed()


def _parts(line: str, fmt: str) -> tuple[str | None, str, str]:
    """(level, context, message) of a text or JSON line; a text line at INFO or DEBUG names no level."""
    if fmt == "json":
        event = json.loads(line)
        return event["level"], event["context"], event["message"]
    context, message = re.fullmatch(STAMP + r" \[([^]]*)\] (.*)", line).groups()
    return None, context, message


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("level", ["info", "debug"])
def test_a_quiet_from_clients_request_lines_are_at_debug_by_the_fast_way(logged_server, level, fmt):
    logged = logged_server(level, fmt, quiet_from=(ipaddress.ip_network("127.0.0.2/32"),))
    for _ in range(3):  # a load balancer's checks: connect, ping, close
        _ask_and_leave(logged.client("127.0.0.2"), ["ping"])
    _ask_and_leave(logged.client(), ["ping", "ping"])
    lines = [_parts(line, fmt) for line in logged.lines()]
    requests = [line for line in lines if line[2].startswith("Cmd received")]
    quiet = [line for line in requests if "from 127.0.0.2" in line[2]]
    info = "info" if fmt == "json" else None
    assert [line for line in requests if "from 127.0.0.1" in line[2]] == [
        (info, "Session,3,127.0.0.1", f"Cmd received from 127.0.0.1 : {request}") for request in ("ping", "ping", "exit")]
    if level == "info":
        assert quiet == [] and not any("127.0.0.2" in part for line in lines for part in line[1:])
    else:
        debug = "debug" if fmt == "json" else None
        assert quiet == [(debug, f"Session,{n},127.0.0.2", f"Cmd received from 127.0.0.2 : {request}")
                         for n in range(3) for request in ("ping", "exit")]
        # each request line comes before the debug line of its bytes and time, as logged
        traces = [i for i, line in enumerate(lines) if line[2].startswith("ping: 5 bytes in, 5 bytes out")]
        assert len(traces) == 5
        assert all(lines[i - 1][2].startswith("Cmd received") for i in traces)
    # the gcmd log (text) holds the request lines the output holds
    memory = [_parts(line.decode(), "text")[1:] for line in logged.server.memory_log.lastlog(1000)]
    assert [line for line in memory if line[1].startswith("Cmd received")] == [line[1:] for line in requests]
    assert logged.records == []  # none of them was a LogRecord


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_pipelined_requests_are_logged_one_line_each_in_order_by_the_fast_way(logged_server, fmt):
    logged = logged_server("info", fmt, token=b"hunter2")
    client = logged.client()
    requests = [b"ping", b"auth hunter2", b"ping\r", b"hello \x1b[31m\\ 100%s", b"ping", b"\xff\xfe", b"stats"] * 20
    client.send(b"".join(request + b"\n" for request in requests))
    client.send(b"exit\n")
    assert client.closed()
    shown = {b"auth hunter2": "auth ***", b"ping\r": "ping", b"hello \x1b[31m\\ 100%s": "hello \\x1b[31m\\x5c 100%s",
             b"\xff\xfe": "\\xff\\xfe"}
    expected = [f"Cmd received from 127.0.0.1 : {shown.get(request) or request.decode()}" for request in requests]
    lines = [_parts(line, fmt) for line in logged.lines()]
    requests_logged = [line for line in lines if line[2].startswith("Cmd received")]
    assert [message for _, _, message in requests_logged] == [*expected, "Cmd received from 127.0.0.1 : exit"]
    assert {context for _, context, _ in requests_logged} == {"Session,0,127.0.0.1"}
    assert "hunter2" not in logged.path.read_text()
    memory = [line.decode() for line in logged.server.memory_log.lastlog(1000)]
    assert [_parts(line, "text")[2] for line in memory if "Cmd received" in line] == [m for _, _, m in requests_logged]
    assert logged.records == []  # none of them was a LogRecord


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl (apt-get install openssl)")
def test_a_client_certificates_cn_is_on_its_json_request_lines_by_the_fast_way(logged_server, tmp_path):
    server_cert, server_key = make_certificate(tmp_path)
    alice = make_certificate(tmp_path, "alice", cn="alice")  # self-signed: its own CA
    settings = {"tls_cert": str(server_cert), "tls_key": str(server_key), "tls_client_ca": str(alice[0])}
    logged = logged_server("info", "json", tls_context(Config(host="127.0.0.1", port=0, **settings)),
                           **settings)
    def client_context(identity=None):  # it does not check the server: a test's certificate
        context = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = gevent.ssl.CERT_NONE
        if identity is not None:
            context.load_cert_chain(*identity)
        return context

    # a client that shows no certificate is refused in the handshake, logged without a CN
    with contextlib.suppress(OSError):
        logged.client(context=client_context()).ask("ping")
    context = client_context(alice)
    _ask_and_leave(logged.client(context=context), ["ping", "ping"])
    events = [json.loads(line) for line in logged.lines()]
    commands = [event for event in events if event["message"].startswith("Cmd received")]
    assert [event["message"][-4:] for event in commands] == ["ping", "ping", "exit"]
    for event in commands:
        assert event == {"time": event["time"], "level": "info", "context": event["context"],
                         "logger": "gcmd.net.client", "message": event["message"], "client_cn": "alice"}
        assert re.fullmatch(r"Session,\d+,127\.0\.0\.1", event["context"])
    connection = next(e for e in events if e["message"].startswith("Client connection from"))
    assert connection["client_cn"] == "alice" and connection["context"] == commands[0]["context"]
    assert all("client_cn" not in e for e in events if e["context"] == "-")
    assert any(e["message"].startswith("Refused TLS connection") and "client_cn" not in e for e in events)
    assert logged.records == []  # none of them was a LogRecord


@pytest.mark.parametrize(("data", "limit", "chunks"), [
    (b"", 4, []),
    (b"a\n", 4, [b"a\n"]),
    (b"ab\ncd\n", 4, [b"ab\n", b"cd\n"]),
    (b"ab\ncd\n", 6, [b"ab\ncd\n"]),
    (b"a\nb\nc\nd\n", 4, [b"a\nb\n", b"c\nd\n"]),
    (b"abcdefg\nx\n", 4, [b"abcdefg\n", b"x\n"]),  # a long line alone, whole
    (b"ab\ncdefgh\nij\n", 4, [b"ab\n", b"cdefgh\n", b"ij\n"]),
    (b"ab\ncdefgh", 4, [b"ab\n", b"cdefgh"]),
])
def test_shared_output_writes_whole_lines_of_at_most_pipe_buf(data, limit, chunks):
    assert list(line_chunks(data, limit)) == chunks


def test_shared_output_writes_a_pipe_in_whole_lines_and_counts_what_it_could_not(tmp_path):
    text = "".join(f"line {n} {'é' * 100}\n" for n in range(200))  # about 40 KiB, 2-byte characters
    read_end, write_end = os.pipe()
    got: list[bytes] = []

    def read_all() -> None:
        while chunk := os.read(read_end, 65536):
            got.append(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    with os.fdopen(write_end, "w", encoding="utf-8") as stream:
        assert write_whole_lines(stream, text) == (0, None)
    reader.join(10)
    os.close(read_end)
    assert b"".join(got).decode("utf-8") == text
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: every line is lost, and why is said
    with os.fdopen(write_end, "w", encoding="utf-8") as stream:
        lost, error = write_whole_lines(stream, text)
    assert lost == 200 and isinstance(error, BrokenPipeError)
    for encoding in ("utf-16", "utf-8"):  # a regular file: written as usual, whatever its encoding
        path = tmp_path / f"{encoding}.log"
        with open(path, "a", encoding=encoding) as stream:
            assert write_whole_lines(stream, text) == (0, None)
            assert write_whole_lines(stream, text) == (0, None)
        assert path.read_text(encoding=encoding) == text * 2


# --- an output that takes nothing ---------------------------------------------------------

def test_a_full_queue_drops_lines_counts_them_and_says_how_many_once_the_output_drains(tmp_path):
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    output = LogOutput(os.fdopen(write_end, "w", encoding="utf-8"), limit=100_000)
    output.setFormatter(TextFormatter())
    # on gcmd's logger, as gcmd installs it: the output logs how many it dropped there
    logger = logging.getLogger("gcmd")
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:] = [output]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        started = time.monotonic()
        for i in range(3000):  # 3000 lines of 1 KiB: the pipe takes 64 KiB, the queue 100 kB
            logger.info("%04d %s", i, "x" * 1000)
            if i % 100 == 0:
                gevent.sleep(0)
        assert time.monotonic() - started < 2  # nothing waited for the output
        dropped = output.dropped
        assert dropped > 2500
        # the reader comes back: what waited is written, and how many were dropped
        received = b""
        deadline = time.monotonic() + 10
        while sum(map(int, re.findall(rb"(\d+) log lines were dropped", received))) < dropped:
            assert time.monotonic() < deadline, received[-300:]
            try:
                received += os.read(read_end, 1 << 20)
            except BlockingIOError:
                gevent.sleep(0.01)
        lines = received.decode().splitlines()
        notices = [line for line in lines if "log lines were dropped" in line]
        assert all(re.search(r"\[-\] WARNING: \d+ log lines were dropped: the output took no line", notice)
                   for notice in notices)
        written = [int(line.split("] ")[1][:4]) for line in lines if line not in notices]
        assert written == sorted(written) and len(written) + dropped == 3000
        assert lines[-1] == notices[-1]  # once the output takes lines again
    finally:
        logger.handlers[:], level, logger.propagate = saved
        logger.setLevel(level)
        output.close()
        os.close(read_end)


def test_an_output_that_fails_counts_the_lost_lines(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # EPIPE from now on
    output = LogOutput(os.fdopen(write_end, "w", encoding="utf-8"))
    output.setFormatter(TextFormatter())
    logger = logging.getLogger("gcmdtest.broken")
    logger.handlers[:] = [output]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        for i in range(10):
            logger.info("line %d", i)
        output.flush()
        assert output.dropped == 10
    finally:
        logger.handlers[:] = []
        output.close()
        with contextlib.suppress(BrokenPipeError):
            output.stream.close()


# --- a gcmd whose standard output nobody reads ---------------------------------------------

def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def stats_of(client: Client) -> dict[str, str]:
    client.send(b"stats\n")
    return dict(line.decode().strip().split(" ", 1) for line in client.block(b"End stats\n")[1:-1])


def flood(port: int, requests: int, size: int) -> None:
    """``requests`` unknown commands of ``size`` bytes, pipelined, each logged."""
    client = Client(port, 30)
    try:
        line = b"x" * size + b"\n"
        for _ in range(requests // 100):
            client.send(line * 100)
            for _ in range(100):
                assert client.line() == b"Command not found.\n"
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_gcmd_whose_stdout_nobody_reads_serves_on_in_bounded_memory_and_reports_the_drops(tmp_path):
    port, metrics_port = free_port(), free_port()
    (tmp_path / "root").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcmd", "--port", str(port), "--root", str(tmp_path / "root"),
         "--logfile", "memory", "--metrics-port", str(metrics_port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=tmp_path)
    try:
        wait_for(lambda: _answers(port), timeout=15, message="gcmd did not answer")
        rss_before = rss_kib(proc.pid)
        flood(port, 2000, 8000)  # 16 MB of log lines: the pipe and the queue are full
        probe = Client(port, 10)
        pings = []
        for _ in range(300):
            started = time.monotonic()
            assert probe.ask(b"ping") == b"pong\n"
            pings.append(time.monotonic() - started)
        assert sorted(pings)[int(len(pings) * 0.99)] < 0.1, "a blocked log output stalled ping"
        flood(port, 2000, 8000)
        grown = rss_kib(proc.pid) - rss_before
        assert grown < 64 * 1024, f"the server grew {grown} KiB"
        figures = stats_of(probe)
        dropped = int(figures["log_output_dropped"])
        assert dropped > 3000 and int(figures["log.gcmd.lines_read"]) > 4300
        # the collector comes back
        received: list[str] = []
        reader = threading.Thread(target=lambda: received.extend(line.decode() for line in proc.stdout))
        reader.start()
        wait_for(lambda: any("log lines were dropped" in line for line in received), timeout=20)
        reported = sum(int(m[1]) for line in received if (m := re.search(r"(\d+) log lines were dropped", line)))
        assert reported == int(stats_of(probe)["log_output_dropped"]) >= dropped
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as page:
            assert f"gcmd_log_output_dropped_total {reported}.0" in page.read().decode()
        probe.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        reader.join(10)
        assert received[-1].endswith("Server stopped\n")  # shutdown writes what waited
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_stuck_output_delays_shutdown_by_one_flush_timeout_at_most(tmp_path):
    port = free_port()
    (tmp_path / "root").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcmd", "--port", str(port), "--root", str(tmp_path / "root"),
         "--logfile", "memory"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=tmp_path)
    try:
        wait_for(lambda: _answers(port), timeout=15, message="gcmd did not answer")
        flood(port, 2000, 8000)  # the pipe is full: nobody reads it
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        # each flush of shutdown would wait FLUSH_TIMEOUT (5 s) for the stuck output
        assert time.monotonic() - started < 9, "shutdown waited for the stuck output more than once"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _answers(port: int) -> bool:
    try:
        probe = Client(port, 2)
    except OSError:
        return False
    try:
        return probe.ask(b"ping") == b"pong\n"
    finally:
        probe.close()
