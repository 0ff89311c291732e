"""Issue "Training data": determinism, round trip, resumable loader, rank split, bad input."""

import filecmp
import json
import lzma

import numpy as np
import pytest

from scalevec.cli import main
from scalevec.config import DataConfig
from scalevec.data.loader import Loader, TokenWindows, check_compatible, validation_batches, validation_windows
from scalevec.data.prepare import is_member, load_tokenizer, prepare, split_documents
from scalevec.data.references import reference_losses
from scalevec.data.sources import BUNDLED_SOURCES, CORPUS_DIR, DataError

SMALL = dict(sources=["moby_dick", "milton"], vocab_size=512)


def quiet(*_):
    pass


@pytest.mark.slow
def test_same_inputs_give_byte_identical_output(small_data, tmp_path):
    again = prepare(DataConfig(dir=str(tmp_path / "again"), **SMALL), progress=False, log=quiet)
    files = sorted(p.name for p in small_data.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    assert {"meta.json", "tokenizer.json", "train_000.bin", "val_000.bin"} <= set(files)
    match, mismatch, errors = filecmp.cmpfiles(small_data, again, files, shallow=False)
    assert mismatch == [] and errors == []
    meta = json.loads((small_data / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512
    assert meta["train"]["tokens"] == (small_data / "train_000.bin").stat().st_size // 2


def test_rerun_is_noop_and_changed_source_rebuilds(tmp_path):
    text = tmp_path / "user.txt"
    text.write_text("the cat sat on the mat. " * 200)
    other = tmp_path / "other.txt"
    other.write_text("a dog ran in the park. " * 200)
    data = DataConfig(dir=str(tmp_path / "out"), sources=[], inputs=[str(tmp_path / "*.txt")], vocab_size=300)
    messages = []
    prepare(data, progress=False, log=messages.append)
    meta_before = json.loads((tmp_path / "out" / "meta.json").read_text())
    prepare(data, progress=False, log=messages.append)
    assert messages[-1].endswith("is up to date")
    text.write_text("the cat sat on the mat. " * 300)
    prepare(data, progress=False, log=messages.append)
    meta_after = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert "is up to date" not in messages[-1]
    assert meta_after["fingerprint"] != meta_before["fingerprint"]
    assert meta_after["train"]["tokens"] + meta_after["val"]["tokens"] > meta_before["train"]["tokens"] + \
        meta_before["val"]["tokens"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_decode_encode_round_trips_every_source(small_data):
    tokenizer = load_tokenizer(small_data / "tokenizer.json")
    texts = ["Ünïcödé — “quotes”, emoji 🙂, tabs\tand\r\nCRLF, 漢字, trailing spaces   "]
    for name in BUNDLED_SOURCES:
        with lzma.open(CORPUS_DIR / f"{name}.jsonl.xz", "rt", encoding="utf-8") as fh:
            for _, line in zip(range(20), fh):
                texts.append(json.loads(line)["text"][:20000])
    for text, encoding in zip(texts, tokenizer.encode_batch(texts, add_special_tokens=False)):
        assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == text


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_loader_resumes_exactly_mid_epoch(small_data):
    windows = TokenWindows(small_data, "train", seq_len=64)
    steps_per_epoch = len(windows) // 8
    uninterrupted = batches(Loader(windows, 8, seed=3), steps_per_epoch + 5)
    first = Loader(windows, 8, seed=3)
    batches(first, steps_per_epoch - 2)
    state = first.state_dict()
    resumed = Loader(windows, 8, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    for (x, y), (rx, ry) in zip(uninterrupted[steps_per_epoch - 2:], batches(resumed, 7)):  # crosses an epoch
        assert np.array_equal(x, rx) and np.array_equal(y, ry)
    x, y = uninterrupted[0]
    assert x.shape == (8, 64) and np.array_equal(x[:, 1:], y[:, :-1])
    other_seed = Loader(windows, 8, seed=4).next_batch()[0]
    assert not np.array_equal(other_seed, x)


def test_loader_refuses_state_of_another_setup(small_data):
    """Another seed is refused; another world size is not (the position is global: elastic resume)."""
    windows = TokenWindows(small_data, "train", seq_len=64)
    state = Loader(windows, 4, seed=3, rank=0, world_size=2).state_dict()
    with pytest.raises(DataError, match="seed=3"):
        Loader(windows, 4, seed=4).load_state_dict(state)
    one_rank = Loader(windows, 8, seed=3)
    one_rank.load_state_dict(state)
    assert one_rank.position == state["position"]


def test_two_ranks_see_every_window_once_per_epoch(small_data):
    windows = TokenWindows(small_data, "train", seq_len=64)
    ranks = [Loader(windows, 1, seed=1, rank=r, world_size=2) for r in range(2)]
    per_rank = ranks[0].per_rank
    seen = [[loader.window_index(p) for p in range(per_rank)] for loader in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 2 * per_rank >= len(windows) - 1
    assert len(set(seen[0])) == per_rank
    # the data behind the indices: windows are disjoint token ranges
    assert ranks[0].next_batch()[0].shape == (1, 64)


def test_validation_budget_is_fixed_and_split_by_rank(small_data):
    windows = TokenWindows(small_data, "val", seq_len=32)
    assert len(windows) >= 8
    full = np.concatenate([x for _, x, _ in validation_batches(windows, 3, budget_tokens=33 * 8)])
    assert full.shape == (8, 32)
    halves = [np.concatenate([x for _, x, _ in validation_batches(windows, 3, 33 * 8, r, 2)]) for r in range(2)]
    assert sorted(map(bytes, full)) == sorted(map(bytes, np.concatenate(halves)))


def test_split_is_stratified_by_source():
    # source a: 10 documents, b: 3, c and d: one each (pooled)
    files = [("a", 10), ("b", 3), ("c", 1), ("d", 1)]
    sources = ["a"] * 10 + ["b"] * 3 + ["c", "d"]
    sizes = [100] * 10 + [50, 60, 70] + [30, 40]
    val = split_documents(files, sizes, 0.2, seed=0)
    assert sum(sizes[i] for i in val if sources[i] == "a") == 200  # a fifth of a's text
    assert len([i for i in val if sources[i] == "b"]) == 1  # at least one document, never all
    assert len([i for i in val if sources[i] in "cd"]) == 1  # c and d split as one pool
    assert np.array_equal(val, split_documents(files, sizes, 0.2, seed=0)) and np.all(np.diff(val) > 0)
    assert len(split_documents(files, sizes, 0.0, seed=0)) == 0
    numbers = np.arange(len(sizes))
    assert np.array_equal(is_member(numbers, val), np.isin(numbers, val))
    assert not is_member(numbers, split_documents(files, sizes, 0.0, seed=0)).any()


def test_validation_windows_cover_every_source_in_proportion(tmp_path):
    data = DataConfig(dir=str(tmp_path / "d"), sources=["moby_dick", "milton", "kjv_bible"], vocab_size=512,
                      val_fraction=0.05)
    out = prepare(data, progress=False, log=lambda *_: None)
    meta = json.loads((out / "meta.json").read_text())
    for split in ("train", "val"):
        spans = meta[split]["sources"]
        assert [s["name"] for s in spans] == ["moby_dick", "milton", "kjv_bible"]  # the order of data.sources
        assert sum(s["tokens"] for s in spans) == meta[split]["tokens"]
        assert sum(s["bytes"] for s in spans) == meta[split]["bytes"]
    windows = TokenWindows(out, "val", seq_len=64)
    # a window's source is where its first token lies
    ends = np.cumsum([s["tokens"] for s in meta["val"]["sources"]])
    for i in range(0, len(windows), 7):
        start = i * 65  # one shard
        assert windows.source(i) == meta["val"]["sources"][int(np.searchsorted(ends, start, side="right"))]["name"]
    chosen = validation_windows(windows, 65 * 60)
    assert chosen == sorted(set(chosen)) and len(chosen) <= 60 + 3
    counts = {name: sum(windows.source(i) == name for i in chosen) for name in ("kjv_bible", "milton", "moby_dick")}
    train = {s["name"]: s["tokens"] / meta["train"]["tokens"] for s in meta["train"]["sources"]}
    for name, count in counts.items():
        assert count >= 1
        available = sum(windows.source(i) == name for i in range(len(windows)))
        assert count == min(available, max(1, round(60 * train[name])))
    assert validation_windows(windows, 10**9) == list(range(len(windows)))


def test_count_references_match_a_direct_computation(small_data):
    refs = reference_losses(small_data, 32, 33 * 40)
    train = TokenWindows(small_data, "train", 32)
    stream = np.concatenate([np.asarray(s) for s in train.shards]).astype(np.int64)
    vocab = train.meta["vocab_size"]
    counts = np.bincount(stream, minlength=vocab)
    unigram = (counts + 0.5) / (len(stream) + 0.5 * vocab)
    pairs = np.zeros((vocab, vocab))
    np.add.at(pairs, (stream[:-1], stream[1:]), 1)
    k = refs["bigram_smoothing"]
    bigram = (pairs + k * unigram[None, :]) / (pairs.sum(1, keepdims=True) + k)
    val = TokenWindows(small_data, "val", 32)
    chosen = np.stack([val.get(i) for i in validation_windows(val, 33 * 40)]).astype(np.int64)
    assert refs["windows"] == len(chosen)
    np.testing.assert_allclose(refs["unigram"]["loss"], -np.log(unigram[chosen[:, 1:]]).mean(), rtol=1e-12)
    np.testing.assert_allclose(refs["bigram"]["loss"], -np.log(bigram[chosen[:, :-1], chosen[:, 1:]]).mean(),
                               rtol=1e-12)
    assert refs["bigram"]["loss"] < refs["unigram"]["loss"]
    assert set(refs["bigram"]["by_source"]) <= {"moby_dick", "milton"}


@pytest.mark.parametrize("make, kwargs, message", [
    (lambda d: None, dict(inputs=["{d}/missing.txt"]), "matches no file"),
    (lambda d: (d / "empty.txt").write_text(""), dict(inputs=["{d}/empty.txt"]), "holds no text"),
    (lambda d: (d / "bad.txt").write_bytes(b"abc\xff\xfe"), dict(inputs=["{d}/bad.txt"]), "not valid UTF-8"),
    (lambda d: (d / "x.jsonl").write_text('{"body": "hi"}\n'), dict(inputs=["{d}/x.jsonl"]), "no field 'text'"),
    (lambda d: (d / "x.csv").write_text("a,b"), dict(inputs=["{d}/x.csv"]), "unsupported type"),
    (lambda d: None, dict(sources=["klingon"]), "unknown bundled source"),
    (lambda d: (d / "tok.json").write_text("{}"), dict(sources=["milton"], tokenizer="{d}/tok.json"),
     "cannot load tokenizer"),
])
def test_bad_input_is_one_error_and_leaves_nothing(tmp_path, make, kwargs, message):
    make(tmp_path)
    kwargs = {k: [v.format(d=tmp_path) for v in val] if isinstance(val, list) else val.format(d=tmp_path)
              for k, val in kwargs.items()}
    kwargs.setdefault("sources", [])
    before = set(tmp_path.iterdir())
    with pytest.raises(DataError, match=message):
        prepare(DataConfig(dir=str(tmp_path / "out"), vocab_size=300, **kwargs), progress=False, log=quiet)
    assert set(tmp_path.iterdir()) - before <= {tmp_path / ".out.lock"}


def test_existing_output_survives_a_failed_rebuild(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"document number {i} " * 30}) for i in range(10)))
    data = DataConfig(dir=str(tmp_path / "out"), sources=[], inputs=[str(good)], vocab_size=300)
    prepare(data, progress=False, log=quiet)
    snapshot = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    good.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=":2 has no field"):
        prepare(data, progress=False, log=quiet)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == snapshot


def test_run_checks_tokenizer_and_vocab(small_data, tmp_path):
    windows = TokenWindows(small_data, "train", seq_len=16)
    check_compatible(windows, str(small_data / "tokenizer.json"), model_vocab=512)
    other = tmp_path / "other.json"
    other.write_text((small_data / "tokenizer.json").read_text().replace('"<|endoftext|>"', '"<|end|>"'))
    with pytest.raises(DataError, match="another tokenizer"):
        check_compatible(windows, str(other), model_vocab=512)
    with pytest.raises(DataError, match="larger than model.vocab_size=256"):
        check_compatible(windows, "", model_vocab=256)


def test_cli_bad_input_exit_2(tmp_path, capsys):
    assert main(["data", "prepare", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scalevec: error: input") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_user_jsonl_field_and_directory(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(json.dumps({"body": f"text {i} " * 40}) for i in range(6)))
    (tmp_path / "in" / "b.txt").write_text("plain text file " * 50)
    data = DataConfig(dir=str(tmp_path / "out"), sources=[], inputs=[str(tmp_path / "in")], jsonl_field="body",
                      vocab_size=300, val_fraction=0.2)
    meta = json.loads((prepare(data, progress=False, log=quiet) / "meta.json").read_text())
    assert [s["documents"] for s in meta["sources"]] == [6, 1]
    assert meta["train"]["documents"] + meta["val"]["documents"] == 7 and meta["val"]["documents"] >= 1


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [f"parquet row {i} " * 30 for i in range(8)], "n": list(range(8))}),
                   tmp_path / "t.parquet")
    data = DataConfig(dir=str(tmp_path / "out"), sources=[], inputs=[str(tmp_path / "t.parquet")],
                      parquet_column="body", vocab_size=300)
    meta = json.loads((prepare(data, progress=False, log=quiet) / "meta.json").read_text())
    assert meta["sources"][0]["documents"] == 8
    with pytest.raises(DataError, match="no column 'text'"):
        prepare(DataConfig(dir=str(tmp_path / "o2"), sources=[], inputs=[str(tmp_path / "t.parquet")], vocab_size=300),
                progress=False, log=quiet)


def test_truncated_shard_is_reported(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("some words to tokenize here. " * 400)
    out = prepare(DataConfig(dir=str(tmp_path / "out"), sources=[], inputs=[str(text)], vocab_size=300,
                             val_fraction=0), progress=False, log=quiet)
    shard = out / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match="train_000.bin is missing or not"):
        TokenWindows(out, "train", seq_len=16)


def test_small_shards_hold_the_same_tokens(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("shards split a long token stream into files. " * 500)
    one = prepare(DataConfig(dir=str(tmp_path / "one"), sources=[], inputs=[str(text)], vocab_size=300,
                             val_fraction=0), progress=False, log=quiet)
    many = prepare(DataConfig(dir=str(tmp_path / "many"), sources=[], inputs=[str(text)], vocab_size=300,
                              val_fraction=0, shard_tokens=1000), progress=False, log=quiet)
    meta = json.loads((many / "meta.json").read_text())
    assert len(meta["train"]["shards"]) > 2 and all(s["tokens"] <= 1000 for s in meta["train"]["shards"])
    joined = np.concatenate([np.fromfile(many / s["file"], dtype=np.uint16) for s in meta["train"]["shards"]])
    assert np.array_equal(joined, np.fromfile(one / "train_000.bin", dtype=np.uint16))
    windows = TokenWindows(many, "train", seq_len=99)
    assert len(windows) == sum(s["tokens"] // 100 for s in meta["train"]["shards"])
    assert windows.batch(range(len(windows)))[0].shape == (len(windows), 99)
