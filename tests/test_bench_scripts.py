"""The benchmark scripts run and print their tables (their figures are judged elsewhere)."""

import importlib
import itertools
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent
SCRIPTS = HERE / "scripts"
BENCH = SCRIPTS / "bench"
#: the page that shows the targets and the figures of a full run
PAGE = HERE / "docs" / "benchmarks.md"

#: the page's figures table: its rows and columns as scripts/bench names them
TABLE_ROWS = {"ping, 1 connection": "ping 1c", "ping, 10 connections": "ping 10c",
               "ping, 100 connections": "ping 100c", "ping, 100 x 16 in flight": "ping 100c x16",
               "comphash 1 MiB, 10 conn.": "comphash 1MiB 10c", "lastlog, 10 connections": "lastlog 10c",
               "lastlog, 10 conn., log +500 lines/s": "lastlog 10c +500/s",
               "ping p99 beside it (ms)": "ping beside lastlog",
               "memory per idle connection": "idle KiB/conn", "slowest of 10,000 connects": "idle KiB/conn",
               "connect, ping, close": "churn"}
TABLE_COLUMNS = {"gcmd": "gcmd", "gcmd@base": "gcmd@base", "gcmd+log": "gcmd+log", "gcmd+json": "gcmd+json",
                  "gcmd-w2": "gcmd-w2", "naive gevent": "naive_gevent", "Twisted": "twisted", "asyncio": "asyncio",
                  "uvloop": "uvloop"}
#: the page's follow table: the rows that targets bound, as the follow cell names their figures
TABLE_FOLLOW = {"followers that missed a line or got one out of order": "incomplete",
                 "delivery p99": "delivery_p99_ms", "ping p99 of another client": "ping_p99_ms"}


def scripts_module(name: str):
    """A module of scripts/ (bench_logs, bench_report), imported as scripts/bench imports it."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(name)


def run_bench(*args, timeout: float = 55) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=False)


def page_table(start: str) -> list[list[str]]:
    """The cells of the page's table whose first line starts with ``start``, its header first."""
    table = start + PAGE.read_text().split("\n" + start)[1].split("\n\n")[0]
    rows = [[c.strip() for c in line.strip(" |").split("|")] for line in table.splitlines()]
    return [rows[0], *rows[2:]]


def page_figures() -> dict:
    """The page's tables of figures as scripts/bench's results: {server: {cell: figures}}."""
    header, *rows = page_table("| cell | gcmd | gcmd@base |")
    results = {TABLE_COLUMNS[name]: {} for name in header[1:]}
    for label, *cells in rows:
        for name, text in zip(header[1:], cells):
            figures = results[TABLE_COLUMNS[name]].setdefault(TABLE_ROWS[label], {})
            number = float(text.split(" ")[0].rstrip(",").replace(",", ""))
            if text.endswith(" KiB"):
                figures["kib"] = number
            elif label.startswith("slowest"):
                figures["slowest_connect_s"] = number / 1000
            elif label.startswith("ping p99"):
                figures["p99_ms"] = number
            else:
                figures["rps"] = number
                if " p99 " in text:
                    figures["p99_ms"] = float(text.split(" p99 ")[1])
    _, *rows = page_table("| follow, gcmd:")
    results["gcmd"]["follow"] = {TABLE_FOLLOW[label]: float(median.split(" ")[0])
                                 for label, median, *_ in rows if label in TABLE_FOLLOW}
    return results


