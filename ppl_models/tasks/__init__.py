"""Tasks: what a task needs beyond its model and the inference engine — decoding, alignment output,
baselines, plots."""
