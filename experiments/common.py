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
import types
import typing
from pathlib import Path
from typing import Any

import jax
import numpy as np

from moe_jax import config as config_lib
from moe_jax import data as data_lib
from moe_jax import planner
from moe_jax.config import ModelConfig, TrainConfig
from moe_jax.models.counting import count_params
from moe_jax.train import monitoring
from moe_jax.train.loop import RunResult, train
from moe_jax.train.runs import move_aside

SECTIONS = ("model", "data", "train")
# quick: a CPU smoke run of every code path (what the tests run, <= 2 min);
# default: the CPU experiment (<= 20 min on 2 cores, what the README reports);
# full: the same experiment at a GPU's scale (wider and deeper models, more tokens).
SCALES = ("quick", "default", "full")


def at(scale: str, quick, default, full):
  """The value of a config field at `scale` (one of SCALES)."""
  if scale not in SCALES:
    raise ValueError(f"scale {scale!r}: allowed {SCALES}")
  return {"quick": quick, "default": default, "full": full}[scale]


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _parse_text(text: str, hint):
  """`text` as the annotation `hint` says (raises ValueError/TypeError if it cannot).

  Lists: `a,b,c` for tuple[str, ...]; `key:value,key:value` for a tuple of (str, X)
  pairs (a mapping such as data.mixture=code:0.5,math:0.5; repeated keys collect
  into tuples, as in data.user_data=legal:a/*.jsonl,legal:b/*.txt); `none` for None."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    if type(None) in args and text.lower() == "none":
      return None
    # Most specific first: a string arm accepts anything, so it comes last.
    arms = sorted((a for a in args if a is not type(None)), key=lambda a: a is str)
    for arm in arms:
      try:
        return _parse_text(text, arm)
      except (ValueError, TypeError):
        continue
    raise ValueError(text)
  if hint is bool:
    if text.lower() not in _TRUE + _FALSE:
      raise ValueError(text)
    return text.lower() in _TRUE
  if hint is int:
    return int(text)
  if hint is float:
    return float(text)
  if hint is str:
    return text
  if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
    item = args[0]
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if typing.get_origin(item) is tuple and typing.get_args(item)[:1] == (str,):
      value_hint = typing.get_args(item)[1]          # a mapping written as key:value
      pairs: dict[str, Any] = {}
      for part in parts:
        key, sep, value = part.partition(":")
        if not sep or not key:
          raise ValueError(part)
        if typing.get_origin(value_hint) is tuple:   # group values into a tuple
          pairs[key] = pairs.get(key, ()) + (value,)
        else:
          if key in pairs:
            raise ValueError(part)
          pairs[key] = _parse_text(value, value_hint)
      return tuple(pairs.items())
    return tuple(_parse_text(x, item) for x in parts)
  return text


def _parse_value(text: str, hint, where: str):
  """Parses one override; a failure names the field and the expected type
  (`model.d_model='abc': expected an int`)."""
  try:
    return _parse_text(text, hint)
  except (ValueError, TypeError):
    raise ValueError(f"{where}={text!r}: expected {config_lib.describe_type(hint)}"
                     f"{_written(hint)}") from None


def _written(hint) -> str:
  """How a list or mapping annotation is written on the command line."""
  text = repr(hint)
  if "tuple[tuple[str" in text:
    return ", written key:value,key:value"
  if "tuple[" in text:
    return ", written a,b,c"
  return ""


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
  """`cfg` with the overrides of one section parsed by each field's annotation; the
  config validates the result (errors name the class and field)."""
  fields = {f.name for f in dataclasses.fields(cfg)}
  unknown = set(raw) - fields
  if unknown:
    raise ValueError(f"unknown {section} field(s) {sorted(unknown)}; allowed: {sorted(fields)}")
  hints = typing.get_type_hints(type(cfg))
  values = {k: _parse_value(v, hints[k], f"{section}.{k}") for k, v in raw.items()}
  return dataclasses.replace(cfg, **values) if values else cfg


@dataclasses.dataclass
class Context:
  name: str
  scale: str                     # one of SCALES
  workdir: Path
  overrides: dict[str, dict[str, str]]
  seeds: int | None
  progress: bool
  command: str
  model: str | None = None       # --model preset, for experiments that take one
  mesh: Any = None               # jax Mesh from --mesh, None for one device
  moved_to: str | None = None    # --fresh: where the old work directory went

  @property
  def quick(self) -> bool:
    return self.scale == "quick"

  @classmethod
  def create(cls, name: str, *, scale: str = "default", workdir: str | None = None,
             overrides: list[str] | None = None, seeds: int | None = None,
             progress: bool = True, model: str | None = None,
             mesh: str | None = None, fresh: bool = False) -> "Context":
    """`fresh`: move an existing work directory to `<workdir>.old-<timestamp>` (nothing
    deleted) so every run starts over; otherwise runs resume there, and a run whose
    configs differ from its checkpoint's is refused (moe_jax.train.runs)."""
    at(scale, None, None, None)                              # a known scale
    suffix = "" if scale == "default" else "_" + scale
    workdir = Path(workdir or os.path.join("runs", name + suffix))
    # One process moves the directory (on a shared filesystem the others see it).
    moved_to = move_aside(workdir) if fresh and jax.process_index() == 0 else None
    if moved_to:
      print(f"--fresh: moved the old work directory to {moved_to}")
    workdir.mkdir(parents=True, exist_ok=True)
    command = "python -m experiments.run " + " ".join(
        shlex.quote(a) for a in [f"--exp={name}"] + ([f"--{scale}"] if suffix else [])
        + ([f"--seeds={seeds}"] if seeds else []) + ([f"--model={model}"] if model else [])
        + ([f"--mesh={mesh}"] if mesh else []) + list(overrides or []))
    return cls(name=name, scale=scale, workdir=workdir,
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
            train_cfg: TrainConfig, *, resolved: bool = False, **kwargs) -> RunResult:
    """One training run in `run_dir(variant)` with the command line's overrides
    applied; the result's `configs` / `model` are the resolved ones (report from those).
    resolved: the configs already come from `configs()` and were then changed on
    purpose (e.g. a depth chosen to match a resolved model's parameters), so the
    overrides are not applied again."""
    if not resolved:
      model, data, train_cfg = self.configs(model, data, train_cfg)
    return train(model, data, train_cfg, self.run_dir(variant), progress=self.progress,
                 desc=variant, mesh=self.mesh, **kwargs)

  def run_dir(self, variant: str) -> Path:
    """`workdir/<variant>` (spaces -> _, '=' dropped; '/' makes subfolders)."""
    return self.workdir / variant.replace(" ", "_").replace("=", "")

  def write_results(self, rows: list[dict], summary: dict) -> None:
    record = {"experiment": self.name, "command": self.command, "quick": self.quick,
              "scale": self.scale,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                          "jax": jax.__version__, "backend": jax.default_backend(),
                          "devices": jax.device_count(),
                          "xla_flags": os.environ.get("XLA_FLAGS", "")},
              "git": git_commit(), "packages": package_versions(),
              "table": summary["table"], "text": summary.get("text", ""),
              "plots": summary.get("plots", []), "runs": rows}
    (self.workdir / "results.json").write_text(json.dumps(record, indent=1, default=_json))
    (self.workdir / "results.md").write_text(self.markdown(rows, summary))

  def markdown(self, rows: list[dict], summary: dict) -> str:
    lines = [f"# {self.name}{'' if self.scale == 'default' else f' ({self.scale})'}", "",
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
            "chex", "qwix", "scikit-learn", "tensorboardX", "sacrebleu")


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
  return _mean_sd([r[key] for r in rows])


def _mean_sd(values) -> tuple[float, float]:
  """Mean and sample sd (0 for one value)."""
  v = np.asarray(values, dtype=float)
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def paired(rows: list[dict], key: str, variant: str, reference: str,
           relative: bool = False) -> list[float]:
  """Per seed, in seed order: `key` of `variant` minus that of `reference` (or, with
  `relative`, their relative change in %; NaN where the reference is 0). Rows are
  matched by their `seed`; seeds without a reference row are left out."""
  ref = {r["seed"]: r[key] for r in rows if r["variant"] == reference}
  out = []
  for r in sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seed"]):
    if r["seed"] in ref:
      b = ref[r["seed"]]
      out.append((100.0 * (r[key] / b - 1.0) if b else float("nan")) if relative
                 else r[key] - b)
  return out


def pm(values, digits: int = 3, sign: bool = False) -> str:
  """'mean ± sd' of a table cell (sample sd; 0 for one value)."""
  mean, sd = _mean_sd(values)
  return f"{mean:{'+' if sign else ''}.{digits}f} ± {sd:.{digits}f}"
