"""diffrl: rewards."""
