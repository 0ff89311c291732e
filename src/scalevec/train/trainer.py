"""The training loop: one run = one directory (rundir.py), written by one process at a time.

The data are prepared before (`scalevec train` and `compare` do it; data/prepare.py). Constructing a
Trainer only reads: everything a start can refuse (config, memory, data, init and branch weights, the
run directory) is checked there (train/preflight.py). `run()` takes the run directory (its lock and
config), trains, and releases it however it ends; a start that fails leaves nothing.
metrics.jsonl holds one record per logged step; val_loss and scale diagnostics at eval steps.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import CheckpointError
from ..config import Config
from ..data.loader import Loader, split_global_batch, validation_batches
from ..data.prepare import require_prepared
from ..data.references import bits_per_byte
from ..dist import all_reduce, all_sum, barrier, fail_together, gradient_sync, init_world, watch_failures, wrap
from ..model import Decoder, build_model
from ..moe import expert_balancing_hook
from ..optim import Optimizers
from ..outputs import append_line, writing
from ..rundir import METRICS_NAME, RunDir, TrainError, truncate_metrics
from ..schedule import lr_factor
from ..summary import flops_per_token
from .checkpointing import CheckpointManager, Counters
from .diagnostics import scale_diagnostics
from .loggers import LOGGERS, ProgressLines
from .preempt import StoppedEarly, StopRequests
from .preflight import Plan, branch_misfit, preflight
from .utilization import mfu, peak_tflops


def lm_objective(forward, inputs: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, cross-entropy) of next-token prediction; `forward` maps tokens to logits.

    Compiled as one graph with the model, so the fp32 upcast, log-softmax and their backward fuse
    instead of writing vocabulary-wide fp32 tensors (measured in benchmarks/compile_scope.py).
    """
    logits = forward(inputs).float().flatten(0, 1)
    ce = F.cross_entropy(logits, targets.flatten())
    if not z_loss:
        return ce, ce
    return ce + z_loss * torch.logsumexp(logits, -1).pow(2).mean(), ce


