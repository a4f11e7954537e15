"""Canvas-trace likelihood (DiffusionGemma): log p of every action the rollout's sampler took, on the very canvases
it read, under the current policy.

Replay, per sample (rollout.canvas_trace.CanvasTrace): the prompt, left-padded as in its rollout batch, and then each
finished block are encoded into the causal encoder's cache (with gradients: the encoder shares the decoder's
weights); each recorded step runs the decoder on the recorded canvas (its random tokens included) with
self-conditioning on the previous replayed step's processed logits, applies the recorded temperature t(n), and
scores the tokens the step accepted and kept (CanvasTrace.actions). A block's last step takes no action, so its
forward is skipped. On the rollout's own weights this recomputes the rollout's log-probs (tests: within 1e-5).

Per position, token_logp[i] sums the log-probs of all actions at i (a position can be accepted at several steps);
seq_logp, their total, is the exact log-likelihood of the trajectory's actions. The acceptance sets, the stopping
step and the re-noising draws are part of the trajectory (they are not sampled from the policy's token
distribution), as TraceRL treats the unmasking order.

Self-conditioning: the replayed logits feed the next step detached (`self_conditioning_grad=False`, default:
stop-gradient, as self-conditioning is trained); True backpropagates through the chain of steps (the exact
gradient of the trajectory log-likelihood, at the cost of one graph over all steps of a block).
"""
from __future__ import annotations

import torch

from rl.estimators.base import ESTIMATORS, Estimate, EstimatorInput, padded, token_mask_of
from rollout.models.families.diffusion_gemma_sampler import action_logprobs, process_logits, token_entropy
from rollout.trajectory import block_local_steps


@ESTIMATORS.register("canvas_trace")
def canvas_trace_estimator(policy, inp: EstimatorInput, *, seed: int = 0, inner_iter: int = 0,
                           temperature: float = 1.0, return_entropy: bool = False, return_hidden: bool = False,
                           self_conditioning_grad: bool = False, packing=None) -> Estimate:
    del seed, inner_iter  # deterministic: the canvases are the recorded trajectory itself
    if packing is not None:
        raise ValueError("estimator 'canvas_trace': learner.pack_tokens does not apply (one replay per sample)")
    if return_hidden:
        raise ValueError("estimator 'canvas_trace': no value model for DiffusionGemma (hidden states per action)")
    if temperature != 1.0:
        raise ValueError("estimator 'canvas_trace' scores under the rollout's recorded temperature schedule; the "
                         f"learner temperature must be 1 (got {temperature})")
    traces = inp.canvas_traces
    if traces is None or any(t is None for t in traces):
        raise ValueError("estimator 'canvas_trace' needs canvas traces (DiffusionGemma rollouts), none were given")
    width = max(inp.length(b) for b in range(len(inp)))
    device = policy.device
    rows, ents, forwards = [], [], 0
    for b in range(len(inp)):
        logp, ent, fwd = replay(policy, inp.prompts[b], inp.responses[b], traces[b],
                                self_conditioning_grad=self_conditioning_grad, with_entropy=return_entropy)
        rows.append(logp)
        ents.append(ent)
        forwards += fwd
    token_logp = torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows])
    entropy = torch.stack([torch.nn.functional.pad(e, (0, width - e.numel())) for e in ents]) \
        if return_entropy else None
    mask = token_mask_of(inp, device)
    steps = [block_local_steps(inp.step_maps[b].long().cpu(), traces[b].canvas_length)
             if inp.step_maps is not None else torch.zeros(inp.length(b), dtype=torch.long) for b in range(len(inp))]
    return Estimate(token_logp=token_logp, seq_logp=(token_logp * mask).sum(-1), token_mask=mask,
                    forwards=forwards, step_ids=padded(steps, width, fill=-1).to(device), entropy=entropy)


def replay(policy, prompt: torch.Tensor, response: torch.Tensor, trace, *, self_conditioning_grad: bool = False,
           with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(L,) summed action log-probs per response position, (L,) entropy at each position's last action (or None),
    and the forward passes spent, for one sample."""
    spec, device = policy.spec, policy.device
    length = trace.canvas_length
    if response.numel() != (int(trace.block[-1]) + 1) * length:
        raise ValueError(f"canvas_trace: response of {response.numel()} tokens != {int(trace.block[-1]) + 1} "
                         f"canvases of {length}")
    offset = trace.prompt_offset
    ids = torch.cat([torch.full((offset,), spec.pad_token_id, dtype=torch.long), prompt.long().cpu()])[None]
    ids = ids.to(device)
    attn = torch.ones_like(ids, dtype=torch.bool)
    attn[:, :offset] = False
    actions, tokens = trace.actions().to(device), trace.action_tokens().to(device)
    successor = trace.has_successor().tolist()
    canvases = trace.canvases.to(device)
    logp = torch.zeros(response.numel(), device=device)
    entropy = torch.zeros(response.numel(), device=device) if with_entropy else None
    cache, chunk, forwards = policy.new_cache(), ids, 0
    enc_pos = torch.arange(ids.shape[1], device=device)[None]
    dec_pos = torch.arange(ids.shape[1], ids.shape[1] + length, device=device)[None]
    embed_dtype = policy.causal_lm.model.decoder.embed_tokens.weight.dtype
    for k in range(int(trace.block[-1]) + 1):
        cache = policy.encode(chunk, attn, enc_pos, cache)
        forwards += 1
        masks = policy.decoder_masks(canvases[:1], cache, torch.nn.functional.pad(attn, (0, length), value=True))
        span = slice(k * length, (k + 1) * length)
        self_cond = None
        for s in (trace.block == k).nonzero().flatten().tolist():
            if not successor[s]:
                continue  # the block's last step: what it accepted was thrown away, and nothing reads its logits
            raw = policy.denoise(canvases[s][None], self_cond, masks, cache, dec_pos)
            forwards += 1
            processed = process_logits(raw, int(trace.remaining[s]), trace.max_denoising_steps, trace.t_min,
                                       trace.t_max)[0]
            step_logp = action_logprobs(processed, tokens[s])
            logp[span] = logp[span] + torch.where(actions[s], step_logp, torch.zeros_like(step_logp))
            if with_entropy:
                with torch.no_grad():
                    entropy[span] = torch.where(actions[s], token_entropy(processed), entropy[span])
            sc = processed if self_conditioning_grad else processed.detach()
            self_cond = sc.to(embed_dtype)[None]
        chunk = response[span].long().to(device)[None]
        attn = torch.nn.functional.pad(attn, (0, length), value=True)
        enc_pos, dec_pos = dec_pos, dec_pos + length
    return logp, entropy, forwards
