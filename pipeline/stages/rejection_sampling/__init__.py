"""Rejection sampling: `algorithm` (best of K, merged with earlier rounds' best, on scored tables: no Ray, vLLM or
torch) and `stage` (sampling and scoring on the pools, the kept set, fine-tuning every size on it, cached)."""
