"""Users and grants (PROTOCOL.md, "Users and grants (1.2)"), and whoami: a test per sentence.

The in-process tests serve the worked example of docs/users.md: ``ops`` with
every grant, ``alice`` (an application team) confined to the ``app`` log and
to ``root/alice``, ``monitor`` (a script) that may ping and read stats. The
start-up checks, SIGHUP and the server log use a real ``python -m gcmd``.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import (
    AUTH_DISABLED,
    AUTH_FAILED,
    AUTH_OK,
    AUTH_REQUIRED,
    BEGIN_FOLLOW,
    END_FOLLOW,
    LOG_LINES,
    NOT_FOUND,
    OUTSIDE,
    PONG,
    sha1_of,
    wait_for,
)

from gcmd import __version__ as gcmd_version
from gcmd.commands import command_words
from gcmd.users import UsersError, hash_token, parse_users

pytestmark = pytest.mark.timeout(60)

BYE = b"Authentication required. bye !\n"
TOKENS = {"ops": "ops-3f9a1c", "alice": "alice-77d2e0", "monitor": "monitor-5b8e44"}
LOGS = ("syslog", "app", "auth")


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def example_tables(root: Path) -> list[dict]:
    """The [[user]] tables of docs/users.md's example, under the served ``root``."""
    return [
        {"name": "ops", "token_sha256": sha256(TOKENS["ops"]), "logs": ["*"], "commands": ["*"]},
        {"name": "alice", "token_sha256": sha256(TOKENS["alice"]), "logs": ["app"],
         "commands": ["lastlog", "follow", "logs", "comphash", "hash"], "root": str(root / "alice")},
        {"name": "monitor", "token_sha256": sha256(TOKENS["monitor"]), "commands": ["stats"]},
    ]


@pytest.fixture
def bastion(make_server, tmp_path):
    """A server of three logs (syslog, app, auth) and the example's users.

    Under the served root: ``secret.txt``, and ``alice/`` holding ``report.txt``
    and ``link``, a symlink to ``../secret.txt``; beside the root, ``outside.txt``."""
    def start(**settings):
        root = tmp_path / "root"
        root.mkdir(exist_ok=True)
        (root / "alice").mkdir(exist_ok=True)
        (root / "alice" / "report.txt").write_text("alice's report\n")
        (root / "secret.txt").write_text("ops only\n")
        if not (root / "alice" / "link").is_symlink():
            (root / "alice" / "link").symlink_to("../secret.txt")
        (tmp_path / "outside.txt").write_text("nobody's\n")
        for name in LOGS[1:]:
            (tmp_path / f"{name}.log").write_text(f"{name} line 1\n{name} line 2\n")
        logfiles = (f"syslog={tmp_path / 'syslog'}", f"app={tmp_path / 'app.log'}",
                    f"auth={tmp_path / 'auth.log'}")
        users = parse_users(settings.pop("tables", None) or example_tables(root), str(root),
                            [*LOGS, "gcmd"], command_words())
        return make_server(logfiles=logfiles, users=users, **settings)

    return start


def signed_in(connect, server, name: str):
    client = connect(server)
    assert client.ask(f"auth {name} {TOKENS[name]}") == AUTH_OK
    return client


def listed(client, request: str, end: bytes) -> list[bytes]:
    client.send(request + "\n")
    return client.block(end)


# --- without users: 1.1 --------------------------------------------------------------------------

@pytest.mark.parametrize(("request_", "reply"), [
    ("ping", PONG),
    ("whoami", b"anonymous\n"),
    ("auth alice secret", AUTH_DISABLED),
    ("auth secret", AUTH_DISABLED),
    ("lastlog 1", b"Begin lastlog\n"),
    ("comphash ../outside.txt", OUTSIDE),
])
def test_without_users_every_client_may_do_everything_as_in_1_1(server, connect, request_, reply):
    assert connect(server).ask(request_) == reply


def test_without_users_the_token_file_token_is_auth_token_as_in_1_1(make_server, connect):
    server = make_server(token=b"s3cret")
    client = connect(server)
    assert client.ask("ping") == AUTH_REQUIRED
    assert client.ask("auth s3cret") == AUTH_OK
    assert client.ask("whoami") == b"anonymous\n"
    failed = connect(server)
    assert failed.ask("auth alice s3cret") == AUTH_FAILED and failed.closed()
    assert server.stats.auth_failed["bad_token"] == 1


