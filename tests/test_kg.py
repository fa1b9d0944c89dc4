"""Knowledge graph: extraction, user triples, mention linking, the GAT."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.kg import cloze, extract, gat, graph as graph_lib, linking

MODULE = '''
import os
from collections import OrderedDict

class BaseError(Exception):
  pass

class Store(OrderedDict):
  def get(self, key):
    if key is None:
      raise BaseError("no key")
    return self.load(key)

  def load(self, key):
    return helper(key)

def helper(path):
  if not os.fspath(path):
    raise ValueError(path)
  return Store()
'''


def _triples(g):
  return {(g.keys[h], g.relations[r], g.keys[t]) for h, r, t in g.triples.tolist()}


def test_extraction_on_hand_written_module():
  g = extract.build_graph([("pkg.store", MODULE), ("os", "def fspath(p):\n  pass\n"),
                           ("collections", "class OrderedDict(dict):\n  pass\n")],
                          plays=False)
  expected = {
      ("class:pkg.store.BaseError", "defined_in", "module:pkg.store"),
      ("class:pkg.store.Store", "defined_in", "module:pkg.store"),
      ("function:pkg.store.helper", "defined_in", "module:pkg.store"),
      ("class:pkg.store.BaseError", "inherits_from", "class:builtins.Exception"),
      ("class:pkg.store.Store", "inherits_from", "class:collections.OrderedDict"),
      ("class:collections.OrderedDict", "inherits_from", "class:builtins.dict"),
      ("class:pkg.store.Store", "has_method", "function:pkg.store.Store.get"),
      ("class:pkg.store.Store", "has_method", "function:pkg.store.Store.load"),
      ("module:pkg.store", "imports", "module:os"),
      ("module:pkg.store", "imports", "module:collections"),
      ("function:pkg.store.Store.get", "raises", "class:pkg.store.BaseError"),
      ("function:pkg.store.helper", "raises", "class:builtins.ValueError"),
      ("function:pkg.store.Store.get", "calls", "function:pkg.store.Store.load"),
      ("function:pkg.store.Store.load", "calls", "function:pkg.store.helper"),
      ("function:pkg.store.helper", "calls", "function:os.fspath"),
      ("function:pkg.store.helper", "calls", "class:pkg.store.Store"),
      ("function:os.fspath", "defined_in", "module:os"),
      ("class:collections.OrderedDict", "defined_in", "module:collections"),
  }
  assert _triples(g) == expected
  assert g.names[g.index["class:pkg.store.Store"]] == "Store"
  assert g.types[g.index["function:pkg.store.Store.get"]] == "function"
  s = g.summary()
  assert s["edges"]["calls"] == 4 and s["entities"]["module"] == 3
  # Deterministic: the same sources in another order give the same graph.
  g2 = extract.build_graph([("collections", "class OrderedDict(dict):\n  pass\n"),
                            ("os", "def fspath(p):\n  pass\n"), ("pkg.store", MODULE)],
                           plays=False)
  assert g2.fingerprint() == g.fingerprint()


def test_play_characters():
  text = ("MACBETH\n\nPersons Represented\n\nDUNCAN, King of Scotland.\n"
          "LADY MACBETH.\nA Porter.\nLords, Gentlemen.\n\nACT I.\nDUNCAN, again.\n")
  assert extract.play_characters(text) == ["Duncan", "Lady Macbeth"]


def test_user_triples_tsv_jsonl_and_malformed_line(tmp_path):
  tsv = tmp_path / "g.tsv"
  tsv.write_text("# comment\nParis\tcapital_of\tFrance\n\nFrance\tin\tEurope\n")
  g = graph_lib.load_triples(tsv)
  assert _triples(g) == {("Paris", "capital_of", "France"), ("France", "in", "Europe")}
  bad = tmp_path / "bad.tsv"
  bad.write_text("a\tr\tb\nc\tr\n")
  with pytest.raises(ValueError, match=r"bad.tsv:2: expected 3 non-empty"):
    graph_lib.load_triples(bad)
  jl = tmp_path / "g.jsonl"
  jl.write_text(json.dumps({"head": "a", "relation": "r", "tail": "b",
                            "head_type": "city"}) + "\n{not json}\n")
  with pytest.raises(ValueError, match=r"g.jsonl:2: not valid JSON"):
    graph_lib.load_triples(jl)
  jl.write_text(json.dumps({"head": "a", "relation": "r", "tail": "b",
                            "head_type": "city"}) + "\n"
                + json.dumps({"head": "a", "tail": "c"}) + "\n")
  with pytest.raises(ValueError, match=r"g.jsonl:2: fields \['relation'\]"):
    graph_lib.load_triples(jl)


def test_graph_save_load_and_shuffle(tmp_path):
  g = graph_lib.from_triples([("a", "r", "b"), ("c", "r", "d"), ("a", "s", "c")])
  g.save(tmp_path / "g.json")
  assert graph_lib.KnowledgeGraph.load(tmp_path / "g.json").fingerprint() == g.fingerprint()
  sh = graph_lib.shuffle_tails(g, 1)
  assert sorted(sh.triples[:, 1].tolist()) == sorted(g.triples[:, 1].tolist())
  for r in range(len(g.relations)):   # same heads and same multiset of tails per relation
    assert sorted(sh.triples[sh.triples[:, 1] == r][:, 2]) == \
        sorted(g.triples[g.triples[:, 1] == r][:, 2])


def test_mention_linking_on_hand_made_text():
  g = graph_lib.from_triples(
      [("class:JSONDecoder", "inherits_from", "class:object"),
       ("function:a.dumps", "defined_in", "module:json"),
       ("function:b.dumps", "defined_in", "module:pickle"),
       ("character:Lady Macbeth", "appears_in", "play:Macbeth")],
      names={"class:JSONDecoder": "JSONDecoder", "class:object": "object",
             "function:a.dumps": "dumps", "function:b.dumps": "dumps",
             "module:json": "json", "module:pickle": "pickle",
             "character:Lady Macbeth": "Lady Macbeth", "play:Macbeth": "Macbeth"})
  linker = linking.EntityLinker(g)
  text = "JSONDecoder(object); dumps in json; Lady Macbeth; xjson; json.x; é json"
  found = [(text[m.start:m.end], g.keys[m.entity]) for m in linker.link(text)]
  # "dumps" is ambiguous; "xjson" and "json.x" are not at identifier boundaries... but
  # "json" before ".x" is (a module attribute), and "Lady Macbeth" beats "Macbeth".
  assert found == [("JSONDecoder", "class:JSONDecoder"), ("object", "class:object"),
                   ("json", "module:json"), ("Lady Macbeth", "character:Lady Macbeth"),
                   ("json", "module:json"), ("json", "module:json")]
  # Token positions (byte tokenizer): the last byte of each mention, after "é" (2 bytes).
  pos = linking.mention_positions(text, linker.link(text))
  assert pos[0] == (10, g.index["class:JSONDecoder"])
  assert pos[-1] == (len(text.encode()) - 1, g.index["module:json"])
  sampler = linking.SubgraphSampler(g, max_nodes=4, max_edges=8, neighbors=2,
                                    feature_dim=16)
  ex = linking.kg_example("JSONDecoder is here", linker, sampler, 24, offset=1)
  assert np.flatnonzero(ex["mentions"] >= 0).tolist() == [11]  # BOS + 11 bytes - 1
  assert ex["node_mask"].sum() == 2 and ex["edge_mask"].sum() == 2   # t->h and h->t
  R = len(g.relations)
  rel = g.relation_id("inherits_from")
  edges = set(zip(ex["edge_src"][:2].tolist(), ex["edge_dst"][:2].tolist(),
                  ex["edge_rel"][:2].tolist()))
  assert edges == {(1, 0, rel), (0, 1, rel + R)}    # object -> JSONDecoder, inverse


def test_cloze_split_keeps_answers_spellable():
  pairs = [(f"class:C{i}", "inherits_from", f"class:B{i % 3}") for i in range(30)]
  g = graph_lib.from_triples(pairs, {k: "class" for p in pairs for k in (p[0], p[2])},
                             {k: k[6:] for p in pairs for k in (p[0], p[2])})
  facts = cloze.select_facts(g, set(g.names), per_relation=100, min_support=4)
  assert len(facts) == 30 and facts[0].prompt.startswith("class C")
  train, held = cloze.split_facts(facts, 0.5)
  assert held and train and len(train) + len(held) == 30
  assert {f.answer for f in held} <= {f.answer for f in train}


# ------------------------------------------------------------------------------- GAT


def _random_graph(seed=0, n=7, e=12):
  rng = np.random.default_rng(seed)
  src = rng.integers(0, n, e).astype(np.int32)
  dst = rng.integers(0, n, e).astype(np.int32)
  keep = src != dst
  src, dst = src[keep], dst[keep]
  pairs = sorted(set(zip(src.tolist(), dst.tolist())))      # no duplicate edges
  src = np.array([p[0] for p in pairs], np.int32)
  dst = np.array([p[1] for p in pairs], np.int32)
  rel = rng.integers(0, 3, len(src)).astype(np.int32)
  h = rng.normal(size=(n, 5)).astype(np.float32)
  return h, src, dst, rel, np.ones(len(src), bool)


def _layer(**kw):
  return gat.GATLayer(features=3, heads=2, **kw)


def test_attention_over_incoming_edges_sums_to_one():
  h, src, dst, rel, mask = _random_graph()
  mask[-2:] = False                                         # padded edges
  layer = _layer(n_relations=3)
  params = layer.init(jax.random.PRNGKey(0), h, src, dst, rel, mask)
  _, alpha = jax.jit(layer.apply)(params, h, src, dst, rel, mask)  # (E + N, H)
  all_dst = np.concatenate([dst, np.arange(len(h))])
  all_mask = np.concatenate([mask, np.ones(len(h), bool)])
  sums = jax.ops.segment_sum(alpha, all_dst, len(h))
  np.testing.assert_allclose(sums, 1.0, rtol=1e-5)
  assert np.all(np.asarray(alpha)[~all_mask] == 0)


def test_permuting_node_ids_permutes_output():
  h, src, dst, rel, mask = _random_graph(1)
  model = gat.GAT(out_features=4, heads=2, n_layers=2, n_relations=3)
  params = model.init(jax.random.PRNGKey(1), h, src, dst, rel, mask)
  out = jax.jit(model.apply)(params, h, src, dst, rel, mask)
  perm = np.random.default_rng(2).permutation(len(h))
  inv = np.argsort(perm)                                    # new id of old node i
  out_p = jax.jit(model.apply)(params, h[perm], inv[src].astype(np.int32),
                               inv[dst].astype(np.int32), rel, mask)
  np.testing.assert_allclose(np.asarray(out_p), np.asarray(out)[perm], rtol=1e-5,
                             atol=1e-6)


def test_isolated_node_keeps_its_own_transform():
  h, src, dst, rel, mask = _random_graph(2, n=6)
  h = np.concatenate([h, np.random.default_rng(3).normal(size=(1, 5)).astype(np.float32)])
  iso = len(h) - 1                                          # no edges touch it
  for aggregation in ("attention", "mean"):
    layer = _layer(concat=True, aggregation=aggregation)
    params = layer.init(jax.random.PRNGKey(0), h, src, dst, rel, mask)
    out, _ = layer.apply(params, h, src, dst, rel, mask)
    p = params["params"]
    expected = h[iso] @ p["w"]["kernel"] + p["bias"]        # heads concatenated
    np.testing.assert_allclose(out[iso], expected, rtol=1e-5, atol=1e-6)


def _dense_reference(params, h, src, dst, rel, n_relations, concat):
  """Textbook GAT on a dense (N, N) adjacency: masked softmax over each row."""
  p = params["params"]
  n = len(h)
  z = (h @ p["w"]["kernel"]).reshape(n, 2, 3)               # (N, H, F)
  adj = np.eye(n, dtype=bool)
  reltab = np.full((n, n), n_relations)                     # self-loop relation
  adj[dst, src] = True
  reltab[dst, src] = rel
  r = p["rel"][reltab]                                      # (N, N, H, F) [i, j]
  score = (np.einsum("ihf,hf->ih", z, p["a_dst"][0])[:, None]
           + np.einsum("jhf,hf->jh", z, p["a_src"][0])[None]
           + np.einsum("ijhf,hf->ijh", r, p["a_rel"][0]))   # (N, N, H)
  score = np.where(score > 0, score, 0.2 * score)
  score = np.where(adj[..., None], score, -np.inf)
  alpha = np.exp(score - score.max(1, keepdims=True))
  alpha = alpha / alpha.sum(1, keepdims=True)
  out = np.einsum("ijh,ijhf->ihf", alpha, z[None] + r)
  out = out.reshape(n, -1) if concat else out.mean(1)
  return out + p["bias"]


@pytest.mark.parametrize("concat", [True, False])
def test_segment_gat_equals_dense_reference(concat):
  h, src, dst, rel, mask = _random_graph(4)
  layer = _layer(concat=concat, n_relations=3)
  params = layer.init(jax.random.PRNGKey(5), h, src, dst, rel, mask)
  params = jax.tree.map(np.asarray, params)
  out, _ = layer.apply(params, h, src, dst, rel, mask)
  np.testing.assert_allclose(out, _dense_reference(params, h, src, dst, rel, 3, concat),
                             rtol=1e-4, atol=1e-5)


def test_batched_subgraphs_equal_one_at_a_time():
  g1, g2 = _random_graph(6), _random_graph(7)
  e = max(len(g1[1]), len(g2[1]))

  def pad(x, fill):
    return np.concatenate([x, np.full(e - len(x), fill, x.dtype)])

  batch = [np.stack([g1[0], g2[0]])] + [
      np.stack([pad(a[i], False if i == 4 else 0), pad(b[i], False if i == 4 else 0)])
      for i in (1, 2, 3, 4) for a, b in [(g1, g2)]]
  model = gat.GAT(out_features=4, heads=2, n_relations=3)
  params = model.init(jax.random.PRNGKey(0), *batch)
  apply = jax.jit(model.apply)
  out = apply(params, *batch)                               # (2, N, 4)
  for i, g in enumerate((g1, g2)):
    np.testing.assert_allclose(out[i], apply(params, *g), rtol=1e-5, atol=1e-6)
