"""The driver: a plain Python program (and a Ray job) that runs the stages in order on the actor pools.

world (or the user's files) -> base models (pretrained on the world's corpus, or `base_models` checkpoints) ->
their answers to held-out prompts on the generator pool (scored by the oracle in world runs) -> SFT of every size
on the trainer group -> the same evaluation -> the RLHF rounds (pipeline/driver/rounds.py: reward models on every weekly
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
from pathlib import Path

import hydra
from omegaconf import DictConfig

from model.config import ModelConfig
from model.tokenizer import load_tokenizer
from pipeline.output import console
from pipeline import stage_names as names
from pipeline.cluster.pools import Pools, connect
from pipeline.config.run import CONF_DIR, ConfigError, RunConfig, register, validate
from pipeline.data.schemas import PREFERENCE_KINDS
from pipeline.data.store import RunStore, digest_config
from pipeline.cluster.plan import check_plan
from pipeline.evaluation.demonstrations import demonstrations_summary
from pipeline.evaluation.safety_metrics import SafetyMetrics, safety_metrics, safety_rows
from pipeline.evaluation.winrate import Proportion, WinRate
from pipeline.output.report import RoundResults, RunResults, render_report
from pipeline.driver.rounds import RoundInputs, RoundResult, run_round
from pipeline.state import PolicyState
from pipeline.stages.context import RunData, StageContext, Table, with_digests
from pipeline.stages.data_files import data_stage_name, run_data_files
from pipeline.stages.evaluation.oracle_eval import native_format, run_oracle_eval
from pipeline.stages.sft.stage import run_sft
from pipeline.stages.pretrain import run_pretrain
from pipeline.stages.gatt.sources import dialogue_source
from pipeline.stages.evaluation.win_rates import versus_start
from pipeline.output.summary import run_summary, write_summary
from pipeline.stages.world import run_world, world_stage_name
from pipeline.world import World


def base_policies(store: RunStore, corpus: Table | None, config: RunConfig, pools: Pools) -> list[PolicyState]:
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
    start = time.perf_counter()
    models, source = run_pretrain(store, corpus.rows, corpus.digest, config.pretrain, runner=pools.train)
    how = {"cached": "cached", "shipped": "the bases shipped with the world for this corpus and recipe",
           "trained": f"trained, {time.perf_counter() - start:.0f} s"}[source]
    if source == "trained" and config.pretrain.shipped:
        how += "; no shipped base for this corpus and recipe"
    console.section(f"pretrain ({how}): {store.stage(0, 'pretrain').path}")
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


def load_data(store: RunStore, config: RunConfig, pools: Pools) -> tuple[dict[str, Table], list[PolicyState]]:
    """The run's round-0 tables (the world's, or the user's files) and its base models."""
    if not config.data.enabled:
        built, cached = run_world(store, config.world)
        console.section(f"world {'(cached)' if cached else '(built)'}: {store.root / 'round-00'}")
        tables = with_digests(store, world_stage_name, built)
        console.table_rows(built)
        return tables, base_policies(store, tables["corpus"], config, pools)
    policies = base_policies(store, None, config, pools)
    loaded, cached = run_data_files(store, config.data, load_tokenizer(policies[-1].checkpoint),
                                    config.rm.heldout_share, config.rm.heldout_pairs)
    console.section(f"data files {'(cached)' if cached else '(loaded)'}: {store.root / 'round-00'}")
    console.table_rows(loaded)
    return with_digests(store, data_stage_name, loaded), policies


