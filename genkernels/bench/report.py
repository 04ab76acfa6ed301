"""Benchmark reports: a markdown table, JSON (one record per case) and a PNG chart of speedups.

File names are fixed and few (bench.md, bench.json, bench.png; selfcheck.md, selfcheck.json
without a GPU) so a GPU run's output folder stays small and predictable.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .core import COMPILE, EAGER, CaseRecord, Ceilings, OpSummary, Result, SelfCheck

#: One color per variant across panels and runs (matplotlib's default cycle would shift with skipped variants).
_COLORS = {
    EAGER: "tab:brown",
    COMPILE: "tab:gray",
    "triton": "tab:orange",
    "cuda": "tab:green",
    "reference": "tab:blue",
}

JSON_NAME, MARKDOWN_NAME, CHART_NAME = "bench.json", "bench.md", "bench.png"
SELFCHECK_JSON, SELFCHECK_MARKDOWN = "selfcheck.json", "selfcheck.md"


# --------------------------------------------------------------------------- formatting


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def fmt_ms(ms: float | None) -> str:
    """Milliseconds with four decimals below 10 ms (kernels here take microseconds)."""
    if ms is None:
        return "-"
    return f"{ms:.4f}" if ms < 10 else f"{ms:.2f}"


def fmt_rate(rate: float | None) -> str:
    """A GB/s or TFLOP/s figure."""
    if rate is None:
        return "-"
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}"


def fmt_pct(pct: float | None) -> str:
    """A percentage of the device ceiling."""
    if pct is None:
        return "-"
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.1f}%"


def fmt_x(x: float | None) -> str:
    """A speedup."""
    return "-" if x is None else f"{x:.2f}x"


def _status(r: Result) -> str:
    if r.status == "ok" and r.reason:
        return f"ok, {r.reason}"
    if r.status == "ok":
        return f"ok (err {r.err:.2g} <= {r.bound:.2g})" if r.err is not None else "ok"
    return f"{r.status.upper()}: {r.reason}" if r.status == "failed" else f"{r.status}: {r.reason}"


def _base(record: CaseRecord) -> tuple[str, str]:
    """The variant a case's speedups are shown against in short forms (log, chart), and its Result field."""
    return (record.peer, "vs_peer") if record.peer is not None else (EAGER, "vs_eager")


def one_line(record: CaseRecord) -> str:
    """A case's results in one line, for the progress log (speedups vs the peer, else vs eager)."""
    if record.results and all(r.status == "not run" for r in record.results):
        return f"{record.label:<34} not run: {record.results[0].reason}"
    base, attr = _base(record)
    parts = []
    for r in record.results:
        if r.status == "ok":
            x = getattr(r, attr)
            speed = f" {fmt_x(x)}" if r.variant != base and x is not None else ""
            parts.append(f"{r.variant} {fmt_ms(r.ms)} ms{speed}")
        else:
            parts.append(f"{r.variant} {r.status.upper() if r.status == 'failed' else r.status}")
    return f"{record.label:<34} " + " | ".join(parts)


# --------------------------------------------------------------------------- markdown


def _header_lines(meta: dict[str, Any], ceilings: Ceilings) -> list[str]:
    return [
        "# genkernels benchmarks",
        "",
        (
            f"Device: {meta.get('device')}; torch {meta.get('torch')}, triton {meta.get('triton')}, "
            f"genkernels {meta.get('genkernels')}, CUDA extension: {meta.get('extension')}; {meta.get('date')}."
        ),
        "",
        (
            f"Ceilings measured in this run: device-to-device copy of 1 GiB (bytes read + written) "
            f"{ceilings.copy_gbs:,.0f} GB/s; bf16 matmul 8192^3 {ceilings.matmul_tflops:,.0f} TFLOP/s."
        ),
        "",
        (
            f"Timing: median of CUDA-event times ({meta.get('timer')}), L2 flushed before every repetition, "
            f"warm-up {meta.get('warmup_ms')} ms, repetitions {meta.get('rep_ms')} ms. torch.compile: default mode, "
            "dynamic=False, a fresh compile per case; its compile time is the 'first call' column and is not in ms "
            "(less when inductor's on-disk cache already held the graph). host ms: the CPU time one call takes "
            "to issue its work (median of 10 calls in a row, not waited for; variants under 5 ms); the flush "
            f"before each timed call (256 MiB zeroed: {meta.get('flush_ms')} ms in this run) hides that much of "
            "it, so where host ms "
            "exceeds the flush's time, ms includes the GPU waiting for the CPU. "
            "Every variant's output is checked against a float32 reference (the test criterion) before it is "
            "timed; a genkernels variant with wrong numbers is marked FAILED and not timed. Baselines that users "
            "run as they are (attention's SDPA kernels, eager math, FlexAttention) are timed even outside the "
            "criterion, and their check column says by how much they missed it."
        ),
    ]


