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
from pipeline.cluster import Pools, connect
from pipeline.config import ConfigError, RunConfig, register, validate
from pipeline.data.schemas import PREFERENCE_KINDS, RISK_CATEGORIES
from pipeline.data.store import RunStore, digest_config
from pipeline.evaluation.judge import ADHERENCE_PREFIX
from pipeline.evaluation.safety_metrics import SafetyMetrics, safety_metrics, safety_rows
from pipeline.evaluation.winrate import Proportion, WinRate
from pipeline.profile import profile_table, stage_profile
from pipeline.report import RoundResults, RunResults, render_report
from pipeline.rounds import PolicyState, RoundResult, run_round
from pipeline.stages.cached import checkpoint_stage
from pipeline.stages.data_files import data_stage_name, run_data_files
from pipeline.stages.reward_model import table7_markdown, table8_markdown
from pipeline.stages.oracle_eval import native_format, run_oracle_eval
from pipeline.stages.sft import train_sft
from pipeline.stages.pretrain import run_pretrain
from pipeline.stages.reward_models import rm_stage_name
from pipeline.stages.gatt_sources import DialogueSource, FileDialogues, WorldDialogues
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
        print("\n== base models (from base_models)")
        policies = []
        for name, folder in config.base_models.items():
            path = Path(folder).resolve()
            model = ModelConfig.load(path)
            digest = digest_config({"name": name, "config": (path / "config.json").read_text(), "path": str(path)})
            context = min(model.max_position_embeddings, config.base_context or model.max_position_embeddings)
            policies.append(PolicyState(name, path, digest, context))
            print(f"  {name:<8} {path}  ({model.num_hidden_layers} layers, hidden {model.hidden_size})")
        return policies
    corpus_digest = store.stage(0, world_stage_name("corpus")).manifest()["content_digest"]
    start = time.perf_counter()
    models, cached = run_pretrain(store, tables["corpus"], corpus_digest, config.pretrain, runner=pools.train)
    how = "(cached)" if cached else f"(trained, {time.perf_counter() - start:.0f} s)"
    print(f"\n== pretrain {how}: {store.stage(0, 'pretrain').path}")
    print(f"  {'size':<6} {'params':>8} {'steps':>6} {'tokens':>9} {'tok/s':>7} {'train loss':>10} "
          f"{'held-out loss':>13} {'held-out ppl':>12}")
    for m in models:
        print(f"  {m.size:<6} {m.parameters / 1e6:7.2f}M {m.steps:6d} {m.train_tokens:9,d} "
              f"{m.tokens_per_second:7,.0f} {m.train_loss:10.3f} {m.heldout_loss:13.3f} {m.heldout_perplexity:12.2f}")
    return [PolicyState(m.size, m.checkpoint, digest_config(dataclasses.asdict(m) | {"checkpoint": m.size}),
                        config.pretrain.seq_len) for m in models]


def run(run_dir: Path, config: RunConfig) -> None:
    store = RunStore(run_dir.resolve())  # absolute: actors may run elsewhere (a shared filesystem)
    start = time.perf_counter()
    started_at = time.time()  # epoch seconds, as manifests' `created`: older stages came from the store
    cluster = connect(config.cluster)
    print(f"Ray: {cluster['resources'].get('CPU', 0):g} CPUs, {cluster['resources'].get('GPU', 0):g} GPUs"
          + (f"; dashboard http://{cluster['dashboard']}" if cluster["dashboard"] else ""))
    with Pools(config.cluster) as pools:
        _run_stages(store, config, pools, start)
    print("\n== stage profile")
    print(profile_table(stage_profile(store, since=started_at)))
    print(f"\nrun store: {store.root}  ({time.perf_counter() - start:.0f} s; re-running reuses every "
          "finished stage)")


