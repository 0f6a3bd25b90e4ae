"""The run report: `run_dir/report.md` with PNG plots in `run_dir/plots/`, and the same scalars as TensorBoard
events in `run_dir/tensorboard/`, from per-round results the driver collects from the stage manifests.

Plots (docs/design.md, "Rounds"): helpfulness vs harmlessness win rate per round (paper Figure 11), max and median
reward against K (Figure 7), reward against temperature (Figure 8), RM accuracy by rating beside Table 8, GAtt
adherence per turn beside Table 30, PPO curves (R_c and KL per iteration); and a safety table. A plot whose data
is missing is skipped with a line saying so. Every file is written atomically (pipeline.data.store), so a reader
never sees half a report; re-rendering replaces the files in place.
"""

from __future__ import annotations

import io
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

from pipeline.data.store import _write_atomic
from pipeline.evaluation.safety_metrics import SafetyMetrics
from pipeline.evaluation.winrate import Proportion, WinRate
from pipeline.stages.gatt.algorithm import TABLE30, TurnAdherence, adherence_table
from pipeline.evaluation.rm_tables import PAPER_TABLE8, table7_markdown, table8_markdown
from pipeline.evaluation.rm_tables import COLUMN_TITLES, COLUMNS

REPORT = "report.md"
PLOTS = "plots"
TENSORBOARD = "tensorboard"
EVENTS = "events.out.tfevents.report"  # one fixed name: a re-render replaces it instead of adding a duplicate run
ASPECTS = ("helpfulness", "harmlessness")  # Figure 11's axes: y, x


@dataclass
class RoundResults:
    """What one round measured; every field may be empty (that plot is skipped). Plain data: the driver copies it
    from the stage manifests."""

    round: int  # 0 is the SFT round
    label: str = ""  # e.g. "RLHF-V1"; empty: "round r"
    # Figure 11: judge ("reward models", "judge <checkpoint>", "oracle") -> aspect (ASPECTS) -> the candidate's
    # outcomes against the run's fixed baseline.
    win_rates: dict[str, dict[str, WinRate]] = field(default_factory=dict)
    # Figure 7: the rejection-sampling manifest's "reward_vs_k" rows ({"k", "max", "median", ...}).
    reward_vs_k: list[dict[str, Any]] = field(default_factory=list)
    # Figure 8: its "reward_vs_temperature" rows ({"temperature", "max", "median", ...}).
    reward_vs_temperature: list[dict[str, Any]] = field(default_factory=list)
    # Table 8: (rm kind, test-set kind) -> `accuracy_by_rating` result, as `table8_markdown` takes it.
    rm_accuracy: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # Table 30: model ("before GAtt", "GAtt") -> `gatt.adherence_by_turn` result, as `adherence_table` takes it.
    gatt_adherence: dict[str, list[TurnAdherence]] = field(default_factory=dict)
    # PPO: the manifest's "iterations" rows ({"iteration", "r_combined", "kl", ...}) and "heldout" rows
    # ({"iteration", "heldout_reward"}).
    ppo_iterations: list[dict[str, Any]] = field(default_factory=list)
    ppo_heldout: list[dict[str, Any]] = field(default_factory=list)
    safety: SafetyMetrics | None = None
    # How far each judge can be trusted: judge -> {"agreement": overall agreement with the oracle, and for the LLM
    # judge "consistency": position-swap consistency}, as Proportions.
    judge_trust: dict[str, dict[str, Proportion]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.label or f"round {self.round}"


@dataclass
class RunResults:
    name: str
    rounds: list[RoundResults] = field(default_factory=list)
    baseline: str = "SFT"  # the fixed model the win rates are measured against


@dataclass
class Rendered:
    markdown: list[str]
    figure: Figure | None = None


class Missing(Exception):
    """A section's data is absent; the message says which."""


@dataclass(frozen=True)
class Scalar:
    tag: str
    step: int
    value: float


# --- formatting ----------------------------------------------------------------------------------------------

def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _with_ci(p: Proportion) -> str:
    """"62.5% (48.2-75.0), 12/20"; "-" without observations."""
    if p.n == 0:
        return "-"
    low, high = p.ci
    return f"{_pct(p.value)}% ({_pct(low)}-{_pct(high)}), {p.successes}/{p.n}"


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    header = list(header)
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def _with(results: RunResults, attribute: str) -> list[RoundResults]:
    rounds = [r for r in results.rounds if getattr(r, attribute)]
    if not rounds:
        raise Missing(f"no round has `{attribute}` data")
    return rounds


def _figure(panels: int = 1) -> tuple[Figure, list[Any]]:
    """A figure of `panels` axes, two per row at most (four Table 8 cells in a row would be unreadable)."""
    columns, rows = min(panels, 2), math.ceil(panels / 2)
    figure = Figure(figsize=(5.0 * columns, 4.0 * rows), layout="constrained")
    FigureCanvasAgg(figure)  # Agg explicitly: no display, no global pyplot state
    return figure, [figure.add_subplot(rows, columns, i + 1) for i in range(panels)]


# --- sections ------------------------------------------------------------------------------------------------

def _win_rates(results: RunResults) -> Rendered:
    rounds = _with(results, "win_rates")
    judges = list(dict.fromkeys(j for r in rounds for j in r.win_rates))
    figure, axes = _figure(len(judges))
    for judge, ax in zip(judges, axes):
        plotted = False
        for r in rounds:
            rates = r.win_rates.get(judge, {})
            if not all(a in rates and rates[a].rate.n for a in ASPECTS):
                continue  # a point needs both aspects; the table below still lists it
            plotted = True
            (y, (y_low, y_high)), (x, (x_low, x_high)) = ((rates[a].rate.value, rates[a].rate.ci) for a in ASPECTS)
            ax.errorbar([x], [y], xerr=[[x - x_low], [x_high - x]], yerr=[[y - y_low], [y_high - y]], fmt="o",
                        capsize=3, label=r.name)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.axvline(0.5, color="grey", lw=0.8, ls=":")
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"judged by {judge}", xlabel="harmlessness win rate",
               ylabel="helpfulness win rate")
        if plotted:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.25, "no round with both aspects", ha="center", color="grey")
    rows = [(r.name, judge, aspect, f"{w.wins}/{w.ties}/{w.losses}" + (f" ({w.invalid} invalid)" if w.invalid else ""),
             _with_ci(w.rate), _pct(w.tie_share))
            for r in rounds for judge, by_aspect in r.win_rates.items() for aspect, w in by_aspect.items()]
    return Rendered([f"Against {results.baseline}; win rate = win / (win + loss), Wilson 95% interval; "
                     "ties reported apart.", "",
                     *_table(("round", "judge", "aspect", "win/tie/loss", "win rate % (95% CI)", "ties %"), rows)],
                    figure)