class Trainer:
    """A run, set up from its preflight: constructing one only reads (the config, data, weights, the run
    directory); `run()` takes the run directory (its lock), trains and releases it, however it ends."""

    def __init__(self, config: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
                 progress: bool | None = None, log=print, plan: Plan | None = None):
        """`plan`: this start's preflight, already run on prepared data (else it runs here)."""
        self.config, self.run_dir, self.progress, self.log = config, Path(run_dir), progress, log
        self.resume, self.overwrite = resume, overwrite
        t = config.train
        if plan is None or plan.data_dir is None:
            plan = preflight(config, self.run_dir, resume, overwrite)  # every check, before anything is written
        if plan.data_dir is None:
            require_prepared(config.data)  # its one line: prepare the data first (`scalevec train` does)
        if t.threads:
            torch.set_num_threads(t.threads)
        self.stop_requests = StopRequests(t.stop_signals, t.time_limit_s)  # the time limit counts from here
        self.world = world = init_world(plan.device)
        self.device = world.device
        if not world.main:
            self.log, self.progress = (lambda *_: None), False
        watch_failures(world, self._end_on_failure_elsewhere)
        with fail_together(world, TrainError):  # a rank that cannot start ends the others waiting in a collective
            self._build(plan)

    def _build(self, plan: Plan) -> None:
        config, t, world = self.config, self.config.train, self.world
        # under torchrun a process group exists at any world size, so one rank shards (and checkpoints) as many do
        self.sharded = world.grouped and config.dist.mode == "fsdp2"
        self.windows, self.val_windows, self.branch = plan.windows, plan.val_windows, plan.branch
        self.model = build_model(config.model, config.strategy, config.seed, config.moe).to(self.device)
        if plan.init is not None:  # before sharding; a checkpoint found by --resume replaces these weights
            self.model.load_state_dict(plan.init)
        self.model.checkpoint_blocks = t.activation_checkpointing
        self.model.use_fused_kernels(t.fused_kernels)
        self.infos = self.model.param_info()
        self.moe_layers = self.model.moe_layers()
        self.flops_per_token = flops_per_token(self.model, t.seq_len)
        self.peak_tflops = peak_tflops(self.device)  # None off CUDA or for a card of unknown peak: no MFU
        self.wrapped = wrap(self.model, config.dist.mode, self.device.type == "cuda") if world.grouped else self.model
        self.optimizers = Optimizers(self.model, config.optim, config.strategy.scale_decay, self.infos)
        if self.moe_layers:
            self.optimizers.register_step_post_hook(
                expert_balancing_hook(self.moe_layers, functools.partial(all_reduce, world=world)))
        self.loader = Loader(self.windows, t.batch_size, config.seed, world.rank, world.size)
        self.counters = Counters(global_batch=t.batch_size * t.grad_accum * world.size)  # resumed: the checkpoint's
        # model and loss as one graph, fed training batches only, all of one shape (evaluate() runs the model
        # eager); static shapes: another shape would get its own graph instead of making this one dynamic
        objective = functools.partial(lm_objective, self.wrapped, z_loss=t.z_loss)
        self.objective = torch.compile(objective, dynamic=False) if t.compile else objective
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else contextlib.nullcontext())
        self.stop_agreed = False
        self.metrics_path = self.run_dir / METRICS_NAME
        self.checkpoints = CheckpointManager(self.run_dir, config, world, self.model, self.optimizers, self.loader,
                                             self.counters, self.sharded)
        self.loggers: list = []

    @contextlib.contextmanager
    def _run_directory(self) -> Iterator[None]:
        """The run directory taken (locked, config written) and the run continued from it; released, with the
        loggers, when the block ends. A start that fails before the block removes the directory it created."""
        with fail_together(self.world, TrainError):  # a rank that cannot start ends the others waiting in a collective
            rundir = RunDir(self.run_dir, self.config, self.resume, self.overwrite) if self.world.main else None
            barrier(self.world)
            try:
                self._begin()
            except BaseException:
                self._release(rundir, failed=not self.resume)
                raise
        try:
            yield
        finally:
            self._release(rundir)

    def _begin(self) -> None:
        """Continue from the run directory's newest checkpoint (a resume) or train.branch_from's; open the loggers."""
        config, t, world = self.config, self.config.train, self.world
        if self.resume:
            self._restore()
        if self.step == 0 and self.branch is not None:
            try:
                self.checkpoints.apply(*self.branch)
            except CheckpointError as err:
                raise branch_misfit(err) from None
            self.log(f"branched from {self.branch[0]} at step {self.step}")
        self.loader.batch_size, self.grad_accum = split_global_batch(self.counters.global_batch, world.size,
                                                                     t.batch_size)
        self.loggers = [LOGGERS[name](self.run_dir, config, self.resume) for name in t.loggers] if world.main else []
        lines = not sys.stderr.isatty() if self.progress is None else False  # a log file or a job: plain lines
        if lines and world.main:
            self.loggers.append(ProgressLines(t.steps, self.step))

    def _release(self, rundir: RunDir | None, failed: bool = False) -> None:
        """Close the loggers and the run directory; `failed` start: remove the directory if it created it."""
        for logger in self.loggers:
            logger.close()
        self.loggers = []
        if rundir is not None:
            rundir.close(failed)

    def _end_on_failure_elsewhere(self, message: str) -> None:
        """Another rank failed while this one may wait in a collective that never returns: end at once, rank 0
        saying why as the CLI does (the lock goes with the process, the checkpoints are whole)."""
        if self.world.main:
            print(f"scalevec: error: {message}", file=sys.stderr, flush=True)
        os._exit(1)

    @property
    def step(self) -> int:
        """Optimizer steps taken."""
        return self.counters.step

    def _restore(self) -> None:
        found = self.checkpoints.restore()
        if found is None:
            self.log("no checkpoint yet; starting from step 0")
        if self.world.main:
            with writing(f"{self.metrics_path}", "resume with --resume", error=TrainError):
                truncate_metrics(self.run_dir, self.step if found else -1, self.log)
        barrier(self.world)
        if found is not None:
            self.log(f"resumed from step {self.step}")

    # -- loop --------------------------------------------------------------------------------------------------
    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective, cross-entropy)."""
        with self.autocast:
            objective, ce = self.objective(inputs, targets)
        for moe in self.moe_layers:
            objective = objective + moe.aux_loss
        return objective, ce

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss per token on the fixed validation set, overall (and in bits per byte) and per source."""
        self.model.eval()
        names = self.val_windows.source_names or [""]
        sums, counts = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
        t = self.config.train
        for sources, inputs, targets in validation_batches(self.val_windows, t.eval_batch_size,
                                                           self.config.data.val_tokens, self.world.rank,
                                                           self.world.size):
            with self.autocast:
                logits = self.wrapped(inputs.to(self.device))
            losses = F.cross_entropy(logits.float().transpose(1, 2), targets.to(self.device), reduction="none")
            for source, loss in zip(sources, losses.mean(1).tolist(), strict=True):
                if source is None:  # a row that fills this rank's last batch
                    continue
                sums[source] += loss
                counts[source] += 1
        self.model.train()
        totals = all_sum([*sums.values(), *counts.values()], self.world)
        sums, counts = dict(zip(names, totals[:len(names)])), dict(zip(names, totals[len(names):]))
        loss = sum(sums.values()) / sum(counts.values()) if sum(counts.values()) else float("nan")
        split = self.val_windows.meta["val"]
        record = {"val_loss": loss, "val_bpb": bits_per_byte(loss, split["tokens"], split["bytes"])}
        if self.val_windows.source_names:
            record["val_loss_by_source"] = {name: sums[name] / counts[name] for name in names if counts[name]}
        return record

    def _train_step(self) -> dict:
        t = self.config.train
        lr = lr_factor(self.config.schedule, self.step, t.steps)
        self.optimizers.set_lr_factor(lr)
        ce_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            inputs, targets = self.loader.next_batch()
            with gradient_sync(self.wrapped, micro == self.grad_accum - 1):  # all-reduce once, on the last one
                objective, ce = self._loss(inputs.to(self.device), targets.to(self.device))
                (objective / self.grad_accum).backward()
            ce_sum += ce.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip or math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        # the ranks' stop requests ride on the loss's all-reduce: all stop after the same step
        stop = torch.full((), float(self.stop_requests.requested()), device=self.device)  # a fill: no host copy
        summed = all_reduce(torch.stack([ce_sum.float() / self.grad_accum, stop]), self.world)
        loss, grad_norm, stops = torch.stack([summed[0] / self.world.size, grad_norm.float(), summed[1]]).tolist()
        self.stop_agreed = stops > 0  # the line above is the step's one host sync
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            if t.nonfinite == "stop":
                raise TrainError(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step "
                                 f"{self.step + 1}; the last good checkpoint is kept "
                                 "(train.nonfinite=skip skips such steps)")
            self.counters.skipped += 1
            for moe in self.moe_layers:  # a skipped step's routing does not move the expert bias either
                moe.step_load.zero_()
        else:
            self.optimizers.step()  # its hook balances the experts
        self.optimizers.zero_grad()
        self.counters.step += 1
        return {"lr": lr * self.config.optim.lr, "train_loss": loss, "grad_norm": grad_norm}

    def _expert_load(self) -> dict:
        """Load imbalance since the last record: max over mean tokens per expert, averaged over MoE layers."""
        if not self.moe_layers:
            return {}
        loads = all_reduce(torch.stack([moe.log_load for moe in self.moe_layers]), self.world)
        for moe in self.moe_layers:
            moe.log_load.zero_()
        return {"expert_imbalance": (loads.amax(1) / loads.mean(1).clamp(min=1)).mean().item()}

    def _write(self, record: dict) -> None:
        if not self.world.main:
            return

        def failed_write(path: Path):  # metrics.jsonl's and the loggers' (metrics.csv...): one line, resumable
            return writing(f"{path}", "resume with --resume", kept="the last checkpoint is intact", error=TrainError)

        with failed_write(self.metrics_path):
            append_line(self.metrics_path, json.dumps(record))
        for logger in self.loggers:
            with failed_write(getattr(logger, "path", self.run_dir)):
                logger.log(record)

    def _eval_record(self) -> dict:
        """Validation metrics, scale diagnostics, and the device the run computes on (a record made elsewhere, e.g.
        by a sweep on another machine, reads it here)."""
        evaluation, model = self.evaluate(), self._full_model()
        return {**evaluation, "scales": scale_diagnostics(model, self.infos) if model is not None else {},
                "device": self.device.type}

    def _full_model(self) -> Decoder | None:
        """The model with plain tensors: under FSDP2 an unsharded copy on rank 0 (None elsewhere; a collective)."""
        if not self.sharded:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.world.main:
            return None
        copy = Decoder(self.config.model, self.config.strategy, self.config.moe)
        copy.load_state_dict(state)
        return copy

    def run(self) -> dict:
        """Take the run directory, train to train.steps and release it; StoppedEarly after checkpointing the step
        reached when a stop was requested."""
        with self._run_directory():
            bar = tqdm(total=self.config.train.steps, initial=self.step, unit="step", dynamic_ncols=True,
                       file=sys.stderr, disable=None if self.progress is None else not self.progress)
            try:
                with self.stop_requests, fail_together(self.world, TrainError, passing=(StoppedEarly,)):
                    return self._loop(bar)
            finally:
                bar.close()

    def _loop(self, bar: tqdm) -> dict:
        t = self.config.train
        tokens_per_step = self.counters.global_batch * t.seq_len
        if self.step == 0:
            self._write({"step": 0, "tokens": 0, **self._eval_record()})
        window_start, window_steps, last = time.perf_counter(), 0, {}
        while self.step < t.steps:
            last = self._train_step()
            window_steps += 1
            done = self.step == t.steps
            evaluate = self.step % t.eval_every == 0 or done
            if self.step % t.log_every == 0 or evaluate:
                # throughput of the training steps since the last record, evaluation and saving excluded
                tokens_per_s = window_steps * tokens_per_step / (time.perf_counter() - window_start)
                last = {"step": self.step, "tokens": self.step * tokens_per_step, **last, "tokens_per_s": tokens_per_s,
                        "skipped": self.counters.skipped, **self._expert_load()}
                if self.peak_tflops:
                    last["mfu"] = mfu(self.flops_per_token, tokens_per_s, self.peak_tflops, self.world.size)
                if evaluate:
                    last |= self._eval_record()
                self._write(last)
                bar.set_postfix(loss=f"{last['train_loss']:.3f}", tok_s=f"{tokens_per_s:.0f}",
                                **({"mfu": f"{last['mfu']:.1%}"} if "mfu" in last else {}))
            stopping = self.stop_agreed and not done
            if self.step % t.checkpoint_every == 0 or done or stopping:
                self.checkpoints.save()
            if stopping:
                reason = self.stop_requests.reason or "another rank's request"
                raise StoppedEarly(f"stopped at step {self.step} of {t.steps} on {reason}; the checkpoint of step "
                                   f"{self.step} is saved: continue with scalevec train --resume --out {self.run_dir}")
            if "tokens_per_s" in last and last["step"] == self.step:
                window_start, window_steps = time.perf_counter(), 0
            bar.update(1)
        return last
