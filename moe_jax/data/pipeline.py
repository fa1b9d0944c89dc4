"""The grain input pipeline for LM training and per-domain evaluation.

    corpus docs --tokenize, BOS/EOS, concat, cut--> (N_d, T+1) rows per domain
    rows --MapDataset.source[p::P].shuffle(seed).repeat().map(example)--> domain d
    domains --ScheduledMix (domain per row ~ schedule.weights(step))--> rows
    rows --.batch(B)--> {"inputs": (B, T), "targets": (B, T), "domain": (B,)}

grain does the sharding-by-slice, the per-epoch reshuffling (shuffle before
repeat reseeds each epoch) and the batching. What it does not do is mixing with
weights that change over training steps (`IterDataset.mix` takes fixed
proportions), so `ScheduledMixIterDataset` below does only that: row i of the
stream belongs to step i // B, and its domain is drawn with that step's weights
from a hash of (seed, global row index). The iterator state is two counters,
so `get_state`/`set_state` resume exactly and any orbax/grain checkpointer can
store it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from moe_jax import config as config_lib
from moe_jax.data import corpus as corpus_lib
from moe_jax.data import mixture as mixture_lib
from moe_jax.data import quality
from moe_jax.data import tokenizer as tokenizer_lib

MIXTURES = ("uniform", "curriculum")
DECODE_ERRORS = corpus_lib.DECODE_ERRORS


def _as_pairs(value, group: bool):
  """A {key: value} mapping as a tuple of (key, value) pairs, which a frozen,
  hashable config can hold (and `dataclasses.asdict` / JSON can write). With
  `group`, values are tuples of strings and a bare string becomes a 1-tuple."""
  if not isinstance(value, Mapping):
    return value
  items = []
  for k, v in value.items():
    if group:
      v = (v,) if isinstance(v, str) else tuple(v) if isinstance(v, (list, tuple)) else v
    items.append((k, v))
  return tuple(items)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything that determines the token stream (and so goes in run metadata).

  Frozen and validated on construction like every config (`config.check_types` on
  the annotations, then `require` for ranges). `mixture` and `user_data` may be
  given as mappings; they are stored as tuples of (key, value) pairs so that the
  config is hashable, and read back with `mixture_weights` / `user_paths`.
  """
  domains: tuple[str, ...] = corpus_lib.DEFAULT_DOMAINS
  seq_len: int = 256            # T: tokens per training row.
  batch_tokens: int = 8192      # Global batch: batch_size = batch_tokens // T.
  seed: int = 0                 # Shuffling and domain sampling.
  # "uniform", "curriculum" (see below), or {domain: weight} (constant).
  mixture: str | tuple[tuple[str, float], ...] = "uniform"
  # The source's stage (b): curriculum_domain's share goes 5% -> 30% between
  # these steps, the other domains sharing the rest equally.
  curriculum_domain: str = "math"
  curriculum_start_share: float = mixture_lib.CURRICULUM_START_SHARE
  curriculum_end_share: float = mixture_lib.CURRICULUM_END_SHARE
  curriculum_start_step: int = 0
  curriculum_end_step: int = 1000
  curriculum_kind: str = "linear"   # "linear" or "step".
  quality_filter: bool = False      # Drop train docs below entropy_threshold.
  entropy_threshold: float = quality.DEFAULT_THRESHOLD_BITS  # Bits, byte tokens.
  # Cap on each domain's UTF-8 bytes, user data included (None: no cap). Whole
  # documents are taken in order while they fit; a first document larger than
  # the cap is cut at it. What a cap leaves out is recorded in `Corpus.capped`
  # and, for user data, warned about.
  max_bytes_per_domain: int | None = corpus_lib.DEFAULT_MAX_BYTES
  heldout_fraction: float = corpus_lib.HELDOUT_FRACTION
  corpus_seed: int = 0          # Math problems; fixed so eval sets never move.
  tokenizer: str = "byte"       # "byte" or a SentencePiece .model path.
  # {domain: paths or globs} of .txt / .jsonl / .array_record user data.
  user_data: tuple[tuple[str, tuple[str, ...]], ...] = ()
  text_field: str = "text"      # The string field of each JSONL record.
  # How undecodable (non-UTF-8) bytes in user data are handled: "strict" refuses
  # the file, naming it; "replace" / "ignore" are Python's codec error handlers.
  decode_errors: str = "strict"

  def __post_init__(self):
    object.__setattr__(self, "mixture", _as_pairs(self.mixture, group=False))
    object.__setattr__(self, "user_data", _as_pairs(self.user_data, group=True))
    self.validate()

  def replace(self, **overrides: Any) -> DataConfig:
    return config_lib.replace_fields(self, overrides)

  @property
  def batch_size(self) -> int:
    """Global rows per batch (all processes together)."""
    return self.batch_tokens // self.seq_len

  @property
  def mixture_weights(self) -> dict[str, float] | None:
    """{domain: weight} of a constant mixture, None for a named one."""
    return None if isinstance(self.mixture, str) else dict(self.mixture)

  @property
  def user_paths(self) -> dict[str, tuple[str, ...]]:
    """{domain: paths or globs} of the user's data."""
    return dict(self.user_data)

  def validate(self) -> DataConfig:
    """Raises ValueError naming the bad field and what is allowed."""
    config_lib.check_types(self)
    need = functools.partial(config_lib.require, self)
    need(self.domains and len(set(self.domains)) == len(self.domains)
         and all(self.domains), "domains",
         "must be a non-empty tuple of distinct, non-empty domain names")
    config_lib.check_int_ranges(self, {
        "seq_len": (1, 2**20), "batch_tokens": (1, 2**30),
        "seed": (0, config_lib.SEED_LIMIT - 1),
        "corpus_seed": (0, config_lib.SEED_LIMIT - 1),
        "curriculum_start_step": (0, 2**31 - 1),
        "curriculum_end_step": (0, 2**31 - 1)})
    need(self.batch_tokens >= self.seq_len, "batch_tokens",
         f"must be >= seq_len ({self.seq_len}) so that a batch holds at least one row")
    if isinstance(self.mixture, str):
      need(self.mixture in MIXTURES, "mixture",
           f"must be one of {MIXTURES} or a {{domain: weight}} mapping (on the "
           "command line: data.mixture=code:0.5,prose:0.5)")
      if self.mixture == "curriculum":
        need(self.curriculum_domain in self.domains, "curriculum_domain",
             f"must be one of domains {self.domains}")
    else:
      names = [d for d, _ in self.mixture]
      need(len(set(names)) == len(names) and set(names) == set(self.domains),
           "mixture", f"weights must name exactly the domains {self.domains}")
      weights = [w for _, w in self.mixture]
      need(all(w >= 0 for w in weights) and abs(sum(weights) - 1.0) <= 1e-6,
           "mixture", "weights must be >= 0 and sum to 1")
    # The curriculum fields are checked even when unused, so that a typo in them
    # fails at once rather than when the mixture is switched to "curriculum".
    need(self.curriculum_kind in ("linear", "step"), "curriculum_kind",
         "must be 'linear' or 'step'")
    need(self.curriculum_start_step < self.curriculum_end_step, "curriculum_end_step",
         "need 0 <= curriculum_start_step < curriculum_end_step")
    for f in ("curriculum_start_share", "curriculum_end_share"):
      need(0.0 <= getattr(self, f) <= 1.0, f, "must be in [0, 1]")
    need(self.entropy_threshold >= 0, "entropy_threshold",
         "must be a finite number of bits >= 0")
    need(self.max_bytes_per_domain is None or self.max_bytes_per_domain >= 1,
         "max_bytes_per_domain", "must be None (no cap) or >= 1")
    need(0.0 < self.heldout_fraction < 1.0, "heldout_fraction", "must be in (0, 1)")
    need(bool(self.tokenizer), "tokenizer", "must be 'byte' or a SentencePiece .model path")
    user = [d for d, _ in self.user_data]
    need(len(set(user)) == len(user) and set(user) <= set(self.domains), "user_data",
         f"keys must be distinct and among domains {self.domains}")
    need(all(paths and all(paths) for _, paths in self.user_data), "user_data",
         "every domain needs at least one non-empty path or glob")
    need(bool(self.text_field), "text_field", "must be a non-empty JSON field name")
    need(self.decode_errors in DECODE_ERRORS, "decode_errors",
         f"must be one of {DECODE_ERRORS}")
    return self