def test_without_users_a_verified_certificate_is_all_a_server_without_token_asks(server):
    from support import PlainSession

    session = PlainSession()
    session.client_cn = "alice"
    server.commands.admitted(session)
    assert session.authenticated and session.user is None


# --- a user has a token_sha256, a cn, or both -------------------------------------------------

@pytest.mark.parametrize("keys", [{"token_sha256": sha256("t")}, {"cn": "alice.example.org"},
                                  {"token_sha256": sha256("t"), "cn": "alice.example.org"}])
def test_a_user_has_a_token_a_cn_or_both(tmp_path, keys):
    users = parse_users([{"name": "alice", **keys}], str(tmp_path), ["gcmd"], command_words())
    assert users.named("alice").cn == keys.get("cn")


def test_a_user_with_neither_token_nor_cn_is_refused(tmp_path):
    with pytest.raises(UsersError, match=r"^user 'alice': 'token_sha256' and 'cn' are both missing"):
        parse_users([{"name": "alice"}], str(tmp_path), ["gcmd"], command_words())


# --- auth USER TOKEN ---------------------------------------------------------------------------

def test_auth_user_token_authenticates_as_the_user(bastion, connect):
    client = connect(bastion())
    assert client.ask("whoami") == b"anonymous\n"
    assert client.ask(f"auth alice {TOKENS['alice']}") == AUTH_OK
    assert client.ask("whoami") == b"alice\n"


@pytest.mark.parametrize("request_", [f"auth alice {TOKENS['ops']}", f"auth nobody {TOKENS['alice']}",
                                      "auth alice", "auth", f"auth alice {TOKENS['alice']} more"])
def test_a_wrong_user_or_token_fails_and_closes_whether_the_user_exists_or_not(bastion, connect, request_):
    server = bastion()
    client = connect(server)
    client.send(f"{request_}\nping\nwhoami\n")
    assert client.line() == AUTH_FAILED
    assert client.closed() and client.buf == b""  # what was pipelined after it is discarded
    assert server.stats.auth_failures == 1


def test_failures_are_counted_by_reason_in_stats_and_metrics(bastion, connect):
    from prometheus_client import generate_latest

    from gcmd.observe.metrics import GcmdCollector

    server = bastion()
    for request_ in ("auth alice wrong", "auth nobody wrong", "auth nobody wrong", "auth wrong"):
        client = connect(server)
        assert client.ask(request_) == AUTH_FAILED
    ops = signed_in(connect, server, "ops")
    figures = dict(line.decode().split() for line in listed(ops, "stats", b"End stats\n")[1:-1])
    assert {key: figures[key] for key in figures if key.startswith("auth_failures")} == {
        "auth_failures": "4", "auth_failures_bad_token": "1", "auth_failures_bad_user_token": "1",
        "auth_failures_unknown_user": "2"}

    class Registry:
        def collect(self):
            return GcmdCollector(server).collect()

    page = generate_latest(Registry()).decode()
    assert 'gcmd_auth_failures_by_reason_total{reason="unknown_user"} 2.0' in page
    assert "gcmd_auth_failures_total 4.0" in page
    assert "alice" not in page and "nobody" not in page  # no user names as label values


def test_a_user_with_a_cn_only_cannot_auth_with_a_token(bastion, connect, tmp_path):
    tables = [{"name": "bob", "cn": "bob.example.org", "commands": ["*"]}]
    server = bastion(tables=tables)
    client = connect(server)
    assert client.ask("auth bob anything") == AUTH_FAILED and client.closed()


# --- a verified certificate's CN is a user from the start ------------------------------------

@pytest.mark.skipif(shutil.which("openssl") is None,
                    reason="needs openssl (apt-get install openssl)")
def test_a_verified_certificate_whose_cn_is_a_users_is_that_user_from_the_start(gcmd, tmp_path):
    from test_tls_clients import Pki, tls_args
    from test_tls_clients import connect as tls_connect

    pki = Pki(tmp_path / "pki")
    config = tmp_path / "gcmd.toml"
    config.write_text('[[user]]\nname = "alice"\ncn = "alice"\nlogs = ["syslog"]\ncommands = ["lastlog"]\n')
    server = gcmd(*tls_args(pki, "--config", config, client_ca=pki.ca[0]))
    alice = tls_connect(server.port, pki.alice)
    assert alice.ask("whoami") == b"alice\n"
    assert alice.ask("lastlog 1") == b"Begin lastlog\n"
    assert alice.block(b"End lastlog\n") == [f"{LOG_LINES[-1]}\n".encode(), b"End lastlog\n"]
    assert alice.ask("stats") == b"An error occured : Permission denied: alice may not use stats\n"
    # a certificate whose CN is no user's is no user: with users declared, it must auth
    bob = tls_connect(server.port, pki.bob)
    assert bob.ask("whoami") == b"anonymous\n"
    assert bob.ask("ping") == AUTH_REQUIRED