def _run_stages(store: RunStore, config: RunConfig, pools: Pools, start: float) -> None:
    oracle = not config.data.enabled  # the world's oracle judges world runs; runs from files have none
    tables, policies = load_data(store, config, pools)
    world = World(config.world) if oracle else None
    weeks = [(name, table) for name, table in tables.items() if name.startswith("preferences_b")]
    data = RunData(tables["prompts_train"], tables["prompts_eval"], weeks, world)
    ctx = StageContext(store, 0, pools, data, config.eval_sampling, config.cluster.prompts_per_shard)

    base_scores: dict[str, list[dict]] = {}
    if oracle:
        base_scores = {p.name: run_oracle_eval(ctx, names.base_eval(p.name), p, native_format(p.checkpoint))
                       for p in policies}
        console.base_scores_table(config.eval_sampling.temperature, base_scores)

    demonstrations = tables["demonstrations"]
    console.sft_header(demonstrations.rows.num_rows)
    sft = run_sft(ctx, policies, demonstrations, config.sft)
    sft_scores = sft.evaluations["after"]
    for p in policies:
        m = sft.metrics[p.name]
        console.sft_rows(p.name, m["training"], "(cached)" if m["cached"] else f"{m['seconds']:.0f} s",
                         sft_scores[p.name], base_scores.get(p.name))

    judge_folder = config.judge.folder()
    judge = None if judge_folder is None else (config.judge, judge_folder)
    inputs = RoundInputs(sft.policies[-1], config.rm,
                         dialogue_source(tables, world, config.data.gatt.heldout_share, judge), judge)
    results: list[RoundResult] = []
    current = sft.policies
    for r in range(1, config.rounds.count + 1):
        if config.rounds.batches_through(r) > len(weeks):
            console.section(f"round {r}: no new weekly batch left ({len(weeks)} in the world); stopping")
            break
        started = time.perf_counter()
        result = run_round(ctx.at(r), config.rounds, inputs, current)
        current = result.policies
        results.append(result)
        console.section(f"round {r} ({time.perf_counter() - started:.0f} s): {store.root / f'round-{r:02d}'}")
        console.round_block(result, current, oracle)
        for name, wins in result.win_rates_before_ppo.items():
            console.win_rate_line(f"{name} pre-PPO", r, wins)
        for name, wins in result.win_rates.items():
            console.win_rate_line(name, r, wins)
        if result.judge is not None:
            console.judge_line(current[-1].name, r, judge_folder.name, result.judge)

    if oracle:
        console.oracle_rounds(policies, sft_scores, results)
    else:
        console.reward_rounds(policies, results)
    if results:
        heldout = {(kind, test): metrics["heldout"][test]
                   for kind, metrics in results[-1].reward_models.metrics.items() for test in PREFERENCE_KINDS}
        console.rm_tables(results[-1].round, heldout, per_source=not oracle)  # the user's files: Table 7 per file
    largest = policies[-1].name
    prompts = data.prompts_eval.rows
    sft_safety = (safety_metrics(safety_rows(prompts, store.stage(0, names.sft_eval(largest)).read()))
                  if oracle else None)
    path = render_report(store.root, run_results(config.run.name, results, largest, sft_safety))
    console.section(f"report ({largest} policy against its SFT model): {path}")
    if oracle:
        final = None
        if results:
            final = versus_start(store.stage(results[-1].round, names.round_eval(largest)).read(),
                                 store.stage(0, names.base_eval(largest)).read(), prompts)
            console.versus_start_line(largest, results[-1].round, final)
        summary = run_summary(config.run.name, config.world.seed, (time.perf_counter() - start) / 60, sft_scores,
                              results, base_scores, final, demonstrations_summary(demonstrations.rows))
        console.summary_line(write_summary(store.root, summary))


GATT_LABELS = (("before GAtt", "before"), ("GAtt", "after"))  # the report's columns, run_gatt's keys


def run_results(name: str, results: list[RoundResult], size: str, sft_safety: SafetyMetrics | None) -> RunResults:
    """The report's data for the `size` policy, from the rounds' results."""
    rounds = [RoundResults(0, "SFT", safety=sft_safety)]
    for result in results:
        wins = result.win_rates[size]
        by_judge = {judge: {aspect: WinRate.from_dict(w) for aspect, w in by.items()}
                    for judge, by in wins["win_rates"].items()}
        trust = {f"reward models ({aspect})": {"agreement": Proportion.from_dict(a["overall"])}
                 for aspect, a in wins["rm_agreement"].items()}
        if result.judge is not None:
            verdicts = result.judge
            by_judge["LLM judge"] = {a: WinRate.from_dict(w) for a, w in verdicts["win_rates"].items()}
            trust["LLM judge"] = {"consistency": Proportion.from_dict(verdicts["consistency"])}
            if verdicts["agreement"]:
                trust["LLM judge"]["agreement"] = Proportion.from_dict(verdicts["agreement"]["overall"])
        rms = result.reward_models.metrics
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
        check_plan(config)  # the memory plan (pipeline/cluster/plan.py): a stage that does not fit stops here, one line
    except ConfigError as err:  # before any stage or actor starts
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    run(config.run_dir, config)


def main() -> None:
    register()
    _hydra_main()
