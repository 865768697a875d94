"""Configuration of the Flamingo family: a CLIP vision tower, a perceiver resampler and a decoder-only LM
with gated cross-attention blocks inserted before every N-th decoder layer."""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging

logger = logging.get_logger(__name__)

# The published June-2023 releases were built on openai/clip-vit-large-patch14 and LLaMA-7B.
_CLIP_VIT_L_14 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "image_size": 224,
    "patch_size": 14,
}


class FlamingoConfig(PreTrainedConfig):
    r"""
    Configuration for [`FlamingoForConditionalGeneration`].

    Args:
        vision_config (`dict` or `CLIPVisionConfig`): the CLIP vision tower.
        text_config (`dict` or `PreTrainedConfig`): any decoder-only LM config (chosen by its `model_type`).
        cross_attn_every_n_layers (`int`): a gated cross-attention block sits before decoder layer `i` when
            `(i + 1) % cross_attn_every_n_layers == 0`.
        perceiver_dim (`int`, *optional*): size of the media features; must equal `vision_config.hidden_size`
            (published configs hard-code 1024). Left `None`, it follows the vision tower.
        perceiver_depth / perceiver_heads / perceiver_dim_head / perceiver_num_latents / perceiver_ff_mult:
            sizes of the perceiver resampler (6 / 8 / 64 / 64 / 4 as published).
        cross_attn_heads / cross_attn_dim_head / cross_attn_ff_mult: sizes of the gated cross-attention blocks.
        only_attend_previous (`bool`): `True`: each text token attends to the image its latest `<image>` token
            introduced (Otter, OpenFlamingo v2). `False`: text attends to the *next* image (OpenFlamingo v1 inference).
        use_media_placement_augmentation (`bool`): in training mode only, draw `only_attend_previous` at random
            (p=0.5) per forward, as OpenFlamingo v1 was trained. Inference is always deterministic.
        max_num_frames (`int`, *optional*): when set, the perceiver adds learned frame embeddings to video frames.
        media_token_id / endofchunk_token_id: ids of `<image>` and `<|endofchunk|>` (defaults: the LLaMA ids of
            the published releases).
        freeze_vision_encoder / freeze_lang_encoder (`bool`): whether those towers are frozen (the published recipe).
        train_embeddings / train_lm_head (`bool`): whether the input embeddings / the output head train even when
            the LM is frozen (OpenFlamingo: embeddings only; Otter: both).
    """

    model_type = "flamingo"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=_CLIP_VIT_L_14
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    cross_attn_every_n_layers: int = 4
    perceiver_dim: int | None = None
    perceiver_depth: int = 6
    perceiver_heads: int = 8
    perceiver_dim_head: int = 64
    perceiver_num_latents: int = 64
    perceiver_ff_mult: int = 4
    cross_attn_heads: int = 8
    cross_attn_dim_head: int = 64
    cross_attn_ff_mult: int = 4
    only_attend_previous: bool = True
    use_media_placement_augmentation: bool = False
    max_num_frames: int | None = None
    media_token_id: int | None = 32001
    endofchunk_token_id: int | None = 32000
    freeze_vision_encoder: bool = True
    freeze_lang_encoder: bool = True
    train_embeddings: bool = True
    train_lm_head: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.text_config, dict):
            text_type = self.text_config.get("model_type", "llama")
            if text_type not in CONFIG_MAPPING or text_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
                raise ValueError(
                    f"text_config.model_type: expected a decoder model type known to transformers "
                    f"(e.g. 'llama', 'mistral', 'qwen2', 'gpt_neox'), got {text_type!r}"
                )
        super().__post_init__(**kwargs)
        self._validate_flamingo_fields()

    def _validate_flamingo_fields(self):
        if self.text_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(
                f"text_config.model_type: expected a decoder model type with a causal-LM head, "
                f"got {self.text_config.model_type!r}"
            )
        num_layers = self.text_config.num_hidden_layers
        if not 1 <= self.cross_attn_every_n_layers <= num_layers:
            raise ValueError(
                f"cross_attn_every_n_layers: expected an integer between 1 and the number of decoder layers "
                f"({num_layers}), got {self.cross_attn_every_n_layers}"
            )
        vision_size = self.vision_config.hidden_size
        if self.perceiver_dim is not None and self.perceiver_dim != vision_size:
            raise ValueError(
                f"perceiver_dim: expected the vision hidden size (vision_config.hidden_size={vision_size}), "
                f"got {self.perceiver_dim}"
            )
        for name in (
            "perceiver_depth",
            "perceiver_heads",
            "perceiver_dim_head",
            "perceiver_num_latents",
            "perceiver_ff_mult",
            "cross_attn_heads",
            "cross_attn_dim_head",
            "cross_attn_ff_mult",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.max_num_frames is not None and self.max_num_frames < 1:
            raise ValueError(f"max_num_frames: expected None or a positive integer, got {self.max_num_frames!r}")

    @property
    def media_dim(self) -> int:
        """Size of the perceiver's media features (the vision tower's hidden size)."""
        return self.vision_config.hidden_size

    def cross_attn_layer_indices(self) -> list[int]:
        """Decoder layer indices that get a gated cross-attention block: 3, 7, ..., 31 for LLaMA-7B with n=4."""
        n = self.cross_attn_every_n_layers
        return [i for i in range(self.text_config.num_hidden_layers) if (i + 1) % n == 0]


__all__ = ["FlamingoConfig"]
