"""GPU smoke benchmark: one full RL step of a random-weight SDAR-1.7B-shaped model on one accelerator.

    python benchmarks/gpu_smoke.py                      # SDAR-1.7B-like (Qwen3: hidden 2048, 28 layers, 16 heads,
                                                        # 8 KV heads x 128, ffn 6144, Qwen vocabulary), bf16, cuda
    python benchmarks/gpu_smoke.py --attn flex_attention  # also checks that kernel against sdpa on the same input
    python benchmarks/gpu_smoke.py --tiny               # tiny shape on CPU in seconds (tests/benchmarks run it)

One process plays every role on the device rollout/devices.py chooses (`--device auto`: CUDA when present, as a
Ray actor would resolve it; its own `actor_device` decides): a RolloutWorker (TorchEngine, exact block KV cache)
generates a batch, a LearnerWorker (torch backend, TraceRL loss on the trajectory estimator) takes one update on
it, the learner's weights go to the rollout engine bucket by bucket (the in-process form of the driver's sync),
and a checkpoint (policy + learner state) is written with rl.checkpoint.save_checkpoint. Printed: rollout tokens/s,
peak memory per phase (CUDA: torch.cuda.max_memory_allocated, reset per phase; CPU: peak RSS growth over the
phase, sampled), weight-sync seconds, host syncs per decoding step (rollout/decoding/sync_counter.py) and
checkpoint seconds. `--json PATH` writes the same figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

# Qwen3-1.7B's geometry, which SDAR-1.7B / TraDo-1.7B share (head_dim 128 = 2048 / 16).
SDAR_1_7B = dict(hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, intermediate_size=6144,
                 max_positions=4096)
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_positions=256)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model, small vocabulary, CPU-sized batch")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="as resources.device")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="weights (default: bfloat16 on an accelerator, float32 on CPU, as recipes)")
    ap.add_argument("--attn", default=None, choices=("sdpa", "eager", "flex_attention"))
    ap.add_argument("--batch", type=int, default=None, help="requests (default 32; --tiny 4)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default 256; --tiny 8")
    ap.add_argument("--max-tokens", type=int, default=None, help="response budget (default 256; --tiny 8)")
    ap.add_argument("--bucket-mb", type=int, default=64, help="weight-sync bucket (the driver's: 64)")
    ap.add_argument("--workdir", default=None, help="model and checkpoint folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    big = not args.tiny
    args.batch = args.batch or (32 if big else 4)
    args.prompt_tokens = args.prompt_tokens or (256 if big else 8)
    args.max_tokens = args.max_tokens or (256 if big else 8)
    return args


# ---------------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of one phase: CUDA's allocator peak (reset at the start), or on CPU the peak growth of the
    resident set over the phase (sampled every 2 ms by a thread, so a transient shorter than that can be missed)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.figures: dict[str, int] = {}

    @contextmanager
    def phase(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                yield
            finally:
                torch.cuda.synchronize(self.device)
                self.figures[name] = int(torch.cuda.max_memory_allocated(self.device))
            return
        start, peak, stop = _rss(), [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())
                stop.wait(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.figures[name] = max(peak[0], _rss()) - start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------------------- phases
def build_model(args, root: Path) -> Path:
    from rollout.models.tiny import make_tiny_policy

    size = TINY if args.tiny else SDAR_1_7B
    return make_tiny_policy("sdar", root / "model", vocab="small" if args.tiny else "qwen", seed=0, **size)


def requests(args, vocab_tokens: int):
    from rollout.sampling import GenerationRequest, SamplingParams

    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, remasking="low_confidence_dynamic",
                            threshold=0.9, steps_per_block=None)
    g = torch.Generator().manual_seed(0)
    return [GenerationRequest(torch.randint(10, vocab_tokens, (args.prompt_tokens,), generator=g), params,
                              seed=i, request_id=f"r{i}") for i in range(args.batch)]


def scored(trajectories):
    """Every response trained on, with advantages +1 / -1 in turn (a random model's rewards mean nothing)."""
    from rl.sample import ScoredSample

    done = [t for t in trajectories if t.response_length > 0]
    return [ScoredSample(t, reward=float(i % 2), advantage=1.0 if i % 2 else -1.0, keep=True)
            for i, t in enumerate(done)]


def learner_config():
    from rl.learner import LearnerConfig
    from rl.optim import OptimConfig

    return LearnerConfig(algorithm="tracerl", estimator="trajectory", mu=1, micro_batch_size=4, grad_accum=None,
                         optim=OptimConfig(lr=1e-6), gradient_checkpointing=True, reference_model=False, seed=0)


def sync(learner, rollout, version: int, bucket_bytes: int) -> int:
    """Learner -> rollout weights bucket by bucket (the driver's RolloutPool.sync, without Ray in between)."""
    chunks = 0
    for chunk_version, entries in learner.weight_chunks(bucket_bytes, {"version": version, "split_large": True,
                                                                       "lora_delta": False}):
        rollout.update_weights(entries, chunk_version, final=False)
        chunks += 1
    if rollout.update_weights({}, version, final=True) != version:
        raise RuntimeError("gpu_smoke: the rollout engine does not hold the synced version")
    return chunks


def synced_exactly(learner, rollout) -> bool:
    """Whether every rollout weight now equals the learner's (cast to the engine's dtype), bit for bit."""
    theirs = learner.policy_state()
    ours = dict(rollout.engine.policy.causal_lm.named_parameters())
    if set(theirs) != set(ours):
        return False
    return all(torch.equal(ours[name].detach().cpu(), theirs[name].to(ours[name].dtype)) for name in ours)


def checkpoint(learner, root: Path) -> Path:
    from rl.checkpoint import WrittenFiles, capture_rng, save_checkpoint

    def learner_shard(folder) -> WrittenFiles:  # the rank writes its own shard, as under the driver (rl/learner_shards)
        return WrittenFiles(files=learner.save_state(str(folder)))

    return save_checkpoint(root / "checkpoints", 1,
                           writers={"policy": lambda d: learner.save_policy(str(d)), "learner": learner_shard},
                           state={"version": 1}, rng=capture_rng(), recipe_yaml="name: gpu-smoke\n", keep_last=1)


def attention_check(model_dir: Path, attn: str, device: torch.device, dtype: torch.dtype) -> float:
    """Max |log-prob difference| of `attn` against sdpa on one block-diffusion training layout (dense masks)."""
    return _logp_difference(model_dir, device, dtype, [dict(attn_implementation="sdpa", attention_kernel="dense"),
                                                       dict(attn_implementation=attn, attention_kernel="dense")])


def kernel_check(model_dir: Path, kernel: str, device: torch.device, dtype: torch.dtype) -> float:
    """Max |log-prob difference| of a mask kernel (rollout/models/attention.py) against the dense mask."""
    return _logp_difference(model_dir, device, dtype, [dict(attention_kernel="dense"),
                                                       dict(attention_kernel=kernel)])


def _logp_difference(model_dir: Path, device: torch.device, dtype: torch.dtype, loads: list[dict]) -> float:
    from rollout.models.loading import load_policy

    out = []
    for load in loads:
        policy = load_policy(model_dir, dtype=dtype, device=device, **load)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(10, 60, (7,), generator=g), torch.randint(10, 60, (5,), generator=g)]
        responses = [torch.randint(10, 60, (8,), generator=g) for _ in prompts]
        noisy = [torch.where(torch.rand(8, generator=g) < 0.5, policy.spec.mask_token_id, r) for r in responses]
        with torch.no_grad():
            out.append(policy.score_responses(prompts, responses, noisy).logprobs.float().cpu())
        del policy
    return float((out[0] - out[1]).abs().max())


