"""Quantization settings: one frozen dataclass, validated on construction."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

from moe_jax.config import check_types, replace_fields, require

SCHEMES = ("mixed", "all_high", "all_low")
AXES = ("output", "input")
# "variance": the source's rule. "random": the control at equal bits, the same number
# of channels per matrix kept at high_bits but drawn at random, to test whether
# choosing them by variance matters.
GROUPINGS = ("variance", "random")
# Parameters quantized by default: every weight matrix of attention, the dense and
# shared-expert MLPs and the routed experts. Left in full precision: embeddings (a
# gather, and the tied unembedding sets the logits' scale), norm scales (tiny) and the
# router kernel (tiny, and top-k routing flips on small perturbations).
MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """The source's variance-grouped mixed-precision weight quantization.

  Per matrix, the channels (columns of W in y = x @ W for axis="output") with the
  highest variance, the top (1 - quantile) share, are quantized `high_bits`
  symmetric; the rest `low_bits` asymmetric (scale and zero point). Expert weights
  (E, D, F) are grouped per expert. grouping="random" keeps the same share at
  high_bits but draws the channels at random (per matrix, from `grouping_seed` and
  the parameter's path): the control for the variance rule at equal bits.
  """
  high_bits: int = 8             # symmetric, the high-variance channels
  low_bits: int = 4              # asymmetric, the other channels
  quantile: float = 0.7          # the source's 70th percentile of channel variance
  scheme: str = "mixed"          # "all_high" / "all_low": uniform baselines
  axis: str = "output"           # "output": per column of W (D_in, D_out); "input": per row
  grouping: str = "variance"     # which channels get high_bits: "variance" | "random"
  grouping_seed: int = 0         # grouping="random": the draw (with the matrix's path)
  group_size: int = 0            # > 0: one scale per `group_size` rows of a channel
  clip_ratio: float = 1.0        # scales from clip_ratio * range; < 1 clips outliers
  matrices: tuple[str, ...] = MATRICES

  def __post_init__(self):
    self.validate()

  def replace(self, **overrides: Any) -> "QuantConfig":
    return replace_fields(self, overrides)

  def validate(self) -> None:
    check_types(self)
    need = functools.partial(require, self)
    need(2 <= self.high_bits <= 8, "high_bits", "must be in 2..8")
    need(2 <= self.low_bits <= 8, "low_bits", "must be in 2..8")
    need(0.0 < self.quantile < 1.0, "quantile", "must be in (0, 1)")
    need(self.scheme in SCHEMES, "scheme", f"must be one of {SCHEMES}")
    need(self.axis in AXES, "axis", f"must be one of {AXES}")
    need(self.grouping in GROUPINGS, "grouping", f"must be one of {GROUPINGS}")
    need(0 <= self.grouping_seed < 2**31, "grouping_seed", "must be in [0, 2**31)")
    need(0 <= self.group_size <= 2**20, "group_size",
         "must be in [0, 2**20] (0: one scale per channel)")
    need(0.0 < self.clip_ratio <= 1.0, "clip_ratio", "must be in (0, 1]")
    need(len(set(self.matrices)) == len(self.matrices)
         and set(self.matrices) <= set(MATRICES), "matrices",
         f"must be a tuple of distinct names among {MATRICES}")

  @property
  def label(self) -> str:
    if self.scheme == "all_high":
      return f"int{self.high_bits} sym"
    if self.scheme == "all_low":
      return f"int{self.low_bits} asym"
    random = ", random channels" if self.grouping == "random" else ""
    return f"mixed {self.high_bits}/{self.low_bits} q={self.quantile:g}{random}"