# --- auth TOKEN: the --token-file token grants everything ---------------------------------------

def test_the_token_file_token_still_grants_everything_beside_users(bastion, connect, tmp_path):
    server = bastion(token=b"s3cret")
    client = connect(server)
    assert client.ask("auth s3cret") == AUTH_OK
    assert client.ask("whoami") == b"anonymous\n"
    names = [line.split()[0] for line in listed(client, "logs", b"End logs\n")[1:-1]]
    assert names == [b"syslog", b"app", b"auth", b"gcmd"]
    secret = Path(server.config.root) / "secret.txt"
    assert client.ask("comphash secret.txt") == f"File hash is : {sha1_of(secret)}\n".encode()
    assert client.ask("stats") == b"Begin stats\n"


def test_without_a_token_file_a_one_word_auth_fails_when_users_are_declared(bastion, connect):
    client = connect(bastion())
    assert client.ask(f"auth {TOKENS['ops']}") == AUTH_FAILED and client.closed()


# --- until a connection is a user ---------------------------------------------------------------

@pytest.mark.parametrize(("request_", "reply"), [
    ("ping", AUTH_REQUIRED),
    ("lastlog", AUTH_REQUIRED),
    ("follow", AUTH_REQUIRED),
    ("logs", AUTH_REQUIRED),
    ("comphash secret.txt", AUTH_REQUIRED),
    ("hash sha256 secret.txt", AUTH_REQUIRED),
    ("stats", AUTH_REQUIRED),
    ("nosuchcommand", AUTH_REQUIRED),
    ("whoami", b"anonymous\n"),
    ("help", b"Begin help\n"),
])
def test_until_a_connection_is_a_user_only_auth_help_version_whoami_exit_quit_are_answered(
        bastion, connect, request_, reply):
    assert connect(bastion()).ask(request_) == reply


@pytest.mark.parametrize("word", ["exit", "quit"])
def test_exit_and_quit_need_no_user(bastion, connect, word):
    client = connect(bastion())
    client.send(f"{word}\n")
    assert client.closed() and client.buf == b""


# --- a log not granted does not exist for the user ------------------------------------------------

def test_logs_lists_only_the_users_logs(bastion, connect):
    server = bastion()
    alice = signed_in(connect, server, "alice")
    assert listed(alice, "logs", b"End logs\n") == [
        b"Begin logs\n", f"app {Path(server.config.root).parent / 'app.log'}\n".encode(), b"End logs\n"]
    ops = signed_in(connect, server, "ops")
    assert [line.split()[0] for line in listed(ops, "logs", b"End logs\n")[1:-1]] == [
        b"syslog", b"app", b"auth", b"gcmd"]  # "*": every log, gcmd's own included


@pytest.mark.parametrize("verb", ["lastlog", "lastlog 5", "follow"])
def test_a_log_not_granted_is_unknown_as_a_log_that_does_not_exist(bastion, connect, verb):
    alice = signed_in(connect, bastion(), "alice")
    for name in ("syslog", "auth", "gcmd"):
        refused, missing = alice.ask(f"{verb} {name}"), alice.ask(f"{verb} nosuch")
        assert refused == f"An error occured : unknown log '{name}' (choose from app)\n".encode()
        assert refused.replace(name.encode(), b"nosuch") == missing


def test_the_default_log_of_a_user_is_its_first_log(bastion, connect):
    alice = signed_in(connect, bastion(), "alice")
    assert listed(alice, "lastlog", b"End lastlog\n") == [
        b"Begin lastlog\n", b"app line 1\n", b"app line 2\n", b"End lastlog\n"]
    assert alice.ask("follow") == BEGIN_FOLLOW
    assert alice.ask("ping") == END_FOLLOW
    assert alice.line() == PONG


def test_a_granted_log_is_served(bastion, connect):
    alice = signed_in(connect, bastion(), "alice")
    assert listed(alice, "lastlog 1 app", b"End lastlog\n") == [
        b"Begin lastlog\n", b"app line 2\n", b"End lastlog\n"]
    assert alice.ask("follow app") == BEGIN_FOLLOW


