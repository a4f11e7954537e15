"""Model families diffrl runs with its own modelling code (no native transformers class matches their weights)."""
