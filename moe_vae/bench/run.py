"""`moe-vae bench`: our training step against the naive port, in one process, same data.

Ours is the trainer's own step loop (Trainer._steps: our data path, forward through the
dispatcher, backward, finite check, Adam, the epoch's sums; the whole recorded step under
train.cuda_graph), with its read-back of the values every train.log_every steps; the baseline
is moe_vae.bench.naive fed by a standard DataLoader (a per-sample collate and a host-to-device
copy each step, where ours keeps small data on the device). Each runs under its own backend
settings: ours as the trainer set them (train.tf32), the baseline as torch's defaults (fp32
matmuls), whatever the other left behind. Both first run `warmup` untimed steps; then `repeats`
rounds alternate between them, `steps` timed steps each, so a slow phase of a shared machine
hits both; the median round counts. The table gives steps/s, samples/s, the time the whole
recipe (train.epochs of the training set) would take at that rate, and the speed-up over the
baseline: the median of the rounds' ratios, each from two back-to-back runs. The last losses are
a sanity check (same math, so similar values; single-sample ELBO estimates, not identical).
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from moe_vae.bench.naive import NaiveMixture
from moe_vae.bench.profile import StepProfile, profile_steps
from moe_vae.config.schema import Config


def backend_flags() -> dict[str, bool]:
    """The process-wide matmul settings a contender runs under (TF32 on a GPU)."""
    return {
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
    }


def set_backend_flags(flags: dict[str, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn_tf32"]


@dataclass
class Contender:
    name: str
    step: Callable[[torch.Tensor | None], torch.Tensor]  # one training step, returns the loss
    batches: Iterator[torch.Tensor | None]
    steps_per_epoch: int
    flags: dict[str, bool] = field(default_factory=backend_flags)  # set before it runs
    rounds: list[float] = field(default_factory=list)  # seconds per step, one per round
    last_loss: float = float("nan")


@dataclass
class BenchRow:
    name: str
    seconds_per_step: float
    batch_size: int
    steps_per_epoch: int
    epochs: int
    last_loss: float
    device: torch.device
    rounds: list[float] = field(default_factory=list)  # seconds per step, one per round

    def speedup_over(self, base: BenchRow) -> float:
        """The median over rounds of base's time / ours: each round's pair ran back to back,
        so a slow phase of a shared machine falls on both sides of one ratio."""
        return statistics.median(b / r for b, r in zip(base.rounds, self.rounds, strict=True))

    @property
    def steps_per_second(self) -> float:
        return 1.0 / self.seconds_per_step

    @property
    def samples_per_second(self) -> float:
        return self.batch_size / self.seconds_per_step

    @property
    def recipe_seconds(self) -> float:
        return self.seconds_per_step * self.steps_per_epoch * self.epochs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forever(make: Callable[[], Iterator[torch.Tensor]]) -> Iterator[torch.Tensor]:
    while True:
        yield from make()


def ours(cfg: Config, stack: ExitStack) -> tuple[Contender, torch.device]:
    from moe_vae.train.trainer import Trainer

    out = stack.enter_context(tempfile.TemporaryDirectory())
    run_cfg = cfg.model_copy(
        update={
            "output": cfg.output.model_copy(update={"dir": out, "name": "bench"}),
            "track": cfg.track.model_copy(update={"wandb": "disabled"}),
        }
    )
    trainer = Trainer(run_cfg, quiet=True)
    if trainer.tracker is not None:
        stack.callback(trainer.tracker.finish)
    loader, device = trainer.data.train, trainer.device

    def epochs() -> Iterator[tuple[torch.Tensor | None, bool]]:
        for epoch in range(1, 10**9):  # the trainer's epochs, from their first batch
            yield from trainer._steps(epoch)

    loop, done = epochs(), [0]

    def step(_: torch.Tensor | None) -> torch.Tensor:
        values, _stop = next(loop)  # its data, its step, its epoch sums (STEP_KEYS' values)
        done[0] += 1
        if values is None:  # a skipped non-finite step (host_sync=step)
            return torch.tensor(float("nan"))
        if done[0] % run_cfg.train.log_every == 0:  # where the trainer reads its values back
            trainer._reconcile_skips()
            values.tolist()
        return values[0]  # loss/total

    # No batches to hand it: the step loop draws its own data.
    return Contender("moe-vae", step, itertools.repeat(None), loader.steps_in_epoch(1)), device


def naive(cfg: Config, device: torch.device) -> Contender:
    from moe_vae.data.mnist import EMBEDDED_DIR, load_split

    split = load_split(EMBEDDED_DIR, "train")
    images = split.images[: cfg.data.train_limit] if cfg.data.train_limit else split.images
    x = torch.from_numpy(images).flatten(1).float() / 255.0
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x),
        batch_size=cfg.train.batch_size,
        shuffle=True,
        drop_last=True,
    )
    torch.manual_seed(cfg.train.seed)
    model = NaiveMixture(cfg, x.shape[1]).to(device)
    # The same Adam as ours, in torch's default implementation (foreach on CUDA, per-tensor on
    # CPU), as a plain port would use it.
    o = cfg.optim
    optim = torch.optim.Adam(
        model.parameters(),
        lr=o.lr,
        betas=(o.betas[0], o.betas[1]),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )

    def batches() -> Iterator[torch.Tensor]:
        for (xb,) in loader:
            yield xb.to(device)

    def step(xb: torch.Tensor | None) -> torch.Tensor:
        assert xb is not None
        loss = model(xb)
        optim.zero_grad()
        loss.backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optim.step()
        return loss.detach()

    return Contender("naive loop", step, _forever(batches), len(loader))


def measure(
    contenders: list[Contender], steps: int, warmup: int, repeats: int, device: torch.device
) -> None:
    for c in contenders:
        set_backend_flags(c.flags)
        for _ in range(warmup):
            c.last_loss = float(c.step(next(c.batches)))
    for _ in range(repeats):
        for c in contenders:
            set_backend_flags(c.flags)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = c.step(next(c.batches))
            _sync(device)
            c.rounds.append((time.perf_counter() - t0) / steps)
            c.last_loss = float(loss)


def run_bench(
    cfg: Config, steps: int, warmup: int, repeats: int, baseline: bool, profile: int = 0
) -> tuple[list[BenchRow], torch.device, StepProfile | None]:
    """The timed rows, the device, and (profile > 0) a profile of that many of our steps."""
    with ExitStack() as stack:
        defaults = backend_flags()  # torch's, before the trainer sets train.tf32's
        stack.callback(set_backend_flags, defaults)
        mine, device = ours(cfg, stack)
        contenders = [mine]
        if baseline:
            contenders.append(naive(cfg, device))
            contenders[-1].flags = defaults  # the plain port: fp32 matmuls
        measure(contenders, steps, warmup, repeats, device)
        set_backend_flags(mine.flags)
        report = profile_steps(mine.step, mine.batches, profile, device) if profile else None
    B, epochs = cfg.train.batch_size, cfg.train.epochs
    rows = [
        BenchRow(
            c.name,
            statistics.median(c.rounds),
            B,
            c.steps_per_epoch,
            epochs,
            c.last_loss,
            device,
            list(c.rounds),
        )
        for c in contenders
    ]
    return rows, device, report


def format_table(rows: list[BenchRow], device: str, repeats: int) -> str:
    base = next((r for r in rows if r.name == "naive loop"), None)
    lines = [
        f"device: {device}; median of {repeats} alternating rounds (speed-up: of each round's)",
        f"{'':<11} {'steps/s':>9} {'samples/s':>11} {'recipe':>10} {'vs naive':>9} {'loss':>9}",
    ]
    for r in rows:
        ratio = f"{r.speedup_over(base):.2f}x" if base else "-"
        lines.append(
            f"{r.name:<11} {r.steps_per_second:>9.1f} {r.samples_per_second:>11.0f} "
            f"{r.recipe_seconds:>9.0f}s {ratio:>9} {r.last_loss:>9.1f}"
        )
    lines.append(
        f"recipe = {rows[0].epochs} epochs x {rows[0].steps_per_epoch} steps of "
        f"{rows[0].batch_size} at the measured rate"
    )
    return "\n".join(lines)
