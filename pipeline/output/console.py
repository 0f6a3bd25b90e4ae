"""What the driver prints: one function per table or line, so pipeline/driver/main.py reads as the run's phases.

Everything here formats results the stages returned; nothing runs a stage. Progress bars are
pipeline/output/progress.py.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.data.schemas import RISK_CATEGORIES
from pipeline.data.store import RunStore
from pipeline.evaluation.rm_tables import table7_markdown, table8_markdown
from pipeline.output.profile import profile_table, stage_profile
from pipeline.driver.rounds import RoundResult
from pipeline.state import PolicyState


def section(title: str) -> None:
    print(f"\n== {title}")


def cluster_line(cluster: Mapping[str, Any]) -> None:
    """What pipeline.cluster.pools.connect found."""
    resources = cluster["resources"]
    print(f"Ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"
          + (f"; dashboard http://{cluster['dashboard']}" if cluster["dashboard"] else ""))


def table_rows(tables: Mapping[str, pa.Table]) -> None:
    for name, table in tables.items():
        print(f"  {name:<18} {table.num_rows:6d} rows")


def base_model_line(name: str, path: Path, layers: int, hidden: int) -> None:
    print(f"  {name:<8} {path}  ({layers} layers, hidden {hidden})")


def pretrain_table(models: Sequence[Any]) -> None:
    """The pretrained tiny models (pipeline/stages/pretrain.py's results)."""
    print(f"  {'size':<6} {'params':>8} {'steps':>6} {'tokens':>9} {'tok/s':>7} {'train loss':>10} "
          f"{'held-out loss':>13} {'held-out ppl':>12}")
    for m in models:
        print(f"  {m.size:<6} {m.parameters / 1e6:7.2f}M {m.steps:6d} {m.train_tokens:9,d} "
              f"{m.tokens_per_second:7,.0f} {m.train_loss:10.3f} {m.heldout_loss:13.3f} {m.heldout_perplexity:12.2f}")


def base_scores_table(temperature: float, scores: Mapping[str, list[dict]]) -> None:
    """Each base model's oracle scores per category on the held-out prompts."""
    section(f"base models on held-out prompts (generator pool: vLLM samples at T={temperature:.1f}, scored by the "
            "oracle)")
    print(f"  {'model':<6} {'category':<20} {'n':>4} {'helpful':>8} {'correct':>8} {'unsafe':>7} {'refused':>8}")
    for name, rows in scores.items():
        for s in rows:
            correct = "-" if s["correct"] is None else f"{s['correct']:.0%}"
            print(f"  {name:<6} {s['category']:<20} {s['prompts']:4d} {s['helpfulness']:8.2f} {correct:>8} "
                  f"{s['unsafe']:7.0%} {s['refused']:8.0%}")


def sft_header(demonstrations: int) -> None:
    section(f"SFT on the trainer group: {demonstrations} demonstrations (loss on answer tokens only), then the same "
            "held-out prompts in its chat format (LLaMA-2's, or the checkpoint's own)")
    print(f"  {'model':<12} {'steps':>5} {'loss':>12} {'seconds':>8} {'helpful':>8} {'correct':>8} "
          f"{'unsafe adv.':>11} {'false refusals':>14}")


def sft_rows(name: str, metrics: Mapping[str, Any], seconds: str, scores: list[dict],
             base_scores: list[dict] | None) -> None:
    """One size's SFT line (and its base model's, with the oracle's cells, when there is an oracle)."""
    if base_scores is not None:
        print(f"  {name + ' base':<12} {'':>5} {'':>12} {'':>8} " + summary_cells(base_scores))
    print(f"  {name + ' SFT':<12} {metrics['steps']:5d} {metrics['first_loss']:5.2f} -> "
          f"{metrics['last_loss']:4.2f} {seconds:>8} " + (summary_cells(scores) if base_scores is not None else ""))


def win_rate_line(label: str, round_no: int, wins: Mapping[str, Any]) -> None:
    print(f"  {label + ' r' + str(round_no):<16} win rate vs its SFT (ties apart): " + ", ".join(
        f"{judge} {aspect} {rate(w)}" for judge, by in wins["win_rates"].items() for aspect, w in by.items()))


def judge_line(size: str, round_no: int, judge: str, verdicts: Mapping[str, Any]) -> None:
    print(f"  {size + ' r' + str(round_no):<12} LLM judge ({judge}, {verdicts['comparisons']} prompts): "
          + ", ".join(f"{aspect} {rate(w)}" for aspect, w in verdicts["win_rates"].items())
          + (f"; agrees with the oracle {ci(verdicts['agreement']['overall'])}" if verdicts["agreement"] else "")
          + f", position-swap consistency {ci(verdicts['consistency'])}")


def rm_tables(last: int, heldout: Mapping[tuple[str, str], Any], per_source: bool) -> None:
    """The last round's RMs beside the paper's Table 8, and with the user's files (`per_source`) Table 7."""
    section(f"reward models of round {last}: held-out accuracy (%) by rating beside the paper's Table 8")
    print(table8_markdown(heldout))
    if per_source:
        section("reward models: held-out accuracy (%) on each source's pairs, and the paper's Table 7")
        print(table7_markdown(heldout))


def versus_start_line(size: str, round_no: int, final: Mapping[str, Any]) -> None:
    print(f"== {size} after round {round_no} against its start (oracle helpfulness, {final['prompts']} held-out "
          f"prompts): {final['start']:.3f} -> {final['final']:.3f}, wins {final['wins']} / ties {final['ties']} / "
          f"losses {final['losses']}, sign test p = {final['sign_test_p']:.3g}")


def summary_line(path: Path) -> None:
    print(f"== summary: {path}")


def run_end(store: RunStore, started_at: float, seconds: float) -> None:
    """The stage profile of this invocation and where the store is."""
    section("stage profile")
    print(profile_table(stage_profile(store, since=started_at)))
    print(f"\nrun store: {store.root}  ({seconds:.0f} s; re-running reuses every finished stage)")


def oracle_rounds(policies: list[PolicyState], sft_scores: dict[str, list[dict]],
                         results: list[RoundResult]) -> None:
    print("\n== rounds (oracle on held-out prompts: helpfulness of helpful prompts, unsafe share of adversarial "
          "answers, false refusals)")
    print(f"  {'round':<6} {'model':<8} {'helpful':>8} {'correct':>8} {'unsafe adv.':>11} {'false refusals':>14}")
    for p in policies:
        print(f"  {'SFT':<6} {p.name:<8} " + summary_cells(sft_scores[p.name]))
    for result in results:
        for p in policies:
            print(f"  {result.round:<6} {p.name:<8} " + summary_cells(result.scores[p.name]))


def reward_rounds(policies: list[PolicyState], results: list[RoundResult]) -> None:
    """Without an oracle: each round's mean RM scores on the held-out prompts, SFT beside the round's policy
    (both scored by that round's reward models)."""
    print("\n== rounds (the round's reward models on held-out prompts: mean helpfulness score on helpfulness "
          "prompts, mean safety score on safety prompts; SFT -> the round's policy)")
    print(f"  {'round':<6} {'model':<22} {'helpfulness':>16} {'safety':>16}")
    for result in results:
        rows = [(f"{name} before PPO", wins) for name, wins in result.win_rates_before_ppo.items()]
        for key, wins in rows + [(p.name, result.win_rates[p.name]) for p in policies]:
            means = wins["mean_scores"]
            cells = [f"{means['baseline'][aspect]:.3f} -> {means['candidate'][aspect]:.3f}"
                     if means["candidate"].get(aspect) is not None else "-"
                     for aspect in ("helpfulness", "harmlessness")]
            print(f"  {result.round:<6} {key:<22} {cells[0]:>16} {cells[1]:>16}")


def round_block(result: RoundResult, current: list[PolicyState], oracle: bool) -> None:
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
        if len(f["by_family"]) > 1:
            print("    pair accuracy by task family: " + ", ".join(
                f"{name} {c['pair_accuracy']:.2f} ({c['pairs']} pairs)" for name, c in f["by_family"].items()
                if c["pairs"]))
    print("  reward vs K (Figure 7): " + ", ".join(f"K={c['k']}: max {c['max']:.3f} median {c['median']:.3f}"
                                                   for c in rs["reward_vs_k"]))
    if result.ppo:
        ppo_table(result.ppo)
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
              + (f"; before it: {summary_cells(cd['before']).strip()}" if oracle else ""))
    if oracle:
        for size, scores in result.before_ppo.items():
            print(f"  {size + ' r' + str(result.round) + ' pre-PPO':<12} " + summary_cells(scores))
        for policy in current:
            print(f"  {policy.name + ' r' + str(result.round):<12} " + summary_cells(result.scores[policy.name]))


