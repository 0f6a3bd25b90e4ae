"""Stages: functions from input datasets (and checkpoints) to output datasets plus a checkpoint."""
