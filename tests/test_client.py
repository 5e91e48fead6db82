"""gcmd.client against real ``python -m gcmd`` processes: every command, errors
as exceptions, and a follow that resumes across a reset and a restart."""

import hashlib
import json
import os
import queue
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support import LOG_LINES, sha1_of, wait_for

from gcmd import __version__
from gcmd.client import (
    AuthenticationError,
    Client,
    CommandError,
    ConnectionLost,
    CursorLost,
    LogLine,
    Note,
    PermissionDenied,
    ProtocolError,
    Refused,
    Timeout,
    Unreachable,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server(gcmd):
    process = gcmd()
    (process.root / "f.txt").write_bytes(b"gcmd client\n")
    return process


def test_every_command_through_the_library(server):
    with Client("127.0.0.1", server.port) as client:
        assert client.ping() == "pong"
        version = client.version()
        assert (version.gcmd, version.protocol) == (__version__, (1, 2))
        assert str(version) == f"gcmd {__version__} protocol 1.2"
        assert client.server_version.protocol == (1, 2)
        assert client.whoami() == "anonymous"
        assert client.logs() == {"syslog": str(server.logfile), "gcmd": "memory"}
        lines = client.lastlog(3)
        assert [line.text for line in lines] == LOG_LINES[-3:]
        assert all(line.log == "syslog" and line.cursor and line.cut == 0 for line in lines)
        assert [line.text for line in client.lastlog(5, logs="syslog", grep="app\\[1[0-9]\\]")] == LOG_LINES[10:20][-5:]
        assert client.comphash("f.txt") == sha1_of(server.root / "f.txt")
        assert client.hash("sha256", server.root / "f.txt") == sha1_of(server.root / "f.txt", "sha256")
        stats = client.stats()
        assert stats["clients"] == 1 and isinstance(stats["uptime_s"], (int, float))
        assert all(isinstance(value, (int, float)) for value in stats.values())
        assert "ping - answer pong" in client.request("help")


def test_lastlog_of_several_logs_gives_each_logs_lines_with_bytes_as_written(gcmd, tmp_path):
    raw = b"bad \xff byte and \x1b[31m escape"
    (tmp_path / "app.log").write_bytes(b"first\n" + raw + b"\n")
    server = gcmd("--logfile", f"app={tmp_path / 'app.log'}")
    with Client("127.0.0.1", server.port) as client:
        lines = client.lastlog(2, logs=["syslog", "app"])
        assert [(line.log, line.data) for line in lines] == [
            ("syslog", LOG_LINES[-2].encode()), ("syslog", LOG_LINES[-1].encode()),
            ("app", b"first"), ("app", raw)]
        assert lines[-1].text == "bad \ufffd byte and \x1b[31m escape"


@pytest.mark.parametrize(("call", "error", "reply"), [
    (lambda c: c.comphash("nope"), CommandError, "An error occured : [Errno 2] No such file or directory: 'nope'"),
    (lambda c: c.comphash("../outside"), PermissionDenied,
     "An error occured : Permission denied: path is outside the served root"),
    (lambda c: c.comphash(""), CommandError, "Please provide a path."),
    (lambda c: c.hash("nosuch", "f.txt"), CommandError, "An error occured : unknown algorithm 'nosuch'"),
    (lambda c: c.lastlog(1, logs="nosuch"), CommandError, "An error occured : unknown log 'nosuch'"),
    (lambda c: c.lastlog(1001), CommandError, "Usage: lastlog [LINES] [LOGS] [grep PATTERN]"),
    (lambda c: c.lastlog(1, grep="("), CommandError, "An error occured : bad pattern"),
    (lambda c: c.request("nosuch"), CommandError, "Command not found."),
])
def test_an_error_reply_is_an_exception_and_the_connection_stays(server, call, error, reply):
    with Client("127.0.0.1", server.port) as client:
        held = client._sock
        with pytest.raises(error) as caught:
            call(client)
        assert caught.value.reply.startswith(reply)
        assert str(caught.value).startswith(f"127.0.0.1:{server.port}: {reply}")
        assert client.ping() == "pong" and client._sock is held


@pytest.mark.parametrize("request_", ["follow", "format text", "auth x", "exit", "quit", "ping\nping", ""])
def test_request_refuses_what_would_change_the_connection(server, request_):
    with Client("127.0.0.1", server.port) as client, pytest.raises(ValueError):
        client.request(request_)


def test_a_full_server_is_refused(gcmd):
    server = gcmd("--max-clients", 1)
    holder = server.client()
    assert holder.ask("ping") == b"pong\n"
    with pytest.raises(Refused) as caught:
        Client("127.0.0.1", server.port).connect()
    assert caught.value.reply == "Too many connections. bye !"


def test_nobody_listening_is_unreachable(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        with pytest.raises(Unreachable, match="refused"):
            Client("127.0.0.1", taken.getsockname()[1]).ping()


def test_a_server_that_never_answers_times_out_within_the_timeout():
    with socket.create_server(("127.0.0.1", 0)) as mute:  # the kernel accepts; nobody answers
        started = time.monotonic()
        with pytest.raises(Timeout):
            Client("127.0.0.1", mute.getsockname()[1], timeout=0.5).ping()
        assert time.monotonic() - started < 1.5


def serve_once(reply: bytes) -> int:
    """A one-connection server on a thread that answers every line ``reply`` (a 1.1 gcmd)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer():
        with listener, listener.accept()[0] as conn:
            while data := conn.recv(4096):
                conn.sendall(reply * data.count(b"\n"))

    threading.Thread(target=answer, daemon=True).start()
    return listener.getsockname()[1]


@pytest.mark.parametrize(("reply", "words"), [
    (b"Command not found.\n", "speaks protocol 1.1 or older"),
    (b"gcmd 0.9 protocol 1.1\n", "speaks protocol 1.1; gcmd.client needs 1.2"),
    (b"SSH-2.0-OpenSSH_9.2\n", "not a reply to version"),
])
def test_a_server_that_does_not_speak_1_2_is_a_protocol_error(reply, words):
    with pytest.raises(ProtocolError, match=words):
        Client("127.0.0.1", serve_once(reply), timeout=5).connect()


def test_a_token_authenticates_and_a_wrong_one_fails(gcmd, tmp_path):
    (tmp_path / "token").write_text("s3cret\n")
    server = gcmd("--token-file", tmp_path / "token")
    with Client("127.0.0.1", server.port, token="s3cret") as client:
        assert [line.text for line in client.lastlog(1)] == LOG_LINES[-1:]
    with pytest.raises(AuthenticationError) as caught:
        Client("127.0.0.1", server.port, token="wrong").connect()
    assert caught.value.reply == "Authentication failed. bye !"
    with Client("127.0.0.1", server.port) as client:  # no token: every command is refused
        assert client.connected  # version needs no token: the connection opens
        with pytest.raises(AuthenticationError, match="Authentication required."):
            client.lastlog(1)


def test_a_user_authenticates_and_is_held_to_its_grants(gcmd, tmp_path):
    config = tmp_path / "gcmd.toml"
    digest = hashlib.sha256(b"alice-77d2e0").hexdigest()
    config.write_text(f'[[user]]\nname = "alice"\ntoken_sha256 = "{digest}"\nlogs = ["syslog"]\n'
                      'commands = ["lastlog"]\n')
    server = gcmd("--config", config)
    with Client("127.0.0.1", server.port, user="alice", token="alice-77d2e0") as client:
        assert client.whoami() == "alice"
        assert len(client.lastlog(2)) == 2
        with pytest.raises(PermissionDenied, match="alice may not use stats"):
            client.stats()
    with pytest.raises(ValueError):
        Client("127.0.0.1", server.port, user="alice")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl (apt-get install openssl)")
def test_tls_with_a_ca_and_a_client_certificate(gcmd, tmp_path):
    import ssl

    from test_tls_clients import Pki, tls_args

    pki = Pki(tmp_path / "pki")
    config = tmp_path / "gcmd.toml"
    config.write_text('[[user]]\nname = "alice"\ncn = "alice"\nlogs = ["syslog"]\ncommands = ["lastlog"]\n')
    server = gcmd(*tls_args(pki, "--config", config, client_ca=pki.ca[0]))
    context = ssl.create_default_context(cafile=str(pki.server[0]))
    context.load_cert_chain(*map(str, pki.alice))
    with Client("127.0.0.1", server.port, ssl=context) as client:
        assert client.whoami() == "alice"
        assert [line.text for line in client.lastlog(1)] == LOG_LINES[-1:]
    with pytest.raises(Unreachable, match="TLS"):  # the system's CAs do not know this server
        Client("127.0.0.1", server.port, ssl=True).connect()


def test_a_connection_the_server_closed_since_the_last_reply_is_replaced(gcmd):
    server = gcmd("--idle-timeout", 1)
    with Client("127.0.0.1", server.port) as client:
        first = client._sock
        assert client.ping() == "pong"
        wait_for(lambda: first.recv(64, socket.MSG_PEEK) == b"Idle timeout. bye !\n", timeout=10)
        assert client.ping() == "pong"
        assert client._sock is not first


def test_follow_gives_the_backlog_then_new_lines_with_cursors(server):
    with Client("127.0.0.1", server.port) as client:
        stream = client.follow(lines=2)
        assert [next(stream).text for _ in range(2)] == LOG_LINES[-2:]
        with open(server.logfile, "a") as log:
            log.write("a new line\n")
        line = next(stream)
        assert (line.log, line.data) == ("syslog", b"a new line") and line.cursor
        stream.close()
        assert not client.connected
        assert client.ping() == "pong"  # the next request opens another connection


def test_follow_from_a_cursor_whose_line_is_gone_says_cursor_lost(server):
    with Client("127.0.0.1", server.port) as client:
        cursor = client.lastlog(1)[0].cursor
        replacement = server.logfile.with_suffix(".new")
        replacement.write_text("rotated 1\nrotated 2\n")
        os.replace(replacement, server.logfile)  # logrotate's create: another file at the path
        stream = client.follow(cursors={"syslog": cursor})
        assert next(stream) == CursorLost("cursor_lost", "syslog")
        assert [next(stream).text for _ in range(2)] == ["rotated 1", "rotated 2"]
        stream.close()


def test_follow_without_resume_raises_when_the_connection_drops(gcmd):
    server = gcmd()
    with Client("127.0.0.1", server.port) as client:
        stream = client.follow(lines=1, resume=False)
        next(stream)
        server.stop()
        with pytest.raises((ConnectionLost, Refused)):
            next(stream)


# --- a follow across a reset and a restart, while a writer appends -------------------------------

class Relay:
    """A TCP relay on 127.0.0.1 to ``target``, whose connections the test can
    reset (RST, as a middlebox that drops state or a peer that crashes would)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                upstream.settimeout(None)
            except OSError:  # the server is down: the client sees its connection closed
                downstream.close()
                continue
            with self.lock:
                self.pairs.append((downstream, upstream))
            threading.Thread(target=self._pipe, args=(downstream, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, downstream), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # reset: the other direction closes too

    def reset(self) -> None:
        """Reset every connection through the relay: the client gets a RST."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for downstream, upstream in pairs:
            downstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            for sock in (downstream, upstream):
                try:
                    sock.shutdown(socket.SHUT_RD)  # wakes the pipe blocked in recv on it
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self.listener.close()
        self.reset()


class Writer(threading.Thread):
    """Appends ``line N`` to a log, one write a line, about one a millisecond, until stopped."""

    def __init__(self, path, first: int) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.written = first
        self.stopped = threading.Event()

    def run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            while not self.stopped.wait(0.001):
                os.write(fd, b"line %d\n" % self.written)
                self.written += 1
        finally:
            os.close(fd)

    def stop(self) -> int:
        """Stop writing; the number of lines the log holds."""
        self.stopped.set()
        if self.ident is not None:
            self.join(5)
        return self.written


@pytest.mark.timeout(120)
def test_follow_yields_every_line_once_and_in_order_across_a_reset_and_a_restart(gcmd, tmp_path, caplog):
    logfile = tmp_path / "app.log"
    logfile.write_text("line 0\n")
    servers = [gcmd(logfile=logfile)]
    port = servers[0].port
    relay = Relay(port)
    writer = Writer(logfile, first=1)
    restarted = threading.Event()

    def restart() -> None:  # SIGTERM, then a new gcmd on the same port
        servers[0].stop()
        servers.append(gcmd(logfile=logfile, port=port))
        restarted.set()

    seen: list[int] = []
    total = None
    after_restart = None
    try:
        with Client("127.0.0.1", relay.port, timeout=5) as client:
            client.first_backoff = 0.05
            for item in client.follow(lines=1):
                assert isinstance(item, LogLine), item
                seen.append(int(item.text.split()[1]))
                if len(seen) == 1:
                    writer.start()
                elif len(seen) == 300:
                    relay.reset()
                elif len(seen) == 600:
                    threading.Thread(target=restart, daemon=True).start()
                if restarted.is_set() and after_restart is None:
                    after_restart = len(seen)
                if after_restart is not None and total is None and len(seen) >= after_restart + 300:
                    total = writer.stop()
                if total is not None and len(seen) >= total:
                    break
    finally:
        writer.stop()
        relay.close()
    assert len(servers) == 2
    assert seen == list(range(total))
    again = [record.getMessage() for record in caplog.records if "following again" in record.getMessage()]
    assert len(again) >= 2, again  # the reset, and the restart (and the refusals while it was down)


# --- the library in other programs --------------------------------------------------------------

def run_python(code: str, *args) -> str:
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_the_client_imports_neither_gevent_nor_the_server():
    out = run_python("import sys, gcmd.client; "
                     "print(*sorted(m for m in sys.modules if m.split('.')[0] in ('gevent', 'gcmd', 'ssl')))")
    loaded = out.split()
    assert "gcmd.client" in loaded
    others = [name for name in loaded if name not in ("gcmd", "gcmd.client") and not name.startswith("gcmd.client.")]
    assert others == []


COOPERATIVE = """
from gevent import monkey; monkey.patch_all()
import sys, gevent
from gcmd.client import Client
port = int(sys.argv[1])

def follower():  # waits in recv for a line that never comes: other greenlets run meanwhile
    for line in Client("127.0.0.1", port).follow():
        pass

def asker():
    with Client("127.0.0.1", port) as client:
        return sum(len(client.lastlog(5)) for _ in range(20))

waiting = gevent.spawn(follower)
askers = [gevent.spawn(asker) for _ in range(10)]
gevent.joinall(askers, raise_error=True, timeout=20)
print(sum(a.value for a in askers), waiting.dead)
"""


def test_under_gevents_monkey_patching_the_client_is_cooperative(server):
    assert run_python(COOPERATIVE, server.port).split() == ["1000", "False"]


def test_pydoc_reads_the_public_api():
    out = run_python("import pydoc, gcmd.client; print(pydoc.render_doc(gcmd.client, renderer=pydoc.plaintext))")
    for words in ("class Client", "follow(self, lines", "class GcmdError", "class CursorLost",
                  "seconds to connect", "class LogLine"):
        assert words in out


@pytest.mark.parametrize(("note", "text"), [
    (Note("dropped", lines=12), "== 12 lines dropped =="),
    (Note("left_out", lines=3), "== 3 older lines left out =="),
    (Note("searched", log="auth", bytes=64 << 20), "== searched the last 64 MiB only =="),
    (CursorLost("cursor_lost", "auth"), "== cursor lost: auth =="),
])
def test_a_note_reads_as_the_text_format_says_it(note, text):
    assert note.text == text


# --- the script of docs/client.md -----------------------------------------------------------------

@pytest.mark.timeout(90)
def test_the_script_of_the_docs_follows_a_log_across_restarts_of_gcmd_and_of_itself(gcmd, tmp_path):
    from test_clicmd import Lines, append

    page = (Path(__file__).resolve().parent.parent / "docs" / "client.md").read_text()
    script = re.search(r"```python\n(#!.*?)```", page, re.DOTALL).group(1)
    assert len(script.splitlines()) <= 13
    auth = tmp_path / "auth.log"
    auth.write_text("Nov 25 10:00:00 lab sshd[1]: an old line\n")
    server = gcmd("--logfile", f"auth={auth}")
    (tmp_path / "script.py").write_text(script.replace("9999", str(server.port)))

    def start_script():
        return subprocess.Popen([sys.executable, "script.py"], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)

    script_process = start_script()
    try:
        lines = Lines(script_process)
        for attempt in range(100):  # the follow begins once the script is up: the first line it shows
            append(auth, f"sshd[2]: probe {attempt}")
            try:
                first = lines.next(timeout=0.2)
                break
            except queue.Empty:
                pass
        expected = [first]
        append(auth, "cron[3]: not a line for this script")
        append(auth, "sshd[4]: before the restart")
        expected.append(lines.next())
        server.stop()
        append(auth, "sshd[5]: while gcmd is down")
        server = gcmd("--logfile", f"auth={auth}", port=server.port)
        append(auth, "sshd[6]: after the restart")
        expected += [lines.next(), lines.next()]
        assert expected[1:] == ["sshd[4]: before the restart\n", "sshd[5]: while gcmd is down\n",
                                "sshd[6]: after the restart\n"]
        # the script saves the cursor of the last line just after printing it: a file's cursor
        # names the offset of the line's newline (docs/log-queries.md, "Cursors")
        end = auth.stat().st_size - 1
        cursor_file = tmp_path / "auth.cursor"
        wait_for(lambda: cursor_file.exists()
                 and int(json.loads(cursor_file.read_text())["auth"].split(":")[4], 16) == end)
        script_process.terminate()
        script_process.wait(10)
        append(auth, "sshd[7]: while the script is down")
        script_process = start_script()
        assert Lines(script_process).next() == "sshd[7]: while the script is down\n"
    finally:
        script_process.kill()
        script_process.wait()
