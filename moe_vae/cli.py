"""`moe-vae` command line. Subcommands parse their arguments and call into the package.

Bad input (config, data, paths, arguments) ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from moe_vae import __version__
from moe_vae.errors import MoeVaeError

# How long a rank other than 0 waits before it says an error every rank meets alike (rank 0
# says it, and the launcher ends the job, within about a second of each other).
OTHER_RANKS_GRACE_S = 5.0

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
    # The deepspeed launcher puts --local_rank=N before the command; the rank comes from the
    # environment (LOCAL_RANK), as with torchrun and accelerate.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train a mixture of VAEs",
        description=(
            "Train a mixture of VAEs on one process (CPU, or one GPU when present), or as one\n"
            "rank of a job started by deepspeed, torchrun or accelerate launch (see launch/)."
        ),
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
    _add_data_parser(sub)
    _add_use_parsers(sub)
    bench = sub.add_parser(
        "bench",
        help="time our training step against the naive port, side by side",
        description=(
            "Time the trainer's step and a naive port (a Python loop over E VAE modules, eager, "
            "standard DataLoader) on the same config and data, in this process. Dotted "
            "overrides work as for train (e.g. --model.num_experts=16)."
        ),
    )
    bench.add_argument("--config", type=Path, help="YAML config (default: the founding recipe)")
    bench.add_argument(
        "--steps", type=_positive, default=100, help="timed steps per round (default 100)"
    )
    bench.add_argument(
        "--repeats", type=_positive, default=5, help="alternating rounds, median kept (default 5)"
    )
    bench.add_argument("--warmup", type=int, default=20, help="untimed steps first (default 20)")
    bench.add_argument("--no-baseline", action="store_true", help="time ours only")
    bench.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    bench.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="then profile N of our steps: time and kernels per phase (default 0: none)",
    )
    return parser


USE_EPILOGS = {
    "eval": """examples:
  moe-vae eval --checkpoint runs/mnist_seed-20261121-101530
  moe-vae eval --checkpoint runs/r/checkpoint.pt --out m.json \\
               --shards 'data/mnist/test-{000000..000001}.tar'
""",
    "sample": """examples:
  moe-vae sample --checkpoint runs/r --expert 3 --n 64 --out three.png
  moe-vae sample --checkpoint runs/r --mixture --n 100 --out mix.npy
--mixture draws each image's expert from the experts' share of the manager's probability on the
training data in the last epoch, kept in the checkpoint and in the metadata of model.safetensors
and of exports (uniform for a .safetensors without it: an export of an older moe-vae).
Under model.hierarchy the experts are the leaves, numbered row-major: the leaf of path
(i_1, i_2, ..., i_L) is ((i_1 n_2) + i_2) n_3 + ..., so with [10, 3] top-level expert t's
leaves are 3t, 3t+1 and 3t+2 (--expert 7: the second leaf of top-level expert 2).
""",
    "assign": """examples:
  moe-vae assign --checkpoint runs/r --out clusters.csv
  moe-vae assign --checkpoint runs/r --out c.parquet \\
                 --shards 'data/faces/faces-{000000..000009}.tar'
