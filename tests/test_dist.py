"""Issue "Distributed": 2 processes on gloo via torchrun against single-process runs; resume; export."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scalevec.checkpoint import list_checkpoints, load_run_model, run_weights
from scalevec.config import load_config, to_toml
from scalevec.export.hf import export_run

pytestmark = pytest.mark.slow  # subprocesses and many short training runs

# Two ranks see the same global batch as one process (rank r takes every 2nd window), so the runs
# agree up to the order of floating-point sums: losses within 1e-5, weights within 1e-5.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def config_path(small_data, tmp_path_factory):
    config = load_config({
        "model": {"preset": "", "vocab_size": 512, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "d_ff": 64, "max_seq_len": 32},
        "strategy": {"preset": "unified"},
        "data": {"dir": str(small_data), "sources": ["moby_dick", "milton"], "vocab_size": 512, "val_tokens": 2048},
        "schedule": {"warmup_steps": 3},
        "train": {"steps": 12, "batch_size": 4, "seq_len": 32, "eval_every": 6, "log_every": 3, "checkpoint_every": 6,
                  "eval_batch_size": 8, "threads": 1},
    })
    path = tmp_path_factory.mktemp("dist") / "run.toml"
    path.write_text(to_toml(config))
    return path


def single(config_path, out, *sets):
    """One process with the global batch of two ranks."""
    command = [sys.executable, "-m", "scalevec", "train", str(config_path), "--out", str(out), "--set",
               "train.batch_size=8", *[x for s in sets for x in ("--set", s)]]
    subprocess.run(command, check=True, capture_output=True)
    return out


def torchrun_command(config_path, out, *sets, resume=False):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "scalevec",
            "train", str(config_path), "--out", str(out), *(["--resume"] if resume else []),
            *[x for s in sets for x in ("--set", s)]]


def two_ranks(config_path, out, *sets, resume=False):
    result = subprocess.run(torchrun_command(config_path, out, *sets, resume=resume), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("train_loss"), r.get("val_loss"), r.get("expert_imbalance")) for r in rows]


def assert_same_losses(a, b, tolerance=TOLERANCE):
    rows_a, rows_b = losses(a), losses(b)
    assert [r[0] for r in rows_a] == [r[0] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for x, y in zip(ra[1:], rb[1:]):
            assert (x is None) == (y is None)
            if x is not None:
                assert abs(x - y) <= tolerance, (ra, rb)


def assert_same_weights(a: dict, b: dict, tolerance=TOLERANCE):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=tolerance, rtol=tolerance, msg=name)


def weights(run_dir):
    config = load_config(run_dir / "config.toml")
    return run_weights(run_dir, config)


@pytest.mark.parametrize("sets", [(), ("model.moe_experts=4", "moe.balance=bias", "moe.bias_rate=0.05")])
def test_ddp_matches_single_process(config_path, tmp_path, sets):
    """With MoE, the expert bias moves from the load summed over both ranks, as from one process's load, and the
    expert imbalance of each record is that of one process (DDP broadcast rank 0's buffers, its routed-token counts
    included, over the other ranks' before each forward)."""
    reference = single(config_path, tmp_path / "single", *sets)
    ddp = two_ranks(config_path, tmp_path / "ddp", "dist.mode=ddp", *sets)
    assert_same_losses(ddp, reference)
    final = load_file(list_checkpoints(ddp / "checkpoints")[-1] / "model.safetensors")
    assert_same_weights(final, weights(reference))
    assert all(final[name].abs().sum() > 0 for name in final if name.endswith("expert_bias")) and \
        any(name.endswith("expert_bias") for name in final) == bool(sets)


@pytest.mark.parametrize("optimizer, preset", [("adamw", "hg+qknorm+or"), ("muon", "unified")])
def test_fsdp2_matches_single_process(config_path, tmp_path, optimizer, preset):
    sets = (f"optim.name={optimizer}", f"strategy.preset={preset}")
    reference = single(config_path, tmp_path / "single", *sets)
    sharded = two_ranks(config_path, tmp_path / "fsdp2", "dist.mode=fsdp2", *sets)
    assert (list_checkpoints(sharded / "checkpoints")[-1] / "dcp").is_dir()
    assert_same_losses(sharded, reference)
    assert_same_weights(weights(sharded), weights(reference))
    if preset != "unified":  # an FSDP2 run exports (as Qwen3 here): the shards are gathered first
        export_run(sharded, tmp_path / "hf", log=lambda *_: None)
        transformers = pytest.importorskip("transformers")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        tokens = torch.randint(0, 512, (2, 16))
        _, ours = load_run_model(sharded)
        with torch.no_grad():
            torch.testing.assert_close(hf(tokens).logits, ours(tokens), atol=1e-4, rtol=1e-4)


def kill_workers(out):
    """SIGKILL the ranks writing to `out`: torchrun starts each in its own session, so killing torchrun's
    process group leaves them running (and writing) beside the resumed run."""
    workers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if str(out).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGKILL)
                workers.append(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in workers):
        assert time.time() < deadline, "killed ranks did not exit"
        time.sleep(0.05)


def _state(pid):
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]
    except (FileNotFoundError, IndexError):
        return "zombie"


def test_two_rank_run_killed_and_resumed_equals_uninterrupted(config_path, tmp_path):
    sets = ("dist.mode=fsdp2", "train.steps=80", "train.checkpoint_every=10", "train.eval_every=40")
    straight = two_ranks(config_path, tmp_path / "straight", *sets)
    killed = tmp_path / "killed"
    process = subprocess.Popen(torchrun_command(config_path, killed, *sets), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_00000020").exists():
        assert process.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    kill_workers(killed)
    assert list_checkpoints(killed / "checkpoints")[-1].name < "step_00000080"
    two_ranks(config_path, killed, *sets, resume=True)
    assert_same_weights(weights(killed), weights(straight), tolerance=0)
    assert_same_losses(killed, straight, tolerance=0)

