"""What both trainers (classification and RL) share: checkpoints (checksummed plain data,
:mod:`~blip.runs.safeload`), metrics, run directories, seeds, the kernel backend a run used."""
