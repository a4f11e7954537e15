"""Model families with their own modules (imported lazily): those whose weights no native transformers class
matches (LLaDA2), and those that do not fit DiffusionPolicy's causal-LM mould (DiffusionGemma)."""
