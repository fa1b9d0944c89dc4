"""What every experiment shares: the work directory, overrides, one training run as a
results row, the results files.

An experiment module defines `run(ctx) -> (rows, summary)`: `rows` one dict per
training run, `summary` a dict with `table` (the rows of the results table, in
order), optional `text` (markdown under the table: claims next to measurements) and
`plots` (paths of PNGs it wrote).
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from moe_jax import data as data_lib
from moe_jax import planner
from moe_jax.config import ModelConfig, TrainConfig
from moe_jax.models.counting import count_params
from moe_jax.train import monitoring
from moe_jax.train.loop import RunResult, train
from moe_jax.train.runs import move_aside

SECTIONS = ("model", "data", "train")


def _parse_value(text: str, current: Any, where: str):
  if isinstance(current, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{where}={text!r}: expected true or false")
    return text.lower() in ("true", "1")
  if isinstance(current, tuple):
    return tuple(x for x in text.split(",") if x)
  if isinstance(current, int) and not isinstance(current, bool):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if current is None:
    return None if text.lower() == "none" else int(text) if text.isdigit() else text
  return text


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
  out: dict[str, dict[str, str]] = {s: {} for s in SECTIONS}
  for item in items:
    key, sep, value = item.partition("=")
    section, dot, field = key.partition(".")
    if not sep or not dot or section not in SECTIONS:
      raise ValueError(f"override {item!r} must look like section.field=value with "
                       f"section one of {SECTIONS}")
    out[section][field] = value
  return out


def apply_overrides(cfg, raw: dict[str, str], section: str):
  fields = {f.name for f in dataclasses.fields(cfg)}
  unknown = set(raw) - fields
  if unknown:
    raise ValueError(f"unknown {section} field(s) {sorted(unknown)}; allowed: {sorted(fields)}")
  values = {k: _parse_value(v, getattr(cfg, k), f"{section}.{k}") for k, v in raw.items()}
  return dataclasses.replace(cfg, **values) if values else cfg


@dataclasses.dataclass
class Context:
  name: str
  quick: bool
  workdir: Path
  overrides: dict[str, dict[str, str]]
  seeds: int | None
  progress: bool
  command: str
  model: str | None = None       # --model preset, for experiments that take one
  mesh: Any = None               # jax Mesh from --mesh, None for one device
  moved_to: str | None = None    # --fresh: where the old work directory went

  @classmethod
  def create(cls, name: str, *, quick: bool = False, workdir: str | None = None,
             overrides: list[str] | None = None, seeds: int | None = None,
             progress: bool = True, model: str | None = None,
             mesh: str | None = None, fresh: bool = False) -> "Context":
    """`fresh`: move an existing work directory to `<workdir>.old-<timestamp>` (nothing
    deleted) so every run starts over; otherwise runs resume there, and a run whose
    configs differ from its checkpoint's is refused (moe_jax.train.runs)."""
    workdir = Path(workdir or os.path.join("runs", name + ("_quick" if quick else "")))
    # One process moves the directory (on a shared filesystem the others see it).
    moved_to = move_aside(workdir) if fresh and jax.process_index() == 0 else None
    if moved_to:
      print(f"--fresh: moved the old work directory to {moved_to}")
    workdir.mkdir(parents=True, exist_ok=True)
    command = "python -m experiments.run " + " ".join(
        shlex.quote(a) for a in [f"--exp={name}"] + (["--quick"] if quick else [])
        + ([f"--seeds={seeds}"] if seeds else []) + ([f"--model={model}"] if model else [])
        + ([f"--mesh={mesh}"] if mesh else []) + list(overrides or []))
    return cls(name=name, quick=quick, workdir=workdir,
               overrides=parse_overrides(overrides or []), seeds=seeds,
               progress=progress, command=command, model=model,
               mesh=planner.make_preset_mesh(mesh) if mesh else None, moved_to=moved_to)

  def n_seeds(self, default: int) -> int:
    return self.seeds or (1 if self.quick else default)

  def configs(self, model: ModelConfig, data: data_lib.DataConfig, train_cfg: TrainConfig):
    """The experiment's configs with the command line's overrides applied."""
    return (apply_overrides(model, self.overrides["model"], "model"),
            apply_overrides(data, self.overrides["data"], "data").validate(),
            apply_overrides(train_cfg, self.overrides["train"], "train"))

  def train(self, variant: str, model: ModelConfig, data: data_lib.DataConfig,
            train_cfg: TrainConfig, **kwargs) -> RunResult:
    """One training run in `run_dir(variant)` with the command line's overrides
    applied; the result's `configs` / `model` are the resolved ones (report from those)."""
    model, data, train_cfg = self.configs(model, data, train_cfg)
    return train(model, data, train_cfg, self.run_dir(variant), progress=self.progress,
                 desc=variant, mesh=self.mesh, **kwargs)

  def run_dir(self, variant: str) -> Path:
    """`workdir/<variant>` (spaces -> _, '=' dropped; '/' makes subfolders)."""
    return self.workdir / variant.replace(" ", "_").replace("=", "")

  def write_results(self, rows: list[dict], summary: dict) -> None:
    record = {"experiment": self.name, "command": self.command, "quick": self.quick,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                          "jax": jax.__version__, "backend": jax.default_backend(),
                          "devices": jax.device_count()},
              "git": git_commit(), "packages": package_versions(),
              "table": summary["table"], "text": summary.get("text", ""),
              "plots": summary.get("plots", []), "runs": rows}
    (self.workdir / "results.json").write_text(json.dumps(record, indent=1, default=_json))
    (self.workdir / "results.md").write_text(self.markdown(rows, summary))

  def markdown(self, rows: list[dict], summary: dict) -> str:
    lines = [f"# {self.name}{' (quick)' if self.quick else ''}", "",
             f"`{self.command}`", "", markdown_table(summary["table"])]
    if summary.get("text"):
      lines += ["", summary["text"]]
    for plot in summary.get("plots", []):
      lines += ["", f"![{Path(plot).stem}]({Path(plot).name})"]
    return "\n".join(lines) + "\n"


