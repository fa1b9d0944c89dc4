"""The constitution: written principles as editable data, each with a programmatic judge.

    constitution.json --load_constitution--> (Principle(id, name, text, judge, params), ...)
    judge_scores(principles, prompt, response) -> (P,) scores in [0, 1]
    passes(...)                                -> (P,) score >= PASS_THRESHOLD

Constitutional AI (Bai et al., 2022) writes the values as a short list of
principles and lets a judge apply them. Here the judges are programs
(moe_jax/align/judges.py), so labels are exact and cheap at this scale, and the
"safety score" of the experiment is the held-out pass rate over the principles.
A principle passes at score >= 0.5: count-based judges give 1/3 for a single
violation, ratio-based ones fall below 0.5 as soon as the limit is crossed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

import numpy as np

from moe_jax.align.judges import KINDS

DEFAULT_PATH = pathlib.Path(__file__).with_name("constitution.json")
PASS_THRESHOLD = 0.5
FIELDS = ("id", "name", "text", "judge", "params")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Principle:
  """One principle: `id` (1..P, its position and reward-model head + 1), a short
  snake_case `name` for tables, the English `text`, the judge kind and its params
  (all params, defaults filled in; lists as tuples)."""
  id: int
  name: str
  text: str
  judge: str
  params: Mapping[str, Any] = dataclasses.field(hash=False)

  def score(self, prompt: str, response: str) -> float:
    """This principle's judge score of `response` to `prompt`, in [0, 1]."""
    return float(KINDS[self.judge].score(prompt, response, self.params))


def _freeze(value):
  return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def _principle(entry: Any, index: int, source: str) -> Principle:
  where = f"{source}: principle #{index + 1}"
  if not isinstance(entry, dict):
    raise ValueError(f"{where}: must be a JSON object with fields {FIELDS}, got "
                     f"{type(entry).__name__}")
  if "id" in entry:
    where = f"{source}: principle id={entry['id']!r}"
  for field in FIELDS:
    if field not in entry:
      raise ValueError(f"{where}: missing field {field!r} (each principle needs {FIELDS})")
  unknown = sorted(set(entry) - set(FIELDS))
  if unknown:
    raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {FIELDS}")
  pid, name, text, kind, params = (entry[f] for f in FIELDS)
  if not (isinstance(pid, int) and not isinstance(pid, bool) and pid == index + 1):
    raise ValueError(f"{where}: field 'id'={pid!r} is invalid: ids must be the integers "
                     f"1, 2, ... in file order (this one should be {index + 1})")
  if not (isinstance(name, str) and _NAME.match(name)):
    raise ValueError(f"{where}: field 'name'={name!r} is invalid: a short snake_case name "
                     "(lower-case letters, digits, underscores)")
  if not (isinstance(text, str) and text.strip()):
    raise ValueError(f"{where}: field 'text' must be a non-empty string")
  if kind not in KINDS:
    raise ValueError(f"{where}: field 'judge'={kind!r} is unknown; allowed: {sorted(KINDS)}")
  if not isinstance(params, dict):
    raise ValueError(f"{where}: field 'params' must be a JSON object, got "
                     f"{type(params).__name__}")
  schema = KINDS[kind].params
  unknown = sorted(set(params) - set(schema))
  if unknown:
    raise ValueError(f"{where}: params {unknown} are unknown to judge {kind!r}; allowed: "
                     f"{sorted(schema) or 'none'}")
  resolved = {}
  for key, (default, check, allowed) in schema.items():
    if key not in params and default is None:
      raise ValueError(f"{where}: judge {kind!r} needs params.{key} ({allowed})")
    value = params.get(key, default)
    if not check(value):
      raise ValueError(f"{where}: params.{key}={value!r} is invalid: {allowed}")
    resolved[key] = _freeze(value)
  bad = KINDS[kind].check_all(resolved)
  if bad:
    raise ValueError(f"{where}: params.{bad[0]}={resolved[bad[0]]!r} is invalid: {bad[1]}")
  return Principle(id=pid, name=name, text=text.strip(), judge=kind, params=resolved)


def parse_constitution(data: Any, source: str = "<constitution>") -> tuple[Principle, ...]:
  """Principles from parsed JSON: {"principles": [...]} (other keys are comments)."""
  if not isinstance(data, dict) or not isinstance(data.get("principles"), list):
    raise ValueError(f"{source}: expected a JSON object with a list 'principles'")
  if not data["principles"]:
    raise ValueError(f"{source}: 'principles' is empty; give at least one")
  principles = tuple(_principle(e, i, source) for i, e in enumerate(data["principles"]))
  names = [p.name for p in principles]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"{source}: principle names must be distinct; repeated: {dup}")
  return principles


def load_constitution(path: str | os.PathLike | None = None) -> tuple[Principle, ...]:
  """The principles of a constitution file (default: the packaged constitution.json).
  Errors name the file, the principle id, the field and what is allowed."""
  path = pathlib.Path(path) if path is not None else DEFAULT_PATH
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: "
                     f"{e.msg}") from None
  return parse_constitution(data, str(path))


def principle_by_id(principles: Sequence[Principle], principle_id: int) -> Principle:
  for p in principles:
    if p.id == principle_id:
      return p
  raise ValueError(f"no principle with id {principle_id!r}; ids are "
                   f"{[p.id for p in principles]}")


def judge_scores(principles: Sequence[Principle], prompt: str, response: str
                 ) -> np.ndarray:
  """(P,) float32: every principle's judge score of `response` to `prompt`."""
  return np.array([p.score(prompt, response) for p in principles], np.float32)


def passes(principles: Sequence[Principle], prompt: str, response: str,
           threshold: float = PASS_THRESHOLD) -> np.ndarray:
  """(P,) bool: which principles `response` satisfies (score >= threshold)."""
  return judge_scores(principles, prompt, response) >= threshold


def score_batch(principles: Sequence[Principle], prompts: Sequence, responses: Sequence[str]
                ) -> np.ndarray:
  """(N, P) float32 judge scores of N (prompt, response) pairs (prompts may be
  `Prompt`s or strings)."""
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
  out = np.zeros((len(prompts), len(principles)), np.float32)
  for i, (prompt, response) in enumerate(zip(prompts, responses)):
    out[i] = judge_scores(principles, getattr(prompt, "text", prompt), response)
  return out
