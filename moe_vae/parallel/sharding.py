"""Whole-model state dicts from expert shards, and expert shards from whole-model state dicts.

Every expert parameter is stacked along the experts: its first dimension is E (StackedLinear) or
E blocks of channels (grouped convolutions), so viewing it as [E, -1] puts one expert per row.
A checkpoint always holds the whole model, so it loads on any number of ranks (any ep_size) and
on one CPU process without DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moe_vae.errors import MoeVaeError
from moe_vae.model.mixture import MixtureOfVAEs
from moe_vae.parallel.groups import EXPERT_PREFIX
from moe_vae.parallel.setup import Parallel

# In a parameter's saved optimizer state: DeepSpeed's fp32 master copy of a bf16/fp16 weight
# (the model's own weights are those rounded, so a resume from them alone would round too).
MASTER_KEY = "fp32_master"


def full_state_dict(model: MixtureOfVAEs, par: Parallel) -> dict[str, torch.Tensor]:
    """The whole model, on CPU, on every rank (a collective under expert parallelism)."""
    out = {}
    E_l = model.experts.num_experts
    for name, value in model.state_dict().items():
        if name.startswith(EXPERT_PREFIX) and E_l != model.num_experts:
            value = par.gather_experts(value.reshape(E_l, -1)).reshape(-1, *value.shape[1:])
        out[name] = value.detach().cpu().contiguous()
    return out


def load_full_state_dict(model: MixtureOfVAEs, full: dict[str, torch.Tensor]) -> None:
    """Load a whole-model state dict into a model holding experts `model.expert_ids`."""
    ids = model.expert_ids
    local = {}
    for name, value in model.state_dict().items():
        if name not in full:
            raise KeyError(name)
        saved = full[name]
        if name.startswith(EXPERT_PREFIX) and len(ids) != model.num_experts:
            saved = saved.reshape(model.num_experts, -1)[ids.start : ids.stop].reshape(value.shape)
        local[name] = saved
    model.load_state_dict(local)


def zero_optimizer(optim: Any) -> Any | None:
    """A DeepSpeed optimizer whose Adam steps flat fp32 partitions, each parameter a fragment of
    one (safe_get/set_full_* reach them): ZeRO 1/2's, and BF16_Optimizer (what ZeRO 1 runs under
    bf16 with "data_types": {"grad_accum_dtype": "fp32"}). Else None."""
    return optim if _flat_partitions(optim) is not None else None


def check_checkpointable(optim: Any) -> None:
    """Refuse, at start-up, an optimizer whose state the checkpoint would silently leave out:
    DeepSpeed picks its wrapper from the engine knobs, and a new one (a knob we never tried)
    must fail here, not at a resume that restarts Adam from zero."""
    if (
        isinstance(optim, torch.optim.Optimizer)
        or zero_optimizer(optim) is not None
        or _fp32_copies(optim) is not None
    ):
        return
    raise MoeVaeError(
        f"DeepSpeed wrapped Adam in {type(optim).__name__}, whose state moe-vae cannot "
        "checkpoint; known: torch's Adam (ZeRO 0), FP16_UnfusedOptimizer (ZeRO 0 + bf16/fp16), "
        "ZeRO 1/2's optimizer and BF16_Optimizer. Change parallel.deepspeed_config's knobs"
    )


def _flat_partitions(optim: Any) -> list[torch.Tensor] | None:
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(optim, attr):
            return list(getattr(optim, attr))
    return None


def _fp32_copies(optim: Any) -> dict[int, torch.Tensor] | None:
    """ZeRO 0 under bf16: DeepSpeed wraps torch's Adam in its FP16_UnfusedOptimizer, which keeps
    an fp32 master copy of each parameter; Adam steps (and keys its state by) the copies.
    {id(param): its copy}; None for other optimizers."""
    if not hasattr(optim, "fp32_groups"):
        return None
    return {
        id(p): q
        for low, high in zip(optim.fp16_groups, optim.fp32_groups, strict=True)
        for p, q in zip(low, high, strict=True)
    }


def _zero_base_state(zero: Any) -> list[dict[str, Any]]:
    """The wrapped Adam's state of each flat fp32 partition, created (zeros, step 0) where no
    step has run yet (Adam creates it lazily), and every parameter's fragments (re)linked to it.
    DeepSpeed links them once, right after stepping the first param group, so with several
    groups (MoE: experts apart) the later groups' fragments would stay empty."""
    states = []
    for flat in _flat_partitions(zero) or []:
        if not zero.optimizer.state.get(flat):
            zero.optimizer.state[flat] = {
                "step": torch.zeros(
                    (), device=flat.device if _on_device_step(zero.optimizer) else "cpu"
                ),
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
        states.append(zero.optimizer.state[flat])
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
    return states


def _on_device_step(optim: Any) -> bool:
    """torch's fused/capturable Adam keeps its step count on the parameters' device."""
    return any(g.get("fused") or g.get("capturable") for g in optim.param_groups)


def local_optimizer_state(optim: Any) -> Callable[[torch.nn.Parameter], dict[str, object]]:
    """Per-parameter state of this rank's parameters (expert shards stay local): plain Adam's own,
    or under ZeRO 1/2 each parameter's moments assembled from the partitions (a collective)."""
    zero = zero_optimizer(optim)
    copies = _fp32_copies(optim)
    if copies is not None:

        def get_copy(p: torch.nn.Parameter) -> dict[str, object]:
            copy = copies[id(p)]
            return {**optim.optimizer.state.get(copy, {}), MASTER_KEY: copy.detach()}

        return get_copy
    if zero is None:
        state = {
            id(p): optim.state[p]
            for g in optim.param_groups
            for p in g["params"]
            if p in optim.state
        }
        return lambda p: dict(state.get(id(p), {}))
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = _zero_base_state(zero)[0]
    keys = sorted(k for k, v in base.items() if torch.is_tensor(v) and v.dim() > 0)

    def get(p: torch.nn.Parameter) -> dict[str, object]:
        entry: dict[str, object] = {k: safe_get_full_optimizer_state(p, k) for k in keys}
        if p.dtype != torch.float32:  # bf16/fp16 module: its fp32 master weights, unrounded
            entry[MASTER_KEY] = safe_get_full_fp32_param(p)
        return {**entry, "step": base["step"].clone()}

    return get


def full_optimizer_state(
    model: MixtureOfVAEs, optim: Any, par: Parallel
) -> dict[str, dict[str, object]]:
    """Per-parameter optimizer state by parameter name, expert shards gathered like the weights,
    so it reloads on any number of ranks and any ZeRO stage (a collective)."""
    local = local_optimizer_state(optim)
    E_l = model.experts.num_experts
    out: dict[str, dict[str, object]] = {}
    for name, p in model.named_parameters():  # the same order on every rank
        entry: dict[str, object] = {}
        for key, value in sorted(local(p).items()):
            if torch.is_tensor(value) and value.shape == p.shape:
                if name.startswith(EXPERT_PREFIX) and E_l != model.num_experts:
                    value = par.gather_experts(value.reshape(E_l, -1)).reshape(-1, *p.shape[1:])
                value = value.detach().cpu().clone()
            entry[key] = value
        if entry:
            out[name] = entry
    return out


def load_full_optimizer_state(
    model: MixtureOfVAEs, optim: Any, full: dict[str, dict[str, object]]
) -> None:
    """Put saved per-parameter state (whole model) into `optim`, keeping this rank's experts.
    Under ZeRO 1/2 each rank keeps the slice of its own partition. A saved fp32 master weight
    (a bf16 DeepSpeed run's) replaces the model's rounded one, so call this after loading the
    weights and `sync_master_weights`."""
    ids = model.expert_ids
    put = local_optimizer_state_setter(optim)
    step_on_device = _on_device_step(_inner(optim))
    for name, p in model.named_parameters():
        if name not in full:
            continue
        sharded = name.startswith(EXPERT_PREFIX) and len(ids) != model.num_experts
        entry: dict[str, object] = {}
        for key, value in full[name].items():
            if torch.is_tensor(value) and value.dim() > 0:  # moments ('step' is 0-d)
                if sharded:
                    value = value.reshape(model.num_experts, -1)[ids.start : ids.stop]
                    value = value.reshape(p.shape)
                value = value.to(p.device)
            elif torch.is_tensor(value) and step_on_device:
                value = value.to(p.device)
            entry[key] = value
        put(p, entry)


def local_optimizer_state_setter(
    optim: Any,
) -> Callable[[torch.nn.Parameter, dict[str, object]], None]:
    """The inverse of `local_optimizer_state`: put(p, entry) writes one parameter's state (this
    rank's shard). An entry's fp32 master weight goes into the model (rounded) and into the
    optimizer's own master copy; without one that copy is set from the model's weight. Under
    ZeRO 1/2 every rank must put the same parameters in the same order (a collective)."""
    zero = zero_optimizer(optim)
    zero_states = _zero_base_state(zero) if zero is not None else []
    copies = _fp32_copies(optim)

    def put(p: torch.nn.Parameter, entry: dict[str, object]) -> None:
        entry = dict(entry)
        master = entry.pop(MASTER_KEY, None)
        with torch.no_grad():
            if isinstance(master, torch.Tensor):  # the unrounded weight: into the model (rounded)
                p.copy_(master)
            else:
                master = p.detach().float()
            if copies is not None:  # Adam's state is keyed by the master copy
                copies[id(p)].copy_(master)
                optim.optimizer.state[copies[id(p)]] = {
                    k: v.float() if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                    for k, v in entry.items()
                }
            elif zero is None:
                optim.state[p] = entry
            else:
                from deepspeed.utils import safe_set_full_fp32_param

                safe_set_full_fp32_param(p, master)
                _set_zero_state(zero_states, p, entry)

    return put


def _inner(optim: Any) -> Any:
    """The torch optimizer that steps: DeepSpeed's wrappers hold it as `.optimizer`."""
    if zero_optimizer(optim) is not None or _fp32_copies(optim) is not None:
        return optim.optimizer
    return optim


def _set_zero_state(
    states: list[dict[str, Any]], p: torch.nn.Parameter, entry: dict[str, object]
) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    for key, value in entry.items():
        if torch.is_tensor(value) and value.dim() > 0:
            safe_set_full_optimizer_state(p, value.float(), key)
        elif key == "step":  # one step count per flat partition: Adam steps all together
            for state in states:  # a tensor each: Adam increments it in place
                step = torch.as_tensor(value, dtype=torch.float32)
                state["step"] = step.to(state["step"].device, copy=True)


def sync_master_weights(optim: Any) -> None:
    """After loading weights into the model: DeepSpeed's ZeRO 1/2 optimizer, and its ZeRO 0
    one under bf16, keep their own fp32 master copy, which would otherwise overwrite the
    loaded weights at the next step."""
    if zero_optimizer(optim) is not None or _fp32_copies(optim) is not None:
        optim.refresh_fp32_params()
