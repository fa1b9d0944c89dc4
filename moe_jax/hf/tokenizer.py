"""A Hugging Face `tokenizer.json`, loaded with the `tokenizers` library.

    tok = load_tokenizer("runs/X")              # or a path to tokenizer.json
    tok.encode("text") -> (n,) int32 (no BOS/EOS; the packer and generation add them)

Implements `moe_jax.data.tokenizer.Tokenizer`. BOS/EOS come from the special-token
strings of tokenizer_config.json next to it, else from config.json's
bos_token_id / eos_token_id (hf_config.json in a run); PAD falls back to EOS (packing never pads).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np


def _read(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _token_str(value) -> str | None:
  return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
  def __init__(self, path: str):
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("HFTokenizer needs the `tokenizers` package: "
                        "pip install 'moe_jax[hf]'") from e
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no tokenizer.json at {path!r}")
    self.path = os.path.abspath(path)
    self.name = f"hf:{self.path}"
    self._tok = tokenizers.Tokenizer.from_file(self.path)
    here = os.path.dirname(self.path)
    tcfg = _read(os.path.join(here, "tokenizer_config.json"))
    # config.json in an HF directory; hf_config.json (its copy) in a converted run.
    mcfg = _read(os.path.join(here, "config.json")) or _read(
        os.path.join(here, "hf_config.json"))
    ids = {}
    for special in ("bos", "eos", "pad"):
      token = _token_str(tcfg.get(f"{special}_token"))
      tid = self._tok.token_to_id(token) if token else None
      if tid is None:
        tid = mcfg.get(f"{special}_token_id")
        tid = tid[0] if isinstance(tid, list) else tid
      ids[special] = tid
    self._bos, self._eos = ids["bos"], ids["eos"]
    self._pad = ids["pad"] if ids["pad"] is not None else self._eos

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def bos_id(self) -> int:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=True)

  def __eq__(self, other) -> bool:
    return isinstance(other, HFTokenizer) and other.name == self.name

  def __hash__(self) -> int:
    return hash(self.name)


def load_tokenizer(path: str) -> HFTokenizer:
  """A run directory written by `moe_jax.hf.convert`, an HF checkpoint directory, or
  a tokenizer.json path."""
  return HFTokenizer(path)
