"""diffrl: rollout."""
