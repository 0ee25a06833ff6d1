"""Multi-GPU model on paper (issue 8): expected samples/s, memory and traffic per GPU for dense
and top-k routing on many GPUs, and the expert count beyond which dense routing stops paying.

NOTHING HERE IS MEASURED. Device figures are inputs; the defaults are assumptions, printed as
such. A GPU session replaces them and reruns this: --ref-samples-per-s (`moe-vae bench`, one GPU,
dense, --ref-experts, --batch) replaces --achieved-tflops; --ref-topk-samples-per-s (the same,
model.routing=topk) replaces --topk-efficiency; the same two at a second, smaller batch
(--ref-small-batch, --ref-small-samples-per-s, --ref-small-topk-samples-per-s) replace the fixed
costs --overhead-ms and --topk-overhead-ms: a step takes fixed + per-input x batch, so two
batches give the fixed part, of which the weights' HBM traffic is modelled and the rest is
overhead; nccl-tests alltoall_perf within a node and across nodes gives --nvlink-gbs, --ib-gbs,
--latency-us.

Per GPU and step, fp32, expert shape of configs/many_experts.yaml unless flags say otherwise.
FLOPs: manager on the rank's B inputs, experts on their (input, expert) pairs, x3 for forward +
backward; dense: E*B pairs whatever the expert-parallel size P (E/P experts see P*B inputs);
top-k: E*C pairs, C = ceil(cf*B*K/E), empty slots computed too. Traffic: the collectives of
moe_vae/parallel/dispatch.py (a unit test checks their sizes), DeepSpeed's gradient all-reduce
(manager over all GPUs, experts over the GPUs holding the same experts), three small all-reduces.
Time = compute + communication + weight/optimizer HBM traffic + fixed overhead: a sum, not a
max, because nothing overlaps today (each collective of the dispatcher feeds the next kernel;
the ZeRO-0 gradient all-reduce runs after backward). P must divide the GPU count and E
(moe_vae/parallel/groups.py); by default the P with the shortest step that fits is used.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from itertools import pairwise

F32, I64 = 4, 8  # bytes per element
# HBM bytes per parameter and step: weight read in forward and in backward, gradient written;
# fused Adam reads weight, gradient, m, v (16) and writes weight, m, v (12).
WEIGHT_TRAFFIC = 4 + 4 + 4 + 16 + 12
Buffer = tuple[str, int, bool]  # a collective: (kind, send buffer bytes, in backward)
# (flag, default, help): the device and network figures, all ASSUMED until measured.
ASSUMED = [
    ("achieved-tflops", 10.0, "FLOP/s of the step's kernels (tiny experts; TF32 in the suite)"),
    ("topk-efficiency", 0.5, "top-k experts' FLOP rate relative to dense's"),
    ("topk-overhead-ms", 0.2, "top-k's plan/pack/unpack kernels per step"),
    ("overhead-ms", 0.3, "launches and Python per step"),
    ("hbm-gbs", 2500.0, "achieved HBM bandwidth, GB/s (H100 SXM spec 3350)"),
    ("gpu-mem-gb", 80.0, "GiB per GPU"),
    ("nvlink-gbs", 450.0, "intra-node GB/s per direction per GPU (NVLink 4)"),
    ("ib-gbs", 50.0, "inter-node GB/s per GPU (400 Gb/s InfiniBand)"),
    ("gpus-per-node", 8, "GPUs per node"),
    ("latency-us", 2.0, "per message (peer of an all-to-all, step of an all-reduce)"),
]


def mlp(widths: list[int]) -> tuple[int, int]:
    """(multiply-adds per input, parameters) of a stack of linear layers."""
    return sum(i * o for i, o in pairwise(widths)), sum(i * o + o for i, o in pairwise(widths))


def manager_mlp(a: argparse.Namespace, E: int) -> tuple[int, int]:
    return mlp([a.input_dim, *a.manager_layers, E])


def expert_mlp(a: argparse.Namespace) -> tuple[int, int]:
    """One expert VAE: encoder D -> ... -> 2Z (mu, var), decoder Z -> ... -> D."""
    enc = mlp([a.input_dim, *a.encoder_layers, 2 * a.z_dim])
    dec = mlp([a.z_dim, *a.decoder_layers, a.input_dim])
    return enc[0] + dec[0], enc[1] + dec[1]


def capacity(tokens: int, k: int, num_experts: int, factor: float) -> int:
    """Input slots per expert: the rule of moe_vae.model.dispatch.capacity (a test compares)."""
    return max(1, math.ceil(factor * tokens * k / num_experts))


def dispatch_buffers(a: argparse.Namespace, routing: str, ep: int, E: int, B: int) -> list[Buffer]:
    """(collective, send buffer bytes, in backward) for what AllToAllDispatcher sends per step,
    in order; an all-gather's buffer is the rank's own chunk. Nothing when P = 1 (the local
    dispatcher). Inputs carry no gradient: only the losses' all-to-all has a backward."""
    if ep == 1:
        return []
    if routing == "dense":  # gather [P*B, D]; losses [P, E/P, B] out, their gradient back
        losses = [("all_to_all", E * B * F32, bwd) for bwd in (False, True)]
        return [("all_gather", B * a.input_dim * F32, False), *losses]
    slots = E * capacity(B, a.top_k, E, a.capacity_factor)  # inputs [E, C, D], ids, losses
    sizes = [("all_to_all", slots * n, False) for n in (a.input_dim * F32, I64, F32)]
    return [*sizes, ("all_to_all", slots * F32, True)]


