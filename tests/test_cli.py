"""The gcmd command itself: flags, bad settings, start-up, the server log."""

import errno
import json
import re
import socket
import subprocess
import sys
import urllib.request

import gevent
import pytest
from support import GcmdProcess, free_port, make_certificate, wait_for

from gcmd import __version__
from gcmd.process.run import cannot_listen, untrack_greenlet_tree

pytestmark = pytest.mark.timeout(30)


def run_gcmd(*args, timeout=10):
    return subprocess.run([sys.executable, "-m", "gcmd", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def test_version():
    result = run_gcmd("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"gcmd {__version__}"


@pytest.mark.parametrize(("environ", "tracked"), [({}, False), ({"GEVENT_TRACK_GREENLET_TREE": "1"}, True)])
def test_greenlets_keep_no_spawning_stack_unless_the_environment_asks(environ, tracked, monkeypatch):
    monkeypatch.setattr(gevent.config, "track_greenlet_tree", True)
    untrack_greenlet_tree(environ)
    greenlet = gevent.spawn(lambda: None)
    greenlet.join()
    assert (greenlet.spawning_stack is not None, greenlet.spawning_greenlet is not None) == (tracked, tracked)


def test_help_documents_every_flag_with_its_default():
    result = run_gcmd("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in ("--host", "--port", "--root", "--logfile", "--max-clients", "--max-line",
                 "--idle-timeout", "--token-file", "--tls-cert", "--tls-key", "--shutdown-timeout",
                 "--log-level", "--log-format", "--quiet", "--command-timeout", "--hash-workers",
                 "--max-pending", "--hash-cache", "--max-per-ip", "--allow", "--backlog"):
        assert flag in text, flag
    for default in ("(default: 127.0.0.1)", "(default: 9999)", "(default: /var/log/syslog,",
                    "(default: 100)", "(default: 8192)", "(default: 300)", "(default: 10)"):
        assert default in text, default


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "70000"], "--port must be between 0 and 65535"),
    (["--port", "-1"], "--port must be between 0 and 65535"),
    (["--max-clients", "0"], "--max-clients must be at least 1"),
    (["--max-line", "-5"], "--max-line must be at least 1"),
    (["--idle-timeout", "-1"], "--idle-timeout must be more than 0"),
    (["--command-timeout", "0"], "--command-timeout must be more than 0"),
    (["--shutdown-timeout", "-3"], "--shutdown-timeout must be 0 seconds or more"),
    (["--max-pending", "-1"], "--max-pending must be at least 0"),
    (["--root", "/no/such/dir"], "--root /no/such/dir is not a directory"),
    (["--root", ""], "--root is empty: give a directory (. for the current one)"),
    (["--token-file", "/no/such/token"], "cannot read --token-file /no/such/token"),
    (["--tls-cert", "/no/such/cert.pem", "--tls-key", "/no/such/key.pem"],
     "cannot read --tls-cert /no/such/cert.pem: no such file"),
    (["--tls-cert", "/etc/hostname"], "--tls-cert and --tls-key go together"),
    (["--allow", "not-a-network"], "--allow 'not-a-network' is not a network"),
    (["--log-level", "loud"], "invalid choice"),
    (["--port", "abc"], "invalid int value"),
    (["--output", "/no/such/dir/gcmd.log"], "cannot open --output /no/such/dir/gcmd.log: No such file or directory"),
    (["--output", "/"], "cannot open --output /: Is a directory"),
    (["--output", ""], "--output is empty: give a file (without --output the log goes to standard output)"),
    (["--token-file", ""], "--token-file is empty: give the file that holds the token"),
    (["--config", ""], "--config is empty: give a TOML file"),
    (["--tls-cert", "", "--tls-key", "k.pem"], "--tls-cert is empty: give a PEM file of the server's certificate"),
    (["--tls-cert", "c.pem", "--tls-key", ""], "--tls-key is empty: give a PEM file of the private key of --tls-cert"),
    (["--tls-client-ca", ""], "--tls-client-ca is empty: give a PEM file of the CA certificates of clients"),
    (["--allow", "10.0.0.1/8"], ("--allow 10.0.0.1/8 has host bits set: give 10.0.0.0/8 (the network) "
                                "or 10.0.0.1/32 (the address)")),
    (["--allow", "::1/64"], "--allow ::1/64 has host bits set: give ::/64 (the network) or ::1/128 (the address)"),
    (["--logfile", "journal:/no/such/dir"], ("--logfile journal:/no/such/dir: the journal directory "
                                             "/no/such/dir does not exist")),
    (["--logfile", "j=journal:/etc/hostname"], ("--logfile j=journal:/etc/hostname: the journal directory "
                                               "/etc/hostname is not a directory")),
    (["--reuse-port"], "--reuse-port is for --workers 2 or more"),
    (["--quiet-from", "192.168.1.7/24"], "--quiet-from 192.168.1.7/24 has host bits set: give 192.168.1.0/24"),
])
def test_bad_settings_exit_2_with_one_message_before_binding(args, message):
    result = run_gcmd(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.startswith("gcmd: error: ") and result.stderr.endswith("\nTry 'gcmd --help'.\n")
    assert result.stderr.count("\n") == 2
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_unusable_certificate_exits_2(tmp_path):
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    result = run_gcmd("--tls-cert", bogus, "--tls-key", bogus)
    assert result.returncode == 2 and f"--tls-cert {bogus} holds no PEM certificate\n" in result.stderr


@pytest.mark.parametrize(("cert", "key", "message"), [
    ("server.key", "server.key", ("--tls-cert server.key holds no PEM certificate "
                                 "(it holds a private key: give it to --tls-key)")),
    ("server.pem", "server.pem", ("--tls-key server.pem holds no PEM private key "
                                 "(it holds a certificate: give it to --tls-cert)")),
    ("server.pem", "notes.txt", "--tls-key notes.txt holds no PEM private key"),
    ("server.pem", "other.key", "--tls-key other.key is not the key of the certificate in --tls-cert server.pem"),
])
def test_a_tls_file_that_is_not_what_its_flag_wants_is_named(tmp_path, cert, key, message):
    make_certificate(tmp_path)
    make_certificate(tmp_path, "other")
    (tmp_path / "notes.txt").write_text("not a key\n")
    result = subprocess.run([sys.executable, "-m", "gcmd", "--tls-cert", cert, "--tls-key", key],
                            capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL,
                            check=False, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"gcmd: error: {message}\nTry 'gcmd --help'.\n"


def test_empty_token_file_exits_2(tmp_path):
    token = tmp_path / "token"
    token.write_text("\n")
    result = run_gcmd("--token-file", token)
    assert result.returncode == 2 and "is empty" in result.stderr


def test_port_in_use_exits_1_with_a_message(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_gcmd("--port", port, "--root", tmp_path)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1 port {port}: address already in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Shutting down" not in result.stdout and "Server stopped" not in result.stdout


@pytest.mark.parametrize(("exc", "expected"), [
    (OSError(errno.EADDRINUSE, "Address already in use: ('192.0.2.1', 9)"), "address already in use"),
    (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address: ('192.0.2.1', 9)"),
     "cannot assign requested address"),
    (OSError(errno.EACCES, "Permission denied: ('192.0.2.1', 9)"), "permission denied"),
    (OSError("no errno"), "no errno"),
])
def test_cannot_listen_says_why_in_the_systems_words(capsys, exc, expected):
    assert cannot_listen("192.0.2.1", 9, exc) == 1
    assert capsys.readouterr().err == f"gcmd: cannot listen on 192.0.2.1 port 9: {expected}\n"


@pytest.mark.parametrize("quiet", [[], ["--quiet"], ["--log-level", "error"], ["--quiet", "--workers", "2"]])
def test_port_0_logs_the_chosen_port_at_any_log_level(tmp_path, quiet):
    (tmp_path / "app.log").write_text("started\n")
    proc = subprocess.Popen([sys.executable, "-m", "gcmd", "--port", "0", "--root", str(tmp_path),
                             "--logfile", str(tmp_path / "app.log"), *quiet],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline()
        # an info line as ever, not a warning
        assert "WARNING" not in first
        port = int(re.search(r"\] gcmd \S+ listening on 127\.0\.0\.1 port (\d+)", first).group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"ping\n")
            assert s.recv(100) == b"pong\n"
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0


def test_metrics_port_0_logs_the_chosen_port_under_quiet(tmp_path):
    (tmp_path / "app.log").write_text("started\n")
    proc = subprocess.Popen([sys.executable, "-m", "gcmd", "--port", "0", "--metrics-port", "0", "--quiet",
                             "--root", str(tmp_path), "--logfile", str(tmp_path / "app.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert "WARNING" not in first + second
        # the metrics first: "listening" says that all is up
        assert "listening on 127.0.0.1 port" in second
        port = int(re.search(r"\] metrics at http://127\.0\.0\.1:(\d+)/metrics$", first.rstrip()).group(1))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert b"gcmd_clients" in reply.read()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0


def test_missing_syslog_still_starts_and_says_once_how_to_point_logfile(tmp_path):
    server = GcmdProcess(tmp_path, logfile=tmp_path / "absent.log")
    try:
        warnings = [line for line in server.log().splitlines() if "WARNING" in line]
        assert len(warnings) == 1, warnings
        assert f"'{tmp_path}/absent.log': No such file or directory" in warnings[0]
        assert "--logfile PATH" in warnings[0]
        reply = server.client().ask("lastlog")
        assert reply.startswith(b"An error occured : ") and b"--logfile PATH" not in reply
        assert reply.endswith(b"absent.log' (--logfile): No such file or directory\n")
    finally:
        assert server.stop() == 0


def test_ipv6_host(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not configured on this machine")
    server = GcmdProcess(tmp_path, host="::1")
    try:
        assert server.client().ask("ping") == b"pong\n"
    finally:
        assert server.stop() == 0


def test_log_lines_are_escaped_and_auth_is_hidden(gcmd, tmp_path):
    token = tmp_path / "token"
    token.write_text("hunter2\n")
    server = gcmd("--token-file", token)
    c = server.client()
    assert c.ask(b"auth hunter2") == b"Authenticated.\n"
    assert c.ask(b"forged\r2011-08-29 13:32:35+0200 [-] \x1b[31mroot logged in") == (
        b"Command not found.\n")
    c.send("exit\n")
    assert c.closed()
    log = wait_for(lambda: "Lost client connection" in server.log() and server.log())
    assert "hunter2" not in log and "Cmd received from 127.0.0.1 : auth ***" in log
    assert "Cmd received from 127.0.0.1 : forged\\x0d2011-08-29 13:32:35+0200 [-] \\x1b[31mroot" in log
    assert not any(line.startswith("2011") for line in log.splitlines())
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d{4} \[Session,\d+,127\.0\.0\.1\] "
                     r"Lost client connection", log, re.MULTILINE)


def test_json_log_format(gcmd):
    server = gcmd("--log-format", "json")
    c = server.client()
    assert c.ask(b'hello "json" \x1b') == b"Command not found.\n"
    c.send("exit\n")
    assert c.closed()
    server.stop()
    events = [json.loads(line) for line in server.log().splitlines()]
    messages = [event["message"] for event in events]
    assert 'Cmd received from 127.0.0.1 : hello "json" \\x1b' in messages
    assert all({"time", "level", "context", "message"} <= event.keys() for event in events)


def test_quiet_logs_no_commands(gcmd):
    server = gcmd("--quiet")
    assert server.client().ask("ping") == b"pong\n"
    server.stop()
    assert "Cmd received" not in server.log()
    # the port was given: the listening line is info, which --quiet hides
    assert "listening on" not in server.log()


def test_sigterm_exits_0_after_goodbye(gcmd):
    server = gcmd()
    c = server.client()
    assert c.ask("ping") == b"pong\n"
    server.proc.terminate()
    assert c.line() == b"Server shutting down. bye !\n"
    assert server.proc.wait(15) == 0
    assert "Server stopped" in server.log()


def test_tls_serves_the_protocol_and_refuses_plaintext(gcmd, tmp_path):
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = gcmd("--tls-cert", cert, "--tls-key", key, "--idle-timeout", 2)
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    with context.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10),
                             server_hostname="localhost") as tls:
        tls.sendall(b"ping\nhelp\n")
        data = b""
        while b"End help\n" not in data:
            data += tls.recv(4096)
        assert data.startswith(b"pong\nBegin help\n")
    plain = server.client(timeout=5)
    plain.send("ping\n")
    assert plain.closed() and b"pong" not in plain.buf


def test_free_port_helper_never_returns_9999():
    assert free_port() != 9999


# --- every flag behaves as documented -------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["--host", ""], "--host is empty: give 0.0.0.0 or :: to listen on every interface"),
    (["--host="], "--host is empty"),
    (["--host", "999.1.1.1"], "--host '999.1.1.1' is not an IPv4 or IPv6 address, nor a host name"),
    (["--host", "10.0.0"], "--host '10.0.0' is not an IPv4 or IPv6 address, nor a host name"),
    (["--host", "bad name"], "--host 'bad name' is not an IPv4 or IPv6 address, nor a host name"),
    (["--host", "nosuch.invalid"], "--host 'nosuch.invalid' does not resolve"),
])
def test_empty_or_malformed_host_exits_2_with_one_message(args, message):
    result = run_gcmd(*args, "--port", 0)
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"gcmd: error: {message}")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_host_name_that_resolves_is_served(tmp_path):
    server = GcmdProcess(tmp_path, host="localhost")
    try:
        assert f"listening on localhost port {server.port}" in server.log()
        assert server.client().ask("ping") == b"pong\n"
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--backlog", "99999999999"], "--backlog must be at most 65535, not 99999999999"),
    (["--backlog", "0"], "--backlog must be at least 1, not 0"),
    (["--max-clients", "1000001"], "--max-clients must be at most 1000000"),
    (["--max-per-ip", "-1"], "--max-per-ip must be at least 0"),
    (["--max-line", str(2 ** 64)], "--max-line must be at most 1048576"),
    (["--hash-workers", "0"], "--hash-workers must be at least 1"),
    (["--hash-cache", "1000001"], "--hash-cache must be at most 1000000"),
    (["--max-pending", "1000001"], "--max-pending must be at most 1000000"),
    (["--workers", "257"], "--workers must be at most 256"),
    (["--metrics-port", "65536"], "--metrics-port must be between 0 and 65535"),
    (["--workers", "4", "--metrics-port", "65535"], "--metrics-port must be between 0 and 65532"),
    (["--idle-timeout", "nan"], "--idle-timeout must be a finite number of seconds, not nan"),
    (["--idle-timeout", "inf"], "--idle-timeout must be a finite number of seconds, not inf"),
    (["--command-timeout=-inf"], "--command-timeout must be a finite number of seconds"),
    (["--shutdown-timeout", "1e400"], "--shutdown-timeout must be a finite number of seconds, not inf"),
    (["--idle-timeout", "86401"], "--idle-timeout must be at most 86400 seconds, not 86401"),
])
def test_numbers_out_of_their_range_exit_2_with_one_message(args, message):
    result = run_gcmd(*args)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


