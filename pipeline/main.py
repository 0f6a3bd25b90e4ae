"""The driver: a plain Python program (and a Ray job) that runs the stages in order on the actor pools.

world (or the user's files) -> base models (pretrained on the world's corpus, or `base_models` checkpoints) ->
their answers to held-out prompts on the generator pool (scored by the oracle in world runs) -> SFT of every size
on the trainer group -> the same evaluation -> the RLHF rounds (pipeline/rounds.py: reward models on every weekly
batch so far, rejection sampling from the largest policy and every size fine-tuned on the kept answers, then from
their rounds on PPO on the largest policy, Ghost Attention and safety context distillation on every size, and
evaluation) -> after each round, win rates against the SFT model by the RMs and the oracle, and by the LLM judge
for the largest size -> the run report (and summary.json in world runs). Every stage's outputs and manifest are in
the run store: a second run reuses every finished stage and starts no actor for it.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import pyarrow as pa
from omegaconf import DictConfig

from model.chat_template import Message
from model.config import ModelConfig
from model.tokenizer import load_tokenizer
from pipeline import console
from pipeline import stage_names as names
from pipeline.cluster import Pools, connect
from pipeline.config import CONF_DIR, ConfigError, RunConfig, register, validate
from pipeline.data.schemas import PREFERENCE_KINDS
from pipeline.data.store import RunStore, digest_config
from pipeline.plan import check_plan
from pipeline.evaluation.judge import ADHERENCE_PREFIX
from pipeline.evaluation.safety_metrics import SafetyMetrics, safety_metrics, safety_rows
from pipeline.evaluation.winrate import Proportion, WinRate
from pipeline.report import RoundResults, RunResults, render_report
from pipeline.rounds import RoundContext, run_round
from pipeline.state import PolicyState, RoundResult
from pipeline.stages.cached import checkpoint_stage
from pipeline.stages.data_files import data_stage_name, run_data_files
from pipeline.stages.oracle_eval import native_format, run_oracle_eval
from pipeline.stages.sft import train_sft
from pipeline.stages.pretrain import run_pretrain
from pipeline.stages.gatt.sources import DialogueSource, FileDialogues, WorldDialogues
from pipeline.stages.llm_judge import ask_judge, judge_digest, run_llm_judge
from pipeline.stages.win_rates import run_win_rates, versus_start
from pipeline.summary import run_summary, write_summary
from pipeline.stages.world import run_world, world_stage_name
from pipeline.world import World


def base_policies(store: RunStore, tables: dict[str, pa.Table], config: RunConfig,
                  pools: Pools) -> list[PolicyState]:
    """The run's base models, smallest first: the `base_models` checkpoints, or the tiny models pretrained on
    the world's corpus (cached)."""
    if config.base_models:
        console.section("base models (from base_models)")
        policies = []
        for name, folder in config.base_models.items():
            path = Path(folder).resolve()
            model = ModelConfig.load(path)
            digest = digest_config({"name": name, "config": (path / "config.json").read_text(), "path": str(path)})
            context = min(model.max_position_embeddings, config.base_context or model.max_position_embeddings)
            policies.append(PolicyState(name, path, digest, context))
            console.base_model_line(name, path, model.num_hidden_layers, model.hidden_size)
        return policies
    corpus_digest = store.stage(0, world_stage_name("corpus")).manifest()["content_digest"]
    start = time.perf_counter()
    models, cached = run_pretrain(store, tables["corpus"], corpus_digest, config.pretrain, runner=pools.train)
    how = "(cached)" if cached else f"(trained, {time.perf_counter() - start:.0f} s)"
    console.section(f"pretrain {how}: {store.stage(0, 'pretrain').path}")
    console.pretrain_table(models)
    return [PolicyState(m.size, m.checkpoint, digest_config(dataclasses.asdict(m) | {"checkpoint": m.size}),
                        config.pretrain.seq_len) for m in models]


