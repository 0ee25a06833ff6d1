"""The config tree. Defaults are the founding recipe (docs: model.md); configs/mnist_seed.yaml
states the same values explicitly and a test keeps the two equal.

Every section forbids unknown keys and validates strictly (no silent "3" -> 3 coercion), so a
typo or a wrong type is an error that names the key.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PositiveInt = Annotated[int, Field(ge=1)]
Activation = Literal["sigmoid", "relu", "tanh", "gelu", "silu", "elu", "leaky_relu"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class ModelConfig(Section):
    num_experts: PositiveInt = 10
    expert: Literal["mlp", "conv"] = "mlp"
    z_dim: PositiveInt = 10
    encoder_layers: list[PositiveInt] = Field(default_factory=lambda: [128])
    decoder_layers: list[PositiveInt] = Field(default_factory=lambda: [128])
    manager_layers: list[PositiveInt] = Field(default_factory=lambda: [128])
    activation: Activation = "sigmoid"
    # var = var_floor + exp(linear(h)): the floor keeps log(var) finite.
    var_floor: Annotated[float, Field(gt=0)] = 1e-5
    # Conv experts only: output channels of each stride-2 conv (the decoder mirrors them).
    conv_channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64])
    # dense: every expert sees every input (the seed's loss); topk: each input goes to the
    # top_k experts of its manager; in training the other pairs count at the batch's mean
    # computed loss (losses.fill_unrouted), in evaluation the probabilities renormalise over
    # the routed experts.
    routing: Literal["dense", "topk"] = "dense"
    top_k: PositiveInt = 1
    # Top-k training only. none: the manager's greedy top_k. gumbel: the top_k of logits +
    # Gumbel noise, a sample without replacement from the manager's probabilities: a flat
    # manager then spreads its inputs over all experts, where greedy top-1 over 1024 experts
    # sent nearly all of them to a few experts and dropped 94-99 % (docs/performance.md).
    # Evaluation always routes greedily.
    route_noise: Literal["none", "gumbel"] = "none"
    # Top-k only: each expert takes at most capacity_factor * (inputs * top_k / experts) inputs
    # per batch and rank; the rest are dropped (counted). 0 = dropless (capacity = busiest expert).
    capacity_factor: Annotated[float, Field(ge=0)] = 1.25
    # Top-k only, MLP experts: how each layer of all experts runs over their inputs. batched:
    # inputs padded to the capacity per expert, one batched matmul [E, C, ...]. grouped: inputs
    # sorted by expert with no capacity padding (rows aligned to 16 bytes), one grouped GEMM
    # (torch._grouped_mm; bf16 on CUDA). Same drops, same losses. Grouped computes P + E x 16
    # bytes of rows against batched's ~capacity_factor x P: it pays with many inputs per
    # expert (> 32 in bf16 at capacity 1.25), not with a few (docs/performance.md).
    expert_gemm: Literal["batched", "grouped"] = "batched"
    # A hierarchical mixture, e.g. [10, 3]: 10 top-level experts, each itself a mixture of 3
    # VAEs with its own manager (the leaves, 30 VAEs, are the bank's experts: num_experts is
    # the product). The top level is the clustering; balancing applies per level.
    hierarchy: list[PositiveInt] | None = None
    # The first layers of the manager and of every expert read the same input (dense routing,
    # one expert shard): keep them as one [D, manager + E x encoder] weight, one GEMM for all.
    # Same math as unfused; the checkpoint's layout differs. MLP experts, flat manager.
    fused_input: bool = False

    @property
    def num_clusters(self) -> int:
        """Top-level experts: what the manager classifies into."""
        return self.hierarchy[0] if self.hierarchy else self.num_experts

    @model_validator(mode="before")
    @classmethod
    def _leaves_from_hierarchy(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("hierarchy") and "num_experts" not in data:
            levels = data["hierarchy"]
            if isinstance(levels, list) and all(isinstance(n, int) for n in levels):
                data = {**data, "num_experts": math.prod(levels)}
        return data

    @model_validator(mode="after")
    def _top_k_fits(self) -> ModelConfig:
        if self.hierarchy is not None:
            if len(self.hierarchy) < 2:
                raise ValueError(
                    f"model.hierarchy={self.hierarchy} needs at least two levels (e.g. [10, 3]); "
                    f"a flat mixture is model.num_experts"
                )
            if math.prod(self.hierarchy) != self.num_experts:
                raise ValueError(
                    f"model.num_experts={self.num_experts} must be the number of leaves of "
                    f"model.hierarchy={self.hierarchy} ({math.prod(self.hierarchy)}); leave it "
                    f"out and it follows the hierarchy"
                )
            if self.routing != "dense":
                raise ValueError("model.hierarchy needs model.routing: dense")
        if self.expert_gemm == "grouped" and (self.routing != "topk" or self.expert != "mlp"):
            raise ValueError(
                f"model.expert_gemm=grouped needs model.routing: topk and model.expert: mlp "
                f"(got routing {self.routing}, expert {self.expert})"
            )
        if self.route_noise != "none" and self.routing != "topk":
            raise ValueError(
                f"model.route_noise={self.route_noise} picks top-k experts: it needs "
                f"model.routing: topk (got {self.routing})"
            )
        if self.fused_input:
            needs = {
                "model.routing: dense": self.routing == "dense",
                "model.expert: mlp": self.expert == "mlp",
                "no model.hierarchy": self.hierarchy is None,
                "a hidden layer in model.manager_layers": bool(self.manager_layers),
                "a hidden layer in model.encoder_layers": bool(self.encoder_layers),
            }
            missing = [what for what, ok in needs.items() if not ok]
            if missing:
                raise ValueError(f"model.fused_input needs {', '.join(missing)}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"model.top_k={self.top_k} is more than model.num_experts={self.num_experts}"
            )
        return self


class LossConfig(Section):
    likelihood: Literal["gaussian", "bernoulli"] = "gaussian"
    decoder_std: Annotated[float, Field(gt=0)] = 0.5
    # expected: mean_b Σ_i p_i L_i (the seed); mixture: mean_b −log Σ_i p_i exp(−L_i).
    # With top-k routing use expected: mixture weighs each computed pair by its posterior
    # against the batch-mean fill of the others, so an input harder than the batch's mean
    # barely trains its expert (measured: its drops grow, docs/performance.md).
    objective: Literal["expected", "mixture"] = "expected"
    balancing_weight: Annotated[float, Field(ge=0)] = 0.1
    # The Switch Transformer's load-balancing term E · Σ_i f_i · P_i (f: share of the
    # manager's choices, P: share of its probability), added with this weight. For greedy
    # top-k over many experts: with flat probabilities the variance term above sees no
    # imbalance while the choices crowd onto a few experts and overflow their capacity
    # (model.route_noise: gumbel avoids the crowding by sampling the choices).
    choice_balancing_weight: Annotated[float, Field(ge=0)] = 0.0
    # Semi-supervised: the labels of this fraction of training samples (chosen by a hash of the
    # key) or of the keys listed in `labelled_keys` (a text file) add label_weight x the
    # manager's cross-entropy (label c -> expert c). 0 and null: unsupervised (the seed).
    label_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0
    labelled_keys: str | None = None
    label_weight: Annotated[float, Field(ge=0)] = 1.0
    # Also replay this many labelled samples per step (drawn from all of them, manager only;
    # in-memory data): what makes a few labels count.
    labelled_batch: Annotated[int, Field(ge=0)] = 0


class WarmStartConfig(Section):
    # none: experts and manager start from random weights (the seed). cluster: before the first
    # step the training images are embedded with UMAP and clustered by a Gaussian mixture into
    # one cluster per top-level expert (the best of `restarts` fits by likelihood); the manager
    # is then pulled toward those clusters by `weight` x its cross-entropy (cluster k -> expert
    # k), held for `hold_epochs`, then lowered linearly to 0 over `decay_epochs`. Needs
    # in-memory training data; the clusters are cached and saved in the checkpoint.
    method: Literal["none", "cluster"] = "none"
    neighbors: Annotated[int, Field(ge=2)] = 10  # UMAP's n_neighbors
    dims: PositiveInt = 10  # UMAP's n_components
    restarts: PositiveInt = 8  # Gaussian-mixture fits (k-means++ starts); the likeliest wins
    weight: Annotated[float, Field(ge=0)] = 1.0
    hold_epochs: Annotated[int, Field(ge=0)] = 1000
    decay_epochs: Annotated[int, Field(ge=0)] = 0


class OptimConfig(Section):
    name: Literal["adam"] = "adam"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    betas: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2
    )
    eps: Annotated[float, Field(gt=0)] = 1e-8
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    # Clip the global gradient norm to this value (0 = no clipping).
    grad_clip: Annotated[float, Field(ge=0)] = 0.0
    # torch's Adam implementation (the same algorithm): fused (fastest), foreach or loop.
    impl: Literal["fused", "foreach", "loop"] = "fused"
    # train.precision=bf16-true only: how Adam writes the bf16 weights and moments.
    # stochastic: up or down at random, right on average, so updates smaller than a bf16 step
    # still add up (moe_vae/stochastic_adam.py; its random bits a hash of seed, step and
    # element; slow unless train.compile fuses it). nearest: torch's fused Adam, which loses
    # them (the recipe's loss stalls ~10 nats short of fp32).
    bf16_rounding: Literal["stochastic", "nearest"] = "stochastic"


class TrainConfig(Section):
    epochs: PositiveInt = 100
    # Global batch: split evenly over data-parallel ranks.
    batch_size: PositiveInt = 100
    seed: Annotated[int, Field(ge=0)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # One process (plain engine): bf16 = autocast (bf16 matmuls, fp32 weights and loss sums),
    # on CPU too; fp16 is not offered there. DeepSpeed: its bf16 mode (CPU and GPU; fp32
    # master weights, kept in checkpoints) and fp16 mode (GPU; ZeRO 1/2; loss scaling knobs in
    # the JSON's "fp16" section, the scaler's state kept in checkpoints).
    # bf16-true (one process): weights, gradients and Adam's moments stored in bf16 too, half
    # the optimizer's memory traffic (what bounds top-1 over many experts); routing and loss
    # sums stay fp32. How Adam rounds its bf16 writes: optim.bf16_rounding.
    precision: Literal["fp32", "bf16", "bf16-true", "fp16"] = "fp32"
    # torch.compile the step's forward and loss (backward follows through AOTAutograd): none,
    # or a torch.compile mode; reduce-overhead also captures CUDA graphs on a GPU.
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = "none"
    # When the host reads the device's results. step: every step (a skipped non-finite step is
    # known at once). log: only at logged steps and epoch ends, so a step never waits for the
    # device: a non-finite step is skipped inside the fused Adam kernel and reported, and
    # max_nonfinite_in_row checked (against the longest run in a row since the last read), at
    # the next logged step. One process, plain engine, fused Adam.
    host_sync: Literal["step", "log"] = "step"
    # The whole step (batch gather, forward, backward, finite check, Adam, the epoch's sums)
    # recorded once as a CUDA graph and replayed: one launch per step. Needs host_sync=log,
    # compile none or default, in-memory data, and no per-step host input (labelled_batch's
    # replay, revival). On a CPU the same step runs without a graph.
    cuda_graph: bool = False
    # TF32 tensor cores for fp32 matmuls and convolutions on NVIDIA GPUs (no effect on a CPU).
    tf32: bool = False
    # Stop after this many optimizer steps (smoke tests); null = run every epoch to the end.
    max_steps: PositiveInt | None = None
    # A JSON line with the step's losses every this many steps.
    log_every: PositiveInt = 50
    # Write <run dir>/checkpoint.pt every this many steps (and always at the end); null = end only.
    checkpoint_every: PositiveInt | None = None
    # A checkpoint.pt to continue from (the run goes on in its run directory), or "auto": the
    # newest complete checkpoint of output.dir/output.name if there is one, else a fresh start.
    resume: str | None = None
    # Step checkpoints kept in <run dir>/checkpoints/ (checkpoint.pt is always the newest).
    keep_checkpoints: PositiveInt = 1
    # A step whose loss or gradient is not finite is skipped (on every rank together); this many
    # in a row stop the run with the last good state saved.
    max_nonfinite_in_row: PositiveInt = 10
    # An epoch where one expert gets more than this share of the inputs (manager argmax) is
    # reported as manager collapse (an event in the logs and a warning).
    collapse_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    # At the end of each epoch, experts not in use (given no input, or less than
    # eval.in_use_min_fraction of the inputs) become perturbed copies of the busiest experts,
    # each splitting its donor's manager logit.
    revive_dead_experts: bool = False
    # The perturbation of a revived expert, relative to its donor's mean absolute weight.
    revive_noise: Annotated[float, Field(ge=0)] = 0.01


class DataConfig(Section):
    # mnist: the built-in dataset, written once to cached shards and trained from them;
    # shards: WebDataset shards of your own (`train_shards`, optional labelled `test_shards`).
    name: Literal["mnist", "shards"] = "mnist"
    # Where MNIST's IDX files come from. embedded: the copy inside the package (offline);
    # dir: IDX files (gz or raw) in `root`; download: fetch into `root` from `mirrors`, md5-checked.
    source: Literal["embedded", "dir", "download"] = "embedded"
    root: str | None = None
    mirrors: list[str] = Field(
        default_factory=lambda: [
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ]
    )
    verify_md5: bool = True
    # Shard specs: a path, brace pattern (data/train-{000000..000099}.tar), http(s):// or pipe:
    # URL, or a list of them.
    train_shards: str | list[str] | None = None
    test_shards: str | list[str] | None = None
    # Where MNIST shards are cached (null: $MOE_VAE_CACHE, else $XDG_CACHE_HOME/moe_vae or
    # ~/.cache/moe_vae).
    cache_dir: str | None = None
    # How MNIST is written: batched records (fast for small images) or one sample per member.
    record: Literal["batched", "sample"] = "batched"
    samples_per_shard: PositiveInt = 10_000
    # memory: load every sample once into (GPU) memory and shuffle there; stream: DataLoader
    # workers stream shards; auto: memory when the data is known to fit in memory_limit_mb.
    loader: Literal["auto", "memory", "stream"] = "auto"
    memory_limit_mb: PositiveInt = 2048
    num_workers: Annotated[int, Field(ge=0)] = 2
    shuffle_buffer: PositiveInt = 10_000
    # Resampled shards: each rank/worker draws shards with replacement; epoch_steps sets the
    # epoch length (null: the data's size).
    resampled: bool = False
    epoch_steps: PositiveInt | None = None
    # More skipped (bad) samples than this fraction stops training with an error.
    max_bad_fraction: Annotated[float, Field(ge=0, le=1)] = 0.01
    # Use only the first N train / test samples (quick runs, tests; in-memory loader only: with
    # loader auto, only these N count against memory_limit_mb, and an error if they do not fit).
    train_limit: PositiveInt | None = None
    test_limit: PositiveInt | None = None

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.source == "dir" and not self.root:
            raise ValueError("data.root must name a directory when data.source is 'dir'")
        if self.name == "shards" and not self.train_shards:
            raise ValueError("data.train_shards must be set when data.name is 'shards'")
        if self.train_limit and self.loader == "stream":
            raise ValueError(
                "data.train_limit needs the in-memory loader (data.loader: auto|memory)"
            )
        return self


class EvalConfig(Section):
    batch_size: PositiveInt = 1000
    # Evaluate on the test split every N epochs (0 = only at the end of training).
    every_epochs: Annotated[int, Field(ge=0)] = 0
    # An expert is "in use" when it is the manager's argmax for at least this fraction of the
    # inputs, and for one input at least (so at 0: every expert given an input).
    in_use_min_fraction: Annotated[float, Field(ge=0, le=1)] = 0.01


class OutputConfig(Section):
    dir: str = "runs"
    # Run directory name under `dir`; null = "<config file stem>-<timestamp>".
    name: str | None = None
    # Refuse to write into a run directory that already holds outputs, unless true (then its
    # earlier outputs are deleted before the new run starts).
    overwrite: bool = False

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str | None) -> str | None:
        # output.dir/output.name is the run directory (overwrite deletes it): a name that
        # climbs out of output.dir or is output.dir itself would name another folder.
        if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name):
            raise ValueError(
                f"output.name {name!r} must be one folder name inside output.dir "
                "(no '/', not '.' or '..')"
            )
        return name


class ParallelConfig(Section):
    # plain: one process, plain PyTorch; deepspeed: the DeepSpeed engine (any number of
    # processes); auto: deepspeed when a launcher started more than one process.
    engine: Literal["auto", "plain", "deepspeed"] = "auto"
    # Ranks per expert-parallel group; each holds num_experts / ep_size experts (null: all ranks).
    ep_size: PositiveInt | None = None
    # Engine knobs only (ZeRO stage, buckets, ...): a DeepSpeed JSON file; batch size, lr,
    # precision and clipping come from this config. null = ZeRO stage 0.
    deepspeed_config: str | None = None


SECRET_WORDS = ("key", "token", "secret", "password")


class TrackConfig(Section):
    # offline (default: runs sync later with `wandb sync`), online, or disabled. The JSON-lines
    # metrics file is always written.
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "moe-vae"
    entity: str | None = None
    name: str | None = None  # null: the run directory's name
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    # Seconds W&B may take to start before training goes on without it (its own default: 90).
    init_timeout: Annotated[float, Field(gt=0)] = 30.0

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: object) -> object:
        if isinstance(data, dict):
            for key in data:
                if any(word in str(key).lower() for word in SECRET_WORDS):
                    raise ValueError(
                        f"track.{key}: secrets are never config values (W&B records the config "
                        f"and command line); set WANDB_API_KEY in the environment instead"
                    )
        return data


def _cuda_graph_fits(cfg: Config) -> None:
    """train.cuda_graph records one step and replays it: nothing in it may wait for the host or
    take a new input from it."""
    loss = cfg.loss
    needs = [
        (
            cfg.train.host_sync != "log",
            "train.host_sync=log (a recorded step cannot wait for the host)",
        ),
        (
            cfg.train.compile not in ("none", "default"),
            f"train.compile none or default "
            f"(train.compile={cfg.train.compile} records CUDA graphs of its own)",
        ),
        (cfg.optim.impl != "fused", "optim.impl=fused (its kernel skips a non-finite step)"),
        (
            cfg.model.routing == "topk" and cfg.model.capacity_factor == 0,
            "a fixed top-k capacity (model.capacity_factor > 0): dropless top-k reads its "
            "capacity back every step",
        ),
        (
            cfg.data.loader == "stream",
            "in-memory training data (data.loader: memory or auto), "
            "not batches streamed by the host",
        ),
        (
            loss.labelled_batch > 0,
            "loss.labelled_batch=0 (its replayed samples are drawn on the host every step)",
        ),
        (
            cfg.train.revive_dead_experts,
            "train.revive_dead_experts=false: revival replaces tensors the recorded step points to",
        ),
    ]
    for broken, need in needs:
        if broken:
            raise ValueError(f"train.cuda_graph needs {need}")


class Config(Section):
    @model_validator(mode="after")
    def _auto_resume_needs_a_name(self) -> Config:
        if self.train.revive_dead_experts and self.model.hierarchy:
            raise ValueError(
                "train.revive_dead_experts is not supported with model.hierarchy (revival "
                "splits a flat manager's logit)"
            )
        if self.train.revive_dead_experts and self.model.fused_input:
            raise ValueError(
                "train.revive_dead_experts is not supported with model.fused_input (revival "
                "copies expert parameters, and the fused layer holds the experts' first layers)"
            )
        if self.train.cuda_graph:
            _cuda_graph_fits(self)
        if self.train.resume == "auto" and not self.output.name:
            raise ValueError(
                "train.resume=auto needs output.name: the run directory to resume from"
            )
        return self

    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    track: TrackConfig = Field(default_factory=TrackConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
