"""The run's configuration: `run` (the schema Hydra composes into, CONF_DIR, validation) and `build` (typed
dataclasses from Hydra's mappings, a bad key or type named in one line)."""
