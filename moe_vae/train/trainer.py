"""The training loop of one run, on one process (CPU or one GPU, chosen automatically) or on
each rank of a distributed job (parallel/: expert shards, all-to-all routing, DeepSpeed).

Legend: B batch, D flattened input, E experts, Z latent.
Data comes from shards (MNIST is written to cached shards first) through data/build.py. The run
directory's files are written by train/outputs.py (figures, eval.json, weights), the tracker
(metrics.jsonl, W&B) and train/checkpoint.py.
"""

from __future__ import annotations

import random
import signal
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from moe_vae.config.load import config_to_yaml
from moe_vae.config.schema import Config
from moe_vae.data.build import build_data, ensure_mnist_shards
from moe_vae.data.loaders import InMemoryLoader, loader_state, order_changes
from moe_vae.errors import MoeVaeError
from moe_vae.evaluate.evaluator import evaluate, to_inputs
from moe_vae.evaluate.metrics import in_use
from moe_vae.model.grouped import check_grouped_device
from moe_vae.model.losses import LossTerms, objective
from moe_vae.model.mixture import MixtureOfVAEs, Routed
from moe_vae.optim import build_adam, nonfinite_flag
from moe_vae.parallel.dist import peer_lost, said_by_this_rank
from moe_vae.parallel.engine import build_engine, check_batch_split
from moe_vae.parallel.loss_scale import (
    absorbs_overflow,
    load_scaler_state,
    loss_scale,
    scaler_state,
)
from moe_vae.parallel.setup import parallelize, setup_parallel
from moe_vae.parallel.sharding import (
    full_optimizer_state,
    full_state_dict,
    load_full_optimizer_state,
    load_full_state_dict,
    sync_master_weights,
)
from moe_vae.track.base import MultiTracker, build_tracker
from moe_vae.train.checkpoint import (
    CheckpointError,
    auto_resume_path,
    check_same_model,
    load_checkpoint,
    require_resumable,
    rng_state,
    roll_back_to,
    run_dir_of,
    save_rotating,
    saved_config,
    set_rng_state,
)
from moe_vae.train.labels import LabelPolicy, manager_cross_entropy
from moe_vae.train.memory import resident_memory_mb
from moe_vae.train.outputs import RunFiles, epoch_summary, leaf_samples, reconstructions
from moe_vae.train.revival import collapse_message, pick_pairs, revive
from moe_vae.train.run_dir import check_output_dir, prepare_run_dir
from moe_vae.train.step_graph import StepGraph
from moe_vae.train.warm_start import ClusterAnchor, cached_clusters

STEP_KEYS = (
    "loss/total",
    "loss/expected",
    "loss/balancing",
    "loss/mixture",
    "route/dropped_fraction",  # top-k: (input, expert) pairs over capacity, of all pairs
    "manager/entropy",  # mean entropy of the manager's distribution over experts
)


@dataclass
class RunResult:
    run_dir: Path
    final_eval: dict[str, Any]
    epochs: list[dict[str, Any]]
    is_main: bool = True  # rank 0 (the rank that wrote the outputs)
    world_size: int = 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Stopped(MoeVaeError):
    """Training stopped on purpose (SIGTERM/SIGINT, or too many non-finite steps), with the
    last good state saved to checkpoint.pt. `exit_code`: 143 after a signal (128 + SIGTERM),
    3 after non-finite steps."""

    def __init__(self, message: str, exit_code: int = 3) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.is_main, self.world_size = True, 1  # set by train() for the command line


def _roll_back(resume: Path) -> None:
    """Resuming from a kept checkpoint: it becomes the latest, later ones are set aside."""
    moved = roll_back_to(resume)
    if moved:
        warnings.warn(
            f"rolled back to {resume.name}: the {len(moved)} later checkpoint(s) moved to "
            f"{moved[0].parent}",
            stacklevel=2,
        )


