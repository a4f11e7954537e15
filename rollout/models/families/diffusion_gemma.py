"""DiffusionGemma (transformers' DiffusionGemmaForBlockDiffusion) as a diffrl policy.

The model is an encoder-decoder block-diffusion LM: a causal encoder writes the prompt (and every finished canvas)
into a KV cache; a bidirectional decoder reads that cache and denoises a canvas of `canvas_length` tokens, with
self-conditioning on the previous step's (temperature-processed) logits. There is no mask token: a canvas starts
as uniformly random tokens and rejected positions are re-noised to random tokens (the sampler lives in
diffusion_gemma_sampler.py).

The adapter drives transformers' own modules and mask builders, exactly as the class's `generate` calls them
(`model.model.encoder`, `create_masks_for_generate`, `create_diffusion_decoder_attention_mask`, the model's
`forward` with `decoder_input_ids`): `encode` extends the cache by one chunk, `denoise` returns one step's raw
logits. It offers the attributes the learner and the weight sync read from a DiffusionPolicy (model, causal_lm,
tokenizer, spec, source, device, dtype, native=False so packed rows are refused).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rollout.models.families.config_checks import check_counts, check_numbers, config_errors, tensor_names
from rollout.models.spec import ModelLoadError

KIND = "diffusion_gemma"
MODEL_TYPE = "diffusion_gemma"


@dataclass(frozen=True)
class DiffusionGemmaSpec:
    """What decoding and training need to know about a DiffusionGemma checkpoint."""

    canvas_length: int
    vocab_size: int
    pad_token_id: int
    eos_token_ids: tuple[int, ...]
    kind: str = KIND
    attention: str = "encoder_decoder"  # causal encoder cache + bidirectional canvas decoder

    def __post_init__(self) -> None:
        if self.canvas_length < 1:
            raise ModelLoadError(f"config.json: canvas_length must be >= 1, got {self.canvas_length}")
        if not self.eos_token_ids:
            raise ModelLoadError("config.json: DiffusionGemma needs an eos token (generation_config or text_config)")

    @property
    def block_size(self) -> int:  # the canvas is the decoding block
        return self.canvas_length

    @property
    def eos_token_id(self) -> int:
        return self.eos_token_ids[0]

    @property
    def is_block(self) -> bool:
        return True

    def to_dict(self) -> dict:
        data = asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        data["block_size"] = self.canvas_length  # what launch/ reads to fill rollout.block_size
        return data


class DiffusionGemmaPolicy:
    """A DiffusionGemmaForBlockDiffusion plus its spec and tokenizer."""

    native = False  # no [prompt | clean | noisy] training layout: packed scoring rows do not apply
    attention_kernel = "auto"

    def __init__(self, model: torch.nn.Module, tokenizer, spec: DiffusionGemmaSpec, source: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.source = dict(source or {})

    def with_model(self, model: torch.nn.Module) -> "DiffusionGemmaPolicy":
        """The same policy around another copy of the weights (the learner's frozen KL reference)."""
        return DiffusionGemmaPolicy(model, self.tokenizer, self.spec, self.source)

    @property
    def causal_lm(self) -> torch.nn.Module:
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return int(self.causal_lm.config.text_config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    # ----------------------------------------------------------------------------------------------- forward
    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.causal_lm.config.get_text_config(decoder=True))

    def encode(self, chunk: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache):
        """Run the causal encoder on `chunk` (B, T), appending its keys/values to `cache` (as generate's step
        1.a). attention_mask: (B, cached + T) bool over everything encoded so far; position_ids (1, T)."""
        lm = self.causal_lm
        chunk = chunk.clone(memory_format=torch.contiguous_format)
        shape_only = torch.empty((chunk.shape[0], chunk.shape[1], 0), dtype=self.dtype, device=chunk.device)
        masks = lm.model.encoder.create_masks_for_generate(
            config=lm.config, inputs_embeds=shape_only, attention_mask=attention_mask, past_key_values=cache,
            position_ids=position_ids, mm_token_type_ids=None)
        out = lm.model.encoder(input_ids=chunk, attention_mask=masks, past_key_values=cache, position_ids=position_ids)
        return out.past_key_values

    def decoder_masks(self, canvas: torch.Tensor, cache, decoder_attention_mask: torch.Tensor):
        """The decoder's per-layer-type masks for one canvas (generate's step 1.b); decoder_attention_mask:
        (B, cached + C) bool."""
        lm = self.causal_lm
        return lm.model.decoder.create_diffusion_decoder_attention_mask(
            config=lm.config, inputs_embeds=canvas.unsqueeze(-1), past_key_values=cache,
            decoder_attention_mask=decoder_attention_mask)

    def denoise(self, canvas: torch.Tensor, self_conditioning: torch.Tensor | None, masks, cache,
                position_ids: torch.Tensor) -> torch.Tensor:
        """Raw (soft-capped, float32) logits (B, C, V) of one denoising step on `canvas`, read-only on `cache`."""
        out = self.causal_lm(decoder_input_ids=canvas, self_conditioning_logits=self_conditioning,
                         decoder_attention_mask=masks, past_key_values=cache, decoder_position_ids=position_ids)
        return out.logits

    def logits(self, prompt: torch.Tensor, canvas: torch.Tensor,
               self_conditioning: torch.Tensor | None = None) -> torch.Tensor:
        """One decoder step on `canvas` (B, C) after encoding an unpadded `prompt` (B, P): encode + denoise."""
        batch, length = prompt.shape
        ones = torch.ones((batch, length), dtype=torch.bool, device=prompt.device)
        cache = self.encode(prompt, ones, torch.arange(length, device=prompt.device)[None], self.new_cache())
        dec_mask = torch.nn.functional.pad(ones, (0, canvas.shape[1]), value=True)
        positions = torch.arange(length, length + canvas.shape[1], device=prompt.device)[None]
        return self.denoise(canvas, self_conditioning, self.decoder_masks(canvas, cache, dec_mask), cache, positions)


# ------------------------------------------------------------------------------------------- load / build
def is_diffusion_gemma(config: dict) -> bool:
    return str(config.get("model_type", "")).lower() == MODEL_TYPE


def spec_from_model(model, tokenizer) -> DiffusionGemmaSpec:
    config, text = model.config, model.config.text_config
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = text.eos_token_id if text.eos_token_id is not None else tokenizer.eos_token_id
    eos = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = text.pad_token_id if text.pad_token_id is not None else eos[0]
    return DiffusionGemmaSpec(canvas_length=int(config.canvas_length), vocab_size=int(text.vocab_size),
                              pad_token_id=int(pad), eos_token_ids=eos)


def load_diffusion_gemma(path: str | Path, *, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu", attn_implementation: str | None = None,
                         block_size: int | None = None) -> DiffusionGemmaPolicy:
    """Load a DiffusionGemma checkpoint directory onto transformers' own class (no remote code)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from rollout.models.loading import _load_tokenizer

    path = Path(path)
    config = json.loads((path / "config.json").read_text())  # read (and found to be JSON) by load_policy
    check_config_sizes(config, path)
    tokenizer = _load_tokenizer(path, False)
    with config_errors(path / "config.json", "DiffusionGemma"):
        try:
            model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), dtype=dtype,
                                                                    attn_implementation=attn_implementation or "sdpa")
        except OSError as err:
            raise ModelLoadError(f"{path}: DiffusionGemma weights failed to load ({err.__class__.__name__}: "
                                 f"{err})") from None
    model.to(device)
    model.eval()
    spec = spec_from_model(model, tokenizer)
    if block_size is not None and block_size != spec.canvas_length:
        raise ModelLoadError(f"model.block_size: {block_size} != the checkpoint's canvas_length {spec.canvas_length} "
                             f"({path / 'config.json'}); DiffusionGemma decodes whole canvases")
    return DiffusionGemmaPolicy(model, tokenizer, spec,
                                {"format": KIND, "config": config, "dir": str(path), "remote_code": False})


def check_config_sizes(config: dict, path: Path) -> None:
    """The sizes transformers would build, bounded by the weights (layers) and the positions (canvas_length)
    before anything is built: one line naming config.json and the field."""
    config_file = path / "config.json"
    text, vision = config.get("text_config"), config.get("vision_config")
    if not isinstance(text, dict):
        raise ModelLoadError(f"{config_file}: text_config must be an object, got {text!r}")
    check_numbers(config, config_file, positive_ints=("canvas_length",))
    check_numbers(text, config_file, positive_ints=("num_hidden_layers", "max_position_embeddings", "vocab_size",
                                                    "hidden_size"), prefix="text_config.")
    canvas, positions = config.get("canvas_length"), text.get("max_position_embeddings")
    if canvas is not None and positions is not None and canvas > positions:
        raise ModelLoadError(f"{config_file}: canvas_length {canvas} exceeds text_config.max_position_embeddings "
                             f"{positions}")
    counts = {"text_config.num_hidden_layers": (text.get("num_hidden_layers", 0),
                                                r"^model\.decoder\.layers\.(\d+)\.")}
    if isinstance(vision, dict):
        counts["vision_config.num_hidden_layers"] = (vision.get("num_hidden_layers", 0),
                                                     r"^model\.encoder\.vision_tower\.encoder\.layers\.(\d+)\.")
    check_counts(tensor_names(path), config_file, counts)


# The released checkpoint's generation_config.json (google/diffusiongemma-26B-A4B-it, as transformers 5.23's
# DiffusionGemmaGenerationConfig._get_default_generation_params also has it): the sampler defaults.
PUBLISHED_SAMPLER = {"max_denoising_steps": 48, "entropy_bound": 0.1, "t_min": 0.4, "t_max": 0.8,
                     "stability_threshold": 1, "confidence_threshold": 0.005, "max_new_tokens": 256}


def make_tiny_diffusion_gemma(out_dir: str | Path, *, seed: int = 0, canvas_length: int = 8, hidden_size: int = 32,
                              num_layers: int = 2, num_heads: int = 2, num_kv_heads: int = 1, head_dim: int = 16,
                              num_experts: int = 4, sliding_window: int = 16,
                              max_denoising_steps: int = PUBLISHED_SAMPLER["max_denoising_steps"]) -> Path:
    """Write a random-init tiny DiffusionGemma checkpoint (small character tokenizer, MoE layers, a tiny vision
    tower the class requires) with the published sampler settings in generation_config.json."""
    from transformers import (DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig)
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (DiffusionGemmaGenerationConfig,
                                                                                 EntropyBoundSamplerConfig)

    from rollout.models.loading import save_tokenizer
    from rollout.models.tiny import small_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = small_tokenizer()
    vocab = (len(tokenizer) + 3 + 63) // 64 * 64  # + image / boi / eoi ids, padded like real checkpoints
    text = DiffusionGemmaTextConfig(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        global_head_dim=head_dim, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, sliding_window=sliding_window,
        num_experts=num_experts, top_k_experts=2, moe_intermediate_size=hidden_size,
        layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"])
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8, position_embedding_size=64, patch_size=4,
                  pooling_kernel_size=1)
    config = DiffusionGemmaConfig(text_config=text.to_dict(), vision_config=vision, canvas_length=canvas_length,
                                  image_token_id=vocab - 1, boi_token_id=vocab - 2, eoi_token_id=vocab - 3)
    with torch.random.fork_rng(devices=[]):  # weight init draws from the global RNG: leave the caller's alone
        torch.manual_seed(seed)
        model = DiffusionGemmaForBlockDiffusion(config)
    p = PUBLISHED_SAMPLER
    model.generation_config = DiffusionGemmaGenerationConfig(
        max_new_tokens=4 * canvas_length, max_denoising_steps=max_denoising_steps,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=p["entropy_bound"]), t_min=p["t_min"],
        t_max=p["t_max"], stability_threshold=p["stability_threshold"],
        confidence_threshold=p["confidence_threshold"], eos_token_id=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_tokenizer(tokenizer, out_dir, qwen_family=False)
    spec = spec_from_model(model, tokenizer)
    (out_dir / "diffrl.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    return out_dir
