"""Everything distributed: process groups, the all-to-all dispatcher, the DeepSpeed engine.

Applied from outside the model (model code stays single-device): `setup` builds the process and
expert-parallel groups, `AllToAllDispatcher` is handed to the model, `build_engine` wraps it.
"""
