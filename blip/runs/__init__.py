"""What both trainers (classification and RL) share: checkpoints, metrics, run directories."""
