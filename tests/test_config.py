"""Configs: Hydra composition, typed building, and bad values refused before anything starts."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest
from hydra import compose, initialize_config_dir

from pipeline.config import RunConfig, register, validate
from pipeline.config_build import ConfigError, build
from pipeline.main import CONF_DIR


@dataclass
class Inner:
    rate: float = 0.5
    sizes: tuple[int, ...] = (1, 2)


@dataclass
class Outer:
    name: str = "x"
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)
    extra: int | None = None

    def __post_init__(self) -> None:
        if self.inner.rate > 1:
            raise ValueError(f"inner.rate = {self.inner.rate}: must be <= 1")


def test_build_converts_and_names_the_bad_key():
    built = build(Outer, {"name": "y", "inner": {"rate": 1, "sizes": [3, 4]}, "extra": None}, "")
    assert built.inner.rate == 1.0 and built.inner.sizes == (3, 4) and built.extra is None
    cases = [
        ({"nmae": "y"}, r"^nmae: unknown key; allowed: extra, inner, mode, name$"),
        ({"inner": {"rate": "fast"}}, r"^inner\.rate = 'fast': expected float$"),
        ({"inner": {"sizes": [1, "b"]}}, r"^inner\.sizes\[1\] = 'b': expected int$"),
        ({"mode": "c"}, r"^mode = 'c': allowed: 'a', 'b'$"),
        ({"inner": {"rate": 2}}, r"^inner\.rate = 2\.0: must be <= 1$"),
        ({"extra": True}, r"^extra = True: expected int$"),
    ]
    for data, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            build(Outer, data, "")


@pytest.mark.parametrize("experiment", ["tiny", "quick"])
def test_experiments_compose_and_validate(experiment):
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}", "world.seed=3"])
    config = validate(cfg)
    assert isinstance(config, RunConfig) and config.run.name == experiment and config.world.seed == 3
    assert config.pretrain.sizes and all(s.hidden_size % s.num_attention_heads == 0 for s in config.pretrain.sizes)


@pytest.mark.parametrize("override,message", [
    ("pretrain.batch_size=-3", "config error: pretrain: batch_size = -3: must be > 0"),
    ("world.eval_fraction=2", "config error: world: eval_fraction = 2.0: must be in (0, 1)"),
    ("pretrain.lr=fast", "pretrain.lr"),
])
def test_bad_override_fails_before_any_stage_starts(tmp_path, override, message):
    result = subprocess.run([sys.executable, "-m", "pipeline", override, f"run.root={tmp_path}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert not list(tmp_path.rglob("round-*"))  # no stage ran, nothing was written to the run store
