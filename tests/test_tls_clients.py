"""TLS client certificates (--tls-client-ca), --tls-min-version, and SIGHUP reloading the TLS files.

Every test runs a real ``python -m gcmd`` and real TLS clients; the
certificates are made with openssl, as README shows.
"""

import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from support import AUTH_OK, AUTH_REQUIRED, PONG, Client, free_port, wait_for

from gcmd.config import Config
from gcmd.net.wire import common_name
from gcmd.process.tlsfiles import tls_context, tls_mode

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(shutil.which("openssl") is None,
                                 reason="needs openssl (apt-get install openssl)")]

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def openssl(*args) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=20)


def make_server_certificate(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key."""
    directory.mkdir(exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    openssl("req", "-x509", *_EC, "-days", 2, "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", cert)
    return cert, key


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    openssl("req", "-x509", *_EC, "-days", 2, "-subj", f"/CN=gcmd {name}", "-keyout", key, "-out", cert)
    return cert, key


def make_client_certificate(directory: Path, cn: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A client certificate with subject CN=``cn``, signed by ``ca``, and its key."""
    cert, key, request = directory / f"{cn}.pem", directory / f"{cn}.key", directory / f"{cn}.csr"
    openssl("req", "-new", *_EC, "-subj", f"/CN={cn}", "-keyout", key, "-out", request)
    openssl("x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
            "-days", 2, "-out", cert)
    return cert, key


class Pki:
    """A server certificate, two CAs, and client certificates: alice and bob by
    the CA gcmd trusts, mallory by another."""

    def __init__(self, directory: Path) -> None:
        self.server = make_server_certificate(directory)
        self.ca = make_ca(directory, "ca")
        self.other_ca = make_ca(directory, "other-ca")
        self.alice = make_client_certificate(directory, "alice", self.ca)
        self.bob = make_client_certificate(directory, "bob", self.ca)
        self.mallory = make_client_certificate(directory, "mallory", self.other_ca)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl (apt-get install openssl)")
    return Pki(tmp_path_factory.mktemp("pki"))


def tls_args(pki: Pki, *extra, client_ca: Path | None = None) -> list:
    """The TLS flags of a gcmd serving ``pki.server``; ``client_ca`` asks for client certificates."""
    cert, key = pki.server
    args = ["--tls-cert", cert, "--tls-key", key, *extra]
    return args if client_ca is None else [*args, "--tls-client-ca", client_ca]


def connect(port: int, identity: tuple[Path, Path] | None = None, *,
            max_version: ssl.TLSVersion | None = None) -> Client:
    """A TLS line client showing the certificate and key ``identity`` (or none).

    It does not check the server's certificate: the tests compare its bytes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if identity is not None:
        context.load_cert_chain(*identity)
    if max_version is not None:
        context.maximum_version = max_version
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return Client(port, sock=context.wrap_socket(raw, server_hostname="localhost"))


def refused(port: int, identity: tuple[Path, Path] | None = None, **kw) -> bool:
    """Whether the server ends the handshake of a client showing ``identity``.
    With TLS 1.3 the client finishes its side first and hears of it at its first read."""
    try:
        client = connect(port, identity, **kw)
        client.ask("ping")
    except (ssl.SSLError, ConnectionError):
        return True
    client.close()
    return False


def stats(client: Client) -> dict[str, int]:
    client.send("stats\n")
    lines = client.block(b"End stats\n")[1:-1]
    return {key: int(value) for key, value in (line.decode().split() for line in lines)}


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def renew(directory: Path, cert: Path, key: Path) -> bytes:
    """Put a new certificate and key in place of ``cert`` and ``key``; the new certificate's bytes."""
    new_cert, new_key = make_server_certificate(directory / "renewed")
    os.replace(new_key, key)
    os.replace(new_cert, cert)
    return der(cert)


# --- client certificates --------------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_client_without_a_certificate_is_refused_and_logged(gcmd, pki, version):
    server = gcmd(*tls_args(pki, client_ca=pki.ca[0]))
    assert refused(server.port, max_version=version)
    wait_for(lambda: "WARNING: Refused TLS connection from 127.0.0.1: no client certificate"
             in server.log())
    assert "Client connection from" not in server.log()


def test_a_certificate_from_another_ca_is_refused_and_logged(gcmd, pki):
    server = gcmd(*tls_args(pki, client_ca=pki.ca[0]))
    assert refused(server.port, pki.mallory)
    wait_for(lambda: "WARNING: Refused TLS connection from 127.0.0.1: client certificate not "
             "accepted: unable to get local issuer certificate" in server.log())
    assert "Client connection from" not in server.log()
    client = connect(server.port, pki.alice)
    assert stats(client)["rejected"] == 1


def test_a_client_that_shows_nothing_is_cut_and_logged(gcmd, pki):
    server = gcmd(*tls_args(pki, "--idle-timeout", 1, client_ca=pki.ca[0]))
    silent = Client(server.port)
    assert wait_for(silent.closed, timeout=10)
    wait_for(lambda: "WARNING: Refused TLS connection from 127.0.0.1: TLS handshake not finished "
             "in time" in server.log())


def test_handshakes_under_way_are_capped_by_max_clients(gcmd, pki):
    server = gcmd(*tls_args(pki, "--max-clients", 2, client_ca=pki.ca[0]))
    stalled = [Client(server.port) for _ in range(2)]  # connect, never handshake
    third = Client(server.port)
    # closed at once: not after the 10 s a handshake may take
    assert wait_for(third.closed, timeout=5)
    wait_for(lambda: "WARNING: Refused TLS connection from 127.0.0.1: too many handshakes under way"
             in server.log())
    for client in stalled:
        client.close()
    # once the server has seen them go, a client is served
    wait_for(lambda: not refused(server.port, pki.alice), message="still refused")


def test_handshakes_under_way_from_one_address_are_capped_by_max_per_ip(gcmd, pki):
    server = gcmd(*tls_args(pki, "--max-per-ip", 1, client_ca=pki.ca[0]))
    stalled = Client(server.port)  # from 127.0.0.1, never handshakes
    second = Client(server.port)
    assert wait_for(second.closed, timeout=5)
    wait_for(lambda: "WARNING: Refused TLS connection from 127.0.0.1: too many handshakes under way "
             "from the address" in server.log())
    # another address is served meanwhile
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.load_cert_chain(*pki.alice)
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=("127.0.0.2", 0))
    other = Client(server.port, sock=context.wrap_socket(raw, server_hostname="localhost"))
    assert other.ask("ping") == PONG
    stalled.close()


