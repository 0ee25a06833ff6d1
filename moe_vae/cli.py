"""`moe-vae` command line. Subcommands parse their arguments and call into the package.

Bad input (config, data, paths, arguments) ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_vae import __version__
from moe_vae.errors import MoeVaeError

TRAIN_EPILOG = """\
Config overrides are dotted keys after the options, e.g.:
  moe-vae train --config configs/mnist_seed.yaml --train.epochs=3
  moe-vae train --config configs/mnist_seed.yaml --model.num_experts 12 --optim.lr=3e-4
  moe-vae train --train.epochs=1 --print-config      # show the resolved config and exit
Without --config the defaults are the founding recipe (configs/mnist_seed.yaml).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-vae", description="Train and use Mixtures of Variational Autoencoders."
    )
    parser.add_argument("--version", action="version", version=f"moe-vae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train a mixture of VAEs",
        description="Train a mixture of VAEs on one process (CPU, or one GPU when present).",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "--config", type=Path, help="YAML config file (default: the founding recipe)"
    )
    train.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    return parser


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from moe_vae.config.load import config_to_yaml, load_config
    from moe_vae.train.trainer import train

    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    result = train(
        cfg, run_name=args.config.stem if args.config else "mnist_seed", quiet=args.quiet
    )
    ev = result.final_eval
    print(
        f"test clustering accuracy {ev['accuracy']:.4f}  NMI {ev['nmi']:.4f}  ARI {ev['ari']:.4f}  "
        f"experts in use {ev['experts_in_use']}/{cfg.model.num_experts}  "
        f"neg ELBO {ev['neg_elbo']:.2f}"
    )
    print(
        f"results in {result.run_dir}/ (config.yaml, metrics.jsonl, eval.json, expert_grid.png, "
        f"loss_curves.png, model.safetensors)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            return _train(args, rest)
    except MoeVaeError as err:
        print(f"moe-vae: error: {err}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