def run(args) -> dict[str, object]:
    from rl.learner_worker import LearnerWorker
    from rollout.decoding.sync_counter import count_host_syncs
    from rollout.devices import actor_device, default_dtype
    from rollout.models.loading import load_policy
    from rollout.worker import RolloutWorker

    device = actor_device(args.device)
    dtype_name = args.dtype or default_dtype(device.type != "cpu")
    dtype = getattr(torch, dtype_name)
    figures: dict[str, object] = {"device": str(device), "dtype": dtype_name, "shape": "tiny" if args.tiny else
                                  "sdar-1.7b", "batch": args.batch, "prompt_tokens": args.prompt_tokens,
                                  "max_tokens": args.max_tokens, "attn": args.attn or "sdpa"}
    with tempfile.TemporaryDirectory(prefix="gpu_smoke-", dir=args.workdir) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        model_dir = build_model(args, root)
        figures["build_s"] = time.perf_counter() - start
        memory = PeakMemory(device)
        options = {"kind": "sdar", "dtype": dtype, "kv_cache": "auto", "max_batch_size": args.batch}
        if args.attn:
            options["attn_implementation"] = args.attn
        rollout = RolloutWorker(model_dir, device=args.device, **options)
        figures["parameters"] = sum(p.numel() for p in rollout.engine.policy.model.parameters())
        reqs = requests(args, vocab_tokens=min(len(rollout.engine.policy.tokenizer), 5000))
        rollout.generate(reqs[:1])  # warm-up (kernels, allocator)
        with memory.phase("rollout"):
            start = time.perf_counter()
            trajectories = rollout.generate(reqs)
            seconds = time.perf_counter() - start
        tokens = sum(t.response_length for t in trajectories)
        figures.update(rollout_s=seconds, rollout_tokens=tokens, rollout_tokens_per_s=tokens / seconds,
                       nfe_mean=sum(t.nfe for t in trajectories) / len(trajectories))
        with count_host_syncs() as counts:  # a second, smaller rollout under the counter (it costs a little)
            rollout.generate(reqs[:min(4, len(reqs))])
        figures["host_syncs_per_step"] = counts.syncs_per_step

        learner = LearnerWorker(0, 1, partial(load_policy, model_dir, dtype=dtype, attn_implementation=args.attn),
                                learner_config(), device=args.device)
        learner.setup("127.0.0.1", 0)  # torch backend, one rank: no process group
        samples = scored(trajectories)
        with memory.phase("learner_update"):
            start = time.perf_counter()
            metrics = learner.update(samples)
            figures["update_s"] = time.perf_counter() - start
        figures.update(loss=metrics.get("loss"), optimizer_steps=metrics.get("optimizer_steps"))
        with memory.phase("weight_sync"):
            start = time.perf_counter()
            figures["sync_chunks"] = sync(learner, rollout, 1, args.bucket_mb << 20)
            figures["sync_s"] = time.perf_counter() - start
        figures["sync_exact"] = synced_exactly(learner, rollout)
        with memory.phase("checkpoint"):
            start = time.perf_counter()
            path = checkpoint(learner, root)
            figures["checkpoint_s"] = time.perf_counter() - start
        figures["checkpoint_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        figures.update({f"peak_{k}_bytes": v for k, v in memory.figures.items()})
        figures["peak_kind"] = "cuda max_memory_allocated" if device.type == "cuda" else "RSS growth"
        figures["placement"] = {"rollout": rollout.placement(), "learner": learner.placement()}
        del learner, rollout
        if args.attn and args.attn != "sdpa":
            figures[f"attn_{args.attn}_vs_sdpa_max_abs_logp"] = attention_check(model_dir, args.attn, device, dtype)
        kernels = ("flex", "chunked") if device.type == "cuda" else ("chunked",)  # flex: no CPU backward
        for kernel in kernels:
            figures[f"attn_kernel_{kernel}_vs_dense_max_abs_logp"] = kernel_check(model_dir, kernel, device, dtype)
    return figures


def report(figures: dict[str, object]) -> str:
    gib = 1024 ** 3
    lines = [f"gpu_smoke: {figures['shape']} ({figures['parameters'] / 1e6:.1f}M parameters) on {figures['device']}, "
             f"{figures['dtype']}, attention {figures['attn']}; batch {figures['batch']} x "
             f"({figures['prompt_tokens']} prompt + {figures['max_tokens']} response tokens)",
             f"rollout tokens/s      {figures['rollout_tokens_per_s']:.1f}  ({figures['rollout_tokens']} tokens in "
             f"{figures['rollout_s']:.2f} s, mean NFE {figures['nfe_mean']:.1f})",
             f"host syncs per step   {_figure(figures['host_syncs_per_step'])}",
             f"learner update        {figures['update_s']:.2f} s  (loss {figures['loss']:.4g}, "
             f"{figures['optimizer_steps']:.0f} optimizer steps)",
             f"weight sync           {figures['sync_s']:.3f} s  ({figures['sync_chunks']} chunks, rollout weights "
             f"{'==' if figures['sync_exact'] else 'DIFFER FROM'} the learner's)",
             f"checkpoint            {figures['checkpoint_s']:.2f} s  ({figures['checkpoint_bytes'] / gib:.3f} GiB)",
             f"peak memory ({figures['peak_kind']}), GiB:"]
    for phase in ("rollout", "learner_update", "weight_sync", "checkpoint"):
        lines.append(f"  {phase:<20}{figures[f'peak_{phase}_bytes'] / gib:.3f}")
    for key, value in figures.items():
        if key.startswith("attn_") and key.endswith("_max_abs_logp"):
            lines.append(f"{key.removeprefix('attn_')}: {value:.3g}")
    return "\n".join(lines)


def _figure(value) -> str:
    return value if isinstance(value, str) else f"{value:.2f}"


def main(argv=None) -> dict[str, object]:
    args = parse_args(argv)
    figures = run(args)
    print(report(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str) + "\n")
    return figures


if __name__ == "__main__":
    main()
