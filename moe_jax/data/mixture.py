"""Domain-mixture weights as a function of the training step.

The source's domain-adaptation stage is a curriculum that raises one domain's
share of the mixture step by step (math: 5% -> 30%), the other domains keeping
their relative proportions. A `MixtureSchedule` is a frozen, validated value;
`weights(step)` is a pure function of the step, so the pipeline can ask for the
weights of any row's step and resuming from a checkpoint needs no extra state.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

KINDS = ("constant", "linear", "step")

# The source's curriculum numbers (stage (b), domain adaptation).
CURRICULUM_START_SHARE = 0.05
CURRICULUM_END_SHARE = 0.30


def _check_weights(field: str, weights: Sequence[float], num_domains: int):
  if len(weights) != num_domains:
    raise ValueError(f"{field}: expected {num_domains} weights (one per "
                     f"domain), got {len(weights)}")
  if any(not math.isfinite(w) or w < 0 for w in weights):
    raise ValueError(f"{field}: weights must be finite and >= 0, got {weights}")
  if abs(sum(weights) - 1.0) > 1e-6:
    raise ValueError(f"{field}: weights must sum to 1, got {sum(weights)}")


@dataclasses.dataclass(frozen=True)
class MixtureSchedule:
  """Per-domain sampling weights over training steps.

  kind="constant": `start_weights` at every step.
  kind="linear":   `start_weights` until `start_step`, then linear
                   interpolation to `end_weights` at `end_step`, then constant.
  kind="step":     like linear but piecewise constant in `num_stages` equal
                   increments: during the k-th of `num_stages` equal parts of
                   [start_step, end_step) the progress is k / num_stages, and
                   it is 1 from `end_step` on.
  """
  domains: tuple[str, ...]
  start_weights: tuple[float, ...]
  end_weights: tuple[float, ...] | None = None
  kind: str = "constant"
  start_step: int = 0
  end_step: int = 0
  num_stages: int = 5

  def __post_init__(self):
    if not self.domains or len(set(self.domains)) != len(self.domains):
      raise ValueError(f"domains: must be non-empty and distinct, got "
                       f"{self.domains}")
    if self.kind not in KINDS:
      raise ValueError(f"kind: must be one of {KINDS}, got {self.kind!r}")
    _check_weights("start_weights", self.start_weights, len(self.domains))
    if self.kind != "constant":
      if self.end_weights is None:
        raise ValueError(f"end_weights: required for kind={self.kind!r}")
      _check_weights("end_weights", self.end_weights, len(self.domains))
      if not 0 <= self.start_step < self.end_step:
        raise ValueError(f"start_step/end_step: need 0 <= start_step < "
                         f"end_step, got {self.start_step}, {self.end_step}")
    if self.kind == "step" and self.num_stages < 1:
      raise ValueError(f"num_stages: must be >= 1, got {self.num_stages}")

  def progress(self, step: int) -> float:
    """Fraction of the way from start to end weights at `step`, in [0, 1]."""
    if self.kind == "constant" or step < self.start_step:
      return 0.0
    if step >= self.end_step:
      return 1.0
    frac = (step - self.start_step) / (self.end_step - self.start_step)
    if self.kind == "step":
      return math.floor(frac * self.num_stages) / self.num_stages
    return frac

  def weights(self, step: int) -> np.ndarray:
    """(num_domains,) float64 weights at `step`; >= 0 and summing to 1."""
    start = np.asarray(self.start_weights, dtype=np.float64)
    if self.kind == "constant":
      return start
    t = self.progress(step)
    # A convex combination of two valid weight vectors is valid.
    return (1.0 - t) * start + t * np.asarray(self.end_weights, np.float64)

  def as_dict(self, step: int) -> dict[str, float]:
    return dict(zip(self.domains, map(float, self.weights(step))))


def constant_mixture(weights: Mapping[str, float]) -> MixtureSchedule:
  """Fixed weights, e.g. {"code": 0.5, "prose": 0.5}; must sum to 1."""
  return MixtureSchedule(domains=tuple(weights),
                         start_weights=tuple(float(w) for w in weights.values()))


def uniform_mixture(domains: Sequence[str]) -> MixtureSchedule:
  return constant_mixture({d: 1.0 / len(domains) for d in domains})


def with_share(weights: Mapping[str, float], domain: str,
               share: float) -> dict[str, float]:
  """`weights` with `domain` set to `share` and the others scaled to 1 - share.

  The others keep their relative proportions; if they are all zero they split
  the rest equally.
  """
  if domain not in weights:
    raise ValueError(f"domain: {domain!r} is not in the mixture "
                     f"{tuple(weights)}")
  if not 0.0 <= share <= 1.0:
    raise ValueError(f"share: must be in [0, 1], got {share}")
  others = {d: float(w) for d, w in weights.items() if d != domain}
  total = sum(others.values())
  out = {}
  for d in weights:
    if d == domain:
      out[d] = share
    elif total > 0:
      out[d] = others[d] / total * (1.0 - share)
    else:
      out[d] = (1.0 - share) / len(others)
  return out


def domain_curriculum(base: Mapping[str, float] | Sequence[str],
                      domain: str = "math",
                      start_share: float = CURRICULUM_START_SHARE,
                      end_share: float = CURRICULUM_END_SHARE,
                      start_step: int = 0, end_step: int = 1000,
                      kind: str = "linear",
                      num_stages: int = 5) -> MixtureSchedule:
  """The source's curriculum: `domain`'s share rises start -> end share.

  Args:
    base: relative weights of all domains (a sequence of names means equal
      weights). Only the proportions among the other domains matter.
    domain: the domain whose share rises.
    start_share, end_share: its share at `start_step` and from `end_step` on.
    kind: "linear" or "step" (`num_stages` equal increments).

  Linear interpolation of the two weight vectors keeps the other domains'
  proportions fixed at every step, because both endpoints have them.
  """
  if kind not in ("linear", "step"):
    raise ValueError(f"kind: must be 'linear' or 'step', got {kind!r}")
  if not isinstance(base, Mapping):
    base = {d: 1.0 for d in base}
  start = with_share(base, domain, start_share)
  end = with_share(base, domain, end_share)
  return MixtureSchedule(
      domains=tuple(base), start_weights=tuple(start.values()),
      end_weights=tuple(end.values()), kind=kind, start_step=start_step,
      end_step=end_step, num_stages=num_stages)
