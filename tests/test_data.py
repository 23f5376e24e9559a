"""Tests for moe_jax.data: corpus loading, splits, grain pipelines."""

import json
import math
import zlib

import ml_collections
import numpy as np
import pytest

from moe_jax import data

SEQ_LEN = 16


def _cfg(path="", max_bytes=200_000, heldout_permille=50):
  return ml_collections.ConfigDict(
      dict(path=str(path), max_bytes=max_bytes,
           heldout_permille=heldout_permille))


def _text(i, n=300):
  rng = np.random.default_rng(i)
  return "".join(rng.choice(list("abcdefgh \n"), size=n))


def _write_tree(root, num_files=40):
  for i in range(num_files):
    sub = root / f"d{i % 3}"
    sub.mkdir(exist_ok=True)
    (sub / f"f{i:03d}.txt").write_text(_text(i))


# ------------------------------------------------------------- tokenizer


def test_encode_decode_round_trip():
  tokens = data.encode("héllo")
  assert tokens.dtype == np.uint8
  assert tokens.tolist() == list("héllo".encode("utf-8"))
  assert data.decode(tokens) == "héllo"
  assert data.VOCAB_SIZE == 256


def test_unigram_entropy_hand_cases():
  assert data.unigram_entropy_bits(data.encode("aabb")) == pytest.approx(1.0)
  assert data.unigram_entropy_bits(data.encode("aaaa")) == 0.0
  assert data.unigram_entropy_bits(np.arange(256, dtype=np.uint8)) == (
      pytest.approx(8.0))


def test_bits_per_byte():
  assert data.bits_per_byte(math.log(2)) == pytest.approx(1.0)
  assert data.bits_per_byte(0.0) == 0.0


# --------------------------------------------------------- default corpus


def test_default_corpus_files_deterministic_and_bounded():
  first = data.default_corpus_files(100_000)
  assert first == data.default_corpus_files(100_000)
  assert first and all(p.suffix == ".py" for p in first)
  assert not any("site-packages" in p.parts for p in first)
  root = data._stdlib_root()  # pylint: disable=protected-access
  rels = [p.relative_to(root).as_posix() for p in first]
  assert rels == sorted(rels)
  # Fewer bytes select a prefix of the same list.
  assert data.default_corpus_files(20_000) == first[:len(
      data.default_corpus_files(20_000))]


def test_default_corpus_split():
  cfg = _cfg(max_bytes=400_000)
  corpus = data.load_corpus(cfg, seq_len=SEQ_LEN)
  assert corpus.train.dtype == np.uint8 and corpus.heldout.dtype == np.uint8
  assert corpus.train.size > SEQ_LEN and corpus.heldout.size > SEQ_LEN
  assert corpus.train_files > 0 and corpus.heldout_files > 0
  num_files = len(data.default_corpus_files(400_000))
  separators = len(data.SEPARATOR) * (num_files - 1)
  assert 400_000 <= corpus.train.size + corpus.heldout.size <= (
      400_000 + separators)
  again = data.load_corpus(cfg, seq_len=SEQ_LEN)
  np.testing.assert_array_equal(corpus.train, again.train)
  np.testing.assert_array_equal(corpus.heldout, again.heldout)
  assert "stdlib" in corpus.source and "split by" in corpus.description


def test_config_may_be_a_plain_dict():
  corpus = data.load_corpus(
      {"path": "", "max_bytes": 50_000, "heldout_permille": 100})
  assert corpus.train.size > 0 and corpus.heldout.size > 0


# ------------------------------------------------------------- user data


def test_user_directory_split_is_disjoint_by_file(tmp_path):
  _write_tree(tmp_path)
  permille = 250
  corpus = data.load_corpus(_cfg(tmp_path, 0, permille), seq_len=SEQ_LEN)
  assert corpus.split_by == "file"
  rels = sorted(p.relative_to(tmp_path).as_posix()
                for p in tmp_path.rglob("*.txt"))
  held = [r for r in rels if zlib.crc32(r.encode()) % 1000 < permille]
  train = [r for r in rels if r not in held]
  assert held and train
  assert (corpus.train_files, corpus.heldout_files) == (len(train), len(held))
  expected_heldout = b"\n\n".join((tmp_path / r).read_bytes() for r in held)
  assert corpus.heldout.tobytes() == expected_heldout
  expected_train = b"\n\n".join((tmp_path / r).read_bytes() for r in train)
  assert corpus.train.tobytes() == expected_train


