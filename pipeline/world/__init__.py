"""The embedded synthetic world (docs/design.md, "The embedded world"): checkable helpful tasks, unsafe requests
in every (risk category x attack vector) cell, borderline requests, multi-turn dialogues with system instructions,
an oracle that scores any response, a noisy simulated annotator, and the tables built from them.

    world = World(WorldConfig(seed=0))
    prompts_table(world, "train"); prompts_table(world, "eval")      # held out by task parameters
    demonstrations_table(world); preferences_table(world, 1); corpus_table(world)
    judge(row["category"], row["meta"], response_text)               # -> Verdict
"""

from pipeline.world.annotator import Annotation, annotate, rating_for_gap
from pipeline.world.config import AnnotatorConfig, WorldConfig, table26_sizes
from pipeline.world.corpus import Document, corpus, render
from pipeline.world.oracle import Verdict, judge, judge_dialogue
from pipeline.world.preferences import Comparison, compare, preference_batch
from pipeline.world.responses import QUALITIES, respond
from pipeline.world.sft import Demonstration, demonstrations
from pipeline.world.tables import (build_tables, comparison_rows, corpus_table, demonstrations_table,
                                   preferences_table, prompts_table, write_tables)
from pipeline.world.world import SPLITS, Prompt, World

__all__ = [
    "QUALITIES", "SPLITS", "Annotation", "AnnotatorConfig", "Comparison", "Demonstration", "Document",
    "Prompt", "Verdict", "World", "WorldConfig", "annotate", "build_tables", "compare", "comparison_rows", "corpus",
    "corpus_table", "demonstrations", "demonstrations_table", "judge", "judge_dialogue", "preference_batch",
    "preferences_table", "prompts_table", "rating_for_gap", "render", "respond", "table26_sizes", "write_tables",
]
