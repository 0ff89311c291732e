"""Tokenization throughput of `scalevec data prepare`'s encoder on the bundled prose (target >= 3 MB/s, 2 cores).

    .venv/bin/python benchmarks/tokenizer_throughput.py [--repeats 3]
"""

import argparse
import json
import lzma
import tempfile
import time
from pathlib import Path

import numpy as np

from scalevec.config import DataConfig
from scalevec.data.prepare import train_tokenizer, write_shards
from scalevec.data.sources import CORPUS_DIR, PROSE_SOURCES


class Bytes:
    def update(self, n):
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    texts = []
    for name in PROSE_SOURCES:
        with lzma.open(CORPUS_DIR / f"{name}.jsonl.xz", "rt", encoding="utf-8") as fh:
            texts += [json.loads(line)["text"] for line in fh]
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    tokenizer = train_tokenizer(texts, DataConfig().vocab_size, progress=False)
    rates = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            write_shards(tokenizer, texts, Path(tmp), "train", np.uint16, 1 << 26, 0, Bytes())
            rates.append(megabytes / (time.perf_counter() - start))
    print(json.dumps({"megabytes": round(megabytes, 1), "mb_per_s_median": round(sorted(rates)[len(rates) // 2], 2),
                      "mb_per_s_all": [round(r, 2) for r in rates]}))


if __name__ == "__main__":
    main()