def _run_stages(store: RunStore, config: RunConfig, pools: Pools, start: float) -> None:
    oracle = not config.data.enabled  # the world's oracle judges world runs; runs from files have none
    if oracle:
        tables, cached = run_world(store, config.world)
        stage_of = world_stage_name
        print(f"\n== world {'(cached)' if cached else '(built)'}: {store.root / 'round-00'}")
        policies = None
    else:
        policies = base_policies(store, {}, config, pools)
        tables, cached = run_data_files(store, config.data, load_tokenizer(policies[-1].checkpoint),
                                        config.rm.heldout_share, config.rm.heldout_pairs)
        stage_of = data_stage_name
        print(f"\n== data files {'(cached)' if cached else '(loaded)'}: {store.root / 'round-00'}")
    for name, table in tables.items():
        print(f"  {name:<18} {table.num_rows:6d} rows")
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
        print("\n== base models on held-out prompts (generator pool: vLLM samples at T=%.1f, scored by the oracle)"
              % config.eval_sampling.temperature)
        print(f"  {'model':<6} {'category':<20} {'n':>4} {'helpful':>8} {'correct':>8} {'unsafe':>7} {'refused':>8}")
        for p in policies:
            scores = base_scores[p.name] = evaluate(0, f"base_eval_{p.name}", p, native_format(p.checkpoint))
            for s in scores:
                correct = "-" if s["correct"] is None else f"{s['correct']:.0%}"
                print(f"  {p.name:<6} {s['category']:<20} {s['prompts']:4d} {s['helpfulness']:8.2f} {correct:>8} "
                      f"{s['unsafe']:7.0%} {s['refused']:8.0%}")

    demonstrations = tables["demonstrations"]
    demos_digest = digest("demonstrations")
    print(f"\n== SFT on the trainer group: {demonstrations.num_rows} demonstrations (loss on answer tokens only), "
          "then the same held-out prompts in its chat format (LLaMA-2's, or the checkpoint's own)")
    print(f"  {'model':<12} {'steps':>5} {'loss':>12} {'seconds':>8} {'helpful':>8} {'correct':>8} "
          f"{'unsafe adv.':>11} {'false refusals':>14}")
    sft_scores: dict[str, list[dict]] = {}
    current: list[PolicyState] = []  # each size's latest checkpoint, moved on by the rounds
    for p in policies:
        started = time.perf_counter()
        _, metrics, cached = checkpoint_stage(
            store, 0, f"sft_{p.name}", {"base": p.digest, "demonstrations": demos_digest},
            dataclasses.asdict(config.sft),
            lambda out, p=p: pools.train(train_sft, p.checkpoint, demonstrations, out, config.sft))
        current.append(PolicyState.of_stage(p.name, store.stage(0, f"sft_{p.name}"), p.context))
        scores = sft_scores[p.name] = evaluate(0, f"sft_eval_{p.name}", current[-1])
        if oracle:
            print(f"  {p.name + ' base':<12} {'':>5} {'':>12} {'':>8} " + _summary_cells(base_scores[p.name]))
        print(f"  {p.name + ' SFT':<12} {metrics['steps']:5d} {metrics['first_loss']:5.2f} -> "
              f"{metrics['last_loss']:4.2f} {_how(cached, started):>8} " + (_summary_cells(scores) if oracle else ""))

    # Reward models start from the largest SFT policy (the paper initialises them from the chat model).
    rm_init = dataclasses.replace(current[-1])  # a copy: the rounds move `current` on
    weeks = [(name, tables[name], digest(name)) for name in tables if name.startswith("preferences_b")]
    train_digest = digest("prompts_train")

    world = World(config.world) if oracle else None
    judge_folder = config.judge.folder()
    gatt_source = gatt_source_of(store, tables, world, config, judge_folder, pools, digest)
    judged: dict[int, dict] = {}
    results: list[RoundResult] = []
    win_rates: dict[tuple[int, str], dict] = {}
    for r in range(1, config.rounds.count + 1):
        if config.rounds.batches_through(r) > len(weeks):
            print(f"\n== round {r}: no new weekly batch left ({len(weeks)} in the world); stopping")
            break
        started = time.perf_counter()
        result = run_round(store, r, weeks, current, rm_init, tables["prompts_train"], train_digest, config.rounds,
                           config.rm, pools, evaluate, config.cluster.prompts_per_shard, world, config.eval_sampling,
                           gatt_source)
        results.append(result)
        print(f"\n== round {r} ({time.perf_counter() - started:.0f} s): {store.root / f'round-{r:02d}'}")
        _print_round(result, current, oracle)
        win_rates.update(compare_with_sft(store, result, current, prompts, pools, oracle))
        if judge_folder is not None:  # the largest policy only: the LLM judge is the slowest judge
            judged[r] = judge_against_sft(store, r, current[-1].name, prompts, config, judge_folder, pools, oracle)

    if oracle:
        _print_oracle_rounds(policies, sft_scores, results)
    else:
        _print_reward_rounds(policies, results, win_rates)
    if results:
        last = max(r.round for r in results)
        rms = {kind: store.stage(last, rm_stage_name(kind)).manifest()["extra"]["metrics"] for kind in PREFERENCE_KINDS}
        print(f"\n== reward models of round {last}: held-out accuracy (%) by rating beside the paper's Table 8")
        heldout = {(kind, test): metrics["heldout"][test] for kind, metrics in rms.items() for test in PREFERENCE_KINDS}
        print(table8_markdown(heldout))
        if not oracle:  # the user's files: accuracy on each one, the paper's Table 7 as a reference point
            print("\n== reward models: held-out accuracy (%) on each source's pairs, and the paper's Table 7")
            print(table7_markdown(heldout))
    largest = policies[-1].name
    sft_safety = (safety_metrics(safety_rows(prompts, store.stage(0, f"sft_eval_{largest}").read()))
                  if oracle else None)
    path = render_report(store.root, run_results(store, config.run.name, results, win_rates, judged, largest,
                                                 sft_safety))
    print(f"\n== report ({largest} policy against its SFT model): {path}")
    if oracle:
        final = None
        if results:
            final = versus_start(store.stage(results[-1].round, f"eval_{largest}").read(),
                                 store.stage(0, f"base_eval_{largest}").read(), prompts)
            print(f"== {largest} after round {results[-1].round} against its start (oracle helpfulness, "
                  f"{final['prompts']} held-out prompts): {final['start']:.3f} -> {final['final']:.3f}, "
                  f"wins {final['wins']} / ties {final['ties']} / losses {final['losses']}, "
                  f"sign test p = {final['sign_test_p']:.3g}")
        summary = run_summary(config.run.name, config.world.seed, (time.perf_counter() - start) / 60, sft_scores,
                              results, win_rates, base_scores, final)
        print(f"== summary: {write_summary(store.root, summary)}")


