"""diffrl: rollout/models."""
