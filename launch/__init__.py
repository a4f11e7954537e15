"""diffrl: launch."""
