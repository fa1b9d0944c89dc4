"""Tests of moe_jax.data: exact small values, shapes, determinism, resumption."""

import json

import numpy as np
import pytest

from moe_jax import data
from moe_jax.data import corpus as corpus_lib
from moe_jax.data import math_problems

# Small and fast: every test that builds a corpus shares this one (cached).
SMALL_BYTES = 400_000


def small_cfg(**overrides) -> data.DataConfig:
  kwargs = dict(seq_len=32, batch_tokens=32 * 16, seed=3,
                max_bytes_per_domain=SMALL_BYTES)
  kwargs.update(overrides)
  return data.DataConfig(**kwargs)


def batches(it, n):
  return [next(it) for _ in range(n)]


# ---------------------------------------------------------------- quality


def test_entropy_exact_values():
  assert data.token_entropy([0, 0, 1, 1]) == pytest.approx(1.0)
  assert data.token_entropy(np.arange(16)) == pytest.approx(4.0)
  assert data.token_entropy([7, 7, 7]) == 0.0
  assert data.token_entropy([]) == 0.0
  # p = (1/2, 1/4, 1/4): 0.5*1 + 2 * 0.25*2 = 1.5 bits.
  assert data.token_entropy([0, 0, 1, 2]) == pytest.approx(1.5)


def test_filter_flags_repetitive_and_passes_prose():
  tok = data.ByteTokenizer()
  spam = "buy now " * 200
  prose = ("It was the best of times, it was the worst of times, it was the "
           "age of wisdom, it was the age of foolishness, it was the epoch of "
           "belief, it was the epoch of incredulity, it was the season of Light.")
  assert data.is_low_quality(tok.encode(spam))
  assert not data.is_low_quality(tok.encode(prose))
  kinds = {k: data.is_low_quality(tok.encode(t))
           for k, t in data.synthetic_anomalies(5)}
  assert kinds == {"char_run": True, "repeated_line": True, "separator": True,
                   "numbers": True, "random": False}


def test_derived_junk_keeps_the_entropy_of_clean_text():
  tok = data.ByteTokenizer()
  doc = ("def mean(xs):\n    return sum(xs) / len(xs)\n\n"
         "It was the best of times, it was the worst of times.\n")
  h = data.token_entropy(tok.encode(doc))
  junk = dict(data.derived_anomalies([doc], 4, seed=1))
  assert set(junk) == set(data.quality.DERIVED_KINDS)
  # The same bytes in another order, or a permutation of the letters: equal entropy.
  for kind in ("shuffled_words", "rot13", "duplicate"):
    assert data.token_entropy(tok.encode(junk[kind])) == pytest.approx(h, abs=1e-9), kind
  assert sorted(junk["shuffled_words"]) == sorted(doc) and junk["shuffled_words"] != doc
  assert junk["shuffled_words"].split("\n")[0].count(" ") == doc.split("\n")[0].count(" ")
  assert junk["rot13"].startswith("qrs zrna(kf):")
  assert junk["duplicated_lines"].startswith("def mean(xs):\n" * 3)
  assert not any(data.is_low_quality(tok.encode(t)) for t in junk.values())
  with pytest.raises(ValueError, match="unknown \\['rot14'\\]"):
    data.derived_anomalies([doc], 1, kinds=("rot14",))


def test_mix_junk_sets_the_usable_fraction_and_labels_every_document():
  clean = {"a": tuple(f"clean document {i} " * 40 for i in range(78)), "b": ("x y z",) * 39}
  docs, kinds = data.mix_junk(clean, usable=0.78, seed=0)
  assert [len(docs["a"]), len(docs["b"])] == [100, 50]     # 22 and 11 junk documents
  assert kinds["a"].count("clean") == 78 and kinds["b"].count("clean") == 39
  junk_kinds = [k for k in kinds["a"] if k != "clean"]
  every = data.quality.ANOMALY_KINDS + data.quality.DERIVED_KINDS
  assert sorted(set(junk_kinds)) == sorted(every)            # 22 documents, 9 kinds
  assert max(map(junk_kinds.count, every)) - min(map(junk_kinds.count, every)) <= 1
  runs = [d for d, k in zip(docs["a"], kinds["a"]) if k == "char_run"]
  assert {len(d) for d in runs} == {round(np.mean([len(d) for d in clean["a"]]))}  # 715
  assert sorted(d for d, k in zip(docs["a"], kinds["a"]) if k == "clean") == \
      sorted(clean["a"])
  assert data.mix_junk(clean, usable=0.78, seed=0) == (docs, kinds)
  assert data.mix_junk(clean, usable=0.78, seed=1)[0] != docs
  with pytest.raises(ValueError, match="usable=0"):
    data.mix_junk(clean, usable=0.0)


