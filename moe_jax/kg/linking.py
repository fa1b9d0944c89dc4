"""Entity mentions in text, and the padded per-sequence subgraphs the GAT reads.

    "class JSONDecoder inherits from object."
           ^^^^^^^^^^^ mention of node 812: marked on its LAST byte (t=16)
    mentions (T,)   -1 ... -1  0  -1 ... -1       (local node id in the subgraph)
    subgraph        seeds (mentioned entities) first, then up to K neighbours of
                    each, padded to N nodes / E edges with masks (static shapes)

Linking is exact, case-sensitive matching of entity names at identifier
boundaries, longest name first; a name shared by several entities (e.g. `main`,
`__init__`) is ambiguous and never linked, and so are names shorter than
`min_len`. Token positions assume the byte tokenizer (one token per UTF-8 byte).

Each triple (h, r, t) gives two directed edges: t -> h with relation r (a node
hears about what it points to, e.g. a class about its base) and h -> t with the
inverse relation r + R, so `n_relations = 2R` edge types.
"""
from __future__ import annotations

import collections
import dataclasses
import re
import zlib
from typing import Sequence

import numpy as np

from moe_jax.kg.graph import KnowledgeGraph

_IDENT = r"A-Za-z0-9_"


@dataclasses.dataclass(frozen=True)
class Mention:
  start: int      # character offsets in the text, end exclusive
  end: int
  entity: int     # global entity id


class EntityLinker:
  """Exact-name linking of a graph's unambiguous entity names."""

  def __init__(self, graph: KnowledgeGraph, types: Sequence[str] | None = None,
               min_len: int = 3, only: Sequence[int] | None = None):
    """Link the entities of `types` (default all), or only the ids in `only`."""
    allowed = None if only is None else set(only)
    by_name = collections.defaultdict(list)
    for i, (name, kind) in enumerate(zip(graph.names, graph.types)):
      if (types is None or kind in types) and len(name) >= min_len and (
          allowed is None or i in allowed):
        by_name[name].append(i)
    self.ids = {n: ids[0] for n, ids in by_name.items() if len(ids) == 1}
    names = sorted(self.ids, key=lambda n: (-len(n), n))       # longest first
    self._pattern = re.compile(
        rf"(?<![{_IDENT}.])(?:{'|'.join(map(re.escape, names))})(?![{_IDENT}])"
        if names else r"(?!x)x")

  def __contains__(self, name: str) -> bool:
    return name in self.ids

  def link(self, text: str) -> list[Mention]:
    return [Mention(m.start(), m.end(), self.ids[m.group()])
            for m in self._pattern.finditer(text)]


def name_features(names: Sequence[str], types: Sequence[str], dim: int) -> np.ndarray:
  """(N, dim) float32 hashed bag of character trigrams of each name (case-folded,
  with boundary marks), its whole name and its type, L2-normalised: a node's input
  to the GAT needs no learned per-entity table, so unseen entities still get
  meaningful features."""
  out = np.zeros((len(names), dim), np.float32)
  for i, (name, kind) in enumerate(zip(names, types)):
    s = f"^{name.lower()}$"
    grams = [s[j:j + 3] for j in range(max(len(s) - 2, 1))]
    for g in grams + [f"name={name}", f"type={kind}"]:
      out[i, zlib.crc32(g.encode()) % dim] += 1.0
  return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


