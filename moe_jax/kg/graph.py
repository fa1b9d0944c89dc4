"""A typed knowledge graph: entities, relations, (head, relation, tail) triples.

    entities   id -> (name, type)            e.g. 7 -> ("JSONDecoder", "class")
    triples    (E, 3) int32 rows (head, relation, tail)
                  JSONDecoder --inherits_from--> object
                  dumps       --defined_in-----> json

A `KnowledgeGraph` is plain immutable data (tuples and one numpy array) with a
content `fingerprint()` and a `summary()` (entities per type, edges per
relation). The built-in graph comes from `moe_jax.kg.extract`; a user's own graph
is read with `load_triples` from TSV (`head<TAB>relation<TAB>tail`) or JSON lines
(`{"head": ..., "relation": ..., "tail": ...}`, optional `head_type` /
`tail_type`). A malformed line raises an error naming the file and line.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
from typing import Iterable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class KnowledgeGraph:
  """Entities (unique keys, display names, types) and typed triples."""
  keys: tuple[str, ...]          # unique id of each entity, e.g. "class:json.JSONDecoder"
  names: tuple[str, ...]         # the surface form linked in text, e.g. "JSONDecoder"
  types: tuple[str, ...]         # "module", "class", "function", "character", "play", ...
  relations: tuple[str, ...]     # relation names; triples index into this
  triples: np.ndarray            # (E, 3) int32 (head, relation, tail), sorted, unique

  def __post_init__(self):
    n = len(self.keys)
    if not (len(self.names) == len(self.types) == n):
      raise ValueError(f"keys/names/types lengths differ: {n}, {len(self.names)}, "
                       f"{len(self.types)}")
    t = np.asarray(self.triples, np.int32).reshape(-1, 3)
    if t.size and (t[:, [0, 2]].min() < 0 or t[:, [0, 2]].max() >= n
                   or t[:, 1].min() < 0 or t[:, 1].max() >= len(self.relations)):
      raise ValueError("triples index entities or relations out of range")
    object.__setattr__(self, "triples", t)

  @property
  def n_entities(self) -> int:
    return len(self.keys)

  @functools.cached_property
  def index(self) -> dict[str, int]:
    """Entity key -> id."""
    return {k: i for i, k in enumerate(self.keys)}

  def relation_id(self, name: str) -> int:
    if name not in self.relations:
      raise KeyError(f"unknown relation {name!r}; the graph has {self.relations}")
    return self.relations.index(name)

  def facts(self, relation: str) -> np.ndarray:
    """(n, 2) (head, tail) ids of one relation."""
    return self.triples[self.triples[:, 1] == self.relation_id(relation)][:, [0, 2]]

  @functools.cached_property
  def _fingerprint(self) -> str:
    sha = hashlib.sha256()
    for part in (self.keys, self.names, self.types, self.relations):
      sha.update("\0".join(part).encode() + b"\1")
    sha.update(self.triples.tobytes())
    return sha.hexdigest()[:16]

  def fingerprint(self) -> str:
    return self._fingerprint

  def summary(self) -> dict[str, dict[str, int]]:
    """{"entities": {type: count}, "edges": {relation: count}}."""
    edges = collections.Counter(self.relations[r] for r in self.triples[:, 1])
    return {"entities": dict(sorted(collections.Counter(self.types).items())),
            "edges": {r: edges.get(r, 0) for r in self.relations}}

  def summary_text(self) -> str:
    s = self.summary()
    ents = ", ".join(f"{v} {k}" for k, v in s["entities"].items())
    edges = ", ".join(f"{v} {k}" for k, v in s["edges"].items())
    return (f"{self.n_entities} entities ({ents}); {len(self.triples)} edges "
            f"({edges}); fingerprint {self.fingerprint()}")

  # ------------------------------------------------------------ (de)serialisation

  def to_json(self) -> dict:
    return {"keys": list(self.keys), "names": list(self.names), "types": list(self.types),
            "relations": list(self.relations), "triples": self.triples.tolist()}

  @classmethod
  def from_json(cls, record: dict) -> "KnowledgeGraph":
    return cls(keys=tuple(record["keys"]), names=tuple(record["names"]),
               types=tuple(record["types"]), relations=tuple(record["relations"]),
               triples=np.asarray(record["triples"], np.int32).reshape(-1, 3))

  def save(self, path: str | os.PathLike) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.to_json(), f)
    os.replace(tmp, path)     # atomic: a concurrent reader never sees half a file

  @classmethod
  def load(cls, path: str | os.PathLike) -> "KnowledgeGraph":
    with open(path, encoding="utf-8") as f:
      return cls.from_json(json.load(f))


def shuffle_tails(graph: KnowledgeGraph, seed: int) -> KnowledgeGraph:
  """The control graph: within each relation the tails are permuted at random, so
  entities, names, relation counts and out-degrees stay, but the facts are gone."""
  rng = np.random.default_rng(seed)
  triples = graph.triples.copy()
  for r in range(len(graph.relations)):
    rows = np.flatnonzero(triples[:, 1] == r)
    triples[rows, 2] = triples[rng.permutation(rows), 2]
  return dataclasses.replace(graph, triples=triples)


def from_triples(triples: Iterable[tuple[str, str, str]],
                 entity_types: dict[str, str] | None = None,
                 names: dict[str, str] | None = None,
                 relations: Sequence[str] = ()) -> KnowledgeGraph:
  """A graph from (head key, relation, tail key) strings. Entities are numbered in
  sorted key order and triples sorted and deduplicated, so equal input sets give
  equal graphs (and fingerprints) whatever their order."""
  triples = sorted(set(triples))
  entity_types = dict(entity_types or {})
  names = dict(names or {})
  keys = sorted({k for h, _, t in triples for k in (h, t)} | set(entity_types))
  rels = list(relations) + sorted({r for _, r, _ in triples} - set(relations))
  idx = {k: i for i, k in enumerate(keys)}
  ridx = {r: i for i, r in enumerate(rels)}
  arr = np.array([(idx[h], ridx[r], idx[t]) for h, r, t in triples], np.int32)
  return KnowledgeGraph(keys=tuple(keys),
                        names=tuple(names.get(k, k) for k in keys),
                        types=tuple(entity_types.get(k, "entity") for k in keys),
                        relations=tuple(rels), triples=arr.reshape(-1, 3))


def load_triples(path: str | os.PathLike) -> KnowledgeGraph:
  """A user's graph from a TSV (`head<TAB>relation<TAB>tail` per line; `#` starts a
  comment) or JSON-lines file (`.jsonl`: objects with string fields head, relation,
  tail and optional head_type, tail_type). Entity names are their keys.

  Raises FileNotFoundError, or ValueError naming `path:line` and what is wrong.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such triples file: {path!r}")
  jsonl = path.endswith((".jsonl", ".json"))
  triples, types = [], {}
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      text = line.strip()
      if not text or (not jsonl and text.startswith("#")):
        continue
      where = f"{path}:{line_no}"
      if jsonl:
        try:
          record = json.loads(text)
        except json.JSONDecodeError as e:
          raise ValueError(f"{where}: not valid JSON ({e.msg}): {text[:80]!r}") from None
        if not isinstance(record, dict):
          raise ValueError(f"{where}: expected a JSON object with head, relation, "
                           f"tail; got {type(record).__name__}")
        missing = [k for k in ("head", "relation", "tail")
                   if not isinstance(record.get(k), str) or not record[k].strip()]
        if missing:
          raise ValueError(f"{where}: fields {missing} must be non-empty strings "
                           f"(need head, relation, tail)")
        h, r, t = (record[k].strip() for k in ("head", "relation", "tail"))
        for key, field in ((h, "head_type"), (t, "tail_type")):
          if field in record:
            if not isinstance(record[field], str):
              raise ValueError(f"{where}: {field} must be a string")
            types[key] = record[field]
      else:
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != 3 or not all(p.strip() for p in parts):
          raise ValueError(f"{where}: expected 3 non-empty tab-separated fields "
                           f"head<TAB>relation<TAB>tail, got {len(parts)} field(s): "
                           f"{text[:80]!r}")
        h, r, t = (p.strip() for p in parts)
      triples.append((h, r, t))
  if not triples:
    raise ValueError(f"{path}: no triples found")
  return from_triples(triples, types)
