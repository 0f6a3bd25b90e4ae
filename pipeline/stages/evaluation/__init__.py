"""The evaluation stages: `oracle_eval` (held-out answers scored by the world's oracle), `win_rates` (against the SFT
model, by the reward models and the oracle, and safety metrics), `llm_judge` (the same comparison by an LLM judge) and
`round_evaluation` (a round's last phase, all of them). Their pure metrics are pipeline/evaluation/."""
