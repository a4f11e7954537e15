"""vLLM behind the rollout engine interface, for autoregressive policies (the AR baseline; optional extra).

An autoregressive response is a trajectory with one token per step: step_map = 0, 1, 2, ..., block_size 1, and
the log-prob vLLM reports for each sampled token (pass `logprobs_mode="processed_logprobs"` as an LLM option,
where the installed vLLM supports it, to get it after temperature / top-k / top-p like the torch engine). vLLM is imported lazily; installing
it is `pip install diffrl[vllm]` and never part of CI.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from rollout.engine import RolloutEngine, iter_buckets
from rollout.sampling import GenerationRequest
from rollout.trajectory import Trajectory


class VLLMEngine(RolloutEngine):
    def __init__(self, model_dir: str | Path, *, progress: bool = False, **llm_options):
        try:
            import vllm
        except ImportError as err:
            raise ImportError("engine 'vllm' needs vLLM: pip install 'diffrl[vllm]'") from err
        self._vllm = vllm
        self.model_dir = str(model_dir)
        self.progress = progress
        self.llm = vllm.LLM(model=self.model_dir, **llm_options)
        self.tokenizer = self.llm.get_tokenizer()
        self.policy_version = 0
        self._sleep_mode = bool(llm_options.get("enable_sleep_mode", False))
        self._asleep = False

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Trajectory]:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
        prompts, params = [], []
        for request in requests:
            s = request.sampling
            prompts.append({"prompt_token_ids": request.prompt_ids.tolist()})
            params.append(self._vllm.SamplingParams(
                temperature=s.temperature, top_k=s.top_k if s.top_k > 0 else -1, top_p=s.top_p,
                max_tokens=s.max_tokens, seed=request.seed, logprobs=0,
            ))
        outputs = self.llm.generate(prompts, params, use_tqdm=self.progress)
        return [self._trajectory(request, out) for request, out in zip(requests, outputs)]

    def _trajectory(self, request: GenerationRequest, output) -> Trajectory:
        completion = output.outputs[0]
        ids = torch.tensor(list(completion.token_ids), dtype=torch.long)
        logprobs = torch.tensor([float(step[token].logprob) for step, token in
                                 zip(completion.logprobs or [], completion.token_ids)], dtype=torch.float32)
        if logprobs.numel() != ids.numel():
            logprobs = torch.zeros(ids.numel(), dtype=torch.float32)
        eos = self.tokenizer.eos_token_id
        hits = (ids == eos).nonzero() if eos is not None else torch.zeros(0, 1)
        return Trajectory(
            prompt_ids=request.prompt_ids.long().cpu(), response_ids=ids, step_map=torch.arange(ids.numel()),
            logprobs=logprobs, confidence=logprobs.exp(), valid_length=int(hits[0]) + 1 if hits.numel()
            else ids.numel(), nfe=ids.numel(), finish_reason="eos" if completion.finish_reason == "stop"
            else "length", block_size=1, sampling={**request.sampling.to_dict(), "seed": request.seed,
                                                   "decoder": "vllm"},
            policy_version=self.policy_version, request_id=request.request_id,
        )

    def update_weights(self, weights, version: int, *, final: bool = True) -> None:
        # vLLM's model runner loads weights itself (fused qkv and gate/up projections); hand it each bucket.
        # This reaches the in-process model of vLLM's single-GPU executor; multi-process executors need an RPC.
        try:
            model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError as err:
            raise NotImplementedError(
                "engine 'vllm': this vLLM version does not expose its model in-process; update weights through "
                "its collective_rpc / weight-sync API instead") from err
        for bucket in iter_buckets(weights):
            model.load_weights(list(bucket.items()))
        if final:
            self.policy_version = int(version)

    def release(self) -> None:
        # Sleeping (weights offloaded, KV cache freed) needs LLM(enable_sleep_mode=True); otherwise nothing to do.
        if self._sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True
