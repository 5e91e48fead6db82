"""One end-to-end session driven by a real netcat, the way the README shows it."""

import shutil
import subprocess

import pytest
from support import LOG_LINES, sha1_of, wait_for, write_file

pytestmark = pytest.mark.timeout(30)


@pytest.mark.skipif(shutil.which("nc") is None, reason="netcat is not installed (apt-get install netcat-openbsd)")
def test_netcat_session(gcmd):
    server = gcmd()
    notes = write_file(server.root / "notes.txt", 12345)
    session = subprocess.run(["nc", "127.0.0.1", str(server.port)],
                             input=b"ping\ncomphash notes.txt\nlastlog 3\nexit\n",
                             capture_output=True, timeout=20, check=False)
    assert session.returncode == 0, session.stderr
    assert session.stdout == b"".join([
        b"pong\n",
        f"File hash is : {sha1_of(notes)}\n".encode(),
        b"Begin lastlog\n",
        *[(line + "\n").encode() for line in LOG_LINES[-3:]],
        b"End lastlog\n",
    ])
    # the log is written by a thread of its own, within tens of milliseconds
    wait_for(lambda: "Cmd received from 127.0.0.1 : comphash notes.txt" in server.log())
