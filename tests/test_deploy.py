"""The deployment files: deploy/haproxy.cfg in front of two gcmd, and deploy/gcmd.service."""

import re
import select
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import Client, free_port, ipv6_loopback, wait_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"

pytestmark = pytest.mark.timeout(60)


def ask_from(address: str, port: int, request: str) -> bytes:
    """Ask one request from a connection whose source is ``address`` (another loopback address)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(address, 0))
    client = Client(port, sock=sock)
    try:
        client.send(request + "\n")
        return b"".join(client.block(b"End stats\n")) if request == "stats" else client.line()
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy (apt-get install haproxy)")
def test_haproxy_example_fronts_two_gcmd_and_they_log_the_client(gcmd, tmp_path):
    backends = [gcmd("--proxy-protocol", "--max-per-ip", 3) for _ in range(2)]
    front = free_port()
    config = (DEPLOY / "haproxy.cfg").read_text()
    config = config.replace("127.0.0.1:9999", f"127.0.0.1:{front}")
    config = config.replace("127.0.0.1:10001", f"127.0.0.1:{backends[0].port}")
    config = config.replace("127.0.0.1:10002", f"127.0.0.1:{backends[1].port}")
    assert re.findall(r"server gcmd\d 127\.0\.0\.1:(\d+)", config) == [str(b.port) for b in backends]
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    check = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True,
                           timeout=20, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    out = (tmp_path / "haproxy.out").open("wb")
    haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=out,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        # the health checks speak the protocol behind a PROXY v2 LOCAL header
        for backend in backends:
            wait_for(lambda b=backend: "Cmd received from 127.0.0.1 : ping" in b.log(), timeout=15)
        # both serve: new connections from 127.0.0.2 reach both instances
        pids = set()

        def both_answered() -> bool:
            stats = ask_from("127.0.0.2", front, "stats")
            pids.add(re.search(rb"\npid (\d+)\n", stats).group(1))
            return len(pids) == 2

        wait_for(both_answered, timeout=15, interval=0)
        for backend in backends:
            # a command may be logged after its reply has reached the client
            wait_for(lambda b=backend: "Cmd received from 127.0.0.2 : stats" in b.log())
            assert "Client connection from 127.0.0.2" in backend.log()
        assert ask_from("127.0.0.3", front, "ping") == b"pong\n"
        # --max-per-ip counts the client behind HAProxy, not HAProxy itself
        held = [socket.create_connection(("127.0.0.1", front), timeout=10, source_address=("127.0.0.4", 0))
                for _ in range(8)]
        try:
            wait_for(lambda: sum(b.log().count("Too many connections from 127.0.0.4. bye !")
                                 for b in backends) == 2)
            refused = wait_for(lambda: len(ready := select.select(held, [], [], 0)[0]) == 2 and ready)
            for sock in held:
                client = Client(front, sock=sock)
                if sock in refused:
                    assert client.line() == b"Too many connections from your address. bye !\n"
                else:
                    assert client.ask("ping") == b"pong\n"
        finally:
            for sock in held:
                sock.close()
    finally:
        haproxy.terminate()
        haproxy.wait(10)
        out.close()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy (apt-get install haproxy)")
@pytest.mark.skipif(not ipv6_loopback(), reason="needs an IPv6 loopback (::1)")
@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_haproxy_v4v6_bind_logs_an_ipv4_client_as_ipv4(gcmd, tmp_path, send_proxy):
    # an IPv6 socket that takes IPv4 connections (v4v6) sees 127.0.0.1 as
    # ::ffff:127.0.0.1 and names it so in its PROXY header; the v4-mapped
    # loopback address keeps the test on loopback, where :: would listen everywhere
    backend = gcmd("--proxy-protocol")
    front = free_port()
    path = tmp_path / "haproxy.cfg"
    path.write_text(f"""\
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend gcmd
    bind [::ffff:127.0.0.1]:{front} v4v6
    default_backend gcmd
backend gcmd
    server gcmd1 127.0.0.1:{backend.port} {send_proxy}
