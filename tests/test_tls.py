"""TLS: the protocol inside TLS, and every end of a TLS session sent as close_notify."""

import shutil
import signal
import socket
import ssl
import subprocess

import pytest
from support import IDLE_TIMEOUT, PONG, SHUTTING_DOWN, Client, tls_client, wait_for

pytestmark = pytest.mark.timeout(30)


def read_to_the_end(client) -> bytes:
    """What is left until the server ends the stream; with suppress_ragged_eofs
    off, an end without close_notify raises ssl.SSLEOFError."""
    data = client.buf
    while chunk := client.sock.recv(4096):
        data += chunk
    return data


@pytest.mark.parametrize("how", ["exit", "idle timeout", "shutdown"])
def test_every_end_of_a_tls_session_sends_close_notify(gcmd, certificate, how):
    cert, key = certificate
    server = gcmd("--tls-cert", cert, "--tls-key", key, "--idle-timeout", 1)
    client = tls_client(server.port, cert, suppress_ragged_eofs=False)
    assert client.ask("ping") == PONG
    if how == "exit":
        client.send("exit\n")
        assert read_to_the_end(client) == b""
    elif how == "idle timeout":
        assert read_to_the_end(client) == IDLE_TIMEOUT
    else:
        server.proc.send_signal(signal.SIGTERM)
        assert read_to_the_end(client) == SHUTTING_DOWN
        assert server.proc.wait(15) == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl (apt-get install openssl)")
def test_openssl_s_client_sees_a_clean_end(gcmd, certificate):
    cert, key = certificate
    server = gcmd("--tls-cert", cert, "--tls-key", key)
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-CAfile", str(cert),
         "-verify_return_error", "-quiet", "-ign_eof"],
        input=b"ping\nexit\n", capture_output=True, timeout=20, check=False)
    assert result.stdout == PONG
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"unexpected eof" not in result.stderr


def test_a_client_that_finishes_its_handshake_after_shutdown_began_gets_the_goodbye(gcmd, certificate):
    cert, key = certificate
    server = gcmd("--tls-cert", cert, "--tls-key", key)
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    wait_for(lambda: "Client connection from" in server.log())
    server.proc.send_signal(signal.SIGTERM)
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    client = Client(server.port, sock=context.wrap_socket(raw, server_hostname="localhost",
                                                          suppress_ragged_eofs=False))
    assert read_to_the_end(client) == SHUTTING_DOWN
    assert server.proc.wait(15) == 0
