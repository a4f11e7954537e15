"""Every shipped recipe validates and says what its comments say."""
from __future__ import annotations

from pathlib import Path

import pytest

from launch.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# Every shipped recipe, by name: one added or removed without this list changing fails the test below.
EXPECTED = {
    "agrpo-llada-gsm8k.yaml", "cj-grpo-llada-eoser-ass.yaml", "coupled-grpo-dream-code.yaml",
    "diffu-grpo-llada-gsm8k.yaml", "dtreerpo-llada-gsm8k.yaml", "dtrpo-sdar.yaml", "espo-llada-gsm8k.yaml",
    "gdpo-llada-gauss3.yaml", "igpo-llada-math.yaml", "justgrpo-llada-gsm8k.yaml", "mdpo-llada-math.yaml",
    "tiny-agrpo.yaml", "tiny-base.yaml", "tiny-bgpo.yaml", "tiny-demo.yaml", "tiny-diffu-grpo.yaml",
    "tiny-dtreerpo.yaml", "tiny-dtrpo.yaml", "tiny-ebpo.yaml", "tiny-espo.yaml", "tiny-gdpo.yaml", "tiny-igpo.yaml",
    "tiny-justgrpo.yaml", "tiny-mdpo.yaml", "tiny-tracerl-diffusion-gemma.yaml", "tiny-tracerl-llada2.yaml",
    "tiny-tracerl-sdar-moe.yaml", "tiny-tracerl.yaml", "tiny-vrpo.yaml", "tracerl-diffusion-gemma.yaml",
    "tracerl-llada2.yaml", "tracerl-sdar-moe.yaml", "tracerl-sdar.yaml", "tracerl-trado-math-value.yaml",
    "tracerl-trado-math.yaml", "vrpo-llada.yaml", "tiny-tracerl-countdown.yaml",
    "tiny-tracerl-countdown-steps.yaml",
}


def test_the_expected_recipes_exist():
    assert EXPECTED == {p.name for p in RECIPES.glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipe_validates(name):
    recipe = load_recipe(RECIPES / name)
    assert recipe.name == Path(name).stem or name == "tiny-base.yaml"


def test_trado_recipe_has_the_published_setup():
    r = load_recipe(RECIPES / "tracerl-trado-math.yaml")
    assert (r.model.kind, r.rollout.block_size, r.rollout.steps_per_block) == ("sdar", 4, 4)
    assert (r.rollout.remasking, r.rollout.threshold, r.rollout.temperature) == ("low_confidence_dynamic", 0.9, 1.0)
    assert (r.data.num_prompts_per_step, r.rollout.samples_per_prompt, r.rollout.max_tokens) == (64, 16, 2000)
    assert (r.learner.lr, r.learner.grad_accum, r.trainer.total_steps) == (1e-6, 32, 80)
    assert (r.algorithm.name, r.algorithm.clip_eps_low, r.algorithm.beta, r.estimator.name) == \
        ("tracerl", 0.2, 0.01, "trajectory")
    assert r.algorithm.value_model is None
    value = load_recipe(RECIPES / "tracerl-trado-math-value.yaml")
    assert (value.algorithm.value_model.lr, value.algorithm.value_model.clip) == (5e-6, 0.2)
    assert value.model_copy(update={"name": r.name, "output_dir": r.output_dir, "algorithm": r.algorithm}) == r


def test_llada_recipes_have_the_published_setup():
    d1 = load_recipe(RECIPES / "diffu-grpo-llada-gsm8k.yaml")
    assert (d1.learner.lr, d1.learner.betas, d1.learner.weight_decay, d1.learner.grad_clip, d1.learner.mu) == \
        (3e-6, (0.9, 0.99), 0.1, 0.2, 12)
    assert (d1.rollout.samples_per_prompt, d1.rollout.max_tokens, d1.rollout.block_size, d1.rollout.steps,
            d1.rollout.temperature) == (6, 256, 32, 128, 0.9)
    assert (d1.model.lora.r, d1.model.lora.alpha, d1.estimator.name) == (128, 64, "one_step")
    gdpo = load_recipe(RECIPES / "gdpo-llada-gauss3.yaml")
    assert (gdpo.learner.lr, gdpo.algorithm.beta, gdpo.estimator.quadrature, gdpo.learner.reference_model) == \
        (3e-7, 0.0, "gauss-3", False)
    cj = load_recipe(RECIPES / "cj-grpo-llada-eoser-ass.yaml")
    assert (cj.rollout.ass, cj.rollout.eoser.gamma_min, cj.rollout.eoser.schedule, cj.rollout.steps) == \
        (True, 0.01, "ass", None)
    assert (cj.algorithm.name, cj.estimator.name) == ("cj_grpo", "trajectory")


def test_coupled_and_tiny_recipes():
    coupled = load_recipe(RECIPES / "coupled-grpo-dream-code.yaml")
    assert (coupled.algorithm.beta, coupled.rollout.samples_per_prompt, coupled.learner.mu, coupled.learner.lr) == \
        (0.01, 10, 2, 1e-6)
    assert (coupled.estimator.t_min, coupled.estimator.t_max, coupled.reward[0].fn) == (0.2, 0.8, "code")
    for name, algorithm in [("tiny-tracerl", "tracerl"), ("tiny-diffu-grpo", "diffu_grpo"), ("tiny-gdpo", "gdpo")]:
        tiny = load_recipe(RECIPES / f"{name}.yaml")
        assert tiny.algorithm.name == algorithm and tiny.model.tiny is not None
        assert tiny.resources.gpus_per_worker == 0 and tiny.trainer.total_steps <= 3
        assert tiny.data.task == "arithmetic"


# The worked-answer recipe: 2 samples x 64 prompts at temperature 1, RL on 10,000 training problems (the SFT's 5,000
# and 5,000 it never saw; the same 600 held-out items) (BENCHMARKS.md, issue 19).
PAIRS = {"rollout": {"samples_per_prompt": 2, "temperature": 1.0},
         "data": {"num_prompts_per_step": 64,
                  "task_kwargs": {"num_train": 10000, "num_test": 600, "reject_shortcuts": ["sum", "product"],
                                  "answer_format": "steps"}}}


@pytest.mark.parametrize("recipe,task,shape", [("tiny-tracerl-countdown.yaml", "countdown", {}),
                                               ("tiny-tracerl-countdown-steps.yaml", "countdown_steps", PAIRS)])
def test_countdown_recipe_is_the_benchmark_setting(tmp_path, recipe, task, shape):
    """recipes/tiny-tracerl-countdown(-steps).yaml say they are what benchmarks/learning.py measured (BENCHMARKS.md,
    issue 19): every section that decides the learning figure equals the benchmark's own recipe at lr 3e-5 and
    T = 0.7 (worked answers: the countdown_steps setup in groups of 2 x 64 prompts at T = 1 on 10,000 problems)."""
    from benchmarks.learning import build_recipe

    shipped = load_recipe(RECIPES / recipe)
    bench = build_recipe("tracerl", task, tmp_path / "sft", tmp_path / "out", seed=0,
                         overrides={"learner": {"lr": 3e-5},
                                    "rollout": {"temperature": 0.7, **shape.get("rollout", {})},
                                    **{k: v for k, v in shape.items() if k != "rollout"}})
    for section in ("rollout", "algorithm", "estimator", "reward", "data", "learner"):
        assert getattr(shipped, section) == getattr(bench, section), section
    assert (shipped.model.kind, shipped.model.block_size, shipped.model.dtype) == ("block", 4, "float32")
    assert (shipped.trainer.budget.minutes, shipped.trainer.budget.clock) == (20, "cpu")