def _print_oracle_rounds(policies: list[PolicyState], sft_scores: dict[str, list[dict]],
                         results: list[RoundResult]) -> None:
    print("\n== rounds (oracle on held-out prompts: helpfulness of helpful prompts, unsafe share of adversarial "
          "answers, false refusals)")
    print(f"  {'round':<6} {'model':<8} {'helpful':>8} {'correct':>8} {'unsafe adv.':>11} {'false refusals':>14}")
    for p in policies:
        print(f"  {'SFT':<6} {p.name:<8} " + _summary_cells(sft_scores[p.name]))
    for result in results:
        for p in policies:
            print(f"  {result.round:<6} {p.name:<8} " + _summary_cells(result.scores[p.name]))


def _print_reward_rounds(policies: list[PolicyState], results: list[RoundResult],
                         win_rates: dict[tuple[int, str], dict]) -> None:
    """Without an oracle: each round's mean RM scores on the held-out prompts, SFT beside the round's policy
    (both scored by that round's reward models)."""
    print("\n== rounds (the round's reward models on held-out prompts: mean helpfulness score on helpfulness "
          "prompts, mean safety score on safety prompts; SFT -> the round's policy)")
    print(f"  {'round':<6} {'model':<22} {'helpfulness':>16} {'safety':>16}")
    for result in results:
        for key in [f"{name}{BEFORE_PPO}" for name in result.before_ppo] + [p.name for p in policies]:
            means = win_rates[(result.round, key)]["mean_scores"]
            cells = [f"{means['baseline'][aspect]:.3f} -> {means['candidate'][aspect]:.3f}"
                     if means["candidate"].get(aspect) is not None else "-" for aspect in ("helpfulness", "harmlessness")]
            print(f"  {result.round:<6} {key:<22} {cells[0]:>16} {cells[1]:>16}")


