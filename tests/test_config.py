"""Settings from a TOML file, and SIGHUP: reopen the log output, re-read the token."""

import os
import re
import signal
import subprocess
import sys

import pytest
from support import Client, free_port, wait_for

from gcmd.config import Config, RunOptions, SettingError, check_host

pytestmark = pytest.mark.timeout(30)


def run_gcmd(*args):
    return subprocess.run([sys.executable, "-m", "gcmd", *map(str, args)], capture_output=True,
                          text=True, timeout=10, stdin=subprocess.DEVNULL, check=False)


def test_config_file_settings_and_command_line_wins(gcmd, tmp_path):
    config = tmp_path / "gcmd.toml"
    config.write_text('max-clients = 1\nidle-timeout = 60\nallow = ["127.0.0.0/8"]\nquiet = false\n')
    server = gcmd("--config", config)
    first = server.client()
    assert first.ask("ping") == b"pong\n"
    refused = server.client()
    assert refused.line() == b"Too many connections. bye !\n"
    first.send("stats\n")
    assert b"max_clients 1\n" in b"".join(first.block(b"End stats\n"))
    wider = gcmd("--config", config, "--max-clients", 5)
    c = wider.client()
    c.send("stats\n")
    assert b"max_clients 5\n" in b"".join(c.block(b"End stats\n"))


def test_config_file_allow_list_is_replaced_by_the_command_line(gcmd, tmp_path):
    config = tmp_path / "gcmd.toml"
    config.write_text('allow = ["10.0.0.0/8"]\n')
    closed = gcmd("--config", config).client()
    closed.send("ping\n")
    assert closed.closed() and closed.buf == b""
    assert gcmd("--config", config, "--allow", "127.0.0.1/32").client().ask("ping") == b"pong\n"


@pytest.mark.parametrize("spelling", [["--allow", "10.0.0.0/8"], ["--allow=10.0.0.0/8"]])
def test_the_command_line_allow_list_replaces_the_files_whichever_the_spelling(gcmd, tmp_path, spelling):
    config = tmp_path / "gcmd.toml"
    config.write_text('allow = ["127.0.0.0/8"]\n')
    closed = gcmd("--config", config, *spelling).client()
    closed.send("ping\n")
    assert closed.closed() and closed.buf == b""


@pytest.mark.parametrize(("text", "message"), [
    ('allow = ["127.0.0.0/8", "nope"]\n', "'allow': --allow 'nope' is not a network address"),
    ('host = ""\n', "'host': --host is empty"),
    ('host = "999.1.1.1"\n', "'host': --host '999.1.1.1' is not an IPv4 or IPv6 address"),
    ("idle-timeout = nan\n", "'idle-timeout': --idle-timeout must be a finite number of seconds, not nan"),
    ("backlog = 99999999999\n", "'backlog': --backlog must be at most 65535, not 99999999999"),
    ("max-clients = 1.5\n", "'max-clients': invalid int value: 1.5"),
    ('root = "/no/such/dir"\n', "'root': --root /no/such/dir is not a directory"),
    ('log-level = "loud"\n', "'log-level': invalid choice: 'loud'"),
    ('quiet = true\nlog-level = "debug"\n', "'quiet' and 'log-level' set the same thing: keep one"),
    ("port = true\n", "'port' takes a value, not true"),
])
def test_a_bad_value_in_the_config_file_names_the_file_and_the_key(tmp_path, text, message):
    config = tmp_path / "gcmd.toml"
    config.write_text(text)
    result = run_gcmd("--config", config)
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"gcmd: error: --config {config}: {message}"), result.stderr
    assert result.stderr.count("\n") == 2 and "Traceback" not in result.stderr


def test_a_bad_value_on_the_command_line_is_not_blamed_on_the_file(tmp_path):
    config = tmp_path / "gcmd.toml"
    config.write_text("port = 9000\nmax-clients = 0\n")
    result = run_gcmd("--config", config, "--port", 70000, "--max-clients", 5)
    assert result.returncode == 2
    assert result.stderr.startswith("gcmd: error: --port must be between 0 and 65535, not 70000\n")