# --- a command not granted ------------------------------------------------------------------

@pytest.mark.parametrize(("user", "request_", "verb"), [
    ("alice", "stats", "stats"),
    ("monitor", "lastlog", "lastlog"),
    ("monitor", "logs", "logs"),
    ("monitor", "follow", "follow"),
    ("monitor", "comphash x", "comphash"),
    ("monitor", "hash sha256 x", "hash"),
])
def test_a_command_not_granted_gets_permission_denied(bastion, connect, user, request_, verb):
    client = signed_in(connect, bastion(), user)
    assert client.ask(request_) == f"An error occured : Permission denied: {user} may not use {verb}\n".encode()
    assert client.ask("ping") == PONG  # the connection goes on


@pytest.mark.parametrize(("request_", "reply"), [
    ("ping", PONG),
    ("whoami", b"monitor\n"),
    ("help", b"Begin help\n"),
    ("version", f"gcmd {gcmd_version} protocol 1.2\n".encode()),
    ("format text", b"OK\n"),
    ("nosuchcommand", NOT_FOUND),
])
def test_ping_help_version_whoami_format_auth_exit_quit_are_always_granted(bastion, connect, request_, reply):
    monitor = signed_in(connect, bastion(), "monitor")
    assert monitor.ask(request_) == reply
    if request_ == "help":
        monitor.block(b"End help\n")
    assert monitor.ask(f"auth monitor {TOKENS['monitor']}") == AUTH_OK
    monitor.send("quit\n")
    assert monitor.closed()


def test_monitor_reads_stats(bastion, connect):
    monitor = signed_in(connect, bastion(), "monitor")
    assert monitor.ask("stats") == b"Begin stats\n"


# --- comphash and hash confine a user to its root --------------------------------------------

@pytest.mark.parametrize("path", ["../secret.txt", "link", "{root}/secret.txt", "{tmp}/outside.txt",
                                  "../../outside.txt", "/etc/hostname"])
@pytest.mark.parametrize("verb", ["comphash", "hash sha256"])
def test_hash_outside_the_users_root_is_refused_as_outside_the_served_root(bastion, connect, tmp_path,
                                                                          path, verb):
    server = bastion()
    alice = signed_in(connect, server, "alice")
    path = path.format(root=server.config.root, tmp=tmp_path)
    assert alice.ask(f"{verb} {path}") == OUTSIDE


def test_a_user_whose_root_is_the_served_root_hashes_under_it(bastion, connect):
    server = bastion()
    ops = signed_in(connect, server, "ops")
    expected = f"File hash is : {sha1_of(Path(server.config.root) / 'secret.txt')}\n".encode()
    assert ops.ask("comphash secret.txt") == expected
    assert ops.ask("comphash alice/link") == expected  # a symlink that stays inside the root
    assert ops.ask("comphash ../outside.txt") == OUTSIDE


@pytest.mark.parametrize("path", ["report.txt", "{root}/alice/report.txt", "./sub/../report.txt"])
def test_hash_inside_the_users_root_is_served(bastion, connect, path):
    server = bastion()
    alice = signed_in(connect, server, "alice")
    report = Path(server.config.root) / "alice" / "report.txt"
    (report.parent / "sub").mkdir(exist_ok=True)
    expected = f"File hash is : {sha1_of(report)}\n".encode()
    assert alice.ask(f"comphash {path.format(root=server.config.root)}") == expected


# --- whoami ----------------------------------------------------------------------------------

def test_whoami_is_the_user_or_anonymous(bastion, connect):
    server = bastion()
    assert connect(server).ask("whoami") == b"anonymous\n"
    for name in TOKENS:
        assert signed_in(connect, server, name).ask("whoami") == f"{name}\n".encode()


def test_a_connection_may_become_another_user(bastion, connect):
    server = bastion()
    client = signed_in(connect, server, "monitor")
    assert client.ask(f"auth alice {TOKENS['alice']}") == AUTH_OK
    assert client.ask("whoami") == b"alice\n"
    assert client.ask("stats").startswith(b"An error occured : Permission denied: alice")


# --- a bad users table stops gcmd at start --------------------------------------------------

