"""Streaming safetensors reader and writer in numpy (no torch, no copy of a whole file).

    file = [u64 header length][JSON header: name -> dtype, shape, data_offsets][data]

`SafetensorsDir` indexes every `*.safetensors` file of a checkpoint directory (one
file, or shards listed by `model.safetensors.index.json`) from their headers only;
`get(name)` then reads that one tensor's bytes into a fresh array, so a model is
read tensor by tensor and the only full copy ever held is the converted one.
bfloat16 comes back as `ml_dtypes.bfloat16` (numpy has no bf16 of its own).
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class MissingTensorError(KeyError):
  """A tensor the architecture needs is not in the checkpoint; the message names it."""

  def __str__(self) -> str:
    return str(self.args[0])


def read_header(path: str) -> tuple[dict, int]:
  """The JSON header of one safetensors file and the byte offset where data begins."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  return header, 8 + n


class SafetensorsDir:
  """Every tensor of the `*.safetensors` files in `directory`, read on demand."""

  def __init__(self, directory: str):
    self.directory = directory
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(f"no *.safetensors file in {directory}")
    self.index: dict[str, tuple[str, dict, int]] = {}
    for name in files:
      path = os.path.join(directory, name)
      header, start = read_header(path)
      for key, info in header.items():
        if key != "__metadata__":
          self.index[key] = (path, info, start)
    self.used: set[str] = set()

  def __contains__(self, name: str) -> bool:
    return name in self.index

  def keys(self) -> list[str]:
    return list(self.index)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._info(name)[1]["shape"])

  def _info(self, name: str):
    if name not in self.index:
      raise MissingTensorError(
          f"tensor {name!r} is missing from the checkpoint in {self.directory} "
          f"({len(self.index)} tensors found)")
    return self.index[name]

  def get(self, name: str) -> np.ndarray:
    """A copy of tensor `name` (its own dtype), read from a memory map of its file."""
    path, info, start = self._info(name)
    if info["dtype"] not in DTYPES:
      raise ValueError(f"tensor {name!r} has dtype {info['dtype']}, not supported "
                       f"(supported: {sorted(DTYPES)}); FP8 checkpoints need "
                       f"dequantizing to bf16 first")
    lo, hi = info["data_offsets"]
    out = np.empty(info["shape"], DTYPES[info["dtype"]])
    # Read straight into the result: no memory map, whose touched pages would count
    # as resident memory on top of the converted copy.
    with open(path, "rb", buffering=0) as f:
      f.seek(start + lo)
      view = memoryview(out.reshape(-1).view(np.uint8))
      done = 0
      while done < hi - lo:
        n = f.readinto(view[done:])
        if not n:
          raise ValueError(f"{path} is truncated: tensor {name!r} needs bytes "
                           f"{start + lo}..{start + hi}")
        done += n
    self.used.add(name)
    return out

  def unused(self) -> list[str]:
    return sorted(set(self.index) - self.used)


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> int:
  """Writes `tensors` (name -> array) as one safetensors file; returns its size.
  Tensors are written one after another, never concatenated in memory."""
  header: dict = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  names = sorted(tensors)
  for name in names:
    a = tensors[name]
    if np.dtype(a.dtype) not in NAMES:
      raise ValueError(f"cannot write {name!r}: dtype {a.dtype} has no safetensors name")
    header[name] = {"dtype": NAMES[np.dtype(a.dtype)], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)                       # data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name in names:
      f.write(np.ascontiguousarray(tensors[name]).tobytes())
  return 8 + len(blob) + offset