def run(run_dir: Path, config: RunConfig) -> None:
    store = RunStore(run_dir.resolve())  # absolute: actors may run elsewhere (a shared filesystem)
    start = time.perf_counter()
    started_at = time.time()  # epoch seconds, as manifests' `created`: older stages came from the store
    cluster = connect(config.cluster)
    console.cluster_line(cluster)
    with Pools(config.cluster, scratch=store.root / ".weight-sync") as pools:  # in the store: shared by nodes
        _run_stages(store, config, pools, start)
    console.run_end(store, started_at, time.perf_counter() - start)


def _run_stages(store: RunStore, config: RunConfig, pools: Pools, start: float) -> None:
    oracle = not config.data.enabled  # the world's oracle judges world runs; runs from files have none
    if oracle:
        tables, cached = run_world(store, config.world)
        stage_of = world_stage_name
        console.section(f"world {'(cached)' if cached else '(built)'}: {store.root / 'round-00'}")
        policies = None
    else:
        policies = base_policies(store, {}, config, pools)
        tables, cached = run_data_files(store, config.data, load_tokenizer(policies[-1].checkpoint),
                                        config.rm.heldout_share, config.rm.heldout_pairs)
        stage_of = data_stage_name
        console.section(f"data files {'(cached)' if cached else '(loaded)'}: {store.root / 'round-00'}")
    console.table_rows(tables)
    if oracle:
        policies = base_policies(store, tables, config, pools)

    def digest(table: str) -> str:
        return store.stage(0, stage_of(table)).manifest()["content_digest"]

    prompts, prompts_digest = tables["prompts_eval"], digest("prompts_eval")

    def evaluate(round: int, name: str, policy: PolicyState, fmt: str = "llama2") -> list[dict]:  # noqa: A002
        """Samples of `policy` on the held-out prompts (a cached stage) from its generator pool; with the world,
        their oracle scores per category."""
        scores, _ = run_oracle_eval(store, round, name, policy.checkpoint, policy.digest, prompts, prompts_digest,
                                    fmt, config.eval_sampling,
                                    lambda: pools.generator(policy.name, policy.checkpoint, policy.context),
                                    config.cluster.prompts_per_shard, oracle)
        return scores

    base_scores: dict[str, list[dict]] = {}
    if oracle:
        for p in policies:
            base_scores[p.name] = evaluate(0, names.base_eval(p.name), p, native_format(p.checkpoint))
        console.base_scores_table(config.eval_sampling.temperature, base_scores)

    demonstrations = tables["demonstrations"]
    demos_digest = digest("demonstrations")
    console.sft_header(demonstrations.num_rows)
    sft_scores: dict[str, list[dict]] = {}
    current: list[PolicyState] = []  # each size's latest checkpoint: SFT's, then each round's
    for p in policies:
        started = time.perf_counter()
        _, metrics, cached = checkpoint_stage(
            store, 0, names.sft(p.name), {"base": p.digest, "demonstrations": demos_digest},
            config.sft.recipe(),
            lambda out, p=p: pools.train(train_sft, p.checkpoint, demonstrations, out, config.sft))
        current.append(PolicyState.of_stage(p.name, store.stage(0, names.sft(p.name)), p.context))
        sft_scores[p.name] = evaluate(0, names.sft_eval(p.name), current[-1])
        console.sft_rows(p.name, metrics, console.how(cached, started), sft_scores[p.name], base_scores.get(p.name))

    # Reward models start from the largest SFT policy (the paper initialises them from the chat model).
    rm_init = current[-1]
    weeks = [(name, tables[name], digest(name)) for name in tables if name.startswith("preferences_b")]
    train_digest = digest("prompts_train")

    world = World(config.world) if oracle else None
    judge_folder = config.judge.folder()
    rounds = RoundContext(store, weeks, rm_init, tables["prompts_train"], train_digest, config.rounds, config.rm,
                          pools, evaluate, config.cluster.prompts_per_shard, world, config.eval_sampling,
                          gatt_source_of(store, tables, world, config, judge_folder, pools, digest))
    judged: dict[int, dict] = {}
    results: list[RoundResult] = []
    win_rates: dict[tuple[int, str], dict] = {}
    for r in range(1, config.rounds.count + 1):
        if config.rounds.batches_through(r) > len(weeks):
            console.section(f"round {r}: no new weekly batch left ({len(weeks)} in the world); stopping")
            break
        started = time.perf_counter()
        result = run_round(rounds, r, current)
        current = result.policies
        results.append(result)
        console.section(f"round {r} ({time.perf_counter() - started:.0f} s): {store.root / f'round-{r:02d}'}")
        console.round_block(result, current, oracle)
        win_rates.update(compare_with_sft(store, result, current, prompts, pools, oracle))
        if judge_folder is not None:  # the largest policy only: the LLM judge is the slowest judge
            judged[r] = judge_against_sft(store, r, current[-1].name, prompts, config, judge_folder, pools, oracle)

    if oracle:
        console.oracle_rounds(policies, sft_scores, results)
    else:
        console.reward_rounds(policies, results, win_rates)
    if results:
        last = max(r.round for r in results)
        rms = {kind: store.stage(last, names.rm(kind)).manifest()["extra"]["metrics"] for kind in PREFERENCE_KINDS}
        heldout = {(kind, test): metrics["heldout"][test] for kind, metrics in rms.items() for test in PREFERENCE_KINDS}
        console.rm_tables(last, heldout, per_source=not oracle)  # the user's files: Table 7 per source file
    largest = policies[-1].name
    sft_safety = (safety_metrics(safety_rows(prompts, store.stage(0, names.sft_eval(largest)).read()))
                  if oracle else None)
    path = render_report(store.root, run_results(store, config.run.name, results, win_rates, judged, largest,
                                                 sft_safety))
    console.section(f"report ({largest} policy against its SFT model): {path}")
    if oracle:
        final = None
        if results:
            final = versus_start(store.stage(results[-1].round, names.round_eval(largest)).read(),
                                 store.stage(0, names.base_eval(largest)).read(), prompts)
            console.versus_start_line(largest, results[-1].round, final)
        summary = run_summary(config.run.name, config.world.seed, (time.perf_counter() - start) / 60, sft_scores,
                              results, win_rates, base_scores, final)
        console.summary_line(write_summary(store.root, summary))


