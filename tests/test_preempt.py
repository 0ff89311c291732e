"""Issue "Cluster-grade training": a preempted run keeps its work (one process; several ranks: test_elastic.py).

SIGTERM, SIGINT or SIGUSR1 (train.stop_signals) and train.time_limit finish the optimizer step, checkpoint it,
release the run directory and exit with 75; --resume then ends bitwise equal to an uninterrupted run. A second
signal ends the process at once.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import comparable, final_weights, quiet, records, tiny_config

from scalevec.checkpoint import list_checkpoints, verify_checkpoint
from scalevec.cli import main
from scalevec.config import to_toml
from scalevec.outputs import DirectoryLock
from scalevec.train.preempt import EXIT_STOPPED, StoppedEarly, StopRequests
from scalevec.train.trainer import Trainer

SETS = ("train.steps=60", "train.checkpoint_every=50", "train.eval_every=20", "train.log_every=5")


@pytest.fixture(scope="module")
def straight(small_data, tmp_path_factory):
    """An uninterrupted run and its config file."""
    root = tmp_path_factory.mktemp("straight")
    config = tiny_config(small_data, *SETS)
    (root / "run.toml").write_text(to_toml(config))
    Trainer(config, root / "run", progress=False, log=quiet).run()
    return root


def assert_equal_runs(a, b):
    expected, got = final_weights(a), final_weights(b)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert [comparable(r) for r in records(a)] == [comparable(r) for r in records(b)]


def newest_step(run) -> int:
    return verify_checkpoint(list_checkpoints(run / "checkpoints")[-1])["step"]


@pytest.mark.parametrize("stop_signal", ["SIGTERM", "SIGUSR1"])
def test_signal_checkpoints_the_step_and_resume_is_bitwise_equal(straight, tmp_path, stop_signal):
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "scalevec", "train", str(straight / "run.toml"), "--out",
                                str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run / "metrics.jsonl").exists() or len(records(run)) < 2:  # past step 5
        assert process.poll() is None and time.time() < deadline, "run ended before the signal"
        time.sleep(0.01)
    process.send_signal(getattr(signal, stop_signal))
    _, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_STOPPED, err
    step = newest_step(run)
    assert 5 <= step < 60 and step != 50  # the step reached, not a periodic checkpoint
    lines = [line for line in err.splitlines() if line.startswith("scalevec:") and "warning" not in line]
    assert lines == [f"scalevec: stopped at step {step} of 60 on {stop_signal}; the checkpoint of step {step} is "
                     f"saved: continue with scalevec train --resume --out {run}"]
    assert main(["train", "--resume", "--out", str(run)]) == 0
    assert_equal_runs(straight / "run", run)


def test_time_limit_stops_releases_the_run_and_resumes_exactly(straight, small_data, tmp_path):
    config = tiny_config(small_data, *SETS, "train.time_limit=1s")
    trainer = Trainer(config, tmp_path / "run", progress=False, log=quiet)
    time.sleep(1)  # the budget counts from the start: spent before the first step
    with pytest.raises(StoppedEarly, match=r"stopped at step 1 of 60 on train.time_limit \(1 s\)"):
        trainer.run()
    assert newest_step(tmp_path / "run") == 1
    with DirectoryLock(tmp_path / "run", "run directory"):  # released
        pass
    # a requeued job may set another time limit (here none) and stop signals; other keys must match
    Trainer(tiny_config(small_data, *SETS, "train.stop_signals=SIGTERM"), tmp_path / "run", resume=True,
            progress=False, log=quiet).run()
    assert_equal_runs(straight / "run", tmp_path / "run")


def test_second_signal_ends_the_process_at_once(tmp_path):
    """The first signal is noted (the default action put back); the second one kills, as SIGTERM does."""
    script = ("import os, signal, time\n"
              "from scalevec.train.preempt import StopRequests\n"
              "with StopRequests(['SIGTERM', 'SIGINT'], 0) as requests:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(0.1)\n"
              "    assert requests.requested() and requests.reason == 'SIGTERM'\n"
              "    print('noted', flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(5)\n"
              "print('not reached')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert result.stdout == "noted\n" and result.returncode == -signal.SIGINT, result


def test_stop_requests_restore_the_previous_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopRequests(["SIGUSR1"], 0) as requests:
        assert not requests.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert requests.requested() and requests.reason == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.parametrize("value, problem", [("3x", "is not a duration"), ("0s", "must be positive"),
                                            ("m5", "is not a duration"), ("10", "is not a duration")])
def test_bad_time_limit_is_one_line_exit_2(small_data, tmp_path, value, problem, capsys):
    config = tmp_path / "run.toml"
    config.write_text(to_toml(tiny_config(small_data)))
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--set", f"train.time_limit={value}"]) == 2
    err = capsys.readouterr().err
    assert f"train.time_limit={value!r} {problem}" in err and not (tmp_path / "run").exists()
