"""Log queries (PROTOCOL.md, "Log queries (1.2)") and ``version``.

Black-box through a real server.
"""

from __future__ import annotations

import pytest

from gcmd import __version__

pytestmark = pytest.mark.timeout(30)


def test_version_answers_the_version_and_protocol_1_2_without_authentication(gcmd, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    client = gcmd("--token-file", token).client()
    assert client.ask("version") == f"gcmd {__version__} protocol 1.2\n".encode()
    assert client.ask("ping") == b"Authentication required.\n"