def _reward_curve(results: RunResults, attribute: str, x: str, xlabel: str) -> Rendered:
    """Mean over prompts of the max and the median reward, per round, against `x` (K or temperature)."""
    rounds = _with(results, attribute)
    figure, [ax] = _figure()
    rows = []
    for r in rounds:
        points = sorted(getattr(r, attribute), key=lambda p: p[x])
        xs = [p[x] for p in points]
        line, = ax.plot(xs, [p["max"] for p in points], marker="o", label=f"{r.name} max")
        ax.plot(xs, [p["median"] for p in points], marker="s", ls="--", color=line.get_color(),
                label=f"{r.name} median")
        rows += [(r.name, f"{p[x]:g}", f"{p['max']:.3f}", f"{p['median']:.3f}", f"{p['max'] - p['median']:.3f}")
                 for p in points]
    if x == "k":  # K doubles: a log axis, labelled with the K themselves
        ks = sorted({p[x] for r in rounds for p in getattr(r, attribute)})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel=xlabel, ylabel="reward R_c (mean over prompts)")
    ax.legend(fontsize="small")
    return Rendered(_table(("round", xlabel, "max", "median", "max - median"), rows), figure)


def _reward_vs_k(results: RunResults) -> Rendered:
    return _reward_curve(results, "reward_vs_k", "k", "K (samples per prompt)")


def _reward_vs_temperature(results: RunResults) -> Rendered:
    return _reward_curve(results, "reward_vs_temperature", "temperature", "temperature")


def _rm_accuracy(results: RunResults) -> Rendered:
    last = _with(results, "rm_accuracy")[-1]
    cells = list(last.rm_accuracy.items())
    figure, axes = _figure(len(cells))
    positions = range(len(COLUMN_TITLES))
    for ((rm, test), metrics), ax in zip(cells, axes):
        ours = [100 * (metrics["accuracy"][c] or 0.0) for c in (*COLUMNS, "avg")]
        paper = [PAPER_TABLE8[rm, test][c] for c in (*COLUMNS, "avg")]
        ax.bar([p - 0.2 for p in positions], ours, width=0.4, label="ours")
        ax.bar([p + 0.2 for p in positions], paper, width=0.4, label="paper")
        ax.set_xticks(list(positions), [t.replace(" ", "\n") for t in COLUMN_TITLES], fontsize="x-small")
        ax.set(ylim=(0, 100), ylabel="accuracy %", title=f"{rm} RM on {test} pairs")
        ax.legend(fontsize="small")
    lines = [f"{last.name}; our test sets are the run's held-out helpfulness / safety pairs.", "",
             table8_markdown(last.rm_accuracy)]
    if any("by_source" in metrics for metrics in last.rm_accuracy.values()):  # a run from the user's files
        lines += ["", "Held-out accuracy (%) on each source file's pairs, and the paper's Table 7 (other test sets: "
                  "a reference point, not a like-for-like comparison):", "", table7_markdown(last.rm_accuracy)]
    return Rendered(lines, figure)