def run_gcmd(tmp_path, config: str, *args) -> subprocess.CompletedProcess:
    (tmp_path / "root" / "sub").mkdir(parents=True, exist_ok=True)
    (tmp_path / "syslog").write_text("one\n")
    path = tmp_path / "gcmd.toml"
    path.write_text(config)
    return subprocess.run([sys.executable, "-m", "gcmd", "--port", "0", "--root", str(tmp_path / "root"),
                           "--logfile", str(tmp_path / "syslog"), "--config", str(path), *args],
                          capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL, check=False)


GOOD = f'token_sha256 = "{sha256("t")}"\n'


@pytest.mark.parametrize(("table", "message"), [
    (f'name = "alice"\n{GOOD}tokn = "x"\n', "user 'alice': unknown key 'tokn'"),
    (f'name = "alice"\n{GOOD}[[user]]\nname = "alice"\ncn = "a"\n',
     "user 'alice': 'name': the name is given to two users"),
    (f'name = "alice"\n{GOOD}root = "/etc"\n', "user 'alice': 'root' /etc is outside --root"),
    (f'name = "alice"\n{GOOD}root = "../"\n', "user 'alice': 'root' ../ is outside --root"),
    ('name = "alice"\ntoken_sha256 = "5e884898da28"\n', "user 'alice': 'token_sha256' must be 64 hex digits"),
    (f'name = "alice"\ntoken_sha256 = "{"g" * 64}"\n', "user 'alice': 'token_sha256' must be 64 hex digits"),
    ('name = "alice"\ntoken = "hunter2"\n', "user 'alice': 'token': a token is never written in clear"),
    (f'name = "alice"\n{GOOD}logs = ["syslog", "nosuch"]\n', "user 'alice': 'logs': unknown log 'nosuch'"),
    (f'name = "alice"\n{GOOD}commands = ["lastlgo"]\n', "user 'alice': 'commands': unknown command 'lastlgo'"),
    (f'name = "alice"\n{GOOD}root = "nosuch"\n', "user 'alice': 'root' nosuch is not a directory"),
    (f'name = "al ice"\n{GOOD}', "user #1: 'name' must be 1 to 64 of A-Z a-z 0-9 _ . -, not 'al ice'"),
    (f'{GOOD}', "user #1: 'name' is missing"),
    ('name = "alice"\ncn = "a"\n[[user]]\nname = "bob"\ncn = "a"\n',
     "user 'bob': 'cn': 'a' is already the CN of user 'alice'"),
])
def test_a_bad_users_table_stops_gcmd_with_status_2_naming_the_user_and_the_key(tmp_path, table, message):
    result = run_gcmd(tmp_path, "[[user]]\n" + table)
    assert result.returncode == 2, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"gcmd: error: --config {tmp_path / 'gcmd.toml'}: {message}"), first
    assert "hunter2" not in result.stderr


def test_a_single_user_table_is_not_an_array_of_tables(tmp_path):
    result = run_gcmd(tmp_path, f'[user]\nname = "alice"\n{GOOD}')
    assert result.returncode == 2 and "'user' must be [[user]] tables" in result.stderr


@pytest.mark.parametrize(("given", "expected"), [(None, "."), ("sub", "sub"), ("{root}/sub", "sub"),
                                                 ("sub/../sub/", "sub"), ("link", "sub")])
def test_a_users_root_is_a_real_path_relative_to_the_served_root(tmp_path, given, expected):
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to("sub")
    table = {"name": "alice", "cn": "a"} | ({} if given is None else {"root": given.format(root=tmp_path)})
    users = parse_users([table], str(tmp_path), ["gcmd"], command_words())
    assert users.named("alice").root == os.path.realpath(tmp_path / expected)


# --- gcmd --hash-token ------------------------------------------------------------------------

@pytest.mark.parametrize("given", [b"s3cret", b"s3cret\n", b"  s3cret\r\n"])
def test_hash_token_prints_the_sha256_that_sha256sum_prints(given):
    result = subprocess.run([sys.executable, "-m", "gcmd", "--hash-token"], input=given, capture_output=True,
                            timeout=20, check=False)
    assert (result.returncode, result.stdout) == (0, f"{hash_token(b's3cret')}\n".encode())
    recipe = subprocess.run(["sh", "-c", "printf %s s3cret | sha256sum"], capture_output=True, timeout=20,
                            check=True)
    assert recipe.stdout.split()[0].decode() == hash_token(b"s3cret")


