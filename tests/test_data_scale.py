"""Issue "Data at cluster scale": same output as before, parts, resume after SIGKILL, token import, bad records."""

import hashlib
import json
import lzma
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scalevec.cli import main
from scalevec.config import DataConfig
from scalevec.data.loader import TokenWindows
from scalevec.data.prepare import END_OF_TEXT, prepare, train_tokenizer
from scalevec.data.progress import Progress
from scalevec.data.sources import CORPUS_DIR, DataError
from scalevec.outputs import DirectoryLock, OutputError

SCALEVEC = [sys.executable, "-m", "scalevec"]
# `scalevec data prepare --vocab 1024` of the bundled prose before the streaming rewrite (and data/study-v1024)
BUNDLED_V1024 = {
    "meta.json": "55d1a5bd6cfb08cd115221dde643adba380ec3799117250b4e6a90e8006e39ef",
    "tokenizer.json": "15e6b9c83eec25271b06f5a42f314d8e0d4c9f3d48990cd3644b6c0284afa823",
    "train_000.bin": "45c923ac7c16623a3771a887a81d238e5158a35c60c01047762effaa0685dc38",
    "val_000.bin": "0d546df65775988a50680fe8bdd4a25304607f6e8ac6aba528869ece439ae707",
}


def quiet(*_):
    pass


