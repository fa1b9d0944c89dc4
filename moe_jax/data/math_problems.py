"""The `math` domain: generated arithmetic and algebra problems with answers.

The source's domain-adaptation stage raises the share of math in the data
mixture (5% -> 30%) and claims +19% on "the domain task". We need a math task
that is (a) real enough to be learnable by a small LM on a CPU, (b) infinitely
re-generatable without a download, and (c) scorable exactly. Grade-school
arithmetic and one-step linear equations satisfy all three.

Every problem is one line, `Q: <question> A: <answer>`:

    Q: 37+48=? A: 85
    Q: 91-56=? A: 35
    Q: 12*7=? A: 84
    Q: Solve 3x+7=22. A: x=5

so the prompt given to a model is everything up to and including `A:` and the
model's completion is scored by `score_answer`. Problems are grouped into
"worksheets" of `PROBLEMS_PER_DOC` lines, one worksheet per document: single
25-byte problems would be dominated by BOS/EOS and their token entropy would be
meaninglessly low (an entropy estimate over 25 samples is capped at log2(25)).
"""

from __future__ import annotations

import random
import re

PROBLEMS_PER_DOC = 16
KINDS = ("add", "sub", "mul", "linear")

_ANSWER_SEP = " A: "


def _make_problem(rng: random.Random) -> str:
  kind = rng.choice(KINDS)
  if kind == "add":
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"Q: {a}+{b}=?{_ANSWER_SEP}{a + b}"
  if kind == "sub":
    # Results may be negative: the model must learn the sign as well.
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"Q: {a}-{b}=?{_ANSWER_SEP}{a - b}"
  if kind == "mul":
    a, b = rng.randint(2, 99), rng.randint(2, 12)
    return f"Q: {a}*{b}=?{_ANSWER_SEP}{a * b}"
  # linear: a*x + b = c with an integer solution by construction.
  a, x, b = rng.randint(2, 12), rng.randint(-20, 20), rng.randint(-50, 50)
  c = a * x + b
  lhs = f"{a}x+{b}" if b >= 0 else f"{a}x-{-b}"
  return f"Q: Solve {lhs}={c}.{_ANSWER_SEP}x={x}"


def generate_problems(num_problems: int, seed: int = 0) -> list[str]:
  """Returns `num_problems` distinct problem lines, deterministic in `seed`.

  Distinctness matters: the held-out split is by document content, and a
  problem that appears in both splits would inflate held-out accuracy.
  """
  rng = random.Random(seed)
  seen: set[str] = set()
  problems: list[str] = []
  while len(problems) < num_problems:
    problem = _make_problem(rng)
    if problem not in seen:
      seen.add(problem)
      problems.append(problem)
  return problems


def generate_math_documents(max_bytes: int, seed: int = 0) -> list[str]:
  """Worksheets of `PROBLEMS_PER_DOC` distinct problems, about `max_bytes` total."""
  # A problem line averages ~19 bytes; generate a few extra and cut by bytes.
  num_problems = max(PROBLEMS_PER_DOC, max_bytes // 17)
  problems = generate_problems(num_problems, seed=seed)
  docs, total = [], 0
  for start in range(0, len(problems) - PROBLEMS_PER_DOC + 1, PROBLEMS_PER_DOC):
    doc = "\n".join(problems[start:start + PROBLEMS_PER_DOC]) + "\n"
    if total + len(doc) > max_bytes and docs:
      break
    docs.append(doc)
    total += len(doc)
  return docs


def split_problem(line: str) -> tuple[str, str]:
  """`"Q: 1+2=? A: 3"` -> (`"Q: 1+2=? A:"`, `"3"`): the prompt and expected answer."""
  question, sep, answer = line.partition(_ANSWER_SEP)
  if not sep:
    raise ValueError(f"not a math problem line: {line!r}")
  return question + _ANSWER_SEP.rstrip(), answer.strip()


def problems_in(docs: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
  """All (prompt, expected answer) pairs in a list of worksheets, in order."""
  return [split_problem(line) for doc in docs for line in doc.splitlines()
          if line.strip()]


_FIRST_TOKEN = re.compile(r"\s*(\S+)")


def score_answer(completion: str, expected: str) -> bool:
  """Whether a model's completion of a prompt ending in `A:` is correct.

  The answer is the first whitespace-delimited token of the completion, with a
  trailing period stripped; it must equal `expected` exactly (so `x=5` is right
  and `5` is wrong for an equation, and `085` is wrong for `85`). Anything after
  it (e.g. the next generated problem) is ignored.
  """
  match = _FIRST_TOKEN.match(completion)
  if match is None:
    return False
  return match.group(1).rstrip(".") == expected.strip()


def math_accuracy(completions: list[str], expected: list[str]) -> float:
  """Fraction of completions that `score_answer` marks correct."""
  if len(completions) != len(expected):
    raise ValueError(f"got {len(completions)} completions for "
                     f"{len(expected)} expected answers")
  if not expected:
    raise ValueError("expected must not be empty")
  return sum(map(score_answer, completions, expected)) / len(expected)
