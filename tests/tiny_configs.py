"""The tiny world's configs (conf/experiment/tiny-full.yaml), for tests that train or split at the tiny models'
sizes: the dataclasses' defaults are the paper's, sized for 7B models and 1,000 held-out pairs a batch."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from pipeline.config.run import RunConfig, compose_run
from pipeline.stages.reward_model.algorithm import RMConfig


@functools.cache
def tiny_run() -> RunConfig:
    return compose_run("experiment=tiny-full")


def tiny_rm(**changes: Any) -> RMConfig:
    return dataclasses.replace(tiny_run().rm, **changes)