@pytest.mark.parametrize("given", [b"", b"\n", b"two words\n"])
def test_hash_token_refuses_what_is_no_token(given):
    result = subprocess.run([sys.executable, "-m", "gcmd", "--hash-token"], input=given, capture_output=True,
                            timeout=20, check=False)
    assert result.returncode == 2 and b"--hash-token reads one token" in result.stderr


# --- SIGHUP ----------------------------------------------------------------------------------

def user_table(name: str, logs: str = '["syslog"]', commands: str = '["lastlog"]') -> str:
    return (f'[[user]]\nname = "{name}"\ntoken_sha256 = "{sha256(name + "-token")}"\n'
            f"logs = {logs}\ncommands = {commands}\n")


def hup(server, config: Path, text: str, done: str) -> None:
    count = server.log().count(done)
    config.write_text(text)
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: server.log().count(done) > count, timeout=10)


def sign_in(server, name: str):
    client = server.client()
    assert client.ask(f"auth {name} {name}-token") == AUTH_OK
    return client


def test_sighup_that_removes_a_user_closes_its_connection_at_its_next_request(gcmd, tmp_path):
    config = tmp_path / "gcmd.toml"
    config.write_text(user_table("alice") + user_table("bob"))
    server = gcmd("--config", config)
    alice, bob = sign_in(server, "alice"), sign_in(server, "bob")
    hup(server, config, user_table("bob"), "re-read the users")
    alice.send("ping\nping\n")
    assert alice.line() == BYE
    assert alice.closed() and alice.buf == b""
    assert bob.ask("ping") == PONG
    assert bob.ask("whoami") == b"bob\n"
    wait_for(lambda: "Lost client connection. Reason: user alice was removed or changed on SIGHUP" in server.log())
    newcomer = server.client()
    assert newcomer.ask("auth alice alice-token") == AUTH_FAILED


def test_a_removed_users_follow_ends_at_once_and_closes_it(gcmd, tmp_path):
    config = tmp_path / "gcmd.toml"
    config.write_text(user_table("alice", commands='["follow"]') + user_table("bob", commands='["follow"]'))
    server = gcmd("--config", config)
    alice, bob = sign_in(server, "alice"), sign_in(server, "bob")
    assert alice.ask("follow") == BEGIN_FOLLOW
    assert bob.ask("follow") == BEGIN_FOLLOW
    hup(server, config, user_table("bob", commands='["follow"]'), "re-read the users")
    # no line from alice: her follow of a log she may no longer read ends by itself
    assert alice.line() == END_FOLLOW
    assert alice.line() == BYE and alice.closed()
    wait_for(lambda: "Reason: its user was removed or changed on SIGHUP" in server.log())
    with open(server.logfile, "a") as log:
        log.write("after the reload\n")
    assert bob.line() == b"after the reload\n"  # bob, unchanged, follows on
    assert bob.ask("ping") == END_FOLLOW


def test_sighup_that_changes_a_users_grants_closes_its_connection_and_no_other(gcmd, tmp_path):
    config = tmp_path / "gcmd.toml"
    bob_table = user_table("bob", commands='["lastlog", "follow"]')
    config.write_text(user_table("alice") + bob_table)
    server = gcmd("--config", config)
    alice, bob = sign_in(server, "alice"), sign_in(server, "bob")
    assert bob.ask("follow syslog") == BEGIN_FOLLOW
    hup(server, config, user_table("alice", commands='["lastlog", "stats"]') + bob_table, "re-read the users")
    assert alice.ask("whoami") == BYE and alice.closed()
    assert bob.ask("lastlog 1") == END_FOLLOW  # bob's follow and its grants go on
    assert bob.block(b"End lastlog\n")[1] == f"{LOG_LINES[-1]}\n".encode()
    assert bob.ask("stats") == b"An error occured : Permission denied: bob may not use stats\n"
    again = sign_in(server, "alice")  # with the new grants
    assert again.ask("stats") == b"Begin stats\n"


def test_sighup_with_a_bad_table_logs_it_and_keeps_the_old_one(gcmd, tmp_path):
    config = tmp_path / "gcmd.toml"
    config.write_text(user_table("alice"))
    server = gcmd("--config", config)
    alice = sign_in(server, "alice")
    hup(server, config, user_table("alice") + 'tokn = "x"\n', "the users in force stay")
    warning = next(line for line in server.log().splitlines() if "users in force stay" in line)
    assert "WARNING: SIGHUP: --config" in warning and "user 'alice': unknown key 'tokn'" in warning
    assert alice.ask("lastlog 1") == b"Begin lastlog\n"
    assert sign_in(server, "alice").ask("whoami") == b"alice\n"