def test_filter_report_on_default_domains():
  cfg = small_cfg()
  report = data.filter_report(data.corpus_from_config(cfg), data.ByteTokenizer())
  assert set(report) == set(cfg.domains)
  for domain_report in report.values():
    assert 0.0 <= domain_report["flagged_fraction"] <= 0.05
    assert domain_report["entropy_median"] > 3.5


# ---------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trip():
  tok = data.get_tokenizer("byte")
  text = "naïve café — 数学 ✓ def f(x): return x**2\n"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 256
  assert tok.decode(ids) == text
  assert tok.vocab_size == 259
  with_specials = np.concatenate([[tok.bos_id], ids, [tok.eos_id, tok.pad_id]])
  assert tok.decode(with_specials) == text


def test_tokenizer_errors():
  with pytest.raises(FileNotFoundError, match="nope.model"):
    data.get_tokenizer("nope.model")
  with pytest.raises(ValueError, match="tokenizer"):
    data.get_tokenizer("gpt2")


# ---------------------------------------------------------------- corpus


def test_corpus_split_disjoint_stable_and_fingerprinted():
  cfg = small_cfg()
  c1 = data.corpus_from_config(cfg)
  # A fresh (uncached) build gives the same documents and fingerprint.
  c2 = corpus_lib._build_corpus_cached.__wrapped__(
      cfg.domains, cfg.max_bytes_per_domain, (), 0, cfg.heldout_fraction)
  assert c1 is not c2 and c1.fingerprint() == c2.fingerprint()
  assert len(c1.fingerprint()) == 16
  for domain in cfg.domains:
    train, heldout = set(c1.train[domain]), set(c1.heldout[domain])
    assert heldout and not train & heldout
    assert c1.heldout[domain] == c2.heldout[domain]
    frac = len(heldout) / (len(train) + len(heldout))
    assert 0.0 < frac < 0.15, (domain, frac)
  # The split is by content: a larger cap keeps every held-out doc held out
  # (except the fallback doc of a domain too small to have one by hash).
  bigger = data.build_corpus(cfg.domains, 2 * SMALL_BYTES)
  for domain in cfg.domains:
    by_hash = {d for d in c1.heldout[domain] if data.is_heldout(d)}
    assert by_hash <= set(bigger.heldout[domain])
    assert not by_hash & set(bigger.train[domain])
  assert bigger.fingerprint() != c1.fingerprint()


def test_corpus_domains_are_real_text():
  c = data.corpus_from_config(small_cfg())
  assert any("def " in d for d in c.train["code"])
  assert any("Hamlet" in d for d in c.train["prose"] + c.heldout["prose"])
  sizes = c.sizes()
  for domain in c.domains:
    total = sizes[domain]["train_bytes"] + sizes[domain]["heldout_bytes"]
    assert 0.5 * SMALL_BYTES < total <= SMALL_BYTES


def test_math_problems_and_scoring():
  docs = math_problems.generate_math_documents(5000, seed=1)
  assert docs == math_problems.generate_math_documents(5000, seed=1)
  pairs = data.problems_in(docs)
  assert len(pairs) == len(docs) * math_problems.PROBLEMS_PER_DOC
  for prompt, answer in pairs:
    assert prompt.startswith("Q: ") and prompt.endswith("A:")
    if prompt.startswith("Q: Solve"):
      # Check the equation: a x + b = c with x the answer.
      x = int(answer.removeprefix("x="))
      lhs, c = prompt[len("Q: Solve "):-len(". A:")].split("=")
      a, b = lhs.replace("-", "+-").split("x+")
      assert int(a) * x + int(b) == int(c)
    else:
      assert eval(prompt[3:prompt.index("=")]) == int(answer)  # pylint: disable=eval-used
  assert data.split_problem("Q: 37+48=? A: 85") == ("Q: 37+48=? A:", "85")
  assert data.score_answer(" 85\nQ: 1+1=? A: 2", "85")
  assert data.score_answer(" x=5.", "x=5")
  assert not data.score_answer(" 5", "x=5")
  assert not data.score_answer(" 850", "85")
  assert not data.score_answer("", "85")
  assert data.math_accuracy([" 85", " 7"], ["85", "8"]) == 0.5


