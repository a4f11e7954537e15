"""diffrl: rl."""