NUMERIC_FLAGS = ("--port", "--backlog", "--workers", "--metrics-port", "--max-clients", "--max-per-ip",
                 "--max-line", "--hash-workers", "--max-pending", "--hash-cache", "--idle-timeout",
                 "--command-timeout", "--shutdown-timeout")


def test_help_gives_the_range_of_every_numeric_flag():
    text = " ".join(run_gcmd("--help").stdout.split())
    for flag in NUMERIC_FLAGS:
        described = re.search(rf"{flag} [A-Z_]+ (.*?)(?= --|$)", text).group(1)
        assert re.search(r"\d+ to \d+|more than 0, at most \d+", described), (flag, described)


@pytest.mark.parametrize("args", [
    ["--port", "70000"],
    ["--no-such-flag"],
    ["--port", "abc"],
    ["--port"],
    ["--log-level", "loud"],
    ["--root", "/no/such/dir"],
    ["--quiet", "--log-level", "info"],
    ["stray"],
])
def test_a_bad_setting_is_one_line_and_a_hint_without_the_usage_banner(args):
    result = run_gcmd(*args)
    assert result.returncode == 2
    first, hint = result.stderr.splitlines()
    assert first.startswith("gcmd: error: ") and hint == "Try 'gcmd --help'."
    assert "usage:" not in result.stderr