def test_a_client_reset_before_its_handshake_does_not_hold_a_handshake_count(gcmd, pki):
    server = gcmd(*tls_args(pki, "--max-per-ip", 1, client_ca=pki.ca[0]))
    os.kill(server.proc.pid, signal.SIGSTOP)  # so that the reset comes before the server wraps the socket
    try:
        reset = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()  # RST
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    # that address may still begin a handshake: its count went back to 0
    wait_for(lambda: not refused(server.port, pki.alice), timeout=5, message="alice refused")
    assert "too many handshakes under way" not in server.log()


def test_a_good_certificate_is_served_and_its_cn_is_on_the_connection_line(gcmd, pki):
    server = gcmd(*tls_args(pki, client_ca=pki.ca[0]))
    client = connect(server.port, pki.alice)
    assert client.ask("ping") == PONG
    wait_for(lambda: re.search(r"\[Session,0,127\.0\.0\.1\] Client connection from 127\.0\.0\.1 "
                               r"\(CN=alice\)\n", server.log()))


def test_the_cn_is_a_json_field_of_the_clients_lines_only(gcmd, pki):
    server = gcmd(*tls_args(pki, "--log-format", "json", client_ca=pki.ca[0]))
    client = connect(server.port, pki.alice)
    assert client.ask("ping") == PONG
    wait_for(lambda: "Cmd received" in server.log())
    events = [json.loads(line) for line in server.log().splitlines()]
    connection = next(e for e in events if e["message"].startswith("Client connection from"))
    assert connection["message"] == "Client connection from 127.0.0.1 (CN=alice)"
    assert connection["client_cn"] == "alice"
    command = next(e for e in events if e["message"].startswith("Cmd received"))
    assert command["client_cn"] == "alice"
    assert all("client_cn" not in e for e in events if e["context"] == "-")