class SubgraphSampler:
  """Padded subgraphs around seed entities, deterministic in the seeds."""

  def __init__(self, graph: KnowledgeGraph, *, max_nodes: int, max_edges: int,
               neighbors: int, feature_dim: int):
    self.graph = graph
    self.max_nodes, self.max_edges, self.neighbors = max_nodes, max_edges, neighbors
    self.feature_dim = feature_dim
    self.n_relations = 2 * len(graph.relations)
    out_edges = collections.defaultdict(lambda: collections.defaultdict(list))
    in_edges = collections.defaultdict(lambda: collections.defaultdict(list))
    for h, r, t in graph.triples.tolist():
      out_edges[h][r].append((t, r))
      in_edges[t][r].append((h, r))
    # Neighbour order: out-edges before in-edges, relations interleaved round-robin
    # so a class's one base is not crowded out by its many methods.
    self._order = {}
    for node in set(out_edges) | set(in_edges):
      order = []
      for is_out, groups in ((True, out_edges.get(node, {})),
                             (False, in_edges.get(node, {}))):
        lists = [groups[r] for r in sorted(groups)]
        for k in range(max((len(x) for x in lists), default=0)):
          order += [(x[k], is_out) for x in lists if k < len(x)]
      self._order[node] = order
    self._features = {}

  def _feature(self, node: int) -> np.ndarray:
    if node not in self._features:
      self._features[node] = name_features([self.graph.names[node]],
                                           [self.graph.types[node]], self.feature_dim)[0]
    return self._features[node]

  def build(self, seeds: Sequence[int]) -> tuple[dict[str, np.ndarray], dict[int, int]]:
    """(arrays, global id -> local id). Seeds past max_nodes are dropped (absent
    from the map); edges past max_edges too."""
    local: dict[int, int] = {}
    for s in dict.fromkeys(seeds):
      if len(local) < self.max_nodes:
        local[s] = len(local)
    edges = []
    R = len(self.graph.relations)
    for s in list(local):
      for (other, r), is_out in self._order.get(s, [])[:self.neighbors]:
        if other not in local:
          if len(local) >= self.max_nodes:
            continue
          local[other] = len(local)
        h, t = (s, other) if is_out else (other, s)
        edges += [(local[t], local[h], r), (local[h], local[t], r + R)]
    edges = list(dict.fromkeys(edges))[:self.max_edges]
    n, e = self.max_nodes, self.max_edges
    arrays = {"node_features": np.zeros((n, self.feature_dim), np.float32),
              "node_mask": np.zeros((n,), bool),
              "edge_src": np.zeros((e,), np.int32), "edge_dst": np.zeros((e,), np.int32),
              "edge_rel": np.zeros((e,), np.int32), "edge_mask": np.zeros((e,), bool)}
    for g, i in local.items():
      arrays["node_features"][i] = self._feature(g)
      arrays["node_mask"][i] = True
    for k, (src, dst, r) in enumerate(edges):
      arrays["edge_src"][k], arrays["edge_dst"][k], arrays["edge_rel"][k] = src, dst, r
      arrays["edge_mask"][k] = True
    return arrays, local


def byte_offsets(text: str) -> np.ndarray:
  """(len(text) + 1,) byte offset of each character (UTF-8), for char -> token."""
  return np.concatenate([[0], np.cumsum([len(ch.encode("utf-8")) for ch in text])])


def mention_positions(text: str, mentions: Sequence[Mention]) -> list[tuple[int, int]]:
  """(byte position of the mention's last byte, entity) for the byte tokenizer."""
  offsets = byte_offsets(text) if not text.isascii() else None
  return [((m.end if offsets is None else int(offsets[m.end])) - 1, m.entity)
          for m in mentions]


def kg_example(text: str, linker: EntityLinker, sampler: SubgraphSampler,
               seq_len: int, link_chars: int | None = None,
               offset: int = 0) -> dict[str, np.ndarray]:
  """The kg inputs of one byte-tokenised sequence: the subgraph of the entities
  mentioned in text[:link_chars] and a (seq_len,) mention array, with token t =
  byte t + offset of the text (offset 1 when a BOS token comes first)."""
  found = linker.link(text if link_chars is None else text[:link_chars])
  positions = mention_positions(text, found)
  arrays, local = sampler.build([e for _, e in positions])
  mentions = np.full((seq_len,), -1, np.int32)
  for pos, entity in positions:
    if entity in local and 0 <= pos + offset < seq_len:
      mentions[pos + offset] = local[entity]
  arrays["mentions"] = mentions
  return arrays


def stack(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