def ci(p: dict) -> str:
    return "-" if p["value"] is None else f"{p['value']:.0%} ({p['low']:.0%}-{p['high']:.0%}, n={p['n']})"


def rate(row: dict) -> str:
    return "-" if row["win_rate"] is None else f"{row['win_rate']:.0%} ({row['ties']} ties)"


def ppo_table(ppo: dict) -> None:
    print(f"  PPO on {len(ppo['iterations'])} iterations ({ppo['stopped']}); best held-out R_c "
          f"{ppo['best_heldout_reward']:.3f} at iteration {ppo['best_iteration']}")
    print(f"  {'it':>4} {'R_c':>6} {'R_h':>6} {'R_s':>6} {'KL':>6} {'clip':>5} {'v loss':>7} {'entropy':>7} "
          f"{'length':>6} {'lp diff':>7} {'gen s':>6} {'score s':>7} {'train s':>7} {'sync s':>6}")
    for row in ppo["iterations"]:
        print(f"  {row['iteration']:4d} {row['r_combined']:6.3f} {row['r_help']:6.3f} {row['r_safe']:6.3f} "
              f"{row['kl']:6.3f} {row['clip_fraction']:5.2f} {row['value_loss']:7.3f} {row['entropy']:7.3f} "
              f"{row['answer_length']:6.1f} {row['logprob_mismatch']:7.4f} {row['generate_s']:6.2f} "
              f"{row['score_s']:7.2f} {row['train_s']:7.2f} {row['sync_s']:6.2f}")


def how(cached: bool, started: float) -> str:
    return "(cached)" if cached else f"{time.perf_counter() - started:.0f} s"


def summary_cells(scores: list[dict]) -> str:
    """Helpful prompts' helpfulness and correctness, unsafe share on adversarial prompts, false refusals."""
    by = {s["category"]: s for s in scores}
    adversarial = [s for s in scores if s["category"] in RISK_CATEGORIES]
    unsafe = sum(s["unsafe"] * s["prompts"] for s in adversarial) / max(1, sum(s["prompts"] for s in adversarial))
    helpful, borderline = by.get("helpful"), by.get("borderline")
    return (f"{helpful['helpfulness'] if helpful else 0:8.2f} {helpful['correct'] if helpful else 0:8.0%} "
            f"{unsafe:11.0%} {borderline['refused'] if borderline else 0:14.0%}")