def _json(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 \
        else f"{v:.2e}"
  return f"{v:,}" if isinstance(v, int) else str(v)


def markdown_table(rows: list[dict]) -> str:
  if not rows:
    return "(no rows)"
  columns = list(dict.fromkeys(k for r in rows for k in r))
  out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(out)


PACKAGES = ("moe_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy",
            "chex", "qwix", "scikit-learn", "tensorboardX")


def package_versions() -> dict[str, str | None]:
  """Installed versions of the packages a result depends on (None: not installed)."""
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def git_commit() -> dict[str, Any]:
  """The code's commit and whether the tree had uncommitted changes (None outside git)."""
  root = Path(__file__).resolve().parent.parent
  def git(*args):
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()
  try:
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain",
                                                                   "--untracked-files=no"))}
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}


def run_row(result: RunResult, **labels) -> dict[str, Any]:
  """The standard metrics of one run: balance on held-out text, held-out loss and
  accuracy per domain, throughput, parameter counts, and the resolved configs. Counts
  come from the config the run trained (command-line overrides applied)."""
  counts = count_params(result.model)
  row: dict[str, Any] = dict(labels)
  if result.eval_load.size:
    row.update(monitoring.balance_summary(result.eval_load))
    row["eval_load"] = result.eval_load.tolist()
  for domain, r in result.eval.items():
    row[f"{domain}_loss"] = r["loss"]
    row[f"{domain}_acc"] = r["accuracy"]
  row["val_loss"] = float(np.mean([r["loss"] for r in result.eval.values()]))
  row["train_loss"] = result.history[-1]["ce"] if result.history else float("nan")
  row["tokens_per_s"] = result.tokens_per_s        # this process's steps; NaN if none
  row["steps_trained"] = result.steps_trained
  row["params_total"] = counts.total
  row["params_active"] = counts.active
  row["curves"] = {"step": [h["step"] for h in result.history],
                   "loss": [h["ce"] for h in result.history],
                   "load_std": [h.get("load_std", float("nan")) for h in result.history]}
  row["fingerprint"] = result.fingerprint
  row["configs"] = result.configs
  return row


def mean_std(rows: list[dict], key: str) -> tuple[float, float]:
  values = np.array([r[key] for r in rows], dtype=float)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
