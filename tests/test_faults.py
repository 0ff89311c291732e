"""Issue "Nothing lost, ever": the fault suite.

Categories: concurrent writers, full disk (a real tmpfs when this process may mount one, and a
simulated ENOSPC at each write site everywhere), corruption of each checkpoint file, destructive
output paths, and a table of malformed inputs. Every case checks the exit code, a one-line error,
and that nothing on disk changed that should not have.
"""

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import comparable, final_weights, quiet, records, tiny_config

from scalevec import checkpoint as checkpoint_module
from scalevec.checkpoint import list_checkpoints, verify_checkpoint
from scalevec.cli import main
from scalevec.config import load_config, to_toml
from scalevec.experiments.sweep import SUITE_DIR, load_suite
from scalevec.outputs import DirectoryLock, WriteFailed, append_line, file_sha256, writing
from scalevec.rundir import has_content
from scalevec.train.trainer import Trainer


def snapshot(root: Path) -> dict:
    """Every path under root with its content hash (directories as None)."""
    return {str(p.relative_to(root)): None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if not line.startswith(("scalevec: warning:", "step "))]  # progress lines aside
    assert len(errors) == 1 and errors[0].startswith("scalevec: error: "), err
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(small_data, tmp_path_factory):
    """A finished 20-step run (checkpoints at 10 and 20) and its config file."""
    root = tmp_path_factory.mktemp("finished")
    config = tiny_config(small_data, "strategy.preset=standard", "train.steps=20", "train.eval_every=10")
    (root / "run.toml").write_text(to_toml(config))
    Trainer(config, root / "run", progress=False, log=quiet).run()
    return root


def copy_run(finished_run, tmp_path) -> Path:
    shutil.copytree(finished_run / "run", tmp_path / "run")
    shutil.copy(finished_run / "run.toml", tmp_path / "run.toml")
    return tmp_path / "run"


# -- concurrency -----------------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_while_a_trainer_holds_the_run(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    with DirectoryLock(run, "run directory"):  # as a live trainer holds it
        before = snapshot(tmp_path)
        for argv in (["train", "--out", str(run), "--resume"],
                     ["train", str(tmp_path / "run.toml"), "--out", str(run), "--overwrite"],
                     ["export", str(run), "--to", str(tmp_path / "hf")]):
            assert main(argv) == 2
            message = one_line_error(capsys)
            assert f"in use by another scalevec process (pid {os.getpid()})" in message, message
            assert snapshot(tmp_path) == before
    assert not (run / ".lock").exists()  # released and removed


