"""The results folder of a reproduction: tables (Markdown + console), Pareto PNGs with the paper's
published points drawn beside ours, and one JSON of everything."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from sparse_prefix.experiments.paper import PaperRun
from sparse_prefix.experiments.reproduce import PolicyRun

_COLUMNS = (
    ("checkpoints_per_request", "ckpts / request", "{:.2f}", 1.0),
    ("tokens_saved_pct", "tokens saved %", "{:.1f}", 1.0),
    ("savings_x", "savings x", "{:.2f}", 1.0),
    ("hit_rate_pct", "hit rate %", "{:.1f}", 1.0),
    ("state_bytes_per_request", "state MiB / request", "{:.1f}", 1.0 / 2**20),
)
ACCEPTANCE_ORDER = ("dp_dominates_heuristics", "our_dp_dominates_heuristics", "dp_near_ceiling",
                    "our_dp_near_ceiling", "ldp_dominates_block", "ldp_hints_dominates_block",
                    "our_dp_dominates_block", "hints_fork_near_ceiling")
_PAPER_MARKERS = {"dp": "*", "block": "s", "balanced": "^"}


def _cell(summary, metric: str, fmt: str, scale: float) -> str:
    if metric not in summary.mean:
        return "-"
    text = fmt.format(summary.mean[metric] * scale)
    if len(summary.seeds) > 1:
        text += " ± " + fmt.format(summary.sd[metric] * scale)
    return text


def table_rows(summaries: Mapping[str, Any], runs: Sequence[PolicyRun], paper: PaperRun | None
               ) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of one capture mode's table; the paper's columns where it published the policy."""
    published = {p.policy: p for p in paper.points} if paper is not None else {}
    header = ["policy", "origin"] + [c[1] for c in _COLUMNS] + ["paper ckpts", "paper saved %"]
    rows = []
    for run in runs:
        if run.label not in summaries:
            continue
        summary = summaries[run.label]
        point = published.get(run.label) if run.origin == "paper" else None
        rows.append([run.label, run.origin] + [_cell(summary, c[0], c[2], c[3]) for c in _COLUMNS]
                    + ([f"{point.checkpoints_per_request:.2f}", f"{point.tokens_saved_pct:.1f}"]
                       if point else ["", ""]))
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> None:
    """The table on the console (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for index, name in enumerate(header):
        table.add_column(name, justify="left" if index < 2 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.width = max(console.width, 180)
    console.print(table)


def pareto_png(summaries: Mapping[str, Any], runs: Sequence[PolicyRun], path: str | os.PathLike, *,
               title: str, paper: PaperRun | None = None) -> Path:
    """Checkpoints per request (log x) vs tokens saved: one line per family (solid: the paper's
    policies replayed by us, dashed: ours, large markers: peers), the paper's published points as
    black hollow markers; error bars are one sd over seeds."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    families: dict[str, list[tuple[PolicyRun, Any]]] = {}
    for run in runs:
        if run.label in summaries:
            families.setdefault(run.family, []).append((run, summaries[run.label]))
    if not families:
        raise ValueError("summaries: nothing to plot")
    figure, axes = plt.subplots(figsize=(11, 7), dpi=120)
    colours = plt.get_cmap("tab20")
    markers = "osD^v<>phX8Pd"
    off_axis = []
    for index, (family, members) in enumerate(families.items()):
        members = sorted(members, key=lambda m: m[1].mean["checkpoints_per_request"])
        shown = [(r, s) for r, s in members if s.mean["checkpoints_per_request"] > 0]
        off_axis += [r.label for r, s in members if s.mean["checkpoints_per_request"] <= 0]
        if not shown:
            continue
        origin = shown[0][0].origin
        xs = [s.mean["checkpoints_per_request"] for _, s in shown]
        ys = [s.mean["tokens_saved_pct"] for _, s in shown]
        axes.errorbar(xs, ys, xerr=[s.sd["checkpoints_per_request"] for _, s in shown],
                      yerr=[s.sd["tokens_saved_pct"] for _, s in shown],
                      label=f"{family} ({origin})", color=colours((2 * index) % 20 + (index // 10) % 2),
                      linestyle="none" if len(shown) == 1 else ("-" if origin == "paper" else "--"),
                      marker=markers[index % len(markers)], markersize=9 if origin == "peer" else 5,
                      capsize=0, linewidth=1.2, elinewidth=0.6, alpha=0.9)
    if paper is not None:
        for family, marker in _PAPER_MARKERS.items():
            points = [p for p in paper.points if p.policy.split(":")[0] == family]
            if points:
                axes.scatter([p.checkpoints_per_request for p in points],
                             [p.tokens_saved_pct for p in points], marker=marker, s=90,
                             facecolors="none", edgecolors="black", linewidths=1.3,
                             label=f"paper's published {family}", zorder=5)
    axes.set_xscale("log")
    axes.set_xlabel("mean checkpoints stored per request (log scale)")
    axes.set_ylabel("tokens saved (%)")
    axes.grid(True, which="both", alpha=0.3)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=7, loc="lower right", ncol=2)
    if off_axis:
        figure.text(0.01, 0.01, "not shown (no checkpoints stored): " + ", ".join(off_axis), fontsize=7)
    figure.tight_layout(rect=(0, 0.03 if off_axis else 0, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def paper_comparison(summaries: Mapping[str, Any], paper: PaperRun) -> list[dict[str, Any]]:
    """Per published point: the paper's and our (same policy, paper protocol) numbers and the gaps."""
    rows = []
    for point in paper.points:
        summary = summaries.get(point.policy)
        if summary is None:
            continue
        ours_x, ours_y = summary.mean["checkpoints_per_request"], summary.mean["tokens_saved_pct"]
        rows.append({"policy": point.policy, "paper_checkpoints": point.checkpoints_per_request,
                     "paper_saved_pct": point.tokens_saved_pct, "ours_checkpoints": ours_x,
                     "ours_saved_pct": ours_y, "saved_gap_points": ours_y - point.tokens_saved_pct})
    return rows


def write_json(path: str | os.PathLike, *, config: Mapping[str, Any], stats: Mapping[str, Any],
               runs: Sequence[PolicyRun], results: Mapping[str, Mapping[str, Any]],
               checks: Mapping[str, Any], comparison: Sequence[Mapping[str, Any]],
               paper: PaperRun | None) -> Path:
    """Everything in one JSON file."""
    payload = {
        "config": dict(config), "stats": dict(stats),
        "paper": None if paper is None else {
            **paper._asdict(), "points": [p._asdict() for p in paper.points]},
        "results": {capture: [{"label": run.label, "spec": run.spec, "family": run.family,
                               "origin": run.origin, "grid": run.grid, "eviction": run.eviction,
                               "planner_options": dict(run.planner_options),
                               **summaries[run.label].as_dict()}
                              for run in runs if run.label in summaries]
                    for capture, summaries in results.items()},
        "acceptance": dict(checks),
        "paper_comparison": list(comparison),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False, default=_plain) + "\n")
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def acceptance_lines(checks: Mapping[str, Any]) -> list[str]:
    """One line per acceptance target: PASS / FAIL and the deciding numbers."""
    lines = []
    for name in ACCEPTANCE_ORDER:
        if name not in checks:
            continue
        check = checks[name]
        verdict = "PASS" if check["passed"] else "FAIL"
        if "margins" in check:
            known = {k: v for k, v in check["margins"].items() if v is not None}
            worst = min(known.items(), key=lambda kv: kv[1]) if known else None
            missing = [k for k, v in check["margins"].items() if v is None]
            detail = (f"worst margin {worst[1]:+.2f} points at {worst[0]}" if worst else "no margins")
            detail += f"; nothing at or below the checkpoints of {', '.join(missing)}" if missing else ""
        elif "best" in check:
            detail = (f"best {check['best'][0]:.2f} ckpts / {check['best'][1]:.1f}%" if check["best"]
                      else "no dp point qualifies") + f" (limit {check['max_checkpoints']:.1f} ckpts)"
        else:
            detail = ", ".join(f"{k}: {p[0]:.2f} ckpts / {p[1]:.1f}%" for k, p in check["runs"].items()) \
                or "no +fork+hints run qualifies"
        lines.append(f"{verdict} {name}: {detail}")
    return lines