def page_missed() -> set[tuple[str, str]]:
    """The targets the page says its figures miss: (cell, target as --targets states it)."""
    page = PAGE.read_text()
    if "That run met every target." in page:
        return set()
    listed = page.split("The run above missed these targets")[1].split("\n\n")[1]
    return {tuple(line.removeprefix("- ").replace("`", "").split(": ", 1)) for line in listed.splitlines()}


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bench_quick_is_a_smoke_test_that_checks_no_target():
    result = run_bench("--quick", "--only", "gcmd,naive_gevent", "--duration", 0.5, "--idle", 300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for text in ("ping 100c x16", "comphash 1MiB 10c", "lastlog 10c", "churn", "idle KiB/conn",
                 "ratios of gcmd", "the server's CPU time per request"):
        assert text in result.stdout, text
    cpu = result.stdout.split("the server's CPU time per request")[1]
    gcmd_us, naive_us, ratio = re.search(r"^ping 100c x16\s+([\d.]+) us\s+([\d.]+) us ([\d.]+)x$", cpu, re.MULTILINE).groups()
    assert 0 < float(gcmd_us) < 1000 and 0 < float(naive_us) < 1000
    assert float(ratio) == pytest.approx(float(naive_us) / float(gcmd_us), rel=0.02)  # of the rounded figures
    assert "targets:" not in result.stdout and "FAIL" not in result.stdout
    assert result.stdout.strip().splitlines()[-1] == (
        "quick run: a smoke test, every cell ran; no target checked (1 s cells on a shared "
        "machine move too much to judge: run without --quick)")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bench_rounds_give_each_ratio_its_range():
    result = run_bench("--quick", "--only", "gcmd,naive_gevent", "--duration", 0.3, "--idle", 0, "--runs", 2,
                       "--followers", 0)
    assert result.returncode == 0, result.stderr[-2000:]
    ratios = result.stdout.split("ratios of gcmd")[1].split("quick run:")[0]
    row = next(line for line in ratios.splitlines() if line.startswith("ping 10c"))
    median, low, high = re.fullmatch(r"ping 10c\s+([\d.]+)x \[([\d.]+)-([\d.]+)\]", row).groups()
    assert float(low) <= float(median) <= float(high)


def test_bench_report_of_one_server_says_there_is_nothing_to_compare(capsys):
    report = scripts_module("bench_report")
    report.report({"gcmd": {"ping 1c": {"rps": 12000.0}, "churn": {"rps": 2900.0}}},
                  {"gcmd": [{"ping 1c": {"rps": 12000.0}, "churn": {"rps": 2900.0}}]})
    out = capsys.readouterr().out
    assert re.search(r"^ping 1c\s+12000/s$", out, re.MULTILINE)
    assert "ratios of" not in out
    assert out.strip().splitlines()[-1] == ("no ratios: gcmd is the only server measured, nothing to "
                                            "compare it with (add one: --only gcmd,naive_gevent, or --baseline DIR)")


def test_bench_reports_the_cpu_time_per_request_beside_gcmds_with_the_range_of_the_rounds(capsys):
    def cells(ping, churn):
        return {"ping 10c": {"rps": 1000.0, "cpu_us": ping}, "churn": {"rps": 100.0, "cpu_us": churn},
                "idle KiB/conn": {"kib": 10.0}}
    rounds = {"gcmd": [cells(10.0, 100.0), cells(12.0, 120.0)], "naive_gevent": [cells(15.0, 90.0), cells(12.0, 150.0)]}
    results = {"gcmd": cells(11.0, 110.0), "naive_gevent": cells(13.5, 120.0)}
    scripts_module("bench_report").report_cpu(results, rounds)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("the server's CPU time per request, in microseconds")
    assert re.split(r"\s{2,}", lines[1]) == ["cell", "gcmd", "naive_gevent"]
    assert re.split(r"\s{2,}", lines[2]) == ["ping 10c", "11.00 us", "13.50 us 1.23x [1.00-1.50]"]
    assert re.split(r"\s{2,}", lines[3]) == ["churn", "110.00 us", "120.00 us 1.09x [0.90-1.25]"]
    assert len(lines) == 4  # idle memory has no CPU time


def test_bench_reports_no_cpu_time_without_gcmd(capsys):
    scripts_module("bench_report").report_cpu({"naive_gevent": {"ping 10c": {"rps": 1.0, "cpu_us": 9.0}}}, {})
    assert capsys.readouterr().out == ""


def test_bench_targets_are_the_table_of_the_benchmarks_page():
    result = run_bench("--targets", timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("| cell | target of a full run |\n")
    assert "\n" + result.stdout in PAGE.read_text()


def test_documented_figures_meet_the_targets_but_those_listed_as_missed(capsys):
    results = page_figures()
    assert set(results["gcmd"]) == {*TABLE_ROWS.values(), "follow"}
    report = scripts_module("bench_report")
    missed = {re.fullmatch(r"(.+?): .+ \((.+)\)", text).groups() for text in report.check(results)}
    assert missed == page_missed()
    # every target was judged: none is about a cell or a server the tables lack,
    # but the log query cells, whose figures the page does not give yet
    undocumented = {cell for cell, _ in report.TARGETS} - set(results["gcmd"])
    assert undocumented <= set(scripts_module("bench_queries").CELLS)
    out = capsys.readouterr().out
    assert out.count("PASS") + out.count("FAIL") == len([t for t in report.TARGETS if t[0] not in undocumented])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_baseline_measures_another_checkout_side_by_side(tmp_path):
    base = tmp_path / "before"
    shutil.copytree(HERE / "gcmd", base / "gcmd", ignore=shutil.ignore_patterns("__pycache__"))
    init = base / "gcmd" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "0.0.0+before-'))
    result = run_bench("--only", "gcmd", "--baseline", base, "--quick", "--duration", 0.3, "--idle", 50,
                       "--runs", 2, timeout=110)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(rf"^gcmd@base: gcmd 0\.0\.0\+before-\S+ from {re.escape(str(base))}$", result.stdout, re.MULTILINE)
    rounds = [line.split()[1:3] for line in result.stdout.splitlines() if line.startswith("round ")]
    # each round starts one server further on
    assert rounds == [["1:", "gcmd"], ["1:", "gcmd@base"], ["2:", "gcmd@base"], ["2:", "gcmd"]]
    table, ratios = result.stdout.split("ratios of gcmd to each server")
    assert re.search(r"^cell\s+gcmd\s+gcmd@base$", table, re.MULTILINE)
    assert re.search(r"^cell\s+gcmd@base$", ratios, re.MULTILINE)
    cells = ["ping 1c", "ping 10c", "ping 100c", "ping 100c x16", "comphash 1MiB 10c", "lastlog 10c",
             "idle KiB/conn", "churn"]
    for cell in cells:
        # 50 idle connections may grow the server's memory by less than the
        # allocator's noise: that ratio is n/a, never a negative number
        ratio = r"(\d+\.\d\dx|n/a)" if cell == "idle KiB/conn" else r"\d+\.\d\dx"
        assert re.search(rf"^{re.escape(cell)}\s+{ratio}( \[\S+\])?$", ratios, re.MULTILINE), cell


def test_bench_baseline_must_be_a_checkout_of_gcmd(tmp_path):
    result = run_bench("--only", "gcmd", "--baseline", tmp_path, "--quick", timeout=20)
    assert result.returncode == 2
    assert result.stderr.startswith(f"bench: {tmp_path} is not a checkout of gcmd that Python imports "
                                    f"with PYTHONPATH={tmp_path}: ")
    assert "round 1" not in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_bench_hash_quick_is_a_smoke_test_that_prints_every_figure():
    result = subprocess.run([sys.executable, str(HERE / "scripts" / "bench_hash.py"), "--quick",
                             "--seconds", "1", "--pings", "200"],
                            capture_output=True, text=True, timeout=85, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for text in ("time / openssl", "peak RSS growth", "4 clients hashing", "lastlog, static",
                 "lastlog, growing", "lastlog/s at 10 clients"):
        assert text in result.stdout, text
    # what stats says after each lastlog load: requests answered, none failed, no reader process
    for log in ("static", "growing"):
        assert re.search(rf"^  {log} log: +commands [1-9]\d*, errors 0, log\.{log}\.lines_read 0, "
                         rf"log\.{log}\.reader_restarts 0$", result.stdout, re.MULTILINE), log
    assert "PASS" not in result.stdout and "FAIL" not in result.stdout
    assert result.stdout.strip().splitlines()[-1] == (
        "quick run: a smoke test, every figure measured; no target checked")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bench_log_cells_quick():
    result = run_bench("--quick", "--logs-only", "--only", "gcmd,naive_gevent", "--duration", 0.5,
                       "--followers", 20, "--follow-seconds", 1)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = result.stdout.split("ratios of gcmd")[0]
    assert re.search(r"^lastlog 10c \+500/s\s+\d+/s p99 [\d.]+\s+\d+/s p99 [\d.]+$", table, re.MULTILINE)
    assert re.search(r"^ping beside lastlog\s+p99 [\d.]+ ms\s+p99 [\d.]+ ms$", table, re.MULTILINE)
    for cell in ("ping 10c", "comphash", "idle KiB/conn", "churn"):
        assert cell not in table, cell
    follow = result.stdout.split("follow (gcmd only: the peers have no follow): 20 followers, 1000 lines")[1]
    assert re.search(r"^  followers that missed a line or got one out of order\s+0$", follow, re.MULTILINE)
    for label in ("delivery p99", "ping p99 from another client", "server CPU, first write to last receipt",
                  "server RSS per follower, parked"):
        assert re.search(rf"^  {label}\s+[\d.]+ \w+$", follow, re.MULTILINE), label
    assert "follow (naive_gevent" not in result.stdout
    assert "targets:" not in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bench_rows_that_log_get_their_share_of_gcmd_beside_what_is_asked(tmp_path):
    result = run_bench("--quick", "--only", "gcmd,gcmd+log,gcmd+json", "--duration", 0.3, "--idle", 0,
                       "--followers", 0)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    own = result.stdout.split("the server's own log, for information (not checked)")[1]
    assert re.search(r"^cell\s+gcmd\+log / gcmd\s+gcmd\+json / gcmd$", own, re.MULTILINE)
    for cell, log, json_share in (("ping 10c", "0.8", "0.7"), ("ping 100c", "0.8", None),
                                  ("ping 100c x16", "0.5", None)):
        asked = rf"\(>= {json_share}x: (met|not met)\)" if json_share else r"\(-\)"
        assert re.search(rf"^{re.escape(cell)}\s+[\d.]+x \(>= {log}x: (met|not met)\)\s+[\d.]+x {asked}$",
                         own, re.MULTILINE), cell
    assert "follow (" not in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bench_log_query_cells_quick():
    result = run_bench("--quick", "--logs-only", "--only", "gcmd", "--duration", 0.5, "--followers", 20,
                       "--follow-seconds", 1)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = result.stdout.split("no ratios:")[0]
    assert re.search(r"^lastlog grep 64MiB\s+\d+ ms [\d.]+x grep$", table, re.MULTILINE)
    assert re.search(r"^ping beside grep\s+p99 [\d.]+ ms$", table, re.MULTILINE)
    assert re.search(r"^lastlog 10 json 10c\s+\d+/s [\d.]+x text$", table, re.MULTILINE)
    # each follower gets the lines of 1000 that its pattern selects: a fifth, a fiftieth
    for cell, followers, delivered in (("follow grep shared", "20 followers sharing 5 patterns (4 each)", 20 * 200),
                                       ("follow grep distinct", "2 followers, each with a pattern of its own", 2 * 20)):
        head = f"\n{cell} (gcmd only: the peers have no follow): {followers}, 1000 lines at 1,000/s\n"
        section = result.stdout.split(head)[1].split("\n\n")[0]
        assert re.search(r"^  followers that missed a line or got one out of order\s+0$", section, re.MULTILINE)
        assert re.search(rf"^  lines delivered, all followers\s+{delivered}$", section, re.MULTILINE)
        for label in ("delivery p99", "ping p99 from another client", "server CPU per line read"):
            assert re.search(rf"^  {label}.*\s+[\d.]+ \w+$", section, re.MULTILINE), (cell, label)
    assert "targets:" not in result.stdout


def writer_lines(count: int) -> list[bytes]:
    """The lines the follow cells' writer writes, numbered from 0."""
    logs = scripts_module("bench_logs")
    return [b"%d %.6f lab app[1]: %s\n" % (i, 1000 + i / 1000, logs.line_text(i)) for i in range(count)]


@pytest.mark.parametrize(("request_line", "expected"), [
    (b"follow\n", list(range(20))),
    (b"follow grep failed session\n", [1, 6, 11, 16]),
    (b"follow grep Failed session\n", []),  # an upper-case letter: case-sensitive, as journalctl --grep
    (b"follow grep \\buser07\\b\n", [7]),
    (b"follow grep \\buser0\\d\\b\n", list(range(10))),
])
def test_a_follow_request_selects_the_writers_lines_its_pattern_matches(request_line, expected):
    seqs, _ = scripts_module("bench_logs").selected(request_line, 20)
    assert list(seqs) == expected


@pytest.mark.parametrize(("received", "complete"), [
    (lambda lines: [lines[i] for i in (1, 6, 11, 16)], True),
    (lambda lines: [lines[i] for i in (1, 11, 16)], False),  # a line of the pattern missing
    (lambda lines: [lines[i] for i in (1, 6, 7, 11, 16)], False),  # a line of another pattern
    (lambda lines: [lines[i] for i in (1, 11, 6, 16)], False),  # out of order
    (lambda lines: [lines[i] for i in (1, 6)] + [b"6 1000.0 failed session, forged\n"]
     + [lines[i] for i in (11, 16)], False),  # a line twice
])
def test_a_follower_of_a_pattern_is_checked_against_the_lines_it_selects(received, complete):
    logs = scripts_module("bench_logs")
    stream, delays = logs.Stream(*logs.selected(b"follow grep failed session\n", 20)), Counter()
    follower = logs.Follower()
    receive(follower, b"".join(received(writer_lines(20))), [30, 31], stream, delays, 0)
    assert (follower.lines == len(stream.seqs) and not follower.bad) == complete


def test_a_line_with_the_right_number_that_does_not_match_is_caught():
    logs = scripts_module("bench_logs")
    stream = logs.Stream(*logs.selected(b"follow grep failed session\n", 20))
    assert stream.extend(writer_lines(20)[1])
    assert not stream.extend(writer_lines(20)[6].replace(b"failed", b"closed"))


def test_the_searched_log_varies_every_line_and_holds_rare_on_one_in_ten_thousand(tmp_path):
    queries = scripts_module("bench_queries")
    log = tmp_path / "big.log"
    rare = queries.write_searched_log(log, 3 << 20)
    data = log.read_bytes()
    assert (3 << 20) - 200 < len(data) <= 3 << 20 and data.endswith(b"\n")
    lines = data.split(b"\n")[:-1]
    assert len(set(lines)) == len(lines)
    assert [i for i, line in enumerate(lines) if b"RARE" in line] == list(range(9999, len(lines), 10_000))
    assert rare == len(lines) // 10_000 == 3


@pytest.mark.parametrize(("cell", "figures", "met"), [
    ("lastlog grep 64MiB", {"ms": 90.0, "grep_ms": 30.0, "grep_ratio": 3.0}, True),
    ("lastlog grep 64MiB", {"ms": 90.3, "grep_ms": 30.0, "grep_ratio": 3.01}, False),
    ("lastlog 10 json 10c", {"rps": 8000.0, "text_rps": 10000.0, "text_share": 0.8}, True),
    ("lastlog 10 json 10c", {"rps": 7900.0, "text_rps": 10000.0, "text_share": 0.79}, False),
])
def test_the_query_cells_are_judged_beside_their_baseline_of_the_same_round(cell, figures, met, capsys):
    report = scripts_module("bench_report")
    missed = report.check({"gcmd": {cell: figures}})
    assert (missed == []) == met
    verdict = "PASS" if met else "FAIL"
    shown = {"lastlog grep 64MiB": f"{figures.get('grep_ratio', 0):.2f}x grep -c (time <= 3x grep -c)",
             "lastlog 10 json 10c": f"{figures.get('text_share', 0):.2f}x text lastlog 10 "
                                    "(rate >= 0.8x text lastlog 10)"}[cell]
    assert capsys.readouterr().out == f"\ntargets:\n  {verdict}  {cell}: {shown}\n"


def stamped_lines(count: int, first_stamp: float = 1000.0) -> list[bytes]:
    """Lines as the follow cell's writer writes them: number, monotonic stamp, text."""
    return [b"%d %.6f lab app[1]: a line of the growing log\n" % (i, first_stamp + i / 1000) for i in range(count)]


def receive(follower, data: bytes, cuts: list[int], stream, delays: Counter, now: int) -> None:
    edges = [0, *cuts, len(data)]
    for start, end in itertools.pairwise(edges):
        follower.take(data[start:end], stream, now, delays)


@pytest.mark.parametrize("cuts", [[], [1], [60, 61, 62], list(range(7, 1200, 7))])
def test_followers_that_get_every_line_in_order_get_all_their_delays(cuts):
    logs = scripts_module("bench_logs")
    data = b"".join(stamped_lines(20))
    stream, delays = logs.Stream(), Counter()
    now = round(1000.1 / logs.DELAY_BIN)  # 100 ms after the first line's stamp
    followers = [logs.Follower(), logs.Follower()]
    for follower in followers:
        receive(follower, data, cuts, stream, delays, now)
    assert [(f.lines, f.bad, f.drops) for f in followers] == [(20, False, 0)] * 2
    assert bytes(stream.data) == data
    # line i was written i ms after the first: its delay is 100 - i ms, to a bin
    assert sorted(delays.elements()) == sorted(
        d for i in range(20) for d in [now - int((1000.0 + i / 1000) / logs.DELAY_BIN)] * 2)


def swap(lines: list[bytes]) -> list[bytes]:
    return [*lines[:5], lines[6], lines[5], *lines[7:]]


@pytest.mark.parametrize("broken, drops", [
    (lambda lines: lines[:5] + lines[6:], 0),  # a line missing
    (swap, 0),  # two lines out of order
    (lambda lines: lines[:6] + lines[5:], 0),  # a line twice
    (lambda lines: [*lines[:5], b"== 3 lines dropped ==\n", *lines[8:]], 1),  # the server dropped lines
])
@pytest.mark.parametrize("first", [True, False], ids=["first to receive", "after a good one"])
def test_a_follower_that_misses_a_line_or_gets_one_out_of_order_is_caught(broken, drops, first):
    logs = scripts_module("bench_logs")
    lines = stamped_lines(20)
    good, bad = b"".join(lines), b"".join(broken(lines))
    stream, delays = logs.Stream(), Counter()
    followers = [logs.Follower(), logs.Follower()]
    receives = [bad, good] if first else [good, bad]
    for follower, data in zip(followers, receives):
        receive(follower, data, [50, 300], stream, delays, 0)
    judged = followers[0] if first else followers[1]
    assert judged.bad and judged.lines < 20 and judged.drops == drops
    if not first:
        assert not followers[0].bad and followers[0].lines == 20


@pytest.mark.parametrize("q, expected_bins", [(0.5, 1), (0.98, 1), (0.99, 11), (1.0, 21)])
def test_a_binned_percentile_is_its_bins_upper_edge(q, expected_bins):
    logs = scripts_module("bench_logs")
    bins = Counter({0: 98, 10: 1, 20: 1})
    assert logs.binned_percentile(bins, q) == pytest.approx(expected_bins * logs.DELAY_BIN)


@pytest.mark.parametrize(("mine", "theirs", "expected"), [
    ({"rps": 200.0}, {"rps": 100.0}, 2.0),
    ({"kib": 1.0}, {"kib": 2.0}, 2.0),             # less memory is better
    ({"kib": -0.3}, {"kib": 2.0}, None),           # memory shrank: noise, nothing to compare
    ({"kib": 1.0}, {"kib": 0.0}, None),
    ({"p99_ms": 2.0}, {"p99_ms": 4.0}, 2.0),       # a latency cell alone: theirs / mine
])
def test_round_ratio(mine, theirs, expected):
    assert scripts_module("bench_report").round_ratio(mine, theirs) == expected


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_instructions_counts_instructions_per_request(tmp_path):
    if shutil.which("valgrind") is None:
        pytest.skip("needs valgrind (apt-get install valgrind)")
    figures = tmp_path / "instructions.json"
    result = run_bench("--only", "gcmd,gevent_floor", "--instructions", "--quick", "--json", figures, timeout=290)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"^ping 10 x 1: gcmd counted in \d+ s$", result.stdout, re.MULTILINE)
    assert re.search(r"^ping 10 x 1: gevent_floor counted in \d+ s$", result.stdout, re.MULTILINE)
    assert re.search(r"^ping 10 x 1\s+\d+\s+\d+$", result.stdout, re.MULTILINE)
    per_request = json.loads(figures.read_text())["ping 10 x 1"]
    # a request costs thousands of instructions; start-up alone (left out) is hundreds of millions
    assert 1_000 < per_request["gevent_floor"] < per_request["gcmd"] < 1_000_000


def test_bench_counts_the_floor_of_the_design_only_in_instructions():
    result = run_bench("--only", "gcmd,gevent_floor", "--quick")
    assert result.returncode == 2
    assert "gevent_floor: only with --instructions" in result.stderr


@pytest.mark.parametrize(("row", "expected"), [
    ({"gcmd": 9000.0, "gcmd@base": 10000.0}, r"^ping 10 x 1\s+9000\s+10000\s+0\.900$"),
    ({"gcmd": 7000.0}, r"^ping 10 x 1\s+7000$"),
    ({"gcmd@base": 7000.0, "naive_gevent": 8000.0}, r"^ping 10 x 1\s+7000\s+8000$"),
])
def test_instructions_report_gives_the_ratio_to_the_baseline_when_both_ran(row, expected):
    table = scripts_module("bench_instructions").report({"ping 10 x 1": row}, "gcmd@base")
    assert re.search(expected, table, re.MULTILINE), table
    assert ("gcmd/gcmd@base" in table) == ("gcmd" in row and "gcmd@base" in row)