def sent_bytes(kind: str, ranks: int, size: int) -> int:
    """Bytes leaving one GPU: all-gather and all-to-all once per peer, ring all-reduce 2x."""
    if kind == "all_gather":
        return (ranks - 1) * size
    return size * (ranks - 1) // ranks * (1 if kind == "all_to_all" else 2)


def collective_seconds(a: argparse.Namespace, kind: str, ranks: int, size: int, span: int) -> float:
    """Bandwidth + latency per message: P-1 peers for all-gather/all-to-all (on-node bytes over
    NVLink, off-node over InfiniBand, concurrently), 2 log2(n) steps for an all-reduce. span:
    consecutive ranks the group covers (it crosses nodes when span > GPUs per node)."""
    if ranks <= 1:
        return 0.0
    intra, inter, latency = a.nvlink_gbs * 1e9, a.ib_gbs * 1e9, a.latency_us * 1e-6
    sent = sent_bytes(kind, ranks, size)
    if kind == "all_reduce":
        bw = intra if span <= a.gpus_per_node else inter
        return sent / bw + latency * 2 * math.ceil(math.log2(ranks))
    peers, on_node = ranks - 1, min(span, a.gpus_per_node) - 1
    return max(on_node / intra, (peers - on_node) / inter) * sent / peers + latency * peers


@dataclass(frozen=True)
class Step:
    routing: str
    ep: int
    batch: int
    compute_s: float
    comm_s: float
    other_s: float  # weight/optimizer HBM traffic and fixed overhead
    state_bytes: float  # weights, gradients, Adam moments
    memory_bytes: float  # states + saved activations + the dispatcher's buffers
    fits: bool  # in the GPU's memory
    dispatch_bytes: int  # sent per GPU by the dispatcher's all-gather/all-to-all, fwd + bwd
    grad_bytes: int  # sent per GPU by the gradient all-reduces

    @property
    def seconds(self) -> float:
        return self.compute_s + self.comm_s + self.other_s