def corpus(name: str) -> list[str]:
    with lzma.open(CORPUS_DIR / f"{name}.jsonl.xz", "rt", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def hashes(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    """A 300-id byte-level BPE, as a given tokenizer.json."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(corpus("moby_dick")[:40], 300, progress=False).save(str(path))
    return path


def test_bundled_preparation_is_byte_identical_to_before(tmp_path):
    # the default (vocab 8192) was checked the same way by hand: its four files match the pre-rewrite ones
    out = prepare(DataConfig(dir=str(tmp_path / "v1024"), vocab_size=1024), progress=False, log=quiet)
    assert hashes(out) == BUNDLED_V1024
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the work directory is gone


def test_three_parts_equal_one_process(tmp_path, tokenizer):
    texts = corpus("kjv_bible")[:240]
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", texts[:200])  # most of the bytes: both part boundaries fall inside it
    write_jsonl(tmp_path / "in" / "b.jsonl", texts[200:230])
    for i, text in enumerate(texts[230:]):
        (tmp_path / "in" / f"c{i}.txt").write_text(text)
    args = ["data", "prepare", "--input", str(tmp_path / "in"), "--tokenizer", str(tokenizer), "--set",
            "data.shard_tokens=3000", "--set", "data.val_fraction=0.05"]
    one = tmp_path / "one"
    assert main([*args, "--out", str(one), "--workers", "2"]) == 0
    parts = tmp_path / "parts"
    runs = [subprocess.Popen([*SCALEVEC, *args, "--out", str(parts), "--workers", "1", "--part", f"{i}/3"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    logs = [run.communicate(timeout=120)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], logs
    assert sum("wrote" in log for log in logs) == 1  # the last part to finish joined them
    assert hashes(parts) == hashes(one)
    meta = json.loads((one / "meta.json").read_text())
    assert len(meta["train"]["shards"]) > 3 and meta["val"]["tokens"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "big.jsonl", corpus("sotu")[:100])
    args = ["data", "prepare", "--input", str(source), "--tokenizer", str(tokenizer), "--set",
            "data.shard_tokens=20000", "--workers", "1"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    killed = tmp_path / "killed"
    run = subprocess.Popen([*SCALEVEC, *args, "--out", str(killed)], start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".killed.prepare-*/part-*/state.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGKILL)  # the preparation and its tokenizer workers
    run.wait()
    part = next(tmp_path.glob(".killed.prepare-*/part-*"))
    state = json.loads((part / "state.json").read_text())
    assert 0 < state["next"] < 100
    assert not killed.exists()  # nothing a loader could take for data
    with pytest.raises(DataError, match="no meta.json"):
        TokenWindows(killed, "train", seq_len=16)
    assert all(p.stat().st_size == 20000 * 2 for p in part.glob("*.bin"))  # a shard under its name is whole
    messages = []
    prepare(DataConfig(dir=str(killed), sources=[], inputs=[str(source)], tokenizer=str(tokenizer),
                       shard_tokens=20000), progress=False, log=messages.append, workers=1)
    assert any(re.match(r"resuming part 0/1 at document [1-9]", m) for m in messages), messages
    assert hashes(killed) == hashes(tmp_path / "ref")
    assert not list(tmp_path.glob(".killed.*"))


def test_a_part_running_elsewhere_is_refused_and_left_alone(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "t.jsonl", corpus("moby_dick")[:30])
    data = DataConfig(dir=str(tmp_path / "out"), sources=[], inputs=[str(source)], tokenizer=str(tokenizer))
    messages = []
    prepare(data, progress=False, log=messages.append, part=(0, 2), workers=1)
    assert messages[-1].startswith("part done; 1 of 2 parts still to finish") and not (tmp_path / "out").exists()
    work = next(tmp_path.glob(".out.prepare-*"))
    running = work / "part-00001-of-00002"
    running.mkdir()
    (running / "train.partial").write_bytes(b"tokens")
    with DirectoryLock(running, "a part"):  # as another process running part 1 holds it
        with pytest.raises(OutputError, match="in use by another scalevec process"):
            prepare(data, progress=False, log=quiet, part=(1, 2), workers=1)
        assert (running / "train.partial").read_bytes() == b"tokens"
        assert (work / "part-00000-of-00002" / "done.json").is_file()
    prepare(data, progress=False, log=messages.append, part=(1, 2), workers=1)
    assert messages[-1].startswith("wrote") and json.loads((tmp_path / "out" / "meta.json").read_text())
    assert not work.exists()


def nanogpt_files(directory: Path, tokenizer: Path) -> tuple[list[str], list[str]]:
    """nanoGPT's prepare.py: each document's ids then the end-of-text id, as flat uint16 train.bin and val.bin."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    eos = tok.token_to_id(END_OF_TEXT)
    texts = corpus("milton")[:3] + corpus("moby_dick")[40:60]
    train, val = texts[:-2], texts[-2:]
    for name, docs in (("train.bin", train), ("val.bin", val)):
        ids = [i for e in tok.encode_batch(docs, add_special_tokens=False) for i in [*e.ids, eos]]
        np.array(ids, dtype=np.uint16).tofile(directory / name)
    return train, val


def test_nanogpt_train_bin_imports_without_copying_and_trains(tmp_path, tokenizer, capsys):
    train, val = nanogpt_files(tmp_path, tokenizer)
    out = tmp_path / "imported"
    assert main(["data", "import", "--train", str(tmp_path / "train.bin"), "--val", str(tmp_path / "val.bin"),
                 "--tokenizer", str(tokenizer), "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert os.stat(out / "train_000.bin").st_ino == os.stat(tmp_path / "train.bin").st_ino  # hard-linked
    assert meta["imported"]["placed"] == ["hard-linked"]
    assert meta["train"]["documents"] == len(train) and meta["val"]["documents"] == len(val)
    assert meta["val"]["bytes"] == sum(len(t.encode()) for t in val)  # exact for byte-level BPE
    assert meta["train"]["tokens"] == (tmp_path / "train.bin").stat().st_size // 2
    assert main(["data", "import", "--train", str(tmp_path / "train.bin"), "--val", str(tmp_path / "val.bin"),
                 "--tokenizer", str(tokenizer), "--out", str(out)]) == 0
    assert "up to date" in capsys.readouterr().out

    train_briefly(out, tokenizer, tmp_path / "run")
    assert os.path.samefile(out / "train_000.bin", tmp_path / "train.bin")  # training left the arrays alone


def train_briefly(data_dir: Path, tokenizer: Path, run: Path) -> None:
    """Four steps of a tiny model on `data_dir`, evaluated at the end: a finite validation loss."""
    overrides = [f"data.dir={data_dir}", f"data.tokenizer={tokenizer}", "data.val_tokens=1024", "model.vocab_size=300",
                 "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64",
                 "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=4", "train.steps=4",
                 "train.eval_every=4", "train.threads=1", "schedule.warmup_steps=1"]
    assert main(["train", "cpu-0.5m", "--out", str(run), *[a for o in overrides for a in ("--set", o)]]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert evals and np.isfinite(evals[-1]["val_loss"]) and evals[-1]["val_bpb"] > 0


def test_import_checks_every_id(tmp_path, tokenizer):
    from scalevec.data.import_tokens import import_tokens

    nanogpt_files(tmp_path, tokenizer)
    tokens = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    tokens[1234] = 300  # one id past the 300-id vocabulary
    for name, save in (("bad.bin", tokens.tofile), ("bad.npy", lambda path: np.save(path, tokens))):
        save(tmp_path / name)
        with pytest.raises(DataError, match=rf"{name}: token 1,234 is id 300, outside the vocabulary .*300 ids"):
            import_tokens([str(tmp_path / name)], [str(tmp_path / "val.bin")], str(tokenizer), tmp_path / "o",
                          log=quiet)
        assert not (tmp_path / "o").exists()


def test_headerless_uint32_tokens_without_dtype_are_refused(tmp_path, tokenizer):
    """uint32 ids below 65,536 read as uint16 (the default for a small vocabulary) passed the id check as twice the
    tokens, every second one id 0: refused, naming --dtype; imported with --dtype uint32."""
    from scalevec.data.import_tokens import import_tokens

    nanogpt_files(tmp_path, tokenizer)
    np.fromfile(tmp_path / "train.bin", dtype=np.uint16).astype(np.uint32).tofile(tmp_path / "wide.bin")
    with pytest.raises(DataError, match="wide.bin: every second uint16 id is 0, as in uint32 tokens read as uint16; "
                                        "give --dtype uint32"):
        import_tokens([str(tmp_path / "wide.bin")], [str(tmp_path / "val.bin")], str(tokenizer), tmp_path / "o",
                      log=quiet)
    assert not (tmp_path / "o").exists()
    (tmp_path / "val.bin").unlink()  # one dtype for both splits
    np.fromfile(tmp_path / "train.bin", dtype=np.uint16)[:500].astype(np.uint32).tofile(tmp_path / "val.bin")
    out = import_tokens([str(tmp_path / "wide.bin")], [str(tmp_path / "val.bin")], str(tokenizer), tmp_path / "o",
                        dtype="uint32", log=quiet)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train"]["tokens"] == (tmp_path / "train.bin").stat().st_size // 2 and meta["dtype"] == "uint32"


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_npy_with_a_header_imports_at_its_offset_and_trains(tmp_path, tokenizer, dtype):
    from scalevec.data.import_tokens import import_tokens

    nanogpt_files(tmp_path, tokenizer)
    arrays = {}
    for split in ("train", "val"):
        arrays[split] = np.fromfile(tmp_path / f"{split}.bin", dtype=np.uint16).astype(dtype)
        np.save(tmp_path / f"{split}.npy", arrays[split])
        with open(tmp_path / f"{split}.npy", "rb") as fh:  # the tokens start past the header, not at byte 0
            assert fh.read(6) == b"\x93NUMPY" and (tmp_path / f"{split}.npy").stat().st_size > arrays[split].nbytes
    out = import_tokens([str(tmp_path / "train.npy")], [str(tmp_path / "val.npy")], str(tokenizer), tmp_path / "npy",
                        log=quiet)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == dtype and meta["imported"]["placed"] == ["hard-linked"]  # not copied
    for split, tokens in arrays.items():
        shard = meta[split]["shards"][0]
        assert (out / shard["file"]).stat().st_ino == (tmp_path / f"{split}.npy").stat().st_ino
        assert shard["offset"] == (tmp_path / f"{split}.npy").stat().st_size - tokens.nbytes  # past the header
        assert meta[split]["tokens"] == len(tokens)
        assert meta[split]["documents"] == int(np.count_nonzero(tokens == meta["eos_id"]))
        windows = TokenWindows(out, split, seq_len=31)
        assert np.array_equal(np.concatenate([windows.get(i) for i in range(len(windows))]),
                              tokens[:len(windows) * 32])
    from tokenizers import Tokenizer

    from scalevec.evaluate import read_input  # `scalevec eval --data` reads the same tokens

    evaluated, _, _ = read_input(out, Tokenizer.from_file(str(tokenizer)), tokenizer, meta["eos_id"], "text", "text")
    assert np.array_equal(evaluated, arrays["val"])
    train_briefly(out, tokenizer, tmp_path / "run")


def test_bad_jsonl_line_errors_or_is_skipped(tmp_path, tokenizer):
    texts = corpus("moby_dick")[:12]
    lines = [json.dumps({"text": t}) for t in texts]
    lines.insert(4, '{"text": "cut off')
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    data = DataConfig(dir=str(tmp_path / "out"), sources=[], inputs=[str(tmp_path / "bad.jsonl")],
                      tokenizer=str(tokenizer))
    with pytest.raises(DataError, match=r"bad.jsonl:5 is not valid JSON; .*data.on_bad_record=skip"):
        prepare(data, progress=False, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
    data.on_bad_record = "skip"
    meta = json.loads((prepare(data, progress=False, log=quiet) / "meta.json").read_text())
    assert meta["skipped_records"] == 1
    assert meta["skipped_examples"] == [f"{tmp_path / 'bad.jsonl'}:5 is not valid JSON"]
    assert meta["sources"][0]["documents"] == len(texts)


def test_unreadable_parquet_row_group_errors_or_is_skipped(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [f"row {i}: " + "some parquet text in a row group. " * 20 for i in range(30)]
    pq.write_table(pa.table({"text": rows}), tmp_path / "p.parquet", row_group_size=10, compression="snappy")
    column = pq.ParquetFile(tmp_path / "p.parquet").metadata.row_group(1).column(0)
    data = bytearray((tmp_path / "p.parquet").read_bytes())
    start = column.dictionary_page_offset or column.data_page_offset
    data[start + 20:start + column.total_compressed_size - 5] = b"\xff" * (column.total_compressed_size - 25)
    (tmp_path / "p.parquet").write_bytes(bytes(data))
    config = DataConfig(dir=str(tmp_path / "out"), sources=[], inputs=[str(tmp_path / "p.parquet")],
                        tokenizer=str(tokenizer), val_fraction=0.1)
    with pytest.raises(DataError, match=r"p.parquet row group 1 cannot be read"):
        prepare(config, progress=False, log=quiet)
    config.on_bad_record = "skip"
    meta = json.loads((prepare(config, progress=False, log=quiet) / "meta.json").read_text())
    assert meta["skipped_records"] == 10 and meta["sources"][0]["documents"] == 20


def test_tokenizer_sample_bytes_bounds_its_training_text(tmp_path):
    source = write_jsonl(tmp_path / "t.jsonl", corpus("kjv_bible")[:200])
    messages = []
    data = DataConfig(dir=str(tmp_path / "out"), sources=[], inputs=[str(source)], vocab_size=300,
                      tokenizer_sample_bytes=100_000)
    prepare(data, progress=False, log=messages.append)
    documents, megabytes = re.search(r"on (\d+) documents \(([\d.]+) MB\)", messages[0]).groups()
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert int(documents) < meta["train"]["documents"] and 0.05 < float(megabytes) < 0.15
    assert meta["inputs"]["tokenizer_sample_bytes"] == 100_000  # a non-default sample is in the fingerprint


def test_a_tokenizer_sample_of_no_document_is_refused(tmp_path):
    """A sample below every document's size drew none: the tokenizer held bytes alone (vocab 257 for 300 asked)."""
    source = write_jsonl(tmp_path / "t.jsonl", corpus("kjv_bible")[:50])
    data = DataConfig(dir=str(tmp_path / "out"), sources=[], inputs=[str(source)], vocab_size=300,
                      tokenizer_sample_bytes=1)
    with pytest.raises(DataError, match="tokenizer_sample_bytes=1 samples no training document"):
        prepare(data, progress=False, log=quiet)
    assert not (tmp_path / "out").exists()


def test_progress_line_shows_bytes_rate_and_eta():
    lines = []
    bar = Progress("tokenizing", 4_000_000_000, None, log=lines.append, every=0)
    bar.started -= 100  # 100 s ago
    bar.update(1_000_000_000)
    assert re.fullmatch(r"tokenizing: 1\.00 of 4\.00 GB \(25%\), 10\.0 MB/s, eta 5m00s", lines[-1]), lines


def test_part_and_workers_are_checked(tmp_path, capsys):
    assert main(["data", "prepare", "--part", "3/3", "--out", str(tmp_path / "o")]) == 2
    assert "--part '3/3' is not i/n" in capsys.readouterr().err
    assert main(["data", "prepare", "--workers", "0", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_join_links_every_shard_of_one_part_and_copies_what_does_not_line_up(tmp_path):
    from scalevec.data.shards import ShardWriter, join_parts

    tokens = np.arange(60, dtype=np.uint16)
    parts = []
    for number, piece in enumerate((tokens[:25], tokens[25:])):  # 10, 10, 5 tokens, then 10, 10, 10, 5
        directory = tmp_path / f"part{number}"
        directory.mkdir()
        writer = ShardWriter(directory, "train", np.uint16, 10)
        writer.add(piece, "s", 2 * len(piece))
        parts.append((directory, writer.finish()))
    (tmp_path / "one").mkdir()
    one = join_parts(parts[:1], tmp_path / "one", "train", np.uint16, 10)
    assert [s["tokens"] for s in one["shards"]] == [10, 10, 5]
    assert all(os.path.samefile(tmp_path / "one" / s["file"], parts[0][0] / s["file"]) for s in one["shards"])
    (tmp_path / "two").mkdir()
    two = join_parts(parts, tmp_path / "two", "train", np.uint16, 10)
    assert [s["tokens"] for s in two["shards"]] == [10] * 6
    assert np.array_equal(np.concatenate([np.fromfile(tmp_path / "two" / s["file"], dtype=np.uint16)
                                          for s in two["shards"]]), tokens)
    assert two["sources"] == [{"name": "s", "tokens": 60, "bytes": 120, "documents": 2}]
    assert not os.path.samefile(tmp_path / "two" / "train_002.bin", parts[1][0] / "train_000.bin")  # copied
