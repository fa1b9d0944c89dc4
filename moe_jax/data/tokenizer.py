"""Tokenizers: byte-level by default (nothing to train or download), SentencePiece
as an option for users who bring their own `.model` file.

Byte-level is the default because every experiment must run offline on a CPU:
ids 0..255 are the UTF-8 bytes, so any text round-trips exactly, and the
entropy filter (quality.py) is computed over the same byte tokens.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np


class Tokenizer(Protocol):
  name: str

  @property
  def vocab_size(self) -> int: ...
  @property
  def pad_id(self) -> int: ...
  @property
  def bos_id(self) -> int: ...
  @property
  def eos_id(self) -> int: ...
  def encode(self, text: str) -> np.ndarray: ...
  def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then PAD=256, BOS=257, EOS=258.

  `vocab_size` is 259; a model may round its embedding table up (e.g. to a
  multiple of 128) for efficient matmuls: the extra rows are simply never used.
  """
  name = "byte"
  PAD, BOS, EOS = 256, 257, 258

  @property
  def vocab_size(self) -> int:
    return 259

  @property
  def pad_id(self) -> int:
    return self.PAD

  @property
  def bos_id(self) -> int:
    return self.BOS

  @property
  def eos_id(self) -> int:
    return self.EOS

  def encode(self, text: str) -> np.ndarray:
    """(len(text.encode()),) int32; no BOS/EOS (the packer adds them)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Bytes back to text; specials are skipped, broken UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    data = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")

  # Equal by name so packed-token caches keyed on the tokenizer are shared.
  def __eq__(self, other) -> bool:
    return isinstance(other, ByteTokenizer)

  def __hash__(self) -> int:
    return hash(self.name)


class SentencePieceTokenizer:
  """A trained SentencePiece model; `sentencepiece` is imported only here."""

  def __init__(self, model_path: str):
    if not os.path.isfile(model_path):
      raise FileNotFoundError(f"no SentencePiece model at {model_path!r}")
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          "SentencePieceTokenizer needs the `sentencepiece` package: "
          "pip install 'moe_jax[sentencepiece]'") from e
    self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
    self.model_path = model_path
    self.name = f"sentencepiece:{os.path.abspath(model_path)}"
    for special in ("bos", "eos"):
      if getattr(self._sp, f"{special}_id")() < 0:
        raise ValueError(f"{model_path} defines no {special.upper()} piece; "
                         "the packer needs BOS and EOS")

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    # Many SentencePiece models disable PAD (-1); packing never pads, and
    # EOS is a safe stand-in for code that needs a filler id.
    pad = self._sp.pad_id()
    return pad if pad >= 0 else self.eos_id

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)
           if i not in (self.pad_id, self.bos_id, self.eos_id)]
    return self._sp.decode(ids)

  def __eq__(self, other) -> bool:
    return isinstance(other, SentencePieceTokenizer) and other.name == self.name

  def __hash__(self) -> int:
    return hash(self.name)


def get_tokenizer(name_or_path: str = "byte") -> Tokenizer:
  """"byte" -> ByteTokenizer; a path to a `.model` file -> SentencePiece; a path to a
  Hugging Face `tokenizer.json` -> moe_jax.hf.tokenizer.HFTokenizer."""
  if name_or_path == "byte":
    return ByteTokenizer()
  if os.path.basename(name_or_path) == "tokenizer.json":   # Hugging Face (moe_jax.hf)
    from moe_jax.hf.tokenizer import HFTokenizer  # pylint: disable=g-import-not-at-top
    return HFTokenizer(name_or_path)
  if name_or_path.endswith(".model") or os.path.isfile(name_or_path):
    return SentencePieceTokenizer(name_or_path)
  raise ValueError(f"tokenizer must be 'byte' or a path to a SentencePiece "
                   f".model file, got {name_or_path!r}")
