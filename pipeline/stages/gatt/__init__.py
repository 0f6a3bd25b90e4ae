"""Ghost Attention: `algorithm` (dialogues, instruction placement, training rows, adherence tables: no Ray or
vLLM), `sources` (the world's instructions checked by the oracle, or the user's files judged by the LLM judge) and
`stage` (adherence before and after, training data and fine-tuning, cached)."""
