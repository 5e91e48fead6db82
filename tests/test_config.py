"""Settings from a TOML file, and SIGHUP: reopen the log output, re-read the token."""

import os
import signal
import subprocess
import sys

import pytest
from support import Client, free_port, wait_for

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

