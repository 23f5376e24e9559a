"""Byte-level language-model data: corpus loading, splits and grain pipelines.

Tokens are bytes (vocab 256). A corpus is a list of UTF-8 text files, either
the user's (`config.data.path`) or, by default, the running Python's standard
library sources. Files are concatenated with `SEPARATOR` into one uint8 array
per split.

Train pipeline (`make_train_dataset`): each epoch cuts the train split into
non-overlapping windows of `seq_len + 1` tokens starting at a per-epoch random
offset, visits them in a per-epoch shuffled order, and repeats forever. Both
offset and order are pure functions of (seed, epoch), so a grain iterator state
(`{"next_index": k}`, JSON-serialisable) is enough to resume exactly.

Multi-host sharding: the global example stream is dealt round-robin. Host `h`
of `H` takes stream elements `h, h + H, h + 2H, ...`, so its k-th batch (of
the per-host `batch_size` B) holds global elements `(k*B + i)*H + h`. Together
the hosts' k-th batches are exactly the global batch of stream elements
`[k*B*H, (k+1)*B*H)`: disjoint, and independent of H up to the interleaving.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import os
import pathlib
import sys
import sysconfig
import zlib
from typing import Any

import grain
import numpy as np

from moe_jax.config_fields import Checked, ConfigError, require

VOCAB_SIZE = 256
SEPARATOR = b"\n\n"
_EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class DataConfig(Checked):
  """``config.data``."""
  path: str = ""                  # a UTF-8 text file or a directory of them; '' = stdlib sources
  max_bytes: int = 4_000_000      # read at most this much; <= 0: no limit
  heldout_permille: int = 50      # share of files (or bytes) held out for evaluation
  seq_len: int = 128
  batch_size: int = 16            # global, over all hosts

  def validate(self) -> None:
    super().validate()
    require(0 < self.heldout_permille < 1000, "heldout_permille", self.heldout_permille,
            "an integer in [1, 999]")
    require(self.seq_len >= 1, "seq_len", self.seq_len, "an integer >= 1")
    require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")


# ---------------------------------------------------------------- tokenizer


def encode(text: str | bytes) -> np.ndarray:
  """UTF-8 bytes of `text` as a uint8 token array."""
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  return np.frombuffer(data, dtype=np.uint8).copy()


def decode(tokens: Any) -> str:
  """Inverse of `encode`; invalid UTF-8 (e.g. sampled bytes) is replaced."""
  data = np.asarray(tokens).astype(np.uint8).tobytes()
  return data.decode("utf-8", errors="replace")


def unigram_entropy_bits(tokens: Any) -> float:
  """Entropy (bits/byte) of the byte histogram; a context-free baseline."""
  tokens = np.asarray(tokens).reshape(-1)
  if tokens.size == 0:
    return 0.0
  counts = np.bincount(tokens.astype(np.int64), minlength=VOCAB_SIZE)
  p = counts[counts > 0] / tokens.size
  return float(max(0.0, -np.sum(p * np.log2(p))))


def bits_per_byte(mean_nats_per_token: Any) -> Any:
  """Cross-entropy in nats/token -> bits/byte (one token is one byte)."""
  return mean_nats_per_token / math.log(2)


# ------------------------------------------------------------ corpus files


def _read_text(path: pathlib.Path) -> bytes | None:
  """File bytes, or None when it is not UTF-8 text (or contains NUL)."""
  try:
    data = path.read_bytes()
    data.decode("utf-8")
  except (OSError, UnicodeDecodeError):
    return None
  return None if b"\0" in data else data


def _collect(
    root: pathlib.Path, rel_paths: list[str], max_bytes: int
) -> list[tuple[str, bytes]]:
  """Reads `rel_paths` in order, skipping non-text, until `max_bytes` total.

  The last file is truncated so the total is exactly `max_bytes` (when the
  files have that much). `max_bytes <= 0` means no limit.
  """
  out, total = [], 0
  for rel in rel_paths:
    if 0 < max_bytes <= total:
      break
    data = _read_text(root / rel)
    if not data:
      continue
    if max_bytes > 0:
      data = data[: max_bytes - total]
    out.append((rel, data))
    total += len(data)
  return out


def _stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _stdlib_rel_paths(root: pathlib.Path) -> list[str]:
  rels = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_STDLIB_DIRS]
    rel_dir = pathlib.Path(dirpath).relative_to(root)
    rels.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
  return sorted(rels)


def _user_rel_paths(root: pathlib.Path) -> list[str]:
  """Regular files under `root`, recursively, sorted; hidden entries skipped."""
  rels = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    rel_dir = pathlib.Path(dirpath).relative_to(root)
    rels.extend(
        (rel_dir / f).as_posix()
        for f in filenames
        if not f.startswith(".") and os.path.isfile(os.path.join(dirpath, f)))
  return sorted(rels)


def default_corpus_files(max_bytes: int) -> list[pathlib.Path]:
  """The stdlib `*.py` files making up the default corpus, in corpus order.

  Sorted by path relative to the stdlib root; site-packages is excluded and
  files that are not UTF-8 text are skipped. Selection stops once `max_bytes`
  are collected (the last file may be used only in part).
  """
  root = _stdlib_root()
  return [root / rel for rel, _ in _collect(root, _stdlib_rel_paths(root), max_bytes)]


# ------------------------------------------------------------------ corpus


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  """Train / held-out byte arrays (uint8) and where they came from."""
  train: np.ndarray
  heldout: np.ndarray
  source: str
  train_files: int
  heldout_files: int
  split_by: str  # "file" (hash of relative path) or "bytes" (tail held out).

  @property
  def description(self) -> str:
    return (f"{self.source}; split by {self.split_by}: "
            f"train {self.train.size:,} bytes / {self.train_files} files, "
            f"held-out {self.heldout.size:,} bytes / {self.heldout_files} files")


def _field(cfg: Any, name: str, default: Any) -> Any:
  if isinstance(cfg, collections.abc.Mapping):
    return cfg.get(name, default)
  return getattr(cfg, name, default)


def _concat(parts: list[bytes]) -> np.ndarray:
  return np.frombuffer(SEPARATOR.join(parts), dtype=np.uint8).copy()


def _is_heldout(rel_path: str, heldout_permille: int) -> bool:
  return zlib.crc32(rel_path.encode("utf-8")) % 1000 < heldout_permille


def _split_by_file(files, heldout_permille):
  train = [d for rel, d in files if not _is_heldout(rel, heldout_permille)]
  heldout = [d for rel, d in files if _is_heldout(rel, heldout_permille)]
  return _concat(train), _concat(heldout), len(train), len(heldout)


def _file_split_ok(split, heldout_permille: int, min_bytes: int) -> bool:
  """Both sides usable, and held-out not swollen by a few large files."""
  train, heldout = split[0].size, split[1].size
  max_share = min(0.5, 3 * heldout_permille / 1000)
  return min(train, heldout) >= min_bytes and heldout <= max_share * (train + heldout)


def _split_by_bytes(files, heldout_permille, min_bytes):
  """Holds out the last `heldout_permille`/1000 (>= min_bytes) of the bytes."""
  everything = _concat([d for _, d in files])
  n_heldout = max(min_bytes, everything.size * heldout_permille // 1000)
  cut = everything.size - n_heldout
  # Files overlapping each side, for reporting only.
  ends = np.cumsum([len(d) + len(SEPARATOR) for _, d in files]) - len(SEPARATOR)
  starts = ends - np.array([len(d) for _, d in files])
  train_files = int(np.sum(starts < cut))
  heldout_files = int(np.sum(ends > cut))
  return everything[:cut], everything[cut:], train_files, heldout_files


def _gather(path: str, max_bytes: int) -> tuple[list[tuple[str, bytes]], str, bool]:
  """(files, description, single_file) for `data.path` ('' = default corpus)."""
  if not path:
    root = _stdlib_root()
    files = _collect(root, _stdlib_rel_paths(root), max_bytes)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return files, f"Python {version} stdlib sources ({root})", False
  p = pathlib.Path(path).expanduser()
  if p.is_file():
    files = _collect(p.parent, [p.name], max_bytes)
    if not files:
      raise ConfigError(
          f"data.path={path!r}: the file is empty, not UTF-8 text, or contains "
          "NUL bytes; expected a UTF-8 text file or a directory of them.")
    return files, f"file {p}", True
  if p.is_dir():
    rels = _user_rel_paths(p)
    files = _collect(p, rels, max_bytes)
    if not files:
      raise ConfigError(
          f"data.path={path!r}: found {len(rels)} files under the directory and "
          "none is non-empty UTF-8 text without NUL bytes.")
    return files, f"directory {p}", False
  raise ConfigError(
      f"data.path={path!r} does not exist (expected a UTF-8 text file, a "
      "directory of them, or '' for the built-in stdlib corpus).")


def load_corpus(data_cfg: Any, seq_len: int | None = None) -> Corpus:
  """Loads and splits the corpus described by `data_cfg`.

  Args:
    data_cfg: ConfigDict / mapping / object with `path` (str; '' = default
      corpus), `max_bytes` (int; <= 0 = no limit; applies to user data too)
      and `heldout_permille` (int in [1, 999]).
    seq_len: defaults to `data_cfg.seq_len` when that field exists. If set,
      both splits must hold at least one window of `seq_len + 1` bytes.

  Files are held out by hash of their relative path. That split is replaced
  by the byte split (the tail of the concatenation is held out) for a single
  file, or when a side is shorter than one window, or when a few large files
  make the held-out share exceed min(50%, 3 * heldout_permille / 1000).

  Returns:
    The Corpus.

  Raises:
    ValueError: naming the offending `data.*` field when the path is missing,
      nothing usable was found, or a split is too small.
  """
  path = str(_field(data_cfg, "path", "") or "")
  seq_len = seq_len or _field(data_cfg, "seq_len", None)
  max_bytes = int(_field(data_cfg, "max_bytes", 0) or 0)
  heldout_permille = int(_field(data_cfg, "heldout_permille", 50))
  if not 0 < heldout_permille < 1000:
    raise ConfigError(
        f"data.heldout_permille={heldout_permille} must be in [1, 999].")
  files, source, single_file = _gather(path, max_bytes)
  total = sum(len(d) for _, d in files)
  min_bytes = (seq_len + 1) if seq_len else 1  # Needed by each split.
  needed = 2 * min_bytes
  if total < needed:
    raise ConfigError(
        f"data.path={path!r}: corpus too small, found {len(files)} files with "
        f"{total} bytes in total; need at least {needed} bytes (a window of "
        f"{min_bytes} bytes = seq_len + 1 for each split; see data.max_bytes).")
  source = f"{source}, {len(files)} files, {total:,} bytes"

  split_by, split = "file", None
  if not single_file:
    split = _split_by_file(files, heldout_permille)
  if split is None or not _file_split_ok(split, heldout_permille, min_bytes):
    split_by = "bytes"
    split = _split_by_bytes(files, heldout_permille, min_bytes)
  train, heldout, n_train, n_heldout = split
  return Corpus(train=train, heldout=heldout, source=source,
                train_files=n_train, heldout_files=n_heldout, split_by=split_by)


# ------------------------------------------------------------- pipelines


def _num_windows(num_tokens: int, seq_len: int) -> int:
  return (num_tokens - 1) // seq_len if num_tokens > 0 else 0


@functools.lru_cache(maxsize=256)
def _epoch_offset(seed: int, epoch: int, max_offset: int) -> int:
  rng = np.random.default_rng([seed, epoch])
  return int(rng.integers(0, max_offset + 1))


def _split_window(windows: np.ndarray) -> dict[str, np.ndarray]:
  return {"inputs": np.ascontiguousarray(windows[:, :-1]),
          "targets": np.ascontiguousarray(windows[:, 1:])}


def _check_shard(shard_index: int, shard_count: int) -> None:
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index ({shard_index}) < shard_count "
                     f"({shard_count}).")


def _split_windows(tokens, seq_len: int, shard_index: int, shard_count: int, split: str,
                   advice: str) -> tuple[np.ndarray, int]:
  """The split as uint8 and its number of windows; raises if it holds none."""
  _check_shard(shard_index, shard_count)
  tokens = np.asarray(tokens, dtype=np.uint8)
  n = _num_windows(tokens.size, seq_len)
  if n < 1:
    raise ConfigError(f"{split} split has {tokens.size} tokens, fewer than seq_len + 1 = "
                     f"{seq_len + 1}; {advice}.")
  return tokens, n


def make_train_dataset(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_threads: int = 0,
) -> grain.IterDataset:
  """Infinite, shuffled, host-sharded training batches as a grain IterDataset.

  `iter(ds)` yields {"inputs", "targets"}: int32 [batch_size, seq_len], with
  targets[:, t] == inputs[:, t + 1] along the window. `batch_size` is per host;
  see the module docstring for how hosts share the global stream. The
  iterator's `get_state()` is `{"next_index": k}` (k = batches consumed) and
  `set_state` on an iterator of an identically built dataset resumes exactly.

  `num_threads=0` reads in the calling thread (the data are already in memory,
  so threads only add GIL contention).
  """
  tokens, max_windows = _split_windows(
      tokens, seq_len, shard_index, shard_count, "train",
      "use more data (data.path / data.max_bytes)")
  # Give up one window per epoch so the start offset can take any of the
  # seq_len alignments (when there is only one window, whatever slack exists).
  windows_per_epoch = max(1, max_windows - 1)
  max_offset = min(seq_len - 1, tokens.size - 1 - windows_per_epoch * seq_len)
  seed = int(seed) % 2**32
  # Decorrelate neighbouring seeds: grain reshuffles epoch e with seed + e.
  shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])

  def window(stream_index: int, window_index: int) -> np.ndarray:
    epoch = stream_index // windows_per_epoch
    start = _epoch_offset(seed, epoch, max_offset) + window_index * seq_len
    return tokens[start:start + seq_len + 1].astype(np.int32)

  ds = (grain.MapDataset.range(windows_per_epoch)
        .shuffle(seed=shuffle_seed)
        .repeat(None)
        .map_with_index(window))
  if shard_count > 1:
    ds = ds.slice(slice(shard_index, None, shard_count))
  ds = ds.batch(batch_size, drop_remainder=True).map(_split_window)
  buffer = 0 if num_threads == 0 else 2 * num_threads
  return ds.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=buffer))


def make_eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> list[dict[str, np.ndarray]]:
  """Deterministic batches over the held-out split, with per-target ``weights``.

  Windows of seq_len + 1 tokens start every seq_len tokens, so each held-out
  byte after the first is a target at most once. With `max_batches` <= 0 every
  one of them is: the tail is padded with zero tokens of weight 0 to fill the
  last window and the last batch. Otherwise `max_batches` full batches of
  windows spread evenly over the split (so that a partial evaluation samples
  all of it, not its first files); when the split has fewer windows than one
  global batch, windows are repeated cyclically to fill a single batch (the
  mean loss then weights some windows more; fine for a tiny held-out set).
  With shard_count H > 1, host h takes windows h, h + H, ... of each global
  batch of batch_size * H windows.
  """
  if max_batches <= 0:
    return _whole_split_batches(tokens, seq_len, batch_size, shard_index, shard_count)
  tokens, n = _split_windows(
      tokens, seq_len, shard_index, shard_count, "held-out",
      "raise data.heldout_permille or add data (data.path)")
  global_batch = batch_size * shard_count
  num_batches = min(max(1, n // global_batch), max_batches)
  count = num_batches * global_batch
  idx = np.arange(count) % n if count >= n else np.arange(count) * n // count
  idx = idx.reshape(num_batches, batch_size, shard_count)[:, :, shard_index]
  starts = idx * seq_len
  windows = tokens[starts[..., None] + np.arange(seq_len + 1)].astype(np.int32)
  return [dict(_split_window(w), weights=np.ones((batch_size, seq_len), np.float32))
          for w in windows]


def _whole_split_batches(tokens, seq_len: int, batch_size: int, shard_index: int,
                         shard_count: int) -> list[dict[str, np.ndarray]]:
  _check_shard(shard_index, shard_count)
  tokens = np.asarray(tokens, dtype=np.uint8)
  num_targets = tokens.size - 1
  if num_targets < 1:
    raise ValueError(f"held-out split has {tokens.size} tokens; need at least 2.")
  global_batch = batch_size * shard_count
  num_windows = -(-num_targets // seq_len)
  num_batches = -(-num_windows // global_batch)
  total = num_batches * global_batch
  padded = np.zeros(total * seq_len + 1, np.int32)
  padded[:tokens.size] = tokens
  weights = (np.arange(total * seq_len) < num_targets).astype(np.float32)
  idx = np.arange(total).reshape(num_batches, batch_size, shard_count)[:, :, shard_index]
  offsets = idx[..., None] * seq_len + np.arange(seq_len + 1)
  return [dict(_split_window(w), weights=m[:, :-1])
          for w, m in zip(padded[offsets], weights[np.minimum(offsets, total * seq_len - 1)])]

