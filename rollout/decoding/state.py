"""Per-request decoding state, shared by every decoder: what to sample, what to keep, what to record.

A decoder's job is only to produce logits for each request's still-masked positions of its current block
(`BlockView` says which, for all rows at once); `denoise_rows` takes it from there (sample, score, select, record
step / log-prob / confidence, batched over rows that share sampling params) and each `Row` finally becomes a
`Trajectory`. Keeping this in one place is what makes the cached and uncached decoders comparable token for token.
"""
from __future__ import annotations

import secrets
from array import array

import torch

from rollout.decoding import sync_counter
from rollout.decoding.schedules import block_schedule, dream_transfer_probability, eoser_gamma
from rollout.models.spec import DiffusionSpec
from rollout.remasking import BlockQueries, make_remasking
from rollout.sampling import GenerationRequest, entropy, processed_logprobs, sample_tokens
from rollout.trajectory import PREFILLED, UNDECODED, Trajectory


def check_request(request: GenerationRequest, spec: DiffusionSpec, max_positions: int | None,
                  vocab_size: int) -> str | None:
    """The one-line reason a request cannot be decoded, or None."""
    prompt = request.prompt_ids
    params = request.sampling
    if prompt.dim() != 1:
        return f"prompt_ids must be 1-D, got shape {tuple(prompt.shape)}"
    if prompt.numel() == 0:
        return "empty prompt"
    if params.max_tokens % spec.block_size:
        return f"max_tokens {params.max_tokens} is not a multiple of the block size {spec.block_size}"
    if max_positions is not None and prompt.numel() + params.max_tokens > max_positions:
        return (f"prompt of {prompt.numel()} tokens + max_tokens {params.max_tokens} exceeds the context "
                f"(max_position_embeddings {max_positions})")
    if bool((prompt == spec.mask_token_id).any()):
        return f"the prompt contains the mask token (id {spec.mask_token_id})"
    if int(prompt.min()) < 0 or int(prompt.max()) >= vocab_size:
        return f"prompt token ids must lie in [0, {vocab_size})"
    if params.steps_per_block is not None and params.steps_per_block > spec.block_size:
        return f"steps_per_block {params.steps_per_block} > block size {spec.block_size}"
    return _prefill_problem(request.prefill, params.max_tokens, spec, vocab_size)


def _prefill_problem(prefill: torch.Tensor | None, max_tokens: int, spec: DiffusionSpec,
                     vocab_size: int) -> str | None:
    if prefill is None:
        return None
    if prefill.dim() != 1 or prefill.numel() > max_tokens:
        return f"prefill must be 1-D with at most max_tokens {max_tokens} entries, got shape {tuple(prefill.shape)}"
    filled = prefill[prefill >= 0]
    if bool((prefill < -1).any()) or (filled.numel() and int(filled.max()) >= vocab_size):
        return f"prefill token ids must lie in [0, {vocab_size}) (-1: sampled)"
    if bool((filled == spec.mask_token_id).any()):
        return f"prefill contains the mask token (id {spec.mask_token_id})"
    return None


def error_trajectory(request: GenerationRequest, message: str, block_size: int, version: int) -> Trajectory:
    empty_long = torch.zeros(0, dtype=torch.long)
    empty_float = torch.zeros(0, dtype=torch.float32)
    prompt = request.prompt_ids.detach().long().cpu().reshape(-1)
    return Trajectory(
        prompt_ids=prompt, response_ids=empty_long, step_map=empty_long.clone(), logprobs=empty_float,
        confidence=empty_float.clone(), valid_length=0, nfe=0, finish_reason=f"error: {message}",
        block_size=block_size, sampling={**request.sampling.to_dict(), "seed": request.seed},
        policy_version=version, request_id=request.request_id,
    )