def schedule_from_config(cfg: DataConfig) -> mixture_lib.MixtureSchedule:
  cfg.validate()
  if cfg.mixture_weights is not None:
    return mixture_lib.constant_mixture({d: cfg.mixture_weights[d] for d in cfg.domains})
  if cfg.mixture == "uniform":
    return mixture_lib.uniform_mixture(cfg.domains)
  return mixture_lib.domain_curriculum(
      cfg.domains, cfg.curriculum_domain, cfg.curriculum_start_share,
      cfg.curriculum_end_share, cfg.curriculum_start_step,
      cfg.curriculum_end_step, kind=cfg.curriculum_kind)


def corpus_from_config(cfg: DataConfig, check: bool = True) -> corpus_lib.Corpus:
  """The (in-process cached) corpus that `cfg` trains and evaluates on.

  With `check`, also `check_enough_data`, so that a corpus too small for the
  held-out split or the batch fails here, before any model is built or compiled."""
  corpus = corpus_lib.build_corpus(
      cfg.domains, cfg.max_bytes_per_domain, cfg.user_paths,
      seed=cfg.corpus_seed, heldout_fraction=cfg.heldout_fraction,
      text_field=cfg.text_field, decode_errors=cfg.decode_errors)
  if check:
    check_enough_data(cfg, corpus)
  return corpus


