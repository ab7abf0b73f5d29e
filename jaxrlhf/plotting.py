"""PNG plots of a run's metrics, with matplotlib and no display.

- ``plot_metrics``: one small panel per metric of a ``metrics.jsonl`` (or a list of records),
  against ``step``.
- ``plot_curves``: the general form for experiment-specific figures: several panels, each with
  several labelled series.

Figures are built with ``matplotlib.figure.Figure`` directly (no ``pyplot``), so plotting works on a
headless machine, never opens a window and never changes the global matplotlib backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from jaxrlhf.metrics_log import read_metrics

__all__ = ["plot_metrics", "plot_curves", "moving_average"]

Series = Any  # y values, or an (x, y) pair of sequences


def moving_average(values: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each position (shorter at the start); same length."""
    values_N = np.asarray(values, dtype=np.float64)
    if window <= 1 or values_N.size == 0:
        return values_N
    cumulative = np.cumsum(np.insert(values_N, 0, 0.0))
    ends = np.arange(1, values_N.size + 1)
    starts = np.maximum(ends - window, 0)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def _split_series(series: Series) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(series, tuple) and len(series) == 2:
        x, y = np.asarray(series[0], dtype=np.float64), np.asarray(series[1], dtype=np.float64)
    else:
        y = np.asarray(series, dtype=np.float64)
        x = np.arange(y.size, dtype=np.float64)
    if x.shape != y.shape or y.ndim != 1:
        raise ValueError(f"a series needs 1-d x and y of the same length, got {x.shape} and {y.shape}")
    return x, y


def _grid(num_panels: int, ncols: int | None) -> tuple[int, int]:
    ncols = ncols or min(3, max(num_panels, 1))
    return math.ceil(max(num_panels, 1) / ncols), ncols


def _save(fig: Figure, out_png: str | os.PathLike) -> str:
    out_png = os.fspath(out_png)
    os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png


def plot_curves(
    panels: Mapping[str, Mapping[str, Series]],
    out_png: str | os.PathLike,
    title: str | None = None,
    *,
    xlabel: str = "step",
    ylabels: Mapping[str, str] | None = None,
    ylims: Mapping[str, tuple[float, float]] | None = None,
    smooth: int = 1,
    ncols: int | None = None,
) -> str:
    """Save a grid of panels, each with labelled series, as a PNG.

    Args:
      panels: ``{panel title: {series label: y or (x, y)}}``; y alone is plotted against 0..n-1.
      out_png: where to write the PNG (parent directories are created).
      title: figure title.
      xlabel: x-axis label of every panel.
      ylabels: optional y-axis label per panel title.
      ylims: optional (low, high) y range per panel title.
      smooth: moving-average window; above 1 the raw series is drawn faintly under the smoothed one.
      ncols: panels per row (default: up to 3).

    Returns:
      The path written.
    """
    nrows, ncols = _grid(len(panels), ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.1 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (panel_title, series_by_label) in zip(axes, panels.items()):
        for index, (label, series) in enumerate(series_by_label.items()):
            x, y = _split_series(series)
            color = f"C{index % 10}"
            if smooth > 1:
                ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(x, moving_average(y, smooth), color=color, label=label, linewidth=1.6)
            else:
                ax.plot(x, y, color=color, label=label, linewidth=1.4)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel(xlabel)
        if ylabels and panel_title in ylabels:
            ax.set_ylabel(ylabels[panel_title])
        if ylims and panel_title in ylims:
            ax.set_ylim(*ylims[panel_title])
        ax.grid(alpha=0.3)
        if len(series_by_label) > 1 or any(label for label in series_by_label):
            ax.legend(fontsize=8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def plot_metrics(
    metrics: str | os.PathLike | Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    out_png: str | os.PathLike,
    title: str | None = None,
    *,
    x_key: str = "step",
    smooth: int = 1,
    ncols: int | None = None,
) -> str:
    """Small multiples: one panel per metric in ``keys``, plotted against ``x_key``.

    Args:
      metrics: a ``metrics.jsonl`` path, a run directory holding one, or a list of records (dicts).
      keys: the metrics to plot, one panel each; records without a key are skipped for that panel.
      out_png: where to write the PNG.
      title: figure title.
      x_key: the record field used as x (default ``step``).
      smooth: moving-average window (1: raw values only).
      ncols: panels per row (default: up to 3).

    Returns:
      The path written.
    """
    records = read_metrics(metrics) if isinstance(metrics, (str, os.PathLike)) else list(metrics)
    panels = {}
    for key in keys:
        points = [(r[x_key], r[key]) for r in records if key in r and x_key in r and r[key] is not None]
        x, y = zip(*points) if points else ((), ())
        panels[key] = {"": (tuple(x), tuple(y))}
    return plot_curves(panels, out_png, title, xlabel=x_key, smooth=smooth, ncols=ncols)
