"""Pure functions over state dicts that turn published OpenFlamingo / Otter / open_clip / Hugging Face checkpoints
into the key layout of [`FlamingoForConditionalGeneration`] (reference §4):

    vision_encoder.vision_model.*                                   (HF CLIPVisionModel)
    perceiver.latents, perceiver.layers.{i}.{norm_media,norm_latents,to_q,to_kv,to_out,feed_forward.{0,1,3}}.*,
    perceiver.norm.*, [perceiver.frame_embs]
    lang_encoder.<layers>.{i}.decoder_layer.*                       (the wrapped decoder layer)
    lang_encoder.<layers>.{i}.gated_cross_attn_layer.{attn_gate,ff_gate,attn.*,feed_forward.{0,1,3}.*}
    lang_encoder.<everything else of the causal LM>                 (embed_tokens, norm, lm_head, ...)

Nothing here imports the model: every function takes and returns plain ``{name: tensor}`` mappings, so conversions
can be tested, composed and run on the meta device. Renaming functions return ``(new_state_dict, report)``; the
[`ConversionReport`] lists what was renamed and what was dropped (also logged at debug level).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

StateDict = dict[str, torch.Tensor]

# Nesting keys used by training scripts: OpenFlamingo v2 / Otter (`model_state_dict`), Otter's converters
# (`model`), Lightning and friends (`state_dict`).
NESTING_KEYS = ("model_state_dict", "model", "state_dict")
# Prefixes that wrappers add to every parameter name: DDP / DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Where known decoder families keep their layer list (kept in step with `modeling_flamingo.DECODER_LAYERS_PATHS`;
# this module deliberately does not import the model).
DECODER_LAYERS_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "gpt_neox.layers",
    "transformer.h",
    "transformer.blocks",
)

TORCH_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_EXTENSIONS = (".safetensors",)

EMBED_TOKENS_KEY = "lang_encoder.model.embed_tokens.weight"
LM_HEAD_KEY = "lang_encoder.lm_head.weight"

_PERCEIVER_ATTN = re.compile(r"^perceiver\.layers\.(\d+)\.0\.")
_PERCEIVER_FF = re.compile(r"^perceiver\.layers\.(\d+)\.1\.")
_XATTN_FF = re.compile(r"\.gated_cross_attn_layer\.ff\.")
_ROTARY_INV_FREQ = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_OPEN_CLIP_V1_VISUAL = "vision_encoder.visual."
_ALIAS = re.compile(r"^lang_encoder\.(gated_cross_attn_layers|old_decoder_blocks)\.(\d+)\.(.+)$")
_WRAPPED_LAYER = re.compile(r"^lang_encoder\.(.+)\.(\d+)\.(gated_cross_attn_layer|decoder_layer)\.")


@dataclass
class ConversionReport:
    """What a conversion did: `renamed` maps old names to new ones (unchanged keys are not listed), `dropped`
    lists keys that were removed on purpose (aliases, legacy buffers, weights Flamingo never uses)."""

    renamed: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def update(self, other: ConversionReport) -> ConversionReport:
        self.renamed.update(other.renamed)
        self.dropped.extend(other.dropped)
        return self

    def log(self, what: str):
        logger.debug("%s: renamed %d keys, dropped %d", what, len(self.renamed), len(self.dropped))
        for key in self.dropped:
            logger.debug("%s: dropped %s", what, key)


# ----- reading checkpoints -------------------------------------------------------------------------------------------


def unwrap_training_checkpoint(obj) -> StateDict:
    """Return the bare state dict inside a training checkpoint.

    Accepts a state dict, or one nested (repeatedly) under `model_state_dict` (OpenFlamingo v2 / Otter training
    checkpoints, which also hold `epoch`, `optimizer_state_dict`, ...), `model` or `state_dict`, and strips the
    `module.` prefix DDP adds (and torch.compile's `_orig_mod.`) from every key.

    Raises:
        ValueError: `obj` is not a mapping of names to tensors; the message names what was found.
    """
    seen = []
    while isinstance(obj, Mapping) and not _is_tensor_mapping(obj):
        nested = next((key for key in NESTING_KEYS if isinstance(obj.get(key), Mapping)), None)
        if nested is None:
            raise ValueError(
                "expected a state dict (a mapping of parameter names to tensors), or one nested under "
                f"{' / '.join(repr(k) for k in NESTING_KEYS)}; found a mapping with keys {_preview(obj.keys())}"
                + (f" (after unwrapping {' -> '.join(seen)})" if seen else "")
                + _non_tensor_note(obj)
            )
        seen.append(repr(nested))
        obj = obj[nested]
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"expected a state dict (a mapping of parameter names to tensors); found {type(obj).__name__}"
            + (f" under {' -> '.join(seen)}" if seen else "")
        )
    state_dict = {}
    for key, value in obj.items():
        name = str(key)
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in state_dict:
            raise ValueError(f"two keys become {name!r} once wrapper prefixes are stripped (one of them is {key!r})")
        state_dict[name] = value
    return state_dict


def load_checkpoint(path: str | os.PathLike) -> StateDict:
    """Load a checkpoint file into a bare state dict on the CPU (see [`unwrap_training_checkpoint`]).

    `.pt` / `.pth` / `.bin` / `.ckpt` files are read with `torch.load(..., weights_only=True)`: tensors and plain
    containers only. A pickle that would need to run code to load is refused, never executed. `.safetensors` files
    are read with safetensors. A directory is read as a Hugging Face model folder (see [`load_pretrained_weights`]).

    Raises:
        FileNotFoundError: nothing at `path`.
        ValueError: an unknown extension, an unsafe pickle, a truncated or corrupted file, or a file that holds no
            state dict.
    """
    path = Path(path)
    if path.is_dir():
        return load_pretrained_weights(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_EXTENSIONS:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path), device="cpu")
        except SafetensorError as error:
            raise ValueError(f"cannot read {path}: {_damaged(error)}") from None
        return unwrap_training_checkpoint(tensors)
    if suffix not in TORCH_EXTENSIONS:
        raise ValueError(
            f"cannot read {path}: unknown extension {path.suffix!r}; expected one of "
            f"{', '.join(TORCH_EXTENSIONS + SAFETENSORS_EXTENSIONS)} or a model directory"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load {path}: it is a pickle that needs to run code to load (an unsafe pickle), and this "
            "converter never runs code from checkpoints (torch.load with weights_only=True said: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}). To proceed, in an environment "
            "you trust, load it and re-save only the tensors, e.g. "
            "`torch.save({k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}, 'clean.pt')`, or "
            "convert it to safetensors with `safetensors.torch.save_file(state_dict, 'model.safetensors')`."
        ) from None
    except (RuntimeError, EOFError) as error:  # a truncated zip archive / legacy pickle
        raise ValueError(f"cannot read {path}: {_damaged(error)}") from None
    try:
        return unwrap_training_checkpoint(obj)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _damaged(error: Exception) -> str:
    said = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"the file is truncated or corrupted ({said}); download or copy it again"


def load_pretrained_weights(directory: str | os.PathLike) -> StateDict:
    """Read every weight of a Hugging Face model folder: `model.safetensors`, sharded
    `model.safetensors.index.json`, or (with `weights_only=True`) `pytorch_model.bin` / its index."""
    import json

    directory = Path(directory)
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (directory / index_name).is_file():
            shards = sorted(set(json.loads((directory / index_name).read_text())["weight_map"].values()))
            state_dict = {}
            # A bar per folder (off when stderr is not a terminal, or after transformers' disable_progress_bar()).
            for shard in logging.tqdm(shards, desc=f"reading {directory.name}", unit="shard", disable=None):
                state_dict.update(load_checkpoint(directory / shard))
            return state_dict
        if (directory / single_name).is_file():
            return load_checkpoint(directory / single_name)
    raise FileNotFoundError(
        f"no weights in {directory}: expected model.safetensors, model.safetensors.index.json, pytorch_model.bin "
        "or pytorch_model.bin.index.json"
    )


# ----- OpenFlamingo checkpoints ----------------------------------------------------------------------------------


def rename_openflamingo_v1(state_dict: Mapping[str, torch.Tensor]) -> tuple[StateDict, ConversionReport]:
    """Rename an OpenFlamingo v1 `checkpoint.pt` (OpenFlamingo-9B: CLIP ViT-L/14 + LLaMA-7B) to our layout.

    The rules of the published converters (reference §4 "Rename rules"), for any layer index (the originals match
    a single digit, so they break at layer 10):

    - `perceiver.layers.{i}.0.X` -> `perceiver.layers.{i}.X`; `perceiver.layers.{i}.1.X` ->
      `perceiver.layers.{i}.feed_forward.X`.
    - `lang_encoder.gated_cross_attn_layers.{i}.*` is an alias of `...layers.{i}.gated_cross_attn_layer.*`: dropped
      (or used as that key where the checkpoint lacks it).
    - Inside a `gated_cross_attn_layer`, the feed-forward `ff.` -> `feed_forward.`. Nothing else is touched (the
      original replaced every "ff" substring of LM keys; this renames only the cross-attention feed-forward).
    - `lang_encoder.model.layers.{i}.X` that is neither `gated_cross_attn_layer` nor `decoder_layer` (LLaMA weights
      merged in without the wrapper) -> `lang_encoder.model.layers.{i}.decoder_layer.X`.
    - `rotary_emb.inv_freq` buffers (persistent in transformers 4.28) are dropped.
    - open_clip keys (absent from the released file, which only holds trainable weights; present in a full v1
      `Flamingo.state_dict()`, where `vision_encoder` is the whole open_clip CLIP model): `vision_encoder.visual.*`
      go through [`open_clip_visual_to_hf_clip`]; the open_clip text tower, `text_projection` and `logit_scale`
      (other `vision_encoder.*` keys) are dropped. v2's bare `vision_encoder.*` visual keys convert as well.
    """
    return _rename_openflamingo(state_dict, layers_path="model.layers", what="OpenFlamingo v1")


def rename_openflamingo_v2(
    state_dict: Mapping[str, torch.Tensor],
    *,
    layers_path: str | None = None,
    mpt_remote_code_names: bool = False,
) -> tuple[StateDict, ConversionReport]:
    """Rename an OpenFlamingo v2 state dict (`Flamingo.state_dict()` or a v2 training `checkpoint.pt`) to our layout.

    Everything [`rename_openflamingo_v1`] does, plus:

    - open_clip visual keys (`vision_encoder.conv1.weight`, `vision_encoder.transformer.resblocks.*`, ...) become
      HF CLIP keys under `vision_encoder.vision_model.` ([`open_clip_visual_to_hf_clip`]; `proj` is dropped).
    - `lang_encoder.old_decoder_blocks.{i}.*` (an alias of `...{i}.decoder_layer.*`) is dropped like
      `gated_cross_attn_layers`.
    - Any decoder family: `layers_path` (e.g. `"model.layers"` for LLaMA, `"transformer.blocks"` for MPT) is found
      from the keys when not given.
    - `mpt_remote_code_names=True` maps the names of MosaicML's remote-code MPT-1B (`ln_1`, `ln_2`, `mlp.mlp_up`,
      `mlp.mlp_down`, `transformer.ln_f`) to transformers' `MptForCausalLM` names (`norm_1`, `norm_2`,
      `ffn.up_proj`, `ffn.down_proj`, `transformer.norm_f`). MPT-7B already uses transformers' names.
    """
    new_state_dict, report = _rename_openflamingo(state_dict, layers_path=layers_path, what="OpenFlamingo v2")
    if mpt_remote_code_names:
        renamed = {}
        for key, value in new_state_dict.items():
            new_key = _mpt_remote_code_key(key)
            if new_key != key:
                report.renamed[key] = new_key
            renamed[new_key] = value
        new_state_dict = renamed
    return new_state_dict, report


def _rename_openflamingo(
    state_dict: Mapping[str, torch.Tensor], *, layers_path: str | None, what: str
) -> tuple[StateDict, ConversionReport]:
    if layers_path is None:
        layers_path = detect_layers_path(state_dict, prefix="lang_encoder.", default="model.layers")
    layers_prefix = f"lang_encoder.{layers_path}."
    bare_layer_key = re.compile(rf"^{re.escape(layers_prefix)}(\d+)\.(?!gated_cross_attn_layer\.|decoder_layer\.)(.+)$")
    report = ConversionReport()

    open_clip_keys = {k: v for k, v in state_dict.items() if _is_open_clip_vision_key(k)}
    visual_prefix = "vision_encoder."  # v2 keeps open_clip's `.visual` as `vision_encoder`
    if any(key.startswith(_OPEN_CLIP_V1_VISUAL) for key in open_clip_keys):
        # v1 keeps the whole open_clip CLIP model as `vision_encoder`: the tower is under `visual.`, and the rest
        # (text tower, text_projection, logit_scale), which Flamingo never runs, is dropped.
        visual_prefix = _OPEN_CLIP_V1_VISUAL
        report.dropped.extend(key for key in open_clip_keys if not key.startswith(visual_prefix))
    vision, vision_report = open_clip_visual_to_hf_clip(
        {k: v for k, v in open_clip_keys.items() if k.startswith(visual_prefix)},
        visual_prefix,
        "vision_encoder.vision_model.",
    )
    report.update(vision_report)

    new_state_dict: StateDict = {}
    aliases: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key in open_clip_keys:
            continue
        if _ROTARY_INV_FREQ.search(key):
            report.dropped.append(key)
            continue
        alias = _ALIAS.match(key)
        if alias:
            kind, index, rest = alias.groups()
            wrapped = "gated_cross_attn_layer" if kind == "gated_cross_attn_layers" else "decoder_layer"
            aliases[key] = (_rename_openflamingo_key(f"{layers_prefix}{index}.{wrapped}.{rest}"), value)
            continue
        new_key = _rename_openflamingo_key(key)
        bare = bare_layer_key.match(new_key)
        if bare:
            new_key = f"{layers_prefix}{bare.group(1)}.decoder_layer.{bare.group(2)}"
        _put(new_state_dict, new_key, value, key)
        if new_key != key:
            report.renamed[key] = new_key

    for key, (target, value) in aliases.items():
        if target in new_state_dict:
            if new_state_dict[target].shape != value.shape or not torch.equal(new_state_dict[target], value):
                logger.warning("%s: %s differs from %s, which it should alias; keeping %s", what, key, target, target)
            report.dropped.append(key)
        else:  # only the alias was saved: it is the weight
            new_state_dict[target] = value
            report.renamed[key] = target

    for key, value in vision.items():
        _put(new_state_dict, key, value, key)
    report.log(what)
    return new_state_dict, report


def _rename_openflamingo_key(key: str) -> str:
    key = _PERCEIVER_ATTN.sub(r"perceiver.layers.\1.", key)
    key = _PERCEIVER_FF.sub(r"perceiver.layers.\1.feed_forward.", key)
    if key.startswith("lang_encoder."):
        key = _XATTN_FF.sub(".gated_cross_attn_layer.feed_forward.", key)
    return key


_MPT_REMOTE_CODE = (
    (re.compile(r"\.decoder_layer\.ln_1\."), ".decoder_layer.norm_1."),
    (re.compile(r"\.decoder_layer\.ln_2\."), ".decoder_layer.norm_2."),
    (re.compile(r"\.decoder_layer\.mlp\.mlp_up\."), ".decoder_layer.ffn.up_proj."),
    (re.compile(r"\.decoder_layer\.mlp\.mlp_down\."), ".decoder_layer.ffn.down_proj."),
    (re.compile(r"^lang_encoder\.transformer\.ln_f\."), "lang_encoder.transformer.norm_f."),
)


def _mpt_remote_code_key(key: str) -> str:
    for pattern, replacement in _MPT_REMOTE_CODE:
        key = pattern.sub(replacement, key)
    return key


def detect_layers_path(state_dict: Mapping[str, torch.Tensor], prefix: str = "", default: str | None = None) -> str:
    """The decoder's layer-list path (`model.layers`, `transformer.blocks`, ...) used by keys under `prefix`:
    known paths first, then the path of wrapped layers (`<path>.{i}.decoder_layer.` / `gated_cross_attn_layer.`)."""
    for path in DECODER_LAYERS_PATHS:
        pattern = re.compile(rf"^{re.escape(prefix + path)}\.\d+\.")
        if any(pattern.match(key) for key in state_dict):
            return path
    if prefix == "lang_encoder.":
        for key in state_dict:
            match = _WRAPPED_LAYER.match(key)
            if match:
                return match.group(1)
    if default is not None:
        return default
    raise ValueError(
        f"could not find the decoder layer list in keys under {prefix!r}: expected one of "
        f"{', '.join(DECODER_LAYERS_PATHS)} followed by a layer index; pass layers_path explicitly"
    )


# ----- vision towers ---------------------------------------------------------------------------------------------

_OPEN_CLIP_RENAMES = (
    (re.compile(r"^conv1\.weight$"), "embeddings.patch_embedding.weight"),
    (re.compile(r"^class_embedding$"), "embeddings.class_embedding"),
    (re.compile(r"^positional_embedding$"), "embeddings.position_embedding.weight"),
    (re.compile(r"^ln_pre\.(weight|bias)$"), r"pre_layrnorm.\1"),
    (re.compile(r"^ln_post\.(weight|bias)$"), r"post_layernorm.\1"),
    (re.compile(r"^transformer\.resblocks\.(\d+)\.ln_1\.(weight|bias)$"), r"encoder.layers.\1.layer_norm1.\2"),
    (re.compile(r"^transformer\.resblocks\.(\d+)\.ln_2\.(weight|bias)$"), r"encoder.layers.\1.layer_norm2.\2"),
    (
        re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)$"),
        r"encoder.layers.\1.self_attn.out_proj.\2",
    ),
    (re.compile(r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)$"), r"encoder.layers.\1.mlp.fc1.\2"),
    (re.compile(r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)$"), r"encoder.layers.\1.mlp.fc2.\2"),
)
_OPEN_CLIP_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_OPEN_CLIP_DROPPED = ("proj",)  # the image-text projection after ln_post: Flamingo uses the patch tokens


def open_clip_visual_to_hf_clip(
    state_dict: Mapping[str, torch.Tensor], prefix_in: str = "", prefix_out: str = "vision_model."
) -> tuple[StateDict, ConversionReport]:
    """Map an open_clip `VisionTransformer` (`model.visual`) state dict to HF `CLIPVisionModel` keys.

    Keys under `prefix_in` are converted and put under `prefix_out`; other keys pass through unchanged:

    | open_clip | HF CLIP |
    |---|---|
    | `conv1.weight` | `embeddings.patch_embedding.weight` |
    | `class_embedding` | `embeddings.class_embedding` |
    | `positional_embedding` | `embeddings.position_embedding.weight` |
    | `ln_pre.*` / `ln_post.*` | `pre_layrnorm.*` / `post_layernorm.*` |
    | `transformer.resblocks.{i}.ln_1.*` / `ln_2.*` | `encoder.layers.{i}.layer_norm1.*` / `layer_norm2.*` |
    | `...attn.in_proj_weight` / `in_proj_bias` | split in 3 along dim 0: `self_attn.{q,k,v}_proj.weight` / `.bias` |
    | `...attn.out_proj.*` | `self_attn.out_proj.*` |
    | `...mlp.c_fc.*` / `mlp.c_proj.*` | `mlp.fc1.*` / `mlp.fc2.*` |
    | `proj` | dropped (the contrastive projection; Flamingo reads patch tokens) |

    The activation is not in the state dict: OpenAI weights need `hidden_act="quick_gelu"` (HF's default), other
    open_clip models usually `"gelu"`.

    Raises:
        ValueError: keys under `prefix_in` that HF CLIP cannot hold (layer scale, attentional pooling, patch norm,
            ...), listed, rather than silently dropped.
    """
    new_state_dict: StateDict = {}
    report = ConversionReport()
    unknown = []
    for key, value in state_dict.items():
        if not key.startswith(prefix_in):
            _put(new_state_dict, key, value, key)
            continue
        name = key[len(prefix_in) :]
        if name in _OPEN_CLIP_DROPPED:
            report.dropped.append(key)
            continue
        in_proj = _OPEN_CLIP_IN_PROJ.match(name)
        if in_proj:
            layer, kind = in_proj.groups()
            if value.shape[0] % 3:
                raise ValueError(
                    f"{key}: expected a first dimension divisible by 3 (q, k, v), got {tuple(value.shape)}"
                )
            for part, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                new_key = f"{prefix_out}encoder.layers.{layer}.self_attn.{part}_proj.{kind}"
                _put(new_state_dict, new_key, chunk.clone(), key)
                report.renamed[f"{key}[{part}]"] = new_key
            continue
        for pattern, replacement in _OPEN_CLIP_RENAMES:
            if pattern.match(name):
                new_key = prefix_out + pattern.sub(replacement, name)
                _put(new_state_dict, new_key, value, key)
                report.renamed[key] = new_key
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"open_clip visual keys with no HF CLIPVisionModel counterpart: {_preview(unknown)}. Only plain ViTs "
            "(no layer scale, attentional pooling or input patch norm) convert to CLIPVisionModel."
        )
    report.log("open_clip visual -> HF CLIP")
    return new_state_dict, report


_HF_CLIP_VISION_ROOTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
_HF_CLIP_DROPPED = re.compile(r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale$)|(^|\.)position_ids$")


def hf_clip_to_flamingo(
    state_dict: Mapping[str, torch.Tensor], prefix_out: str = "vision_encoder.vision_model."
) -> tuple[StateDict, ConversionReport]:
    """Put the weights of an HF CLIP checkpoint under `vision_encoder.vision_model.`.

    Accepts `CLIPVisionModel` / `CLIPModel` files as saved (`vision_model.embeddings...`) and transformers 5's
    flattened `CLIPVisionModel.state_dict()` (`embeddings...`). The text tower, the projections, `logit_scale` and
    legacy `position_ids` buffers are dropped.

    Raises:
        ValueError: keys that belong to no CLIP vision tower, listed.
    """
    new_state_dict: StateDict = {}
    report = ConversionReport()
    unknown = []
    for key, value in state_dict.items():
        if _HF_CLIP_DROPPED.search(key):
            report.dropped.append(key)
            continue
        name = key[len("vision_model.") :] if key.startswith("vision_model.") else key
        if not name.startswith(_HF_CLIP_VISION_ROOTS):
            unknown.append(key)
            continue
        _put(new_state_dict, prefix_out + name, value, key)
        report.renamed[key] = prefix_out + name
    if unknown:
        raise ValueError(f"keys that are not part of an HF CLIP vision tower: {_preview(unknown)}")
    report.log("HF CLIP -> Flamingo")
    return new_state_dict, report


# ----- language models -------------------------------------------------------------------------------------------


def hf_lm_to_flamingo(
    state_dict: Mapping[str, torch.Tensor], *, layers_path: str | None = None, prefix_out: str = "lang_encoder."
) -> tuple[StateDict, ConversionReport]:
    """Put the weights of a plain HF causal LM (`LlamaForCausalLM`, `MptForCausalLM`, ...) under `lang_encoder.`,
    with every decoder layer's weights under its wrapper's `decoder_layer.`:

        model.layers.{i}.X -> lang_encoder.model.layers.{i}.decoder_layer.X
        anything else Y    -> lang_encoder.Y                 (embed_tokens, norm, lm_head, ...)

    `layers_path` (`model.layers`, `transformer.blocks`, `gpt_neox.layers`, ...) is found from the keys when not
    given. `rotary_emb.inv_freq` buffers of old transformers versions are dropped.
    """
    layers_path = layers_path or detect_layers_path(state_dict)
    layer_key = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.(.+)$")
    new_state_dict: StateDict = {}
    report = ConversionReport()
    for key, value in state_dict.items():
        if _ROTARY_INV_FREQ.search(key):
            report.dropped.append(key)
            continue
        if key.startswith(prefix_out) or ".decoder_layer." in key:
            raise ValueError(f"{key!r} is already in Flamingo layout; hf_lm_to_flamingo expects a plain HF causal LM")
        match = layer_key.match(key)
        new_key = (
            f"{prefix_out}{layers_path}.{match.group(1)}.decoder_layer.{match.group(2)}" if match else prefix_out + key
        )
        _put(new_state_dict, new_key, value, key)
        report.renamed[key] = new_key
    report.log("HF causal LM -> Flamingo")
    return new_state_dict, report


# ----- vocabulary ------------------------------------------------------------------------------------------------


def pad_vocab_rows(
    state_dict: Mapping[str, torch.Tensor], vocab_size: int, keys: Iterable[str] = (EMBED_TOKENS_KEY, LM_HEAD_KEY)
) -> StateDict:
    """Append rows to the embedding matrices named by `keys` (those present) until they have `vocab_size` rows.
    New rows are the mean of the existing rows (deterministic, and a neutral start for a new token), computed in
    float32. Matrices with more rows than `vocab_size` raise a ValueError."""
    new_state_dict = dict(state_dict)
    for key in keys:
        if key not in new_state_dict:
            continue
        weight = new_state_dict[key]
        rows = weight.shape[0]
        if rows > vocab_size:
            raise ValueError(f"{key} has {rows} rows, more than the vocabulary size {vocab_size}")
        if rows < vocab_size:
            mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
            new_state_dict[key] = torch.cat([weight, mean.expand(vocab_size - rows, -1)], dim=0)
    return new_state_dict


def flamingo_to_otter(
    state_dict: Mapping[str, torch.Tensor], *, keys: Iterable[str] = (EMBED_TOKENS_KEY, LM_HEAD_KEY)
) -> tuple[StateDict, dict[str, int]]:
    """Turn OpenFlamingo weights into an Otter starting point: one more row in `embed_tokens` and `lm_head`.

    Row order follows the published Otter weights (reference §1.6): Otter's converter loads OpenFlamingo, whose
    rows end `..., <|endofchunk|> 32000, <image> 32001, <PAD> 32002`, adds `<PAD>` before `<answer>` and resizes,
    so the converted matrix keeps OpenFlamingo's rows unchanged and appends one row (32003). Otter's runtime
    tokenizer then maps `<answer>` to 32002 (OpenFlamingo's `<PAD>` row, which Otter was trained with) and `<PAD>`
    to 32003 (the new row). The appended row is the mean of the existing rows (computed in float32; the original
    used HF's random init).

    Returns:
        `(new_state_dict, ids)` with `ids = {"answer_token_id": rows - 1, "pad_token_id": rows, "vocab_size":
        rows + 1}` for an input of `rows` rows.
    """
    keys = tuple(keys)
    present = [key for key in keys if key in state_dict]
    if not present:
        raise ValueError(f"no embedding matrix to extend: none of {', '.join(keys)} is in the state dict")
    rows = {state_dict[key].shape[0] for key in present}
    if len(rows) != 1:
        raise ValueError(
            "embed_tokens and lm_head have different row counts "
            f"({', '.join(f'{k}: {state_dict[k].shape[0]}' for k in present)}); pad them first with pad_vocab_rows"
        )
    (old_rows,) = rows
    ids = {"answer_token_id": old_rows - 1, "pad_token_id": old_rows, "vocab_size": old_rows + 1}
    return pad_vocab_rows(state_dict, old_rows + 1, present), ids


# ----- helpers ---------------------------------------------------------------------------------------------------


def _put(state_dict: StateDict, key: str, value: torch.Tensor, source: str):
    if key in state_dict:
        raise ValueError(f"two checkpoint keys map to {key!r} (the second is {source!r})")
    state_dict[key] = value


def _is_open_clip_vision_key(key: str) -> bool:
    return key.startswith("vision_encoder.") and not key.startswith("vision_encoder.vision_model.")


def _is_tensor_mapping(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _non_tensor_note(obj: Mapping) -> str:
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor | Mapping)]
    if bad and any(isinstance(v, torch.Tensor) for v in obj.values()):
        return f"; these values are not tensors: {_preview(bad)}"
    return ""


def _preview(keys: Iterable, limit: int = 8) -> str:
    keys = [str(k) for k in keys]
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} in all)"


__all__ = [
    "ConversionReport",
    "detect_layers_path",
    "flamingo_to_otter",
    "hf_clip_to_flamingo",
    "hf_lm_to_flamingo",
    "load_checkpoint",
    "load_pretrained_weights",
    "open_clip_visual_to_hf_clip",
    "pad_vocab_rows",
    "rename_openflamingo_v1",
    "rename_openflamingo_v2",
    "unwrap_training_checkpoint",
]
