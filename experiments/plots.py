"""Plots of the results files (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save(fig, ax, path: Path, *, xlabel: str, ylabel: str, title: str,
         grid: bool = True) -> str:
  """Label one axes, add the legend, write the figure to `path` and close it."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if grid:
    ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return str(path)


def curves(rows: list[dict], key: str, ylabel: str, path: Path, title: str,
           label_key: str = "variant") -> str:
  """One line per variant (mean over seeds) of rows[i]["curves"][key] against step."""
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  by_label: dict[str, list[dict]] = {}
  for r in rows:
    by_label.setdefault(r[label_key], []).append(r["curves"])
  for label, cs in by_label.items():
    n = min(len(c[key]) for c in cs)
    ax.plot(cs[0]["step"][:n], np.nanmean([c[key][:n] for c in cs], axis=0), label=label)
  return save(fig, ax, path, xlabel="step", ylabel=ylabel, title=title)


def expert_load_bars(loads: dict[str, np.ndarray], path: Path, title: str) -> str:
  """Relative load f_i / mean of every expert (layers averaged) per variant."""
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  width = 0.8 / max(len(loads), 1)
  for i, (label, load) in enumerate(loads.items()):
    load = np.asarray(load, dtype=float).reshape(-1, np.shape(load)[-1])
    rel = (load / load.mean(-1, keepdims=True)).mean(0)
    ax.bar(np.arange(rel.size) + i * width, rel, width=width, label=label)
  ax.axhline(1.0, color="k", lw=0.8)
  return save(fig, ax, path, xlabel="expert", ylabel="load / mean load (held-out text)",
              title=title, grid=False)


def latency_cdf(latencies_ms: dict[str, list[float]], path: Path, title: str) -> str:
  """Empirical CDF of per-request latency, one line per policy."""
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for label, x in latencies_ms.items():
    x = np.sort(np.asarray(x, dtype=float))
    ax.step(x, np.arange(1, x.size + 1) / x.size, where="post", label=label)
  return save(fig, ax, path, xlabel="end-to-end latency (ms)",
              ylabel="fraction of requests", title=title)
