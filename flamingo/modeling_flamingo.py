"""Flamingo on transformers: a CLIP vision tower, a perceiver resampler, and gated cross-attention blocks inserted
before every N-th layer of any decoder-only language model.

Data flows one way and nothing is stored on modules between calls:

    vision_x (B, T_img, F, 3, H, W) -> CLIP patch tokens -> perceiver -> media (B, T_img, latents, D_media)
    input_ids (B, L) -> media_positions (B, L): which image each token attends to (0 = none)
    lang_encoder(input_ids, media=..., media_positions=...) -> every FlamingoLayer runs its gated cross-attention
    on its input hidden states, then the original decoder layer.
"""

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, CLIPVisionModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_flamingo import FlamingoConfig

logger = logging.get_logger(__name__)

# Where known decoder families keep their layer list; anything else is found by a generic search.
DECODER_LAYERS_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "gpt_neox.layers",
    "transformer.h",
    "transformer.blocks",
)


def compute_media_positions(
    input_ids: torch.LongTensor, media_token_id: int, attend_previous: bool
) -> torch.LongTensor:
    """For every token, the 1-based index of the image it attends to, or 0 for none (reference §1.3).

    `attend_previous=True`: the image introduced by the latest `<image>` token at or before the token.
    `attend_previous=False` (OpenFlamingo v1 inference): an `<image>` token sees its own image, plain text sees the
    *next* image, and text after the row's last image sees nothing.
    """
    is_media = input_ids == media_token_id  # (B, L)
    positions = is_media.long().cumsum(dim=-1)
    if not attend_previous:
        positions = torch.where(is_media, positions, positions + 1)
        images_in_row = is_media.sum(dim=-1, keepdim=True)
        positions = positions.masked_fill(positions > images_in_row, 0)
    return positions


class MediaCache:
    """Per-call cache of the media keys/values of each cross-attention block, so that `generate()` projects the
    perceiver latents once per call instead of at every step. It lives in the generation kwargs, like the KV
    cache; modules never hold it."""

    def __init__(self):
        self.key_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self):
        return len(self.key_values)


@dataclass
class FlamingoCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the media features and the per-call media key/value cache."""

    media: torch.FloatTensor | None = None
    media_cache: MediaCache | None = None


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear, bias-free Linears (indices 0, 1, 3 in the published keys)."""
    inner = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


@functools.cache
def xformers_ops():
    """`xformers.ops` when the optional `xformers` package imports, else None (looked up once per process)."""
    try:
        import xformers.ops as ops
    except ImportError:
        return None
    return ops


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    use_xformers: bool | None = None,
) -> torch.Tensor:
    """Attention of the perceiver and the cross-attention. q: (N, heads, Lq, dh); k, v: (N, heads, Lk, dh);
    attn_mask: boolean, broadcastable to (N, heads, Lq, Lk), True = may attend. Returns (N, heads, Lq, dh).

    PyTorch's SDPA, or xformers' memory-efficient kernel when xformers is installed and the tensors are on CUDA
    (`use_xformers=None`); True/False forces the choice."""
    ops = xformers_ops() if use_xformers is not False else None
    if use_xformers is None:
        use_xformers = q.is_cuda and ops is not None
    if not use_xformers:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if ops is None:
        raise ImportError("use_xformers=True needs the `xformers` package (pip install 'otter-flamingo[xformers]')")
    bias = None
    if attn_mask is not None:
        # xformers wants an additive bias whose rows start at 16-byte-aligned addresses: allocate the key axis
        # padded to a multiple of 8 and use a view of it.
        n, heads, length_q, length_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        padded = -(-length_k // 8) * 8
        bias = q.new_zeros(n, heads, length_q, padded)[..., :length_k]
        bias.masked_fill_(~attn_mask, float("-inf"))
    # xformers' layout is (N, L, heads, dh)
    out = ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, L, heads * dim_head) -> (N, heads, L, dim_head)"""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(N, heads, L, dim_head) -> (N, L, heads * dim_head)"""
    return x.transpose(1, 2).flatten(2)


