"""`moe-vae bench --profile N`: what one training step is made of, from torch.profiler.

Each top-level event of a profiled step falls in a phase by what torch itself names it: the
autograd engine's `autograd::engine::evaluate_function: ...` are the backward, torch's
`Optimizer.step#...` / `Optimizer.zero_grad#...` the optimizer, and the rest the forward, the
loss and the finite check ("forward+other"). On a GPU the host's waits for the device (CUDA's
`cuda*Synchronize` calls: the profiler's own after each step, a read-back such as `.cpu()`)
are their own row, "host waits", taken out of the phase they happened in: there they would
count the device's time as that phase's host cost. Per phase: host time, device time (GPU kernels
launched under it) and the number of kernels: GPU kernels on a GPU, aten operator calls (each
one at least one kernel) on a CPU. Launch-bound steps show many kernels of little device time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, schedule

PHASES = ("forward+other", "backward", "optimizer", "host waits")


@dataclass
class Phase:
    host_ms: float = 0.0
    device_ms: float = 0.0
    kernels: int = 0


@dataclass
class StepProfile:
    steps: int
    device: str
    phases: dict[str, Phase] = field(default_factory=lambda: {p: Phase() for p in PHASES})


def is_wait(name: str) -> bool:
    """A CUDA runtime call in which the host waits for the device."""
    return name.startswith("cuda") and "Synchronize" in name


def phase_of(name: str) -> str:
    if is_wait(name):
        return "host waits"
    if name.startswith("autograd::engine::evaluate_function"):
        return "backward"
    if name.startswith("Optimizer."):
        return "optimizer"
    return "forward+other"


def _top(event: FunctionEvent) -> FunctionEvent:
    """The event's outermost ancestor below the profiler's step marker."""
    while event.cpu_parent is not None and not event.cpu_parent.name.startswith("ProfilerStep"):
        event = event.cpu_parent
    return event


def _kernels(event: FunctionEvent, on_gpu: bool) -> int:
    """Kernels this op launched itself: its GPU kernels, or 1 for an outermost aten op on CPU."""
    if on_gpu:
        return len(event.kernels)
    parent = event.cpu_parent
    return int(
        event.name.startswith("aten::") and not (parent and parent.name.startswith("aten::"))
    )


def profile_steps(
    step: Callable[[torch.Tensor | None], torch.Tensor],
    batches: Iterator[torch.Tensor | None],
    steps: int,
    device: torch.device,
) -> StepProfile:
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    # One step of warm-up inside the profiler, then `steps` recorded steps.
    with profile(
        activities=activities, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1)
    ) as prof:
        for _ in range(steps + 1):
            step(next(batches))
            if on_gpu:
                torch.cuda.synchronize(device)
            prof.step()
    result = StepProfile(steps, str(device))
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU or event.name.startswith(
            "ProfilerStep"
        ):
            continue
        top = _top(event)
        phase = result.phases[phase_of(top.name)]
        if event is top:
            phase.host_ms += event.cpu_time_total / 1e3 / steps
            phase.device_ms += event.device_time_total / 1e3 / steps
        elif is_wait(event.name):  # a wait inside an op (a read-back): moved to its own row
            waited = event.cpu_time_total / 1e3 / steps
            phase.host_ms -= waited
            result.phases["host waits"].host_ms += waited
        phase.kernels += _kernels(event, on_gpu)
    for phase in result.phases.values():
        phase.kernels = round(phase.kernels / steps)
    return result


def format_profile(p: StepProfile) -> str:
    unit = "GPU kernels" if p.device.startswith("cuda") else "aten ops"
    lines = [
        f"profile: {p.steps} steps of moe-vae on {p.device}, per step",
        f"{'phase':<14} {'host ms':>9} {'device ms':>10} {unit:>12}",
    ]
    for name, ph in p.phases.items():
        lines.append(f"{name:<14} {ph.host_ms:>9.2f} {ph.device_ms:>10.2f} {ph.kernels:>12}")
    total = Phase(*(sum(getattr(ph, f) for ph in p.phases.values()) for f in Phase.__annotations__))
    lines.append(
        f"{'total':<14} {total.host_ms:>9.2f} {total.device_ms:>10.2f} {total.kernels:>12}"
    )
    return "\n".join(lines)