Columns: key, label (-1 if unknown), cluster (the manager's argmax), p_0 .. p_{E-1}.
""",
    "score": """examples:
  moe-vae score --checkpoint runs/r --out scores.csv
Columns: key, label, nll = -log sum_i p_i(x) exp(-L_i(x)) (higher = more anomalous).
""",
    "export": """examples:
  moe-vae export --checkpoint runs/r/checkpoint.pt --out mixture.safetensors
The file holds every expert (consolidated), with the config, image shape and mixing weights in
its metadata: load it with moe_vae.evaluate.load.load_trained, without DeepSpeed.
""",
}


def _add_use_parsers(sub: argparse._SubParsersAction) -> None:
    helps = {
        "eval": "metrics of a checkpoint on a dataset (clustering accuracy, NMI, ARI, ELBO)",
        "sample": "images from expert k or from the whole mixture, to a PNG grid or .npy",
        "assign": "cluster id and manager probabilities per input, to CSV/Parquet",
        "score": "per-input anomaly score (mixture negative log-likelihood), to CSV/Parquet",
        "export": "consolidated safetensors + config, loadable without DeepSpeed",
    }
    for name, text in helps.items():
        p = sub.add_parser(
            name,
            help=text,
            description=text[0].upper() + text[1:] + ".",
            epilog=USE_EPILOGS[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--checkpoint",
            type=Path,
            required=True,
            help="a run directory, its checkpoint.pt, or a model.safetensors",
        )
        p.add_argument(
            "--config",
            type=Path,
            help="expected config: its model section must match the checkpoint's",
        )
        p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
        if name in ("eval", "assign", "score"):
            p.add_argument(
                "--split",
                choices=["train", "test"],
                default="test",
                help="which split of the checkpoint's data (default: test)",
            )
            p.add_argument("--shards", help="score these shards instead (path, pattern or URL)")
            p.add_argument("--limit", type=_positive, help="only the first N inputs")
            # The run's own seed by default, so that eval reproduces its eval.json.
            p.add_argument(
                "--seed",
                type=int,
                help="seed of the latent noise (default: the checkpoint's train.seed, as the "
                "run's own evaluation)",
            )
        if name == "eval":
            p.add_argument("--out", type=Path, help="also write the metrics to this JSON file")
        if name in ("assign", "score"):
            p.add_argument("--out", type=Path, required=True, help=".csv or .parquet")
        if name == "sample":
            which = p.add_mutually_exclusive_group(required=True)
            which.add_argument(
                "--expert",
                type=int,
                metavar="K",
                help="the expert to sample from, 0 to model.num_experts-1 (under model.hierarchy: "
                "a leaf, not a top-level expert; see below)",
            )
            which.add_argument("--mixture", action="store_true", help="sample the whole mixture")
            p.add_argument("--n", type=_positive, default=64, help="number of images")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--out", type=Path, required=True, help=".png grid or .npy array")
        if name == "export":
            p.add_argument("--out", type=Path, required=True, help="a .safetensors file")


def _check_device(name: str) -> None:
    """--device is cpu, cuda or cuda:N, and a CUDA device must exist: torch's own errors for a
    typo or a machine without CUDA come much later, as tracebacks."""
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise MoeVaeError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if kind == "cpu":
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise MoeVaeError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    if index and int(index) >= count:
        raise MoeVaeError(
            f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )


def _use(args: argparse.Namespace) -> int:
    from moe_vae import commands as c
    from moe_vae.config.load import load_config
    from moe_vae.evaluate.load import load_trained, stored_prior
    from moe_vae.outpaths import writing

    _check_device(args.device)
    c.check_out(args.command, args.out)
    expect = load_config(args.config) if args.config else None
    model, cfg = load_trained(args.checkpoint, expect, args.device)
    if args.command == "export":
        with writing(args.out):
            c.run_export(model, cfg, args.out, stored_prior(args.checkpoint))
        print(f"wrote {args.out}")
        return 0
    if args.command == "sample":
        prior = c.expert_prior(args.checkpoint, model.num_experts)
        try:
            samples, experts = c.run_sample(model, args.n, args.expert, prior, args.seed)
        except ValueError as err:  # an unknown expert index
            raise MoeVaeError(f"--expert: {err}") from None
        with writing(args.out):
            c.save_images(samples, args.out)
        print(f"wrote {args.n} images to {args.out} (experts {sorted(set(experts.tolist()))})")
        return 0
    # The inputs stay on the host: evaluation and per_input move one batch at a time.
    images, labels, keys = c.input_set(cfg, args.split, args.shards, args.limit, model.image_shape)
    seed = cfg.train.seed if args.seed is None else args.seed
    if args.command == "eval":
        metrics = c.run_eval(model, cfg, images, labels, seed)
        text = json.dumps(metrics, indent=2)
        print(text)  # first: should the file fail after all, the metrics are not lost
        if args.out:
            with writing(args.out):
                args.out.write_text(text)
        return 0
    probs, nll = c.per_input(model, cfg, images, seed)
    columns: dict[str, Any] = {"key": keys, "label": labels.tolist()}
    if args.command == "assign":
        import torch

        # The top-level expert (under a hierarchy: the one whose leaves hold the most mass).
        clusters = model.cluster_logits(torch.from_numpy(probs).log()).argmax(-1)
        columns["cluster"] = clusters.tolist()
        columns.update({f"p_{e}": probs[:, e].tolist() for e in range(probs.shape[1])})
    else:
        columns["nll"] = nll.tolist()
    with writing(args.out):
        c.write_table(args.out, columns)
    print(f"wrote {len(keys)} rows to {args.out}")
    return 0


DATA_WRITE_EPILOG = """\
examples:
  moe-vae data write --from mnist --split train --out data/mnist --name train
  moe-vae data write --from mnist --mnist-dir ~/mnist --split test --out data/mnist --name test
  moe-vae data write --from array --input faces.npz --out data/faces --samples-per-shard 5000
  moe-vae data write --from images --input photos/ --out data/photos --record sample
Then train from them:
  moe-vae train --data.name=shards --data.train_shards='data/mnist/train-{000000..000005}.tar'
Record kinds: `batched` (default) packs record_size images per tar member, fast for small
images; `sample` is the standard WebDataset layout (<key>.npy + <key>.cls), one image per member.
"""


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="write WebDataset shards", description="Dataset tools.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    write = data_sub.add_parser(
        "write",
        help="write images (MNIST, .npz/.npy, image folder) to .tar shards + manifest",
        description="Write a dataset to WebDataset .tar shards and a manifest beside them.",
        epilog=DATA_WRITE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    write.add_argument("--from", dest="source", required=True, choices=["mnist", "array", "images"])
    write.add_argument("--input", type=Path, help="the .npz/.npy file or image folder")
    write.add_argument(
        "--mnist-dir", type=Path, help="MNIST IDX files (default: the embedded copy)"
    )
    write.add_argument(
        "--no-verify-md5",
        action="store_true",
        help="MNIST: accept IDX files that are not the official ones (a modified copy)",
    )
    write.add_argument("--split", choices=["train", "test"], default="train", help="MNIST split")
    write.add_argument("--out", type=Path, required=True, help="output directory")
    write.add_argument("--name", help="shard name prefix (default: the split, or the input's stem)")
    write.add_argument("--samples-per-shard", type=_positive, default=10_000)
    write.add_argument("--record", choices=["batched", "sample"], default="batched")
    write.add_argument("--record-size", type=_positive, default=1_000, help="images per record")
    write.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _data_write(args: argparse.Namespace) -> int:
    from moe_vae.data.mnist import EMBEDDED_DIR
    from moe_vae.data.sources import array_source, image_folder_source, mnist_source
    from moe_vae.data.writer import WriteOptions, write_shards
    from moe_vae.outpaths import check_out_dir

    check_out_dir(args.out)
    if args.source == "mnist":
        source = mnist_source(args.mnist_dir or EMBEDDED_DIR, args.split, not args.no_verify_md5)
        name = args.name or args.split
    else:
        if args.input is None:
            raise MoeVaeError(f"--from {args.source} needs --input PATH")
        build = array_source if args.source == "array" else image_folder_source
        source = build(args.input)
        name = args.name or args.input.stem.replace(".", "_") or "data"
    opts = WriteOptions(args.samples_per_shard, args.record, args.record_size)
    manifest = write_shards(source, args.out, name, opts, progress=not args.no_progress)
    print(
        f"wrote {manifest['num_samples']} samples of shape {manifest['image_shape']} in "
        f"{len(manifest['shards'])} shards: {args.out / manifest['pattern']}"
    )
    return 0


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from moe_vae.config.load import config_to_yaml, load_config

    cfg = load_config(args.config, overrides, base=_resumed_config(args.config, overrides))
    if args.print_config:  # before torch is imported: a quick check of what a config resolves to
        print(config_to_yaml(cfg), end="")
        return 0
    from moe_vae.parallel.dist import exit_process
    from moe_vae.train.trainer import train

    result = train(
        cfg, run_name=args.config.stem if args.config else "mnist_seed", quiet=args.quiet
    )
    if result.is_main:
        _report(cfg, result)
    if result.world_size > 1:
        exit_process(0)
    return 0


def _resumed_config(config: Path | None, overrides: list[str]) -> dict[str, Any] | None:
    """`--train.resume=<checkpoint>` without --config continues that run: its own config is the
    base the overrides apply to (not the defaults, which would change its data, batch and
    epochs, and its config.yaml with them)."""
    from moe_vae.config.load import parse_overrides

    resume = dict(parse_overrides(overrides)).get("train.resume")
    if config is not None or not isinstance(resume, str) or resume == "auto":
        return None
    from moe_vae.train.checkpoint import load_checkpoint, saved_config

    path = Path(resume)
    return saved_config(path, load_checkpoint(path, mmap=True)["config"]).model_dump(mode="json")


def _report(cfg: Any, result: Any) -> None:
    ev = result.final_eval
    # The training loop's own time (also of epochs before a resume): no start-up, compilation
    # or final evaluation.
    seconds = sum(r["epoch_seconds"] for r in result.epochs)
    samples = sum(r["samples_per_second"] * r["epoch_seconds"] for r in result.epochs)
    if seconds > 0:
        print(
            f"trained {len(result.epochs)} epochs in {seconds:.1f} s: "
            f"{samples / seconds:,.0f} samples/s"
        )
    if "accuracy" in ev:
        print(
            f"test clustering accuracy {ev['accuracy']:.4f}  NMI {ev['nmi']:.4f}  "
            f"ARI {ev['ari']:.4f}  experts in use {ev['experts_in_use']}/{cfg.model.num_clusters}  "
            f"neg ELBO {ev['neg_elbo']:.2f}"
        )
    elif "neg_elbo" in ev:
        print(f"test neg ELBO {ev['neg_elbo']:.2f} (no labels: no clustering accuracy)")
    print(
        f"results in {result.run_dir}/ (config.yaml, metrics.jsonl, eval.json, expert_grid.png, "
        f"loss_curves.png, model.safetensors)"
    )


def _bench(args: argparse.Namespace, overrides: list[str]) -> int:
    from moe_vae.bench.scope import unsupported
    from moe_vae.config.load import config_to_yaml, load_config

    cfg = load_config(args.config, overrides)
    if args.warmup < 0:
        raise MoeVaeError(f"--warmup {args.warmup}: expected 0 or more steps")
    reason = None if args.no_baseline else unsupported(cfg)
    if reason:
        raise MoeVaeError(f"{reason}: pass --no-baseline")
    if args.profile < 0:
        raise MoeVaeError(f"--profile {args.profile}: expected 0 (none) or a number of steps")
    if args.warmup < 0:
        raise MoeVaeError(f"--warmup {args.warmup}: expected 0 or more untimed steps")
    if args.warmup < 4 and (cfg.train.cuda_graph or cfg.train.compile != "none"):
        # StepGraph records at the 4th call, compilation and reduce-overhead's graphs earlier:
        # within the warm-up, not inside a timed round.
        raise MoeVaeError(
            f"--warmup {args.warmup}: expected at least 4 with train.cuda_graph or "
            "train.compile (the step is compiled and recorded during its first 4 calls)"
        )
    if args.print_config:  # before torch is imported (the GPU suite's checks run many)
        print(config_to_yaml(cfg), end="")
        return 0
    import torch

    from moe_vae.bench.profile import format_profile
    from moe_vae.bench.run import format_table, run_bench

    rows, device, profile = run_bench(
        cfg, args.steps, args.warmup, args.repeats, not args.no_baseline, args.profile
    )
    print(format_table(rows, f"{device} ({torch.get_num_threads()} threads)", args.repeats))
    if profile is not None:
        print(format_profile(profile))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            return _train(args, rest)
        if args.command == "bench":
            return _bench(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "data":
            return _data_write(args)
        if args.command in USE_EPILOGS:
            return _use(args)
    except MoeVaeError as err:
        from moe_vae.parallel.dist import exit_process, launched_rank, launched_world_size

        code = getattr(err, "exit_code", 2)
        rank, world = launched_rank(), launched_world_size()
        if not hasattr(err, "is_main") and rank != 0:
            # Every rank reads the same config, checkpoint and run directory, so such errors are
            # raised on every rank alike and rank 0 says it: once it has, the launcher ends the
            # job, this rank included. Should rank 0 not (it is slower, or waits for this rank
            # in a collective), this rank says it after a grace time, nothing lost. An error of
            # one rank's own in training is marked is_main by train(): said at once.
            time.sleep(OTHER_RANKS_GRACE_S)
            print(f"moe-vae: error: rank {rank}: {err}", file=sys.stderr)
        elif getattr(err, "is_main", True):
            print(f"moe-vae: error: {err}", file=sys.stderr)
        if getattr(err, "world_size", world) > 1:
            exit_process(code)  # maybe in a process group: leave without its teardown
        return code
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