class PerceiverBlock(nn.Module):
    """Latents attend to the media tokens and to themselves, then a feed-forward; both residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.feed_forward = feed_forward(dim, ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # media: (N, M, D) tokens of one image or video; latents: (N, n, D)
        normed_media = self.norm_media(media)
        normed_latents = self.norm_latents(latents)
        q = split_heads(self.to_q(normed_latents), self.heads)
        k, v = self.to_kv(torch.cat([normed_media, normed_latents], dim=1)).chunk(2, dim=-1)
        attended = attend(q, split_heads(k, self.heads), split_heads(v, self.heads))
        latents = latents + self.to_out(merge_heads(attended))
        return latents + self.feed_forward(latents)


class PerceiverResampler(nn.Module):
    """Compresses the patch tokens of each image (all its frames together) to `num_latents` latents."""

    def __init__(self, config: FlamingoConfig):
        super().__init__()
        dim = config.media_dim
        self.latents = nn.Parameter(torch.empty(config.perceiver_num_latents, dim))
        self.frame_embs = nn.Parameter(torch.empty(config.max_num_frames, dim)) if config.max_num_frames else None
        self.layers = nn.ModuleList(
            PerceiverBlock(dim, config.perceiver_heads, config.perceiver_dim_head, config.perceiver_ff_mult)
            for _ in range(config.perceiver_depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # patches: (B, T_img, F, v, D) -> media: (B, T_img, num_latents, D)
        batch, num_media, num_frames = patches.shape[:3]
        if self.frame_embs is not None:
            if num_frames > self.frame_embs.shape[0]:
                raise ValueError(
                    f"vision_x has {num_frames} frames per image but config.max_num_frames is "
                    f"{self.frame_embs.shape[0]}"
                )
            patches = patches + self.frame_embs[:num_frames, None, :].to(patches.dtype)
        tokens = patches.flatten(2, 3).flatten(0, 1)  # (B*T_img, F*v, D)
        latents = self.latents.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(tokens, latents)
        return self.norm(latents).unflatten(0, (batch, num_media))


class MaskedCrossAttention(nn.Module):
    """Text tokens attend to the latents of one image: the one `media_positions` names (0 = none, output 0)."""

    def __init__(self, dim: int, media_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def media_key_values(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # media: (B, T_img, n, D_media) -> keys and values (B, heads, T_img * n, dim_head)
        # No device move here: under accelerate offload the weight is on "meta" outside `to_kv`'s own forward; the
        # caller puts media on the hidden states' device and `to_kv`'s hook (if any) does the rest.
        media = media.flatten(1, 2).to(dtype=self.to_kv.weight.dtype)
        k, v = self.to_kv(media).chunk(2, dim=-1)
        return split_heads(k, self.heads), split_heads(v, self.heads)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_values: tuple[torch.Tensor, torch.Tensor],
        media_positions: torch.LongTensor,
        num_media: int,
    ) -> torch.Tensor:
        # hidden_states: (B, L, D); media_positions: (B, L) in 0..; keys: (B, heads, num_media * n, dh)
        keys, values = key_values
        latents_per_media = keys.shape[2] // num_media
        media_time = torch.arange(1, num_media + 1, device=keys.device).repeat_interleave(latents_per_media)
        positions = media_positions.to(keys.device)
        allowed = positions[:, None, :, None] == media_time  # (B, 1, L, T_img * n)
        sees_media = (positions >= 1) & (positions <= num_media)  # (B, L)
        # A row with nothing to attend to would make the softmax NaN: let it attend anywhere, then zero it.
        attn_mask = allowed | ~sees_media[:, None, :, None]
        q = split_heads(self.to_q(self.norm(hidden_states)), self.heads)
        attended = attend(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=attn_mask)
        attended = merge_heads(attended) * sees_media[..., None].to(q.dtype)
        return self.to_out(attended)


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(attn_gate) * XAttn(x, media), then x + tanh(ff_gate) * FF(x). Gates start at 0 (identity)."""

    def __init__(self, dim: int, media_dim: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, media_dim, heads, dim_head)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.feed_forward = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_values: tuple[torch.Tensor, torch.Tensor] | None,
        media_positions: torch.LongTensor | None,
        num_media: int,
    ) -> torch.Tensor:
        if key_values is not None:
            attended = self.attn(hidden_states, key_values, media_positions, num_media)
            hidden_states = hidden_states + self.attn_gate.tanh().to(hidden_states.dtype) * attended
        # The feed-forward runs on every token, with or without images (as in the reference).
        return hidden_states + self.ff_gate.tanh().to(hidden_states.dtype) * self.feed_forward(hidden_states)