def test_without_client_certificates_the_json_lines_have_no_cn(gcmd, pki):
    server = gcmd(*tls_args(pki, "--log-format", "json"))
    assert connect(server.port).ask("ping") == PONG
    wait_for(lambda: "Cmd received" in server.log())
    events = [json.loads(line) for line in server.log().splitlines()]
    connection = next(e for e in events if e["message"].startswith("Client connection from"))
    assert connection["message"] == "Client connection from 127.0.0.1"
    assert all("client_cn" not in e for e in events)


def test_verified_clients_are_counted_as_authenticated(gcmd, pki):
    metrics_port = free_port()
    server = gcmd(*tls_args(pki, "--metrics-port", metrics_port, client_ca=pki.ca[0]))
    alice, bob = connect(server.port, pki.alice), connect(server.port, pki.bob)
    # each is admitted in its own greenlet once its handshake is over: soon after the connect
    wait_for(lambda: stats(alice)["clients"] == 2)
    assert stats(alice)["authenticated"] == 2
    bob.send("exit\n")
    assert bob.closed()
    wait_for(lambda: stats(alice)["authenticated"] == 1)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as page:
        assert "\ngcmd_authenticated 1.0\n" in page.read().decode()


def test_tokens_are_counted_as_authenticated_once(gcmd, tmp_path):
    token = tmp_path / "token"
    token.write_text("secret\n")
    server = gcmd("--token-file", token)
    first, second = server.client(), server.client()
    assert first.ask("auth secret") == AUTH_OK
    assert first.ask("auth secret") == AUTH_OK
    wait_for(lambda: stats(first)["clients"] == 2)  # the second is admitted soon after its connect
    assert stats(first)["authenticated"] == 1
    assert second.ask("auth secret") == AUTH_OK
    assert stats(first)["authenticated"] == 2
    second.send("exit\n")
    assert second.closed()
    wait_for(lambda: stats(first)["authenticated"] == 1)


def test_with_a_token_too_a_client_needs_both(gcmd, pki, tmp_path):
    token = tmp_path / "token"
    token.write_text("secret\n")
    server = gcmd(*tls_args(pki, "--token-file", token, client_ca=pki.ca[0]))
    assert refused(server.port)  # the token cannot replace the certificate
    alice, bob = connect(server.port, pki.alice), connect(server.port, pki.bob)
    assert alice.ask("ping") == AUTH_REQUIRED  # nor the certificate the token
    assert alice.ask("auth secret") == AUTH_OK
    assert alice.ask("ping") == PONG
    figures = stats(alice)
    assert (figures["clients"], figures["authenticated"]) == (2, 1)
    assert bob.ask("auth secret") == AUTH_OK
    assert stats(alice)["authenticated"] == 2


def test_openssl_s_client_with_a_certificate(gcmd, pki):
    server = gcmd(*tls_args(pki, client_ca=pki.ca[0]))
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-CAfile",
               str(pki.server[0]), "-verify_return_error", "-quiet", "-ign_eof"]
    with_cert = subprocess.run([*command, "-cert", str(pki.alice[0]), "-key", str(pki.alice[1])],
                               input=b"ping\nexit\n", capture_output=True, timeout=20, check=False)
    assert (with_cert.returncode, with_cert.stdout) == (0, PONG), with_cert.stderr
    without = subprocess.run(command, input=b"ping\nexit\n", capture_output=True, timeout=20,
                             check=False)
    assert without.stdout == b"" and b"alert certificate required" in without.stderr
    wait_for(lambda: "Client connection from 127.0.0.1 (CN=alice)" in server.log()
             and "Refused TLS connection from 127.0.0.1: no client certificate" in server.log())


@pytest.mark.skipif(shutil.which("socat") is None, reason="needs socat (apt-get install socat)")
def test_socat_with_a_certificate(gcmd, pki):
    server = gcmd(*tls_args(pki, client_ca=pki.ca[0]))
    (cert, key), (server_cert, _) = pki.alice, pki.server
    result = subprocess.run(
        ["socat", "-", f"OPENSSL:127.0.0.1:{server.port},cert={cert},key={key},cafile={server_cert}"],
        input=b"ping\nexit\n", capture_output=True, timeout=20, check=False)
    assert (result.returncode, result.stdout) == (0, PONG), result.stderr