def test_sighup_that_declares_the_first_users_asks_new_requests_to_authenticate(gcmd, tmp_path):
    config = tmp_path / "gcmd.toml"
    config.write_text("max-clients = 10\n")
    server = gcmd("--config", config)
    early = server.client()
    assert early.ask("ping") == PONG
    hup(server, config, "max-clients = 10\n" + user_table("alice"), "re-read the users")
    assert early.ask("ping") == AUTH_REQUIRED
    assert sign_in(server, "alice").ask("whoami") == b"alice\n"


# --- the server log names the user ------------------------------------------------------------

def test_the_server_log_names_the_user_once_known(gcmd, tmp_path):
    config = tmp_path / "gcmd.toml"
    config.write_text(user_table("alice"))
    server = gcmd("--config", config)
    alice = server.client()
    assert alice.ask("whoami") == b"anonymous\n"
    assert alice.ask("auth alice alice-token") == AUTH_OK
    assert alice.ask("ping") == PONG
    alice.send("exit\n")
    assert alice.closed()
    log = wait_for(lambda: "Lost client connection" in (text := server.log()) and text)
    assert re.search(r"\[Session,\d+,127\.0\.0\.1\] Cmd received from 127\.0\.0\.1 : whoami\n", log)
    assert re.search(r"\[Session,\d+,127\.0\.0\.1,alice\] Cmd received from 127\.0\.0\.1 : ping\n", log)
    assert re.search(r"\[Session,\d+,127\.0\.0\.1,alice\] Lost client connection", log)
    assert "alice-token" not in log


def test_the_json_server_log_has_a_user_key(gcmd, tmp_path):
    config = tmp_path / "gcmd.toml"
    config.write_text(user_table("alice"))
    server = gcmd("--config", config, "--log-format", "json")
    alice = server.client()
    assert alice.ask("auth alice alice-token") == AUTH_OK
    assert alice.ask("ping") == PONG
    lines = wait_for(lambda: [json.loads(line) for line in server.log().splitlines()
                              if '"message": "Cmd received from 127.0.0.1 : ping"' in line])
    assert lines[0]["user"] == "alice" and lines[0]["context"].endswith(",alice")
    connection = next(json.loads(line) for line in server.log().splitlines() if "Client connection" in line)
    assert "user" not in connection


# --- deploy/gcmd.toml ------------------------------------------------------------------------

DEPLOYED = Path(__file__).resolve().parent.parent / "deploy" / "gcmd.toml"


def test_the_deployed_users_file_is_refused_until_its_digests_are_given(tmp_path):
    result = run_gcmd(tmp_path, DEPLOYED.read_text())
    assert result.returncode == 2
    assert "user 'ops': 'token_sha256' must be 64 hex digits" in result.stderr


def test_the_deployed_users_file_serves_its_three_users(gcmd, tmp_path):
    text = DEPLOYED.read_text()
    for name in ("ops", "app", "monitor"):
        text = text.replace(f"REPLACE with the digest of the {name} token", sha256(f"{name}-token"))
    config = tmp_path / "gcmd.toml"
    config.write_text(text)
    (tmp_path / "root" / "app").mkdir(parents=True)
    (tmp_path / "root" / "app" / "build.txt").write_text("build 7\n")
    (tmp_path / "app.log").write_text("started\n")
    server = gcmd("--config", config, logfile=tmp_path / "app.log")
    ops, app, monitor = (sign_in(server, name) for name in ("ops", "app", "monitor"))
    assert [line.split()[0] for line in listed(ops, "logs", b"End logs\n")[1:-1]] == [b"app", b"gcmd"]
    assert listed(app, "logs", b"End logs\n")[1:-1] == [f"app {tmp_path / 'app.log'}\n".encode()]
    assert app.ask("comphash build.txt") == f"File hash is : {sha1_of(tmp_path / 'root/app/build.txt')}\n".encode()
    assert app.ask("stats") == b"An error occured : Permission denied: app may not use stats\n"
    assert monitor.ask("ping") == PONG
    assert monitor.ask("stats") == b"Begin stats\n"
    assert monitor.block(b"End stats\n")[-1] == b"End stats\n"
    assert monitor.ask("lastlog") == b"An error occured : Permission denied: monitor may not use lastlog\n"
