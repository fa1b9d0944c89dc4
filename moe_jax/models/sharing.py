"""Cross-layer parameter sharing: which parameter set each layer uses.

A `SharingPlan` is two tuples with one entry per layer: the id of the attention
parameter set and the id of the feed-forward parameter set the layer applies.
Layers with the same id call the same Flax module instance, so they hold one array
and its gradient is the sum over the layers that use it.

Strategies (L layers):
  none      every layer owns its parameters                  0 1 2 3 4 5
  all       ALBERT: one set for every layer                  0 0 0 0 0 0
  cycle     ABCABC (Takase & Kiyono, 2021)                   0 1 2 0 1 2
  sequence  AABBCC                                           0 0 1 1 2 2
  source    the DeepSeek overview's 24-layer scheme, scaled to L layers:
            the first quarter (layers 1-6 of 24) share one set; the middle half
            (7-18) shares *by function*: attention in groups of `share_attn_group`
            layers and the feed-forward in groups of `share_ffn_group`; the last
            quarter (19-24) is independent. The source says "share within functional
            groups" without sizes; the group sizes are config fields so the reading
            can be ablated.

Dense and MoE feed-forward layers have different shapes and never share with each
other: the feed-forward id is looked up within the layer's kind.
"""
from __future__ import annotations

import dataclasses
import math

from moe_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class SharingPlan:
  attn: tuple[int, ...]   # attention parameter-set id of each layer
  ffn: tuple[int, ...]    # feed-forward parameter-set id of each layer

  @property
  def n_layers(self) -> int:
    return len(self.attn)

  def uses(self, kind: str, set_id: int) -> int:
    """How many layers apply parameter set `set_id` of `kind` ("attn" or "ffn")."""
    return getattr(self, kind).count(set_id)

  def describe(self) -> str:
    return "attn " + "".join(_letter(i) for i in self.attn) + \
           " | ffn " + "".join(_letter(i) for i in self.ffn)


def _letter(i: int) -> str:
  return chr(ord("A") + i) if i < 26 else f"[{i}]"


def _renumber(ids: list[int]) -> tuple[int, ...]:
  """Relabel ids by first appearance so that plans compare equal and print A, B, C."""
  seen: dict[int, int] = {}
  return tuple(seen.setdefault(i, len(seen)) for i in ids)


def _grouped(n_layers: int, head: int, tail: int, group: int) -> list[int]:
  """Ids for the source scheme: one id for the head zone, groups of `group` in the
  middle zone, one id per layer in the tail zone."""
  ids = []
  for layer in range(n_layers):
    if layer < head:
      ids.append(0)
    elif layer < n_layers - tail:
      ids.append(1 + (layer - head) // group)
    else:
      ids.append(10_000 + layer)
  return ids


def make_plan(config: ModelConfig) -> SharingPlan:
  n = config.n_layers
  if config.sharing == "none":
    attn = ffn = list(range(n))
  elif config.sharing == "all":
    attn = ffn = [0] * n
  elif config.sharing == "cycle":
    attn = ffn = [i % config.share_sets for i in range(n)]
  elif config.sharing == "sequence":
    per_set = math.ceil(n / config.share_sets)
    attn = ffn = [i // per_set for i in range(n)]
  elif config.sharing == "source":
    # 24 layers -> head 6, middle 12, tail 6. Rounded for other depths.
    head = n // 4
    tail = n // 4
    attn = _grouped(n, head, tail, config.share_attn_group)
    ffn = _grouped(n, head, tail, config.share_ffn_group)
  else:  # validated in ModelConfig
    raise ValueError(f"unknown sharing strategy {config.sharing!r}")
  # Dense layers (the first n_dense_layers) cannot share a feed-forward with MoE
  # layers: give the two kinds separate id spaces.
  nd = config.n_dense_layers
  ffn = list(_renumber(ffn[:nd])) + list(_renumber(ffn[nd:]))
  return SharingPlan(attn=_renumber(attn), ffn=tuple(ffn))