class FlamingoLayer(GradientCheckpointingLayer):
    """Wraps one decoder layer: runs its gated cross-attention block (if any) on the layer's input hidden states,
    then the original layer with all its arguments untouched."""

    def __init__(self, decoder_layer: nn.Module, gated_cross_attn_layer: GatedCrossAttentionBlock | None, index: int):
        super().__init__()
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.decoder_layer = decoder_layer
        self.index = index

    def forward(
        self,
        hidden_states: torch.Tensor,
        *args,
        media: torch.Tensor | None = None,
        media_positions: torch.LongTensor | None = None,
        media_cache: MediaCache | None = None,
        **kwargs,
    ):
        if self.gated_cross_attn_layer is not None:
            key_values = None
            if media is not None:
                key_values = media_cache.key_values.get(self.index) if media_cache is not None else None
                if key_values is None:
                    key_values = self.gated_cross_attn_layer.attn.media_key_values(media.to(hidden_states.device))
                    if media_cache is not None:
                        media_cache.key_values[self.index] = key_values
            hidden_states = self.gated_cross_attn_layer(
                hidden_states, key_values, media_positions, 0 if media is None else media.shape[1]
            )
        return self.decoder_layer(hidden_states, *args, **kwargs)


def find_decoder_layers(lang_encoder: nn.Module, num_layers: int) -> tuple[nn.Module, str]:
    """Return (parent module, attribute name) of the decoder's layer list: known paths first, then the first
    `nn.ModuleList` with `num_layers` entries."""
    for path in DECODER_LAYERS_PATHS:
        parent_path, _, name = path.rpartition(".")
        parent = lang_encoder.get_submodule(parent_path) if _has_submodule(lang_encoder, parent_path) else None
        if isinstance(getattr(parent, name, None), nn.ModuleList) and len(getattr(parent, name)) == num_layers:
            return parent, name
    for module_name, module in lang_encoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            parent_path, _, name = module_name.rpartition(".")
            return lang_encoder.get_submodule(parent_path), name
    raise ValueError(
        f"could not find the decoder layer list of {type(lang_encoder).__name__}: expected an nn.ModuleList of "
        f"{num_layers} layers (config.text_config.num_hidden_layers)"
    )


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


class FlamingoCLIPVisionModel(CLIPVisionModel):
    """transformers' `CLIPVisionModel`, unchanged. Defining it here keeps transformers' CLIP key renaming (which
    strips `vision_model.` on load and adds it back on save) away from our keys, which are literally the published
    `vision_encoder.vision_model.*`."""

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers decides by reading the source of the class's module: CLIP's module is the one that counts.
        return CLIPVisionModel._can_set_attn_implementation()


