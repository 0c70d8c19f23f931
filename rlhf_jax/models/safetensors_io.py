"""Safetensors files read and written one tensor at a time, so no model is ever whole in host memory.

Reading: `SafetensorsSource` opens a checkpoint directory (model.safetensors, or the shards its
model.safetensors.index.json names) and answers names, shapes and dtypes from the headers alone;
`read(name, index)` reads just a slice of one tensor (the files are memory-mapped).

Writing: `write_checkpoint` takes (name, shape, dtype, produce) entries, plans the shards from
the shapes alone, writes each file's header first and then each tensor's bytes as `produce()`
returns them, so host memory holds one tensor at a time. One file when everything fits under
`max_shard_bytes`, else `model-0000k-of-0000n.safetensors` plus the index, as transformers
writes them. The format: an 8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}} padded with spaces to 8 bytes, then the tensors' bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterable

import numpy as np

__all__ = ["SafetensorsSource", "DictSource", "Entry", "write_checkpoint", "INDEX", "SINGLE",
           "DEFAULT_MAX_SHARD_BYTES", "parse_size"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size
_DTYPE_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                "bool": "BOOL"}


def parse_size(value: int | str) -> int:
  """Bytes from an int or a size such as "2GB", "500MB", "5GiB"."""
  if isinstance(value, int):
    return value
  text = value.strip().upper().replace(" ", "")
  for suffix, scale in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9),
                        ("MB", 10**6), ("KB", 10**3), ("B", 1)):
    if text.endswith(suffix) and text[:-len(suffix)].replace(".", "", 1).isdigit():
      return int(float(text[:-len(suffix)]) * scale)
  raise ValueError(f"max_shard_size={value!r}: expected bytes or a size like '2GB' or '500MB'")


class DictSource:
  """The `SafetensorsSource` interface over in-memory arrays (tests, converted tensors)."""

  def __init__(self, tensors: dict[str, np.ndarray]):
    self._tensors = tensors

  def keys(self) -> list[str]:
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._tensors[name].shape)

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    array = np.asarray(self._tensors[name])
    return array if index is None else array[index]


class SafetensorsSource:
  """A checkpoint directory's tensors, read lazily: headers at open, data slice by slice."""

  def __init__(self, directory: str):
    from safetensors import safe_open  # deferred like every file-format import here

    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(directory, SINGLE)):
      files = [SINGLE]
    else:
      raise FileNotFoundError(
          f"no {SINGLE} or {INDEX} in {directory!r} (only safetensors checkpoints are supported)")
    self._handles, self._where = [], {}
    for file in files:
      handle = safe_open(os.path.join(directory, file), framework="np")
      self._handles.append(handle)
      for name in handle.keys():
        self._where[name] = handle

  def keys(self) -> list[str]:
    return list(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name].get_slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The whole tensor, or only `index` (a tuple of slices, one per dim) of it."""
    if index is None:
      return self._where[name].get_tensor(name)
    return self._where[name].get_slice(name)[index]


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor to write: its name, shape and dtype, and how to make its values when its turn
  comes (a thunk, so only one tensor exists at a time)."""

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  produce: Callable[[], np.ndarray | None]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _plan_shards(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
  shards: list[list[Entry]] = [[]]
  size = 0
  for entry in entries:
    if shards[-1] and size + entry.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += entry.nbytes
  return shards


def _header(entries: list[Entry], metadata: dict[str, str]) -> bytes:
  header, offset = {"__metadata__": metadata}, 0
  for entry in entries:
    code = _DTYPE_CODES.get(np.dtype(entry.dtype).name)
    if code is None:
      raise ValueError(f"tensor {entry.name!r}: dtype {entry.dtype} has no safetensors code")
    header[entry.name] = {"dtype": code, "shape": list(entry.shape),
                          "data_offsets": [offset, offset + entry.nbytes]}
    offset += entry.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  return raw + b" " * (-len(raw) % 8)


def write_checkpoint(entries: Iterable[Entry], out_dir: str, *,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, write: bool = True,
                     metadata: dict[str, str] | None = None) -> list[str]:
  """Writes the entries as safetensors file(s) in `out_dir`; returns the file names.

  Every entry's `produce` is called exactly once, in order, whether or not this process writes
  (`write=False` on the processes other than 0: `produce` may be a collective gather that every
  process must join). A produced array must match its entry's shape; it is cast to its dtype.
  """
  entries = list(entries)
  names = [entry.name for entry in entries]
  if len(set(names)) != len(names):
    raise ValueError(f"duplicate tensor names: {sorted({n for n in names if names.count(n) > 1})}")
  shards = _plan_shards(entries, max_shard_bytes)
  files = ([SINGLE] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  metadata = {"format": "pt", **(metadata or {})}
  if write:
    os.makedirs(out_dir, exist_ok=True)
  for file, shard in zip(files, shards):
    handle = open(os.path.join(out_dir, file), "wb") if write else None
    try:
      if handle:
        header = _header(shard, metadata)
        handle.write(len(header).to_bytes(8, "little") + header)
      for entry in shard:
        array = entry.produce()
        if handle:
          array = np.asarray(array)
          if tuple(array.shape) != tuple(entry.shape):
            raise ValueError(f"tensor {entry.name!r}: produced shape {array.shape}, "
                             f"planned {entry.shape}")
          array = np.ascontiguousarray(array.astype(entry.dtype, copy=False))
          handle.write(array.reshape(-1).view(np.uint8).data)  # no bytes copy
        del array
    finally:
      if handle:
        handle.close()
  if write and len(files) > 1:
    weight_map = {entry.name: file for file, shard in zip(files, shards) for entry in shard}
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
    with open(os.path.join(out_dir, INDEX), "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)
  if write and len(files) == 1 and os.path.exists(os.path.join(out_dir, INDEX)):
    os.remove(os.path.join(out_dir, INDEX))  # a stale index would shadow the single file
  return files
