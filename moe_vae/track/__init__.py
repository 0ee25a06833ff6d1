"""Run tracking. For now a JSON-lines metrics file; W&B will sit behind the same interface."""

from moe_vae.track.jsonl import JsonlLogger

__all__ = ["JsonlLogger"]
