"""The Pareto plot of a policy sweep: mean checkpoints per request (log x) vs tokens saved (y).

One line per policy family (``dp``, ``ldp``, ``block``, ``balanced``, each with its ``+fork`` /
``+hints`` variants), points labelled with their parameter; parameter-free policies (``log``, ``sqrt``,
``end``, ...) are single markers. Error bars are one standard deviation over seeds.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

_X_METRIC = "checkpoints_per_request"
_Y_METRIC = "tokens_saved_pct"


def policy_family(policy: str) -> tuple[str, str]:
    """Split a policy spec into (family, parameter): ``"dp:8+fork"`` -> ``("dp+fork", "8")``."""
    head, *modifiers = policy.split("+")
    name, _, parameter = head.partition(":")
    return name + "".join(f"+{m}" for m in modifiers), parameter


def _numeric(parameter: str) -> float:
    try:
        return float(parameter)
    except ValueError:
        return float("inf")


def _family_points(summaries: Sequence[Any]) -> dict[str, list[tuple[float, float, float, float, str]]]:
    families: dict[str, list] = defaultdict(list)
    for summary in summaries:
        family, parameter = policy_family(summary.policy)
        x, y = summary.mean[_X_METRIC], summary.mean[_Y_METRIC]
        families[family].append((x, y, summary.sd[_X_METRIC], summary.sd[_Y_METRIC], parameter))
    for points in families.values():
        points.sort(key=lambda p: (p[0], _numeric(p[4])))
    return dict(families)


def pareto_plot(summaries: Sequence[Any], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw the sweep's Pareto plot as a PNG.

    Args:
      summaries: objects with ``.policy`` and ``.mean`` / ``.sd`` dicts holding
        ``checkpoints_per_request`` and ``tokens_saved_pct`` (e.g. `simulate.PolicySummary`).
      path: the PNG to write.
      title: the plot title.

    Returns:
      The path written. Policies storing no checkpoint (x = 0) cannot sit on a log axis; they are
      listed in a note under the plot instead.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if not summaries:
        raise ValueError("summaries: nothing to plot")
    families = _family_points(summaries)
    figure, axes = plt.subplots(figsize=(9, 6), dpi=120)
    markers = "osD^v<>phX*"
    off_axis = []
    colours = plt.get_cmap("tab10")
    for index, (family, points) in enumerate(sorted(families.items())):
        shown = [p for p in points if p[0] > 0]
        off_axis += [f"{family}{':' + p[4] if p[4] else ''} ({p[1]:.1f}%)" for p in points if p[0] <= 0]
        if not shown:
            continue
        xs, ys, xerr, yerr, labels = zip(*shown)
        style = "-" if len(shown) > 1 else "none"
        axes.errorbar(xs, ys, xerr=xerr, yerr=yerr, label=family, color=colours(index % 10), linestyle=style,
                      marker=markers[index % len(markers)], markersize=6, capsize=2, linewidth=1.4)
        for x, y, label in zip(xs, ys, labels):
            if label:
                axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                              color=colours(index % 10))
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axes.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    axes.tick_params(axis="x", which="minor", labelsize=7)
    axes.set_xlabel("mean checkpoints stored per request (log scale)")
    axes.set_ylabel("tokens saved (%)")
    axes.grid(True, which="both", alpha=0.3)
    axes.set_title(title or "Checkpoint placement: tokens saved vs states stored")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(title="policy family", fontsize=8, loc="best")
    if off_axis:
        figure.text(0.01, 0.01, "not shown (no checkpoints stored): " + ", ".join(off_axis), fontsize=7)
    figure.tight_layout(rect=(0, 0.03 if off_axis else 0, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path

