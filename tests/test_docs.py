"""The README and docs/: the commands CI runs, a session a newcomer can repeat, links that lead somewhere."""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import wait_for

HERE = Path(__file__).resolve().parent.parent
README = HERE / "README.md"
PAGES = sorted((HERE / "docs").glob("*.md"))
#: how .ci/run takes the README's Nth code block (it runs blocks 1 and 2)
CI_BLOCK = "/^```/{fence++; next} fence == 2 * want - 1 {print}"


def readme_block(number: int) -> str:
    """The README's code block ``number`` (from 1), as .ci/run extracts it."""
    result = subprocess.run(["awk", "-v", f"want={number}", CI_BLOCK, str(README)], capture_output=True,
                            text=True, timeout=10, check=True)
    return result.stdout


def slug(heading: str) -> str:
    """The anchor GitHub makes of a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def links(page: Path) -> list[tuple[str, str]]:
    """The relative links of a Markdown page, outside code blocks: (path, anchor)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    found = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target):
            path, _, anchor = target.partition("#")
            found.append((path, anchor))
    return found


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {slug(heading) for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_readme_first_two_blocks_are_the_commands_ci_runs():
    assert readme_block(1) == "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/gcmd --port 9999\n"
    assert readme_block(2) == ("python3 -m venv --clear .venv && .venv/bin/pip install -e '.[test]' && "
                               'PATH="$PWD/.venv/bin:$PATH" python -m pytest tests ../shared/conformance\n')


@pytest.mark.parametrize("page", [README, HERE / "SECURITY.md", *PAGES], ids=lambda page: page.name)
def test_links_lead_to_a_file_and_a_heading(page):
    for path, anchor in links(page):
        target = (page.parent / path).resolve() if path else page
        assert target.is_file(), f"{page.name}: {path}"
        if anchor:
            assert anchor in anchors(target), f"{page.name}: {path}#{anchor}"


def test_readme_links_every_page():
    linked = {(README.parent / path).resolve() for path, _ in links(README)}
    assert set(PAGES) <= linked
    assert len(README.read_text().splitlines()) <= 150


def test_configuration_page_lists_every_flag():
    help_text = subprocess.run([sys.executable, "-m", "gcmd", "--help"], capture_output=True, text=True,
                               timeout=20, check=True).stdout
    flags = set(re.findall(r"^\s+(--[a-z-]+)", help_text, re.MULTILINE))
    page = (HERE / "docs" / "configuration.md").read_text()
    assert flags and {flag for flag in flags if f"`{flag}" not in page} == set()


def without_time_and_place(line: str) -> str:
    """A server log line without what changes from run to run: time stamp, port, the demo's directory."""
    line = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+0000 ", "", line)
    line = re.sub(r" port \d+$", " port PORT", line)
    return re.sub(r"^(\[-\] root )\S+/srv,", r"\1DEMO/srv,", line)


@pytest.mark.skipif(shutil.which("nc") is None, reason="netcat is not installed (apt-get install netcat-openbsd)")
def test_readme_session_is_what_gcmd_answers_and_logs(tmp_path):
    start, session, logged = readme_block(3), readme_block(4), readme_block(5)
    # the demo as the README gives it, on a free port, with this Python's gcmd; exec: the shell's
    # process becomes the server, stopped below by its pid
    assert '"$gcmd" --port 9999 --logfile ../app.log' in start
    script = start.replace('"$gcmd" --port 9999', f'exec "{sys.executable}" -m gcmd --port 0')
    out = tmp_path / "server.out"
    with open(out, "wb") as stdout:
        server = subprocess.Popen(["bash", "-c", script], stdout=stdout, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        port = wait_for(lambda: re.search(r"listening on 127\.0\.0\.1 port (\d+)", out.read_text()),
                        timeout=15, message="the README's server did not listen").group(1)
        request, *replies = session.splitlines(keepends=True)
        assert request.startswith("$ ") and request.endswith(" | nc 127.0.0.1 9999\n")
        answer = subprocess.run(["bash", "-c", request[2:].replace("9999", port)], capture_output=True,
                                text=True, timeout=20, check=False)
        assert answer.stdout == "".join(replies)
        wait_for(lambda: "Lost client connection" in out.read_text(), message="the session was not logged")
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C, as the README says
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode == 0
    # the sample log is gcmd's, a request per line: every request of the session is there
    real = [without_time_and_place(line) for line in out.read_text().splitlines()]
    assert [without_time_and_place(line) for line in logged.splitlines()] == real
    for command in request.split("'")[1].split("\\n")[:-1]:
        assert f"[Session,0,127.0.0.1] Cmd received from 127.0.0.1 : {command}" in real