""")
    out = (tmp_path / "haproxy.out").open("wb")
    haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=out,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: ask_or_none(front, "ping"), timeout=15) == b"pong\n"
        wait_for(lambda: "Cmd received from 127.0.0.1 : ping" in backend.log())
        assert "Client connection from 127.0.0.1\n" in backend.log()
        assert "::ffff:" not in backend.log()
    finally:
        haproxy.terminate()
        haproxy.wait(10)
        out.close()


def ask_or_none(port: int, request: str) -> bytes | None:
    """The reply over IPv4 to 127.0.0.1, or None while nothing listens there yet."""
    try:
        client = Client(port)
    except ConnectionRefusedError:
        return None
    try:
        return client.ask(request)
    finally:
        client.close()


def unit_settings(text: str) -> list[tuple[str, str]]:
    """The (key, value) settings of a unit, comments left out."""
    return [tuple(line.split("=", 1)) for line in text.splitlines()
            if "=" in line and not line.startswith(("#", ";"))]


def unit_overrides(text: str) -> list[str]:
    """The overrides the unit's comments show: each indented ``[Service]`` block."""
    blocks = re.findall(r"^#     \[Service\]\n((?:#     \S.*\n)+)", text, re.MULTILINE)
    return ["[Service]\n" + re.sub(r"^#     ", "", block, flags=re.MULTILINE) for block in blocks]


def verify(tmp_path, text: str) -> subprocess.CompletedProcess:
    gcmd = shutil.which("gcmd") or "/bin/true"
    local = tmp_path / "gcmd.service"
    local.write_text(text.replace("/opt/gcmd/bin/gcmd", gcmd))
    return subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True,
                          text=True, timeout=30, check=False)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (apt-get install systemd)")
def test_systemd_unit_is_valid_and_confined(tmp_path):
    unit = (DEPLOY / "gcmd.service").read_text()
    for directive in ("DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes",
                      "ReadOnlyPaths=-/srv/gcmd"):
        assert directive in unit
    result = verify(tmp_path, unit)
    # systemd-analyze exits 0 for an unknown key too, and says so
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (apt-get install systemd)")
def test_systemd_unit_overrides_in_its_comments_are_valid(tmp_path):
    unit = (DEPLOY / "gcmd.service").read_text()
    overrides = unit_overrides(unit)
    assert len(overrides) == 2
    for override in overrides:
        result = verify(tmp_path, unit + "\n" + override)
        assert (result.returncode, result.stderr) == (0, ""), override


def test_systemd_unit_serves_no_system_log_unless_told():
    unit = (DEPLOY / "gcmd.service").read_text()
    settings = unit_settings(unit)
    command = dict(settings)["ExecStart"].split()
    logs = [command[i + 1] for i, word in enumerate(command) if word == "--logfile"]
    # a log is named, so that gcmd does not fall back to the system's
    assert logs == ["/var/log/app/app.log"]
    assert ("ReadOnlyPaths", "-/srv/gcmd -/var/log/app/app.log") in settings
    assert "SupplementaryGroups" not in dict(settings)
    # the overrides that serve a system log add the group that reads it
    served = {}
    for override in unit_overrides(unit):
        extra = dict(unit_settings(override))
        served[extra["SupplementaryGroups"]] = extra["ExecStart"].split("--logfile ")[1].split()[0]
    assert served == {"adm": "/var/log/syslog", "systemd-journal": "journal"}
    # SECURITY.md says the same
    security = " ".join((DEPLOY.parent / "SECURITY.md").read_text().split())
    assert "It serves an application's log, `/var/log/app/app.log`, and no system log" in security
    for group in served:
        assert f"`SupplementaryGroups={group}`" in security


def test_systemd_unit_documentation_is_what_its_install_leaves():
    unit = (DEPLOY / "gcmd.service").read_text()
    checkout = re.search(r"^#   git clone /path/to/gcmd (\S+)$", unit, re.MULTILINE).group(1)
    documents = dict(unit_settings(unit))["Documentation"].split()
    assert documents
    for url in documents:
        path = url.removeprefix("file://")
        assert path.startswith(checkout + "/"), url
        assert (DEPLOY.parent / path.removeprefix(checkout + "/")).is_file(), url


@pytest.mark.timeout(60)
def test_license_is_mit_and_packaged(tmp_path):
    text = (DEPLOY.parent / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the gcmd authors\n")
    assert "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND" in text
    assert re.search(r"^license = MIT$", (DEPLOY.parent / "setup.cfg").read_text(), re.MULTILINE)
    # setuptools finds it: the metadata of every sdist and wheel names it
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "egg_info",
                    "--egg-base", str(tmp_path)], cwd=DEPLOY.parent, check=True, timeout=50,
                   capture_output=True)
    metadata = (tmp_path / "gcmd.egg-info" / "PKG-INFO").read_text()
    assert "License-File: LICENSE" in metadata.splitlines()
