"""diffrl: rewards. Verifiable math, sandboxed code and custom reward functions, scored in batches.

Importing this package imports nothing heavy (no Ray, no sympy); import the module you need:

    rewards.specs      validate_reward_specs(specs, sample_row, base_dir=None) -> [RewardSpec]   (start-up check)
    rewards.scorer     Scorer(specs, base_dir=None, sample_row=None).score(items) -> [result]; .stats()
    rewards.service    RewardService(specs, num_workers=2, ...).score(items) -> [result]; .stats(); .shutdown()
    rewards.registry   register_reward(name, fn, batch=None), @reward(batch=...), registered_names()
    rewards.math_reward / rewards.code_reward   score_batch(prompts, responses, references, **kwargs)
    rewards.answer_policy  screen_answer(answer, gold): what counts as one final math answer (pure)
    rewards.sandbox    run_function_tests(...), run_stdio(...), detect_isolation()
    rewards.result     RewardConfigError, reason_category(reason)

An item is {"prompt": str, "response": str, "reference": Any, ...} (the driver adds the data row's other columns,
`row` and `response_len`; a reward gets those it names as parameters); a result is
{"score": float, "reason": str, "metrics": {str: float}, "reasons": {component: str}}.
"""
