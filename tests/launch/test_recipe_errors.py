"""Bad recipes fail before anything starts, with one line naming the file, the key path and what to change."""
from __future__ import annotations

import textwrap

import pytest

from launch.recipe import RecipeError, load_recipe

BASE = """\
name: t
model: {tiny: qwen3-block}
algorithm: tracerl
reward: [{fn: math}]
data: {task: arithmetic}
rollout: {max_tokens: 16}
"""
TRACERL_NAMES = ("diffu_grpo, gdpo, cj_grpo, tracerl, coupled_grpo, wd1, spg, random_mask_grpo, espo, bgpo, ebpo, "
                 "vrpo, dtrpo, justgrpo, igpo, agrpo, mdpo, dtreerpo")


def _write(tmp_path, text: str, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _error(path, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# (overrides applied to BASE, expected message after "<file>: ")
BAD = {
    "misspelt key": (["rollout.blok_size=8"], "rollout.blok_size: unknown key (did you mean 'block_size'?)"),
    "misspelt section": (["rolout.block_size=8"], "rolout: unknown key (did you mean 'rollout'?)"),
    "misspelt algorithm": (["algorithm.name=tracrl"],
                           f"algorithm.name: 'tracrl' is not one of {TRACERL_NAMES} (did you mean 'tracerl'?)"),
    "misspelt choice": (["rollout.remasking=low_confidence_dynamc"],
                        ("rollout.remasking: 'low_confidence_dynamc' is not one of sequential, low_confidence_static, "
                        "low_confidence_dynamic, entropy_bounded, random, topk_margin, entropy, origin, "
                        "threshold_schedule, left_to_right, rcr (did you mean 'low_confidence_dynamic'?)")),
    "other algorithm's key": (["algorithm=gdpo", "algorithm.value_model={}", "model.tiny=llada"],
                              "algorithm.value_model: unknown key for gdpo (used by tracerl)"),
    "wrong type": (["learner.lr=abc"],
                   "learner.lr: input should be a valid number, unable to parse string as a number (got 'abc')"),
    "section not a mapping": (["rollout=5"], "rollout: expected a mapping, got 5"),
    "max_tokens vs block": (["rollout.max_tokens=18"],
                            "rollout.max_tokens: 18 is not a multiple of rollout.block_size 4"),
    "steps_per_block > block": (["rollout.steps_per_block=8"],
                                "rollout.steps_per_block: 8 > block size 4 (a step unmasks >= 1 token)"),
    "top_p above 1": (["rollout.top_p=1.5"], "rollout.top_p: must be <= 1.0, got 1.5"),
    "top_p zero": (["rollout.top_p=0"], "rollout.top_p: must be > 0.0, got 0"),
    "zero 3 on torch": (["learner.zero_stage=3"], "learner.zero_stage: ZeRO stage 3 needs learner.backend: deepspeed"),
    "eoser on block model": (["rollout.eoser={}"], ("rollout.eoser: EOS early rejection needs a full-attention "
                                                   "model, not a block-causal 'block' one")),
    "ass on block model": (["rollout.ass=true"], ("rollout.ass: the ASS schedule needs a full-attention model, "
                                                 "not a block-causal 'block' one")),
    "group of one": (["rollout.samples_per_prompt=1"],
                     "rollout.samples_per_prompt: 1 < 2: tracerl's group-relative advantage needs a group"),
    "gdpo token-level": (["algorithm=gdpo", "estimator=one_step", "model.tiny=llada"],
                         ("estimator.name: gdpo needs a sequence-level ELBO: one of sdmc, mc_elbo, block_elbo, canvas_trace, "
                         "not 'one_step'")),
    "tracerl without trajectory": (["estimator=sdmc"], ("estimator.name: tracerl needs the recorded decoding "
                                                       "trajectory: one of trajectory, canvas_trace, not 'sdmc'")),
    "two torch learners": (["learner.num_workers=2"],
                           "learner.num_workers: 2 learners need learner.backend: deepspeed (torch is one process)"),
    "dynamic threshold": (["rollout.remasking=low_confidence_dynamic", "rollout.threshold=1.5"],
                          "rollout.threshold: 1.5 outside (0, 1] (a confidence, for low_confidence_dynamic)"),
    "async staleness": (["trainer.mode=async", "trainer.max_staleness=0"],
                        "trainer.max_staleness: 0 < 1 in async mode (use trainer.mode: sync for on-policy)"),
    "prompts split": (["rollout.num_workers=2", "data.num_prompts_per_step=5"],
                      "data.num_prompts_per_step: 5 is not divisible by 2 rollout workers"),
    "block cache full attention": (["model.tiny=llada", "rollout.cache=block"], ("rollout.cache: the exact 'block' "
                                   "cache needs block-causal attention; a llada model uses prefix or dual")),
    "section set to null": (["model=null"], "model: expected a mapping, got None"),
    "path and tiny": (["model={path: /x, tiny: sdar}"],  # one layer setting both (model.path=/x alone replaces tiny)
                      "model.path: set exactly one of model.path (a checkpoint directory) and model.tiny (a "
                      "model.path set in a child recipe or on the command line replaces an inherited model.tiny)"),
    "tiny kind contradiction": (["model.kind=llada"],
                                "model.kind: 'llada' contradicts model.tiny 'qwen3-block' ('block')"),
    "block mismatch": (["model.block_size=4", "rollout.block_size=8"], ("rollout.block_size: 8 != model.block_size 4 "
                       "(a block-causal model decodes with the block it was trained with)")),
    "reference model off": (["algorithm=diffu_grpo", "learner.reference_model=false"],
                            ("learner.reference_model: false, but algorithm.beta 0.04 > 0 with kl_reference 'ref' "
                            "needs it (or set algorithm.kl_reference: old)")),
    "offload without reference": (["learner.offload_reference=true"],
                                  "learner.offload_reference: true, but the run has no reference"),
    "greedy groups": (["rollout.temperature=0"],
                      "rollout.temperature: 0 makes every sample of a group identical (zero advantage); use > 0"),
    "steps twice": (["rollout.steps=4", "rollout.steps_per_block=1"],
                    "rollout.steps: set either rollout.steps (total) or rollout.steps_per_block, not both"),
    "steps over blocks": (["rollout.steps=6"], "rollout.steps: 6 is not divisible by the number of blocks 4"),
    "bad reward fn": (["reward.0.fn=not valid"],
                      "reward.0.fn: 'not valid' is not a registered name, 'module.path:func' or 'file.py:func'"),
    "bad data file": (["data.task=null", "data.train=/d/x.csv"],
                      "data.train: '/d/x.csv' is not a .jsonl, .json, .parquet file"),
    "no data": (["data.task=null"],
                "data.train: set exactly one of data.train (a file) and data.task (a generated toy task)"),
    "eval without data": (["data.task=null", "data.train=x.jsonl", "trainer.eval_every=5"],
                          "trainer.eval_every: no evaluation data (set data.eval)"),
    "filter bounds": (["algorithm.filter.accuracy_lo=0.9"],
                      "algorithm.filter.accuracy_lo: 0.9 > algorithm.filter.accuracy_hi 0.8"),
    "estimator t range": (["algorithm=diffu_grpo", "estimator=coupled", "estimator.t_min=0.9"],
                          "estimator.t_min: 0.9 >= estimator.t_max 0.8"),
    "behaviour log-probs without trajectories": (["algorithm=gdpo", "trainer.off_policy=behaviour"], (
        "trainer.off_policy: 'behaviour' needs estimator 'trajectory' (the rollout records trajectory log-probs), "
        "not 'sdmc'")),
    "remote ray with local knobs": (["ray.address=auto", "ray.num_cpus=4"],
                                    "ray.num_cpus: only for a local cluster, but ray.address is set"),
    # renamed and merged settings: one line naming the key and what replaced it
    "merged rollout workers": (["resources.rollout_workers=2"], ("resources.rollout_workers: merged into "
                               "rollout.num_workers (one setting; remove this key)")),
    "merged learner workers": (["resources.learner_workers=1"], ("resources.learner_workers: merged into "
                               "learner.num_workers (one setting; remove this key)")),
    "merged checkpointing": (["learner.activation_checkpointing=true"], ("learner.activation_checkpointing: merged "
                             "into model.gradient_checkpointing (one setting, any backend)")),
    "renamed kv cache": (["rollout.cache=kv"], ("rollout.cache: 'kv' is now called 'block' (the exact KV cache of "
                         "block-causal models)")),
    "zero stage 0": (["learner.zero_stage=0"], ("learner.zero_stage: 0 no longer means 'unset': leave the key out "
                     "(backend deepspeed defaults to 2)")),
    "sglang seam": (["rollout.engine=sglang"], ("rollout.engine: there is no SGLang engine: its diffusion path "
                    "returns no log-probs and no step map (README, 'SGLang'); use torch")),
    "ass with blocks": (["model.tiny=llada", "rollout.ass=true", "rollout.block_size=8"], ("rollout.block_size: 8, "
                        "but ASS decodes the whole response as one block (set it to rollout.max_tokens 16)")),
    "eoser ass schedule without ass": (["model.tiny=llada", "rollout.eoser.schedule=ass"],
                                       ("rollout.eoser.schedule: 'ass' follows the ASS step schedule; set "
                                       "rollout.ass: true or use 'linear'")),
    "eoser with dream's entropy": (["model.tiny=dream", "rollout.eoser={}", "rollout.remasking=entropy"],
                                   ("rollout.eoser: EOSER rescales confidence, which 'entropy' remasking does not "
                                    "rank by")),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_one_line(tmp_path, case):
    overrides, expected = BAD[case]
    path = _write(tmp_path, BASE)
    assert _error(path, overrides) == f"{path}: {expected}"


def test_base_is_valid(tmp_path):
    recipe = load_recipe(_write(tmp_path, BASE))
    assert (recipe.algorithm.name, recipe.estimator.name, recipe.rollout.block_size) == ("tracerl", "trajectory", 4)


def test_several_errors_reported_as_first_and_count(tmp_path):
    path = _write(tmp_path, BASE + "learner: {lr: -1, mu: 0, betas: [0.9]}\n")
    assert _error(path) == f"{path}: learner.lr: must be > 0.0, got -1 (and 2 more)"


def test_unknown_key_in_file(tmp_path):
    path = _write(tmp_path, BASE + "trainer: {total_step: 3}\n")
    assert _error(path) == f"{path}: trainer.total_step: unknown key (did you mean 'total_steps'?)"


def test_missing_required_section(tmp_path):
    path = _write(tmp_path, "name: t\nmodel: {tiny: llada}\nalgorithm: gdpo\ndata: {task: sudoku}\n")
    assert _error(path) == f"{path}: reward: required key missing"


def test_missing_algorithm_name(tmp_path):
    path = _write(tmp_path, BASE.replace("algorithm: tracerl", "algorithm: {beta: 0.1}"))
    assert _error(path) == f"{path}: algorithm.name: required key missing (one of {TRACERL_NAMES})"


def test_error_in_base_file_names_the_base(tmp_path):
    base = _write(tmp_path, BASE.replace("{max_tokens: 16}", "{max_tokens: 16, temprature: 1.0}"), "base.yaml")
    child = _write(tmp_path, "extends: base.yaml\nname: child\n", "child.yaml")
    assert _error(child) == f"{base}: rollout.temprature: unknown key (did you mean 'temperature'?)"


def test_renamed_setting_in_base_file_names_the_base(tmp_path):
    base = _write(tmp_path, BASE.replace("{max_tokens: 16}", "{max_tokens: 16, cache: kv}"), "base.yaml")
    child = _write(tmp_path, "extends: base.yaml\nname: child\n", "child.yaml")
    assert _error(child) == f"{base}: rollout.cache: 'kv' is now called 'block' (the exact KV cache of block-causal models)"


@pytest.mark.parametrize("text, expected", [
    ("a: [1, 2\n", "invalid YAML (line 2, column 1): expected ',' or ']', but got '<stream end>'"),
    ("a: 1\na: 2\n", "invalid YAML: duplicate key 'a' (line 2)"),
    ("- 1\n- 2\n", "a recipe must be a mapping of sections, got list"),
    ("extends: 3\n", "extends: expected a file name, got 3"),
])
def test_bad_yaml_files(tmp_path, text, expected):
    path = _write(tmp_path, text)
    assert _error(path) == f"{path}: {expected}"


def test_missing_file_and_missing_parent(tmp_path):
    assert _error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: no such recipe file"
    child = _write(tmp_path, "extends: gone.yaml\n")
    assert _error(child) == f"{tmp_path / 'gone.yaml'}: no such recipe file"


def test_extends_cycle(tmp_path):
    a = _write(tmp_path, "extends: b.yaml\n", "a.yaml")
    _write(tmp_path, "extends: a.yaml\n", "b.yaml")
    message = _error(a)
    assert message.startswith(f"{a}: extends cycle: {a} -> {tmp_path / 'b.yaml'} -> ")


@pytest.mark.parametrize("override, expected", [
    ("rollout.block_size", "override 'rollout.block_size': expected dotted.key=value"),
    ("rollout..x=1", "override 'rollout..x=1': expected dotted.key=value"),
    ("reward.3.weight=2", "override 'reward.3.weight=2': index 3 out of range (list has 1 items)"),
    ("rollout.top_k=[1", ("override 'rollout.top_k=[1': invalid YAML (line 1, column 3): "
                         "expected ',' or ']', but got '<stream end>'")),
])
def test_malformed_overrides(tmp_path, override, expected):
    assert _error(_write(tmp_path, BASE), [override]) == expected