def _print_round(result: RoundResult, current: list[PolicyState], oracle: bool) -> None:
    rs = result.rejection
    for made in result.on_policy:
        print(f"  weekly batch {made['batch']}: {made['on_policy']} on-policy pairs (ratings {made['ratings']}; "
              f"{made['skipped_prompts']} prompts without two distinct answers) + {made['prebuilt']} prebuilt")
    accuracy = {kind: "-" if value is None else f"{100 * value:.1f}%"  # None: no held-out pair of that kind
                for kind, value in result.rm_accuracy.items()}
    print(f"  reward models on {result.batches} weekly batches: held-out accuracy (avg) helpfulness "
          f"{accuracy['helpfulness']}, safety {accuracy['safety']}")
    print(f"  rejection sampling: {rs['prompts']} prompts x K={rs['k']} at T={rs['temperature']:g} from "
          f"{current[-1].name}; mean best R_c {rs['mean_best_reward']:.3f}, kept {rs['kept']} "
          f"({rs['from_this_round']} from this round), mean kept R_c {rs['mean_kept_reward']:.3f}; "
          f"{rs['truncated']} of {rs['samples']} answers cut at max_tokens, {rs['best_truncated']} "
          "of this round's best" + ("" if rs["kept"] else ": nothing to fine-tune on, the policies stay as they were"))
    if result.rm_fidelity and result.rm_fidelity["pairs"]:
        f = result.rm_fidelity
        recovered = "-" if f["headroom_recovered"] is None else f"{f['headroom_recovered']:.0%}"
        print(f"  helpfulness RM on its own round's samples ({f['prompts']} helpful prompts, {f['pairs']} pairs the "
              f"oracle tells apart): pair accuracy {f['pair_accuracy']:.2f}; oracle helpfulness mean "
              f"{f['oracle_mean']:.3f}, RM's best of K {f['rm_best']:.3f}, oracle's best {f['oracle_best']:.3f} "
              f"(headroom recovered {recovered})")
    print("  reward vs K (Figure 7): " + ", ".join(f"K={c['k']}: max {c['max']:.3f} median {c['median']:.3f}"
                                                   for c in rs["reward_vs_k"]))
    if result.ppo:
        _print_ppo(result.ppo)
    for size, gatt in result.gatt.items():
        turns = [t for t in (1, 2, 4, 6, 20) if t <= len(gatt["before"])]
        judged_by = "" if oracle else " (the LLM judge's Yes/No per turn)"
        print(f"  GAtt {size}: {gatt['samples']} samples; adherence (%) by turn{judged_by}, before -> after: "
              + ", ".join(f"{t}: {100 * gatt['before'][t - 1].rate:.0f} -> {100 * gatt['after'][t - 1].rate:.0f}"
                          for t in turns))
    for size, cd in result.distillation.items():
        c = cd["counts"]
        print(f"  context distillation {size}: kept {c['kept']} of {c['prompts']} adversarial prompts (not safer "
              f"{c['not_safer']}, empty {c['empty']}, echoes the preprompt {c['echoes_preprompt']}, too long "
              f"{c['too_long']}, generic preprompt only {c.get('generic_only', 0)})"
              + (f"; before it: {_summary_cells(cd['before']).strip()}" if oracle else ""))
    if oracle:
        for size, scores in result.before_ppo.items():
            print(f"  {size + ' r' + str(result.round) + ' pre-PPO':<12} " + _summary_cells(scores))
        for policy in current:
            print(f"  {policy.name + ' r' + str(result.round):<12} " + _summary_cells(result.scores[policy.name]))


def compare_with_sft(store: RunStore, result: RoundResult, current: list[PolicyState], prompts: pa.Table,
                     pools: Pools, oracle: bool = True) -> dict[tuple[int, str], dict]:
    """Each size's win rates against its own SFT model, judged by the round's RMs and the oracle (cached)."""
    out = {}
    # (key, stage prefix, label): each size's latest checkpoint, and the one PPO started from when PPO ran.
    candidates = [(name, "", name) for name in (p.name for p in current)]
    candidates += [(f"{name}{BEFORE_PPO}", "before_ppo_", f"{name} pre-PPO") for name in result.before_ppo]
    for key, prefix, label in candidates:
        name = key.removesuffix(BEFORE_PPO)
        wins, _ = run_win_rates(store, result.round, f"winrate_{prefix}{name}", f"eval_{prefix}{name}",
                                (0, f"sft_eval_{name}"), prompts, result.rm_digest,
                                lambda: pools.scorer(*result.rm_dirs), oracle)
        out[(result.round, key)] = wins
        print(f"  {label + ' r' + str(result.round):<16} win rate vs its SFT (ties apart): " + ", ".join(
            f"{judge} {aspect} {_rate(w)}" for judge, by in wins["win_rates"].items() for aspect, w in by.items()))
    return out