def test_user_directory_skips_binary_and_non_utf8(tmp_path):
  (tmp_path / "good.txt").write_text("hello world\n" * 50)
  (tmp_path / "nul.bin").write_bytes(b"abc\0def" * 50)
  (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
  (tmp_path / ".hidden").write_text("secret " * 100)
  corpus = data.load_corpus(_cfg(tmp_path), seq_len=SEQ_LEN)
  everything = corpus.train.tobytes() + corpus.heldout.tobytes()
  assert everything == (b"hello world\n" * 50)
  # One file: the fallback splits its bytes.
  assert corpus.split_by == "bytes"


def test_user_single_file_split_by_bytes(tmp_path):
  path = tmp_path / "book.txt"
  path.write_text(_text(0, 2000))
  corpus = data.load_corpus(_cfg(path, 0, 100), seq_len=SEQ_LEN)
  assert corpus.split_by == "bytes"
  assert corpus.heldout.size == 200
  assert corpus.train.tobytes() + corpus.heldout.tobytes() == path.read_bytes()


def test_max_bytes_applies_to_user_data(tmp_path):
  path = tmp_path / "book.txt"
  path.write_text(_text(0, 2000))
  corpus = data.load_corpus(_cfg(path, 1000, 100))
  assert corpus.train.size + corpus.heldout.size == 1000


@pytest.mark.parametrize("heldout_size", [1, 20_000])
def test_unbalanced_file_split_falls_back_to_byte_split(tmp_path, heldout_size):
  # The files that hash to held-out are too small for a window / too large.
  for i in range(30):
    name = f"f{i}.txt"
    held = zlib.crc32(name.encode()) % 1000 < 100
    (tmp_path / name).write_text(_text(i, heldout_size if held else 300))
  corpus = data.load_corpus(_cfg(tmp_path, 0, 100), seq_len=SEQ_LEN)
  assert corpus.split_by == "bytes"
  total = corpus.train.size + corpus.heldout.size
  assert corpus.heldout.size == max(SEQ_LEN + 1, total // 10)


@pytest.mark.parametrize("make", ["empty_dir", "binary_only", "tiny_file"])
def test_empty_corpus_names_data_path(tmp_path, make):
  if make == "binary_only":
    (tmp_path / "x.bin").write_bytes(bytes(range(256)))
  elif make == "tiny_file":
    (tmp_path / "x.txt").write_text("short")
  with pytest.raises(ValueError, match=r"data\.path") as info:
    data.load_corpus(_cfg(tmp_path), seq_len=SEQ_LEN)
  assert "found" in str(info.value)


def test_seq_len_read_from_data_config(tmp_path):
  (tmp_path / "x.txt").write_text("y" * 100)
  cfg = _cfg(tmp_path)
  cfg.seq_len = 64  # Needs 2 * 65 bytes.
  with pytest.raises(ValueError, match=r"data\.path.*100 bytes"):
    data.load_corpus(cfg)


def test_missing_path_names_data_path(tmp_path):
  with pytest.raises(ValueError, match=r"data\.path.*does not exist"):
    data.load_corpus(_cfg(tmp_path / "nope"))


def test_bad_heldout_permille():
  with pytest.raises(ValueError, match=r"data\.heldout_permille"):
    data.load_corpus(_cfg(heldout_permille=0))


# --------------------------------------------------------------- pipelines


def _tokens(n=5000, seed=0):
  return np.random.default_rng(seed).integers(0, 256, n).astype(np.uint8)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["targets"], b["targets"])


def _window_starts(tokens, inputs):
  """Start offset of each input row in `tokens` (rows are unique here)."""
  index = {tokens[s:s + inputs.shape[1]].tobytes(): s
           for s in range(tokens.size - inputs.shape[1])}
  return [index[row.astype(np.uint8).tobytes()] for row in inputs]


def test_train_batches_shapes_and_shift():
  tokens = _tokens()
  batch = next(iter(data.make_train_dataset(tokens, SEQ_LEN, 4, seed=0)))
  assert set(batch) == {"inputs", "targets"}
  for v in batch.values():
    assert v.shape == (4, SEQ_LEN) and v.dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:],
                                batch["targets"][:, :-1])
  for row, start in zip(batch["targets"],
                        _window_starts(tokens, batch["inputs"])):
    np.testing.assert_array_equal(row, tokens[start + 1:start + SEQ_LEN + 1])


def test_train_epochs_cover_windows_and_reshuffle():
  tokens = _tokens(20 * SEQ_LEN + 1)
  per_epoch = 19  # One window is given up for the random offset.
  it = iter(data.make_train_dataset(tokens, SEQ_LEN, 1, seed=3))
  epochs = [_window_starts(tokens, np.concatenate(
      [b["inputs"] for b in _take(it, per_epoch)])) for _ in range(4)]
  for starts in epochs:
    offset = starts[0] % SEQ_LEN
    assert all(s % SEQ_LEN == offset for s in starts)  # Non-overlapping.
    assert len(set(starts)) == per_epoch
  assert len({tuple(s) for s in epochs}) == 4  # Reshuffled / realigned.