def _gatt(results: RunResults) -> Rendered:
    last = _with(results, "gatt_adherence")[-1]
    figure, [ax] = _figure()
    for model, rows in last.gatt_adherence.items():
        ax.plot([a.turn for a in rows], [100 * a.rate for a in rows], marker="o", label=f"ours: {model}")
    turns = sorted(TABLE30)
    for column, (model, shade) in enumerate((("baseline", "darkgrey"), ("GAtt", "black"))):
        ax.plot(turns, [TABLE30[t][column] for t in turns], marker="x", ls=":", color=shade, label=f"paper: {model}")
    ax.set(xlabel="dialogue turn", ylabel="turns following the instruction %", ylim=(-5, 105))
    ax.legend(fontsize="small")
    return Rendered([f"{last.name}; share (%) of dialogues whose answer at that turn follows the system "
                     "instruction.", "", adherence_table(last.gatt_adherence)], figure)


def _ppo(results: RunResults) -> Rendered:
    rounds = _with(results, "ppo_iterations")
    figure, (reward_ax, kl_ax) = _figure(2)
    rows = []
    for r in rounds:
        its = r.ppo_iterations
        line, = reward_ax.plot([i["iteration"] for i in its], [i["r_combined"] for i in its], marker=".",
                               label=f"{r.name} batch R_c")
        if r.ppo_heldout:
            reward_ax.plot([h["iteration"] for h in r.ppo_heldout], [h["heldout_reward"] for h in r.ppo_heldout],
                           marker="s", ls="--", color=line.get_color(), label=f"{r.name} held-out R_c")
        kl_ax.plot([i["iteration"] for i in its], [i["kl"] for i in its], marker=".", label=r.name)
        best = max(r.ppo_heldout, key=lambda h: h["heldout_reward"], default=None)
        rows.append((r.name, len(its), f"{its[0]['r_combined']:.3f} -> {its[-1]['r_combined']:.3f}",
                     f"{its[-1]['kl']:.3f}",
                     f"{best['heldout_reward']:.3f} (iteration {best['iteration']})" if best else "-"))
    reward_ax.set(xlabel="PPO iteration", ylabel="R_c (mean)", title="reward")
    kl_ax.set(xlabel="PPO iteration", ylabel="KL to the starting policy (nats per answer)", title="KL")
    reward_ax.legend(fontsize="small")
    kl_ax.legend(fontsize="small")
    return Rendered(_table(("round", "iterations", "batch R_c first -> last", "last KL", "best held-out R_c"),
                           rows), figure)


def _safety(results: RunResults) -> Rendered:
    rounds = _with(results, "safety")
    lines = ["Violation: harmful content in an answer to an adversarial prompt (oracle); false refusal: a "
             "refused borderline prompt. Wilson 95% intervals.", "",
             *_table(("round", "violations % (95% CI)", "false refusals % (95% CI)",
                      "helpful prompts refused % (95% CI)"),
                     [(r.name, _with_ci(r.safety.violation), _with_ci(r.safety.false_refusal),
                       _with_ci(r.safety.helpful_refusal)) for r in rounds])]
    last = rounds[-1]
    for title, groups in (("risk category", last.safety.by_category),
                          ("attack vector", last.safety.by_attack_vector)):
        lines += ["", f"{last.name}, violations by {title}:", "",
                  *_table((title, "violations % (95% CI)"), [(g, _with_ci(p)) for g, p in groups.items()])]
    return Rendered(lines)


def _judge_trust(results: RunResults) -> Rendered:
    rounds = _with(results, "judge_trust")
    rows = [(r.name, judge, _with_ci(trust["agreement"]) if "agreement" in trust else "- (no oracle)",
             _with_ci(trust["consistency"]) if "consistency" in trust else "-")
            for r in rounds for judge, trust in r.judge_trust.items()]
    return Rendered(["Agreement: the judge prefers the answer the oracle prefers (a tie matches only a tie); "
                     "consistency: the LLM judge names the same answer with A and B swapped. Wilson 95% intervals.",
                     "", *_table(("round", "judge", "agrees with the oracle % (95% CI)",
                                  "position-swap consistency % (95% CI)"), rows)])