class FlamingoVisionEncoder(nn.Module):
    """Holds the CLIP vision tower as `vision_model`, so parameter names are `vision_encoder.vision_model.*` as in
    the published checkpoints, whatever transformers' own CLIP module tree looks like."""

    def __init__(self, config):
        super().__init__()
        self.vision_model = FlamingoCLIPVisionModel(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> patch tokens (N, v, D): CLS dropped, before post_layernorm (= open_clip <= 2.22 tokens).
        return self.vision_model(pixel_values=pixel_values).last_hidden_state[:, 1:]


class FlamingoPreTrainedModel(PreTrainedModel):
    config: FlamingoConfig
    config_class = FlamingoConfig
    base_model_prefix = "flamingo"
    main_input_name = "input_ids"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["FlamingoLayer", "PerceiverBlock", "CLIPEncoderLayer"]
    _skip_keys_device_placement = ["cache", "media_cache"]
    # Every transformers quantizer leaves these unconverted, and loading in float16 keeps them in float32: the vision
    # tower, the perceiver and the gate scalars stay in high precision.
    _keep_in_fp32_modules = ["vision_encoder", "perceiver", "attn_gate", "ff_gate"]
    # What `from_pretrained` puts in a quantization_config whose skip list (`llm_int8_skip_modules`,
    # `modules_to_not_convert`) is unset: the trainable cross-attention blocks and the output head stay unquantised
    # as well, so only the LM body is quantised.
    _quantization_skip_modules = [r".*\.gated_cross_attn_layer", "lang_encoder.lm_head"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # Leftovers of older transformers / OpenFlamingo aliases in published checkpoints: ignored on load.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq", r"lang_encoder\.gated_cross_attn_layers\."]

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # The perceiver and the cross-attention always run SDPA; `set_attn_implementation` switches the LM and CLIP.
        return True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PerceiverResampler):
            init.normal_(module.latents, mean=0.0, std=1.0)
            if module.frame_embs is not None:
                # Zeros, never random: a checkpoint without frame embeddings then means "no frame information".
                init.zeros_(module.frame_embs)
        elif isinstance(module, GatedCrossAttentionBlock):
            init.zeros_(module.attn_gate)
            init.zeros_(module.ff_gate)

    def _adjust_missing_and_unexpected_keys(self, loading_info):
        # transformers drops the ignorable keys silently: say at debug level what was dropped, and warn about frame
        # embeddings a checkpoint lacks (converted before June 2023) since _init_weights has just zeroed them.
        unexpected = set(loading_info.unexpected_keys)
        super()._adjust_missing_and_unexpected_keys(loading_info)
        dropped = sorted(unexpected - set(loading_info.unexpected_keys))
        if dropped:
            logger.debug(f"ignored {len(dropped)} checkpoint keys (legacy buffers / aliases): {', '.join(dropped)}")
        missing_frames = [key for key in loading_info.missing_keys if key.endswith("perceiver.frame_embs")]
        if missing_frames:
            logger.warning(
                f"{missing_frames[0]} is not in the checkpoint but config.max_num_frames={self.config.max_num_frames}: "
                "the frame embeddings are initialised to zeros (no frame information), not random"
            )

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs):
        if enable and getattr(kwargs.get("gradient_checkpointing_func"), "keywords", {}).get("use_reentrant"):
            raise ValueError(
                "use_reentrant=True is not supported: media reach the wrapper layers as keyword arguments, which "
                "reentrant checkpointing cannot differentiate through (the perceiver would get no or broken "
                "gradients). Use the default, gradient_checkpointing_kwargs={'use_reentrant': False}."
            )
        super()._set_gradient_checkpointing(enable, *args, **kwargs)
        # The wrapper checkpoints the decoder layer with its cross-attention; checkpointing the inner layer
        # again would only recompute it twice.
        for module in self.modules():
            if isinstance(module, FlamingoLayer) and hasattr(module.decoder_layer, "gradient_checkpointing"):
                module.decoder_layer.gradient_checkpointing = False


