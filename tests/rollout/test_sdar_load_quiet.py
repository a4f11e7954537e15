"""An SDAR/TraDo checkpoint loads without transformers' "a model of type sdar to instantiate a model of type ..."
warning (its tokenizer is given a Qwen3Config instead of parsing config.json), and the tokenizer is unchanged."""
from __future__ import annotations

import logging

from rollout.models.loading import load_policy
from rollout.models.tiny import make_tiny_policy


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_sdar_checkpoint_loads_without_the_model_type_warning(tmp_path):
    from transformers import AutoTokenizer

    make_tiny_policy("sdar", tmp_path, vocab="small", seed=0)
    collect = _Collect()
    logger = logging.getLogger("transformers")
    level = logger.level  # the suite's tiny-model fixture quiets transformers to ERROR: hear its warnings here
    logger.setLevel(logging.WARNING)
    logger.addHandler(collect)
    try:
        policy = load_policy(tmp_path)
        ours = [m for m in collect.messages if "to instantiate a model of type" in m]
        collect.messages.clear()
        plain = AutoTokenizer.from_pretrained(str(tmp_path))  # what it did before: parses config.json itself
        theirs = [m for m in collect.messages if "to instantiate a model of type" in m]
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
    assert theirs and not ours  # the warning exists, and our load does not trigger it
    text = "12+30=42 <|MASK|>"
    assert policy.tokenizer(text)["input_ids"] == plain(text)["input_ids"]
    assert type(policy.tokenizer) is type(plain)