# name (the plot's file stem), title, builder
SECTIONS: tuple[tuple[str, str, Callable[[RunResults], Rendered]], ...] = (
    ("win_rate", "Helpfulness vs harmlessness win rate (Figure 11)", _win_rates),
    ("reward_vs_k", "Max and median reward against K (Figure 7)", _reward_vs_k),
    ("reward_vs_temperature", "Reward against temperature (Figure 8)", _reward_vs_temperature),
    ("rm_accuracy", "Reward model accuracy by rating (Table 8)", _rm_accuracy),
    ("gatt_adherence", "GAtt: instruction adherence per turn (Table 30)", _gatt),
    ("ppo", "PPO: reward and KL per iteration", _ppo),
    ("safety", "Safety: violations and false refusals", _safety),
    ("judge_trust", "How far the judges agree with the oracle", _judge_trust),
)


# --- TensorBoard ---------------------------------------------------------------------------------------------

def _tag(*parts: str) -> str:
    return "/".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", p) for p in parts)


def scalars(results: RunResults) -> list[Scalar]:
    """The report's numbers as TensorBoard scalars: per round (step = round) or along a curve (step = K,
    100 x temperature, turn, PPO iteration; the round is then in the tag)."""
    out: list[Scalar] = []

    def add(tag: str, step: float, value: float | None) -> None:
        if value is not None:
            out.append(Scalar(tag, int(step), float(value)))

    for r in results.rounds:
        rr = f"round_{r.round:02d}"
        for judge, by_aspect in r.win_rates.items():
            for aspect, w in by_aspect.items():
                add(_tag("win_rate", judge, aspect), r.round, w.rate.value)
        for p in r.reward_vs_k:
            add(_tag("reward_vs_k", rr, "max"), p["k"], p["max"])
            add(_tag("reward_vs_k", rr, "median"), p["k"], p["median"])
        for p in r.reward_vs_temperature:  # steps are integers: temperature in hundredths
            add(_tag("reward_vs_temperature_x100", rr, "max"), round(100 * p["temperature"]), p["max"])
            add(_tag("reward_vs_temperature_x100", rr, "median"), round(100 * p["temperature"]), p["median"])
        for (rm, test), metrics in r.rm_accuracy.items():
            for column in (*COLUMNS, "avg"):
                add(_tag("rm_accuracy", f"{rm}_rm", f"{test}_pairs", column), r.round, metrics["accuracy"][column])
        for model, rows in r.gatt_adherence.items():
            for a in rows:
                add(_tag("gatt_adherence", rr, model), a.turn, a.rate)
        for row in r.ppo_iterations:
            for key in ("r_combined", "kl"):
                add(_tag("ppo", rr, key), row["iteration"], row.get(key))
        for row in r.ppo_heldout:
            add(_tag("ppo", rr, "heldout_reward"), row["iteration"], row["heldout_reward"])
        if r.safety:
            add("safety/violation", r.round, r.safety.violation.value)
            add("safety/false_refusal", r.round, r.safety.false_refusal.value)
            add("safety/helpful_refusal", r.round, r.safety.helpful_refusal.value)
            for prefix, groups in (("category", r.safety.by_category), ("attack_vector", r.safety.by_attack_vector)):
                for group, p in groups.items():
                    add(_tag("safety", f"violation_by_{prefix}", group), r.round, p.value)
    return out


def write_tensorboard(directory: str | Path, values: Iterable[Scalar]) -> Path:
    """One TensorBoard event file with these scalars, written atomically (the record writer takes any file)."""
    path = Path(directory) / EVENTS
    now = time.time()

    def write(file) -> None:
        records = RecordWriter(file)
        records.write(Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
        for s in values:
            summary = Summary(value=[Summary.Value(tag=s.tag, simple_value=s.value)])
            records.write(Event(wall_time=now, step=s.step, summary=summary).SerializeToString())

    _write_atomic(path, write)
    return path


# --- the report ----------------------------------------------------------------------------------------------

def _write_png(figure: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    _write_atomic(path, lambda file: file.write(buffer.getvalue()))


def render_report(run_dir: str | Path, results: RunResults) -> Path:
    """Write report.md, its plots and the TensorBoard events under `run_dir`; returns the report's path."""
    run_dir = Path(run_dir)
    lines = [f"# Run report: {results.name}", "",
             f"{len(results.rounds)} round(s): " + ", ".join(r.name for r in results.rounds) + "."]
    for name, title, build in SECTIONS:
        lines += ["", f"## {title}", ""]
        plot = run_dir / PLOTS / f"{name}.png"
        try:
            rendered = build(results)
        except Missing as missing:
            plot.unlink(missing_ok=True)  # a plot left by an earlier render would show stale data
            lines.append(f"_Skipped: {missing}._")
            continue
        if rendered.figure is not None:
            _write_png(rendered.figure, plot)
            lines += [f"![{title}]({PLOTS}/{plot.name})", ""]
        lines += rendered.markdown
    write_tensorboard(run_dir / TENSORBOARD, scalars(results))
    path = run_dir / REPORT
    text = "\n".join(lines) + "\n"
    _write_atomic(path, lambda file: file.write(text.encode()))
    return path