class FlamingoForConditionalGeneration(FlamingoPreTrainedModel, GenerationMixin):
    """Flamingo: `vision_encoder` (CLIPVisionModel), `perceiver`, and `lang_encoder` (the causal LM whose decoder
    layers are wrapped in `FlamingoLayer`s). Parameter names equal the published HF checkpoints' keys."""

    def __init__(self, config: FlamingoConfig):
        super().__init__(config)
        self.vision_encoder = FlamingoVisionEncoder(config.vision_config)
        self.perceiver = PerceiverResampler(config)
        # One dtype for the whole model (the one it is being built in): published 2024 configs carry
        # text_config.torch_dtype="float16" under a float32 top level, which from_config would otherwise honour for
        # the LM alone and leave the cross-attention blocks in another dtype.
        self.lang_encoder = AutoModelForCausalLM.from_config(config.text_config, dtype=torch.get_default_dtype())
        self._wrap_decoder_layers()
        self.post_init()
        self.apply_trainable_flags()
        self.stop_generation_at_end_of_chunk()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        quantization_config = kwargs.get("quantization_config")
        for field in ("llm_int8_skip_modules", "modules_to_not_convert"):
            if getattr(quantization_config, field, "unset") is None:
                kwargs["quantization_config"] = quantization_config = copy.copy(quantization_config)
                setattr(quantization_config, field, list(cls._quantization_skip_modules))
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # Loading materialises fresh parameters; the config, not the loader, says which of them train.
        model.apply_trainable_flags()
        # Published checkpoints ship the LLaMA generation config, which knows nothing of <|endofchunk|>.
        model.stop_generation_at_end_of_chunk()
        if getattr(model.config, "lora_config", None):
            logger.warning(
                f"config.lora_config={model.config.lora_config} is kept but not applied: no LoRA adapters are built, "
                "so only merged weights load. Merge adapters first (peft merge_and_unload) or add them with peft."
            )
        return loaded

    def stop_generation_at_end_of_chunk(self, eos_token_id: int | list[int] | None = None):
        """Make `generate()` stop at `<|endofchunk|>` (as the reference does) as well as at the LM's EOS, and pad
        with the family's pad token. Other generation settings are left as they are.

        `eos_token_id`: the tokenizer's EOS. Given (as `FlamingoProcessor.resize_model_embeddings` does), the stop
        tokens become exactly `[<|endofchunk|>, eos]`, dropping stale ids; otherwise `<|endofchunk|>` is put in
        front of the generation config's own stop tokens.

        The pad token is the first of:
        - `config.pad_token_id`: the tokenizer's pad, recorded by `FlamingoProcessor.resize_model_embeddings`;
        - Otter's `<PAD>` in the published layout: the row after `<answer>`, when it is the embeddings' last row
          (`answer_token_id + 2 == text_config.vocab_size`; 32003 in the LLaMA releases, whose shipped generation
          config pads with LLaMA's 0 = `<unk>`);
        - the generation config's own pad, else `text_config.pad_token_id` (the LM's pad). Flamingo configs carry
          no `<PAD>` id, so a Flamingo model pads with these unless a processor recorded its tokenizer's pad.
        """
        generation_config = self.generation_config
        if generation_config is None:
            return
        config = self.config
        end_of_chunk = config.endofchunk_token_id
        if end_of_chunk is not None:
            given = eos_token_id is not None
            eos = eos_token_id if given else generation_config.eos_token_id
            eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
            if given or end_of_chunk not in eos:
                generation_config.eos_token_id = [end_of_chunk, *(token for token in eos if token != end_of_chunk)]
        pad = getattr(config, "pad_token_id", None)
        answer = getattr(config, "answer_token_id", None)
        if pad is None and answer is not None and answer + 2 == getattr(config.text_config, "vocab_size", None):
            pad = answer + 1
        if pad is None:
            pad = generation_config.pad_token_id
        if pad is None:
            pad = getattr(config.text_config, "pad_token_id", None)
        generation_config.pad_token_id = pad

    def _wrap_decoder_layers(self):
        text_config = self.config.text_config
        parent, name = find_decoder_layers(self.lang_encoder, text_config.num_hidden_layers)
        cross_attn_indices = set(self.config.cross_attn_layer_indices())
        wrapped = []
        for index, decoder_layer in enumerate(getattr(parent, name)):
            block = None
            if index in cross_attn_indices:
                block = GatedCrossAttentionBlock(
                    dim=text_config.hidden_size,
                    media_dim=self.config.media_dim,
                    heads=self.config.cross_attn_heads,
                    dim_head=self.config.cross_attn_dim_head,
                    ff_mult=self.config.cross_attn_ff_mult,
                )
            wrapped.append(FlamingoLayer(decoder_layer, block, index))
        setattr(parent, name, nn.ModuleList(wrapped))

    # ----- which parameters train -------------------------------------------------------------------------------

    def apply_trainable_flags(self):
        """Freeze or unfreeze each part as the config says: the perceiver and the cross-attention blocks always
        train; the vision tower and the LM body follow `freeze_*`; the input embeddings follow
        `train_embeddings` and the output head `train_lm_head` (Otter trains both)."""
        config = self.config
        if getattr(self, "is_quantized", False):
            return  # quantised weights cannot take gradients; adapters (peft) decide what trains
        self.vision_encoder.requires_grad_(not config.freeze_vision_encoder)
        self.lang_encoder.requires_grad_(not config.freeze_lang_encoder)
        self.perceiver.requires_grad_(True)
        for layer in self.decoder_layers():
            if layer.gated_cross_attn_layer is not None:
                layer.gated_cross_attn_layer.requires_grad_(True)
        if getattr(config, "train_embeddings", True):
            self.get_input_embeddings().requires_grad_(True)
        output_embeddings = self.get_output_embeddings()
        if getattr(config, "train_lm_head", False) and output_embeddings is not None:
            output_embeddings.requires_grad_(True)

    def decoder_layers(self) -> nn.ModuleList:
        parent, name = find_decoder_layers(self.lang_encoder, self.config.text_config.num_hidden_layers)
        return getattr(parent, name)

    def get_input_embeddings(self) -> nn.Module:
        return self.lang_encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.lang_encoder.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lang_encoder.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module):
        self.lang_encoder.set_output_embeddings(value)

    # ----- vision -----------------------------------------------------------------------------------------------

    def check_vision_x(self, vision_x: torch.Tensor, batch_size: int | None = None):
        """Raise a ValueError that says what was expected when `vision_x` is not (B, T_img, F, C, H, W)."""
        vision_config = self.config.vision_config
        expected = (vision_config.num_channels, vision_config.image_size, vision_config.image_size)
        if not isinstance(vision_x, torch.Tensor) or vision_x.dim() != 6:
            got = tuple(vision_x.shape) if isinstance(vision_x, torch.Tensor) else type(vision_x).__name__
            raise ValueError(f"vision_x: expected a 6-d tensor (B, T_img, F, C, H, W), got shape {got}")
        if tuple(vision_x.shape[3:]) != expected:
            raise ValueError(
                f"vision_x: expected images of (C, H, W) = {expected}, got {tuple(vision_x.shape[3:])} "
                f"(full shape {tuple(vision_x.shape)})"
            )
        if vision_x.shape[1] == 0 or vision_x.shape[2] == 0:
            raise ValueError(
                f"vision_x: expected at least one image (T_img >= 1) of at least one frame (F >= 1), got shape "
                f"{tuple(vision_x.shape)}; pass vision_x=None for text-only input"
            )
        if batch_size is not None and vision_x.shape[0] != batch_size:
            raise ValueError(
                f"vision_x has batch size {vision_x.shape[0]} but input_ids has batch size {batch_size}; "
                "give every sample its images (pad with all-zero images where a sample has fewer)"
            )

    def get_media_features(self, vision_x: torch.Tensor) -> torch.Tensor:
        """(B, T_img, F, C, H, W) pixels -> (B, T_img, num_latents, D_media) perceiver latents."""
        self.check_vision_x(vision_x)
        batch, num_media, num_frames = vision_x.shape[:3]
        pixels = vision_x.flatten(0, 2).to(self.vision_encoder.vision_model.dtype)
        patches = self.vision_encoder(pixels)
        patches = patches.unflatten(0, (batch, num_media, num_frames))  # (B, T_img, F, v, D)
        return self.perceiver(patches.to(self.perceiver.latents.dtype))

    def media_positions_for(self, input_ids: torch.LongTensor, num_media: int) -> torch.LongTensor:
        """Media positions of a full sequence, after checking it has no more `<image>` tokens than images."""
        media_token_id = self.config.media_token_id
        if media_token_id is None:
            raise ValueError("config.media_token_id is None: set the id of the <image> token before passing images")
        most = int((input_ids == media_token_id).sum(dim=-1).max()) if input_ids.numel() else 0
        if most > num_media:
            raise ValueError(
                f"a prompt has {most} <image> tokens but vision_x holds only {num_media} images per sample "
                f"(T_img={num_media}); give one image per <image> token"
            )
        return compute_media_positions(input_ids, media_token_id, self._attend_previous())

    def _attend_previous(self) -> bool:
        if self.training and self.config.use_media_placement_augmentation:
            return bool(torch.rand(()) < 0.5)
        return self.config.only_attend_previous

    # ----- forward ------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        vision_x: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        media: torch.FloatTensor | None = None,
        media_positions: torch.LongTensor | None = None,
        media_cache: MediaCache | None = None,
        lang_x: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> FlamingoCausalLMOutputWithPast:
        r"""
        vision_x (`torch.FloatTensor` of shape `(B, T_img, F, C, H, W)`): the images of each sample along T_img,
            video frames along F.
        media (`torch.FloatTensor` of shape `(B, T_img, num_latents, D_media)`): precomputed perceiver output,
            instead of `vision_x`.
        media_positions (`torch.LongTensor` of shape `(B, L)`): the 1-based image each token attends to (0 =
            none); computed from `input_ids` when not given.
        media_cache (`MediaCache`): per-call cache of the cross-attention keys/values of `media`.
        lang_x: alias of `input_ids` (the original OpenFlamingo/Otter name).
        """
        if input_ids is None:
            input_ids = lang_x
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if vision_x is not None and media is None:
            self.check_vision_x(vision_x, batch_size)
            media = self.get_media_features(vision_x)
        if media is not None:
            if media.shape[0] != batch_size:
                raise ValueError(f"media has batch size {media.shape[0]} but input_ids has batch size {batch_size}")
            if media_positions is None:
                if input_ids is None:
                    raise ValueError("media_positions are required when images come with inputs_embeds")
                media_positions = self.media_positions_for(input_ids, media.shape[1])
            if use_cache and media_cache is None:
                media_cache = MediaCache()

        outputs = self.lang_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            media=media,
            media_positions=media_positions,
            media_cache=media_cache,
            **kwargs,
        )
        logits = outputs.logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return FlamingoCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            media=media,
            media_cache=media_cache if use_cache else None,
        )

    # ----- generation ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        vision_x: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        media: torch.FloatTensor | None = None,
        lang_x: torch.LongTensor | None = None,
        **kwargs,
    ):
        """Generate text conditioned on images. Encodes `vision_x` once (vision tower + perceiver), then runs
        transformers' generation loop; every generated token attends to the image it would attend to in a full
        forward pass. Returns the prompt followed by the new tokens."""
        if input_ids is None:
            input_ids = lang_x
        if input_ids is None:
            raise ValueError("generate() needs input_ids (the tokenized prompt)")
        if vision_x is not None:
            self.check_vision_x(vision_x, input_ids.shape[0])
            # Under a device_map the first parameter may be offloaded ("meta"); the vision tower's hooks then move
            # the pixels to its execution device.
            device = self.device
            media = self.get_media_features(vision_x if device.type == "meta" else vision_x.to(device))
        if media is not None:
            self.media_positions_for(input_ids, media.shape[1])  # validates the <image> count
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, media=media, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, media=None, media_cache=None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, media=media, media_cache=media_cache, **kwargs)
        if media is not None:
            # Positions come from the whole sequence so far, so a cached step sees the same image as a full pass.
            new_tokens = model_inputs["input_ids"].shape[1]
            positions = compute_media_positions(input_ids, self.config.media_token_id, self.config.only_attend_previous)
            model_inputs["media_positions"] = positions[:, -new_tokens:]
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if getattr(outputs, "media_cache", None) is not None:
            model_kwargs["media_cache"] = outputs.media_cache
        return model_kwargs


FlamingoModel = FlamingoForConditionalGeneration

__all__ = [
    "FlamingoForConditionalGeneration",
    "FlamingoModel",
    "FlamingoPreTrainedModel",
    "FlamingoLayer",
    "GatedCrossAttentionBlock",
    "MaskedCrossAttention",
    "MediaCache",
    "PerceiverBlock",
    "PerceiverResampler",
    "compute_media_positions",
]
