"""The claims audit: every number the source claims, what we measured, and a verdict.

    claims.toml ──(accessor: row, column, effect)──┐
    results/<exp>/results.json ─────────────────────┴─> effect per seed -> mean ± sd (n)
                                                                          │ the rule
    results/claims/results.{json,md}  +  README section  <──── verdict ───┘

    python -m experiments.run --exp=claims          # ~1 s, trains nothing
    python -m experiments.claims --check            # exit 1 if the README section is stale
    python -m experiments.claims --results runs --out /tmp/audit --no-readme   # your runs

Which results: the committed `experiments/results/<exp>/results.json` (what the
README reports, so the audit runs the same from a fresh clone), else
`experiments/results/<exp>_quick/results.json` (the row says "quick"). The work
directory `runs/` is never read by default, since a half-finished or overridden run
there would silently change the README; `--results runs` audits your own runs
instead (same layout). `--exp=claims` always writes `experiments/results/claims/`
(deterministic: no date, so an unchanged audit changes no file) and the README's
section between `<!-- claims:begin -->` and `<!-- claims:end -->`; the runner also
leaves its usual copy in `runs/claims/`.

The measured value. The accessor (claims.toml) names a `column`, the row (`where`)
and an `effect` against a `baseline` row or column. With seeds, the effect is
computed per seed (rows of results.json's `runs` paired by their `seed`) and
reported as mean ± sd (sample sd, ddof 1) over the n seeds. Without per-seed rows,
the table's row is used: n is its `seeds` where the table gives the spread
(`<column>_sd`, propagated to first order through the effect), else n = 1, sd = 0.

The rule, in this order; the first that applies decides:
  1. not measurable at this scale: the claim states why no result here can decide
     it (`not_here`, e.g. a per-token loss against our per-byte one).
  2. not implemented: no results.json for the experiment; or results.json lacks the
     row or column the claim needs (the row says which; the measurement is missing).
  3. not measurable at this scale, when any of:
     a. the claim needs another backend (`requires_backend`, e.g. a GPU speed-up)
        than the results were measured on;
     b. the claim's control fails: the setup cannot show the effect (a ceiling: int3
        costs less than the claimed bound; a floor: nothing is solved; a teacher
        worse than the student trained from scratch);
     c. fewer seeds than `min_seeds` (3 where the claimed effect is a small
        difference, comparable with seed noise);
     d. the effect is not finite (e.g. relative to a baseline of zero);
     e. the noise exceeds the margin: [mean - sd, mean + sd] contains the threshold.
  4. holds: [mean - sd, mean + sd] lies on the claimed side of the threshold
     (`at_least`: above it, `at_most`: below it);
  5. does not hold: it lies on the other side.
The threshold is stated per claim with its reason: for a claimed change, half the
claimed size (a ratio: half the claimed gain over 1x), so an effect of the claimed
sign and at least half the size counts; for a claimed level or bound (92% of the
teacher, std < 0.15, within 1.2%), the level itself.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = Path(__file__).resolve().parent / "claims.toml"
RESULTS = ROOT / "experiments" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"

VERDICTS = ("holds", "does not hold", "not measurable at this scale", "not implemented")
EFFECTS = ("value", "difference", "points", "change_%", "reduction_%", "ratio")
DIRECTIONS = ("at_least", "at_most")
SOURCES = ("auto", "runs", "table")
REQUIRED = ("id", "technique", "quote", "claimed", "experiment", "command", "column",
            "where", "effect", "direction", "threshold")


class Missing(Exception):
  """results.json holds no value for the accessor (the message says what is missing)."""


# ---------------------------------------------------------------------------------
# The claims file
# ---------------------------------------------------------------------------------

def load_claims(path: Path = CLAIMS) -> tuple[list[dict], list[dict]]:
  """(claims, named techniques) of a claims file, every field checked; errors name
  the file, the claim and the field."""
  data = tomllib.loads(Path(path).read_text())
  claims = data.get("claim", [])
  seen = set()
  for i, c in enumerate(claims):
    where = f"{path}: claim {c.get('id', f'#{i + 1}')}"
    for key in REQUIRED:
      if key not in c:
        raise ValueError(f"{where}: field {key!r} is missing")
    if c["id"] in seen:
      raise ValueError(f"{where}: id {c['id']!r} is used twice")
    seen.add(c["id"])
    _check_measure(c, where)
    for sub in ("control", "stand_in"):
      if sub in c:
        _check_measure(c[sub], f"{where}.{sub}", judged=sub == "control")
    for key in ("min_seeds",):
      if not isinstance(c.get(key, 1), int) or c.get(key, 1) < 1:
        raise ValueError(f"{where}: {key}={c[key]!r}: expected an int >= 1")
  return claims, data.get("named", [])


def _check_measure(m: dict, where: str, judged: bool = True) -> None:
  if not isinstance(m.get("column"), str):
    raise ValueError(f"{where}: column={m.get('column')!r}: expected a string")
  if not isinstance(m.get("where", {}), dict):
    raise ValueError(f"{where}: where={m.get('where')!r}: expected a table {{key = value}}")
  if m.get("effect", "value") not in EFFECTS:
    raise ValueError(f"{where}: effect={m.get('effect')!r}; allowed: {EFFECTS}")
  if m.get("effect", "value") != "value" and not isinstance(m.get("baseline"), dict):
    raise ValueError(f"{where}: effect={m['effect']!r} needs a baseline = {{where, column}}")
  if m.get("source", "auto") not in SOURCES:
    raise ValueError(f"{where}: source={m.get('source')!r}; allowed: {SOURCES}")
  if judged:
    if m.get("direction") not in DIRECTIONS:
      raise ValueError(f"{where}: direction={m.get('direction')!r}; allowed: {DIRECTIONS}")
    if not isinstance(m.get("threshold"), (int, float)) or isinstance(m["threshold"], bool):
      raise ValueError(f"{where}: threshold={m.get('threshold')!r}: expected a number")


# ---------------------------------------------------------------------------------
# Results files and the accessor
# ---------------------------------------------------------------------------------

def find_results(results_dir: Path, experiment: str) -> Path | None:
  """The full run's results.json, else the quick run's, else None."""
  for name in (experiment, experiment + "_quick"):
    path = Path(results_dir) / name / "results.json"
    if path.is_file():
      return path
  return None


def read_results(path: Path) -> dict:
  """results.json, checked for what the audit reads; errors name the file."""
  try:
    record = json.loads(Path(path).read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a readable results.json ({e})") from None
  if not isinstance(record, dict) or not isinstance(record.get("table"), list):
    raise ValueError(f"{path}: malformed results.json: expected an object with a "
                     f"'table' list (as experiments/common.py writes it)")
  if not isinstance(record.get("runs", []), list):
    raise ValueError(f"{path}: malformed results.json: 'runs' must be a list")
  return record


_PLUS_MINUS = re.compile(r"^\s*([-+0-9.eE]+|nan)\s*±\s*([-+0-9.eE]+|nan)\s*$")


def _number(v) -> tuple[float, float | None] | None:
  """(value, sd) of a cell: a number, or a "mean ± sd" string; None if neither."""
  if isinstance(v, bool) or v is None:
    return None
  if isinstance(v, (int, float)):
    return float(v), None
  if isinstance(v, str):
    m = _PLUS_MINUS.match(v)
    if m:
      return float(m.group(1)), float(m.group(2))
    try:
      return float(v), None
    except ValueError:
      return None
  return None


def _matches(row: dict, where: dict) -> bool:
  return all(k in row and row[k] == v for k, v in where.items())


def _describe(where: dict, column: str) -> str:
  cond = ", ".join(f"{k}={v!r}" for k, v in where.items()) or "any row"
  return f"{column!r} where {cond}"


def _per_seed(rows: list[dict], where: dict, column: str) -> dict | None:
  """{seed: value} of the matching `runs` rows, or None when they cannot give it
  (no match, column absent, or several rows without seeds)."""
  hits = [r for r in rows if isinstance(r, dict) and _matches(r, where)]
  values = [(_number(r.get(column)), r.get("seed")) for r in hits]
  if not hits or any(v is None for v, _ in values):
    return None
  if len(hits) == 1:
    return {hits[0].get("seed"): values[0][0][0]}
  if any(s is None for _, s in values) or len({s for _, s in values}) != len(values):
    return None
  return {s: v[0] for v, s in values}


def _table_cell(table: list[dict], where: dict, column: str) -> tuple[float, float, int]:
  """(mean, sd, n) of the one matching table row."""
  hits = [r for r in table if isinstance(r, dict) and _matches(r, where)]
  if len(hits) != 1:
    raise Missing(f"{'no' if not hits else len(hits)} table rows with "
                  f"{_describe(where, column)}")
  row = hits[0]
  cell = _number(row.get(column))
  if cell is None:
    raise Missing(f"no value {_describe(where, column)}")
  value, sd = cell
  sd_col = _number(row.get(column + "_sd"))
  if sd is None and sd_col is not None:
    sd = sd_col[0]
  seeds = row.get("seeds", 1)
  if sd is None or not isinstance(seeds, int) or seeds < 2:
    return value, 0.0, 1                # n counts only seeds whose spread is known
  return value, sd, seeds


def _effect(kind: str, a, b):
  a, b = np.asarray(a, float), np.asarray(b, float)
  with np.errstate(divide="ignore", invalid="ignore"):
    return {"value": a, "difference": a - b, "points": 100 * (a - b),
            "change_%": 100 * (a - b) / np.abs(b), "reduction_%": 100 * (b - a) / np.abs(b),
            "ratio": a / b}[kind]


def _effect_sd(kind: str, a, sa, b, sb) -> float:
  """First-order propagation of independent sds through the effect."""
  with np.errstate(divide="ignore", invalid="ignore"):
    if kind == "value":
      return sa
    if kind in ("difference", "points"):
      return (100 if kind == "points" else 1) * math.hypot(sa, sb)
    rel = math.hypot(sa / b, a * sb / b ** 2) if b else math.inf
    return rel * (1 if kind == "ratio" else 100)


def measure(record: dict, spec: dict) -> dict:
  """{mean, sd, n, per_seed, from} of one accessor; raises Missing."""
  kind, column, where = spec.get("effect", "value"), spec["column"], spec.get("where", {})
  base = spec.get("baseline", {})
  b_where, b_column = base.get("where", where), base.get("column", column)
  source = spec.get("source", "auto")
  runs = record.get("runs", [])
  if source in ("auto", "runs"):
    a = _per_seed(runs, where, column)
    b = _per_seed(runs, b_where, b_column) if kind != "value" else a
    if a is not None and b is not None:
      if len(b) == 1 and len(a) > 1:                      # one baseline for every seed
        b = dict.fromkeys(a, next(iter(b.values())))
      seeds = list(a) if len(a) == len(b) == 1 else [s for s in a if s in b]
      if seeds:
        values = np.atleast_1d(_effect(kind, [a[s] for s in seeds],
                                       [b[s] if s in b else b[next(iter(b))] for s in seeds]))
        n = len(values)
        return {"mean": float(np.mean(values)),
                "sd": float(np.std(values, ddof=1)) if n > 1 else 0.0,
                "n": n, "per_seed": [float(v) for v in values], "from": "runs"}
    if source == "runs":
      missing = _describe(where, column) if a is None else _describe(b_where, b_column)
      raise Missing(f"no runs row with {missing}")
  a, sa, na = _table_cell(record["table"], where, column)
  if kind == "value":
    b, sb, nb = a, 0.0, na
  else:
    b, sb, nb = _table_cell(record["table"], b_where, b_column)
  n = min(na, nb)
  return {"mean": float(_effect(kind, a, b)),
          "sd": float(_effect_sd(kind, a, sa if n > 1 else 0.0, b, sb if n > 1 else 0.0)),
          "n": n, "per_seed": None, "from": "table"}


# ---------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------

def _side(m: dict, direction: str, threshold: float) -> str:
  """'claimed' | 'other' | 'straddles' for the interval mean ± sd."""
  lo, hi = m["mean"] - m["sd"], m["mean"] + m["sd"]
  if direction == "at_least":
    return "claimed" if lo >= threshold else "other" if hi < threshold else "straddles"
  return "claimed" if hi <= threshold else "other" if lo > threshold else "straddles"


def fmt(value: float, unit: str = "") -> str:
  if not math.isfinite(value):
    return str(value)
  a = abs(value)
  text = f"{value:,.0f}" if a >= 1000 else f"{value:.3g}" if a >= 0.01 or a == 0 \
      else f"{value:.2e}"
  return text + unit


def judge(claim: dict, results_dir: Path) -> dict:
  """One row of the audit: the claim, the measured value, the verdict and why."""
  unit, direction, threshold = claim.get("unit", ""), claim["direction"], claim["threshold"]
  bound = (">=" if direction == "at_least" else "<=") + " " + fmt(threshold, unit)
  row = {"id": claim["id"], "technique": claim["technique"], "quote": claim["quote"],
         "claimed": claim["claimed"], "experiment": claim["experiment"],
         "command": claim["command"], "results": None, "quick": None,
         "mean": None, "sd": None, "n": None, "measured": "-", "threshold": bound}
  notes = []

  def done(verdict: str, reason: str) -> dict:
    row["verdict"] = verdict
    row["why"] = "; ".join([reason] + notes + ([claim["caveat"]] if "caveat" in claim
                                                else []))
    return row

  if "not_here" in claim:
    return done("not measurable at this scale", claim["not_here"])
  path = find_results(results_dir, claim["experiment"])
  if path is None:
    exists = (ROOT / "experiments" / f"{claim['experiment']}.py").is_file()
    return done("not implemented", f"no results.json for {claim['experiment']}" +
                ("" if exists else " (the experiment is not built yet)"))
  record = read_results(path)
  folder = path.parent.resolve()
  row["results"] = str(folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder)
  row["quick"] = bool(record.get("quick"))
  row["command"] = record.get("command", claim["command"])
  try:
    m = measure(record, claim)
  except Missing as e:
    if "stand_in" in claim:
      try:
        s = measure(record, claim["stand_in"])
        notes.append(f"stand-in, not judged: {claim['stand_in'].get('label', '')} "
                     f"{_pm(s, '')}")
      except Missing:
        pass
    return done("not implemented", f"results.json lacks the measurement: {e}")
  row.update(mean=m["mean"], sd=m["sd"], n=m["n"], measured=_pm(m, unit))
  backend = (record.get("machine") or {}).get("backend")
  if claim.get("requires_backend") and backend != claim["requires_backend"]:
    return done("not measurable at this scale",
                f"needs a {claim['requires_backend']}; measured on {backend}")
  if "control" in claim:
    c = claim["control"]
    try:
      cm = measure(record, c)
      ok = (cm["mean"] >= c["threshold"]) if c["direction"] == "at_least" \
          else (cm["mean"] <= c["threshold"])
      if not ok:
        return done("not measurable at this scale",
                    f"control fails: {c['says']} (measured {fmt(cm['mean'])}, needs "
                    f"{'>=' if c['direction'] == 'at_least' else '<='} {fmt(c['threshold'])})")
    except Missing as e:
      notes.append(f"control not measured ({e})")
  if m["n"] < claim.get("min_seeds", 1):
    return done("not measurable at this scale",
                f"n={m['n']}; this claim needs n >= {claim['min_seeds']} seeds or repeats "
                f"({claim.get('why', '')})")
  if not math.isfinite(m["mean"]) or not math.isfinite(m["sd"]):
    return done("not measurable at this scale", "the effect is not finite (a zero baseline)")
  side = _side(m, direction, threshold)
  interval = (f"mean ± sd {fmt(m['mean'] - m['sd'])} .. {fmt(m['mean'] + m['sd'])}"
              if m["sd"] else fmt(m["mean"], unit))
  if side == "straddles":
    return done("not measurable at this scale",
                f"the noise exceeds the margin: {interval} contains {fmt(threshold, unit)}")
  verdict = "holds" if side == "claimed" else "does not hold"
  return done(verdict, f"{interval} {'meets' if side == 'claimed' else 'misses'} "
                       f"{bound}: {claim.get('why', '')}")


def _pm(m: dict, unit: str) -> str:
  text = fmt(m["mean"], unit)
  if m["n"] > 1:
    text += f" ± {fmt(m['sd'], unit)}"
  return text + f" (n={m['n']})"


def audit(results_dir: Path = RESULTS, claims_path: Path = CLAIMS) -> list[dict]:
  claims, _ = load_claims(claims_path)
  return [judge(c, Path(results_dir)) for c in claims]


# ---------------------------------------------------------------------------------
# Outputs: the table, results files, the README section
# ---------------------------------------------------------------------------------

def _cell(text) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict], named: list[dict]) -> str:
  """The generated README section (also results.md)."""
  counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
  lines = [
      "Generated by `python -m experiments.run --exp=claims` from the committed "
      "[`experiments/results/*/results.json`](experiments/results) with the claims and "
      "accessors of [`experiments/claims.toml`](experiments/claims.toml); the rule that "
      "decides a verdict is the docstring of [`experiments/claims.py`](experiments/claims.py). "
      "Measured: mean ± sd over n seeds (n=1: one seed).",
      "",
      "**" + ", ".join(f"{counts[v]} {v}" for v in VERDICTS) + f" (of {len(rows)}).**",
      "",
      "| # | technique | the source says | claimed | measured here | verdict | why | command |",
      "|---|---|---|---|---|---|---|---|"]
  for i, r in enumerate(rows, 1):
    where = (f"[{r['experiment']}{' (quick)' if r['quick'] else ''}]({r['results']})"
             if r["results"] else r["experiment"])
    lines.append("| " + " | ".join(_cell(x) for x in [
        i, r["technique"], f"\"{r['quote']}\"", r["claimed"], r["measured"],
        f"**{r['verdict']}**", r["why"], f"`{r['command']}` ({where})"]) + " |")
  if named:
    lines += ["", "Named by the source without a number to test:", ""]
    lines += [f"- {n['technique']}: {n['where']}" for n in named]
  return "\n".join(lines) + "\n"


def replace_section(text: str, section: str, path: Path | str = "README.md") -> str:
  """`text` with everything between the markers replaced by `section`."""
  if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
    raise ValueError(f"{path}: needs exactly one {BEGIN} followed by one {END}")
  head, rest = text.split(BEGIN)
  _, tail = rest.split(END)
  return f"{head}{BEGIN}\n{section}{END}{tail}"


def write(rows: list[dict], named: list[dict], out_dir: Path, readme: Path | None) -> bool:
  """results.json / results.md in `out_dir`; the README section. True if the README
  changed."""
  out_dir.mkdir(parents=True, exist_ok=True)
  md = markdown(rows, named)
  record = {"experiment": "claims", "command": "python -m experiments.run --exp=claims",
            "verdicts": list(VERDICTS), "table": rows}
  (out_dir / "results.json").write_text(json.dumps(record, indent=1) + "\n")
  (out_dir / "results.md").write_text("# claims audit\n\n" + md)
  if readme is None:
    return False
  old = readme.read_text()
  new = replace_section(old, md, readme)
  if new != old:
    readme.write_text(new)
  return new != old


def run(ctx):
  """`python -m experiments.run --exp=claims`: the committed results, the committed
  README. The runner writes its own copy of the table to ctx.workdir."""
  claims, named = load_claims()
  rows = [judge(c, RESULTS) for c in claims]
  changed = write(rows, named, RESULTS / "claims", README)
  print(f"README.md claims section {'updated' if changed else 'unchanged'}; "
        f"{RESULTS / 'claims'}/results.md")
  table = [{k: r[k] for k in ("id", "claimed", "measured", "verdict")} for r in rows]
  return rows, {"table": table, "text": markdown(rows, named)}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.claims",
                              description=__doc__.splitlines()[0])
  p.add_argument("--results", type=Path, default=RESULTS,
                 help="the results directory (<exp>/results.json); default: the committed one")
  p.add_argument("--claims", type=Path, default=CLAIMS)
  p.add_argument("--out", type=Path, default=None,
                 help="where results.json/md go (default: <results>/claims)")
  p.add_argument("--readme", type=Path, default=README)
  p.add_argument("--no-readme", action="store_true", help="leave the README alone")
  p.add_argument("--check", action="store_true",
                 help="write nothing; exit 1 if the README section differs from the audit")
  args = p.parse_args(argv)
  claims, named = load_claims(args.claims)
  rows = [judge(c, args.results) for c in claims]
  if args.check:
    text = args.readme.read_text()
    if replace_section(text, markdown(rows, named), args.readme) != text:
      print(f"{args.readme}: the claims section is stale; run python -m experiments.run "
            f"--exp=claims", file=sys.stderr)
      return 1
    return 0
  write(rows, named, args.out or args.results / "claims",
        None if args.no_readme else args.readme)
  print(markdown(rows, named))
  return 0


if __name__ == "__main__":
  sys.exit(main())
