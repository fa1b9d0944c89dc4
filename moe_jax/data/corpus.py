"""The embedded default corpus (no download) and readers for user data.

Three domains of real text, all available offline on any machine with Python:

  code   Python standard library source (`sysconfig.get_paths()["stdlib"]`),
         one file per document, test/tooling directories skipped.
  prose  Public-domain English literature shipped in `moe_jax/data/texts/`
         (Shakespeare, Milton, the 1911 Britannica; see texts/README.md),
         cut into ~4 KB documents at paragraph boundaries.
  math   Generated arithmetic and linear-equation worksheets with answers
         (`math_problems.py`), deterministic in a seed.

Every domain has a FIXED held-out split chosen by a hash of each document's
content (not its position), so the split does not move when the byte cap,
the file order or the other domains change, and identical documents always
land on the same side. `Corpus.fingerprint()` is recorded in every run so a
result can be traced to the exact text it was trained on (the code domain
depends on the Python version that provides the stdlib).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import pathlib
import sysconfig
import warnings
from typing import Iterable, Iterator, Mapping, Sequence

from moe_jax.data import math_problems

DEFAULT_DOMAINS = ("code", "prose", "math")
DEFAULT_MAX_BYTES = 4_000_000
HELDOUT_FRACTION = 0.05
TEXTS_DIR = pathlib.Path(__file__).parent / "texts"

# Stdlib directories that are not representative library code: test suites
# (huge and repetitive), GUI/demo tools, vendored wheels, third-party installs.
_SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages",
    "dist-packages", "ensurepip", "__pycache__", "pydoc_data", "lib2to3",
    "tkinter",
})
_PROSE_CHUNK_CHARS = 4000


def _content_hash(text: str) -> bytes:
  return hashlib.sha256(text.encode("utf-8", errors="replace")).digest()


def is_heldout(doc: str, fraction: float = HELDOUT_FRACTION) -> bool:
  """Deterministic held-out membership from the document's content hash."""
  return int.from_bytes(_content_hash(doc)[:8], "big") < fraction * 2**64


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  """Per-domain train and held-out documents (`str`s).

  Hash and equality are by `fingerprint()`, so a Corpus can key an
  `functools.lru_cache` (the pipeline caches packed token arrays that way).
  """
  train: Mapping[str, tuple[str, ...]]
  heldout: Mapping[str, tuple[str, ...]]
  # {domain: what the byte cap or the reader left out}, for domains where it did.
  capped: Mapping[str, str] = dataclasses.field(default_factory=dict)

  @property
  def domains(self) -> tuple[str, ...]:
    return tuple(self.train)

  def split(self, name: str) -> Mapping[str, tuple[str, ...]]:
    if name not in ("train", "heldout"):
      raise ValueError(f"split must be 'train' or 'heldout', got {name!r}")
    return self.train if name == "train" else self.heldout

  @functools.cached_property
  def _fingerprint(self) -> str:
    sha = hashlib.sha256()
    for split in ("train", "heldout"):
      for domain, docs in self.split(split).items():
        sha.update(f"{split}/{domain}/{len(docs)}\0".encode())
        for doc in docs:
          sha.update(_content_hash(doc))
    return sha.hexdigest()[:16]

  def fingerprint(self) -> str:
    """Short sha256 hex over split/domain names and every document."""
    return self._fingerprint

  def sizes(self) -> dict[str, dict[str, int]]:
    """Per domain: number of documents and UTF-8 bytes in each split."""
    out = {}
    for domain in self.domains:
      out[domain] = {
          f"{split}_{unit}": (len(docs) if unit == "docs" else
                              sum(len(d.encode("utf-8")) for d in docs))
          for split in ("train", "heldout")
          for docs in [self.split(split)[domain]]
          for unit in ("docs", "bytes")}
    return out

  def __hash__(self) -> int:
    return hash(self.fingerprint())

  def __eq__(self, other) -> bool:
    return isinstance(other, Corpus) and self.fingerprint() == other.fingerprint()


# ---------------------------------------------------------------- built-in domains


