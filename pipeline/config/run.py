"""The run's typed configuration: the schema Hydra composes into, and its validation before anything starts.

`conf/config.yaml` picks an experiment (`experiment=tiny` by default) from `conf/experiment/`; command-line
overrides such as `pretrain.lr=1e-3` or `world.seed=3` go on top. The schema below gives Hydra every key and
type, so an unknown key or a wrong type is refused while composing; `validate` then builds the dataclasses,
whose own checks (ranges, relations) name the key that is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from actors.vllm_engine import Sampling
from pipeline.cluster.pools import ClusterConfig
from pipeline.config.build import ConfigError, build
from pipeline.driver.rounds import RoundsConfig
from pipeline.stages.data_files import DataConfig
from pipeline.stages.evaluation.llm_judge import JudgeConfig
from pipeline.stages.generation import ANSWER_TOKENS, TEMPERATURE
from pipeline.stages.pretrain import PretrainConfig
from pipeline.stages.reward_model.algorithm import RMConfig
from pipeline.stages.sft.algorithm import SFTConfig
from pipeline.world import WorldConfig


@dataclass
class RunSettings:
    name: str = "tiny"
    root: str = "runs"  # the run store is <root>/<name>

    def __post_init__(self) -> None:
        if not self.name or self.name.startswith(".") or "/" in self.name or "\\" in self.name:
            raise ValueError(f"name = {self.name!r}: must be a plain folder name (the run store is <root>/<name>)")
        if not self.root:
            raise ValueError("root = '': set a folder for the run stores (relative to the working directory)")


@dataclass
class RunConfig:
    run: RunSettings = field(default_factory=RunSettings)
    world: WorldConfig = field(default_factory=WorldConfig)
    # The user's own SFT / preference files instead of the world (pipeline/stages/data_files.py); needs base_models.
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    # Models are sampled the way preference data is: at some temperature, not greedily; 4 samples per prompt, as
    # one left round-to-round differences within sampling noise (docs/results.md, "Measurements behind defaults").
    eval_sampling: Sampling = field(default_factory=lambda: Sampling(n=4, temperature=TEMPERATURE,
                                                                     max_tokens=ANSWER_TOKENS, seed=0))
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    # The LLM judge of every round's win rates (pipeline/stages/evaluation/llm_judge.py); judge.checkpoint=null: none.
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Policy sizes to start from instead of pretraining tiny ones: {name: HF checkpoint folder}, smallest first
    # (the last one samples for rejection sampling and initialises the reward models).
    base_models: dict[str, str] = field(default_factory=dict)
    # The generators' context (max_model_len) for base_models checkpoints; null: each model's own. A 135M model
    # with an 8192-token context needs KV-cache room for 8192 tokens per sequence otherwise.
    base_context: int | None = None

    def __post_init__(self) -> None:
        if self.base_context is not None and self.base_context < 16:
            raise ValueError(f"base_context = {self.base_context}: must be >= 16 (or null: the model's own)")
        if self.data.enabled:
            if not self.base_models:
                raise ValueError("data: a run from files starts from base_models checkpoints; set e.g. "
                                 "base_models.policy=/models/my-hf-checkpoint")
            self._check_files_run()
        elif self.data.gatt.enabled:
            raise ValueError("data.gatt: GAtt files are for a run from data files; a world run uses the world's "
                             "instructions and dialogues")
        for name, folder in self.base_models.items():
            if folder == "???" or not folder:
                raise ValueError(f"base_models.{name}: set it to a HF checkpoint folder, e.g. "
                                 f"base_models.{name}=/models/Llama-2-7b-hf")
            # Absolute from here on: actors and Ray jobs may run in another working directory.
            path = Path(folder).expanduser().resolve()
            where = "" if str(path) == folder else f" (resolved to {path})"
            if not (path / "config.json").is_file():
                setup = f" (this experiment's own model is made by `{self.data.setup}`)" if self.data.setup else ""
                raise ValueError(f"base_models.{name} = {folder!r}{where}: no config.json there (expected a HF "
                                 f"checkpoint folder){setup}")
            self.base_models[name] = str(path)
        sizes = len(self.base_models) or len(self.pretrain.sizes)
        self.cluster.check_fits(sizes + (self.judge.checkpoint is not None))  # a generator pool each, and the judge's

    def _check_files_run(self) -> None:
        """What GAtt and context distillation need on the user's files: GAtt its instructions and dialogues, and the
        LLM judge to measure adherence (no rule checks a free-text instruction, so samples cannot be verified);
        context distillation the generic preprompt (the category templates are the world's answers)."""
        gatt, distillation = self.rounds.gatt, self.rounds.context_distillation
        errors = []
        if gatt.gatt_from and not self.data.gatt.enabled:
            errors.append(f"rounds.gatt.gatt_from = {gatt.gatt_from}: a run from files needs data.gatt.instructions "
                          "and data.gatt.dialogues (or rounds.gatt.gatt_from=0)")
        if gatt.gatt_from and self.judge.checkpoint is None:
            errors.append("judge.checkpoint = null: GAtt on files is measured by the LLM judge; set one (e.g. "
                          "judge.checkpoint=smollm2) or rounds.gatt.gatt_from=0")
        if gatt.gatt_from and gatt.verify:
            errors.append("rounds.gatt.verify = true: instructions from a file have no checker to verify samples "
                          "with; set rounds.gatt.verify=false (one sample per turn, the paper's recipe)")
        if distillation.distill_from and distillation.category_templates:
            errors.append("rounds.context_distillation.category_templates = true: the templates are the world's "
                          "safe answers per risk category; a run from files uses the generic preprompt: set it "
                          "to false")
        if errors:
            raise ValueError("\n".join(errors))

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name


# An absolute path: with `python -m pipeline` Hydra would otherwise look for a Python package named `conf`.
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")  # pipeline/config/run.py -> the repo's conf/


def register() -> None:
    """Make the schema available to `conf/config.yaml` as `base_config`."""
    ConfigStore.instance().store(name="base_config", node=RunConfig)


def validate(cfg: DictConfig | dict[str, Any]) -> RunConfig:
    """The composed config as typed dataclasses, or ConfigError naming the key."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    data.pop("hydra", None)
    return build(RunConfig, data, "")


def compose_run(*overrides: str) -> RunConfig:
    """The typed config that `python -m pipeline <overrides>` runs with (for scripts and tests)."""
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return validate(compose(config_name="config", overrides=list(overrides)))


__all__ = ["CONF_DIR", "ConfigError", "RunConfig", "RunSettings", "compose_run", "register", "validate"]
