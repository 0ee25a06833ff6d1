"""What the naive baseline covers, decided from the config alone: `moe-vae bench` checks it
before torch is imported, so `--print-config` refuses an unsupported config in a blink."""

from __future__ import annotations

from moe_vae.config.schema import Config


def unsupported(cfg: Config) -> str | None:
    """Why the naive port cannot run this config (None: it can)."""
    m = cfg.model
    if cfg.loss.choice_balancing_weight:
        return "the naive baseline has no choice-balancing term (loss.choice_balancing_weight)"
    if cfg.loss.label_fraction or cfg.loss.labelled_keys or cfg.loss.labelled_batch:
        return (
            "the naive baseline is unsupervised "
            "(loss.label_fraction, loss.labelled_keys, loss.labelled_batch)"
        )
    if cfg.warm_start.method != "none":
        return f"the naive baseline has no warm start (warm_start.method={cfg.warm_start.method})"
    if cfg.data.name != "mnist":  # it reads the embedded MNIST: another dataset is another job
        return f"the naive baseline trains on MNIST only (data.name={cfg.data.name})"
    if m.hierarchy:
        return f"the naive baseline has a flat manager only (model.hierarchy={m.hierarchy})"
    if m.expert == "mlp" and m.routing == "dense":
        return None
    return (
        "the naive baseline implements dense routing over MLP experts only "
        f"(model.expert={m.expert}, model.routing={m.routing})"
    )
