"""Safety context distillation: `algorithm` (preprompts, candidate answers and which are kept: no Ray, vLLM or
torch) and `stage` (answers with and without the preprompt on the pools, fine-tuning on the kept ones, cached)."""
