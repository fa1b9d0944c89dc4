"""Entropy-based anomaly filter: what it flags on real text and on injected junk.

    python -m experiments.run --exp=data_quality            # ~20 s, no training
    python -m experiments.run --exp=data_quality --quick

The source flags a document whose token entropy H = -sum p log p (bits, byte
tokens here) is below 3.5 and claims usable data rises from 78% to 92%. Part 1: the
flagged fraction of each domain of the embedded corpus, with examples. Part 2: the
clean code and prose documents with synthetic junk mixed in so that 78% of the
documents are usable (the source's starting point): the usable fraction of what the
filter keeps, junk recall and clean documents lost, over a threshold sweep. The
junk kinds (character runs, repeated boiler-plate lines, separators, digit runs,
random printable text) are in `moe_jax/data/quality.py`; random text has high
entropy and is what this filter cannot catch.
"""
from __future__ import annotations

import numpy as np

from moe_jax import data as data_lib

THRESHOLDS = (3.0, 3.5, 4.0, 4.5)
USABLE = 0.78


def run(ctx):
  cfg = data_lib.DataConfig(max_bytes_per_domain=1_000_000 if ctx.quick else None)
  corpus = data_lib.corpus_from_config(cfg)
  tok = data_lib.get_tokenizer(cfg.tokenizer)
  report = data_lib.filter_report(corpus, tok, threshold=3.5)
  rows = [{"part": "corpus", "domain": d, **{k: v for k, v in r.items()}}
          for d, r in report.items()]

  clean = [doc for d in ("code", "prose") for doc in corpus.split("train")[d]]
  n_junk = round(len(clean) * (1 - USABLE) / USABLE)
  junk = data_lib.synthetic_anomalies(n_junk, seed=0)
  clean_h = np.array([data_lib.token_entropy(tok.encode(d)) for d in clean])
  junk_h = np.array([data_lib.token_entropy(tok.encode(t)) for _, t in junk])
  sweep = []
  for threshold in THRESHOLDS:
    kept_clean = int((clean_h >= threshold).sum())
    kept_junk = int((junk_h >= threshold).sum())
    sweep.append({"threshold_bits": threshold,
                  "usable_before_%": 100 * len(clean) / (len(clean) + len(junk)),
                  "usable_after_%": 100 * kept_clean / max(kept_clean + kept_junk, 1),
                  "junk_recall_%": 100 * (1 - kept_junk / len(junk)),
                  "clean_lost_%": 100 * (1 - kept_clean / len(clean))})
  rows += [{"part": "injected", **s} for s in sweep]

  table = [{"domain": d, "docs": r["num_docs"], "flagged_%": 100 * r["flagged_fraction"],
            "entropy_p5": r["entropy_p5"], "entropy_median": r["entropy_median"]}
           for d, r in report.items()]
  at = next(s for s in sweep if s["threshold_bits"] == 3.5)
  examples = [f"- `{kind}` ({h:.2f} bits): `{text[:60]!r}`"
              for (kind, text), h in list(zip(junk, junk_h))[:5]]
  text = ("Entropy in bits per byte token. Corpus fingerprint "
          f"`{corpus.fingerprint()}`.\n\n"
          "Filter sweep on clean code+prose with injected junk "
          f"({len(clean)} clean, {len(junk)} junk documents):\n\n"
          + _table(sweep) + "\n\n"
          f"**Source claim: usable data 78% -> 92%. Measured at 3.5 bits: "
          f"{at['usable_before_%']:.0f}% -> {at['usable_after_%']:.1f}% "
          f"(junk recall {at['junk_recall_%']:.0f}%, clean documents lost "
          f"{at['clean_lost_%']:.1f}%).** On the clean embedded corpus the filter "
          "flags nothing at 3.5 bits: the source's gain depends entirely on how much "
          "low-entropy junk the raw data holds.\n\nInjected junk, one of each kind:\n"
          + "\n".join(examples))
  return rows, {"table": table, "text": text}


def _table(rows):
  from experiments.common import markdown_table
  return markdown_table(rows)