@pytest.mark.parametrize(("settings", "message"), [
    ({"port": 65536}, "--port must be between 0 and 65535, not 65536"),
    ({"port": "80"}, "--port must be a whole number, not '80'"),
    ({"max_clients": True}, "--max-clients must be a whole number, not True"),
    ({"backlog": 1 << 40}, f"--backlog must be at most 65535, not {1 << 40}"),
    ({"idle_timeout": 0}, "--idle-timeout must be more than 0 seconds, not 0"),
    ({"shutdown_timeout": float("nan")}, "--shutdown-timeout must be a finite number of seconds, not nan"),
    ({"host": ""}, "--host is empty: give 0.0.0.0 or :: to listen on every interface"),
    ({"tls_key": "key.pem"}, "--tls-cert and --tls-key go together"),
    ({"workers": 3, "metrics_port": 65534}, "--metrics-port must be between 0 and 65533, not 65534"),
    ({"workers": 2, "metrics_port": 0}, "--metrics-port 0 picks one free port: give a port with --workers"),
    ({"workers": 2, "worker": 2}, "worker must be between 0 and 1, not 2"),
    ({"port": 9100, "metrics_port": 9100}, "--metrics-port 9100 takes the port of the server (--port 9100): give another"),
    ({"port": 9101, "metrics_port": 9100, "workers": 2},
     "--metrics-port 9100 (ports 9100-9101 with --workers 2) takes the port of the server (--port 9101): give another"),
])
def test_a_config_is_checked_by_the_rules_of_the_flags(settings, message):
    with pytest.raises(SettingError, match=f"^{re.escape(message)}$"):
        Config(**settings)


def test_run_options_are_checked():
    with pytest.raises(SettingError, match="--log-level must be one of debug, info, warning, error"):
        RunOptions(log_level="loud")


@pytest.mark.parametrize(("host", "valid"), [
    ("127.0.0.1", True), ("::1", True), ("0.0.0.0", True), ("::", True), ("fe80::1%lo", True),
    ("localhost", True), ("gcmd.example.org.", True), ("a-b.example", True),
    ("", False), ("999.1.1.1", False), ("10.1", False), ("-a.example", False), ("a_b.example", False),
    ("a..example", False), ("x" * 64 + ".example", False), ("a b", False), ("127.0.0.1:80", False),
])
def test_host_is_an_address_or_a_well_formed_name(host, valid):
    if valid:
        check_host(host)
    else:
        with pytest.raises(SettingError):
            check_host(host)


@pytest.mark.parametrize(("text", "message"), [
    ("max_clientz = 3\n", "unknown setting 'max_clientz'"),
    ("port = [1, 2]\n", "'port' takes one value"),
    ("quiet = 1\n", "'quiet' must be true or false"),
    ("port = \n", "is not valid TOML"),
    ("port = 70000\n", "--port must be between 0 and 65535"),
])
def test_bad_config_file_exits_2_naming_the_problem(tmp_path, text, message):
    config = tmp_path / "gcmd.toml"
    config.write_text(text)
    result = run_gcmd("--config", config)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_config_file_that_is_not_utf8_exits_2_with_one_line(tmp_path):
    config = tmp_path / "gcmd.toml"
    config.write_bytes(b"# caf\xe9\nport = 9000\n")
    result = run_gcmd("--config", config)
    assert result.returncode == 2
    assert result.stderr == (f"gcmd: error: --config {config} is not UTF-8 text: byte 0xe9 at offset 5\n"
                             "Try 'gcmd --help'.\n")


def test_an_empty_path_in_the_config_file_names_the_file_the_key_and_what_to_give(tmp_path):
    config = tmp_path / "gcmd.toml"
    config.write_text('token-file = ""\n')
    result = run_gcmd("--config", config)
    assert result.returncode == 2
    assert result.stderr.startswith(f"gcmd: error: --config {config}: 'token-file': --token-file is empty: "
                                    "give the file that holds the token\n")


def test_missing_config_file_exits_2():
    result = run_gcmd("--config", "/no/such.toml")
    assert result.returncode == 2 and "cannot read --config /no/such.toml" in result.stderr


def test_sighup_rereads_the_token_file(gcmd, tmp_path):
    token = tmp_path / "token"
    token.write_text("first\n")
    server = gcmd("--token-file", token)
    assert server.client().ask("auth first") == b"Authenticated.\n"
    token.write_text("second\n")
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "re-read the token file" in server.log())
    assert server.client().ask("auth second") == b"Authenticated.\n"
    assert server.client().ask("auth first") == b"Authentication failed. bye !\n"


def test_sighup_keeps_the_old_token_when_the_file_is_broken(gcmd, tmp_path):
    token = tmp_path / "token"
    token.write_text("first\n")
    server = gcmd("--token-file", token)
    token.write_text("")
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "the previous token stays in force" in server.log())
    assert server.client().ask("auth first") == b"Authenticated.\n"


def test_sighup_reopens_the_log_output_after_rotation(tmp_path):
    output = tmp_path / "gcmd.log"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gcmd", "--port", str(port), "--root", str(tmp_path),
                             "--logfile", os.devnull, "--output", str(output)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: output.exists() and "listening on" in output.read_text())
        output.rename(tmp_path / "gcmd.log.1")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: output.exists() and "SIGHUP: reopened the log output" in output.read_text())
        assert Client(port).ask("ping") == b"pong\n"
        wait_for(lambda: "Cmd received from 127.0.0.1 : ping" in output.read_text())
        assert "Cmd received" not in (tmp_path / "gcmd.log.1").read_text()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0 and out == b""

