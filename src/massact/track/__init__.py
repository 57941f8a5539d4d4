"""Massive activations across checkpoints: a training history, a base model against its fine-tune, two quantizations.

specs (what to load, in training order) -> run (one report per checkpoint, one model in memory at a time) ->
align (the reports as one timeline: emergence, events, role moves, the two-checkpoint diff) -> report.track (files).
monitor: the same per-block figures during training, without checkpoints.
"""
