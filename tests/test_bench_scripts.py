"""The benchmark scripts run and print their tables (their figures are judged elsewhere)."""

import importlib.machinery
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent
BENCH = HERE / "scripts" / "bench"

#: the README's figures table: its rows and columns as scripts/bench names them
README_ROWS = {"ping, 1 connection": "ping 1c", "ping, 10 connections": "ping 10c",
               "ping, 100 connections": "ping 100c", "ping, 100 x 16 in flight": "ping 100c x16",
               "comphash 1 MiB, 10 conn.": "comphash 1MiB 10c", "lastlog, 10 connections": "lastlog 10c",
               "memory per idle connection": "idle KiB/conn", "slowest of 10,000 connects": "idle KiB/conn",
               "connect, ping, close": "churn"}
README_COLUMNS = {"gcmd": "gcmd", "gcmd+log": "gcmd+log", "gcmd-w2": "gcmd-w2",
                  "naive gevent": "naive_gevent", "Twisted": "twisted", "asyncio": "asyncio",
                  "uvloop": "uvloop"}


def bench_module():
    loader = importlib.machinery.SourceFileLoader("bench_script", str(BENCH))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def run_bench(*args, timeout: float = 55) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=False)


def readme_figures() -> dict:
    """The README's table of figures as scripts/bench's results: {server: {cell: figures}}."""
    readme = (HERE / "README.md").read_text()
    table = "| cell | gcmd | gcmd+log |" + readme.split("| cell | gcmd | gcmd+log |")[1].split("\n\n")[0]
    header = [c.strip() for c in table.splitlines()[0].strip(" |").split("|")][1:]
    results = {README_COLUMNS[name]: {} for name in header}
    for line in table.splitlines()[2:]:
        label, *cells = [c.strip() for c in line.strip("|").split("|")]
        for name, text in zip(header, cells):
            figures = results[README_COLUMNS[name]].setdefault(README_ROWS[label], {})
            number = float(text.split(" ")[0].rstrip(",").replace(",", ""))
            if text.endswith(" KiB"):
                figures["kib"] = number
            elif label.startswith("slowest"):
                figures["slowest_connect_s"] = number / 1000
            else:
                figures["rps"] = number
                if " p99 " in text:
                    figures["p99_ms"] = float(text.split(" p99 ")[1])
    return results


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bench_quick_is_a_smoke_test_that_checks_no_target():
    result = run_bench("--quick", "--only", "gcmd,naive_gevent", "--duration", 0.5, "--idle", 300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for text in ("ping 100c x16", "comphash 1MiB 10c", "lastlog 10c", "churn", "idle KiB/conn",
                 "ratios of gcmd"):
        assert text in result.stdout, text
    assert "targets:" not in result.stdout and "FAIL" not in result.stdout
    assert result.stdout.strip().splitlines()[-1] == (
        "quick run: a smoke test, every cell ran; no target checked (1 s cells on a shared "
        "machine move too much to judge: run without --quick)")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bench_rounds_give_each_ratio_its_range():
    result = run_bench("--quick", "--only", "gcmd,naive_gevent", "--duration", 0.3, "--idle", 0, "--runs", 2)
    assert result.returncode == 0, result.stderr[-2000:]
    ratios = result.stdout.split("ratios of gcmd")[1].split("quick run:")[0]
    row = next(line for line in ratios.splitlines() if line.startswith("ping 10c"))
    median, low, high = re.fullmatch(r"ping 10c\s+([\d.]+)x \[([\d.]+)-([\d.]+)\]", row).groups()
    assert float(low) <= float(median) <= float(high)


def test_bench_targets_are_the_readmes_table():
    result = run_bench("--targets", timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("| cell | target of a full run |\n")
    assert "\n" + result.stdout in (HERE / "README.md").read_text()


def test_readme_figures_meet_the_targets(capsys):
    results = readme_figures()
    assert set(results["gcmd"]) == set(README_ROWS.values())
    assert bench_module().check(results) == []
    # every target was judged: none is about a cell or a server the table lacks
    assert capsys.readouterr().out.count("PASS") == len(bench_module().TARGETS)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bench_baseline_measures_another_checkout_side_by_side(tmp_path):
    base = tmp_path / "before"
    shutil.copytree(HERE / "gcmd", base / "gcmd", ignore=shutil.ignore_patterns("__pycache__"))
    init = base / "gcmd" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "0.0.0+before-'))
    result = run_bench("--only", "gcmd", "--baseline", base, "--quick", "--duration", 0.3, "--idle", 50)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(rf"^gcmd@base: gcmd 0\.0\.0\+before-\S+ from {re.escape(str(base))}$", result.stdout, re.MULTILINE)
    rounds = [line for line in result.stdout.splitlines() if line.startswith("round 1: ")]
    assert [line.split()[2] for line in rounds] == ["gcmd", "gcmd@base"]
    table, ratios = result.stdout.split("ratios of gcmd to each server")
    assert re.search(r"^cell\s+gcmd\s+gcmd@base$", table, re.MULTILINE)
    assert re.search(r"^cell\s+gcmd@base$", ratios, re.MULTILINE)
    cells = ["ping 1c", "ping 10c", "ping 100c", "ping 100c x16", "comphash 1MiB 10c", "lastlog 10c",
             "idle KiB/conn", "churn"]
    for cell in cells:
        assert re.search(rf"^{re.escape(cell)}\s+\d+\.\d\dx$", ratios, re.MULTILINE), cell


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
    assert "PASS" not in result.stdout and "FAIL" not in result.stdout
    assert result.stdout.strip().splitlines()[-1] == (
        "quick run: a smoke test, every figure measured; no target checked")