def check_enough_data(cfg: DataConfig, corpus: corpus_lib.Corpus, tokenizer=None,
                      process_count: int | None = None) -> None:
  """Raises a ValueError naming the domain unless every domain's train split packs
  into at least one row per process, every held-out split into at least one row per
  process (the final eval needs one), and all train rows together fill a batch."""
  tokenizer = tokenizer or tokenizer_lib.get_tokenizer(cfg.tokenizer)
  _, process_count = _process(0 if process_count else None, process_count)
  row = cfg.seq_len + 1
  total = 0
  for domain in cfg.domains:
    if len(corpus.train[domain]) + len(corpus.heldout[domain]) < 2:
      raise ValueError(
          f"domain {domain!r} has 1 document, so nothing is left for the held-out "
          "split or for training (at least 2 are needed; one is held out by content "
          "hash): add documents")
    for split in ("train", "heldout"):
      docs = corpus.split(split)[domain]
      rows = (packed_rows(corpus, domain, "train", tokenizer, cfg.seq_len,
                          cfg.quality_filter, cfg.entropy_threshold) if split == "train"
              else packed_rows(corpus, domain, "heldout", tokenizer, cfg.seq_len))
      if len(rows) >= process_count:
        if split == "train":
          total += len(rows)
        continue
      raise ValueError(
          f"the {split} split of domain {domain!r} ({len(docs)} documents) packs "
          f"into {len(rows)} rows of seq_len + 1 = {row} tokens, fewer than the "
          f"{process_count} process(es) need"
          + (" after the quality filter" if cfg.quality_filter and split == "train"
             else "") + ": add data or lower data.seq_len")
  if total < cfg.batch_size:
    raise ValueError(
        f"the train splits of {cfg.domains} pack into {total} rows of {row} tokens, "
        f"fewer than one batch (data.batch_tokens={cfg.batch_tokens} // "
        f"data.seq_len={cfg.seq_len} = {cfg.batch_size} rows): add data or lower "
        "data.batch_tokens")


# ---------------------------------------------------------------- packing


def pack_documents(docs: Sequence[str], tokenizer, seq_len: int) -> np.ndarray:
  """Concatenates [BOS, doc, EOS] for all docs and cuts rows of seq_len + 1.

  Rows do not overlap and the incomplete tail is dropped; a row's inputs are
  row[:-1] and targets row[1:], so every token but a row's first is a target.

  Returns:
    (N, seq_len + 1) int32.
  """
  bos = np.array([tokenizer.bos_id], np.int32)
  eos = np.array([tokenizer.eos_id], np.int32)
  pieces = []
  for doc in docs:
    pieces += [bos, tokenizer.encode(doc), eos]
  tokens = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)  # (L,)
  num_rows = len(tokens) // (seq_len + 1)
  return tokens[:num_rows * (seq_len + 1)].reshape(num_rows, seq_len + 1)


@functools.lru_cache(maxsize=32)
def packed_rows(corpus: corpus_lib.Corpus, domain: str, split: str, tokenizer,
                seq_len: int, quality_filter: bool = False,
                entropy_threshold: float = quality.DEFAULT_THRESHOLD_BITS,
                ) -> np.ndarray:
  """(N, seq_len + 1) int32 rows of one domain and split, cached in-process.

  The quality filter applies to the train split only, so that filter
  ablations are evaluated on the same held-out rows.
  """
  docs = corpus.split(split)[domain]
  if quality_filter and split == "train":
    keep = quality.keep_mask(docs, tokenizer, entropy_threshold)
    docs = [d for d, k in zip(docs, keep) if k]
  rows = pack_documents(docs, tokenizer, seq_len)
  rows.setflags(write=False)  # Shared by every caller of the cache.
  return rows