# --- TLS versions and the start-up line --------------------------------------------------------


def test_a_tls_1_3_server_refuses_a_tls_1_2_client(gcmd, pki):
    server = gcmd(*tls_args(pki, "--tls-min-version", "1.3"))
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        connect(server.port, max_version=ssl.TLSVersion.TLSv1_2)
    client = connect(server.port)
    assert client.sock.version() == "TLSv1.3" and client.ask("ping") == PONG


def test_the_default_serves_tls_1_2_clients(gcmd, pki):
    server = gcmd(*tls_args(pki))
    client = connect(server.port, max_version=ssl.TLSVersion.TLSv1_2)
    assert client.sock.version() == "TLSv1.2" and client.ask("ping") == PONG


@pytest.mark.parametrize(("extra", "mode"), [
    ([], "(TLS 1.2+, server certificate only)"),
    (["--tls-min-version", "1.3"], "(TLS 1.3+, server certificate only)"),
    (["--client-ca"], "(TLS 1.2+, client certificates required)"),
    (["--client-ca", "--workers", 2], "(TLS 1.2+, client certificates required), 2 workers"),
])
def test_the_start_up_line_states_the_tls_mode(gcmd, pki, extra, mode):
    client_ca = pki.ca[0] if "--client-ca" in extra else None
    extra = [arg for arg in extra if arg != "--client-ca"]
    server = gcmd(*tls_args(pki, *extra, client_ca=client_ca))
    assert re.search(rf"listening on 127\.0\.0\.1 port {server.port} {re.escape(mode)}\n", server.log())


def test_the_start_up_line_of_plain_tcp_names_no_tls(gcmd):
    server = gcmd()
    assert re.search(rf"listening on 127\.0\.0\.1 port {server.port}\n", server.log())


# --- SIGHUP ----------------------------------------------------------------------------------------


def test_sighup_serves_a_renewed_certificate_to_new_connections(gcmd, pki, tmp_path):
    cert, key = make_server_certificate(tmp_path)
    server = gcmd("--tls-cert", cert, "--tls-key", key)
    old = connect(server.port)
    assert old.sock.getpeercert(binary_form=True) == der(cert)
    renewed = renew(tmp_path, cert, key)
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: reopened the log output and re-read the TLS files" in server.log())
    assert connect(server.port).sock.getpeercert(binary_form=True) == renewed
    assert old.ask("ping") == PONG


def test_sighup_reads_the_client_ca_again(gcmd, pki, tmp_path):
    ca = tmp_path / "client-ca.pem"
    shutil.copy(pki.ca[0], ca)
    server = gcmd(*tls_args(pki, client_ca=ca))
    alice = connect(server.port, pki.alice)
    shutil.copy(pki.other_ca[0], ca)
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "re-read the TLS files" in server.log())
    assert connect(server.port, pki.mallory).ask("ping") == PONG
    assert refused(server.port, pki.bob)
    assert alice.ask("ping") == PONG


@pytest.mark.parametrize("breakage", ["key that does not match", "missing client CA"])
def test_a_bad_reload_keeps_serving_with_the_old_files(gcmd, pki, tmp_path, breakage):
    cert, key = make_server_certificate(tmp_path)
    ca = tmp_path / "client-ca.pem"
    shutil.copy(pki.ca[0], ca)
    server = gcmd("--tls-cert", cert, "--tls-key", key, "--tls-client-ca", ca)
    old = connect(server.port, pki.alice)
    if breakage == "missing client CA":
        ca.unlink()
        why = f"cannot use --tls-client-ca {ca}"
    else:
        _, other_key = make_server_certificate(tmp_path / "other")
        os.replace(other_key, key)
        why = f"--tls-key {key} is not the key of the certificate in --tls-cert {cert}"
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "the previous TLS files stay in force" in server.log())
    warning = next(line for line in server.log().splitlines() if "SIGHUP" in line)
    assert f"WARNING: SIGHUP: {why}" in warning
    assert "re-read the TLS files" not in server.log()
    new = connect(server.port, pki.alice)
    assert new.sock.getpeercert(binary_form=True) == der(cert)
    assert new.ask("ping") == PONG and old.ask("ping") == PONG
    assert server.proc.poll() is None


