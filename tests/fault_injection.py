"""`scalevec ARGS` on one rank of torchrun with a fault injected from a given step on a given rank, for
test_fail_together.py: `torchrun ... tests/fault_injection.py FAULT RANK STEP TIME_FILE -- ARGS`. The faulty
rank writes the time of the fault to TIME_FILE.
"""

import errno
import os
import signal
import sys
import time

import torch
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from scalevec import dist
from scalevec.cli import main
from scalevec.train import checkpointing
from scalevec.train import trainer as trainer_module


def os_error(code: int):
    return lambda *args: OSError(code, os.strerror(code))


# fault: (owner, attribute, the error its call raises once the step is reached)
FAILING_CALLS = {
    "error": (trainer_module.Loader, "next_batch", lambda *a: ValueError("injected fault on this rank")),
    "metrics_full": (trainer_module, "append_line", os_error(errno.ENOSPC)),  # rank 0 writes metrics.jsonl
    "checkpoint_refused": (checkpointing, "save_file", os_error(errno.EACCES)),  # rank 0's model.safetensors
    "shard_full": (FileSystemWriter, "write_data", os_error(errno.ENOSPC)),  # this rank's FSDP2 shard
}


def inject(fault: str, step: int, time_file: str) -> None:
    """Patch this process so that `fault` happens once its trainer reaches optimizer step `step`."""
    trainer_class = trainer_module.Trainer
    train_step = trainer_class._train_step

    def reached() -> bool:
        if reached.step >= step:
            with open(time_file, "w") as fh:
                fh.write(str(time.time()))
            return True
        return False
    reached.step = 0

    def counting_step(self):
        reached.step = self.step + 1
        return train_step(self)
    trainer_class._train_step = counting_step

    if fault == "hang":  # this rank fails, posts its line and then hangs instead of exiting
        post_failure = dist.post_failure

        def post_and_hang(message):
            post_failure(message)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's SIGTERM, once rank 0 has ended, ends it
            time.sleep(600)
        dist.post_failure = post_and_hang
        fault = "error"
    if fault == "nan":
        loss = trainer_class._loss

        def poisoned(self, inputs, targets):
            objective, ce = loss(self, inputs, targets)
            return (objective * float("nan"), ce * float("nan")) if reached() else (objective, ce)
        trainer_class._loss = poisoned
        return
    owner, attribute, error = FAILING_CALLS[fault]
    real = getattr(owner, attribute)

    def failing(*args, **kwargs):
        if reached():
            raise error(*args)
        return real(*args, **kwargs)
    setattr(owner, attribute, failing)


if __name__ == "__main__":
    fault, rank, step, time_file, separator, *args = sys.argv[1:]
    assert separator == "--"
    torch.set_num_threads(1)
    if os.environ["RANK"] == rank:
        inject(fault, int(step), time_file)
    sys.exit(main(args))
