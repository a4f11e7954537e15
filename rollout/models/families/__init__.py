"""Model families that do not fit DiffusionPolicy's causal-LM mould (each its own modules; imported lazily)."""