def step(a: argparse.Namespace, routing: str, gpus: int, E: int, ep: int, B: int) -> Step:
    """One GPU's step at a.rate FLOP/s (top-k experts at a.eff of it)."""
    dense = routing == "dense"
    pairs = E * B if dense else E * capacity(B, a.top_k, E, a.capacity_factor)
    (mgr_macs, mgr_params), (exp_macs, exp_params) = manager_mlp(a, E), expert_mlp(a)
    local_params = E // ep * exp_params
    compute = 6 * (B * mgr_macs + pairs * exp_macs / (1.0 if dense else a.eff)) / a.rate
    other = (mgr_params + local_params) * WEIGHT_TRAFFIC / (a.hbm_gbs * 1e9)
    other += (a.overhead_ms + (0.0 if dense else a.topk_overhead_ms)) * 1e-3
    dispatch = dispatch_buffers(a, routing, ep, E, B)
    # All-reduces (ranks, bytes): manager and expert gradients (DeepSpeed, ZeRO stage 0), the
    # balancing importance forward and backward, the finite-step flag.
    reduces = [(gpus, mgr_params * F32), (gpus // ep, local_params * F32)]
    reduces += [(gpus, E * F32), (gpus, E * F32), (gpus, 2 * F32)]
    comm = sum(collective_seconds(a, kind, ep, size, ep) for kind, size, _ in dispatch)
    comm += sum(collective_seconds(a, "all_reduce", n, size, gpus) for n, size in reduces)
    # fp32 weight 4 + gradient 4 + Adam m, v 8 bytes per parameter; ZeRO 1 splits m, v over the
    # replicas of a parameter (all GPUs for the manager, gpus/P for experts), ZeRO 2 the grads.
    states = sum(
        params * (4 + 4 / (reps if a.zero >= 2 else 1) + 8 / (reps if a.zero else 1))
        for params, reps in ((mgr_params, gpus), (local_params, gpus // ep))
    )
    # Saved for backward, per input: the manager's hidden layers and logits; per (input, expert)
    # pair: hidden layers before and after the activation, mu/var/z/eps, the decoder's logits
    # and sigmoid, and the logits' gradient (backward's largest transient), hence 3 x D.
    per_input = a.input_dim + 2 * sum(a.manager_layers) + 3 * E
    per_pair = 2 * (sum(a.encoder_layers) + sum(a.decoder_layers)) + 5 * a.z_dim + 3 * a.input_dim
    memory = states + (B * per_input + pairs * per_pair) * F32
    for kind, size, bwd in dispatch:  # forward buffers live until backward: send + receive
        memory += 0 if bwd else size * (1 + (ep if kind == "all_gather" else 1))
    sent = sum(sent_bytes(kind, ep, size) for kind, size, _ in dispatch)
    grad_sent = sum(sent_bytes("all_reduce", n, size) for n, size in reduces[:2] if n > 1)
    fits = memory <= a.gpu_mem_gb * 2**30
    return Step(routing, ep, B, compute, comm, other, states, memory, fits, sent, grad_sent)


def best_step(a: argparse.Namespace, routing: str, gpus: int, E: int, B: int) -> Step:
    """The fastest allowed expert-parallel size that fits in memory (else the least memory)."""
    limit = math.gcd(gpus, E)
    if a.ep_size == "auto":
        sizes = [p for p in range(1, limit + 1) if limit % p == 0]
    else:
        sizes = [limit if a.ep_size == "max" else math.gcd(limit, int(a.ep_size))]
    steps = [step(a, routing, gpus, E, p, B) for p in sizes]
    fitting = [s for s in steps if s.fits]
    return min(fitting or steps, key=lambda s: s.seconds if fitting else s.memory_bytes)


def fixed_seconds(
    batch: int, samples_per_s: float, small: int, small_samples_per_s: float
) -> float:
    """The part of a step's time that does not grow with the batch, from the step at two
    batch sizes (t = fixed + per-input x B)."""
    t, t_small = batch / samples_per_s, small / small_samples_per_s
    return t - (t - t_small) / (batch - small) * batch


def calibrate_fixed(a: argparse.Namespace) -> None:
    """--overhead-ms (and --topk-overhead-ms) from the reference runs at two batch sizes: the
    fixed part of the step less the modelled weight traffic."""
    if not (a.ref_small_batch and a.ref_small_samples_per_s and a.ref_samples_per_s):
        return
    if not 0 < a.ref_small_batch < a.batch:
        raise SystemExit(f"--ref-small-batch must lie between 0 and --batch ({a.batch})")
    a.overhead_ms = a.topk_overhead_ms = 0.0
    traffic = step(a, "dense", 1, a.ref_experts, 1, a.batch).other_s  # weights' bytes alone
    fixed = fixed_seconds(
        a.batch, a.ref_samples_per_s, a.ref_small_batch, a.ref_small_samples_per_s
    )
    a.overhead_ms = (fixed - traffic) * 1e3
    if a.ref_topk_samples_per_s and a.ref_small_topk_samples_per_s:
        fixed_topk = fixed_seconds(
            a.batch, a.ref_topk_samples_per_s, a.ref_small_batch, a.ref_small_topk_samples_per_s
        )
        a.topk_overhead_ms = (fixed_topk - traffic) * 1e3 - a.overhead_ms
    if a.overhead_ms < 0 or a.topk_overhead_ms < 0:
        raise SystemExit(
            f"the two batch sizes give a fixed cost below the modelled weight traffic "
            f"(overhead {a.overhead_ms:.3f} ms, top-k's {a.topk_overhead_ms:.3f} ms): check the "
            f"reference runs (same experts, whole-step graph) or --hbm-gbs"
        )


def calibrate(a: argparse.Namespace) -> None:
    """Sets a.rate (FLOP/s) and a.eff (top-k efficiency); from measured single-GPU samples/s
    when given: one GPU's step is compute + other, solved for the unknown (the fixed costs
    first, when a second batch size was measured)."""
    a.rate, a.eff = a.achieved_tflops * 1e12, a.topk_efficiency
    calibrate_fixed(a)
    if a.ref_samples_per_s:
        s = step(a, "dense", 1, a.ref_experts, 1, a.batch)
        a.rate *= s.compute_s / (a.batch / a.ref_samples_per_s - s.other_s)
    if a.ref_topk_samples_per_s:
        a.eff = 1.0
        mgr = 6 * a.batch * manager_mlp(a, a.ref_experts)[0] / a.rate
        s = step(a, "topk", 1, a.ref_experts, 1, a.batch)
        a.eff = (s.compute_s - mgr) / (a.batch / a.ref_topk_samples_per_s - s.other_s - mgr)
    if a.rate <= 0 or a.eff <= 0:
        raise SystemExit("a reference samples/s is faster than the fixed costs allow")


def crossover(a: argparse.Namespace, gpus: int, B: int) -> tuple[int, Step, Step] | None:
    """Smallest power-of-two E where dense's step is slower than top-k's (or does not fit)."""
    for E in (2**i for i in range(1, 17)):
        dense, topk = (best_step(a, r, gpus, E, B) for r in ("dense", "topk"))
        if dense.seconds > topk.seconds or not dense.fits:
            return E, dense, topk
    return None


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--gpus", type=int, nargs="+", default=[8, 64, 512])
    add("--experts", type=int, nargs="+", default=[64, 256, 1024, 4096])
    add("--batch", type=int, default=4096, help="inputs per GPU and step")
    add("--crossover-batches", type=int, nargs="+", default=[256, 1024, 4096])
    add("--top-k", type=int, default=1)
    add("--capacity-factor", type=float, default=1.25, help="> 0 (dropless is not modelled)")
    add("--input-dim", type=int, default=784)
    add("--z-dim", type=int, default=4)
    add("--encoder-layers", type=int, nargs="+", default=[16])
    add("--decoder-layers", type=int, nargs="+", default=[16])
    add("--manager-layers", type=int, nargs="+", default=[128])
    add("--ep-size", default="auto", help="auto (fastest that fits), max, or a size")
    add("--zero", type=int, choices=[0, 1, 2], default=0, help="ZeRO stage (memory only)")
    add("--ref-experts", type=int, default=256, help="experts of the reference runs")
    add("--ref-samples-per-s", type=float, help="MEASURED: moe-vae bench, 1 GPU, dense")
    add("--ref-topk-samples-per-s", type=float, help="MEASURED: the same, model.routing=topk")
    add("--ref-small-batch", type=int, help="the batch of the two runs below (< --batch)")
    add("--ref-small-samples-per-s", type=float, help="MEASURED: dense at --ref-small-batch")
    add("--ref-small-topk-samples-per-s", type=float, help="MEASURED: top-k at --ref-small-batch")
    for flag, default, text in ASSUMED:
        add(f"--{flag}", type=type(default), default=default, help=f"ASSUMED: {text}")
    a = p.parse_args(argv)
    if a.capacity_factor <= 0:
        p.error("--capacity-factor must be > 0")
    calibrate(a)
    return a


def si(x: float) -> str:
    d, unit = next((d, u) for d, u in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")) if x >= d)
    return f"{x / d:.3g}{unit}"


def row(a: argparse.Namespace, gpus: int, E: int, s: Step) -> str:
    name = "dense" if s.routing == "dense" else f"top-{a.top_k}"
    ms = "{:.2f} ({:.2f} + {:.2f} + {:.2f})".format(
        *(x * 1e3 for x in (s.seconds, s.compute_s, s.comm_s, s.other_s))
    )
    memory = f"{s.memory_bytes / 2**30:.1f}" + ("" if s.fits else " (does not fit)")
    cells = [gpus, E, name, s.ep, si(gpus * s.batch / s.seconds), si(s.batch / s.seconds), ms]
    cells += [memory, f"{s.dispatch_bytes / 1e6:.1f}", f"{s.grad_bytes / 1e6:.1f}"]
    return "| " + " | ".join(map(str, cells)) + " |"


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    print("Inputs (ASSUMED: the default, not measured; given: set on the command line):")
    two_batches = ("overhead-ms", "topk-overhead-ms") if a.ref_small_batch else ()
    for flag, default, _ in ASSUMED:
        value = getattr(a, flag.replace("-", "_"))
        said = "ASSUMED" if value == default else "given"
        if flag in two_batches:
            value, said = round(value, 4), "MEASURED: from the runs at two batch sizes"
        print(f"- {flag} = {value} ({said})")
    refs = ("ref-samples-per-s", "ref-topk-samples-per-s", "ref-small-batch")
    for ref in (*refs, "ref-small-samples-per-s", "ref-small-topk-samples-per-s"):
        print(f"- {ref} = {getattr(a, ref.replace('-', '_'))} (MEASURED when set)")
    print(f"- used: {a.rate / 1e12:.2f} TFLOP/s, top-k efficiency {a.eff:.2f}, batch {a.batch}\n")
    head = "GPUs|experts|routing|ep|samples/s total|samples/s per GPU|step ms (compute + comm + "
    head += "other)|memory/GPU GiB|dispatch MB/step|grad all-reduce MB/step"
    print("| " + head.replace("|", " | ") + " |\n" + "|---" * 10 + "|")
    for g in a.gpus:
        for E in a.experts:
            for routing in ("dense", "topk"):
                print(row(a, g, E, best_step(a, routing, g, E, a.batch)))
    print(f"\nCrossover: smallest E (powers of 2) where dense is slower than top-{a.top_k}:")
    for g in a.gpus:
        for B in a.crossover_batches:
            found, text = crossover(a, g, B), "none up to 65536"
            if found:
                E, dense, topk = found
                text = f"{E} (dense {dense.seconds * 1e3:.2f} ms, ep {dense.ep}; "
                text += f"top-{a.top_k} {topk.seconds * 1e3:.2f} ms, ep {topk.ep})"
            print(f"- {g} GPUs, batch {B} per GPU: E = {text}")


if __name__ == "__main__":
    main()
