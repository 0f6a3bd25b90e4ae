"""The driver: `main` (the run's phases, `python -m pipeline`) and `rounds` (the RLHF rounds, a stage at a time);
no stage or lower module imports it."""