def test_user_data_readers(tmp_path):
  (tmp_path / "a.txt").write_text("alpha doc", encoding="utf-8")
  (tmp_path / "b.txt").write_text("beta doc", encoding="utf-8")
  assert data.load_text_files(str(tmp_path / "*.txt")) == ["alpha doc", "beta doc"]
  jsonl = tmp_path / "d.jsonl"
  jsonl.write_text("\n".join(json.dumps({"text": t, "id": i})
                             for i, t in enumerate(["one", "two"])) + "\n")
  assert data.load_jsonl(str(jsonl)) == ["one", "two"]
  with pytest.raises(ValueError, match="body"):
    data.load_jsonl(str(jsonl), field="body")

  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "docs.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for text in ["première", "second"]:
    writer.write(text.encode("utf-8"))
  writer.close()
  assert data.load_documents(path) == ["première", "second"]


@pytest.mark.parametrize("loader", [data.load_text_files, data.load_jsonl,
                                    data.load_array_record])
def test_missing_file_error_names_path(loader, tmp_path):
  missing = str(tmp_path / "missing_corpus_file.jsonl")
  with pytest.raises(FileNotFoundError, match="missing_corpus_file"):
    loader(missing)


# ---------------------------------------------------------------- mixture


def test_curriculum_weights_start_middle_end():
  sched = data.domain_curriculum(("code", "prose", "math"), "math",
                                 start_step=100, end_step=200)
  np.testing.assert_allclose(sched.weights(0), [0.475, 0.475, 0.05])
  np.testing.assert_allclose(sched.weights(100), [0.475, 0.475, 0.05])
  np.testing.assert_allclose(sched.weights(150), [0.4125, 0.4125, 0.175])
  np.testing.assert_allclose(sched.weights(200), [0.35, 0.35, 0.30])
  np.testing.assert_allclose(sched.weights(10**6), [0.35, 0.35, 0.30])
  # Unequal base proportions are kept among the other domains.
  sched = data.domain_curriculum({"code": 3, "prose": 1, "math": 0}, "math")
  w = sched.weights(500)
  assert w[0] / w[1] == pytest.approx(3.0) and w.sum() == pytest.approx(1.0)


def test_step_curriculum_is_piecewise_constant():
  sched = data.domain_curriculum(("code", "math"), "math", start_step=0,
                                 end_step=100, kind="step", num_stages=5)
  shares = [sched.as_dict(s)["math"] for s in (0, 19, 20, 50, 99, 100)]
  np.testing.assert_allclose(shares, [0.05, 0.05, 0.10, 0.15, 0.25, 0.30])


@pytest.mark.parametrize("kwargs, field", [
    (dict(start_weights=(0.5, 0.6)), "start_weights"),
    (dict(start_weights=(1.5, -0.5)), "start_weights"),
    (dict(start_weights=(1.0,)), "start_weights"),
    (dict(start_weights=(0.5, 0.5), kind="linear"), "end_weights"),
    (dict(start_weights=(0.5, 0.5), end_weights=(0.5, 0.5), kind="linear",
          start_step=10, end_step=10), "start_step"),
    (dict(start_weights=(0.5, 0.5), kind="cosine"), "kind"),
])
def test_schedule_validation_names_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    data.MixtureSchedule(domains=("a", "b"), **kwargs)


@pytest.mark.parametrize("overrides, field", [
    (dict(seq_len=0), "seq_len"),
    (dict(batch_tokens=8), "batch_tokens"),
    (dict(mixture="zipf"), "mixture"),
    (dict(mixture={"code": 1.0}), "mixture"),
    (dict(mixture={"code": 0.5, "prose": 0.5, "math": 0.5}), "mixture"),
    (dict(mixture="curriculum", curriculum_domain="poetry"), "curriculum_domain"),
    (dict(entropy_threshold=-1.0), "entropy_threshold"),
    (dict(heldout_fraction=0.0), "heldout_fraction"),
    (dict(domains=("code", "code")), "domains"),
    (dict(user_data={"legal": ["x.txt"]}), "user_data"),
])
def test_config_validation_names_field(overrides, field):
  with pytest.raises(ValueError, match=f"DataConfig.{field}"):
    small_cfg(**overrides).validate()


# ---------------------------------------------------------------- pipeline


def test_packing_shapes_and_shift():
  tok = data.ByteTokenizer()
  rows = data.pack_documents(["abc", "de"], tok, seq_len=3)
  # Stream: BOS a b c EOS BOS d e EOS (9 tokens) -> two rows of 4, 1 dropped.
  np.testing.assert_array_equal(
      rows, [[257, 97, 98, 99], [258, 257, 100, 101]])
  assert rows.dtype == np.int32

  cfg = small_cfg()
  batch = next(data.make_train_iterator(cfg, process_index=0, process_count=1))
  assert batch["inputs"].shape == batch["targets"].shape == (16, 32)
  assert batch["domain"].shape == (16,)
  assert {v.dtype for v in batch.values()} == {np.dtype(np.int32)}
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert batch["domain"].min() >= 0 and batch["domain"].max() < 3


