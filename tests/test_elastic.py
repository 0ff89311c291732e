"""Issue "Cluster-grade training": preemption under torchrun on two nodes, and elastic resume.

- Two torchrun agents on this machine (`--nnodes 2`, c10d rendezvous on a free loopback port) train,
  checkpoint, are preempted (SIGTERM to one node: the ranks agree on the stop step) and resume, ending bitwise
  equal to an uninterrupted two-rank run.
- A checkpoint written on w ranks resumes on w' ranks (2 -> 1, 1 -> 2, 2 -> 3; DDP and FSDP2): the global
  position and global batch carry over, so every step takes the same windows as the uninterrupted run. The split
  into ranks and micro-batches changes the order of floating-point sums, so losses and weights agree within
  TOLERANCE, not bitwise. A world size that cannot divide the global batch is refused in one line.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_dist import assert_same_losses, assert_same_weights, weights
from test_train import quiet, records, tiny_config

from scalevec.checkpoint import list_checkpoints, verify_checkpoint
from scalevec.config import ConfigError, load_config, to_toml
from scalevec.data.loader import Loader, TokenWindows, split_global_batch
from scalevec.train.trainer import Trainer

pytestmark = pytest.mark.slow  # subprocesses

STEPS, EVERY = 60, 20  # checkpoints at 20, 40, 60
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_for(data, *sets):
    return tiny_config(data, f"train.steps={STEPS}", "train.keep_checkpoints=5", f"train.checkpoint_every={EVERY}",
                       f"train.eval_every={EVERY}", "train.log_every=5", *sets)


def torchrun(out, nproc, *sets, config=None, nodes=None):
    """The command of a torchrun on this machine: one node (`--standalone`), or node `nodes[0]` of `nodes[1]`
    joining a c10d rendezvous on the loopback port `nodes[2]`."""
    if nodes is None:
        launch = ["--standalone"]
    else:
        node, count, port = nodes
        launch = ["--nnodes", str(count), "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                  f"127.0.0.1:{port}", "--rdzv-id", "scalevec-test", "--local-addr", "127.0.0.1"]
    return [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc-per-node", str(nproc), "-m", "scalevec",
            "train", *([str(config)] if config else ["--resume"]), "--out", str(out),
            *[x for s in sets for x in ("--set", s)]]


def run(command, expect=0):
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **LOOPBACK}, timeout=180)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def truncated_copy(source, dest, step):
    """A copy of a run as if it had stopped at checkpoint `step`."""
    shutil.copytree(source, dest)
    for path in list_checkpoints(dest / "checkpoints"):
        if verify_checkpoint(path)["step"] > step:
            shutil.rmtree(path)
    return dest


@pytest.fixture(scope="module")
def setup(small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    config = config_for(small_data)
    (root / "run.toml").write_text(to_toml(config))
    return root, config


@pytest.fixture(scope="module")
def two_rank_ddp(setup):
    """An uninterrupted two-rank DDP run (batch 4 per rank: a global batch of 8)."""
    root, _ = setup
    run(torchrun(root / "ddp2", 2, config=root / "run.toml"))
    return root / "ddp2"


def test_loader_takes_every_window_once_across_world_sizes(small_data):
    """Which windows each step consumed, recorded: w ranks for some steps, then w' ranks, against one stream."""
    windows = TokenWindows(small_data, "train", seq_len=32)
    for before, after, global_batch in [(2, 1, 8), (1, 2, 8), (2, 3, 6), (3, 2, 6), (1, 4, 8)]:
        steps = (len(windows) // global_batch) + 3  # crosses an epoch
        consumed, state = [], None
        for world_size, count in [(before, steps // 2), (after, steps - steps // 2)]:
            micro, accum = split_global_batch(global_batch, world_size, 4)
            assert micro * accum * world_size == global_batch
            loaders = [Loader(windows, micro, seed=7, rank=r, world_size=world_size) for r in range(world_size)]
            for loader in loaders:
                if state:
                    loader.load_state_dict(state)
            for _ in range(count):
                consumed.append(sorted(i for _ in range(accum) for loader in loaders for i in loader.batch_indices()))
            state = loaders[0].state_dict()
            assert all(loader.state_dict() == state for loader in loaders)
        one = Loader(windows, global_batch, seed=7)
        expected = [sorted(one.batch_indices()) for _ in range(steps)]
        assert consumed == expected, (before, after)
        first_epoch = [i for batch in consumed for i in batch][:len(windows)]
        assert len(set(first_epoch)) == len(windows)  # none twice, none skipped within an epoch


def test_a_per_rank_position_of_scalevec_0_1_continues_where_it_was(small_data):
    """Before 0.2, rank r of w kept its own position p and took window p·w + r of each epoch's permutation."""
    windows = TokenWindows(small_data, "train", seq_len=32)
    per_rank = len(windows) // 2
    old = {"position": per_rank + 5, "seed": 7, "world_size": 2, "windows": len(windows)}  # epoch 1, 5 in
    order = Loader(windows, 1, seed=7).epoch_order(1)
    for rank in range(2):
        loader = Loader(windows, 3, seed=7, rank=rank, world_size=2)
        loader.load_state_dict(old)
        assert loader.batch_indices() == [int(order[(5 + j) * 2 + rank]) for j in range(3)]


def test_global_batch_split_and_refusal():
    assert split_global_batch(8, 2, 4) == (4, 1)
    assert split_global_batch(8, 1, 4) == (4, 2)
    assert split_global_batch(12, 3, 8) == (4, 1)
    assert split_global_batch(12, 2, 4) == (3, 2)
    with pytest.raises(ConfigError, match="a world size of 3 cannot divide the run's global batch of 8 sequences "
                                          "per step; resume on 1, 2, 4, 8 ranks"):
        split_global_batch(8, 3, 4)


def test_two_nodes_preempted_and_resumed_equal_an_uninterrupted_run(setup, two_rank_ddp, tmp_path):
    root, _ = setup
    out, port = tmp_path / "nodes", free_port()
    env = {**os.environ, **LOOPBACK}
    agents = [subprocess.Popen(torchrun(out, 1, config=root / "run.toml", nodes=(node, 2, port)), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in range(2)]
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or records(out)[-1]["step"] < 10:
        assert all(a.poll() is None for a in agents) and time.time() < deadline, "run ended before the signal"
        time.sleep(0.02)
    agents[1].send_signal(signal.SIGTERM)  # one node preempted: the other ranks stop at the same step
    errors = [a.communicate(timeout=60)[1] for a in agents]
    assert all(a.returncode != 0 for a in agents)  # torchrun itself exits 1 (its workers exited 75)
    assert any("exitcode: 75" in e for e in errors), errors
    step = verify_checkpoint(list_checkpoints(out / "checkpoints")[-1])["step"]
    assert 10 <= step < STEPS
    stopped = [line for e in errors for line in e.splitlines() if line.startswith("scalevec: stopped")]
    assert len(stopped) == 1 and f"at step {step} of {STEPS}" in stopped[0], errors

    port = free_port()
    resumed = [subprocess.Popen(torchrun(out, 1, nodes=(node, 2, port)), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for node in range(2)]
    assert [r.wait(timeout=120) for r in resumed] == [0, 0], [r.communicate()[1][-2000:] for r in resumed]
    assert_same_weights(weights(out), weights(two_rank_ddp), tolerance=0)
    assert_same_losses(out, two_rank_ddp, tolerance=0)


def test_ddp_two_ranks_resume_on_one_and_one_on_two(setup, two_rank_ddp, small_data, tmp_path):
    root, config = setup
    single = tmp_path / "single"  # the same global batch in one process
    Trainer(config_for(small_data, "train.batch_size=8"), single, progress=False, log=quiet).run()
    assert_same_losses(single, two_rank_ddp)

    to_one = truncated_copy(two_rank_ddp, tmp_path / "to_one", EVERY)  # 2 -> 1: micro-batches of 4, two of them
    lines = []
    trainer = Trainer(config, to_one, resume=True, progress=False, log=lines.append)
    trainer.run()
    assert f"resumed from step {EVERY}" in lines and (trainer.loader.batch_size, trainer.grad_accum) == (4, 2)
    assert_same_losses(to_one, single)
    assert_same_weights(weights(to_one), weights(single))

    to_two = truncated_copy(single, tmp_path / "to_two", EVERY)  # 1 -> 2
    run(torchrun(to_two, 2))
    assert_same_losses(to_two, single)
    assert_same_weights(weights(to_two), weights(single))


def test_fsdp2_two_ranks_resume_on_three_and_one_and_one_on_two(setup, small_data, tmp_path):
    root, config = setup
    single = tmp_path / "single"  # a global batch of 6 in one process
    Trainer(config_for(small_data, "train.batch_size=6"), single, progress=False, log=quiet).run()
    sharded = tmp_path / "fsdp2"
    run(torchrun(sharded, 2, "dist.mode=fsdp2", "train.batch_size=3", config=root / "run.toml"))
    assert_same_losses(sharded, single)

    to_three = truncated_copy(sharded, tmp_path / "to_three", EVERY)  # DCP reshards 2 -> 3
    run(torchrun(to_three, 3))
    assert (list_checkpoints(to_three / "checkpoints")[-1] / "dcp").is_dir()
    assert_same_losses(to_three, single)
    assert_same_weights(weights(to_three), weights(single))

    to_one = truncated_copy(sharded, tmp_path / "to_one", EVERY)  # DCP shards into one process's tensors
    Trainer(load_config(to_one / "config.toml"), to_one, resume=True, progress=False, log=quiet).run()
    assert (list_checkpoints(to_one / "checkpoints")[-1] / "model.safetensors").is_file()
    assert_same_losses(to_one, single)
    assert_same_weights(weights(to_one), weights(single))

    to_shards = truncated_copy(single, tmp_path / "to_shards", EVERY)  # whole tensors sharded 1 -> 2 (ddp -> fsdp2)
    run(torchrun(to_shards, 2, "dist.mode=fsdp2"))
    assert (list_checkpoints(to_shards / "checkpoints")[-1] / "dcp").is_dir()
    assert_same_losses(to_shards, single)
    assert_same_weights(weights(to_shards), weights(single))


def test_a_world_size_that_cannot_divide_the_global_batch_is_refused(two_rank_ddp, tmp_path):
    run_dir = truncated_copy(two_rank_ddp, tmp_path / "run", EVERY)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    result = run(torchrun(run_dir, 3), expect=1)
    errors = [line for line in result.stderr.splitlines() if line.startswith("scalevec: error:")]
    assert errors == ["scalevec: error: a world size of 3 cannot divide the run's global batch of 8 sequences per "
                      "step; resume on 1, 2, 4, 8 ranks"], result.stderr[-2000:]
    assert "exitcode: 2" in result.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before

