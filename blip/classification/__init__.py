"""Continual classification: the trainer, the benchmarks' presets and data, compare, report,
plots. ``blip train`` / ``blip compare`` / ``blip report`` run these."""
