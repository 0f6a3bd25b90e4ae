"""Supervised fine-tuning: `algorithm` (demonstrations to packed rows, the training loop on every rank: no Ray) and
`stage` (the SFT stage of every size, and the one fine-tuning step every later stage trains with, cached)."""