def _cut_utf8(doc: str, max_bytes: int) -> str:
  """The longest prefix of `doc` of at most `max_bytes` UTF-8 bytes (whole chars)."""
  return doc.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def _take_bytes(docs: Iterable[str], max_bytes: int | None,
                notes: list[str] | None = None) -> list[str]:
  """Documents in the given order while their UTF-8 bytes fit in `max_bytes`.

  `docs` is consumed lazily and not beyond the first document that does not fit,
  so a capped domain never reads the rest of its files. A FIRST document larger
  than the cap is cut at it (rather than kept whole: the cap is a bound). What
  the cap left out is appended to `notes` as a sentence."""
  out, total = [], 0
  for doc in docs:
    size = len(doc.encode("utf-8"))
    if max_bytes is not None and total + size > max_bytes:
      if not out:
        out.append(_cut_utf8(doc, max_bytes))
        total = len(out[0].encode("utf-8"))
        what = f"its first document ({size:,} bytes) was cut to {total:,} bytes"
      else:
        what = (f"kept the first {len(out):,} documents ({total:,} bytes) and left "
                "out the rest (files after the cap are not opened)")
      if notes is not None:
        notes.append(f"max_bytes_per_domain={max_bytes:,}: {what}")
      break
    out.append(doc)
    total += size
  return out


def stdlib_code_documents(max_bytes: int | None = DEFAULT_MAX_BYTES) -> list[str]:
  """Python stdlib source files, one per document, up to `max_bytes`.

  Files are taken in the order of a hash of their path relative to the stdlib
  root: deterministic across machines with the same Python, and a cap picks a
  spread over all packages instead of the alphabetical head (asyncio, ...).
  """
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    # config-3.X-<platform> holds build scripts, not library code.
    dirnames[:] = sorted(d for d in dirnames
                         if d not in _SKIP_DIRS and not d.startswith("config-"))
    for name in sorted(filenames):
      if name.endswith(".py"):
        paths.append(pathlib.Path(dirpath, name).relative_to(root).as_posix())
  if not paths:
    raise FileNotFoundError(f"no Python stdlib sources found under {root}")
  paths.sort(key=lambda p: hashlib.sha256(p.encode()).digest())
  # Some stdlib files declare latin-1 source encodings; `replace` keeps them.
  docs = (root.joinpath(p).read_bytes().decode("utf-8", errors="replace")
          for p in paths)
  return _take_bytes((d for d in docs if d.strip()), max_bytes)


def _paragraph_chunks(text: str, chunk_chars: int) -> list[str]:
  """Greedy groups of whole paragraphs of about `chunk_chars` characters."""
  chunks, current, size = [], [], 0
  for paragraph in text.split("\n\n"):
    if not paragraph.strip():
      continue
    if current and size + len(paragraph) > chunk_chars:
      chunks.append("\n\n".join(current))
      current, size = [], 0
    current.append(paragraph.strip("\n"))
    size += len(paragraph) + 2
  if current:
    chunks.append("\n\n".join(current))
  return chunks


def prose_documents(max_bytes: int | None = DEFAULT_MAX_BYTES,
                    texts_dir: pathlib.Path = TEXTS_DIR) -> list[str]:
  """The shipped public-domain texts, cut into ~4 KB paragraph-aligned chunks.

  Chunks (not whole books) are the documents so that a ~5% held-out split is
  possible at all (there are only 17 books) and so the entropy filter scores
  passages of comparable length. Books are interleaved round-robin before the
  byte cap so a small cap still covers every book.
  """
  paths = sorted(texts_dir.glob("*.txt"))
  if not paths:
    raise FileNotFoundError(f"no prose texts (*.txt) found in {texts_dir}")
  books = [_paragraph_chunks(p.read_text(encoding="utf-8").replace("\r\n", "\n"),
                             _PROSE_CHUNK_CHARS) for p in paths]
  interleaved = [book[i] for i in range(max(map(len, books)))
                 for book in books if i < len(book)]
  return _take_bytes(interleaved, max_bytes)


# ---------------------------------------------------------------- user data
#
# What streams: every reader below is a generator. Files are opened one at a time
# and JSONL / ArrayRecord files are read one record at a time, so only the
# documents that are kept are ever in memory, once; `build_corpus` stops reading
# as soon as a domain's byte cap is reached (the rest of the files are never
# opened). A .txt file is one document and is read whole, once. What does not
# stream: the kept documents, and their packed token rows (int32, 4 bytes per
# token), are held in memory, so data larger than memory needs a cap
# (`max_bytes_per_domain`).

DECODE_ERRORS = ("strict", "replace", "ignore")
ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")


