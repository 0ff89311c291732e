"""The `scalevec` command."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

from .config import BUNDLED_SOURCES, MODEL_PRESETS, PROSE_SOURCES, ConfigError, load_config, to_dict, to_toml, validate
from .data.sources import DataError
from .errors import BadInput, RunStopped
from .outputs import OutputError, check_output_path, first_line, is_disk_full, writing
from .rundir import RunDirError
from .train.preempt import StoppedEarly


class UsageError(BadInput):
    """Bad input from the user: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line pointing to --help (exit 2)."""

    def error(self, message: str):
        print(f"scalevec: error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def _reusable_output(out: Path, is_own, what: str, flag: str = "--out") -> None:
    """--out of a command that continues its own earlier output: refuse any other non-empty directory."""
    check_output_path(out, flag)
    if out.is_dir() and any(out.iterdir()) and not is_own(out):
        raise OutputError(f"{flag} {out} is a non-empty directory that is not {what}; choose another {flag}")


def _is_comparison(out: Path) -> bool:
    """Whether everything in `out` is what compare writes: its report files, run directories, each strategy's
    resolved config (NAME.toml, written by scalevec: it carries `format`) and its log."""
    import tomllib

    def written(path: Path) -> bool:
        if path.name in ("summary.json", "report.md", "loss.png", "gap.png") or (path / "config.toml").is_file():
            return True
        if path.suffix == ".log":
            return (out / f"{path.stem}.toml").is_file() or (out / path.stem).is_dir()
        try:
            return path.suffix == ".toml" and "format" in tomllib.loads(path.read_text())
        except (OSError, ValueError):  # not TOML, not UTF-8, or a directory
            return False

    return all(written(p) for p in out.iterdir())


def _file_output(path: str, flag: str) -> None:
    """A PNG to write: not a directory, not a file of another kind (a plot replaces only a plot), and its directory
    creatable and writable."""
    _require(not Path(path).is_dir(), f"{flag} {path} is a directory; give a file path")
    if Path(path).exists():
        _require(Path(path).is_file(), f"{flag} {path} exists and is not a regular file; give a new file path")
        with open(path, "rb") as fh:
            _require(fh.read(8) == b"\x89PNG\r\n\x1a\n", f"{flag} {path} exists and is not a PNG image, so scalevec "
                     "did not write it; choose another path or move the file away")
    check_output_path(Path(path).parent, flag)


def _check_jobs(jobs: int) -> None:
    """--jobs: processes side by side, each a training run with at least one thread."""
    from .data.prepare import default_workers

    _require(1 <= jobs <= 4 * default_workers(), f"--jobs {jobs} must be in 1..{4 * default_workers()} (each job is "
             f"a training process; this machine gives scalevec {default_workers()} cores)")


def _path(text: str) -> str:
    """A path argument; an empty one is refused (it would silently mean the current directory or the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the path is empty; give a file or directory")
    return text


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _config_from(source: str, overrides: list[str]):
    """A TOML file, or a model size preset name."""
    if Path(source).suffix == ".toml" or Path(source).exists():
        return load_config(source, overrides)
    if source in MODEL_PRESETS:
        return load_config({"model": {"preset": source}}, overrides)
    raise ConfigError(f"{source!r} is neither a config file nor a model preset; choose a .toml file or one of "
                      f"{', '.join(MODEL_PRESETS)}")


def cmd_info(args) -> None:
    import torch

    from .model import Decoder
    from .optim import decay_counts, param_groups
    from .summary import summarize

    config = _config_from(args.config, args.set)
    with torch.device("meta"):  # shapes only: a 2B model costs no memory or init time
        model = Decoder(config.model, config.strategy, config.moe)
    summary = summarize(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = [{"optimizer": g["optimizer"], "lr_mult": g["lr_mult"], "weight_decay": g["weight_decay"],
                   "tensors": len(g["names"]), "parameters": sum(p.numel() for p in g["params"]), "names": g["names"]}
                  for g in param_groups(model, config.strategy.scale_decay, config.optim)]
    summary["optimizer_groups"] = groups
    summary["scale_decay"] = decay_counts(model, config.strategy.scale_decay, config.optim)
    summary["warnings"] = [str(w.message) for w in caught]
    if args.json:
        print(json.dumps({"config": to_dict(config), **summary}, indent=2))
        return
    m, s = config.model, config.strategy
    print(f"model {m.preset}: d_model={m.d_model} layers={m.n_layers} heads={m.n_heads}/{m.n_kv_heads} "
          f"d_ff={m.d_ff} vocab={m.vocab_size} seq={m.max_seq_len} tied={m.tie_embeddings}")
    print(f"strategy {s.preset}: scale={s.scale} hg={s.heterogeneous} "
          f"dual_placement={','.join(s.dual_placement) or '-'} "
          f"dnp={','.join(s.dnp) or '-'} post_norms={s.post_norms} scale_decay={s.scale_decay}")
    print(f"parameters: {summary['parameters']:,} (non-embedding {summary['non_embedding_parameters']:,}, "
          f"active per token {summary['active_parameters']:,})")
    print(f"scale vectors: {summary['scale_fraction']:.5%} of parameters")
    print(f"training FLOPs per token: {summary['flops_per_token']:,}")
    print("by role: " + ", ".join(f"{k}={v:,}" for k, v in summary["by_role"].items()))
    print("by kind: " + ", ".join(f"{k}={v:,}" for k, v in summary["by_kind"].items()))
    print(f"optimizer groups (optim.name={config.optim.name}, strategy.scale_decay={s.scale_decay}):")
    for g in groups:
        example = ", ".join(n for n in g["names"] if not n.startswith("blocks.") or n.startswith("blocks.0."))
        print(f"  {g['optimizer']:<5} lr x{g['lr_mult']:g} wd {g['weight_decay']:g}: {g['tensors']} tensors, "
              f"{g['parameters']:,} parameters ({_shorten(example)})")
    print(f"scale entries decayed (strategy.scale_decay={s.scale_decay}): "
          + ", ".join(f"{key} {c['decayed']:,} of {c['entries']:,}" for key, c in summary["scale_decay"].items()))
    for message in summary["warnings"]:
        print(f"warning: {message}")
    print("input-side scales that only feed DNP branches have no magnitude β "
          f"(strategy.magnitude_on_dnp_inputs={str(s.magnitude_on_dnp_inputs).lower()})")
    print("scale vectors of block 0 and the final norm (role, kind, shape):")
    for row in summary["scales"]:
        if row["name"].startswith("blocks.0.") or row["name"].startswith("final_scale"):
            note = "  (invariant: loss ignores it, never decayed)" if row["invariant"] else ""
            print(f"  {row['name']:<45} {row['role']:<6} {row['kind']:<13} {row['shape']}{note}")


def cmd_data_prepare(args) -> None:
    from .data.prepare import default_workers, parse_part, prepare

    config = _config_from(args.config, args.set) if args.config else load_config(None, args.set)
    data = config.data
    for flag, name in (("sources", "sources"), ("input", "inputs"), ("vocab", "vocab_size"), ("out", "dir"),
                       ("tokenizer", "tokenizer"), ("field", "jsonl_field"), ("column", "parquet_column")):
        value = getattr(args, flag)
        if value is not None:
            setattr(data, name, value)
    if args.input is not None and args.sources is None:
        data.sources = []  # user data alone unless bundled sources are named too
    validate(config)
    if args.workers is not None and not 1 <= args.workers <= 4 * default_workers():
        raise DataError(f"--workers {args.workers} must be in 1..{4 * default_workers()} (each is a process; this "
                        f"machine gives scalevec {default_workers()} cores)")
    part = parse_part(args.part) if args.part else (0, 1)
    prepare(data, overwrite=args.overwrite, flag="--out" if args.out else "data.dir", workers=args.workers, part=part)


def cmd_data_import(args) -> None:
    from .data.import_tokens import import_tokens

    import_tokens(args.train, args.val, args.tokenizer, Path(args.out), dtype=args.dtype, eos_id=args.eos_id,
                  source=args.source, overwrite=args.overwrite)


def _shorten(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def cmd_schedule(args) -> None:
    from .schedule import lr_factor, plot_schedule

    config = load_config(args.config, args.set) if args.config else load_config(None, args.set)
    _require(args.steps > 0, f"--steps {args.steps} must be positive")
    _file_output(args.out, "--out")
    with writing(f"--out {args.out}", "run it again", error=OutputError):
        plot_schedule(config.schedule, args.steps, args.out)
    marks = sorted({0, config.schedule.warmup_steps, args.steps // 2, args.steps - 1})
    print(", ".join(f"step {m}: {lr_factor(config.schedule, m, args.steps):.4f}" for m in marks if m < args.steps))
    print(f"wrote {args.out}")


def cmd_env(args) -> None:
    """Versions, threads and devices: what a bug report needs."""
    import importlib.metadata
    import os
    import platform

    import torch

    from ._version import __version__

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    report = {"scalevec": __version__, "python": platform.python_version(), "platform": platform.platform(),
              "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
              "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "packages": {name: version(name) for name in ("numpy", "tokenizers", "safetensors", "scipy", "matplotlib",
                                                            "tqdm", "transformers", "accelerate", "tensorboard",
                                                            "wandb", "pyarrow")}}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for key, value in report.items():
        if key == "packages":
            print("packages: " + ", ".join(f"{k} {v}" for k, v in value.items() if v) +
                  "; not installed: " + (", ".join(k for k, v in value.items() if not v) or "none"))
        else:
            print(f"{key}: {', '.join(value) if isinstance(value, list) else value}")


def _print_plan(plan) -> None:
    """What `train` would do, from its preflight: nothing is written or prepared."""
    import torch

    from .model import Decoder
    from .optim import param_groups
    from .summary import summarize

    config, t = plan.config, plan.config.train
    with torch.device("meta"):
        model = Decoder(config.model, config.strategy, config.moe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = param_groups(model, config.strategy.scale_decay, config.optim)
    summary = summarize(model)
    tokens = t.steps * t.batch_size * t.grad_accum * t.seq_len
    if plan.windows is not None:
        train_tokens = plan.windows.meta["train"]["tokens"]
        data = f"data.dir {plan.data_dir} is prepared: {train_tokens:,} training tokens, so " \
               f"{tokens * plan.world_size / train_tokens:.2f} epochs"
    else:
        data = f"data.dir {config.data.dir} is missing or stale: `scalevec train` would prepare it first"
    resuming = f"resume {plan.run_dir} from {plan.resume_from.name}" if plan.resume_from else \
        f"{'resume' if plan.resume else 'start'} {plan.run_dir}"
    print(f"dry run: {resuming} on {plan.device.type}"
          f"{f' x {plan.world_size} processes' if plan.world_size > 1 else ''}; every check of a start passed "
          "(the run directory's lock is taken when it starts); nothing written")
    print(f"model: {summary['parameters']:,} parameters ({summary['non_embedding_parameters']:,} non-embedding), "
          f"{len(groups)} optimizer groups"
          + (f"; starts from train.init_from {t.init_from}" if plan.init is not None else "")
          + (f"; branches from {plan.branch[0]} at step {plan.branch[1]['state']['step']}" if plan.branch else ""))
    print(f"training: {t.steps:,} steps x {t.batch_size * t.grad_accum * t.seq_len:,} tokens = {tokens:,} tokens per "
          f"rank ({tokens / summary['non_embedding_parameters']:.1f} per non-embedding parameter)")
    print(data)
    for message in caught:
        print(f"warning: {message.message}")


def cmd_train(args) -> None:
    from .data.prepare import prepare
    from .dist import close_world
    from .train.preflight import preflight
    from .train.trainer import Trainer

    if args.config is None:
        if not (args.resume and args.out):
            raise UsageError("give a CONFIG, or --resume --out RUN_DIR to continue a run with its saved config")
        if not (Path(args.out) / "config.toml").is_file():
            raise RunDirError(f"{args.out} is not a run directory (no config.toml); give the --out of a scalevec run, "
                              "or a CONFIG to start one")
        config = load_config(Path(args.out) / "config.toml", args.set, resolved=True)
    else:
        config = _config_from(args.config, args.set)
    out = args.out or str(Path("runs") / Path(args.config).stem)
    if args.print_config:
        print(to_toml(config), end="")
        return
    plan = preflight(config, Path(out), args.resume, args.overwrite)  # every refusal, before preparing anything
    if args.dry_run:
        _print_plan(plan)
        return
    prepare(config.data, protect=Path(out))
    try:
        # the plan stands when the data was prepared before it (prepare was a no-op); else the Trainer checks again
        trainer = Trainer(config, out, resume=args.resume, overwrite=args.overwrite, plan=plan)
        result = trainer.run()
    finally:
        close_world()
    if not trainer.world.main:
        return
    if result:
        print(f"step {result['step']}: train_loss {result['train_loss']:.4f}"
              + (f", val_loss {result['val_loss']:.4f}" if "val_loss" in result else "") + f"; run in {out}")
    else:
        print(f"run in {out} is already complete")


def cmd_compare(args) -> None:
    from .experiments.compare import preset_path, run_comparison, table
    from .train.preflight import check_data, resolve_device

    source = Path(args.config) if args.config else preset_path(args.preset)
    strategies = _csv(args.strategies)
    _require(len(strategies) >= 2, f"--strategies {args.strategies!r}: name at least two, e.g. standard,unified")
    _require(len(set(strategies)) == len(strategies), f"--strategies {args.strategies!r} names one twice")
    _check_jobs(args.jobs)
    _reusable_output(Path(args.out), _is_comparison, "a comparison of scalevec compare")
    shared = load_config(source, args.set)  # what every strategy's run shares, checked before any is written
    check_data(shared.data)
    resolve_device(shared.train.device)
    origin = f"--config {args.config}" if args.config else f"--preset {args.preset}"
    command = " ".join(["scalevec compare", origin, f"--strategies {','.join(strategies)}", f"--out {args.out}",
                        *([f"--reference {args.reference}"] if args.reference else []),
                        *[f"--set {o}" for o in args.set]])
    reference = Path(args.reference) if args.reference else None
    summary = run_comparison(source, strategies, Path(args.out), args.set, command, jobs=args.jobs,
                             reference=reference)
    print(table(summary))
    print(f"wrote {args.out}/report.md, summary.json, loss.png" + (", gap.png" if reference else ""))


def cmd_theory(args) -> None:
    from .theory import EXPERIMENTS, describe

    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    check_output_path(Path(args.out), "--out")
    for name in names:  # each writes NAME.png and NAME.json: replace only an earlier check's
        _file_output(str(Path(args.out) / f"{name}.png"), "--out")
        summary = Path(args.out) / f"{name}.json"
        if summary.exists():
            try:
                earlier = json.loads(summary.read_text()) if summary.is_file() else None
            except (OSError, ValueError):
                earlier = None
            _require(isinstance(earlier, dict) and "claim" in earlier, f"--out {args.out} holds {summary.name}, "
                     "which is no summary scalevec theory wrote; choose another --out or move the file away")
    for name in names:
        with writing(f"the outputs in --out {args.out}", "run it again", error=OutputError):
            summary = EXPERIMENTS[name](Path(args.out), fast=args.fast)
        print(f"{name}: " + "\n".join(describe(summary)) + f"\nwrote {args.out}/{name}.png and {name}.json")


def cmd_bench(args) -> None:
    from .bench import format_bench, format_profile, run_bench

    config = _config_from(args.config, args.set)
    strategies = _csv(args.strategies)
    _require(bool(strategies), "--strategies is empty; name at least one, e.g. standard,unified")
    _require(args.repeats >= 1, f"--repeats {args.repeats} must be at least 1")
    _require(args.warmup >= 0, f"--warmup {args.warmup} must be >= 0")
    _require(args.profile >= 0, f"--profile {args.profile} must be >= 0 (steps to profile per arm)")
    _require(args.peak_tflops is None or (math.isfinite(args.peak_tflops) and args.peak_tflops > 0),
             f"--peak-tflops {args.peak_tflops} must be a positive number")
    modes = {"eager": [False], "compiled": [True], "both": [False, True]}[args.mode]
    reports = [run_bench(config, strategies, args.repeats, args.warmup, compile, args.hf, args.activation_checkpointing,
                         args.peak_tflops, args.profile) for compile in modes]
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=1))
    else:
        print("\n\n".join(format_bench(r) + (format_profile(r) if args.profile else "") for r in reports))


def cmd_export(args) -> None:
    from .export.hf import export_run

    export_run(Path(args.run_dir), Path(args.to), overwrite=args.overwrite, dtype=args.dtype, family=args.family)


def cmd_import(args) -> None:
    from .hf_import import import_hf

    import_hf(Path(args.hf_dir), args.strategy, Path(args.out), args.warm_start, overrides=args.set,
              tokenizer=Path(args.tokenizer) if args.tokenizer else None)


def cmd_generate(args) -> None:
    import torch

    from .data.prepare import load_tokenizer
    from .evaluate import load_model, separator_id
    from .generate import generate

    _require(math.isfinite(args.temperature) and args.temperature >= 0,
             f"--temperature {args.temperature} must be a finite number >= 0 (0 = greedy)")
    _require(0 < args.top_p <= 1, f"--top-p {args.top_p} must be in (0, 1] (1 = off)")
    _require(args.top_k >= 0, f"--top-k {args.top_k} must be >= 0 (0 = off)")
    _require(args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    _require(0 <= args.seed < 2**64, f"--seed {args.seed} must be in 0..{2**64 - 1}")
    model, tokenizer_path = load_model(args.source)
    tokenizer = load_tokenizer(tokenizer_path)
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise UsageError("--prompt is empty; give some text to continue")
    room = model.config.max_seq_len - len(ids)
    if room <= 0:
        raise UsageError(f"the prompt has {len(ids)} tokens, at least max_seq_len={model.config.max_seq_len}; "
                         "shorten it")
    eos_id = separator_id(Path(args.source), tokenizer, model.config.vocab_size, args.eos_id)
    out = generate(model, torch.tensor([ids]), min(args.max_new_tokens, room), args.temperature, args.top_k,
                   args.top_p, seed=args.seed, eos_id=eos_id)
    print(tokenizer.decode(out[0].tolist()))


def cmd_eval(args) -> None:
    from .evaluate import evaluate

    _require(args.seq_len is None or args.seq_len >= 1, f"--seq-len {args.seq_len} must be at least 1")
    _require(args.stride is None or args.stride >= 1, f"--stride {args.stride} must be at least 1")
    _require(args.batch_size >= 1, f"--batch-size {args.batch_size} must be at least 1")
    if args.device == "cuda":
        import torch

        _require(torch.cuda.is_available(), "--device cuda but no CUDA device is available; use --device cpu or auto")
    result = evaluate(args.source, args.data, args.seq_len, args.stride, args.batch_size, args.field, args.column,
                      args.device, eos_id=args.eos_id)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['source']}: windows of {result['seq_len']} tokens, stride {result['stride']}")
    print("| input | documents | tokens | loss | perplexity | bits/byte |\n|---|---|---|---|---|---|")
    for row in [*result["inputs"], {"input": "all", "documents": sum(r["documents"] for r in result["inputs"]),
                                    **result["overall"]}]:
        bpb = "—" if row["bits_per_byte"] is None else f"{row['bits_per_byte']:.4f}"
        print(f"| {row['input']} | {row['documents']:,} | {row['tokens']:,} | {row['loss']:.4f} | "
              f"{row['perplexity']:.2f} | {bpb} |")


def cmd_sweep(args) -> None:
    from .experiments.report import write_report
    from .experiments.sweep import load_suite, read_suite, run_sweep
    from .train.preflight import check_data, resolve_device

    _check_jobs(args.jobs)
    _require(args.seeds is None or args.seeds >= 1, f"--seeds {args.seeds} must be at least 1")
    sizes = [size.strip() for size in args.sizes.split(",")] if args.sizes else None
    suite = load_suite(args.suite, args.scale, args.seeds, args.set)
    out = Path(args.out or f"runs/sweeps/{suite.name}-{args.scale}")
    results = Path(args.results) if args.results else out
    for path, flag in [(out, "--out"), *([(results, "--results")] if results != out else [])]:
        _reusable_output(path, lambda p: (p / "suite.json").is_file(), "a sweep directory (no suite.json)", flag)
        if (path / "suite.json").is_file():  # the sweep rewrites it: only another sweep of this suite may
            recorded = read_suite(path, flag)
            _require((recorded.name, recorded.scale) == (suite.name, suite.scale),
                     f"{flag} {path} holds the sweep of suite {recorded.name} ({recorded.scale}), not {suite.name} "
                     f"({suite.scale}); choose another {flag}")
    base = suite.base_config()  # what every run shares is checked before the sweep writes its suite.json
    check_data(base.data)
    resolve_device(base.train.device)
    result = run_sweep(suite, out, args.jobs, results=results, sizes=sizes)
    write_report(results)
    failed = result["failed"]
    print(f"sweep {suite.name}: {result['runs']} runs, {len(failed)} failed; report in {results}/report.md")
    for path, error in failed.items():
        print(f"  failed: {path}: {error}")


def cmd_report(args) -> None:
    from .experiments.report import write_report

    out = Path(args.dir)
    if not (out / "suite.json").is_file():
        raise UsageError(f"{out} is not a sweep directory (no suite.json); give the --results (or --out) of "
                         "`scalevec sweep`")
    summary = write_report(out)  # a scrambled suite.json is refused before the report is written
    print((out / "report.md").read_text())
    if not summary["arms"]:
        print("no finished runs yet")


def _command(sub, name: str, func, help: str) -> argparse.ArgumentParser:
    """The parser of subcommand `name`, which runs `func(args)`."""
    parser = sub.add_parser(name, help=help)
    parser.set_defaults(func=func)
    return parser


def _add_set(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help=help)


def _info_parser(sub) -> None:
    info = _command(sub, "info", cmd_info, help="parameter counts by role and kind, scale fraction, FLOPs")
    info.add_argument("config", type=_path, help="a .toml config file or a model preset name (e.g. cpu-3m)")
    _add_set(info, "override a config field (repeatable)")
    info.add_argument("--json", action="store_true", help="print JSON")


def _train_parser(sub) -> None:
    train = _command(sub, "train", cmd_train, help="train one model; one run = one directory")
    train.add_argument("config", type=_path, nargs="?",
                       help="a .toml config or a model preset name (omit with --resume)")
    _add_set(train)
    train.add_argument("--out", type=_path, help="run directory (default runs/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    train.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    train.add_argument("--dry-run", action="store_true",
                       help="check the config, run directory, memory and data; print the plan; write nothing")


def _env_parser(sub) -> None:
    env = _command(sub, "env", cmd_env, help="versions, threads and devices, for bug reports")
    env.add_argument("--json", action="store_true")


def _compare_parser(sub) -> None:
    compare = _command(sub, "compare", cmd_compare,
                       help="the main job: baseline vs unified, same seed/data/budget, report")
    compare.add_argument("--preset", default="demo", help="a shipped comparison config (default demo)")
    compare.add_argument("--config", type=_path, help="a .toml config instead of the preset")
    compare.add_argument("--strategies", default="standard,unified", help="comma-separated; the first is the baseline")
    compare.add_argument("--out", type=_path, default="runs/demo",
                         help="output directory (one run directory per strategy)")
    compare.add_argument("--jobs", type=int, default=1, help="strategies trained side by side, each its own process")
    compare.add_argument("--reference", type=_path,
                         help="a study's results (e.g. results/study-iwd-cpu): train at its best learning "
                              "rates, check the run records of this seed, show its Δ")
    _add_set(compare)


def _theory_parser(sub) -> None:
    theory = _command(sub, "theory", cmd_theory,
                      help="check the paper's theorems numerically (plain GD), each against a control")
    theory.add_argument("name", choices=["fold", "preconditioning", "weight-decay", "dual-placement", "reparam", "all"])
    theory.add_argument("--out", type=_path, default="runs/theory", help="directory for the PNG and JSON summary")
    theory.add_argument("--fast", action="store_true", help="smaller sizes and fewer steps (what the tests run)")


def _bench_parser(sub) -> None:
    bench = _command(sub, "bench", cmd_bench, help="training tokens/s and memory per strategy, side by side (ABAB)")
    bench.add_argument("--config", type=_path, default="cpu-7m",
                       help="a .toml config or a model preset (default cpu-7m)")
    bench.add_argument("--strategies", default="standard,unified", help="comma-separated; ratios are to the first")
    bench.add_argument("--mode", choices=["eager", "compiled", "both"], default="eager")
    bench.add_argument("--hf", action="store_true", help="also time transformers' LlamaForCausalLM at the same shape")
    bench.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    bench.add_argument("--repeats", type=int, default=10, help="timed steps per arm")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps per arm first")
    bench.add_argument("--peak-tflops", type=float, help="GPU bf16 peak for MFU (default: looked up by GPU name)")
    bench.add_argument("--profile", type=int, default=0, metavar="STEPS",
                       help="also profile STEPS steps per arm: a table of operators and, compiled, Inductor's kernels "
                            "(CPU) or of kernels (CUDA) by self time, and what each arm adds over the first")
    bench.add_argument("--json", action="store_true")
    _add_set(bench)


def _export_parser(sub) -> None:
    export = _command(sub, "export", cmd_export, help="fold scales and write a transformers checkpoint (Llama ... "
                      "OLMo 2, Qwen3-MoE ... Mixtral, or remote code for models no family computes)")
    export.add_argument("run_dir", type=_path, help="a run directory (its newest valid checkpoint is exported)")
    export.add_argument("--to", type=_path, required=True,
                        help="output directory (an earlier export there is replaced)")
    export.add_argument("--overwrite", action="store_true", help="replace --to even if scalevec did not write it")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the stored weights (the scales are folded in float32 first)")
    export.add_argument("--family", help="force a form: llama, mistral, qwen2, qwen3, gemma2, gemma3, olmo2, "
                                         "qwen3_moe, olmoe, mixtral, qwen2_moe or remote (refused, with the reason, "
                                         "where it computes other logits)")


def _import_parser(sub) -> None:
    imp = _command(sub, "import", cmd_import,
                   help="convert a transformers safetensors checkpoint to a strategy (a run directory)")
    imp.add_argument("hf_dir", type=_path, help="a Hugging Face model directory (config.json, model.safetensors)")
    imp.add_argument("--strategy", default="standard", help="target strategy preset (e.g. hg+or)")
    imp.add_argument("--out", type=_path, required=True,
                     help="new run directory; `scalevec train --resume --out` continues it")
    imp.add_argument("--warm-start", action="store_true", help="allow strategies that change the function (DNP...)")
    imp.add_argument("--tokenizer", type=_path, help="the checkpoint's tokenizer.json (default: the one in HF_DIR)")
    _add_set(imp, "the run's options, e.g. data.inputs=..., train.steps=... (repeatable)")


def _generate_parser(sub) -> None:
    gen = _command(sub, "generate", cmd_generate, help="sample text from a run directory or an export")
    gen.add_argument("source", type=_path, help="run directory or exported model directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=50, help="0 = off")
    gen.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--eos-id", type=int, help="id of the token that ends a text (default: the tokenizer's "
                                                "<|endoftext|>, else an export's eos_token_id)")


def _eval_parser(sub) -> None:
    ev = _command(sub, "eval", cmd_eval, help="loss, perplexity and bits per byte of a run or an export on your text")
    ev.add_argument("source", type=_path, help="run directory or exported model directory")
    ev.add_argument("--data", type=_path, action="append", required=True,
                    help=".txt, .jsonl or .parquet file, or a prepared data directory (repeatable)")
    ev.add_argument("--seq-len", type=int, help="window length (default: the model's max_seq_len)")
    ev.add_argument("--stride", type=int, help="tokens between window starts (default: the window length; "
                                               "smaller gives each token more context)")
    ev.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    ev.add_argument("--field", default="text", help="text field of .jsonl records")
    ev.add_argument("--column", default="text", help="text column of .parquet files")
    ev.add_argument("--eos-id", type=int, help="id of the token that joins documents (default: the tokenizer's "
                                               "<|endoftext|>, else an export's eos_token_id)")
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ev.add_argument("--json", action="store_true")


def _sweep_parser(sub) -> None:
    sweep = _command(sub, "sweep", cmd_sweep, help="run a paper suite's grid (resumable), then write its report")
    sweep.add_argument("suite", type=_path, help="removal, weight-decay, improvements, scaling, moe, or a suite .toml")
    sweep.add_argument("--scale", choices=["cpu", "gpu"], default="cpu")
    sweep.add_argument("--seeds", type=int, help="number of seeds, at every size (default: the suite's)")
    sweep.add_argument("--out", type=_path, help="sweep directory (default runs/sweeps/<suite>-<scale>)")
    sweep.add_argument("--jobs", type=int, default=1, help="runs in parallel (CPU threads are split among them)")
    sweep.add_argument("--results", type=_path,
                       help="where run records, suite.json and the report go (default: --out); a sweep skips "
                            "every run recorded there, e.g. in a results/ folder")
    sweep.add_argument("--sizes", help="only these of the suite's sizes, comma-separated (default: all)")
    _add_set(sweep, "applied to every run, e.g. train.device=cuda (never a key the suite sets per run: the size, "
                    "optim.lr, seed, train.steps...); recorded in each run's config")


def _report_parser(sub) -> None:
    report = _command(sub, "report", cmd_report, help="tables and plots of a sweep directory")
    report.add_argument("dir", type=_path,
                        help="the --results (default --out) of `scalevec sweep`: its records and suite.json")


def _schedule_parser(sub) -> None:
    sched = _command(sub, "schedule", cmd_schedule, help="plot a learning-rate schedule")
    sched.add_argument("--config", type=_path, help="a .toml config (its [schedule] section)")
    sched.add_argument("--steps", type=int, default=1000, help="total optimizer steps")
    sched.add_argument("--out", type=_path, default="schedule.png", help="PNG to write")
    _add_set(sched)


def _data_parser(sub) -> None:
    data = sub.add_parser("data", help="prepare token shards").add_subparsers(dest="data_command", required=True,
                                                                               parser_class=OneLineParser)
    _data_prepare_parser(data)
    _data_import_parser(data)


def _data_prepare_parser(data) -> None:
    prep = _command(data, "prepare", cmd_data_prepare,
                    help="train or load a tokenizer and write token shards (no-op when up to date)")
    prep.add_argument("--config", type=_path, help="a .toml config whose [data] section to start from")
    prep.add_argument("--sources", type=_csv, help=f"bundled sources, comma-separated (default: the prose ones; "
                      f"also {', '.join(s for s in BUNDLED_SOURCES if s not in PROSE_SOURCES)})")
    prep.add_argument("--input", type=_path, action="append",
                      help="user file, directory or glob of .txt/.jsonl/.parquet (repeatable; replaces the "
                           "bundled sources unless --sources is given)")
    prep.add_argument("--field", help="text field of .jsonl records (default text)")
    prep.add_argument("--column", help="text column of .parquet files (default text)")
    prep.add_argument("--tokenizer", type=_path, help="use this tokenizer.json instead of training one")
    prep.add_argument("--vocab", type=int, help="vocabulary size of the trained tokenizer (default 8192)")
    prep.add_argument("--out", type=_path, help="output directory (default data/bundled)")
    prep.add_argument("--overwrite", action="store_true", help="replace --out even if scalevec did not write it")
    prep.add_argument("--workers", type=int, help="tokenizer processes (default: the cores available)")
    prep.add_argument("--part", metavar="I/N", help="prepare only part I of N (0-based; a SLURM array task, a node); "
                      "the last part to finish joins them into --out")
    _add_set(prep)


def _data_import_parser(data) -> None:
    imp = _command(data, "import", cmd_data_import, help="use token arrays made elsewhere (nanoGPT train.bin/val.bin, "
                   ".npy) with their tokenizer.json, without copying them")
    imp.add_argument("--train", type=_path, action="append", required=True,
                     help="training token file or glob (.bin, .npy; repeatable, in order)")
    imp.add_argument("--val", type=_path, action="append", required=True,
                     help="validation token file or glob (repeatable)")
    imp.add_argument("--tokenizer", type=_path, required=True, help="the tokenizer.json the tokens were made with")
    imp.add_argument("--out", type=_path, required=True,
                     help="data directory to write (then train with --set data.dir=OUT)")
    imp.add_argument("--dtype", choices=("uint16", "uint32"), help="dtype of headerless files (default: uint16 if "
                     "the vocabulary fits, else uint32)")
    imp.add_argument("--eos-id", type=int, help="document separator id (default: the tokenizer's <|endoftext|>)")
    imp.add_argument("--source", default="imported", help="source name in meta.json (default imported)")
    imp.add_argument("--overwrite", action="store_true", help="replace --out even if scalevec did not write it")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = OneLineParser(prog="scalevec", description=__doc__)
    parser.add_argument("--version", action="version", version=f"scalevec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for add in (_info_parser, _train_parser, _env_parser, _compare_parser, _theory_parser,
                _bench_parser, _export_parser, _import_parser, _generate_parser, _eval_parser,
                _sweep_parser, _report_parser, _schedule_parser, _data_parser):  # `--help` lists them in this order
        add(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"scalevec: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, --version or a usage error, already printed
        return exit.code if isinstance(exit.code, int) else 2
    # under torchrun rank 0 speaks for all: the other ranks' failures reach it (dist.fail_together)
    speaks = os.environ.get("RANK", "0") == "0"
    try:
        args.func(args)
    except (BadInput, RunStopped) as err:  # 2, 1, or 75 for a run stopped on request with its step saved
        if speaks:
            print(f"scalevec: {'' if isinstance(err, StoppedEarly) else 'error: '}{_one_line(err)}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:  # the reader left (`scalevec info | head`): nothing more to print
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit does not fail too
        return 1
    except Exception as err:  # a write site without its own message: still one line when the disk is full
        if not speaks:
            return 1
        if not is_disk_full(err):
            raise
        print(f"scalevec: error: writing failed ({first_line(err)}); free space and run the command again",
              file=sys.stderr)
        return 1
    return 0


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def main_exit() -> None:
    sys.exit(main())