class Trainer:
    """Owns one run: data on the device, the model, the optimizer, the run directory, the logs."""

    def __init__(self, cfg: Config, run_name: str = "run", quiet: bool = False) -> None:
        self.cfg = cfg
        # Everything that can fail on bad input happens before the run directory is created.
        self.par = setup_parallel(cfg)
        world, rank = self.par.info.world_size, self.par.info.rank
        self.device = self.par.info.device
        self.quiet = quiet or not self.par.is_main
        check_batch_split(cfg.train.batch_size, world)  # before any data is read or written
        if cfg.model.expert_gemm == "grouped":
            check_grouped_device(cfg.model.num_experts, self.device)
        if self.par.is_main:
            check_output_dir(cfg.output)
        seed_everything(cfg.train.seed)
        if cfg.data.name == "mnist":  # one rank writes the shard cache, the others wait for it
            # on_main: an unusable cache (a file, a read-only place) is one line, every rank
            # stops, none waits at a barrier rank 0 never reaches.
            self.par.on_main(lambda: ensure_mnist_shards(cfg.data, progress=not self.quiet))
        self.data = build_data(
            cfg.data,
            cfg.train.batch_size // world,
            cfg.train.seed,
            self.device,
            rank,
            world,
            progress=not self.quiet,
        )
        self.image_shape = self.data.image_shape
        self.labels = LabelPolicy(cfg.loss, cfg.model.num_clusters)
        # In-memory data: every sample's label target (and below, its cluster target), looked
        # up by index on the device each step rather than by key on the host.
        self.label_targets_N: torch.Tensor | None = None
        train = self.data.train
        if isinstance(train, InMemoryLoader) and self.labels.active:
            self.label_targets_N = self.labels.targets(train.keys.tolist(), train.labels)
        if cfg.loss.labelled_batch:
            if self.label_targets_N is None or not isinstance(train, InMemoryLoader):
                raise MoeVaeError(
                    "loss.labelled_batch needs in-memory training data (data.loader: memory or "
                    "auto) and labels (loss.label_fraction or loss.labelled_keys)"
                )
            self.labels.pool(train.images, self.label_targets_N)

        self.model = MixtureOfVAEs(cfg.model, self.image_shape, expert_ids=self.par.expert_ids)
        parallelize(self.model, self.par, cfg.train.seed)
        # bf16-true: weights (and so gradients and Adam's moments) stored in bf16; the model
        # casts its inputs. After initialisation in fp32: the same initial weights, rounded.
        weight_dtype = torch.bfloat16 if cfg.train.precision == "bf16-true" else torch.float32
        self.model.to(self.device, weight_dtype)
        if cfg.train.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.forward_loss = self._forward_loss
        if cfg.train.compile != "none":
            self.forward_loss = torch.compile(self._forward_loss, mode=cfg.train.compile)
        self.engine = build_engine(self.model, cfg, world) if self.par.distributed else None
        # Plain engine: bf16 is autocast (bf16 matmuls, fp32 weights, Adam and loss sums; no
        # loss scaling needed). fp16 needs loss scaling: DeepSpeed's.
        self.bf16_autocast = self.engine is None and cfg.train.precision == "bf16"
        if self.engine is None and cfg.train.precision == "fp16":
            raise MoeVaeError(
                "train.precision=fp16 needs loss scaling, which only the DeepSpeed engine does "
                "here (parallel.engine: deepspeed); in one process use train.precision: bf16"
            )
        self.deferred = cfg.train.host_sync == "log"
        # bf16 weights rounded stochastically: our Adam, which skips on the device like fused
        stochastic = weight_dtype == torch.bfloat16 and cfg.optim.bf16_rounding == "stochastic"
        if stochastic and cfg.train.compile == "none" and self.par.is_main:
            warnings.warn(
                "train.precision=bf16-true rounds Adam's writes stochastically in a few dozen "
                "elementwise passes per weight unless train.compile fuses them: set "
                "train.compile=default (founding recipe on a 2-core CPU: 12 steps/s eager, "
                "74 compiled; fp32 70)",
                stacklevel=2,
            )
        skips_on_device = cfg.optim.impl == "fused" or stochastic
        if self.deferred and (self.engine is not None or not skips_on_device):
            raise MoeVaeError(
                "train.host_sync=log needs one process with the plain engine and "
                "optim.impl=fused (the fused Adam kernel is what skips a non-finite step)"
            )
        # host_sync=log: [skipped, in a row now, longest run in a row since the host last read
        # them]: a run that ended between two reads would be gone from "now".
        self.skips_dev = torch.zeros(3, device=self.device)
        self.step_graph: StepGraph | None = None
        if cfg.train.cuda_graph:
            if not isinstance(self.data.train, InMemoryLoader):
                raise MoeVaeError(
                    "train.cuda_graph needs the training data in memory, but it does not fit "
                    "data.memory_limit_mb and is streamed: raise the limit or turn cuda_graph off"
                )
            self.step_graph = StepGraph(self._recorded_step, cfg.train.batch_size, self.device)
        self.optim = (
            self.engine.optimizer
            if self.engine is not None
            else build_adam(
                self.model.parameters(),
                cfg.optim,
                capturable=cfg.train.cuda_graph and self.device.type == "cuda",
                stochastic_bf16=stochastic,
                compiled=cfg.train.compile != "none",
                seed=cfg.train.seed,
            )
        )
        if world > 1:  # ranks draw their own latent noise (their experts and inputs differ)
            torch.manual_seed(cfg.train.seed * 7919 + rank + 1)
        # Its own generator: the figure's z does not depend on the model's draws.
        self.z_fixed_1Z = torch.randn(
            1, cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.train.seed + 2)
        ).to(self.device)
        self.step = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.loss_scale_skips = 0  # fp16: steps the loss scaler skipped while lowering its scale
        self.stop_signal: str | None = None  # set by the SIGTERM/SIGINT handler
        self.epoch = 1
        self.batches_done = 0  # position in the current epoch's stream (what resume skips)
        self.epoch_sums = torch.zeros(len(STEP_KEYS), device=self.device)
        self.epoch_steps = 0
        # Per-expert usage this epoch: [summed probabilities, argmax counts] (reduced at the end).
        self.epoch_usage_2E = torch.zeros(2, cfg.model.num_experts, device=self.device)
        self.grid_rows: list[np.ndarray] = []
        self.epochs: list[dict[str, Any]] = []

        resume: Path | None = Path(cfg.train.resume) if cfg.train.resume else None
        if cfg.train.resume == "auto":  # rank 0 decides: every rank resumes, or none does
            run = Path(cfg.output.dir).expanduser() / str(cfg.output.name)
            resume = self.par.on_main(lambda: auto_resume_path(run))
            if resume is not None and not resume.is_file():
                raise CheckpointError(
                    f"checkpoint {str(resume)!r}, found by rank 0, is not on this rank's "
                    "machine: every rank reads it, so a job of several nodes resumes from "
                    "storage they all see"
                )
        ckpt = load_checkpoint(resume) if resume is not None else None
        self.tracker_id: str | None = ckpt.get("tracker_run_id") if ckpt else None
        self.anchor = self._warm_start(ckpt)
        self.anchor_targets_N: torch.Tensor | None = None
        self.anchor_weight = torch.zeros((), device=self.device)  # cuda_graph: set each epoch
        if self.anchor is not None:  # the warm start needs in-memory data (_warm_start checks)
            assert isinstance(train, InMemoryLoader)
            self.anchor_targets_N = self.anchor.targets(train.keys.tolist(), self.device)
        if ckpt is not None and resume is not None:
            # Before touching the run directory: a bad checkpoint writes nothing.
            self._restore(ckpt, resume)
            self.run_dir: Path = run_dir_of(resume)
            self.par.on_main(lambda: _roll_back(resume))
        else:
            # resume=auto with nothing to resume: start in that directory (a requeued job).
            overwrite = cfg.output.overwrite or cfg.train.resume == "auto"
            out_cfg = cfg.output.model_copy(update={"overwrite": overwrite})
            self.run_dir = self.par.on_main(lambda: prepare_run_dir(out_cfg, run_name))
        self.tracker: MultiTracker | None = None
        self.files: RunFiles | None = None  # rank 0's
        if self.par.is_main:  # only the global rank 0 tracks
            # Loadable with --config to run this again: a one-off resume path is not part of it
            # (it would resume that checkpoint into this run); resume=auto, a policy, stays.
            again = cfg.train.resume if cfg.train.resume == "auto" else None
            rerun = cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume": again})})
            (self.run_dir / "config.yaml").write_text(config_to_yaml(rerun))
            logged = cfg.model_dump(mode="json")
            if self.engine is not None:
                logged["deepspeed"] = self.engine.config
            self.tracker = build_tracker(cfg, self.run_dir, logged, self.tracker_id)
            self.tracker_id = self.tracker.run_id
            self.files = RunFiles(self.tracker, self.run_dir, cfg, self.image_shape)

    def _warm_start(self, ckpt: dict[str, Any] | None) -> ClusterAnchor | None:
        """The pseudo-label anchor (warm_start.method=cluster): clusters from the checkpoint on
        resume, else computed once on rank 0 (cached) and sent to every rank."""
        cfg = self.cfg
        if cfg.warm_start.method == "none":
            return None
        train = self.data.train
        if not isinstance(train, InMemoryLoader):
            raise MoeVaeError(
                "warm_start.method=cluster needs in-memory training data (data.loader: memory or "
                "auto, with the data under data.memory_limit_mb)"
            )
        clusters = None
        if ckpt is not None and "warm_start_clusters" in ckpt:
            clusters = ckpt["warm_start_clusters"].numpy()
        elif self.par.is_main:
            clusters = cached_clusters(
                train.images,
                cfg.model.num_clusters,
                cfg.warm_start,
                cfg.train.seed,
                log=not self.quiet,
            )
        clusters = self.par.broadcast(clusters)
        return ClusterAnchor(cfg.warm_start, train.keys, clusters)

    def _log(self, record: dict[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker.log(record, self.step)

    def _state(self) -> dict[str, Any]:
        rng = rng_state()
        state = {
            "model": full_state_dict(self.model, self.par),
            "config": config_to_yaml(self.cfg),
            "world_size": self.par.info.world_size,
            "image_shape": list(self.image_shape),
            "step": self.step,
            # epoch, position in it, and what fixes its order
            "data": loader_state(self.epoch, self.batches_done, self.data.train.order()),
            # The epoch's statistics so far, averaged over ranks (each rank's differ): every
            # rank resumes from the average, and the epoch's end averages again, which gives
            # the uninterrupted run's figures on any world size.
            "epoch_sums": self.par.mean_over_ranks(self.epoch_sums).cpu(),
            "epoch_steps": self.epoch_steps,
            "epoch_usage": self.par.mean_over_ranks(self.epoch_usage_2E).cpu(),
            "epochs": self.epochs,
            "grid_rows": [torch.from_numpy(r) for r in self.grid_rows],
            "rng": rng,
            "tracker_run_id": self.tracker_id,
            "skipped": {
                "nonfinite": self.nonfinite_total,
                "in_row": self.nonfinite_in_row,
                "loss_scale": self.loss_scale_skips,
            },
            "loss_scaler": scaler_state(self.optim),
        }
        if self.anchor is not None:
            state["warm_start_clusters"] = torch.from_numpy(self.anchor.clusters)
        state["optim"] = full_optimizer_state(self.model, self.optim, self.par)
        if self.par.info.world_size > 1:
            import torch.distributed as dist

            every: list[Any] = [None] * self.par.info.world_size
            dist.all_gather_object(every, rng)
            state["rng_per_rank"] = every
        return state

    def save_checkpoint(self) -> None:
        state = self._state()  # a collective under expert parallelism: every rank builds it
        # One rank writes, renames and prunes; a failed write (a full disk) stops every rank
        # with its one line, none left waiting in a collective for rank 0.
        self.par.on_main(
            lambda: save_rotating(self.run_dir, state, self.step, self.cfg.train.keep_checkpoints)
        )

    def _restore(self, ckpt: dict[str, Any], path: Path) -> None:
        require_resumable(path, ckpt)
        rerouted = check_same_model(path, saved_config(path, ckpt["config"]).model, self.cfg.model)
        if rerouted and self.par.is_main:
            warnings.warn(
                f"resuming {str(path)!r} with other routing ({', '.join(rerouted)}): the same "
                "weights, trained on from here with the new routing",
                stacklevel=2,
            )
        try:
            load_full_state_dict(self.model, ckpt["model"])
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not fit this model: {str(err).splitlines()[0]}"
            ) from None
        sync_master_weights(self.optim)
        if ckpt.get("optim"):  # empty in checkpoints of BF16_Optimizer runs before fed88a9
            load_full_optimizer_state(self.model, self.optim, ckpt["optim"])
        elif self.par.is_main:
            warnings.warn(
                "the checkpoint holds no optimizer state: Adam's moments restart from zero",
                stacklevel=2,
            )
        load_scaler_state(self.optim, ckpt.get("loss_scaler"))
        skipped = ckpt.get("skipped", {})
        self.nonfinite_total = skipped.get("nonfinite", 0)
        # A run stopped for max_nonfinite_in_row resumes (after a fix) with a fresh allowance.
        in_row = skipped.get("in_row", 0)
        self.nonfinite_in_row = in_row if in_row < self.cfg.train.max_nonfinite_in_row else 0
        self.loss_scale_skips = skipped.get("loss_scale", 0)
        # host_sync=log counts on the device, reconciled against nonfinite_total
        self.skips_dev.copy_(torch.tensor([self.nonfinite_total, *[self.nonfinite_in_row] * 2]))
        self.step, self.epoch = ckpt["step"], ckpt["data"]["epoch"]
        self.batches_done = ckpt["data"]["batches_done"]
        self._check_data_order(ckpt["data"].get("order"))
        self.epoch_sums = ckpt["epoch_sums"].to(self.device)
        self.epoch_steps = ckpt["epoch_steps"]
        if "epoch_usage" in ckpt:
            self.epoch_usage_2E = ckpt["epoch_usage"].to(self.device)
        # An unfinished epoch's record stays until the resumed run finishes that epoch (fit
        # replaces it): a run stopped at train.max_steps mid-epoch ends with it.
        self.epochs = list(ckpt["epochs"])
        self.grid_rows = [row.numpy() for row in ckpt["grid_rows"]]
        per_rank = ckpt.get("rng_per_rank")
        same_world = ckpt.get("world_size", 1) == self.par.info.world_size
        if per_rank and same_world:
            set_rng_state(per_rank[self.par.info.rank])
        elif same_world:
            set_rng_state(ckpt["rng"])
        else:  # no saved stream is this rank's: a fresh one, not the run's first steps' again
            torch.manual_seed(
                (self.cfg.train.seed * 7919 + self.par.info.rank + 1) * 1_000_003 + self.step
            )

    def _check_data_order(self, saved: dict[str, Any] | None) -> None:
        """Resuming mid-epoch skips the batches done; a loader ordered otherwise than when the
        epoch began (another seed, batch, world size or worker count for streamed shards) would
        skip other samples. Allowed (a job may move to another world size), and said once."""
        if not saved or not self.batches_done or not self.par.is_main:
            return
        changes = order_changes(saved, self.data.train.order())
        if changes:
            warnings.warn(
                f"epoch {self.epoch} resumes at batch {self.batches_done} with "
                f"{'; '.join(changes)}: the rest of this epoch does not continue the data order "
                "it began with (some of its samples may come twice, others not at all); the "
                "next epochs start afresh",
                stacklevel=2,
            )

    def _done(self) -> bool:
        return bool(self.cfg.train.max_steps and self.step >= self.cfg.train.max_steps)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """The rest of epoch `epoch` (all of it, unless resumed mid-epoch); its record."""
        cfg, B, loader = self.cfg, self.cfg.train.batch_size, self.data.train
        t0, steps_before = time.perf_counter(), self.epoch_steps
        children_peak = 0.0
        streamed = not isinstance(loader, InMemoryLoader)
        bar = tqdm(
            total=loader.steps_in_epoch(epoch),
            initial=self.batches_done,
            desc=f"epoch {epoch}/{cfg.train.epochs}",
            disable=self.quiet or None,  # None: no bar when stdout is not a terminal
            leave=False,
            file=sys.stdout,
        )
        for values, stop in self._steps(epoch):
            self.step += 1
            self.batches_done += 1
            self.epoch_steps += 1
            bar.update()
            if values is None:
                self._record_skips(1, self.nonfinite_in_row + 1)
                continue
            self.nonfinite_in_row = 0
            first = self.epoch_steps == steps_before + 1
            if first or (streamed and self.step % cfg.train.log_every == 0):
                # Loader workers exist only while the epoch streams: sample them now (at every
                # logged step if they stream; ~1 ms a sample, which a 60k-step GPU run feels).
                memory = resident_memory_mb()
                children_peak = max(children_peak, memory["memory/children_uss_mb"])
            if self.step % cfg.train.log_every == 0:
                self._reconcile_skips()
                # One host sync per logged step, not per step; the average over ranks.
                vals = self.par.mean_over_ranks(values).tolist()
                self._log(
                    {"step": self.step, "epoch": epoch, **dict(zip(STEP_KEYS, vals, strict=True))}
                )
                rate = (self.epoch_steps - steps_before) * B / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{vals[0]:.2f}", samples_s=f"{rate:.0f}")
                if not self.quiet and not sys.stdout.isatty():  # CI / SLURM logs: plain lines
                    print(
                        f"epoch {epoch} step {self.step} loss {vals[0]:.2f} {rate:.0f} samples/s",
                        flush=True,
                    )
            if stop:  # every rank agreed (one collective per step under several ranks)
                self._reconcile_skips()
                self.save_checkpoint()
                raise Stopped(
                    f"stopped by {self.stop_signal or 'a signal on another rank'} at step "
                    f"{self.step}; checkpoint saved: resume with "
                    f"--train.resume={self.run_dir / 'checkpoint.pt'}",
                    exit_code=143,
                )
            if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                self._reconcile_skips()
                self.save_checkpoint()
            if self._done():
                break
        bar.close()
        self._reconcile_skips()
        seconds = time.perf_counter() - t0
        complete = not self._done() or self.batches_done >= loader.steps_in_epoch(epoch)
        # Streamed skips differ per rank: summed. Load-time skips are the same on every rank
        # (each reads all of an in-memory dataset): counted once.
        bad = Counter(self.par.sum_counts(loader.report.counts)) + self.data.load_skipped
        # Batches a short stream repeated (StreamingLoader.epoch_batches): steps, not samples.
        refilled = self.par.sum_counts({"steps": loader.report.refilled_steps})["steps"]
        means = self.par.mean_over_ranks(self.epoch_sums / max(self.epoch_steps, 1))
        importance, assigned = self.par.mean_over_ranks(self.epoch_usage_2E)
        share = (assigned / assigned.sum().clamp_min(1)).tolist()
        new_steps = self.epoch_steps - steps_before
        record = {
            "event": "epoch",
            "epoch": epoch,
            "step": self.step,
            "complete": complete,
            **dict(zip(STEP_KEYS, means.tolist(), strict=True)),
            "epoch_seconds": seconds,
            "samples_per_second": (self.epoch_steps - steps_before) * B / seconds,
            "time/step_seconds": seconds / max(new_steps, 1),
            "optim/lr": self.optim.param_groups[0]["lr"],
            **({"warm_start/weight": self.anchor.weight(epoch)} if self.anchor else {}),
            "experts/in_use": int(in_use(share, cfg.eval.in_use_min_fraction).sum()),
            "experts/dead": sum(f == 0 for f in share),
            "experts/importance": (importance / importance.sum().clamp_min(1e-12)).tolist(),
            "train/nonfinite_skipped": self.nonfinite_total,
            **self._loss_scale_record(),
            "data/bad_samples": sum(bad.values()),
            "data/refilled_steps": refilled,
            **{f"data/bad/{k}": v for k, v in sorted(bad.items())},
        }
        record["memory/rss_mb"] = resident_memory_mb()["memory/rss_mb"]
        record["memory/children_uss_mb"] = children_peak  # the most seen (first and logged steps)
        if self.device.type == "cuda":
            record["gpu/max_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        record["experts/max_share"] = max(share)
        warning = collapse_message(share, cfg.train.collapse_share)
        if warning:
            record["experts/collapse"] = True
            self._log({"event": "manager_collapse", "step": self.step, "share": share})
            if self.par.is_main:
                tqdm.write(f"warning: {warning}", file=sys.stderr)
        if complete and cfg.train.revive_dead_experts:
            pairs = pick_pairs(share, cfg.eval.in_use_min_fraction)
            revive(
                self.model,
                self.optim,
                self.par,
                pairs,
                cfg.train.revive_noise,
                seed=cfg.train.seed * 100_003 + epoch,
            )
            record["experts/revived"] = len(pairs)
            if pairs:
                self._log({"event": "experts_revived", "step": self.step, "pairs": pairs})
        if complete:  # the next epoch starts from its first batch
            self.epoch, self.batches_done, self.epoch_steps = epoch + 1, 0, 0
            self.epoch_sums.zero_()
            self.epoch_usage_2E.zero_()
        return record

    def _loss_scale_record(self) -> dict[str, float]:
        scale = loss_scale(self.optim)
        if scale is None:
            return {}
        return {"optim/loss_scale": scale, "train/loss_scale_skipped": self.loss_scale_skips}

    def _steps(self, epoch: int) -> Iterator[tuple[torch.Tensor | None, bool]]:
        """Runs the rest of epoch `epoch` step by step: per step (its values of STEP_KEYS, None
        if it was skipped as non-finite; stop asked)."""
        if self.step_graph is not None:
            assert isinstance(self.data.train, InMemoryLoader)
            plan = self.data.train.epoch_plan(epoch).to(self.device)  # one copy per epoch
            if self.anchor is not None:  # in place: the recorded step reads this tensor
                self.anchor_weight.fill_(self.anchor.weight(epoch))
            for i in range(self.batches_done, len(plan)):
                yield self.step_graph(plan[i]), self.stop_signal is not None
            return
        for batch in self.data.train.epoch_batches(epoch, skip=self.batches_done):
            x_BD = to_inputs(batch.images.to(self.device, non_blocking=True))
            targets_B, anchor = None, None
            if batch.index is not None:  # in-memory data
                weight = self.anchor.weight(epoch) if self.anchor is not None else 0.0
                targets_B, anchor = self._table_targets(batch.index, weight or None)
            elif self.labels.active:  # streamed data: by key
                targets_B = self.labels.targets(batch.keys, batch.labels.to(self.device))
            terms, finite, stop = self.train_step(x_BD, targets_B, anchor)
            yield (self._accumulate(terms, len(x_BD)) if finite else None), stop

    def _recorded_step(self, idx_B: torch.Tensor) -> torch.Tensor:
        """train.cuda_graph's step, from the samples' indices to the step's values."""
        assert isinstance(self.data.train, InMemoryLoader)
        # The anchor is always recorded; its weight tensor reaches 0 after its decay.
        targets_B, anchor = self._table_targets(idx_B, self.anchor_weight)
        x_BD = to_inputs(self.data.train.images[idx_B])
        terms, _, _ = self.train_step(x_BD, targets_B, anchor)
        return self._accumulate(terms, len(idx_B))

    def _table_targets(
        self, idx_B: torch.Tensor, anchor_weight: float | torch.Tensor | None
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, float | torch.Tensor] | None]:
        """In-memory data: the samples' label targets and the warm start's (pseudo-labels,
        `anchor_weight`; None: no anchor term), looked up in the per-sample tables."""
        targets_B = self.label_targets_N[idx_B] if self.label_targets_N is not None else None
        anchor = None
        if self.anchor_targets_N is not None and anchor_weight is not None:
            anchor = (self.anchor_targets_N[idx_B], anchor_weight)
        return targets_B, anchor

    def _accumulate(self, terms: LossTerms, batch: int) -> torch.Tensor:
        """The step's values of STEP_KEYS, added to the epoch's sums (on the device)."""
        dropped = (
            terms.dropped / (batch * self.cfg.model.top_k)
            if terms.dropped is not None
            else terms.total.new_zeros(())
        )
        values = torch.stack(
            [terms.total, terms.expected, terms.balancing, terms.mixture, dropped, terms.entropy]
        ).detach()
        if terms.applied is not None:  # host_sync=log: a skipped step adds nothing
            values = torch.where(terms.applied > 0, values, torch.zeros_like(values))
        self.epoch_sums += values
        return values

    def train_step(
        self,
        x_BD: torch.Tensor,
        targets_B: torch.Tensor | None = None,
        anchor: tuple[torch.Tensor, float | torch.Tensor] | None = None,
    ) -> tuple[LossTerms, bool, bool]:
        """Forward (through the dispatcher), backward, and the optimizer step unless the loss or
        a gradient is not finite on any rank. `targets_B`: labels of the labelled samples (-1
        elsewhere), semi-supervised only; `anchor`: the warm start's (pseudo-labels, weight).
        Returns (terms, finite, stop requested)."""
        cfg = self.cfg
        fp16 = self.engine is not None and cfg.train.precision == "fp16"
        if self.engine is None:
            # Before the forward: the last step's gradients are freed before this step's
            # activations exist (a lower peak), and under compile's reduce-overhead no output
            # of the last recorded backward is still alive when the next forward replays.
            self.optim.zero_grad(set_to_none=True)
        # Autocast's cache of bf16 weights would outlive a recorded step: off under cuda_graph.
        with torch.autocast(
            self.device.type,
            torch.bfloat16,
            enabled=self.bf16_autocast,
            cache_enabled=not self.cfg.train.cuda_graph,
        ):
            routed, terms = self.forward_loss(x_BD)
        terms.dropped = routed.dropped
        clusters_BC = self.model.cluster_logits(routed.logits_BE)  # labels name top-level experts
        if targets_B is not None:
            terms.total = terms.total + self.labels.loss(clusters_BC, targets_B)
        if anchor is not None:
            terms.total = terms.total + manager_cross_entropy(clusters_BC, *anchor)
        if cfg.loss.labelled_batch:  # replayed labelled samples: through the manager only
            images, labels = self.labels.replay(cfg.loss.labelled_batch, cfg.train.seed, self.step)
            logits = self.model.manager_logits(to_inputs(images.to(self.device)))
            terms.total = terms.total + self.labels.loss(self.model.cluster_logits(logits), labels)
        if self.engine is not None and (self.engine.zero_optimization_stage() > 0 or fp16):
            finite, stop = self._engine_checked_step(terms.total)
            return (self._usage(terms) if finite else terms), finite, stop
        if self.engine is not None:  # DeepSpeed reduces gradients (experts over their group)
            self.engine.backward(terms.total)
        else:
            terms.total.backward()
        # One flag tensor, reduced once: [bad on any rank, stop asked on any rank].
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        found_inf = nonfinite_flag(terms.total, grads)
        if self.deferred:
            return self._deferred_step(terms, found_inf)
        bad, stop = self._any_rank(found_inf.bool())
        if bad:  # skip the update everywhere; DeepSpeed alone would not in fp32
            for p in self.model.parameters():
                p.grad = None
            return terms, False, stop
        if cfg.optim.grad_clip:  # (under ZeRO 1/2 DeepSpeed clips, in _engine_checked_step)
            self.par.clip_grad_norm(self.model, cfg.optim.grad_clip)
        if self.engine is not None:
            self.engine.step()
        else:
            self.optim.step()
        return self._usage(terms), True, stop

    def _deferred_step(self, terms: LossTerms, bad: torch.Tensor) -> tuple[LossTerms, bool, bool]:
        """host_sync=log: the update without a host sync. The fused Adam kernel skips it (and
        its step count) where found_inf (`bad`) is 1; the skip is counted on the device and
        reported by _reconcile_skips."""
        if self.cfg.optim.grad_clip:  # the norm stays on the device
            self.par.clip_grad_norm(self.model, self.cfg.optim.grad_clip)
        self.optim.found_inf = bad  # type: ignore[union-attr]
        self.optim.step()
        self.skips_dev[0] += bad
        self.skips_dev[1] = (self.skips_dev[1] + 1) * bad
        self.skips_dev[2] = torch.maximum(self.skips_dev[2], self.skips_dev[1])
        terms.applied = 1.0 - bad
        return self._usage(terms), True, self.stop_signal is not None

    def _reconcile_skips(self) -> None:
        """host_sync=log: read the device's skip counters (at logged steps and epoch ends), log
        the skipped steps, and stop after max_nonfinite_in_row in a row."""
        if not self.deferred:
            return
        total, in_row, longest = (int(v) for v in self.skips_dev.tolist())
        self.skips_dev[2] = self.skips_dev[1]  # the next read's longest run starts from now
        if total > self.nonfinite_total:  # reconciled every epoch: all in this epoch
            self._record_skips(total - self.nonfinite_total, in_row, longest)

    def _record_skips(self, new: int, in_row: int, longest: int | None = None) -> None:
        """`new` skipped steps, the last `in_row` steps skipped in a row, the longest run in a
        row among them `longest` (host_sync=log, which reads them late; else in_row):
        counted, logged and left out of the epoch's averages; max_nonfinite_in_row in a row
        stop the run with the last good state saved."""
        longest = in_row if longest is None else longest
        self.nonfinite_total += new
        self.nonfinite_in_row = in_row
        self.epoch_steps -= new
        self._log(
            {
                "step": self.step,
                "event": "nonfinite_step_skipped",
                "count": new,
                "in_row": in_row,
                "longest_in_row": longest,
            }
        )
        if longest >= self.cfg.train.max_nonfinite_in_row:
            self.save_checkpoint()
            raise Stopped(
                f"{longest} steps in a row had a non-finite loss or gradient "
                f"(train.max_nonfinite_in_row); the last good state is in "
                f"{self.run_dir / 'checkpoint.pt'}: lower optim.lr or check the data"
            )

    def _forward_loss(self, x_BD: torch.Tensor) -> tuple[Routed, LossTerms]:
        """The step's forward through the dispatcher and its loss terms (what train.compile
        compiles)."""
        routed = self.model.losses(x_BD, self.cfg.loss)
        world = self.par.info.world_size
        return routed, objective(
            routed, self.cfg.loss, self.par.sum_over_ranks if world > 1 else None
        )

    def _any_rank(self, bad: torch.Tensor) -> tuple[bool, bool]:
        """(bad on any rank, stop asked on any rank): one small tensor, reduced once."""
        flags = torch.stack([bad.cpu(), torch.tensor(self.stop_signal is not None)]).float()
        if self.par.info.world_size > 1:
            import torch.distributed as dist

            flags = flags.to(self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_any, stop = (bool(v) for v in flags.tolist())
        return bad_any, stop

    def _engine_checked_step(self, loss: torch.Tensor) -> tuple[bool, bool]:
        """ZeRO 1/2 (gradients go straight into partitioned buffers) and fp16 (gradients are
        scaled): the check is split. A non-finite loss on any rank skips backward and step
        everywhere; a non-finite gradient is caught by DeepSpeed's own overflow check (enabled
        for ZeRO in build_engine), which skips the update on every rank. Under fp16 that skip
        is the loss scaler lowering its scale, counted apart (train/loss_scale_skipped) and
        not a failed step, unless the scale is at its floor already. Returns (finite, stop)."""
        assert self.engine is not None
        bad, stop = self._any_rank(~torch.isfinite(loss.detach()))
        if bad:
            return False, stop
        scaler_skip = absorbs_overflow(self.optim)  # before the step may lower the scale
        self.engine.backward(loss)
        self.engine.step()
        if self.engine.was_step_applied():
            return True, stop
        if scaler_skip:
            self.loss_scale_skips += 1
            return True, stop
        return False, stop

    def _usage(self, terms: LossTerms) -> LossTerms:
        """Adds this step's expert usage (computed with its forward) to the epoch's statistics,
        after an applied step."""
        applied = terms.applied if terms.applied is not None else 1.0
        self.epoch_usage_2E += terms.usage_2E * applied
        return terms

    def evaluate(self) -> dict[str, Any]:
        if self.data.test is None:
            return {}
        batches = self.data.test.batches(self.cfg.eval.batch_size)
        return evaluate(self.model, batches, self.cfg.loss, self.cfg.eval, seed=self.cfg.train.seed)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only a flag: the loop saves a checkpoint after the current step, on every rank.
        self.stop_signal = signal.Signals(signum).name

    def fit(self) -> RunResult:
        cfg = self.cfg
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):  # SLURM pre-emption sends SIGTERM
                signal.signal(sig, self._on_signal)
        self._log(
            {
                "event": "resume" if self.step else "start",
                "step": self.step,
                "device": str(self.device),
                "num_params": sum(p.numel() for p in self.model.parameters()),
                "train_samples": self.data.train_shards.num_samples,
                "train_shards": len(self.data.train_shards.urls),
                "loader": type(self.data.train).__name__,
                "test_samples": len(self.data.test.images) if self.data.test else 0,
                "steps_per_epoch": self.data.train.steps_in_epoch(1),
                "world_size": self.par.info.world_size,
                "image_shape": list(self.image_shape),
                "ep_size": self.par.ep.size if self.par.ep else 1,
            }
        )
        final_eval: dict[str, Any] = {}
        for epoch in range(self.epoch, cfg.train.epochs + 1):
            if self._done():  # resumed at train.max_steps already: no step more
                break
            record = self.train_epoch(epoch)
            if self.epochs and self.epochs[-1]["epoch"] == epoch:  # its unfinished record
                self.epochs.pop()
                self.grid_rows.pop()
            self.epochs.append(record)  # eval results are added to the same dict below
            self.model.eval()
            row = self.par.gather_experts(self.model.decode_all(self.z_fixed_1Z)[:, 0])
            self.grid_rows.append(row.cpu().numpy())
            self.model.train()
            last = epoch == cfg.train.epochs or self._done()
            every = cfg.eval.every_epochs
            if last or (every and epoch % every == 0):
                final_eval = self.evaluate()
                record.update({f"eval/{k}": v for k, v in final_eval.items() if k != "confusion"})
                recon = None
                if self.data.test is not None:  # a collective under expert parallelism
                    first = self.data.test.images[:8]
                    recon = reconstructions(self.model, self.par, first, cfg.train.seed)
                leaves = leaf_samples(self.model, self.par, cfg)  # likewise
                self._log(record)
                if self.files is not None:
                    self.files.figures(
                        self.grid_rows, self.epochs, final_eval, recon, leaves, self.step
                    )
            else:
                self._log(record)
            if not self.quiet:
                tqdm.write(epoch_summary(record), file=sys.stdout)
            if last:
                break
        if not final_eval:  # resumed from a checkpoint of a finished run
            final_eval = self.evaluate()
        final_eval.update(epochs_run=len(self.epochs), steps=self.step)
        self.save_checkpoint()
        self.finish(final_eval)
        return RunResult(
            self.run_dir, final_eval, self.epochs, self.par.is_main, self.par.info.world_size
        )

    def finish(self, final_eval: dict[str, Any]) -> None:
        """Final metrics, figures and weights (consolidated) into the run directory."""
        weights = full_state_dict(self.model, self.par)  # a collective: every rank takes part
        if self.files is not None:
            self.files.final(self.grid_rows, self.epochs, final_eval, weights, self.step)


def train(cfg: Config, run_name: str = "run", quiet: bool = False) -> RunResult:
    """Train one run to the end (or train.max_steps) and write its outputs."""
    trainer = Trainer(cfg, run_name, quiet)
    try:
        result = trainer.fit()
    except Stopped as stop:  # every rank stops together: leave together, the run marked
        if trainer.tracker is not None:
            trainer.tracker.finish(stop.exit_code)
        trainer.par.shutdown()
        stop.is_main, stop.world_size = trainer.par.is_main, trainer.par.info.world_size
        raise
    except MoeVaeError as err:  # bad input met by one rank (its data): that rank says it
        if trainer.tracker is not None:
            trainer.tracker.finish(getattr(err, "exit_code", 2))
        raise said_by_this_rank(err, trainer.par.info) from None
    except RuntimeError as err:  # a collective whose peer is gone: its own error says why
        if trainer.par.info.world_size == 1 or not peer_lost(err):
            raise
        if trainer.tracker is not None:
            trainer.tracker.finish(1)
        lost = MoeVaeError("another rank of the job stopped; its error, if it had one, is above")
        lost.exit_code = 1  # type: ignore[attr-defined]
        raise said_by_this_rank(lost, trainer.par.info) from None
    trainer.par.shutdown()
    return result
