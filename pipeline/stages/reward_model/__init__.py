"""Reward models: `algorithm` (data mixes, held-out split, the margin ranking loss's training and Table 8's
accuracy, no Ray) and `stage` (a round's helpfulness and safety RMs on the trainer pool, cached)."""