def case_tables(records: Sequence[CaseRecord]) -> list[str]:
    """One markdown table per (op, table), one row per case and variant."""
    lines: list[str] = []
    groups: dict[tuple[str, str], list[CaseRecord]] = {}
    for rec in records:
        groups.setdefault((rec.op, rec.table), []).append(rec)
    for (op, table), recs in groups.items():
        unit, note = recs[0].unit, recs[0].rate_note
        pct = "% of copy BW" if unit == "GB/s" else "% of matmul"
        # Speedup columns only for baselines this table has: attention has no torch.compile variant.
        speedups = [(EAGER, "vs_eager"), (COMPILE, "vs_compile")]
        speedups = [(v, attr) for v, attr in speedups if any(rec.result(v) for rec in recs)]
        peer = recs[0].peer
        if peer is not None:
            speedups.append((peer, "vs_peer"))
        headers = [
            "case",
            "floor ms",
            "variant",
            "ms",
            "host ms",
            note,
            f"{pct} (floor / ms)",
            *(f"vs {'compile' if v == COMPILE else v}" for v, _ in speedups),
            "first call s (compile)",
            "check",
        ]
        rows = [
            [
                rec.label,
                fmt_ms(rec.floor_ms),
                r.variant,
                fmt_ms(r.ms),
                fmt_ms(r.host_ms),
                fmt_rate(r.rate),
                fmt_pct(r.pct_ceiling),
                *(fmt_x(getattr(r, attr)) if r.variant != v else "" for v, attr in speedups),
                "-" if r.first_call_s is None else f"{r.first_call_s:.2f}",
                _status(r),
            ]
            for rec in recs
            for r in rec.results
        ]
        lines += ["", f"## {op}, {table}", ""] + _table(headers, rows)
    return lines


def goal_result(passed: bool | None) -> str:
    """PASS (met), MISS (missed) or UNMEASURED (what the goal needs did not run)."""
    return "UNMEASURED" if passed is None else "PASS" if passed else "MISS"


def summary_markdown(summaries: Sequence[OpSummary]) -> str:
    """Each op's summary table and its goals with measured values and PASS/MISS."""
    lines: list[str] = []
    for s in summaries:
        lines += [f"## {s.op}: summary", ""] + _table(s.headers, s.rows) + [""]
        lines += _table(
            ["goal", "target", "measured", "result"],
            [[g.name, g.target, g.measured, goal_result(g.passed)] for g in s.goals],
        )
        lines += [""] + [f"{n}" for n in s.notes] + [""]
    return "\n".join(lines).rstrip() + "\n"


def markdown(
    meta: dict[str, Any], ceilings: Ceilings, records: Sequence[CaseRecord], summaries: Sequence[OpSummary]
) -> str:
    """The whole report: header, summaries and goals, then every case."""
    return "\n".join(_header_lines(meta, ceilings) + ["", summary_markdown(summaries)] + case_tables(records)) + "\n"


# --------------------------------------------------------------------------- chart


#: Colors of variants no _COLORS entry names, handed out in order of first appearance in a chart: enough for
#: the whole suite's variants (twelve families) with room to spare, none of them a _COLORS entry.
_SPARE_COLORS = (
    "tab:purple", "tab:red", "tab:pink", "tab:olive", "tab:cyan", "black",
    "gold", "navy", "teal", "magenta", "lime", "maroon", "darkkhaki", "slateblue",
)  # fmt: skip
GRAPH_SUFFIX = " + CUDA graph"