def _decode(raw: bytes, where: str, errors: str) -> str:
  """UTF-8 text of `raw`; with errors="strict", binary or undecodable bytes are
  refused with `where` (file, line or record) and the byte offset named."""
  if errors not in DECODE_ERRORS:
    raise ValueError(f"errors={errors!r} must be one of {DECODE_ERRORS}")
  if errors == "strict":
    nul = raw.find(b"\0")
    if nul >= 0:
      raise ValueError(f"{where}: looks binary (NUL byte at offset {nul}); user data "
                       "must be UTF-8 text (or pass decode_errors='replace' or "
                       "'ignore' to decode it anyway)")
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte offset "
                       f"{e.start}); pass decode_errors='replace' or 'ignore' to "
                       "decode it anyway") from None
  return raw.decode("utf-8", errors=errors)


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
  """The files matched by each glob (`**` allowed), sorted per pattern. A pattern
  that matches no file is an error naming it."""
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  files = []
  for pattern in patterns:
    matched = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                     if os.path.isfile(p))
    if not matched:
      raise FileNotFoundError(f"no files match {pattern!r}")
    files += matched
  return files


def iter_text_files(globs: str | Sequence[str], errors: str = "strict"
                    ) -> Iterator[str]:
  """One document per file matched by each glob, sorted by path (lazily)."""
  for path in expand_paths(globs):
    yield _decode(pathlib.Path(path).read_bytes(), path, errors)


def load_text_files(globs: str | Sequence[str], errors: str = "strict") -> list[str]:
  return list(iter_text_files(globs, errors))


def iter_jsonl(path: str, field: str = "text", errors: str = "strict"
               ) -> Iterator[str]:
  """The `field` string of every JSON object of a JSON-lines file, one line at a
  time. Errors name the file and the line (1-based, blank lines counted)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such JSON-lines file: {path!r}")
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      where = f"{path}:{line_no}"
      line = _decode(raw, where, errors)
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: malformed JSON: {e.msg} (column {e.colno})"
                         ) from None
      if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with a string field "
                         f"{field!r}, got a JSON {type(record).__name__}")
      if not isinstance(record.get(field), str):
        got = ("missing" if field not in record else
               f"a {type(record[field]).__name__}")
        raise ValueError(f"{where}: no string field {field!r} ({got}; the record "
                         f"has fields {sorted(record)[:10]}); choose the field with "
                         "--data-field or data.text_field")
      yield record[field]


def load_jsonl(path: str, field: str = "text", errors: str = "strict") -> list[str]:
  return list(iter_jsonl(path, field, errors))


def iter_array_record(paths: str | Sequence[str], errors: str = "strict"
                      ) -> Iterator[str]:
  """Every record of ArrayRecord files (globs allowed), each UTF-8 text bytes,
  one record at a time."""
  from grain import sources  # Lazy: keeps `import moe_jax.data` light.
  for path in expand_paths(paths):
    source = sources.ArrayRecordDataSource([path])
    for i in range(len(source)):
      yield _decode(source[i], f"{path} record {i}", errors)


def load_array_record(paths: str | Sequence[str], errors: str = "strict") -> list[str]:
  return list(iter_array_record(paths, errors))


def _is_array_record(path: str) -> bool:
  return path.endswith(ARRAY_RECORD_SUFFIXES) or "array_record-" in path


def iter_documents(pattern: str, field: str = "text", errors: str = "strict"
                   ) -> Iterator[str]:
  """Documents of every file a path or glob matches, by each file's extension:
  .jsonl (one document per line's `field`), .array_record / .arrayrecord (one per
  record), anything else plain UTF-8 text (one per file)."""
  for path in expand_paths(pattern):
    if path.endswith(".jsonl"):
      yield from iter_jsonl(path, field, errors)
    elif _is_array_record(path):
      yield from iter_array_record(path, errors)
    else:
      yield from iter_text_files(path, errors)


def load_documents(path: str, field: str = "text", errors: str = "strict") -> list[str]:
  return list(iter_documents(path, field, errors))


# ---------------------------------------------------------------- the corpus


def split_documents(docs: Sequence[str], fraction: float = HELDOUT_FRACTION,
                    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(train, heldout) by content hash; order within each split is preserved.

  A small domain (e.g. a capped code domain of 20 files) may have no document
  whose hash falls under `fraction`; then the document with the smallest hash
  is held out, so that every domain can be evaluated.
  """
  flags = [is_heldout(doc, fraction) for doc in docs]
  if len(docs) >= 2 and not any(flags):
    flags[min(range(len(docs)), key=lambda i: _content_hash(docs[i]))] = True
  train = tuple(d for d, h in zip(docs, flags) if not h)
  heldout = tuple(d for d, h in zip(docs, flags) if h)
  return train, heldout