def test_train_is_deterministic_and_seed_dependent():
  tokens = _tokens()
  make = lambda seed: _take(
      iter(data.make_train_dataset(tokens, SEQ_LEN, 4, seed)), 3)
  _assert_same(make(1), make(1))
  assert not np.array_equal(make(1)[0]["inputs"], make(2)[0]["inputs"])


def test_iterator_state_round_trip():
  tokens = _tokens()
  ds = data.make_train_dataset(tokens, SEQ_LEN, 4, seed=7)
  it = iter(ds)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable.
  expected = _take(it, 3)
  fresh = iter(data.make_train_dataset(tokens, SEQ_LEN, 4, seed=7))
  fresh.set_state(state)
  _assert_same(_take(fresh, 3), expected)


def test_shards_are_disjoint_and_form_the_global_batch():
  tokens = _tokens(200 * SEQ_LEN + 1)
  global_batches = _take(iter(data.make_train_dataset(
      tokens, SEQ_LEN, 8, seed=5)), 3)
  shards = [_take(iter(data.make_train_dataset(
      tokens, SEQ_LEN, 4, seed=5, shard_index=h, shard_count=2)), 3)
            for h in range(2)]
  for k in range(3):
    a, b = shards[0][k]["inputs"], shards[1][k]["inputs"]
    assert not {r.tobytes() for r in a} & {r.tobytes() for r in b}
    # Host h holds elements h, h + 2, ... of the global batch.
    merged = np.stack([a, b], axis=1).reshape(8, SEQ_LEN)
    np.testing.assert_array_equal(merged, global_batches[k]["inputs"])


def test_train_rejects_too_few_tokens():
  with pytest.raises(ValueError, match="seq_len"):
    data.make_train_dataset(_tokens(SEQ_LEN), SEQ_LEN, 2, seed=0)


def test_eval_batches_deterministic_sequential():
  tokens = _tokens(10 * SEQ_LEN + 1)
  batches = data.make_eval_batches(tokens, SEQ_LEN, 3, max_batches=10)
  assert len(batches) == 3  # 10 windows -> 3 full batches.
  _assert_same(batches, data.make_eval_batches(tokens, SEQ_LEN, 3, 10))
  flat = np.concatenate([b["targets"] for b in batches]).reshape(-1)
  np.testing.assert_array_equal(flat, tokens[1:9 * SEQ_LEN + 1])
  assert len(data.make_eval_batches(tokens, SEQ_LEN, 3, max_batches=2)) == 2
  sharded = [data.make_eval_batches(tokens, SEQ_LEN, 1, 10, h, 3)
             for h in range(3)]
  for k, batch in enumerate(batches):
    np.testing.assert_array_equal(
        batch["inputs"], np.concatenate([s[k]["inputs"] for s in sharded]))


def test_eval_batches_small_heldout():
  tokens = _tokens(2 * SEQ_LEN + 1)  # Two windows, batch of 4.
  (batch,) = data.make_eval_batches(tokens, SEQ_LEN, 4, max_batches=5)
  assert batch["inputs"].shape == (4, SEQ_LEN)
  with pytest.raises(ValueError, match=r"data\.heldout_permille"):
    data.make_eval_batches(_tokens(SEQ_LEN), SEQ_LEN, 4, max_batches=5)


@pytest.mark.parametrize("shards", [1, 3])
def test_eval_batches_zero_cover_every_heldout_target_once(shards):
  tokens = np.random.default_rng(0).integers(0, 256, size=1000).astype(np.uint8)
  per_host = [data.make_eval_batches(tokens, SEQ_LEN, 4, 0, h, shards) for h in range(shards)]
  windows = {}   # global window index -> (inputs, targets, weights)
  for h, batches in enumerate(per_host):
    for k, batch in enumerate(batches):
      assert batch["weights"].shape == batch["targets"].shape == (4, SEQ_LEN)
      for r in range(4):
        windows[(k * 4 + r) * shards + h] = (batch["inputs"][r], batch["targets"][r],
                                             batch["weights"][r])
  ordered = [windows[i] for i in sorted(windows)]
  inputs = np.concatenate([x[w > 0] for x, _, w in ordered])
  targets = np.concatenate([t[w > 0] for _, t, w in ordered])
  np.testing.assert_array_equal(targets, tokens[1:])
  np.testing.assert_array_equal(inputs, tokens[:-1])


def test_partial_eval_samples_the_whole_split():
  tokens = _tokens(100 * SEQ_LEN + 1)
  (batch,) = data.make_eval_batches(tokens, SEQ_LEN, 4, max_batches=1)
  starts = [int(np.flatnonzero(np.all(
      np.lib.stride_tricks.sliding_window_view(tokens, SEQ_LEN) == row, axis=1))[0])
            for row in batch["inputs"]]
  assert starts == [0, 25 * SEQ_LEN, 50 * SEQ_LEN, 75 * SEQ_LEN]