class Row:
    """One request being decoded: its canvas of response tokens and everything recorded about them."""

    def __init__(self, index: int, request: GenerationRequest, spec: DiffusionSpec, device: torch.device):
        self.index = index  # position in the caller's request list
        self.request = request
        self.params = request.sampling
        self.spec = spec
        self.seed = request.seed if request.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)
        self.remasking = make_remasking(self.params)
        self.prompt = request.prompt_ids.to(device=device, dtype=torch.long)
        # The canvas starts at the block origin (masks.py): `head` prompt tokens (the prompt's tail, P mod B under
        # `absolute` alignment, else none) share the first block with the response. They are decoded from the
        # start (never masked or chosen) but are part of the block every forward computes. The canvas keeps
        # max_tokens positions, so a response has max_tokens - head tokens and ends on a block boundary.
        self.origin = spec.block_origin(int(self.prompt.numel())) if spec.is_block else int(self.prompt.numel())
        self.head = int(self.prompt.numel()) - self.origin
        length = self.params.max_tokens
        self.tokens = torch.full((length,), spec.mask_token_id, dtype=torch.long, device=device)
        self.tokens[:self.head] = self.prompt[self.origin:]
        self.decoded = torch.zeros(length, dtype=torch.bool, device=device)
        self.decoded[:self.head] = True
        self.step_map = torch.full((length,), UNDECODED, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(length, dtype=torch.float32, device=device)
        self.confidence = torch.zeros(length, dtype=torch.float32, device=device)
        self.token_entropy = torch.zeros(length, dtype=torch.float32, device=device)  # record_entropy only
        self.schedule = block_schedule(self.params, spec.block_size, spec.step_schedule)
        # Dream's `origin` transfer probability by step in block (host floats, computed once: Dream computes them
        # with CPU tensors, which a decoding step must not touch)
        self.transfer_probability: list[float] = []
        if self.remasking.needs_transfer_probability:
            steps = self.params.steps_per_block or spec.block_size
            self.transfer_probability = [dream_transfer_probability(s, steps) for s in range(steps)]
        # Still-masked positions of the current block, known on the host: every step reads back how many it
        # unmasked (its one host sync), so the next step can size its queries without asking the device.
        self.masked_left = spec.block_size - self.head
        self.prefilled: torch.Tensor | None = None  # (max_tokens,) bool on the host, canvas positions
        self._prefilled_per_block: list[int] = []
        if request.prefill is not None:
            self._prefill(request.prefill, device)
        self.block = 0
        self.step = 0  # global denoising step of this request
        self.step_in_block = 0
        self.nfe = 0
        self.finish_reason: str | None = None
        self.step_records: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # record_steps
        self.branch_seeds = dict(request.branch_seeds)  # global step -> seed the generator restarts from

    def _prefill(self, prefill: torch.Tensor, device: torch.device) -> None:
        """Write the pre-filled tokens into the canvas (response position r is canvas position head + r; entries
        past the canvas are ignored): decoded from the start, so no step ever samples or remasks them."""
        length = self.params.max_tokens
        fill = prefill.detach().to("cpu", torch.long)[:length - self.head]
        where = torch.zeros(length, dtype=torch.bool)
        where[self.head:self.head + fill.numel()] = fill >= 0
        positions = where.nonzero().squeeze(1)
        values = fill[positions - self.head]
        positions, values = positions.to(device), values.to(device)
        self.tokens[positions] = values
        self.decoded[positions] = True
        self.step_map[positions] = PREFILLED
        self.prefilled = where
        self._prefilled_per_block = where.view(-1, self.spec.block_size).sum(dim=1).tolist()
        self.masked_left -= self._prefilled_per_block[0]

    # ------------------------------------------------------------------------------------------ geometry
    @property
    def prompt_len(self) -> int:
        return int(self.prompt.numel())

    @property
    def block_start(self) -> int:
        return self.block * self.spec.block_size

    @property
    def block_end(self) -> int:
        return self.block_start + self.spec.block_size

    @property
    def num_blocks(self) -> int:
        return self.params.max_tokens // self.spec.block_size

    # ------------------------------------------------------------------------------------------ one step
    def draw_uniforms(self, n: int, device: torch.device) -> torch.Tensor | None:
        """The sampler's uniforms for this step: one per masked position, from the row's own generator. This is
        the one launch per row per step that stays: a batched draw would not reproduce each row's stream."""
        if self.params.greedy:
            return None
        return torch.rand(n, 1, generator=self.generator, device=device, dtype=torch.float32)

    def budget(self) -> int:
        """The schedule's token count for this step (fixed-count policies); past the schedule, all that is left."""
        return self.schedule[self.step_in_block] if self.step_in_block < len(self.schedule) else self.masked_left

    def eoser_gamma(self) -> float:
        steps = len(self.schedule)
        return eoser_gamma(min(self.step_in_block, steps - 1), steps, self.params.eoser_gamma_min,
                           ass=self.params.schedule == "ass")

    def transfer(self) -> float:
        table = self.transfer_probability
        return table[min(self.step_in_block, len(table) - 1)]

    def next_block(self) -> None:
        self.block += 1
        self.step_in_block = 0
        self.masked_left = self.spec.block_size
        if self._prefilled_per_block:
            self.masked_left -= self._prefilled_per_block[self.block]

    def finish_if_done(self, has_eos: bool | None = None) -> bool:
        """After a completed block: stop on EOS (when asked) or when the budget is spent; else move on.
        `has_eos`: whether the block holds an EOS, when the caller already knows (BlockView.status)."""
        if has_eos is None:  # the prompt's tail (head) is not response: an EOS there does not stop
            start = max(self.block_start, self.head)
            has_eos = bool((self.tokens[start:self.block_end] == self.spec.eos_token_id).any())
        if self.params.stop_at_eos and has_eos:
            self.finish_reason = "eos"
        elif self.block + 1 >= self.num_blocks:
            self.finish_reason = "length"
        return self.finish_reason is not None

    # ------------------------------------------------------------------------------------------ result
    def trajectory(self, version: int, decoder: str) -> Trajectory:
        # Host copies of the canvas: one per field for the whole batch when the rows share one (SharedState.host),
        # instead of several small device reads per row.
        shared = getattr(self, "shared", None)
        field = (lambda name: shared.host(name)[self.slot, :self.params.max_tokens]) if shared is not None else (
            lambda name: getattr(self, name).cpu())
        decoded = field("decoded")
        # Pre-filled tokens of blocks never reached (a stop at EOS) are not part of the response.
        length = int(decoded.sum()) if self.prefilled is None else self.block_end
        if not bool(decoded[:length].all()) or (self.prefilled is not None and int(decoded.sum()) != length + int(
                self.prefilled[length:].sum())):
            raise RuntimeError(f"request {self.request.request_id!r}: decoded positions are not a prefix")
        # Copies, not views: the canvas may be a row of a batch-wide buffer (SharedState), which a trajectory must
        # not keep alive or ship along when it is pickled.
        own = lambda name: field(name)[self.head:length].clone()
        response = own("tokens")
        eos = (response == self.spec.eos_token_id).nonzero()
        valid = int(eos[0]) + 1 if eos.numel() else response.numel()
        reason = self.finish_reason or "length"
        if reason == "length" and eos.numel():
            reason = "eos"
        records = {"token_entropy": own("token_entropy")} if self.params.record_entropy else {}
        if self.params.record_steps:  # the mask and EOS ids come along (sampling): readers of the states need them
            records.update(self.step_arrays(field("tokens"), length))
        return Trajectory(
            prompt_ids=self.request.prompt_ids.to("cpu", torch.long).reshape(-1), response_ids=response,
            step_map=own("step_map"), logprobs=own("logprobs"), confidence=own("confidence"),
            valid_length=valid, nfe=self.nfe, finish_reason=reason, block_size=self.spec.block_size,
            sampling={**self.params.to_dict(), "seed": self.seed, "decoder": decoder,
                      "block_alignment": self.spec.block_alignment,
                      **({"mask_token_id": self.spec.mask_token_id, "eos_token_id": self.spec.eos_token_id}
                         if self.params.record_steps or self.request.branch_seeds else {}),
                      **({"branch_seeds": [list(b) for b in self.request.branch_seeds]}
                         if self.request.branch_seeds else {})},
            policy_version=version, request_id=self.request.request_id, **records,
            prefilled=None if self.prefilled is None else self.prefilled[self.head:length].clone(),
        )

    def step_arrays(self, final: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
        """The recorded steps as (S, response length) arrays: blocks before a step's block hold their final tokens
        (decoding never returns to a finished block), blocks after it are masks."""
        bs, mask_id = self.spec.block_size, self.spec.mask_token_id
        steps = len(self.step_records)
        states = final[None, :].repeat(steps, 1) if steps else torch.zeros((0, final.numel()), dtype=torch.long)
        predictions, confidence = states.clone(), torch.zeros(states.shape, dtype=torch.float32)
        for s, (start, block, prediction, probability) in enumerate(self.step_records):
            states[s, start + bs:] = mask_id
            predictions[s, start + bs:] = mask_id
            states[s, start:start + bs] = block.cpu()
            predictions[s, start:start + bs] = prediction.cpu()
            confidence[s, start:start + bs] = probability.cpu().float()
        cut = slice(self.head, length)
        return {"step_states": states[:, cut].clone(), "step_predictions": predictions[:, cut].clone(),
                "step_confidence": confidence[:, cut].clone()}


class SharedState:
    """Every row's canvas and records as one (R, L) tensor per field; each Row's own tensors become views of its
    row (`row.slot`), so the per-step work (which positions are masked, what to keep, the writes) is a handful of
    batched ops instead of a dozen small ops per row, while Row.trajectory and the rest still see plain tensors."""

    FIELDS = ("tokens", "decoded", "step_map", "logprobs", "confidence", "token_entropy")

    def __init__(self, rows: list[Row]):
        length = max(r.params.max_tokens for r in rows)
        for name in self.FIELDS:
            first = getattr(rows[0], name)
            buf = torch.zeros((len(rows), length), dtype=first.dtype, device=first.device)
            for slot, row in enumerate(rows):
                n = row.params.max_tokens
                buf[slot, :n] = getattr(row, name)
                setattr(row, name, buf[slot, :n])
            setattr(self, name, buf)
        for slot, row in enumerate(rows):
            row.slot, row.shared = slot, self
        self._host: dict[str, torch.Tensor] = {}

    def host(self, name: str) -> torch.Tensor:
        """A host copy of field `name` (for building trajectories after decoding), made once until `changed`."""
        if name not in self._host:
            self._host[name] = getattr(self, name).cpu()
        return self._host[name]

    def changed(self) -> None:
        self._host.clear()


def share_state(rows: list[Row]) -> SharedState:
    """The rows' SharedState, created (state copied in) unless they already share one."""
    shared = getattr(rows[0], "shared", None)
    if shared is None or any(getattr(r, "shared", None) is not shared for r in rows):
        shared = SharedState(rows)
    return shared


def _host_tensor(values: array, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(values, dtype=dtype) if len(values) else torch.zeros(0, dtype=dtype, device="cpu")


def host_columns(device: torch.device, ints: dict[str, list[int]],
                 floats: dict[str, list[float]] | None = None) -> dict[str, torch.Tensor]:
    """Per-row values known on the host (slots, block starts, schedule counts, ...) as device tensors: one copy
    of one host buffer, pinned and non-blocking on CUDA, instead of one blocking copy per list. Float columns
    travel as their float32 bit patterns in the same int64 buffer (exact both ways)."""
    floats = floats or {}
    # Host memory by construction (frombuffer over an array): whatever the default device, never a device copy.
    width = len(next(iter(ints.values())))
    if any(len(column) != width for column in (*ints.values(), *floats.values())):
        raise ValueError(f"host_columns: columns of different lengths {[len(c) for c in ints.values()]}")
    data = _host_tensor(array("q", [v for n in ints for v in ints[n]]), torch.long).view(len(ints), width)
    if floats:
        bits = _host_tensor(array("f", [v for n in floats for v in floats[n]]), torch.int32)  # float32 bits
        data = torch.cat([data, bits.long().view(len(floats), width)])
    if device.type != "cpu":
        if device.type == "cuda":
            data = data.pin_memory()
        data = data.to(device, non_blocking=True)
    sync_counter.note_async_copy()
    out = {n: data[k] for k, n in enumerate(ints)}
    out.update({n: data[len(ints) + k].to(torch.int32).view(torch.float32) for k, n in enumerate(floats)})
    return out


class BlockView:
    """The current block of each row, batched: `idx` (R, bs) its response positions, `masked` (R, bs) which are
    still masked. Queries (logits) are ordered as `masked.nonzero()`: row by row, ascending positions.

    Everything per row that the host knows (slots, starts, the schedule's count, ...) reaches the device in one
    copy (`col`, with the decoder's own `extra` columns); the number of masked positions per row is known on the
    host (Row.masked_left), so the queries are found without a host sync. `read_step` is the step's one sync.
    """

    def __init__(self, rows: list[Row], extra: dict[str, list[int]] | None = None):
        self.rows = rows
        self.shared = share_state(rows)
        device = self.shared.tokens.device
        bs = rows[0].spec.block_size
        self.n_masked = [r.masked_left for r in rows]
        self.groups: dict = {}  # sampling params -> member rows (processed as one matrix by denoise_rows)
        for i, row in enumerate(rows):
            self.groups.setdefault(row.params, []).append(i)
        ints = {"slot": [r.slot for r in rows], "start": [r.block_start for r in rows],
                "head": [r.head for r in rows], "step": [r.step for r in rows],
                "budget": [r.budget() for r in rows], **(extra or {})}
        if len(self.groups) > 1:
            group_of, local = [0] * len(rows), [0] * len(rows)
            for g, members in enumerate(self.groups.values()):
                for k, i in enumerate(members):
                    group_of[i], local[i] = g, k
            ints.update(group=group_of, local=local)
        floats = {}
        if any(r.params.eoser_gamma_min is not None for r in rows):
            floats["gamma"] = [r.eoser_gamma() if r.params.eoser_gamma_min is not None else 1.0 for r in rows]
        if any(r.transfer_probability for r in rows):
            floats["probability"] = [r.transfer() if r.transfer_probability else 1.0 for r in rows]
        self.col = host_columns(device, ints, floats)
        self.slots, self.starts = self.col["slot"], self.col["start"]
        self.idx = self.starts[:, None] + torch.arange(bs, device=device)
        self.masked = ~self.shared.decoded[self.slots[:, None], self.idx]
        queries = torch.nonzero_static(self.masked, size=sum(self.n_masked))  # sizes from the host: no sync
        self.q_row, self.q_col = queries[:, 0], queries[:, 1]  # query -> (row, column in block)
        self.response = self.idx >= self.col["head"][:, None]  # (R, bs) canvas positions that are response

    def gather(self, name: str) -> torch.Tensor:
        """(R, bs) values of a SharedState field over each row's current block."""
        return getattr(self.shared, name)[self.slots[:, None], self.idx]

    def read_step(self, unmasked: torch.Tensor) -> tuple[list[int], list[bool], list[bool]]:
        """The step's one host sync, after denoise_rows: per row, tokens it unmasked, whether its block is now
        fully decoded, whether the block holds an EOS (response positions only). Updates Row.masked_left."""
        eos = ((self.gather("tokens") == self.rows[0].spec.eos_token_id) & self.response).any(dim=1)
        counts, eos_flags, masked = torch.stack([unmasked, eos.long(), self.masked.sum(dim=1)]).tolist()
        if masked != self.n_masked:  # free to check: read with the same sync; queries were sized from n_masked
            raise RuntimeError(f"decoding: masked positions per row {masked} disagree with the host's count "
                               f"{self.n_masked} (a canvas changed outside denoise_rows)")
        done = []
        for row, n in zip(self.rows, counts):
            row.masked_left -= n
            done.append(row.masked_left == 0)
        return counts, done, [bool(e) for e in eos_flags]


def denoise_rows(rows: list[Row], logits: torch.Tensor, view: BlockView) -> torch.Tensor:
    """One denoising step for `view.rows` (== rows) from their (sum n_i, V) logits; returns the (R,) number of
    tokens each row unmasked, on the device (BlockView.read_step reads it back with the step's other flags).

    Rows sharing sampling params are processed as one matrix (sampling, scoring, the remasking choice, the
    writes); each row still draws its uniforms from its own generator, in its own order, so results do not
    depend on the batch. Nothing here reads a device value on the host.
    """
    masked, device = view.masked, logits.device
    counts = view.n_masked
    shared = view.shared
    shared.changed()
    unmasked = torch.zeros(len(rows), dtype=torch.long, device=device)
    for gid, (params, members) in enumerate(view.groups.items()):
        g_counts = [counts[i] for i in members]
        if len(view.groups) == 1:
            member_t = None
            g_logits, g_q_row, g_q_col = logits, view.q_row, view.q_col
            pick = lambda t: t
        else:  # this group's rows and queries; their numbers are known on the host, so no sync
            member_t = torch.nonzero_static(view.col["group"] == gid, size=len(members)).squeeze(1)
            q_sel = torch.nonzero_static(view.col["group"][view.q_row] == gid, size=sum(g_counts)).squeeze(1)
            g_logits, g_q_row, g_q_col = logits[q_sel], view.col["local"][view.q_row[q_sel]], view.q_col[q_sel]
            pick = lambda t: t[member_t]
        g_masked, g_slots, g_idx = pick(masked), pick(view.slots), pick(view.idx)
        g_rows = [rows[i] for i in members]
        policy = g_rows[0].remasking
        logp_all = processed_logprobs(g_logits, params)
        for r in g_rows:  # tree rollouts: a branch takes its own random stream from its branch step on
            if r.step in r.branch_seeds:
                r.generator.manual_seed(r.branch_seeds[r.step])
        uniforms = None
        if not params.greedy:
            uniforms = torch.cat([r.draw_uniforms(n, device) for n, r in zip(g_counts, g_rows)])
        tokens, logp = sample_tokens(logp_all, params, uniforms=uniforms)
        ent = entropy(logp_all) if policy.needs_entropy or params.record_entropy else None
        confidence = logp.exp()
        if g_rows[0].spec.confidence_source == "model" and not params.greedy:  # LLaDA: untempered probability
            confidence = torch.log_softmax(g_logits.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1).exp()
        if params.eoser_gamma_min is not None:
            q_gamma = pick(view.col["gamma"]).to(confidence.dtype)[g_q_row]
            confidence = torch.where(tokens == rows[0].spec.eos_token_id, confidence * q_gamma, confidence)
        dense = lambda q, fill: torch.full(g_masked.shape, fill, dtype=q.dtype, device=device).index_put_(
            (g_q_row, g_q_col), q)
        key_d = dense(policy.selection_key(logp_all, confidence), float("-inf"))
        ent_d = dense(ent, float("inf")) if ent is not None else None
        extra = {}
        if policy.needs_transfer_probability:  # Dream's origin: 1 - s/t of each row's step in its block
            extra["probability"] = pick(view.col["probability"])
        queries = BlockQueries(g_q_row, g_q_col, g_counts, [r.budget() for r in g_rows])
        where = (g_slots[:, None], g_idx)
        if params.record_steps:
            record_step(g_rows, shared.tokens[where], dense(tokens, 0), dense(logp.exp(), 0.0), g_masked)
        if policy.revisits_decoded:  # RCR: the block's decoded tokens compete with the new samples
            decided = policy.keep_batch(key_d, shared.confidence[where], g_masked, ~pick(view.response),
                                        pick(view.col["budget"]))
            chosen, remask = decided & g_masked, ~decided & ~g_masked
        else:
            chosen = policy.select_batch(key_d, ent_d, g_masked, pick(view.col["budget"]),
                                         [r.generator for r in g_rows], queries=queries, **extra)
            remask = None
        # Dense writes over each row's block (unchosen positions keep their values): no data-dependent sizes.
        shared.tokens[where] = torch.where(chosen, dense(tokens, 0), shared.tokens[where])
        shared.decoded[where] = shared.decoded[where] | chosen
        shared.step_map[where] = torch.where(chosen, pick(view.col["step"])[:, None], shared.step_map[where])
        shared.logprobs[where] = torch.where(chosen, dense(logp, 0.0), shared.logprobs[where])
        shared.confidence[where] = torch.where(chosen, key_d, shared.confidence[where])  # the ranking score
        if params.record_entropy:  # the sampling distribution's entropy where each token was drawn (AGRPO)
            shared.token_entropy[where] = torch.where(chosen, dense(ent, 0.0), shared.token_entropy[where])
        net = chosen.sum(dim=1)
        if remask is not None:
            mask_id = g_rows[0].spec.mask_token_id
            shared.tokens[where] = torch.where(remask, torch.full_like(shared.tokens[where], mask_id),
                                               shared.tokens[where])
            shared.decoded[where] = shared.decoded[where] & ~remask
            shared.step_map[where] = torch.where(remask, torch.full_like(shared.step_map[where], UNDECODED),
                                                 shared.step_map[where])
            shared.logprobs[where] = torch.where(remask, 0.0, shared.logprobs[where])
            shared.confidence[where] = torch.where(remask, 0.0, shared.confidence[where])
            shared.token_entropy[where] = torch.where(remask, 0.0, shared.token_entropy[where])
            net = net - remask.sum(dim=1)
        if member_t is None:
            unmasked = net
        else:
            unmasked[member_t] = net
        for r in g_rows:
            r.step += 1
            r.step_in_block += 1
    return unmasked


def record_step(rows: list[Row], block_tokens: torch.Tensor, sampled: torch.Tensor, probability: torch.Tensor,
                masked: torch.Tensor) -> None:
    """Keep, per row, its block before this step, the step's prediction (sampled tokens at every masked position)
    and their probabilities (SamplingParams.record_steps); Row.trajectory lays them over the whole response."""
    prediction = torch.where(masked, sampled, block_tokens)
    probability = torch.where(masked, probability, torch.zeros_like(probability))
    for i, row in enumerate(rows):
        row.step_records.append((row.block_start, block_tokens[i].clone(), prediction[i], probability[i]))


def forward_at(policy, input_ids: torch.Tensor, position_ids: torch.Tensor, attn_bias: torch.Tensor,
               rows: torch.Tensor, cols: torch.Tensor, cache=None) -> torch.Tensor:
    """One forward; logits (N, V) only at query positions (rows[i], cols[i]): the vocabulary projection is a large
    share of a small model's cost and only the positions being sampled need it."""
    sync_counter.note_step()
    if policy.native:
        out = policy.forward(input_ids, position_ids, attn_bias, past_key_values=cache, use_cache=cache is not None,
                             compute_logits=False, return_hidden=True)
        return policy.logits_from_hidden(out.hidden[rows, cols])
    if cache is not None:
        raise ValueError("KV-cached decoding needs a transformers-native model; use kv_cache='none' for "
                         "models that ship their own code")
    out = policy.forward(input_ids, position_ids, attn_bias)
    return out.logits[rows, cols]
