"""Run tracking behind one small interface: a JSON-lines file always, W&B when enabled.

Only the global rank 0 tracks; the trainer reduces metrics that live on other ranks first.
"""

from moe_vae.track.base import MultiTracker, Tracker, build_tracker
from moe_vae.track.jsonl import JsonlLogger, JsonlTracker

__all__ = ["JsonlLogger", "JsonlTracker", "MultiTracker", "Tracker", "build_tracker"]
