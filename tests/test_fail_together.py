"""Issue "Cluster-grade training": ranks stop together.

A non-finite loss, a full disk, a refused checkpoint write or any error on one rank ends every rank within
seconds, with one line from rank 0 (the failed rank's own, `rank R: ...` when another rank failed) and the last
good checkpoint kept; also when the failed rank hangs instead of exiting, so that no collective fails (as on NCCL,
which waits for a dead peer). Each case: 2 ranks on gloo under torchrun, the fault injected by
tests/fault_injection.py.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import tiny_config

from scalevec.checkpoint import list_checkpoints, verify_checkpoint
from scalevec.config import to_toml

pytestmark = pytest.mark.slow  # subprocesses

INJECT = Path(__file__).parent / "fault_injection.py"
WITHIN_S = 10  # from the fault to torchrun's exit


@pytest.fixture(scope="module")
def config_path(small_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("fail") / "run.toml"
    path.write_text(to_toml(tiny_config(small_data, "train.steps=40", "train.checkpoint_every=4",
                                        "train.eval_every=20", "train.log_every=2")))
    return path


@pytest.mark.parametrize("fault, rank, mode, step, message", [
    ("nan", 1, "ddp", 7, "scalevec: error: non-finite loss at step 7; the last good checkpoint is kept"),
    ("error", 1, "ddp", 7, "scalevec: error: rank 1: injected fault on this rank"),
    ("hang", 1, "ddp", 7, "scalevec: error: rank 1: injected fault on this rank"),
    ("metrics_full", 0, "ddp", 6, "scalevec: error: writing {run}/metrics.jsonl failed (No space left on device)"),
    ("checkpoint_refused", 0, "ddp", 8, "scalevec: error: writing the checkpoint of step 8 failed (Permission denied)"),
    ("shard_full", 1, "fsdp2", 8, "scalevec: error: writing the checkpoint of step 8 failed"),
])
def test_a_fault_on_one_rank_ends_every_rank_with_one_line(config_path, tmp_path, fault, rank, mode, step, message):
    run, time_file = tmp_path / "run", tmp_path / "fault_time"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--shutdown-timeout", "2", str(INJECT),
               fault, str(rank), str(step), str(time_file), "--", "train", str(config_path), "--out", str(run),
               "--set", f"dist.mode={mode}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    ended = time.time()
    assert result.returncode == 1, result.stderr[-3000:]
    assert ended - float(time_file.read_text()) < WITHIN_S
    errors = [line for line in result.stderr.splitlines() if line.startswith("scalevec: error")]
    # when both ranks fail in the same step (a non-finite loss, a failed shard), rank 1 may report first
    line = errors[0] if rank == 0 or fault in ("error", "hang") else errors[0].replace("error: rank 1: ", "error: ")
    assert len(errors) == 1 and line.startswith(message.format(run=run)), result.stderr[-3000:]
    kept = list_checkpoints(run / "checkpoints")
    assert kept and all(verify_checkpoint(path)["step"] < step for path in kept)  # the last good one(s)
    assert not list((run / "checkpoints").glob(".tmp-*"))
