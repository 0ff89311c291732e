"""The `scalevec` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import MODEL_PRESETS, ConfigError, load_config, to_dict


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def _config_from(source: str, overrides: list[str]):
    """A TOML file, or a model size preset name."""
    if Path(source).suffix == ".toml" or Path(source).exists():
        return load_config(source, overrides)
    if source in MODEL_PRESETS:
        return load_config({"model": {"preset": source}}, overrides)
    raise ConfigError(f"{source!r} is neither a config file nor a model preset; choose a .toml file or one of "
                      f"{', '.join(MODEL_PRESETS)}")


def cmd_info(args) -> None:
    from .model import build_model
    from .summary import summarize

    config = _config_from(args.config, args.set)
    model = build_model(config.model, config.strategy, config.seed)
    summary = summarize(model)
    if args.json:
        print(json.dumps({"config": to_dict(config), **summary}, indent=2))
        return
    m, s = config.model, config.strategy
    print(f"model {m.preset}: d_model={m.d_model} layers={m.n_layers} heads={m.n_heads}/{m.n_kv_heads} "
          f"d_ff={m.d_ff} vocab={m.vocab_size} seq={m.max_seq_len} tied={m.tie_embeddings}")
    print(f"strategy {s.preset}: scale={s.scale} hg={s.heterogeneous} dp={','.join(s.dp) or '-'} "
          f"dnp={','.join(s.dnp) or '-'} post_norms={s.post_norms} scale_decay={s.scale_decay}")
    print(f"parameters: {summary['parameters']:,} (non-embedding {summary['non_embedding_parameters']:,})")
    print(f"scale vectors: {summary['scale_fraction']:.5%} of parameters")
    print(f"training FLOPs per token: {summary['flops_per_token']:,}")
    print("by role: " + ", ".join(f"{k}={v:,}" for k, v in summary["by_role"].items()))
    print("by kind: " + ", ".join(f"{k}={v:,}" for k, v in summary["by_kind"].items()))
    print("scale vectors of block 0 and the final norm (role, kind, shape):")
    for row in summary["scales"]:
        if row["name"].startswith("blocks.0.") or row["name"].startswith("final_scale"):
            note = "  (invariant: loss ignores it, never decayed)" if row["invariant"] else ""
            print(f"  {row['name']:<45} {row['role']:<6} {row['kind']:<13} {row['shape']}{note}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalevec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts by role and kind, scale fraction, FLOPs")
    info.add_argument("config", help="a .toml config file or a model preset name (e.g. cpu-3m)")
    info.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                      help="override a config field (repeatable)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, UsageError) as err:
        print(f"scalevec: error: {err}", file=sys.stderr)
        return 2
    return 0


def main_exit() -> None:
    sys.exit(main())
