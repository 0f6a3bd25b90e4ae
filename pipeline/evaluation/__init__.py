"""Evaluation helpers with no Ray, model or I/O: win rates with confidence intervals (`winrate`), the pairwise
LLM-as-a-judge prompt and its parsing (`judge`), and safety violation / false-refusal rates (`safety_metrics`).
The driver feeds them scores, judge outputs and oracle verdicts; `pipeline.output.report` renders what they return."""