def test_sighup_renews_the_certificate_in_every_worker(gcmd, pki, tmp_path):
    cert, key = make_server_certificate(tmp_path)
    server = gcmd("--tls-cert", cert, "--tls-key", key, "--workers", 2)
    wait_for(lambda: server.log().count("serving port") == 2)
    old = [connect(server.port) for _ in range(4)]
    renewed = renew(tmp_path, cert, key)
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: server.log().count("re-read the TLS files") == 2)
    for _ in range(10):
        assert connect(server.port).sock.getpeercert(binary_form=True) == renewed
    assert all(client.ask("ping") == PONG for client in old)


# --- the settings -------------------------------------------------------------------------------


def test_the_context_keeps_the_standard_librarys_ciphers_and_options(pki):
    (cert, key), ca = pki.server, pki.ca[0]
    for minimum, client_ca in (("1.2", None), ("1.3", str(ca))):
        context = tls_context(Config(root=".", tls_cert=str(cert), tls_key=str(key),
                                     tls_min_version=minimum, tls_client_ca=client_ca))
        default = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        assert [c["name"] for c in context.get_ciphers()] == [c["name"] for c in default.get_ciphers()]
        assert context.options & default.options == default.options
        assert context.options & ssl.OP_NO_RENEGOTIATION
        assert context.minimum_version == {"1.2": ssl.TLSVersion.TLSv1_2,
                                           "1.3": ssl.TLSVersion.TLSv1_3}[minimum]
        assert context.verify_mode == (ssl.CERT_NONE if client_ca is None else ssl.CERT_REQUIRED)


@pytest.mark.parametrize(("settings", "mode"), [
    ({}, ""),
    ({"tls_cert": "c", "tls_key": "k"}, " (TLS 1.2+, server certificate only)"),
    ({"tls_cert": "c", "tls_key": "k", "tls_min_version": "1.3"}, " (TLS 1.3+, server certificate only)"),
    ({"tls_cert": "c", "tls_key": "k", "tls_client_ca": "ca"}, " (TLS 1.2+, client certificates required)"),
])
def test_tls_mode(settings, mode):
    assert tls_mode(Config(root=".", **settings)) == mode


@pytest.mark.parametrize(("certificate", "cn"), [
    ({"subject": ((("countryName", "FR"),), (("commonName", "alice"),))}, "alice"),
    ({"subject": ((("organizationName", "lab"),),)}, ""),
    ({"subject": ((("commonName", "eve\nWARNING: forged"),),)}, "eve\\x0aWARNING: forged"),
])
def test_common_name(certificate, cn):
    assert common_name(certificate) == cn


def run_gcmd(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gcmd", "--port", "0", *map(str, args)],
                          capture_output=True, text=True, timeout=20, check=False)


def test_bad_tls_settings_exit_2(pki, tmp_path):
    cert, key = pki.server
    cases = [
        (["--tls-client-ca", pki.ca[0]], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--tls-min-version", "1.3"], "--tls-min-version needs --tls-cert and --tls-key"),
        (["--tls-cert", cert, "--tls-key", key, "--tls-min-version", "1.1"], "invalid choice: '1.1'"),
        (["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", tmp_path / "none.pem"],
         f"cannot read --tls-client-ca {tmp_path / 'none.pem'}: no such file"),
        (["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", key],
         f"cannot use --tls-client-ca {key}"),
    ]
    for args, message in cases:
        result = run_gcmd(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_the_tls_settings_are_keys_of_the_config_file(gcmd, pki, tmp_path):
    (cert, key), ca = pki.server, pki.ca[0]
    config = tmp_path / "gcmd.toml"
    config.write_text(f'tls-cert = "{cert}"\ntls-key = "{key}"\ntls-client-ca = "{ca}"\n'
                      f'tls-min-version = "1.3"\n')
    server = gcmd("--config", config)
    assert "(TLS 1.3+, client certificates required)" in server.log()
    assert refused(server.port)
    assert connect(server.port, pki.alice).ask("ping") == PONG
