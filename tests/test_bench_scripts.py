"""The benchmark scripts run and print their tables (their figures are judged elsewhere)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bench_quick_prints_the_table_and_targets():
    result = subprocess.run([sys.executable, str(HERE / "scripts" / "bench"), "--quick", "--only",
                             "gcmd,naive_gevent", "--duration", "0.5", "--idle", "300"],
                            capture_output=True, text=True, timeout=55, check=False)
    assert result.returncode in (0, 1), result.stderr[-2000:]
    for text in ("ping 100c x16", "comphash 1MiB 10c", "lastlog 10c", "churn", "idle KiB/conn",
                 "ratios of gcmd", "targets:"):
        assert text in result.stdout, text


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bench_rounds_give_each_ratio_its_range():
    result = subprocess.run([sys.executable, str(HERE / "scripts" / "bench"), "--quick", "--only",
                             "gcmd,naive_gevent", "--duration", "0.3", "--idle", "0", "--runs", "2"],
                            capture_output=True, text=True, timeout=55, check=False)
    assert result.returncode in (0, 1), result.stderr[-2000:]
    ratios = result.stdout.split("ratios of gcmd")[1].split("targets:")[0]
    row = next(line for line in ratios.splitlines() if line.startswith("ping 10c"))
    median, low, high = re.fullmatch(r"ping 10c\s+([\d.]+)x \[([\d.]+)-([\d.]+)\]", row).groups()
    assert float(low) <= float(median) <= float(high)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_bench_hash_quick_prints_every_figure():
    result = subprocess.run([sys.executable, str(HERE / "scripts" / "bench_hash.py"), "--quick",
                             "--seconds", "1", "--pings", "200"],
                            capture_output=True, text=True, timeout=85, check=False)
    assert result.returncode in (0, 1), result.stderr[-2000:]
    for text in ("time / openssl", "peak RSS growth", "4 clients hashing", "lastlog, static",
                 "lastlog, growing", "lastlog/s at 10 clients"):
        assert text in result.stdout, text
