"""`scalevec ARGS` on one rank of torchrun with a fault injected from a given step on a given rank, for
test_fail_together.py: `torchrun ... tests/fault_injection.py FAULT RANK STEP TIME_FILE -- ARGS`. The faulty
rank writes the time of the fault to TIME_FILE.
"""

import errno
import os
import sys
import time

import torch

from scalevec.cli import main
from scalevec.train import trainer as trainer_module


def at_fault(time_file: str) -> None:
    with open(time_file, "w") as fh:
        fh.write(str(time.time()))


def inject(fault: str, step: int, time_file: str) -> None:
    """Patch this process so that `fault` happens once its trainer reaches optimizer step `step`."""
    trainer_class = trainer_module.Trainer
    reached = {"step": 0}
    train_step = trainer_class._train_step

    def counting_step(self):
        reached["step"] = self.step + 1
        return train_step(self)
    trainer_class._train_step = counting_step

    if fault == "nan":
        loss = trainer_class._loss

        def poisoned(self, inputs, targets):
            objective, ce = loss(self, inputs, targets)
            if reached["step"] >= step:
                at_fault(time_file)
                return objective * float("nan"), ce * float("nan")
            return objective, ce
        trainer_class._loss = poisoned
    elif fault == "error":
        next_batch = trainer_module.Loader.next_batch

        def failing(self):
            if reached["step"] >= step:
                at_fault(time_file)
                raise ValueError(f"injected fault on this rank at step {reached['step']}")
            return next_batch(self)
        trainer_module.Loader.next_batch = failing
    elif fault == "metrics_full":
        append_line = trainer_module.append_line

        def full(path, line):
            if reached["step"] >= step:
                at_fault(time_file)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return append_line(path, line)
        trainer_module.append_line = full
    elif fault == "shard_full":  # this rank's FSDP2 shard cannot be written
        from torch.distributed.checkpoint.filesystem import FileSystemWriter

        write_data = FileSystemWriter.write_data

        def full_disk(writer, plan, planner):
            if reached["step"] >= step:
                at_fault(time_file)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(writer.path))
            return write_data(writer, plan, planner)
        FileSystemWriter.write_data = full_disk
    elif fault == "checkpoint_refused":  # rank 0's model.safetensors is refused (permissions)
        save_file = trainer_module.save_file

        def refused(tensors, path):
            if reached["step"] >= step:
                at_fault(time_file)
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return save_file(tensors, path)
        trainer_module.save_file = refused
    else:
        raise SystemExit(f"unknown fault {fault}")


if __name__ == "__main__":
    fault, rank, step, time_file, separator, *args = sys.argv[1:]
    assert separator == "--"
    torch.set_num_threads(1)
    if os.environ["RANK"] == rank:
        inject(fault, int(step), time_file)
    sys.exit(main(args))