def test_a_run_starting_in_a_directory_is_not_taken_for_the_users_files(tmp_path):
    """What a racing start sees of the winner in its first instant (its lock, its config.toml on the way in) is no
    directory of the user's: the loser goes on to the lock and is refused as `in use`, not told to --overwrite."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("123\n")
    (run / ".config.toml.tmp-123").write_text("[model]\n")
    assert not has_content(run)
    for users in (".lockfile", ".config.toml.bak", "notes.txt"):
        (run / users).write_text("mine")
        assert has_content(run), users
        (run / users).unlink()


def _spawn_train(config_path: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scalevec", "train", str(config_path), "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_killed_trainer_leaves_no_stale_lock_and_racing_starts_train_once(small_data, tmp_path):
    config = tiny_config(small_data, "train.steps=100000", "train.checkpoint_every=10", "train.eval_every=50000")
    path = tmp_path / "run.toml"
    path.write_text(to_toml(config))
    racers = [_spawn_train(path, tmp_path / "race") for _ in range(3)]
    deadline = time.time() + 120
    while sum(p.poll() is None for p in racers) > 1 or not list_checkpoints(tmp_path / "race" / "checkpoints"):
        assert time.time() < deadline, [p.poll() for p in racers]
        time.sleep(0.05)
    (winner,) = [p for p in racers if p.poll() is None]
    for loser in (p for p in racers if p is not winner):
        lines = [line for line in loser.stderr.read().strip().splitlines() if not line.startswith("scalevec: warning")]
        assert loser.returncode == 2 and len(lines) == 1, lines
        assert "in use by another scalevec process" in lines[0] or "exists" in lines[0], lines
    os.killpg(winner.pid, signal.SIGKILL)
    winner.wait()
    with DirectoryLock(tmp_path / "race", "run directory"):  # the kernel released the killed holder's lock
        pass
    steps = [r["step"] for r in records(tmp_path / "race")]
    assert steps == sorted(set(steps))


# -- full disk -------------------------------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (root only); `remount(size)` changes its size. Skipped where mounting is not allowed."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root; the simulated ENOSPC tests cover each write site")

    def remount(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    yield mount, remount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_real_full_disk_stops_in_one_line_and_resume_completes_exactly(small_data, tmp_path, tmpfs, capsys):
    mount, remount = tmpfs
    config = tiny_config(small_data, "train.steps=60", "train.keep_checkpoints=10", "train.eval_every=20")
    (tmp_path / "run.toml").write_text(to_toml(config))
    Trainer(config, tmp_path / "straight", progress=False, log=quiet).run()
    remount("700k")  # room for the first checkpoints only
    run = mount / "run"
    assert main(["train", str(tmp_path / "run.toml"), "--out", str(run)]) == 1
    message = one_line_error(capsys)
    assert "failed (No space left on device)" in message or "failed (the disk is full" in message, message
    saved = list_checkpoints(run / "checkpoints")
    assert saved and all(verify_checkpoint(p) for p in saved)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    json_lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in json_lines)  # no torn line
    remount("64m")
    assert main(["train", "--out", str(run), "--resume"]) == 0
    expected, got = final_weights(tmp_path / "straight"), final_weights(run)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert [comparable(r) for r in records(run)] == [comparable(r) for r in records(tmp_path / "straight")]


def test_real_full_disk_in_export_and_prepare_keeps_what_was_there(finished_run, tmp_path, tmpfs, capsys):
    mount, remount = tmpfs
    assert main(["export", str(finished_run / "run"), "--to", str(mount / "hf")]) == 0
    before = snapshot(mount)
    (mount / "filler").write_bytes(b"\0" * (4 * 2**20 - 2**16 * 4))  # almost full now
    before = snapshot(mount)
    assert main(["export", str(finished_run / "run"), "--to", str(mount / "hf")]) == 1
    assert "writing the export" in one_line_error(capsys)
    assert snapshot(mount) == before  # the earlier export intact, no temporary directory left
    assert main(["data", "prepare", "--sources", "milton", "--vocab", "300", "--out", str(mount / "data")]) == 1
    assert "writing the data directory" in one_line_error(capsys)
    assert snapshot(mount) == before


def test_simulated_full_disk_at_each_trainer_write_site(small_data, tmp_path, monkeypatch, capsys):
    """metrics.jsonl, the checkpoint's torch and safetensors files, config.toml: each failure is one line, exit 1,
    the previous checkpoint intact, no torn metrics line; resuming afterwards ends as a straight run does."""
    config = tiny_config(small_data, "train.steps=30")
    path = tmp_path / "run.toml"
    path.write_text(to_toml(config))
    Trainer(config, tmp_path / "straight", progress=False, log=quiet).run()
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1472 vs 1370")
    import scalevec.train.checkpointing as checkpointing

    sites = {  # name: (owner, attribute, which calls count, failing call, error)
        "metrics": (os, "write", lambda fd, data, *a: data.startswith(b'{"step"'), 3, enospc),
        "trainer.pt": (torch, "save", lambda *a, **k: True, 2, torch_error),
        "model.safetensors": (checkpointing, "save_file", lambda *a, **k: True, 2, enospc),
    }
    for name, (owner, attribute, counts, fail_at, error) in sites.items():
        run = tmp_path / name
        calls = {"n": 0}
        real = getattr(owner, attribute)

        def failing(*args, _real=real, _counts=counts, _fail_at=fail_at, _error=error, _calls=calls, **kwargs):
            if _counts(*args, **kwargs):
                _calls["n"] += 1
                if _calls["n"] == _fail_at:
                    raise _error
            return _real(*args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(owner, attribute, failing)
            assert main(["train", str(path), "--out", str(run)]) == 1, name
        assert calls["n"] == fail_at, name
        message = one_line_error(capsys)
        assert "failed (" in message and "--resume" in message, (name, message)
        assert all(verify_checkpoint(p) for p in list_checkpoints(run / "checkpoints"))
        assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
        assert main(["train", "--out", str(run), "--resume"]) == 0, name
        expected, got = final_weights(tmp_path / "straight"), final_weights(run)
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
        steps = [r["step"] for r in records(run)]
        assert steps == sorted(set(steps)), name
    with monkeypatch.context() as patch:  # config.toml: the start fails and leaves nothing behind
        patch.setattr("scalevec.rundir.write_text_atomic", lambda *a: (_ for _ in ()).throw(enospc))
        assert main(["train", str(path), "--out", str(tmp_path / "fresh")]) == 1
    assert "No space left" in one_line_error(capsys)
    assert not (tmp_path / "fresh").exists()


def test_a_full_disk_under_a_logger_is_the_one_line_of_metrics_jsonl(small_data, tmp_path, monkeypatch, capsys):
    """metrics.csv's append failing says which file and to resume (it said 'writing failed' and to run the command
    again, which the existing run directory refuses); resuming ends as a straight run does, the CSV complete."""
    config = tiny_config(small_data, "train.steps=20", 'train.loggers=["csv"]')
    path = tmp_path / "run.toml"
    path.write_text(to_toml(config))
    Trainer(config, tmp_path / "straight", progress=False, log=quiet).run()
    real_open, calls = Path.open, {"n": 0}

    def failing_open(self, mode="r", *args, **kwargs):
        if self.name == "metrics.csv" and mode == "a":
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(self, mode, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "open", failing_open)
        assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 1
    message = one_line_error(capsys)
    assert f"writing {tmp_path / 'run' / 'metrics.csv'} failed (No space left on device)" in message, message
    assert "resume with --resume" in message
    assert main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 0
    expected, got = final_weights(tmp_path / "straight"), final_weights(tmp_path / "run")
    assert all(torch.equal(expected[k], got[k]) for k in expected)

    def csv_steps(run):
        return [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()]
    assert csv_steps(tmp_path / "run") == csv_steps(tmp_path / "straight") == ["step", "0", "5", "10", "15", "20"]


@pytest.mark.parametrize("error, reason, remedy", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device", "free space"),
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "quota", "free space"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1472 vs 1370"), "the disk is full",
     "free space"),
    (OSError(errno.EACCES, os.strerror(errno.EACCES)), "Permission denied", "make the path writable"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), "Read-only file system", "make the path writable"),
    (OSError(errno.ENOENT, os.strerror(errno.ENOENT)), "No such file", "make the path writable"),
])
def test_a_failed_write_names_its_reason_and_the_remedy_for_it(error, reason, remedy):
    """Free space only for a full disk or quota; anything else (/proc, a read-only mount) asks for a writable path."""
    with pytest.raises(WriteFailed) as caught, writing("the export out", "run it again", kept="nothing was changed"):
        raise error
    message = str(caught.value)
    assert message.startswith("writing the export out failed (") and reason in message, message
    assert f"); nothing was changed; {remedy}" in message and message.endswith(" and run it again"), message
    assert ("free space" in message) == (remedy == "free space"), message


def test_writing_lets_other_errors_through():
    with pytest.raises(ValueError), writing("x"):
        raise ValueError("a bug, not a write")


def test_append_line_rolls_back_a_short_write(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_line(path, '{"step": 1}')
    monkeypatch.setattr("scalevec.outputs.os.write", lambda fd, data: os.ftruncate(fd, os.fstat(fd).st_size) or 3)
    real_write = os.write
    with pytest.raises(OSError):
        append_line(path, '{"step": 2, "loss": 1.0}')
    monkeypatch.setattr("scalevec.outputs.os.write", real_write)
    assert path.read_text() == '{"step": 1}\n'


def test_torn_metrics_line_is_dropped_and_said(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_00000020")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 25, "tok')
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert "torn last line" in capsys.readouterr().out
    assert [r["step"] for r in records(run)] == [r["step"] for r in records(finished_run / "run")]


# -- corruption ------------------------------------------------------------------------------------------------

def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _rehash(checkpoint: Path, state: dict) -> None:
    """Forge a consistent state.json (every hash recomputed), as an attacker or a buggy tool would."""
    state["files"] = {name: file_sha256(checkpoint / name) for name in state["files"]}
    state["sha256"] = checkpoint_module._state_digest(state)
    (checkpoint / "state.json").write_text(json.dumps(state))


def _pickle_payload(checkpoint: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    torch.save({"torch_rng": Payload()}, checkpoint / "trainer.pt")
    _rehash(checkpoint, json.loads((checkpoint / "state.json").read_text()))


def _edit_state(checkpoint: Path, rehash: bool) -> None:
    state = json.loads((checkpoint / "state.json").read_text())
    state["loader"]["position"] += 1
    if rehash:
        state["step"] = "twenty"
        _rehash(checkpoint, state)
    else:
        (checkpoint / "state.json").write_text(json.dumps(state))


CORRUPTIONS = {
    "model truncated": lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:100]),
    "model byte flipped": lambda c: _flip(c / "model.safetensors"),
    "model deleted": lambda c: (c / "model.safetensors").unlink(),
    "trainer.pt flipped": lambda c: _flip(c / "trainer.pt"),
    "trainer.pt empty": lambda c: (c / "trainer.pt").write_bytes(b""),
    "trainer.pt pickle payload, hashes forged": _pickle_payload,
    "state.json position edited": lambda c: _edit_state(c, rehash=False),
    "state.json edited, hashes forged": lambda c: _edit_state(c, rehash=True),
    "state.json truncated": lambda c: (c / "state.json").write_text((c / "state.json").read_text()[:40]),
    "state.json deleted": lambda c: (c / "state.json").unlink(),
    "state.json not UTF-8": lambda c: (c / "state.json").write_bytes(b"\xff\xfe" * 20),
    "model tensor renamed, hashes forged": lambda c: (
        save_file({f"x.{k}": v for k, v in load_file(c / "model.safetensors").items()}, c / "model.safetensors"),
        _rehash(c, json.loads((c / "state.json").read_text()))),
    "model not safetensors, hashes forged": lambda c: (
        (c / "model.safetensors").write_bytes(b"garbage" * 10),
        _rehash(c, json.loads((c / "state.json").read_text()))),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_each_corrupt_checkpoint_file_falls_back_to_the_previous_one(finished_run, tmp_path, corruption, capsys,
                                                                     monkeypatch):
    run = copy_run(finished_run, tmp_path)
    monkeypatch.chdir(tmp_path)
    CORRUPTIONS[corruption](run / "checkpoints" / "step_00000020")
    with pytest.warns(UserWarning, match="skipping unusable checkpoint") as caught:
        assert main(["train", "--out", str(run), "--resume"]) == 0
    skipped = [str(w.message) for w in caught if "skipping unusable checkpoint" in str(w.message)]
    assert len(skipped) == 1 and "step_00000020" in skipped[0] and "\n" not in skipped[0], skipped
    assert "resumed from step 10" in capsys.readouterr().out
    assert not (tmp_path / "PWNED").exists()
    expected, got = final_weights(finished_run / "run"), final_weights(run)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert [r["step"] for r in records(run)] == [r["step"] for r in records(finished_run / "run")]


def test_no_valid_checkpoint_refuses_and_changes_nothing(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    for checkpoint in list_checkpoints(run / "checkpoints"):
        _flip(checkpoint / "model.safetensors")
    before = snapshot(tmp_path)
    for argv in (["train", "--out", str(run), "--resume"], ["export", str(run), "--to", str(tmp_path / "hf")]):
        with warnings.catch_warnings(record=True) as caught:  # the one error line names every checkpoint: no more
            warnings.simplefilter("always")
            assert main(argv) == 2
        message = one_line_error(capsys)
        assert "no usable checkpoint" in message and "step_00000010" in message and "step_00000020" in message
        assert not [w for w in caught if "skipping unusable checkpoint" in str(w.message)], argv
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("spoil", [lambda path: _flip(path / "model.safetensors"), _pickle_payload],
                         ids=["corrupt", "verifies-but-unusable"])
def test_pruning_never_drops_a_valid_checkpoint_for_a_corrupt_one(small_data, tmp_path, spoil):
    """Stale checkpoints the resume skipped never count: neither a corrupt one nor one whose forged hashes verify
    but whose trainer.pt weights_only refuses (those pushed out the checkpoint just written, leaving none usable)."""
    config = tiny_config(small_data, "train.steps=30", "train.keep_checkpoints=2", "train.checkpoint_every=5")
    Trainer(config, tmp_path / "straight", progress=False, log=quiet).run()
    shutil.copytree(tmp_path / "straight", tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000025", "step_00000030"]
    shutil.rmtree(root / "step_00000030")  # as if killed before the last save...
    for name in ("step_00000090", "step_00000095"):  # ...beside stale corrupt checkpoints that sort newer
        shutil.copytree(root / "step_00000025", root / name)
        spoil(root / name)
    lines = []
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        Trainer(config, tmp_path / "run", resume=True, progress=False, log=lines.append).run()
    assert "resumed from step 25" in lines
    assert [p.name for p in list_checkpoints(root)] == ["step_00000025", "step_00000030", "step_00000090",
                                                        "step_00000095"]
    expected, got = final_weights(tmp_path / "straight"), load_file(root / "step_00000030" / "model.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_process_killed_while_pruning_leaves_no_half_deleted_checkpoint(small_data, tmp_path, monkeypatch):
    """Pruning renames a checkpoint before removing it, and the next save removes what a killed one left: a
    half-deleted checkpoint (state.json gone) counted as corrupt, so pruning never removed it (seen after SIGKILLs)."""
    config = tiny_config(small_data, "train.steps=40", "train.keep_checkpoints=2")

    class Killed(BaseException):
        pass

    real_rmtree = shutil.rmtree

    def dying_rmtree(path, *args, **kwargs):
        if Path(path).parent.name == "checkpoints" and (Path(path) / "state.json").exists():
            (Path(path) / "state.json").unlink()  # the first file gone, then the process dies
            raise Killed
        return real_rmtree(path, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(checkpoint_module.shutil, "rmtree", dying_rmtree)
        Trainer(config, tmp_path / "run", progress=False, log=quiet).run()
    Trainer(config, tmp_path / "run", resume=True, progress=False, log=quiet).run()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000030", "step_00000040"]


def test_branch_and_init_weights_are_checked_before_the_run_is_written(finished_run, small_data, tmp_path, capsys):
    source = copy_run(finished_run, tmp_path)
    _pickle_payload(source / "checkpoints" / "step_00000010")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    integers = tmp_path / "integers.safetensors"
    state = load_file(source / "checkpoints" / "step_00000020" / "model.safetensors")
    save_file({k: v.to(torch.int32) for k, v in state.items()}, integers)
    nan = tmp_path / "nan.safetensors"
    save_file({k: v * float("nan") for k, v in state.items()}, nan)
    before = snapshot(tmp_path)
    cases = [(f"train.branch_from={source / 'checkpoints' / 'step_00000010'}", "objects other than tensors"),
             (f"train.init_from={garbage}", "train.init_from"), (f"train.init_from={integers}", "not floating point"),
             (f"train.init_from={nan}", "NaN"), (f"train.init_from={tmp_path / 'missing'}", "not found")]
    # given weights need their own tokenizer (data prepared with it lands outside the snapshot)
    tokenizer = [f"data.tokenizer={small_data / 'tokenizer.json'}",
                 f"data.dir={tmp_path.parent / (tmp_path.name + '-data')}"]
    for override, expected in cases:
        sets = [x for o in [override, *(tokenizer if "init_from" in override else [])] for x in ("--set", o)]
        assert main(["train", str(tmp_path / "run.toml"), *sets, "--out", str(tmp_path / "new")]) == 2
        message = one_line_error(capsys)
        assert expected in message, message
        assert snapshot(tmp_path) == before


# -- destructive output paths ----------------------------------------------------------------------------------

def test_export_never_deletes_what_it_did_not_write(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep me")
    user_file = tmp_path / "file.txt"
    user_file.write_text("keep me too")
    before = snapshot(tmp_path)
    for target, expected in ((run, "overlaps the run"), (run / "hf", "overlaps the run"),
                             (tmp_path, "overlaps the run"), (user_dir, "did not write"),
                             (user_file, "is a file"), (user_file / "sub", "is a file")):
        assert main(["export", str(run), "--to", str(target)]) == 2, target
        assert expected in one_line_error(capsys), target
        assert snapshot(tmp_path) == before
    assert main(["export", str(run), "--to", str(tmp_path / "hf")]) == 0
    assert main(["export", str(run), "--to", str(tmp_path / "hf")]) == 0  # its own earlier export: replaced
    (tmp_path / "hf" / "README.md").write_text("the user's model card")
    snap = snapshot(tmp_path)
    assert main(["export", str(run), "--to", str(tmp_path / "hf")]) == 2
    assert "README.md" in one_line_error(capsys)
    assert snapshot(tmp_path) == snap
    assert main(["export", str(run), "--to", str(user_dir), "--overwrite"]) == 0
    assert (user_dir / "config.json").is_file() and not (user_dir / "notes.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_data_outputs_never_replace_what_they_did_not_write(finished_run, small_data, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep me")
    user_file = tmp_path / "file.txt"
    user_file.write_text("keep me too")
    before = snapshot(tmp_path)
    prepare = ["data", "prepare", "--sources", "milton", "--vocab", "300", "--out"]
    for target, expected in ((user_dir, "did not write"), (run, "did not write"), (user_file, "is a file"),
                             (user_file / "x", "is a file")):
        assert main([*prepare, str(target)]) == 2, target
        assert expected in one_line_error(capsys), target
        assert snapshot(tmp_path) == before
    for data_dir, expected in ((run, "contains the run directory"), (tmp_path, "contains the run directory"),
                               (user_dir, "did not write")):
        assert main(["train", str(tmp_path / "run.toml"), "--out", str(run), "--resume",
                     "--set", f"data.dir={data_dir}"]) == 2
        message = one_line_error(capsys)
        assert expected in message or "differs" in message, message
        assert main(["train", str(tmp_path / "run.toml"), "--out", str(tmp_path / "new"),
                     "--set", f"data.dir={data_dir}"]) == 2
        assert ("did not write" if data_dir == run else expected) in one_line_error(capsys)
        assert snapshot(tmp_path) == before
    assert main([*prepare, str(tmp_path / "data")]) == 0
    assert main([*prepare, str(tmp_path / "data"), "--set", "data.val_fraction=0.05"]) == 0  # stale: rebuilt
    assert main([*prepare, str(user_dir), "--overwrite"]) == 0
    assert not (user_dir / "notes.txt").exists() and (user_dir / "meta.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no lock or temporary files beside


def test_overwrite_removes_only_what_a_run_writes(small_data, tmp_path, capsys):
    config = tiny_config(small_data, "train.steps=5")
    (tmp_path / "run.toml").write_text(to_toml(config))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "run.toml"), "--out", str(run)]) == 0
    (run / "notes.txt").write_text("mine")
    (run / "init").mkdir()  # an import's weights: a new start from the import needs them
    (run / "init" / "model.safetensors").write_bytes(b"weights")
    old_checkpoint = list_checkpoints(run / "checkpoints")[-1]
    (old_checkpoint / "marker").write_text("from the first run")
    assert main(["train", str(tmp_path / "run.toml"), "--out", str(run), "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "mine" and (run / "init" / "model.safetensors").read_bytes() == b"weights"
    assert not (old_checkpoint / "marker").exists()  # the old run's checkpoints were replaced
    assert main(["train", str(tmp_path / "run.toml"), "--out", str(run), "--overwrite", "--resume"]) == 2
    assert "contradict" in one_line_error(capsys)


def test_a_failed_start_leaves_no_run_directory(small_data, tmp_path, capsys):
    config = tiny_config(small_data, "train.steps=5")
    (tmp_path / "run.toml").write_text(to_toml(config))
    for override in ("train.batch_size=100000", f"train.branch_from={tmp_path}", "model.vocab_size=1000000000",
                     "model.max_seq_len=1000000000", "model.n_layers=100000000"):
        assert main(["train", str(tmp_path / "run.toml"), "--set", override, "--out", str(tmp_path / "run")]) == 2
        one_line_error(capsys)
        assert not (tmp_path / "run").exists(), override
    assert main(["train", str(tmp_path / "run.toml"), "--out", str(tmp_path / "run")]) == 0  # the corrected command


# -- malformed inputs ------------------------------------------------------------------------------------------

BAD_SETS = [
    "train.threads=-1", "optim.eps=-1", "optim.eps=0", "optim.lr=0", "optim.lr=nan", "optim.lr=inf", "optim.lr=-1e-3",
    "optim.muon_lr=0", "optim.beta1=1", "optim.beta2=-0.1", "optim.weight_decay=-1", "optim.scale_lr_mult=0",
    "optim.embedding_lr_mult=-1", "optim.head_lr_mult=nan", "optim.muon_ns_steps=0", "optim.name=sgd",
    "optim.muon_momentum=1.5", "optim.muon_ns_dtype=float16", "model.d_model=0", "model.d_model=-8",
    "model.n_heads=3", "model.n_kv_heads=3", "model.d_ff=0", "model.norm=batch", "model.norm_eps=0",
    "model.init_std=-0.02", "model.rope_theta=0", "model.vocab_size=0", "model.moe_experts=-1",
    "model.preset=cpu-9m", "model.d_model=abc", "model.tie_embeddings=maybe", "model.nope=1", "nope.x=1",
    "strategy.preset=bogus", "strategy.scale=magic", "strategy.dnp=z", "strategy.dual_placement=qq",
    "strategy.qk_scale_shape=row",
    "schedule.name=linear", "schedule.warmup_steps=-1", "schedule.min_lr_ratio=2", "schedule.decay_fraction=-0.5",
    "schedule.decay_shape=square", "schedule.decay_start=100000", "train.steps=0", "train.batch_size=0",
    "train.grad_accum=0", "train.seq_len=0", "train.seq_len=100000", "train.grad_clip=-1", "train.z_loss=-1",
    "train.eval_every=0", "train.log_every=0", "train.checkpoint_every=0", "train.keep_checkpoints=0",
    "train.nonfinite=ignore", "train.device=tpu", "train.compile=yes", "dist.mode=zero3", "data.val_fraction=1",
    "data.vocab_size=100", "data.shard_tokens=0", "data.val_tokens=-1", "data.split_seed=-1", "data.dir=",
    "data.sources=nosuch", "data.inputs=/nonexistent/file.txt", "moe.router=relu", "moe.balance=magic",
    "moe.aux_loss=-1", "moe.bias_rate=-0.1", "moe.dispatch=fast", "seed=-1", "train.batch_size=100000",
    "model.vocab_size=1000000000", "model.max_seq_len=1000000000", "model.n_layers=100000000", "=1", "train",
    "train.steps=1.5", "data.val_tokens=nan", "seed=4294967296", "seed=99999999999999999999",
]


def _malformed_cases(sandbox: Path) -> list[list[str]]:
    run, cfg = str(sandbox / "run"), str(sandbox / "run.toml")
    file = str(sandbox / "file.txt")
    cases = [["train", cfg, "--set", s, "--out", str(sandbox / "new")] for s in BAD_SETS]
    cases += [
        ["generate", run, "--prompt", "hi", "--temperature", "nan"],
        ["generate", run, "--prompt", "hi", "--temperature", "-1"],
        ["generate", run, "--prompt", "hi", "--temperature", "inf"],
        ["generate", run, "--prompt", "hi", "--top-p", "-0.1"],
        ["generate", run, "--prompt", "hi", "--top-p", "0"],
        ["generate", run, "--prompt", "hi", "--top-p", "1.5"],
        ["generate", run, "--prompt", "hi", "--top-k", "-3"],
        ["generate", run, "--prompt", "hi", "--max-new-tokens", "-5"],
        ["generate", run, "--prompt", "hi", "--max-new-tokens", "0"],
        ["generate", run, "--prompt", "hi", "--seed", "99999999999999999999999"],
        ["generate", run, "--prompt", ""],
        ["generate", str(sandbox / "mine"), "--prompt", "hi"],
        ["generate", run],
        ["bench", "--repeats", "0"], ["bench", "--repeats", "-1"], ["bench", "--warmup", "-1"],
        ["bench", "--peak-tflops", "-5"], ["bench", "--strategies", ","], ["bench", "--mode", "turbo"],
        ["bench", "--config", "nosuch-preset"], ["bench", "--set", "model.vocab_size=4611686018427387904"],
        *([["bench", "--set", "train.device=cuda"]] if not torch.cuda.is_available() else []),
        *([["eval", run, "--data", file, "--device", "cuda"]] if not torch.cuda.is_available() else []),
        ["train", cfg, "--set", "strategy.dual_placement=q,k", "--set", "strategy.dnp=k",
         "--out", str(sandbox / "new")],
        ["train", cfg, "--set", "train.init_from=run.toml", "--out", str(sandbox / "new")],
        ["train", cfg, "--set", "train.branch_from=run", "--out", str(sandbox / "new")],
        ["train", cfg, "--set", "data.dir=run", "--out", str(sandbox / "new")],
        ["train", cfg, "--set", "data.dir=file.txt", "--out", str(sandbox / "new")],
        ["train", cfg, "--out", file], ["train", cfg, "--out", f"{file}/sub"],
        ["train", cfg, "--out", run], ["train", cfg, "--out", run, "--resume", "--overwrite"],
        ["train", "--out", str(sandbox / "mine"), "--resume"], ["train", "--resume"],
        ["train", str(sandbox / "missing.toml")], ["train", str(sandbox / "file.txt")], ["train", "not-a-preset"],
        ["train", cfg, "--out", run, "--resume", "--set", "train.steps=6"],
        ["export", run, "--to", file], ["export", run, "--to", run], ["export", run, "--to", str(sandbox / "mine")],
        ["export", str(sandbox / "mine"), "--to", str(sandbox / "hf2")], ["export", run],
        ["import", str(sandbox / "mine"), "--out", str(sandbox / "imp")],
        ["import", str(sandbox / "bad_hf"), "--out", str(sandbox / "imp")],
        ["import", str(sandbox / "int_hf"), "--out", str(sandbox / "imp")],
        ["import", str(sandbox / "nan_hf"), "--out", str(sandbox / "imp")],
        ["import", str(sandbox / "nan_hf"), "--out", file],
        *[["import", str(sandbox / name), "--out", str(sandbox / "imp")]
          for name in ("list_hf", "float_hf", "zero_hf", "window_hf", "index_hf")],
        ["generate", str(sandbox / "float_hf"), "--prompt", "hi"],
        *[["import", str(sandbox / "good_hf"), "--out", str(sandbox / "imp"), "--set", setting]
          for setting in ("train.init_from=x.safetensors", "data.inputs=/nonexistent.txt",
                          "data.tokenizer=/nonexistent.json", "data.sources=nosuch")],  # a run that could not start
        ["generate", str(sandbox / "tokenizer_hf"), "--prompt", "hi"],
        ["generate", str(sandbox / "tokenizer_run"), "--prompt", "hi"],
        ["export", str(sandbox / "tokenizer_run"), "--to", str(sandbox / "hf3")],
        ["export", str(sandbox / "reshaped_run"), "--to", str(sandbox / "hf3")],
        ["generate", str(sandbox / "reshaped_run"), "--prompt", "hi"],
        ["eval", str(sandbox / "reshaped_run"), "--data", file],
        ["eval", str(sandbox / "list_hf"), "--data", file],
        ["data", "prepare", "--input", str(sandbox / "bad.jsonl"), "--out", str(sandbox / "d")],
        ["data", "prepare", "--input", str(sandbox / "latin1.txt"), "--out", str(sandbox / "d")],
        ["data", "prepare", "--input", str(sandbox / "missing.txt"), "--out", str(sandbox / "d")],
        ["data", "prepare", "--input", str(sandbox / "mine"), "--out", str(sandbox / "d")],
        ["data", "prepare", "--sources", "nosuch", "--out", str(sandbox / "d")],
        ["data", "prepare", "--vocab", "10", "--out", str(sandbox / "d")],
        ["data", "prepare", "--sources", "milton", "--workers", "100000", "--out", str(sandbox / "d")],
        ["data", "prepare", "--input", file, "--vocab", "99999999999", "--out", str(sandbox / "d")],
        *[["data", "import", "--train", str(sandbox / train), "--val", str(sandbox / val), "--tokenizer",
           str(sandbox / "tokenizer.json"), "--out", str(sandbox / "d")]
          for train, val in (("empty.bin", "tokens.bin"), ("tokens.bin", "empty.bin"))],
        ["data", "prepare", "--sources", "milton", "--out", file],
        ["data", "prepare", "--sources", "milton", "--out", str(sandbox / "mine")],
        ["data", "prepare", "--tokenizer", str(sandbox / "missing.json"), "--out", str(sandbox / "d")],
        ["sweep", "nosuch"], ["sweep", "removal", "--jobs", "0"], ["sweep", "removal", "--seeds", "0"],
        ["sweep", "removal", "--jobs", "100000"], ["compare", "--config", cfg, "--jobs", "100000"],
        # a results folder of another suite, or one whose suite.json is scrambled, would have it rewritten
        ["sweep", "removal", "--out", str(sandbox / "sw"), "--results", str(sandbox / "partial_sweep")],
        ["sweep", "removal", "--out", str(sandbox / "sw"), "--results", str(sandbox / "garbled_sweep")],
        ["sweep", "removal", "--out", str(sandbox / "other_sweep")],
        ["sweep", "removal", "--out", str(sandbox / "sw"), "--set", "data.inputs=/nonexistent.txt"],
        ["sweep", "removal", "--out", str(sandbox / "sw"), "--set", f"data.dir={sandbox / 'mine'}"],
        *([["sweep", "removal", "--out", str(sandbox / "sw"), "--set", "train.device=cuda"]]
          if not torch.cuda.is_available() else []),  # every run would fail alike: refused before the first
        *([["compare", "--config", cfg, "--jobs", "2", "--out", str(sandbox / "cmp"), "--set", "train.device=cuda"]]
          if not torch.cuda.is_available() else []),
        ["sweep", "removal", "--out", file],
        ["report", str(sandbox / "mine")], ["compare", "--strategies", "standard"],
        ["compare", "--preset", "nosuch"], ["compare", "--config", cfg, "--strategies", "standard,standard"],
        ["compare", "--config", cfg, "--out", file], ["compare", "--config", cfg, "--out", str(sandbox / "mine")],
        ["compare", "--config", cfg, "--jobs", "2", "--out", str(sandbox / "compare_mine")],
        ["sweep", "removal", "--out", str(sandbox / "mine")], ["sweep", "removal", "--out", run],
        *[["sweep", str(sandbox / f"{name}_suite.toml"), "--out", str(sandbox / "sw")]
          for name in ("binary", "syntax", "partial", "mistyped", "armless")],
        *[["report", str(sandbox / f"{name}_sweep")] for name in ("garbled", "list", "partial", "mistyped")],
        *[["compare", "--config", cfg, "--reference", str(sandbox / f"{name}_sweep"), "--out", str(sandbox / "cmp")]
          for name in ("garbled", "list", "mistyped")],
        ["schedule", "--steps", "0"], ["schedule", "--out", str(sandbox / "mine")],
        ["schedule", "--out", f"{file}/x.png"], ["schedule", "--out", file],
        ["theory", "fold", "--out", file], ["theory", "nosuch"],
        ["theory", "fold", "--fast", "--out", str(sandbox / "theory_mine")],  # a fold.json of the user's
        ["info", "nosuch"], ["info", "cpu-1m", "--set", "model.d_model=7"],
        [], ["nosuch"], ["train", "--bogus-flag"], ["generate", run, "--prompt", "x", "--top-k", "three"],
        ["data"], ["data", "nosuch"],
        # /proc takes no new files, though root passes every permission check: refused when creating fails
        *([["train", cfg, "--out", "/proc/scalevec-run"], ["schedule", "--out", "/proc/scalevec.png"],
           ["theory", "fold", "--fast", "--out", "/proc/scalevec-theory"]] if Path("/proc/self").is_dir() else []),
        # an empty path would silently mean the current directory or the default (train and sweep ran there)
        ["train", cfg, "--out", "", "--dry-run"], ["sweep", "removal", "--out", ""], ["theory", "fold", "--out", ""],
        ["export", run, "--to", " "], ["eval", run, "--data", ""], ["info", ""], ["report", ""],
    ]
    return cases


@pytest.fixture(scope="module")
def sandbox(finished_run, small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sandbox")
    shutil.copytree(finished_run / "run", root / "run")
    shutil.copy(finished_run / "run.toml", root / "run.toml")
    (root / "file.txt").write_text("a user's file\n")
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("keep\n")
    (root / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    hf = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32, "max_position_embeddings": 32,
          "tie_word_embeddings": True}
    shapes = {"model.embed_tokens.weight": (64, 16), "model.norm.weight": (16,),
              "model.layers.0.input_layernorm.weight": (16,), "model.layers.0.post_attention_layernorm.weight": (16,),
              "model.layers.0.self_attn.q_proj.weight": (16, 16), "model.layers.0.self_attn.k_proj.weight": (8, 16),
              "model.layers.0.self_attn.v_proj.weight": (8, 16), "model.layers.0.self_attn.o_proj.weight": (16, 16),
              "model.layers.0.mlp.gate_proj.weight": (32, 16), "model.layers.0.mlp.up_proj.weight": (32, 16),
              "model.layers.0.mlp.down_proj.weight": (16, 32)}
    for name, transform in (("int_hf", lambda t: t.to(torch.int64)),
                            ("nan_hf", lambda t: t.clone().fill_(float("nan")) if t.dim() == 2 else t),
                            ("tokenizer_hf", lambda t: t), ("good_hf", lambda t: t)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(hf))
        save_file({k: transform(torch.randn(s)) for k, s in shapes.items()}, root / name / "model.safetensors")
    (root / "bad_hf").mkdir()
    (root / "bad_hf" / "config.json").write_text("{not json")
    for name, config in (("list_hf", []), ("float_hf", {**hf, "num_hidden_layers": 1.0}),  # config.json mistyped
                         ("zero_hf", {**hf, "num_attention_heads": 0}), ("window_hf", {**hf, "sliding_window": "x"}),
                         ("index_hf", hf)):
        shutil.copytree(root / "nan_hf", root / name)
        (root / name / "config.json").write_text(json.dumps(config))
    (root / "index_hf" / "model.safetensors.index.json").write_text('{"weight_map": 5}')
    (root / "tokenizer_hf" / "tokenizer.json").write_text("{not json")  # a malformed tokenizer beside good weights
    shutil.copytree(root / "run", root / "tokenizer_run")
    config = (root / "run" / "config.toml").read_text()
    assert 'tokenizer = ""' in config
    (root / "tokenizer_run" / "config.toml").write_text(
        config.replace('tokenizer = ""', f'tokenizer = "{root / "tokenizer_hf" / "tokenizer.json"}"'))
    shutil.copytree(root / "run", root / "reshaped_run")  # config.toml edited after training: d_model doubled
    d_model = load_config(root / "run" / "config.toml").model.d_model
    (root / "reshaped_run" / "config.toml").write_text(
        config.replace(f"d_model = {d_model}\n", f"d_model = {2 * d_model}\n"))
    (root / "compare_mine").mkdir()  # a hand-written config beside the comparison it would be replaced by
    (root / "compare_mine" / "standard.toml").write_text("seed = 0\n")
    (root / "theory_mine").mkdir()
    (root / "theory_mine" / "fold.json").write_text('{"mine": true}\n')
    (root / "empty.bin").write_bytes(b"")
    (root / "tokens.bin").write_bytes(bytes(64))  # 32 uint16 ids, all 0
    shutil.copy(small_data / "tokenizer.json", root / "tokenizer.json")
    (root / "binary_suite.toml").write_bytes(b"\xff\xfe[cpu]\n")
    (root / "syntax_suite.toml").write_text("[cpu\n")
    (root / "partial_suite.toml").write_text('[cpu]\nsizes = ["cpu-0.5m"]\n')  # no baseline, no grid
    for name, record in (("garbled_sweep", "{not json"), ("list_sweep", "[]"), ("partial_sweep", '{"name": "x"}')):
        (root / name).mkdir()
        (root / name / "suite.json").write_text(record)
    (root / "other_sweep").mkdir()  # the record of another suite's sweep
    suite = load_suite("weight-decay", "cpu")
    (root / "other_sweep" / "suite.json").write_text(json.dumps(dataclasses.asdict(suite)))
    (root / "mistyped_sweep").mkdir()  # every field present, one of the wrong type
    (root / "mistyped_sweep" / "suite.json").write_text(json.dumps({**dataclasses.asdict(suite), "seeds": "0,1"}))
    (root / "armless_suite.toml").write_text(  # an analysis whose arms are a list, not a table of effects
        (SUITE_DIR / "study-scale.toml").read_text().replace("arms = { unified = -0.04 }", 'arms = ["unified"]'))
    (root / "mistyped_suite.toml").write_text(
        (SUITE_DIR / "removal.toml").read_text().replace("lr_seed = ", "lr_seed = 1.5 #"))
    return root


def test_malformed_inputs_are_one_line_exit_2_and_change_nothing(sandbox, capsys, monkeypatch):
    monkeypatch.chdir(sandbox)
    cases = _malformed_cases(sandbox)
    assert len(cases) >= 100
    before = snapshot(sandbox)
    failures = []
    for argv in cases:
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if not line.startswith("scalevec: warning:")]
        if code != 2 or len(errors) != 1 or not errors[0].startswith("scalevec: error: "):
            failures.append((argv, code, err))
        after = snapshot(sandbox)
        if after != before:
            failures.append((argv, "changed", sorted(set(after.items()) ^ set(before.items()))[:3]))
            before = after
    assert not failures, failures


def test_unreadable_inputs_and_unwritable_outputs_are_one_line(tmp_path, monkeypatch, capsys):
    """What a non-root user meets with permissions (root reads and writes anything, so both are simulated)."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "hello"}\n{"text": "world"}\n')
    real_open = open

    def deny(path, *args, **kwargs):
        if str(path) == str(source):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr("builtins.open", deny)
        assert main(["data", "prepare", "--input", str(source), "--out", str(tmp_path / "out")]) == 2
    assert "cannot read" in one_line_error(capsys) and not (tmp_path / "out").exists()
    locked = tmp_path / "readonly"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr("scalevec.outputs.os.access",
                        lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    for argv in (["data", "prepare", "--input", str(source), "--out", str(locked / "out")],
                 ["train", "cpu-0.5m", "--out", str(locked / "run")],
                 ["compare", "--out", str(locked / "cmp")],
                 ["import", str(tmp_path), "--out", str(locked / "imp")]):
        assert main(argv) == 2, argv
        assert "is not writable" in one_line_error(capsys), argv
    assert list(locked.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "readonly"]