def compare_with_sft(store: RunStore, result: RoundResult, current: list[PolicyState], prompts: pa.Table,
                     pools: Pools, oracle: bool = True) -> dict[tuple[int, str], dict]:
    """Each size's win rates against its own SFT model, judged by the round's RMs and the oracle (cached)."""
    out = {}
    # (key, moment, label): each size's latest checkpoint, and the one PPO started from when PPO ran.
    candidates = [(name, "", name) for name in (p.name for p in current)]
    candidates += [(f"{name}{console.BEFORE_PPO}", "before_ppo", f"{name} pre-PPO") for name in result.before_ppo]
    for key, moment, label in candidates:
        name = key.removesuffix(console.BEFORE_PPO)
        wins, _ = run_win_rates(store, result.round, names.win_rate(name, moment), names.round_eval(name, moment),
                                (0, names.sft_eval(name)), prompts, result.rm_digest,
                                lambda: pools.scorer(*result.rm_dirs), oracle)
        out[(result.round, key)] = wins
        console.win_rate_line(label, result.round, wins)
    return out


def judge_against_sft(store: RunStore, round: int, size: str, prompts: pa.Table, config: RunConfig,  # noqa: A002
                      folder: Path, pools: Pools, oracle: bool = True) -> dict:
    """The LLM judge's verdicts on the `size` policy against its SFT model (cached)."""
    verdicts, _ = run_llm_judge(store, round, names.judge(size), names.round_eval(size), (0, names.sft_eval(size)),
                                prompts,
                                config.judge, folder, lambda: pools.generator("judge", folder, config.judge.context),
                                oracle)
    console.judge_line(size, round, folder.name, verdicts)
    return verdicts


