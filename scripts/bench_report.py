"""The tables of scripts/bench and the targets of a full run.

A server's results are {cell: figures}; the figures of a cell are some of
``rps`` (requests a second), ``p50_ms``/``p99_ms`` (latency), ``kib``
(memory per idle connection), ``slowest_connect_s``, ``cpu_us`` (the
server's CPU time per request, microseconds), those of the follow
cells (see bench_logs), ``ms``/``grep_ms``/``grep_ratio`` (lastlog grep
beside grep -c) or ``text_share`` (lastlog in JSON beside text; see
bench_queries).
"""

from __future__ import annotations

from bench_logs import is_follow
from bench_queries import (
    FOLLOW_GREP_DISTINCT,
    FOLLOW_GREP_SHARED,
    JSON_LASTLOG,
    LASTLOG_GREP,
    PING_BESIDE_GREP,
)

#: the targets of a full run, on the medians (the worst round for the
#: follow cells' misses): (cell, what must hold, as docs/benchmarks.md says
#: it), what being ("ratio", server, least ratio), ("below", "at most" or
#: "at least", figure, bound) or ("none", figure, 0). A ratio is round_ratio: more
#: requests, less memory, or a shorter p99. "ping 1c" has none: at one
#: connection the round trip is the hypervisor waking the other CPU, and
#: every server lands within noise.
TARGETS = [
    ("ping 10c", ("ratio", "naive_gevent", 1.1)),
    ("ping 10c", ("ratio", "gcmd@base", 0.85)),
    ("ping 100c", ("ratio", "naive_gevent", 1.25)),
    ("ping 100c", ("ratio", "gcmd@base", 0.85)),
    ("ping 100c x16", ("ratio", "naive_gevent", 2.0)),
    ("ping 100c x16", ("ratio", "twisted", 1.0)),
    ("ping 100c x16", ("ratio", "gcmd@base", 0.9)),
    ("ping 100c x16", ("below", "p99_ms", 10)),
    ("comphash 1MiB 10c", ("ratio", "naive_gevent", 1.0)),
    ("lastlog 10c", ("ratio", "naive_gevent", 1.0)),
    ("lastlog 10c", ("ratio", "twisted", 1.0)),
    ("lastlog 10c +500/s", ("ratio", "twisted", 3.0)),
    ("lastlog 10c +500/s", ("below", "p99_ms", 5)),
    ("ping beside lastlog", ("below", "p99_ms", 2)),
    ("follow", ("none", "incomplete", 0)),
    ("follow", ("below", "delivery_p99_ms", 250)),
    ("follow", ("below", "ping_p99_ms", 10)),
    # the log queries of 1.2, gcmd only: a figure of gcmd beside a baseline of the same round
    (LASTLOG_GREP, ("at most", "grep_ratio", 3)),
    (PING_BESIDE_GREP, ("below", "p99_ms", 10)),
    (JSON_LASTLOG, ("at least", "text_share", 0.8)),
    *((cell, target) for cell in (FOLLOW_GREP_SHARED, FOLLOW_GREP_DISTINCT) for target in (
        ("none", "incomplete", 0), ("below", "delivery_p99_ms", 250), ("below", "ping_p99_ms", 10))),
    # one greenlet per client, as the design asks: its stack is the price (about 10 KiB)
    ("idle KiB/conn", ("at most", "kib", 12)),
    ("idle KiB/conn", ("below", "slowest_connect_s", 1)),
    ("churn", ("ratio", "naive_gevent", 1.0)),
]
#: what the rows that write the server's own log are asked, as information
#: only (their work is under way): (row, cell) -> least rate as a share of gcmd's
OWN_LOG_TARGETS = {("gcmd+log", "ping 10c"): 0.8, ("gcmd+log", "ping 100c"): 0.8,
                   ("gcmd+log", "ping 100c x16"): 0.5, ("gcmd+json", "ping 10c"): 0.7}
OWN_LOG_ROWS = ("gcmd+log", "gcmd+json")
OWN_LOG_CELLS = ("ping 10c", "ping 100c", "ping 100c x16")

#: a figure that a target bounds: (name, unit, format)
FIGURES = {"p99_ms": ("p99", "ms", ".2f"), "kib": ("memory", "KiB", ".2f"),
           "slowest_connect_s": ("slowest connect", "s", ".3f"),
           "incomplete": ("follower misses a line or gets one out of order", "", ".0f"),
           "delivery_p99_ms": ("delivery p99", "ms", ".1f"), "ping_p99_ms": ("ping p99", "ms", ".2f"),
           # a figure of gcmd over a baseline of the same round
           "grep_ratio": ("time", "x grep -c", ".2f"), "text_share": ("rate", "x text lastlog 10", ".2f")}


