"""P3T of benchmarks/decoding.py: block diffusion vs autoregressive decoding on trained toy models (see that
file's docstring; run it as `python benchmarks/decoding.py --only P3T`)."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from rl.atomic_io import atomic_output
from rollout.engine import TorchEngine
from rollout.models.loading import load_policy
from rollout.models.tiny import make_tiny_policy
from rollout.sampling import GenerationRequest, SamplingParams

from bench_timing import log, timed  # sibling module: run as a script, benchmarks/ is on sys.path

# ------------------------------------------------------------------------------------------ P3T: trained toy models
# The Countdown SFT setup of benchmarks/learning.py (its SETUPS["countdown"]), repeated here so this file stands alone.
TOY = {"task": "countdown", "task_kwargs": {"num_train": 5000, "num_test": 200}, "max_tokens": 16,
       "size": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}, "steps": 800,
       "batch_size": 64, "lr": 1e-3}
QUICK_TOY = dict(TOY, steps=100, task_kwargs={"num_train": 2000, "num_test": 48})


def train_block_model(out: Path, toy: dict, seed: int = 0) -> Path:
    """diffrl's diffusion SFT (launch.sft.run_sft, block ELBO objective), block 4; reused when already there."""
    from launch.sft import SFTRun, run_sft
    from rl.sft import SFTConfig

    if not (out / "sft.json").is_file():
        log(f"P3T: diffusion SFT of the block-4 model ({toy['steps']} steps) -> {out}")
        run_sft(SFTRun(out=str(out), model={"tiny": "qwen3-block", "block_size": 4}, tiny_size=toy["size"],
                       data={"task": toy["task"], "task_kwargs": toy["task_kwargs"]}, overwrite=True,
                       training=SFTConfig(steps=toy["steps"], batch_size=toy["batch_size"], lr=toy["lr"], seed=seed)),
                progress=False)
    return out