GATT_LABELS = (("before GAtt", "before"), ("GAtt", "after"))  # the report's columns, run_gatt's keys


def gatt_source_of(store: RunStore, tables: dict[str, pa.Table], world: World | None, config: RunConfig,
                   judge_folder: Path | None, pools: Pools, digest: Callable[[str], str]) -> DialogueSource | None:
    """GAtt's instructions and dialogues: the world's, or data.gatt's files with the LLM judge measuring adherence
    (None for a run from files without them: the config then refuses GAtt)."""
    if world is not None:
        return WorldDialogues(world)
    if "gatt_instructions" not in tables or judge_folder is None:
        return None

    def ask(requests: list[tuple[str, list[Message]]], round: int, stage: str) -> dict[str, str]:  # noqa: A002
        pool = pools.generator("judge", judge_folder, config.judge.context)
        return ask_judge(requests, judge_folder, config.judge, pool, round, stage,
                         ADHERENCE_PREFIX if config.judge.style == "direct" else "")

    files = digest_config({"instructions": digest("gatt_instructions"), "dialogues": digest("gatt_dialogues"),
                           "heldout_share": config.data.gatt.heldout_share, "judge": judge_digest(judge_folder),
                           "judge_config": dataclasses.asdict(config.judge)})
    return FileDialogues.from_tables(tables["gatt_instructions"], tables["gatt_dialogues"],
                                     config.data.gatt.heldout_share, ask, files)


def run_results(store: RunStore, name: str, results: list[RoundResult], win_rates: dict[tuple[int, str], dict],
                judged: dict[int, dict], size: str, sft_safety: SafetyMetrics) -> RunResults:
    """The report's data for the `size` policy, from the rounds' results and stage manifests."""
    rounds = [RoundResults(0, "SFT", safety=sft_safety)]
    for result in results:
        wins = win_rates[(result.round, size)]
        by_judge = {judge: {aspect: WinRate.from_dict(w) for aspect, w in by.items()}
                    for judge, by in wins["win_rates"].items()}
        trust = {f"reward models ({aspect})": {"agreement": Proportion.from_dict(a["overall"])}
                 for aspect, a in wins["rm_agreement"].items()}
        if result.round in judged:
            verdicts = judged[result.round]
            by_judge["LLM judge"] = {a: WinRate.from_dict(w) for a, w in verdicts["win_rates"].items()}
            trust["LLM judge"] = {"consistency": Proportion.from_dict(verdicts["consistency"])}
            if verdicts["agreement"]:
                trust["LLM judge"]["agreement"] = Proportion.from_dict(verdicts["agreement"]["overall"])
        rms = {kind: store.stage(result.round, names.rm(kind)).manifest()["extra"]["metrics"]
               for kind in PREFERENCE_KINDS}
        rounds.append(RoundResults(
            result.round, f"RLHF-V{result.round}",
            win_rates=by_judge,
            reward_vs_k=result.rejection["reward_vs_k"],
            reward_vs_temperature=result.rejection.get("reward_vs_temperature") or [],
            rm_accuracy={(kind, test): m["heldout"][test] for kind, m in rms.items() for test in PREFERENCE_KINDS},
            ppo_iterations=(result.ppo or {}).get("iterations", []), ppo_heldout=(result.ppo or {}).get("heldout", []),
            gatt_adherence={label: result.gatt[size][key] for label, key in GATT_LABELS if size in result.gatt},
            safety=SafetyMetrics.from_dict(wins["safety"]) if wins["safety"] else None, judge_trust=trust))
    return RunResults(name, rounds)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        config = validate(cfg)
        check_plan(config)  # the memory plan (pipeline/plan.py): a stage that does not fit stops here, one line
    except ConfigError as err:  # before any stage or actor starts
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    run(config.run_dir, config)


def main() -> None:
    register()
    _hydra_main()