def _family(variant: str) -> str:
    """The variant a bar's color comes from: "triton + CUDA graph" and "genkernels (no cache)" take the
    colors of "triton" and "genkernels"; the suffix shows as the bar's hatch or shade."""
    return variant.split(GRAPH_SUFFIX)[0].split(" (")[0]


def variant_colors(families: Sequence[str]) -> dict[str, str]:
    """A color per variant family: _COLORS' own, then the spare colors in order; no two families share one."""
    colors = dict(_COLORS)
    spare = [c for c in _SPARE_COLORS if c not in colors.values()]
    for fam in families:
        if fam not in colors:
            # Past the spares (more variants than any current op has), distinct grays rather than a repeat.
            colors[fam] = spare.pop(0) if spare else str(round(0.15 + 0.7 * ((len(colors) * 0.618) % 1), 3))
    return colors


def _wrap(label: str, width: int = 36) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(label, width)) or label


def chart(records: Sequence[CaseRecord], path: Path, title: str) -> str | None:
    """Horizontal bar chart of each variant's speedup vs eager (vs the peer where the op has one), log scale,
    one panel per (op, table), a row of bars per case, each bar labeled with its speedup. A variant keeps its
    color in every panel; its CUDA-graph variant is the same color, hatched. None, or why no chart."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")  # no display on GPU machines and CI
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not available ({e})"
    groups: dict[tuple[str, str], list[CaseRecord]] = {}
    for rec in records:
        groups.setdefault((rec.op, rec.table), []).append(rec)
    if not groups:
        return "no cases"
    panels = []  # (op, table, recs, base, attr, variants)
    for (op, table), recs in groups.items():
        base, attr = _base(recs[0])
        variants = [r.variant for r in recs[0].results if r.variant != base]
        panels.append((op, table, recs, base, attr, variants))
    colors = variant_colors([_family(v) for p in panels for v in p[5]])
    # Inches a bar: 0.28, thinner for a whole-suite run (hundreds of bars), so that the figure stays under about
    # 80 inches; the bars' labels shrink with them.
    bars_in_all = sum(max(1, len(p[5])) * len(p[2]) for p in panels)
    bar = min(0.28, max(0.08, 50.0 / bars_in_all))
    label_pt = max(4.5, min(7.0, bar * 26))
    heights = [0.9 + bar * max(1, len(p[5])) * len(p[2]) + 0.15 * len(p[2]) for p in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(12.0, sum(heights) + 0.6), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    for ax, (op, table, recs, base, attr, variants) in zip(axes[:, 0], panels):
        slot = 0.8 / max(1, len(variants))
        values = []
        for i, v in enumerate(variants):
            ys, xs = [], []
            for j, rec in enumerate(recs):
                res = rec.result(v)
                if res is not None and getattr(res, attr) is not None:
                    ys.append(j + (i - (len(variants) - 1) / 2) * slot)
                    xs.append(getattr(res, attr))
            values += xs
            # A variant that never ran still gets its legend entry, so its absence reads as such.
            label = v if xs else f"{v} (did not run)"
            graphed = v.endswith(GRAPH_SUFFIX)
            shaded = "(" in v.split(GRAPH_SUFFIX)[0]
            bars = ax.barh(
                ys, xs, height=slot * 0.92, label=label, color=colors[_family(v)], alpha=0.45 if shaded else 0.9,
                hatch="///" if graphed else None, edgecolor="white" if graphed else None, linewidth=0,
            )  # fmt: skip
            ax.bar_label(bars, labels=[f"{x:.2f}x" for x in xs], padding=2, fontsize=label_pt)
        ax.axvline(1.0, color="black", linewidth=0.9)
        ax.set_xscale("log")
        if values:
            lo, hi = min(min(values), 1.0), max(max(values), 1.0)
            ax.set_xlim(lo / 1.6, hi * 2.0)  # room for the labels at the bars' ends
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yticks(range(len(recs)))
        ax.set_yticklabels([_wrap(rec.label) for rec in recs], fontsize=7.5)
        ax.set_ylim(len(recs) - 0.5, -0.5)  # the first case on top
        ax.set_xlabel(f"speedup vs {base} (log scale; the black line: {base})", fontsize=8)
        ax.set_title(f"{op}, {table}", fontsize=10, loc="left")
        ax.grid(axis="x", which="major", alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.suptitle(title, fontsize=11, y=1.0 - 0.15 / fig.get_figheight(), va="top")  # 0.15 inch from the top
    # Half an inch above the first chart for the title, so that it never covers that chart's own title.
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.5 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def records_from_json(path: Path) -> tuple[dict[str, Any], list[CaseRecord]]:
    """The meta and the case records of a bench.json that :func:`write` wrote."""
    data = json.loads(Path(path).read_text())
    # Fields a record of another version may lack or add: the dataclasses' defaults, and ignored.
    fields = {f.name for f in dataclasses.fields(Result)}
    case_fields = {f.name for f in dataclasses.fields(CaseRecord)} - {"results"}
    records = []
    for d in data["cases"]:
        results = [Result(**{k: v for k, v in r.items() if k in fields}) for r in d["results"]]
        records.append(CaseRecord(**{k: v for k, v in d.items() if k in case_fields}, results=results))
    return data.get("meta", {}), records


def redraw(json_path: Path, png_path: Path) -> str | None:
    """Draw the chart of a bench.json again (a run's JSON outlives the chart code it was drawn with):
    ``genkernels bench --redraw bench.json``. None, or why no chart."""
    meta, records = records_from_json(json_path)
    return chart(records, png_path, f"genkernels and baselines: speedups, {meta.get('device')}")


# --------------------------------------------------------------------------- files


def write(
    out_dir: Path,
    meta: dict[str, Any],
    ceilings: Ceilings,
    records: Sequence[CaseRecord],
    summaries: Sequence[OpSummary],
    with_chart: bool = True,
) -> list[str]:
    """Write bench.json, bench.md and (``with_chart``) bench.png into out_dir; returns lines saying what was written.

    The runner writes the JSON and markdown after every case too (without the chart, which takes
    a second or two), so a run stopped by a time limit still leaves the cases it finished.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": meta,
        "ceilings": {"copy_gbs": ceilings.copy_gbs, "matmul_tflops": ceilings.matmul_tflops},
        "summaries": [s.to_dict() for s in summaries],
        "cases": [r.to_dict() for r in records],
    }
    (out_dir / JSON_NAME).write_text(json.dumps(data, indent=1) + "\n")
    (out_dir / MARKDOWN_NAME).write_text(markdown(meta, ceilings, records, summaries))
    written = [str(out_dir / JSON_NAME), str(out_dir / MARKDOWN_NAME)]
    if not with_chart:
        return written
    why_not = chart(records, out_dir / CHART_NAME, f"genkernels and baselines: speedups, {meta.get('device')}")
    written.append(str(out_dir / CHART_NAME) if why_not is None else f"no chart: {why_not}")
    return written


def selfcheck_markdown(checks: Sequence[SelfCheck], header: str) -> str:
    """The CPU self-check as a markdown table."""
    rows = [[c.op, c.backend, c.status, c.detail] for c in checks]
    return "\n".join([header, ""] + _table(["op", "backend", "status", "detail"], rows)) + "\n"


def write_selfcheck(out_dir: Path, checks: Sequence[SelfCheck], meta: dict[str, Any], header: str) -> list[str]:
    """Write selfcheck.json and selfcheck.md into out_dir; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "checks": [dataclasses.asdict(c) for c in checks]}
    (out_dir / SELFCHECK_JSON).write_text(json.dumps(data, indent=1) + "\n")
    (out_dir / SELFCHECK_MARKDOWN).write_text(selfcheck_markdown(checks, header))
    return [str(out_dir / SELFCHECK_JSON), str(out_dir / SELFCHECK_MARKDOWN)]