def round_ratio(mine: dict, theirs: dict) -> float | None:
    """How many times better ``mine`` is than ``theirs``: more requests, less
    memory, or for a cell of latency alone a shorter p99. None when a server's
    memory did not grow: too few idle connections to tell them from the noise
    of the allocator (a few hundred KiB), so there is nothing to compare."""
    if "kib" in mine:
        if mine["kib"] <= 0 or theirs["kib"] <= 0:
            return None
        return theirs["kib"] / mine["kib"]
    if "ms" in mine:  # the time of a request
        return theirs["ms"] / max(mine["ms"], 0.001)
    if "rps" not in mine:
        return theirs["p99_ms"] / max(mine["p99_ms"], 0.001)
    return mine["rps"] / max(theirs["rps"], 0.01)


def _figures(c: dict) -> str:
    if "kib" in c:
        return f"{c['kib']:.2f} KiB"
    if "grep_ratio" in c:
        return f"{c['ms']:.0f} ms {c['grep_ratio']:.2f}x grep"
    if "text_share" in c:
        return f"{c['rps']:.0f}/s {c['text_share']:.2f}x text"
    if "rps" not in c:
        return f"p99 {c['p99_ms']:.2f} ms" if c else "-"
    if "p99_ms" in c:
        return f"{c['rps']:.0f}/s p99 {c['p99_ms']:.1f}"
    return f"{c['rps']:.0f}/s"


