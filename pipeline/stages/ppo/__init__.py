"""PPO: `algorithm` (the config, and one update on every trainer rank: rollout tensors, KL-shaped rewards, advantages,
the policy and critic steps, the ranks' saves; no pools or run store) and `stage` (the iterations on the pools,
early stopping on held-out reward, the round's `ppo` stage, cached)."""