def train_ar_model(out: Path, toy: dict, seed: int = 0) -> Path:
    """The AR baseline: the same tiny Qwen3 (same size, same initial weights as run_sft's), trained next-token on
    the same (prompt, answer + EOS) pairs with the same optimiser, schedule, batch size and steps."""
    if (out / "ar_sft.json").is_file():
        return out
    import transformers

    from launch.data import encode_prompt
    from rl.optim import apply_lr, clip_grads, make_optimizer, param_groups
    from rl.sft import SFTConfig
    from rl.tasks import make_task

    log(f"P3T: next-token SFT of the same-size causal LM ({toy['steps']} steps) -> {out}")
    size = dict(toy["size"], intermediate_size=4 * toy["size"]["hidden_size"])  # run_sft's default ffn
    with tempfile.TemporaryDirectory() as tmp:
        init = make_tiny_policy("block", Path(tmp) / "init", seed=seed, block_size=4, **size)
        model = transformers.AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(init)
    rows = make_task(toy["task"], seed=seed, **toy["task_kwargs"]).rows("train")
    examples = []
    for row in rows:
        prompt = encode_prompt(tokenizer, row["prompt"], chat_template=True)
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((prompt, answer))
    config = SFTConfig(steps=toy["steps"], batch_size=toy["batch_size"], lr=toy["lr"], seed=seed)
    optim = config.optim()
    optimizer = make_optimizer(param_groups(model.named_parameters(), lr=config.lr,
                                            weight_decay=config.weight_decay), optim)
    params = [p for p in model.parameters() if p.requires_grad]
    order_gen, order = torch.Generator().manual_seed(seed), []
    start, losses = time.perf_counter(), []
    model.train()
    for step in range(config.steps):
        if len(order) < config.batch_size:
            order += torch.randperm(len(examples), generator=order_gen).tolist()
        index, order = order[:config.batch_size], order[config.batch_size:]
        width = max(len(examples[i][0]) + len(examples[i][1]) for i in index)
        ids = torch.full((len(index), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for b, i in enumerate(index):
            prompt, answer = examples[i]
            n = len(prompt) + len(answer)
            ids[b, :n] = torch.tensor(prompt + answer)
            labels[b, len(prompt):n] = torch.tensor(answer)
            mask[b, :n] = 1
        apply_lr(optimizer, step, optim)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if torch.isfinite(clip_grads(params, config.grad_clip)):
            optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    with atomic_output(out) as tmp_out:
        model.save_pretrained(str(tmp_out), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp_out))
        (tmp_out / "ar_sft.json").write_text(json.dumps({
            "objective": "next-token cross-entropy on answer + EOS", "task": toy["task"],
            "task_kwargs": toy["task_kwargs"], "size": size, "steps": config.steps, "batch_size": config.batch_size,
            "lr": config.lr, "seed": seed, "train_wall_s": time.perf_counter() - start,
            "final_loss_mean_last_20": sum(losses[-20:]) / len(losses[-20:])}, indent=2) + "\n")
    return out


def _hf_generate_batch(model, prompts: list[list[int]], max_new: int, pad: int, eos: int) -> list[list[int]]:
    """Greedy HF `generate` (KV cache) of a left-padded batch, stopping at EOS; each row cut after its EOS."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, use_cache=True,
                         pad_token_id=pad, eos_token_id=eos)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


def bench_p3_trained(trained: Path, toy: dict, batch: int, thresholds: list[float], repeats: int) -> dict:
    """P3T (see the module docstring): AR `generate` vs block diffusion (static 1 token/step, dynamic thresholds)."""
    import transformers

    from launch.data import encode_prompt
    from launch.evaluate import Sample, score_samples
    from launch.evaluate_data import load_eval_set

    block_dir = train_block_model(trained / "block4", toy)
    ar_dir = train_ar_model(trained / "ar", toy)
    policy = load_policy(block_dir)
    ar = transformers.AutoModelForCausalLM.from_pretrained(ar_dir, dtype=torch.float32).eval()
    tok = policy.tokenizer
    evalset = load_eval_set(toy["task"], task_kwargs=toy["task_kwargs"], seed=0)
    prompts = [encode_prompt(tok, item.prompt, chat_template=True) for item in evalset.items]
    chunks = [list(range(i, min(i + batch, len(prompts)))) for i in range(0, len(prompts), batch)]
    max_tokens, eos, pad = toy["max_tokens"], policy.spec.eos_token_id, policy.spec.pad_token_id
    configs: dict = {"AR generate": None,
                     "block static 1 tok/step": SamplingParams(temperature=0, max_tokens=max_tokens,
                                                               remasking="low_confidence_static")}
    for t in thresholds:
        configs[f"block dynamic {t}"] = SamplingParams(temperature=0, max_tokens=max_tokens,
                                                       remasking="low_confidence_dynamic", threshold=t)

    calls = {"n": 0}  # batch forwards (model calls) of the current run
    ar.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    policy_forward = policy.forward

    def counted_forward(*args, **kwargs):
        calls["n"] += 1
        return policy_forward(*args, **kwargs)

    policy.forward = counted_forward

    def run(name):
        calls["n"] = 0
        samples = []
        if configs[name] is None:
            with torch.inference_mode():
                for chunk in chunks:
                    for ids in _hf_generate_batch(ar, [prompts[i] for i in chunk], max_tokens, pad, eos):
                        text = tok.decode([t for t in ids if t != eos], skip_special_tokens=True)
                        samples.append(Sample(text, len(ids), len(ids), len(ids), "eos" if eos in ids else "length"))
            return samples
        engine = TorchEngine(policy, max_batch_size=batch)
        for chunk in chunks:
            for traj in engine.generate([GenerationRequest(prompts[i], configs[name], seed=i) for i in chunk]):
                text = tok.decode(traj.response_ids[:traj.valid_length].tolist(), skip_special_tokens=True)
                samples.append(Sample(text, traj.valid_length, traj.response_length, traj.nfe, traj.finish_reason))
        return samples

    best, out, forwards = {name: float("inf") for name in configs}, {}, {}
    for rep in range(repeats):  # interleaved, so background load hits every configuration alike
        log(f"P3T round {rep + 1}/{repeats}")
        for name in configs:
            samples, seconds = timed(lambda: run(name))
            best[name] = min(best[name], seconds)
            out[name], forwards[name] = samples, calls["n"]
    # AR sanity: left padding in a batch of 16 must not change a prompt's greedy answer.
    with torch.inference_mode():
        alone = [_hf_generate_batch(ar, [prompts[i]], max_tokens, pad, eos)[0] for i in range(min(16, len(prompts)))]
    results = {"items": len(prompts), "batch": batch, "max_tokens": max_tokens,
               "ar_batch_equals_alone": sum(tok.decode([t for t in a if t != eos], skip_special_tokens=True) == s.text
                                            for a, s in zip(alone, out["AR generate"])) / len(alone),
               "sft": {"block4": json.loads((block_dir / "sft.json").read_text()).get("train_wall_s"),
                       "ar": json.loads((ar_dir / "ar_sft.json").read_text()).get("train_wall_s")}}
    for name, samples in out.items():
        scores = score_samples(evalset, [[s] for s in samples])
        correct = sum(r[0]["reason"].split(":", 1)[0].strip() == "correct" for r in scores)
        tokens = sum(s.tokens for s in samples)  # answer + EOS
        decoded = sum(s.decoded for s in samples)  # whole blocks for block decoding
        nfe = sum(s.nfe for s in samples)
        results[name] = {"seconds": best[name], "accuracy": correct / len(samples), "tokens_per_s": tokens / best[name],
                         "tokens_per_forward": decoded / nfe, "answer_tokens_per_forward": tokens / nfe,
                         "mean_answer_tokens": tokens / len(samples), "batch_forwards": forwards[name],
                         "ms_per_batch_forward": 1000 * best[name] / forwards[name]}
    ar_s = best["AR generate"]
    for name in configs:
        if name != "AR generate":
            results[name]["speedup_vs_AR"] = ar_s / best[name]
            results[name]["tokens_per_s_vs_AR"] = results[name]["tokens_per_s"] / results["AR generate"]["tokens_per_s"]
    return results