def _ratio_text(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def report(results: dict, rounds: dict | None = None) -> None:
    """Print the table and the ratios (one line instead when one server ran);
    with several ``rounds`` of each server, each ratio's lowest and highest of
    the rounds (round i of one server beside round i of the other) are in
    brackets. The follow cells have their own section (bench_logs.report_follow)."""
    names = list(results)
    base = "gcmd" if "gcmd" in results else names[0]
    cells = [cell for cell, figures in results[base].items() if not is_follow(figures)]
    print(f"\n{'cell':<20}" + "".join(f"{n:>22}" for n in names))
    for cell in cells:
        print(f"{cell:<20}" + "".join(f"{_figures(results[name].get(cell, {})):>22}" for name in names))
    if names == [base]:
        print(f"\nno ratios: {base} is the only server measured, nothing to compare it with "
              f"(add one: --only {base},naive_gevent, or --baseline DIR)")
        return
    rounds = rounds or {}
    paired = {name for name in names if 1 < len(rounds.get(name, ())) == len(rounds.get(base, ()))}
    width = 24 if paired else 16
    print(f"\nratios of {base} to each server (above 1 is better for {base}; a p99 alone: "
          f"theirs / {base}'s)" + (", [lowest-highest of the rounds]" if paired else "") + ":")
    print(f"{'cell':<20}" + "".join(f"{n:>{width}}" for n in names if n != base))
    for cell in cells:
        row = f"{cell:<20}"
        for name in names:
            if name == base:
                continue
            mine, theirs = results[base][cell], results[name].get(cell)
            if not theirs:
                row += f"{'-':>{width}}"
                continue
            text = _ratio_text(round_ratio(mine, theirs))
            if name in paired:
                each = [r for m, t in zip(rounds[base], rounds[name]) if (r := round_ratio(m[cell], t[cell])) is not None]
                text += f" [{min(each):.2f}-{max(each):.2f}]" if each else ""
            row += f"{text:>{width}}"
        print(row)
    w2 = results.get("gcmd-w2")
    if w2 and "gcmd" in results and "ping 100c" in w2:
        print(f"\ninfo: ping 100c: gcmd --workers 2 is {round_ratio(w2['ping 100c'], results['gcmd']['ping 100c']):.2f}x "
              f"gcmd --workers 1 (the load client shares the machine's cores)")


def report_cpu(results: dict, rounds: dict) -> None:
    """Print, for information, each server's CPU time per request of the cells that measure it
    (``cpu_us``; per connection in churn), and beside each server but gcmd its CPU time / gcmd's
    (above 1: gcmd spends less) with the range of the rounds. It depends less than a rate on how
    the machine's cores are shared between the server and the load client (only through how many
    requests a wake-up of the server finds)."""
    names = [name for name, cells in results.items() if any("cpu_us" in c for c in cells.values())]
    if "gcmd" not in names:
        return
    cells = [cell for cell, figures in results["gcmd"].items() if "cpu_us" in figures]
    print("\nthe server's CPU time per request, in microseconds (user + system, per connection in churn), "
          "for information (not checked); beside each server its CPU time / gcmd's [lowest-highest of the rounds]:")
    print(f"{'cell':<20}" + "".join(f"{name:>32}" for name in names))
    for cell in cells:
        mine, row = results["gcmd"][cell]["cpu_us"], f"{cell:<20}"
        for name in names:
            theirs = results[name].get(cell, {}).get("cpu_us")
            text = "-" if theirs is None else f"{theirs:.2f} us"
            if theirs is not None and name != "gcmd" and mine > 0:
                text += f" {theirs / mine:.2f}x"
                if 1 < len(rounds.get(name, ())) == len(rounds["gcmd"]):
                    each = [t[cell]["cpu_us"] / m[cell]["cpu_us"] for m, t in zip(rounds["gcmd"], rounds[name])
                            if m[cell]["cpu_us"] > 0]
                    text += f" [{min(each):.2f}-{max(each):.2f}]" if each else ""
            row += f"{text:>32}"
        print(row)


def report_own_log(results: dict, rounds: dict) -> None:
    """Print, for information, the rate of the rows that write the server's
    own log as a share of gcmd's, with the range of the rounds and the
    share asked (OWN_LOG_TARGETS); nothing is checked."""
    rows = [name for name in OWN_LOG_ROWS if name in results]
    if "gcmd" not in results or not rows or OWN_LOG_CELLS[0] not in results["gcmd"]:
        return
    print("\nthe server's own log, for information (not checked): the row's rate / gcmd's "
          "[lowest-highest of the rounds], and the share asked")
    print(f"{'cell':<20}" + "".join(f"{name + ' / gcmd':>40}" for name in rows))
    for cell in OWN_LOG_CELLS:
        row = f"{cell:<20}"
        for name in rows:
            share = results[name][cell]["rps"] / results["gcmd"][cell]["rps"]
            text = f"{share:.2f}x"
            if 1 < len(rounds[name]) == len(rounds["gcmd"]):
                each = [r[cell]["rps"] / g[cell]["rps"] for r, g in zip(rounds[name], rounds["gcmd"])]
                text += f" [{min(each):.2f}-{max(each):.2f}]"
            asked = OWN_LOG_TARGETS.get((name, cell))
            text += f" (>= {asked}x: {'met' if share >= asked else 'not met'})" if asked else " (-)"
            row += f"{text:>40}"
        print(row)


#: the comparison of each kind of bound
BOUNDS = {"below": "<", "at most": "<=", "at least": ">="}


def _amount(value: float, unit: str, fmt: str = "g") -> str:
    """``value`` with its ``unit``: ``10 ms``, ``3x grep -c``."""
    return f"{value:{fmt}}{unit}" if unit.startswith("x") else f"{value:{fmt}} {unit}".rstrip()


def describe(target: tuple) -> str:
    """A target as docs/benchmarks.md states it: ``>= 1.25x naive_gevent``, ``p99 < 10 ms``."""
    kind, what, bound = target
    if kind == "ratio":
        return f">= {bound}x {what}"
    if kind == "none":
        return f"no {FIGURES[what][0]}"
    name, unit, _ = FIGURES[what]
    return f"{name} {BOUNDS[kind]} {_amount(bound, unit)}"


def targets_table() -> str:
    """The targets as the Markdown table of docs/benchmarks.md."""
    rows: dict[str, list[str]] = {}
    for cell, target in TARGETS:
        rows.setdefault(cell, []).append(describe(target))
    return "\n".join(["| cell | target of a full run |", "| --- | --- |",
                      *(f"| {cell} | {'; '.join(texts)} |" for cell, texts in rows.items())])


def check(results: dict) -> list[str]:
    """Print each target that the servers measured allow to judge, with PASS
    or FAIL; the ones missed."""
    missed = []
    me = results.get("gcmd")
    if me is None:
        return missed
    print("\ntargets:")
    for cell, target in TARGETS:
        kind, what, bound = target
        if kind == "ratio":
            if cell not in me or cell not in results.get(what, {}):
                continue
            value = round_ratio(me[cell], results[what][cell])
            if value is None:
                print(f"  ----  {cell}: memory did not grow, too few connections to judge ({describe(target)})")
                continue
            ok, shown = value >= bound, f"{value:.2f}x"
        else:
            if what not in me.get(cell, {}):
                continue
            value = me[cell][what]
            if kind == "at least":
                ok = value >= bound
            else:
                ok = value < bound if kind == "below" else value <= bound  # "none": bound is 0
            shown = _amount(value, FIGURES[what][1], FIGURES[what][2])
        what_held = f"{cell}: {shown} ({describe(target)})"
        print(f"  {'PASS' if ok else 'FAIL'}  {what_held}")
        if not ok:
            missed.append(what_held)
    return missed