# ---------------------------------------------------------------- mixing


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
  x = (x + 0x9E3779B97F4A7C15) & _MASK64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
  return x ^ (x >> 31)


def row_uniform(seed: int, row: int) -> float:
  """A uniform draw in [0, 1) that depends only on (seed, row): counter-based,
  so no RNG state needs checkpointing and any row can be recomputed."""
  return _splitmix64(_splitmix64(seed) ^ row) / 2.0**64


class ScheduledMixIterDataset(grain.IterDataset):
  """Rows drawn from per-domain MapDatasets with step-dependent weights.

  Every process walks the same GLOBAL stream of rows: global row g belongs to
  step g // global_batch_size, its domain is drawn with `schedule.weights(step)`
  from `row_uniform(seed, g)`, and each domain's rows are consumed in order.
  Process p materialises only its block of local_batch_size rows of each global
  batch. So the global batch, and a run's losses, do not depend on the number of
  processes (a 2-host run matches a 1-host run), and the state is two counters.
  """

  def __init__(self, domain_datasets: Sequence[grain.MapDataset],
               schedule: mixture_lib.MixtureSchedule, *, seed: int,
               local_batch_size: int, process_index: int = 0,
               process_count: int = 1):
    super().__init__(list(domain_datasets))
    if len(domain_datasets) != len(schedule.domains):
      raise ValueError(f"{len(domain_datasets)} domain datasets for a "
                       f"schedule over {schedule.domains}")
    self.schedule = schedule
    self.seed = seed
    self.local_batch_size = local_batch_size
    self.process_index = process_index
    self.process_count = process_count

  def __iter__(self) -> grain.DatasetIterator:
    return _ScheduledMixIterator(self)

  def __str__(self) -> str:
    return f"ScheduledMixIterDataset(domains={self.schedule.domains})"


class _ScheduledMixIterator(grain.DatasetIterator):

  def __init__(self, ds: ScheduledMixIterDataset):
    super().__init__()
    self._ds = ds
    self._next_row = 0
    self._domain_pos = [0] * len(ds.parents)
    self._cdf_step, self._cdf = None, None

  def _domain_cdf(self, step: int) -> np.ndarray:
    if step != self._cdf_step:
      cdf = np.cumsum(self._ds.schedule.weights(step))  # (D,)
      self._cdf_step, self._cdf = step, cdf / cdf[-1]  # Last entry exactly 1.
    return self._cdf

  def __next__(self) -> dict[str, np.ndarray]:
    ds = self._ds
    local = ds.local_batch_size
    mine = range(ds.process_index * local, (ds.process_index + 1) * local)
    while True:
      step, j = divmod(self._next_row, local * ds.process_count)
      u = row_uniform(ds.seed, self._next_row)
      # side="right" skips zero-weight domains (their cdf step has zero width).
      domain = int(np.searchsorted(self._domain_cdf(step), u, side="right"))
      position = self._domain_pos[domain]
      self._domain_pos[domain] += 1
      self._next_row += 1
      if j in mine:
        return ds.parents[domain][position]

  def get_state(self) -> dict[str, Any]:
    return {"next_row": self._next_row, "domain_pos": list(self._domain_pos)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if len(state["domain_pos"]) != len(self._domain_pos):
      raise ValueError(f"state has {len(state['domain_pos'])} domains, this "
                       f"pipeline has {len(self._domain_pos)}")
    self._next_row = int(state["next_row"])
    self._domain_pos = [int(p) for p in state["domain_pos"]]


# ---------------------------------------------------------------- entry points


def _example_fn(domain_index: int):
  def to_example(row: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": row[:-1], "targets": row[1:],  # (T,), (T,)
            "domain": np.int32(domain_index)}
  return to_example


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in "
                     f"[0, process_count={process_count})")
  return process_index, process_count


def _sharded_source(rows: np.ndarray, domain: str, process_index: int,
                    process_count: int) -> grain.MapDataset:
  if len(rows) < process_count:
    raise ValueError(f"domain {domain!r} packs into {len(rows)} rows, fewer "
                     f"than process_count={process_count}: lower seq_len or "
                     "add data")
  return grain.MapDataset.source(rows)[process_index::process_count]