BEFORE_PPO = " before PPO"  # win-rate key suffix of a round's checkpoint before PPO


def judge_against_sft(store: RunStore, round: int, size: str, prompts: pa.Table, config: RunConfig,  # noqa: A002
                      folder: Path, pools: Pools, oracle: bool = True) -> dict:
    """The LLM judge's verdicts on the `size` policy against its SFT model (cached)."""
    verdicts, _ = run_llm_judge(store, round, f"judge_{size}", f"eval_{size}", (0, f"sft_eval_{size}"), prompts,
                                config.judge, folder, lambda: pools.generator("judge", folder, config.judge.context),
                                oracle)
    print(f"  {size + ' r' + str(round):<12} LLM judge ({folder.name}, {verdicts['comparisons']} prompts): "
          + ", ".join(f"{aspect} {_rate(w)}" for aspect, w in verdicts["win_rates"].items())
          + (f"; agrees with the oracle {_ci(verdicts['agreement']['overall'])}" if verdicts["agreement"] else "")
          + f", position-swap consistency {_ci(verdicts['consistency'])}")
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
        rms = {kind: store.stage(result.round, rm_stage_name(kind)).manifest()["extra"]["metrics"]
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


def _ci(p: dict) -> str:
    return "-" if p["value"] is None else f"{p['value']:.0%} ({p['low']:.0%}-{p['high']:.0%}, n={p['n']})"


def _rate(row: dict) -> str:
    return "-" if row["win_rate"] is None else f"{row['win_rate']:.0%} ({row['ties']} ties)"


def _print_ppo(ppo: dict) -> None:
    print(f"  PPO on {len(ppo['iterations'])} iterations ({ppo['stopped']}); best held-out R_c "
          f"{ppo['best_heldout_reward']:.3f} at iteration {ppo['best_iteration']}")
    print(f"  {'it':>4} {'R_c':>6} {'R_h':>6} {'R_s':>6} {'KL':>6} {'clip':>5} {'v loss':>7} {'entropy':>7} "
          f"{'length':>6} {'lp diff':>7} {'gen s':>6} {'score s':>7} {'train s':>7} {'sync s':>6}")
    for row in ppo["iterations"]:
        print(f"  {row['iteration']:4d} {row['r_combined']:6.3f} {row['r_help']:6.3f} {row['r_safe']:6.3f} "
              f"{row['kl']:6.3f} {row['clip_fraction']:5.2f} {row['value_loss']:7.3f} {row['entropy']:7.3f} "
              f"{row['answer_length']:6.1f} {row['logprob_mismatch']:7.4f} {row['generate_s']:6.2f} "
              f"{row['score_s']:7.2f} {row['train_s']:7.2f} {row['sync_s']:6.2f}")


def _how(cached: bool, started: float) -> str:
    return "(cached)" if cached else f"{time.perf_counter() - started:.0f} s"


# An absolute path: with `python -m pipeline` Hydra would otherwise look for a Python package named `conf`.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def _summary_cells(scores: list[dict]) -> str:
    """Helpful prompts' helpfulness and correctness, unsafe share on adversarial prompts, false refusals."""
    by = {s["category"]: s for s in scores}
    adversarial = [s for s in scores if s["category"] in RISK_CATEGORIES]
    unsafe = sum(s["unsafe"] * s["prompts"] for s in adversarial) / max(1, sum(s["prompts"] for s in adversarial))
    helpful, borderline = by.get("helpful"), by.get("borderline")
    return (f"{helpful['helpfulness'] if helpful else 0:8.2f} {helpful['correct'] if helpful else 0:8.0%} "
            f"{unsafe:11.0%} {borderline['refused'] if borderline else 0:14.0%}")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        config = validate(cfg)
    except ConfigError as err:  # before any stage or actor starts
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    run(config.run_dir, config)


def main() -> None:
    register()
    _hydra_main()