def test_quiet_with_a_log_level_exits_2():
    result = run_gcmd("--quiet", "--log-level", "debug")
    assert result.returncode == 2
    assert "gcmd: error: argument --log-level: not allowed with argument --quiet" in result.stderr


def test_debug_logs_the_bytes_and_time_of_each_request(gcmd):
    server = gcmd("--log-level", "debug")
    client = server.client()
    assert client.ask("ping") == b"pong\n"
    client.send("help\n")
    client.block(b"End help\n")
    wait_for(lambda: re.search(r"\] ping: 5 bytes in, 5 bytes out, [0-9.]+ ms", server.log())
             and re.search(r"\] help: 5 bytes in, \d{3,} bytes out", server.log()))


def test_debug_logs_more_than_info(gcmd):
    info, debug = gcmd(), gcmd("--log-level", "debug")
    for server in (info, debug):
        assert server.client().ask("ping") == b"pong\n"
        server.stop()
    assert "settings: host=127.0.0.1" not in info.log()
    settings = re.search(r"settings: (.*)", debug.log()).group(1)
    assert f"port={debug.port}" in settings and "log_level=debug" in settings
    assert len(debug.log().splitlines()) > len(info.log().splitlines())


def test_every_worker_names_itself_in_its_log_lines(gcmd):
    server = gcmd("--workers", 2, "--log-level", "debug")
    wait_for(lambda: server.log().count("serving port") == 2)
    server.stop()
    log = server.log()
    for worker in (0, 1):
        assert re.search(rf"\[w{worker}\] settings: .* workers=2 .*worker={worker} ", log), log
        assert re.search(rf"\[w{worker}\] serving port {server.port}, pid \d+", log), log


def test_session_numbers_name_their_worker(gcmd):
    server = gcmd("--workers", 2)
    for _ in range(10):
        server.client().ask("ping")
    wait_for(lambda: server.log().count("Cmd received") == 10)
    contexts = re.findall(r"\[(Session,[^\]]*)\] Cmd received", server.log())
    assert all(re.fullmatch(r"Session,w[01]:\d+,127\.0\.0\.1", c) for c in contexts), contexts
