"""DiffusionPolicy: a Hugging Face model driven as a diffusion LM (block-causal or full attention).

The adapter owns the two forwards everything else is built on:
- `forward`: raw model call with explicit position ids and an attention mask (a per-position description,
  attention.AttentionMask, run by the kernel `attention_kernel` selects; or a dense additive 4D tensor), optional KV
  cache, logits computed only at the positions asked for (the full-vocabulary projection is most of a small
  model's cost);
- `score_responses`: log p(response token | noisy state) for a batch, through the training layout
  `[prompt | clean response | noisy response]` for block models or `[prompt | noisy response]` for full-attention
  models, in one forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rollout.models import attention
from rollout.models.attention import AttentionMask
from rollout.models.layout import alignment_origin, arrange_rows, copies_layout, sample_layout  # noqa: F401
from rollout.models.spec import DiffusionSpec

# Rows of the vocabulary projection computed at once: bounds the (rows x vocab) logits buffer.
LOGIT_CHUNK_ROWS = 2048


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None  # (B, K, V) at `logits_at` (or every position when logits_at is None)
    hidden: torch.Tensor | None  # (B, Q, H) last hidden states, when asked for
    past_key_values: object | None


@dataclass
class ResponseScores:
    logprobs: torch.Tensor  # (B, Lmax) log p(response[i] | state); 0 where not scored
    valid: torch.Tensor  # (B, Lmax) bool: positions that were scored
    entropy: torch.Tensor | None = None  # (B, Lmax) entropy of the predictive distribution
    hidden: torch.Tensor | None = None  # (B, Lmax, H) last hidden state at each response (noisy) position


@dataclass
class PackedBatch:
    """A batch laid out for scoring in R rows (R = B unless packed); sample b lives in row `row[b]`."""

    input_ids: torch.Tensor  # (R, T)
    position_ids: torch.Tensor  # (R, T)
    attn_bias: AttentionMask  # (R, 1, T, T) as per-position mask inputs (block ids, noisy flags, validity, documents)
    # `pack`: (B, Lmax); `pack_copies`: (B, Cmax, Lmax), one row of positions per noisy copy.
    target_pos: torch.Tensor  # index in row[b] of the hidden state whose logits predict response token i
    response_pos: torch.Tensor  # index in row[b] of response token i's own (noisy) input position
    row: torch.Tensor | None = None  # (B,) row of each sample (None: row b holds sample b)

    def rows_of(self) -> torch.Tensor:
        return torch.arange(self.target_pos.shape[0], device=self.target_pos.device) if self.row is None else self.row


class DiffusionPolicy:
    """A HF causal-LM-shaped model plus its diffusion spec and tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer, spec: DiffusionSpec, source: dict | None = None,
                 attention_kernel: str = "auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        # How the checkpoint was laid out on disk (format, original config, code files), so saving round-trips.
        self.source = dict(source or {})
        # Which kernel runs masks given as descriptions (attention.KERNELS); may be changed between forwards.
        self.attention_kernel = attention.check_kernel(attention_kernel)
        if self.native:  # the layers read descriptions through diffrl's dispatcher (dense tensors: unchanged)
            attention.install(self.causal_lm)

    # ----------------------------------------------------------------------------------------------- modules
    @property
    def causal_lm(self) -> torch.nn.Module:
        """The transformers model under any PEFT wrapper."""
        model = self.model
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return model

    @property
    def native(self) -> bool:
        """True when the trunk and head are separable (transformers' own classes), so logits can be sparse."""
        lm = self.causal_lm
        return hasattr(lm, "model") and hasattr(lm, "lm_head") and not self.source.get("remote_code", False)

    @property
    def attn_implementation(self) -> str:
        """The transformers attention implementation the model was loaded with (sdpa, eager, flex_attention)."""
        return attention.base_implementation(self.causal_lm.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return int(self.causal_lm.config.hidden_size)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.causal_lm.get_output_embeddings()(hidden)

    # ----------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attn_bias: torch.Tensor | AttentionMask,
        *,
        past_key_values=None,
        use_cache: bool = False,
        logits_at: torch.Tensor | None = None,
        return_hidden: bool = False,
        compute_logits: bool = True,
    ) -> ForwardOutput:
        """One forward pass. `attn_bias` is (B, 1, Q, past + Q): an AttentionMask (run by `attention_kernel`) or a
        dense additive tensor (passed to the model as is); `logits_at` (B, K) indexes the Q positions."""
        if self.native:
            mask_kwargs = self._mask_kwargs(attn_bias)
            out = self.causal_lm.model(
                input_ids=input_ids, position_ids=position_ids,
                past_key_values=past_key_values, use_cache=use_cache, **mask_kwargs,
            )
            hidden = out.last_hidden_state
            cache = out.past_key_values if use_cache else None
            logits = None
            if compute_logits:
                selected = hidden if logits_at is None else _gather_rows(hidden, logits_at)
                logits = self.logits_from_hidden(selected)
            return ForwardOutput(logits, hidden if return_hidden else None, cache)
        return self._remote_forward(input_ids, position_ids, attn_bias, past_key_values, use_cache, logits_at,
                                    return_hidden)

    def _mask_kwargs(self, mask: torch.Tensor | AttentionMask) -> dict:
        """How a mask reaches transformers: a dense tensor as attention_mask; a description as the keyword the
        dispatcher (attention.py) reads, with the kernel resolved for this forward (dense: expanded here)."""
        if isinstance(mask, torch.Tensor):
            return {"attention_mask": mask.to(dtype=self.dtype)}
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())
        kernel = attention.resolve_kernel(self.attention_kernel, self.device, needs_grad, q_len=mask.shape[2])
        attention.log_kernel_once(kernel)
        mask = mask.to(self.device)  # a fresh record: its memo (chunk plans, BlockMask) lives for this forward
        if kernel == "dense":
            return {"attention_mask": mask.dense_bias(self.dtype)}
        return {"attention_mask": None, attention.MASK_KWARG: attention.KernelCall(mask, kernel)}

    def _remote_forward(self, input_ids, position_ids, attn_bias, past_key_values, use_cache, logits_at,
                        return_hidden) -> ForwardOutput:
        """Models with their own code (LLaDA, Dream) are full-attention and take at most a 2D padding mask.

        Only keyword arguments their forward declares are passed (LLaDA's has no position_ids), and the mask is
        reduced to key validity, dropped entirely when nothing is padded.
        """
        if self.spec.is_block:
            raise ValueError("model: block-causal decoding needs transformers' own classes, not remote code")
        accepted = _forward_params(self.model)
        if isinstance(attn_bias, AttentionMask):
            if not attn_bias.full or attn_bias.documents:
                raise ValueError("model: a model with its own code takes a padding mask only (full attention, one "
                                 "document per row)")
            key_valid = attn_bias.k_valid
        else:
            key_valid = (attn_bias[:, 0] == 0).any(dim=1)
        kwargs = {"input_ids": input_ids}
        if not bool(key_valid.all()):
            kwargs["attention_mask"] = key_valid.long()
        if "position_ids" in accepted:
            kwargs["position_ids"] = position_ids
        if use_cache or past_key_values is not None:
            kwargs.update(past_key_values=past_key_values, use_cache=use_cache)
        if return_hidden:
            kwargs["output_hidden_states"] = True
        out = self.model(**kwargs)
        logits = out.logits if logits_at is None else _gather_rows(out.logits, logits_at)
        hidden = out.hidden_states[-1] if return_hidden else None
        return ForwardOutput(logits, hidden, getattr(out, "past_key_values", None) if use_cache else None)

    # ------------------------------------------------------------------------------------------ train layout
    def pack(
        self, prompts: list[torch.Tensor], responses: list[torch.Tensor], noisy: list[torch.Tensor],
        *, alignment: str | None = None, packed: bool = False, row_tokens: int | None = None,
    ) -> PackedBatch:
        """Lay a batch out for scoring: `[prompt | clean | noisy]` (block) or `[prompt | noisy]` (full).

        `responses` are the clean tokens (block models condition on their earlier blocks); `noisy` has the same
        length with some positions replaced by the mask token. Prompts may themselves contain mask tokens (d1).
        Blocks follow the model's alignment (spec.block_alignment) unless `alignment` names another.
        packed=False: one sample per row, right-padded; packed=True: several samples per row (documents),
        first-fit-decreasing into rows of max(row_tokens, longest layout) tokens (rollout/models/layout.py).
        """
        if not (len(prompts) == len(responses) == len(noisy)):
            raise ValueError("pack: prompts, responses and noisy must have the same batch size")
        layouts = []
        for prompt, clean, corrupted in zip(prompts, responses, noisy):
            if clean.shape != corrupted.shape:
                raise ValueError(f"pack: noisy response shape {tuple(corrupted.shape)} != {tuple(clean.shape)}")
            lay = sample_layout(prompt, clean, corrupted, self.spec, alignment)
            lay.response_pos, lay.target_pos = lay.response_pos[None], lay.target_pos[None]  # one copy
            layouts.append(lay)
        laid = self._arrange(layouts, responses, packed, row_tokens)
        laid.target_pos, laid.response_pos = laid.target_pos[:, 0], laid.response_pos[:, 0]
        return laid

    def pack_copies(
        self, prompts: list[torch.Tensor], responses: list[torch.Tensor], noisy: list[list[torch.Tensor]],
        *, alignment: str | None = None, packed: bool = False, row_tokens: int | None = None,
    ) -> PackedBatch:
        """`pack` with several noisy canvases per sample sharing its clean part (block models only):
        `[prompt | clean | noisy 1 | ... | noisy C_b]` (layout.copies_layout). target_pos / response_pos are
        (B, Cmax, Lmax): copy c of sample b in [:, c] (copies a sample lacks point at position 0, never read)."""
        if not (len(prompts) == len(responses) == len(noisy)):
            raise ValueError("pack_copies: prompts, responses and noisy must have the same batch size")
        layouts = [copies_layout(prompt, clean, list(canvases), self.spec, alignment)
                   for prompt, clean, canvases in zip(prompts, responses, noisy)]
        return self._arrange(layouts, responses, packed, row_tokens)

    def _arrange(self, layouts, responses, packed: bool, row_tokens: int | None) -> PackedBatch:
        """Layouts with (C_b, L_b) positions laid into rows; positions made row indices, (B, Cmax, Lmax)."""
        rows = arrange_rows(layouts, pad_id=self.spec.pad_token_id, full=not self.spec.is_block, packed=packed,
                            row_tokens=row_tokens)
        max_len = max(c.numel() for c in responses)
        copies = max(lay.response_pos.shape[0] for lay in layouts)
        target_pos = torch.zeros((len(layouts), copies, max_len), dtype=torch.long)
        response_pos = torch.zeros_like(target_pos)
        for b, lay in enumerate(layouts):
            c, length = lay.response_pos.shape
            response_pos[b, :c, :length] = lay.response_pos + rows.start[b]
            target_pos[b, :c, :length] = lay.target_pos + rows.start[b]
        device = self.device
        return PackedBatch(
            rows.input_ids.to(device), rows.position_ids.to(device), rows.mask.to(device),
            target_pos.to(device), response_pos.to(device), rows.row.to(device),
        )

    def score_responses(
        self,
        prompts: list[torch.Tensor],
        responses: list[torch.Tensor],
        noisy: list[torch.Tensor],
        *,
        score_mask: list[torch.Tensor] | None = None,
        temperature: float = 1.0,
        return_entropy: bool = False,
        return_hidden: bool = False,
        alignment: str | None = None,
        packed: bool = False,
        row_tokens: int | None = None,
    ) -> ResponseScores:
        """log p(responses[b][i] | state) at every response position i where score_mask (default: all) holds.

        The full-vocabulary projection runs only on scored positions, in chunks. `alignment` overrides the model's
        block alignment (block models only; None: the model's own). packed=True lays several samples in one row
        (`pack`): the same scores per sample, no compute on padding; needs transformers' own model classes.
        """
        self._check_packed(packed, "score_responses")
        laid = self.pack(prompts, responses, noisy, alignment=alignment, packed=packed, row_tokens=row_tokens)
        masks = None if score_mask is None else [m[None] for m in score_mask]
        laid.target_pos, laid.response_pos = laid.target_pos[:, None], laid.response_pos[:, None]
        scores, _, hidden = self._score_laid(laid, responses, masks, temperature, return_entropy, return_hidden)
        if return_hidden:  # every response position's hidden state, scored or not (the single copy's)
            scores.hidden = hidden[laid.rows_of()[:, None], laid.response_pos[:, 0]]
        return scores

    def score_trajectory_copies(
        self,
        prompts: list[torch.Tensor],
        responses: list[torch.Tensor],
        noisy: list[list[torch.Tensor]],
        score_masks: list[list[torch.Tensor]],
        *,
        temperature: float = 1.0,
        return_entropy: bool = False,
        return_hidden: bool = False,
        alignment: str | None = None,
        packed: bool = False,
        row_tokens: int | None = None,
    ) -> ResponseScores:
        """Several noisy states per sample scored in ONE forward (block models; `pack_copies`): token i of sample b
        is scored from copy c where score_masks[b][c][i] holds, each token by at most one copy. The same scores as
        one `score_responses` call per copy (the copies see exactly what they would see alone), the shared prompt
        and clean response computed once. hidden: a scored token's from the copy that scores it, 0 elsewhere."""
        self._check_packed(packed, "score_trajectory_copies")
        if len(score_masks) != len(noisy) or any(len(m) != len(n) for m, n in zip(score_masks, noisy)):
            raise ValueError("score_trajectory_copies: one score mask per noisy canvas")
        laid = self.pack_copies(prompts, responses, noisy, alignment=alignment, packed=packed, row_tokens=row_tokens)
        masks = [torch.stack([m.bool().cpu() for m in sample]) for sample in score_masks]
        if any(bool((m.sum(0) > 1).any()) for m in masks):
            raise ValueError("score_trajectory_copies: a token is scored by more than one copy")
        scores, selected, hidden = self._score_laid(laid, responses, masks, temperature, return_entropy,
                                                    return_hidden)
        if return_hidden:  # each scored token's hidden state in the copy that scores it
            b_idx, c_idx, cols = selected.nonzero(as_tuple=True)
            own = hidden[laid.rows_of()[b_idx], laid.response_pos[b_idx, c_idx, cols]]
            scores.hidden = hidden.new_zeros((*scores.valid.shape, hidden.shape[-1])).index_put((b_idx, cols), own)
        return scores

    def _check_packed(self, packed: bool, name: str) -> None:
        if packed and not self.native:
            raise ValueError(f"{name}: packed rows need transformers' own model classes (a remote-code model takes "
                             "only a padding mask, no per-document attention or restarted positions)")

    def _score_laid(self, laid: PackedBatch, responses, masks: list[torch.Tensor] | None, temperature: float,
                    return_entropy: bool, return_hidden: bool):
        """One forward over `laid` ((B, C, L) positions): log p of response token i at each (b, c, i) masks[b]
        (C_b, L_b) selects (None: every token of copy 0). Returns (scores without hidden, the (B, C, L) selection,
        the forward's (R, T, H) last hidden states when return_hidden: the callers pick their positions)."""
        bsz, copies, max_len = laid.target_pos.shape
        device = self.device
        selected = torch.zeros((bsz, copies, max_len), dtype=torch.bool)
        targets = torch.zeros((bsz, max_len), dtype=torch.long, device=device)
        for b, clean in enumerate(responses):
            n = clean.numel()
            targets[b, :n] = clean.to(device)
            if masks is None:
                selected[b, 0, :n] = True
            else:
                selected[b, :masks[b].shape[0], :n] = masks[b].bool().cpu()
        selected = selected.to(device)
        native = self.native
        out = self.forward(
            laid.input_ids, laid.position_ids, laid.attn_bias,
            return_hidden=native or return_hidden, compute_logits=not native,
        )
        b_idx, c_idx, cols = selected.nonzero(as_tuple=True)
        row_of = laid.rows_of()
        where = laid.target_pos[b_idx, c_idx, cols]
        if native:
            # Project only the hidden states of scored positions onto the vocabulary.
            logp_rows, ent_rows = token_logprobs(self, out.hidden[row_of[b_idx], where], targets[b_idx, cols],
                                                 temperature=temperature, with_entropy=return_entropy)
        else:
            logp_rows, ent_rows = token_logprobs(self, out.logits[row_of[b_idx], where], targets[b_idx, cols],
                                                 temperature=temperature, with_entropy=return_entropy,
                                                 are_logits=True)
        logprobs = torch.zeros((bsz, max_len), dtype=logp_rows.dtype, device=device)
        logprobs = logprobs.index_put((b_idx, cols), logp_rows)
        entropy = None
        if return_entropy:
            entropy = torch.zeros_like(logprobs).index_put((b_idx, cols), ent_rows)
        return ResponseScores(logprobs, selected.any(dim=1), entropy), selected, (out.hidden if return_hidden else None)


