"""Preference pairs for an offline run (trainer.mode: offline): a jsonl file of text pairs (VRPO) or a run's
trajectory store (dTRPO), as rl.preference_pairs.PreferencePair records.

jsonl: one JSON object a line with the prompt, the chosen and the rejected response (field names from the data
section: prompt_field, chosen_field, rejected_field). The prompt is encoded as RL prompts are (chat template or raw,
launch/data.encode_prompt); each response is its text's tokens followed by the tokenizer's EOS (the response ends
there, as a finished generation would). Text pairs have no decoding trajectory: their step maps are all zero, so
they suit the ELBO estimators, not dTRPO's (which re-masks the recorded order). Any bad row fails the run before
it starts, with one line naming the file, the row and the field.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from launch.data import DataError, encode_prompt
from rl.preference_pairs import PreferencePair, pairs_from_store
from rollout.trajectory import Trajectory

__all__ = ["load_preference_file", "offline_pairs", "store_root"]


def _text(row: dict, field: str, where: str) -> str:
    if field not in row:
        raise DataError(f"{where}: field '{field}' missing")
    value = row[field]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field '{field}' must be a non-empty string, got {type(value).__name__}")
    return value


def _response(tokenizer, text: str, eos: int, where: str) -> torch.Tensor:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise DataError(f"{where}: encodes to no tokens")
    return torch.tensor(ids + [eos], dtype=torch.long)


def _trajectory(prompt: torch.Tensor, response: torch.Tensor, block_size: int, request_id: str) -> Trajectory:
    n = response.numel()
    return Trajectory(prompt_ids=prompt, response_ids=response, step_map=torch.zeros(n, dtype=torch.long),
                      logprobs=torch.zeros(n), confidence=torch.zeros(n), valid_length=n, nfe=0,
                      finish_reason="eos", block_size=block_size, request_id=request_id)


def load_preference_file(path: str | Path, tokenizer, *, block_size: int, chat_template: bool = True,
                         prompt_field: str = "prompt", chosen_field: str = "chosen",
                         rejected_field: str = "rejected", max_prompt_tokens: int | None = None) -> list[PreferencePair]:
    """Every row of the jsonl file at `path` as a pair (module doc); a bad row is a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.preferences: {path}: no such file")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"data.preferences: {path}: the tokenizer has no EOS token to end responses with")
    pairs = []
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            where = f"{path}: row {line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 (byte {err.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: a JSON object with '{prompt_field}', '{chosen_field}', "
                                f"'{rejected_field}' expected, got {type(row).__name__}")
            prompt_text = _text(row, prompt_field, where)
            chosen, rejected = _text(row, chosen_field, where), _text(row, rejected_field, where)
            if chosen == rejected:
                raise DataError(f"{where}: field '{rejected_field}' equals '{chosen_field}': no preference")
            prompt = torch.tensor(encode_prompt(tokenizer, prompt_text, chat_template=chat_template), dtype=torch.long)
            if max_prompt_tokens is not None and prompt.numel() > max_prompt_tokens:
                raise DataError(f"{where}: field '{prompt_field}' is {prompt.numel()} tokens > data.max_prompt_tokens "
                                f"{max_prompt_tokens}")
            key = f"pref{line_no}"
            pairs.append(PreferencePair(
                _trajectory(prompt, _response(tokenizer, chosen, eos, f"{where}: field '{chosen_field}'"),
                            block_size, f"{key}-chosen"),
                _trajectory(prompt, _response(tokenizer, rejected, eos, f"{where}: field '{rejected_field}'"),
                            block_size, f"{key}-rejected"),
                key=key))
    if not pairs:
        raise DataError(f"data.preferences: {path}: no rows")
    return pairs


def store_root(path: str | Path) -> Path:
    """data.trajectories names a run directory (its store/ is read) or a store directory itself."""
    path = Path(path)
    if (path / "store").is_dir():
        return path / "store"
    if path.is_dir():
        return path
    raise DataError(f"data.trajectories: {path}: no such run or store directory")


def offline_pairs(data, tokenizer, *, block_size: int, min_margin: float = 0.0) -> list[PreferencePair]:
    """The pairs an offline run trains on, from the recipe's data section."""
    if data.preferences is not None:
        return load_preference_file(data.preferences, tokenizer, block_size=block_size,
                                    chat_template=data.chat_template, prompt_field=data.prompt_field,
                                    chosen_field=data.chosen_field, rejected_field=data.rejected_field,
                                    max_prompt_tokens=data.max_prompt_tokens)
    if data.trajectories is None:
        raise DataError("data.preferences: trainer.mode offline needs data.preferences or data.trajectories")
    return pairs_from_store(store_root(data.trajectories), block_size=block_size, min_margin=min_margin)