def make_train_iterator(cfg: DataConfig, corpus: corpus_lib.Corpus | None = None,
                        tokenizer=None,
                        schedule: mixture_lib.MixtureSchedule | None = None, *,
                        process_index: int | None = None,
                        process_count: int | None = None,
                        ) -> grain.DatasetIterator:
  """An infinite iterator of this process's training batches.

  Each batch is {"inputs": (B, T) int32, "targets": (B, T) int32,
  "domain": (B,) int32 index into cfg.domains}, with B = cfg.batch_size //
  process_count. Save `it.get_state()` with a checkpoint and call
  `it.set_state(state)` on a fresh iterator to resume with the same batches.

  Args:
    cfg: the data config (validated here).
    corpus, tokenizer, schedule: override what cfg would build.
    process_index, process_count: default to jax.process_index()/count().
  """
  cfg.validate()
  corpus = corpus or corpus_from_config(cfg)
  tokenizer = tokenizer or tokenizer_lib.get_tokenizer(cfg.tokenizer)
  schedule = schedule or schedule_from_config(cfg)
  missing = set(cfg.domains) - set(corpus.domains)
  if missing:
    raise ValueError(f"corpus has no domains {sorted(missing)} of cfg.domains")
  if tuple(schedule.domains) != tuple(cfg.domains):
    raise ValueError(f"schedule.domains {schedule.domains} must equal "
                     f"cfg.domains {cfg.domains} (same order)")
  process_index, process_count = _process(process_index, process_count)
  if cfg.batch_size % process_count:
    raise ValueError(f"DataConfig.batch_tokens={cfg.batch_tokens}: batch_size "
                     f"{cfg.batch_size} must divide by process_count="
                     f"{process_count}")
  local_batch_size = cfg.batch_size // process_count

  domain_datasets = []
  for d, domain in enumerate(cfg.domains):
    rows = packed_rows(corpus, domain, "train", tokenizer, cfg.seq_len,
                       cfg.quality_filter, cfg.entropy_threshold)
    if not len(rows):   # grain would fail with a ZeroDivisionError on the first batch.
      raise ValueError(f"the train split of domain {domain!r} packs into 0 rows of "
                       f"seq_len + 1 = {cfg.seq_len + 1} tokens: add data or lower "
                       "data.seq_len")
    # A distinct shuffle seed per domain; shuffle-then-repeat reshuffles
    # every epoch (grain folds the epoch into the seed).
    shuffle_seed = _splitmix64(cfg.seed * 1_000_003 + d) % 2**32
    # Every process holds the whole (lazily indexed) domain: the mixer picks
    # this process's rows out of the global stream.
    domain_datasets.append(grain.MapDataset.source(rows)
                           .shuffle(shuffle_seed).repeat().map(_example_fn(d)))
  mixed = ScheduledMixIterDataset(
      domain_datasets, schedule, seed=cfg.seed,
      local_batch_size=local_batch_size, process_index=process_index,
      process_count=process_count)
  return iter(mixed.batch(local_batch_size, drop_remainder=True))


def make_eval_batches(cfg: DataConfig, domain: str,
                      max_batches: int | None = None,
                      corpus: corpus_lib.Corpus | None = None, tokenizer=None,
                      *, process_index: int | None = None,
                      process_count: int | None = None,
                      ) -> list[dict[str, np.ndarray]]:
  """The fixed, unshuffled held-out batches of one domain (this process's share).

  Batches have the training batch shape (B, T), B = cfg.batch_size //
  process_count; the incomplete last batch is dropped so that an eval step
  compiles once, except that a held-out split smaller than one batch gives a
  single smaller batch rather than none.
  """
  cfg.validate()
  if domain not in cfg.domains:
    raise ValueError(f"domain {domain!r} is not in cfg.domains {cfg.domains}")
  corpus = corpus or corpus_from_config(cfg)
  tokenizer = tokenizer or tokenizer_lib.get_tokenizer(cfg.tokenizer)
  process_index, process_count = _process(process_index, process_count)
  rows = packed_rows(corpus, domain, "heldout", tokenizer, cfg.seq_len)
  ds = _sharded_source(rows, domain, process_index, process_count).map(
      _example_fn(cfg.domains.index(domain)))
  batch_size = min(max(cfg.batch_size // process_count, 1), len(ds))
  batches = ds.batch(batch_size, drop_remainder=True)
  num = len(batches) if max_batches is None else min(len(batches), max_batches)
  return [batches[i] for i in range(num)]