def token_logprobs(
    policy: DiffusionPolicy,
    hidden_rows: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    are_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log-softmax of the vocabulary projection of (N, H) hidden rows (or of (N, V) logits when `are_logits`),
    gathered at (N,) targets, chunked so the (rows x vocab) buffer stays bounded.

    With gradients on, each chunk runs under non-reentrant activation checkpointing: backward keeps only the
    chunk's inputs (O(rows x hidden)) and recomputes its logits, instead of every chunk's (rows x vocab) logits
    and log-softmax (12-24 GB at 8k-16k scored tokens with a 152k vocabulary). The price is one more vocabulary
    projection per chunk in backward."""
    logps, ents = [], []
    project = None if are_logits else policy.logits_from_hidden
    recompute = torch.is_grad_enabled()
    for start in range(0, hidden_rows.shape[0], LOGIT_CHUNK_ROWS):
        rows = hidden_rows[start:start + LOGIT_CHUNK_ROWS]
        chunk_targets = targets[start:start + LOGIT_CHUNK_ROWS]
        if recompute:
            logp, ent = checkpoint(_chunk_logprobs, project, rows, chunk_targets, temperature, with_entropy,
                                   use_reentrant=False)
        else:
            logp, ent = _chunk_logprobs(project, rows, chunk_targets, temperature, with_entropy)
        logps.append(logp)
        if with_entropy:
            ents.append(ent)
    if not logps:
        empty = hidden_rows.new_zeros((0,), dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


def _chunk_logprobs(project, rows: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    """(log p(target), entropy or None) of one chunk of hidden rows (projected by `project`) or of logits."""
    logits = (rows if project is None else project(rows)).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    if not with_entropy:
        return logp, None
    with torch.no_grad():  # a metric (learner/entropy): no autograd graph over another (rows x vocab) buffer
        return logp, -(logp_all.exp() * logp_all).sum(-1)


def _forward_params(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) gathered at index (B, K) along T -> (B, K, D)."""
    return torch.gather(x, 1, index[:, :, None].expand(-1, -1, x.shape[-1]))