def domain_documents(domain: str, max_bytes: int | None = DEFAULT_MAX_BYTES,
                     seed: int = 0) -> list[str]:
  """Documents of one built-in domain."""
  if domain == "code":
    return stdlib_code_documents(max_bytes)
  if domain == "prose":
    return prose_documents(max_bytes)
  if domain == "math":
    return math_problems.generate_math_documents(
        max_bytes or DEFAULT_MAX_BYTES, seed=seed)
  raise ValueError(f"unknown built-in domain {domain!r}: built-ins are "
                   f"{DEFAULT_DOMAINS}; give other domains as user_data")


def build_corpus(domains: Sequence[str] = DEFAULT_DOMAINS,
                 max_bytes_per_domain: int | None = DEFAULT_MAX_BYTES,
                 user_data: Mapping[str, Sequence[str]] | None = None,
                 seed: int = 0,
                 heldout_fraction: float = HELDOUT_FRACTION,
                 text_field: str = "text", decode_errors: str = "strict") -> Corpus:
  """The corpus for `domains`, cached in-process (same arguments, same object).

  Args:
    domains: domain names; built-ins are "code", "prose", "math". A name in
      `user_data` is read from the user's files instead (this also overrides a
      built-in of the same name).
    max_bytes_per_domain: cap on each domain's UTF-8 bytes before the split
      (None: no cap), user data included; see `_take_bytes`. When it leaves user
      data out, a warning says so; `Corpus.capped` records it for every domain.
    user_data: domain -> paths or globs (see `iter_documents`), read lazily.
    seed: seed of the generated math problems.
    heldout_fraction: share of documents held out, by content hash.
    text_field: the string field of JSONL records.
    decode_errors: "strict" (refuse non-UTF-8 files, naming them), "replace",
      "ignore".
  """
  if isinstance(user_data, Mapping):
    user_data = user_data.items()
  user_items = tuple(sorted((d, tuple([p] if isinstance(p, str) else p))
                            for d, p in (user_data or ())))
  unknown = {d for d, _ in user_items} - set(domains)
  if unknown:
    raise ValueError(f"user_data names domains {sorted(unknown)} that are not "
                     f"in domains={tuple(domains)}")
  return _build_corpus_cached(tuple(domains), max_bytes_per_domain, user_items,
                              seed, heldout_fraction, text_field, decode_errors)


@functools.lru_cache(maxsize=8)
def _build_corpus_cached(domains, max_bytes, user_items, seed, fraction,
                         text_field="text", decode_errors="strict") -> Corpus:
  if not domains or len(set(domains)) != len(domains):
    raise ValueError(f"domains must be non-empty and distinct, got {domains}")
  user = dict(user_items)
  train, heldout, capped = {}, {}, {}
  for domain in domains:
    notes: list[str] = []
    if domain in user:
      empty = [0]

      def non_empty(docs, empty=empty):
        for doc in docs:
          if doc.strip():
            yield doc
          else:
            empty[0] += 1
      docs = _take_bytes(non_empty(d for p in user[domain]
                                   for d in iter_documents(p, text_field, decode_errors)),
                         max_bytes, notes)
      if empty[0]:
        notes.append(f"{empty[0]} empty document(s) skipped")
      if not docs:
        raise ValueError(f"user data of domain {domain!r} ({', '.join(user[domain])}) "
                         "holds no non-empty document")
      if notes:
        hint = (" (raise data.max_bytes_per_domain, or set it to None, to read more)"
                if any("max_bytes" in n for n in notes) else "")
        warnings.warn(f"user data of domain {domain!r}: {'; '.join(notes)}{hint}",
                      stacklevel=3)
    else:
      docs = domain_documents(domain, max_bytes, seed)
    if not docs:
      raise ValueError(f"domain {domain!r} has no documents")
    if notes:
      capped[domain] = "; ".join(notes)
    train[domain], heldout[domain] = split_documents(docs, fraction)
  return Corpus(train=train, heldout=heldout, capped=capped)