def test_domain_of_row_matches_its_tokens():
  cfg = small_cfg(mixture={"code": 0.5, "prose": 0.0, "math": 0.5})
  batch = next(data.make_train_iterator(cfg, process_index=0, process_count=1))
  tok = data.ByteTokenizer()
  assert 1 not in batch["domain"]  # prose has weight 0.
  for row, domain in zip(batch["inputs"], batch["domain"]):
    text = tok.decode(row)
    if cfg.domains[domain] == "math":
      assert set(text) <= set("0123456789QASolvex+-*=?.: \n")


def test_empirical_domain_fractions_follow_schedule():
  weights = {"code": 0.6, "prose": 0.3, "math": 0.1}
  cfg = small_cfg(mixture=weights)
  it = data.make_train_iterator(cfg, process_index=0, process_count=1)
  domains = np.concatenate([b["domain"] for b in batches(it, 250)])  # 4000 rows
  fractions = np.bincount(domains, minlength=3) / len(domains)
  # 4000 Bernoulli draws: standard error <= 0.008; allow ~4 sigma.
  np.testing.assert_allclose(fractions, list(weights.values()), atol=0.03)

  # Curriculum: math share 5% at the start, 30% at the end of the stage.
  cfg = small_cfg(mixture="curriculum", curriculum_start_step=0,
                  curriculum_end_step=200)
  it = data.make_train_iterator(cfg, process_index=0, process_count=1)
  math_rows = [np.mean(b["domain"] == 2) for b in batches(it, 400)]
  assert np.mean(math_rows[:100]) == pytest.approx(0.05 + 0.0625, abs=0.03)
  assert np.mean(math_rows[200:]) == pytest.approx(0.30, abs=0.03)


def test_state_restore_gives_identical_batches():
  cfg = small_cfg(mixture="curriculum", curriculum_end_step=10)
  it = data.make_train_iterator(cfg, process_index=0, process_count=1)
  batches(it, 7)
  state = json.loads(json.dumps(it.get_state()))  # Must survive serialization.
  expected = batches(it, 5)
  restored = data.make_train_iterator(cfg, process_index=0, process_count=1)
  restored.set_state(state)
  for want, got in zip(expected, batches(restored, 5)):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  # And a fresh iterator with the same seed replays from the start.
  again = data.make_train_iterator(cfg, process_index=0, process_count=1)
  first = data.make_train_iterator(cfg, process_index=0, process_count=1)
  np.testing.assert_array_equal(next(again)["inputs"], next(first)["inputs"])
  other_seed = data.make_train_iterator(small_cfg(seed=4), process_index=0,
                                        process_count=1)
  assert not np.array_equal(next(other_seed)["inputs"], next(first)["inputs"])


def test_processes_split_the_same_global_batches():
  cfg = small_cfg()
  per_process = []
  for p in range(2):
    it = data.make_train_iterator(cfg, process_index=p, process_count=2)
    got = batches(it, 4)
    assert got[0]["inputs"].shape == (8, 32)  # Global 16 rows / 2 processes.
    per_process.append(got)
  # The two processes' halves are exactly the single-process global batches, so a
  # multi-host run sees the same data as a one-host run.
  single = batches(data.make_train_iterator(cfg, process_index=0, process_count=1), 4)
  for step in range(4):
    for key in ("inputs", "targets", "domain"):
      np.testing.assert_array_equal(
          np.concatenate([per_process[0][step][key], per_process[1][step][key]]),
          single[step][key])


def test_quality_filter_switch_and_eval_batches():
  cfg = small_cfg(quality_filter=True, entropy_threshold=4.3)
  corpus = data.corpus_from_config(cfg)
  tok = data.ByteTokenizer()
  kept = data.packed_rows(corpus, "math", "train", tok, 32, True, 4.3)
  everything = data.packed_rows(corpus, "math", "train", tok, 32)
  assert 0 < len(kept) < len(everything)
  next(data.make_train_iterator(cfg, process_index=0, process_count=1))

  evals = data.make_eval_batches(cfg, "prose", max_batches=3, process_index=0,
                                 process_count=1)
  assert len(evals) == 3 and evals[0]["inputs"].shape == (16, 32)
  assert (evals[0]["domain"] == 1).all()
  again = data.make_eval_batches(cfg, "prose", max_batches=3, process_index=0,
                                 process_count=1)
  np.testing.assert_array_equal(evals[2]["targets"], again[2]["targets"])
  # Held-out rows decode to held-out documents, never to training ones.
  heldout_text = "".join(corpus.heldout["prose"])
  assert tok.decode(evals[0]["inputs"][0][1:20]) in heldout_text
