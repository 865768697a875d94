"""`otter convert`: turn an OpenFlamingo / Otter checkpoint (plus the base LM and vision tower it was trained on)
into a Hugging Face model folder that `FlamingoForConditionalGeneration` / `OtterForConditionalGeneration`
`.from_pretrained()` loads, and optionally push it to the Hub in one commit.

    otter convert --checkpoint checkpoint.pt --base-lm llama-7b-hf/ --vision clip-vit-large-patch14/ \
        --config configs/openflamingo-v1-9b.json --to flamingo --dtype bf16 --output openflamingo-9b-hf/

Inputs are read without running code (`torch.load(weights_only=True)` or safetensors) and key layouts are
converted by `flamingo.conversion`: OpenFlamingo v1 / v2 checkpoints, DDP training checkpoints, Otter's
`final_weights.pt`, HF-layout weights. Weights from later sources win: base LM, then vision tower, then the
checkpoint. The model is built on the meta device and the tensors are assigned to it, so memory holds one copy.
"""

from __future__ import annotations

import argparse
import json
import logging as std_logging
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers.utils import logging

from flamingo.configuration_flamingo import FlamingoConfig
from flamingo.conversion import (
    EMBED_TOKENS_KEY,
    LM_HEAD_KEY,
    flamingo_to_otter,
    hf_clip_to_flamingo,
    hf_lm_to_flamingo,
    load_checkpoint,
    open_clip_visual_to_hf_clip,
    pad_vocab_rows,
    rename_openflamingo_v2,
)

logger = logging.get_logger(__name__)

USAGE_ERROR = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# Keys only an OpenFlamingo v1 state dict has: the cross-attention alias list (v2 checkpoints drop it, a full v2
# state_dict() also has `old_decoder_blocks`) and the whole open_clip CLIP model as `vision_encoder`.
V1_KEYS = ("lang_encoder.gated_cross_attn_layers.", "vision_encoder.visual.")
V2_KEYS = ("lang_encoder.old_decoder_blocks.", "vision_encoder.conv1.")
V1_CONFIG = "configs/openflamingo-v1-9b.json"
# Why the converter drops a checkpoint key, in the order the rules are tried (the model card groups by these).
DROP_REASONS = (
    ("lang_encoder.gated_cross_attn_layers.", "alias of `lang_encoder.<layers>.{i}.gated_cross_attn_layer.*`"),
    ("lang_encoder.old_decoder_blocks.", "alias of `lang_encoder.<layers>.{i}.decoder_layer.*`"),
    ("rotary_emb.inv_freq", "`rotary_emb.inv_freq` buffer (recomputed by transformers)"),
    ("vision_encoder.", "open_clip weights Flamingo never runs (text tower, projections, `logit_scale`)"),
)


class ConvertError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otter convert",
        description="Convert an OpenFlamingo/Otter checkpoint (and its base LM and vision tower) to a Hugging Face "
        "model folder, optionally pushed to the Hub.",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="the trained weights: OpenFlamingo v1/v2 checkpoint.pt, a DDP training checkpoint, Otter's "
        "final_weights.pt, a .safetensors/.bin file or an HF model folder. Read with weights_only=True: a pickle "
        "that needs code to load is refused.",
    )
    parser.add_argument(
        "--base-lm",
        type=Path,
        metavar="DIR",
        help="HF causal-LM folder (e.g. LLaMA-7B) holding the frozen decoder weights; its tokenizer, if any, is "
        "saved with the model",
    )
    parser.add_argument(
        "--vision",
        type=Path,
        metavar="DIR",
        help="the vision tower: an HF CLIP(Vision)Model folder or file, or an open_clip visual state dict",
    )
    parser.add_argument(
        "--config",
        type=Path,
        required=True,
        help="model config: a JSON file (e.g. configs/openflamingo-9b.json) or a folder with config.json",
    )
    parser.add_argument(
        "--to",
        choices=("flamingo", "otter"),
        default="flamingo",
        help="the model family to write. With --to otter and a Flamingo --config, the embeddings get the "
        "<answer> row as Otter's converter did (default: flamingo)",
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="dtype of the written weights")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    parser.add_argument("--output", type=Path, required=True, help="folder to write (must not exist, or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output folder")
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="write even if weights are missing: they are initialised (gates and frame embeddings to zero, norms "
        "to one, perceiver latents N(0, 1), the rest N(0, 0.02)) and listed in the model card",
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub repo, in one commit")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--revision", help="Hub branch to push to (created if needed)")
    parser.add_argument("--token", help="Hub token (default: the saved login / HF_TOKEN)")
    parser.add_argument(
        "--license",
        default="other",
        help="Hub license id for the model card (default: other: the weights carry the licenses of the base LM, e.g. "
        "LLaMA's, the vision tower and the checkpoint; set e.g. apache-2.0 or mit when they allow it)",
    )
    parser.add_argument(
        "--license-name",
        default="base-model-license",
        help="with --license other: a short name for the license (default: base-model-license)",
    )
    parser.add_argument("--license-link", help="with --license other: a URL or repo path of the license text")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    restore = _show_progress(std_logging.WARNING if args.quiet else std_logging.INFO, bars=not args.quiet)
    try:
        output = convert(args)
        if args.push_to_hub:
            push(output, args)
    except (ConvertError, ValueError, OSError) as error:  # OSError: a missing input, a full disk, ...
        if args.debug:
            raise
        print(f"otter convert: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    finally:
        restore()
    return 0


# ----- the conversion --------------------------------------------------------------------------------------------


def convert(args: argparse.Namespace) -> Path:
    """Run the conversion described by parsed `args`; return the written folder."""
    output = args.output.resolve()
    _check_output(output, args.overwrite)
    if args.checkpoint is None and args.base_lm is None and args.vision is None:
        raise ConvertError("nothing to convert: pass --checkpoint and/or --base-lm / --vision")
    config, adds_answer_row = load_config(args.config, args.to)

    sources: dict[str, str] = {}
    state_dict: dict[str, torch.Tensor] = {}
    if args.base_lm is not None:
        lm, report = _read("--base-lm", args.base_lm, lambda path: hf_lm_to_flamingo(load_checkpoint(path)))
        logger.info(f"base LM {args.base_lm}: {len(lm)} tensors (dropped {len(report.dropped)})")
        state_dict.update(lm)
        del lm  # one reference per tensor: the dtype cast below then never holds two copies
        sources["base LM"] = str(args.base_lm)
    if args.vision is not None:
        vision = _read("--vision", args.vision, read_vision)
        logger.info(f"vision tower {args.vision}: {len(vision)} tensors")
        state_dict.update(vision)
        del vision
        sources["vision tower"] = str(args.vision)
    checkpoint_report = None
    if args.checkpoint is not None:
        converted, checkpoint_report = _read(
            "--checkpoint", args.checkpoint, lambda path: rename_openflamingo_v2(load_checkpoint(path))
        )
        checkpoint_keys = set(converted)
        logger.info(
            f"checkpoint {args.checkpoint}: {len(converted)} tensors, {len(checkpoint_report.renamed)} renamed, "
            f"{len(checkpoint_report.dropped)} dropped (aliases, legacy buffers, unused projections)"
        )
        overridden = sorted(set(state_dict) & set(converted))
        if overridden:
            logger.info(f"the checkpoint replaces {len(overridden)} base tensors (e.g. {overridden[0]})")
        state_dict.update(converted)
        del converted
        sources["checkpoint"] = str(args.checkpoint)
        if args.to == "flamingo" and config.only_attend_previous and is_openflamingo_v1(checkpoint_report):
            logger.warning(
                f"--checkpoint {args.checkpoint} is an OpenFlamingo v1 checkpoint, and OpenFlamingo v1 runs with "
                "attend_previous off at inference: text attends to the image of the next <image> token, text after "
                "the last image sees none, and each <image> token sees its own image. --config sets "
                "only_attend_previous=true (each token attends to the latest <image> at or before it, as Otter and "
                "OpenFlamingo v2 do), so the converted model will not reproduce OpenFlamingo v1's outputs. For v1 "
                f'inference, convert with --config {V1_CONFIG} (or set "only_attend_previous": false).'
            )

    notes: list[str] = []
    state_dict = align_vocabulary(state_dict, config, adds_answer_row, notes)
    processor = load_processor(args.base_lm, args.to)
    if processor is not None:
        apply_tokenizer(processor, state_dict, config, notes)

    model, missing, unexpected = build_model(config, state_dict, DTYPES[args.dtype], args.to)
    if args.base_lm is not None and (args.base_lm / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(args.base_lm))
    del state_dict
    if args.checkpoint is not None and checkpoint_keys <= set(unexpected):
        raise ConvertError(
            f"--checkpoint {args.checkpoint}: none of its {len(checkpoint_keys)} tensors belongs to this model "
            f"({_names(sorted(checkpoint_keys), 3)}); it is not an OpenFlamingo/Otter checkpoint, which holds "
            "perceiver.*, lang_encoder.*.gated_cross_attn_layer.* and lang_encoder.model.embed_tokens.weight"
        )
    if unexpected:
        logger.warning(
            f"{len(unexpected)} tensors have no place in the model and are not written: {_names(unexpected)}"
        )
        notes.append(f"{len(unexpected)} input tensors had no place in the model and were not written.")
    if missing:
        if not args.allow_missing:
            raise ConvertError(
                f"{len(missing)} weights are missing: {_names(missing)}. Pass the base LM (--base-lm) and vision "
                "tower (--vision) the checkpoint was trained on, or --allow-missing to initialise them"
            )
        initialise_missing(model, missing, config)
        logger.warning(f"initialised {len(missing)} missing weights (--allow-missing): {_names(missing)}")
        notes.append(f"{len(missing)} weights were missing and initialised: {_names(missing, 20)}.")

    write_folder(
        model, processor, output, args, sources, notes, checkpoint_report, initialised=missing, unwritten=unexpected
    )
    logger.info(f"wrote {output}")
    return output


def is_openflamingo_v1(report) -> bool:
    """Whether the rename `report` of a checkpoint shows OpenFlamingo v1's layout: the v1-only aliases or open_clip
    model were renamed or dropped, and nothing only v2 has."""
    keys = [*report.renamed, *report.dropped]
    return any(key.startswith(V1_KEYS) for key in keys) and not any(key.startswith(V2_KEYS) for key in keys)


def load_config(path: Path, family: str) -> tuple[FlamingoConfig, bool]:
    """The config of the model to write, and whether Flamingo weights become Otter ones (`--to otter` with a
    Flamingo config: the embeddings then get Otter's extra row)."""
    from otter.configuration_otter import OtterConfig

    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConvertError(f"--config: no config file at {file}")
    fields = json.loads(file.read_text())
    model_type = fields.get("model_type", "flamingo")
    if model_type not in ("flamingo", "otter"):
        raise ConvertError(f"--config: expected a flamingo or otter config, got model_type {model_type!r}")
    if family == "flamingo" and model_type == "otter":
        raise ConvertError("--to flamingo with an Otter --config: pass a Flamingo config, or --to otter")
    if family == "otter":
        return OtterConfig.from_dict({**fields, "model_type": "otter"}), model_type == "flamingo"
    return FlamingoConfig.from_dict(fields), False


def read_vision(path: Path) -> dict[str, torch.Tensor]:
    """An HF CLIP folder/file, or an open_clip visual state dict (`conv1.weight`, optionally under `visual.`)."""
    state_dict = load_checkpoint(path)
    open_clip_prefix = next(
        (key[: -len("conv1.weight")] for key in state_dict if key.endswith("conv1.weight")),
        None,
    )
    if open_clip_prefix is None:
        return hf_clip_to_flamingo(state_dict)[0]
    visual = {k: v for k, v in state_dict.items() if k.startswith(open_clip_prefix)}
    return open_clip_visual_to_hf_clip(visual, open_clip_prefix, "vision_encoder.vision_model.")[0]


def align_vocabulary(state_dict: dict, config: FlamingoConfig, adds_answer_row: bool, notes: list[str]) -> dict:
    """Give embed_tokens and lm_head one row count (the larger; new lm_head rows of an OpenFlamingo checkpoint,
    which never saved them, are the mean row), add Otter's `<answer>` row when converting Flamingo -> Otter, and
    record the size in the config."""
    embed, head = state_dict.get(EMBED_TOKENS_KEY), state_dict.get(LM_HEAD_KEY)
    rows = max(t.shape[0] for t in (embed, head) if t is not None) if (embed is not None or head is not None) else None
    if rows is None:
        return state_dict
    if embed is not None and head is not None and embed.shape[0] != head.shape[0]:
        notes.append(
            f"embed_tokens had {embed.shape[0]} rows and lm_head {head.shape[0]}; the shorter was padded with mean "
            "rows (OpenFlamingo checkpoints do not save lm_head rows for their new tokens)."
        )
        logger.info(notes[-1])
        state_dict = pad_vocab_rows(state_dict, rows)
    if adds_answer_row:
        state_dict, ids = flamingo_to_otter(state_dict)
        rows = ids["vocab_size"]
        config.answer_token_id = ids["answer_token_id"]
        notes.append(
            f"Flamingo -> Otter: one embedding row appended (mean-initialised); <answer> = {ids['answer_token_id']} "
            f"(OpenFlamingo's <PAD> row), <PAD> = {ids['pad_token_id']}, as in the published Otter weights."
        )
        logger.info(notes[-1])
    if config.text_config.vocab_size != rows:
        logger.info(f"text_config.vocab_size: {config.text_config.vocab_size} -> {rows} (the embedding rows)")
        config.text_config.vocab_size = rows
    return state_dict


def load_processor(base_lm: Path | None, family: str):
    """The family's processor around the base LM's tokenizer (special tokens added in the published order), or
    None when --base-lm has no tokenizer."""
    if base_lm is None or not base_lm.is_dir() or not any((base_lm / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    if family == "otter":
        from otter.processing_otter import OtterProcessor as processor_class
    else:
        from flamingo.processing_flamingo import FlamingoProcessor as processor_class
    return processor_class(tokenizer=AutoTokenizer.from_pretrained(str(base_lm)))


def apply_tokenizer(processor, state_dict: dict, config: FlamingoConfig, notes: list[str]):
    """Make the config's special-token ids the tokenizer's, and the embeddings at least as long as it."""
    for name, value in processor.special_token_ids.items():
        if getattr(config, name, None) != value:
            notes.append(f"config.{name}: {getattr(config, name, None)} -> {value} (the tokenizer's id)")
            logger.info(notes[-1])
            setattr(config, name, value)
    size = len(processor.tokenizer)
    if config.text_config.vocab_size < size:
        notes.append(f"embeddings padded from {config.text_config.vocab_size} to {size} rows for the tokenizer")
        logger.info(notes[-1])
        state_dict.update(pad_vocab_rows(state_dict, size))
        config.text_config.vocab_size = size
    if processor.tokenizer.pad_token_id is not None:
        # The generation config pads with this (stop_generation_at_end_of_chunk), not with a base LM's shipped pad.
        config.pad_token_id = processor.tokenizer.pad_token_id
        if config.text_config.pad_token_id is None:
            config.text_config.pad_token_id = processor.tokenizer.pad_token_id


def build_model(config: FlamingoConfig, state_dict: dict, dtype: torch.dtype, family: str):
    """Build the model on the meta device and assign the tensors to it (no second copy in memory)."""
    from flamingo.modeling_flamingo import FlamingoForConditionalGeneration
    from otter.modeling_otter import OtterForConditionalGeneration

    model_class = OtterForConditionalGeneration if family == "otter" else FlamingoForConditionalGeneration
    for key in logging.tqdm(list(state_dict), desc=f"casting to {dtype}", unit="tensor", disable=None):
        if state_dict[key].is_floating_point():
            state_dict[key] = state_dict[key].to(dtype)
    config.dtype = dtype
    with torch.device("meta"):
        model = model_class(config)
    expected = set(model.state_dict())
    unexpected = sorted(set(state_dict) - expected)
    try:
        model.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False, assign=True)
    except RuntimeError as error:
        raise ConvertError(f"the weights do not fit the config: {error}") from None
    if getattr(config.text_config, "tie_word_embeddings", False):
        model.lang_encoder.tie_weights()
    missing = [name for name, param in model.named_parameters() if param.is_meta]
    return model.eval(), missing, unexpected


@torch.no_grad()
def initialise_missing(model, missing: list[str], config: FlamingoConfig):
    std = getattr(config.text_config, "initializer_range", 0.02)
    dtype = config.dtype
    for name in missing:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        shape = getattr(module, attr).shape
        if attr in ("attn_gate", "ff_gate", "frame_embs") or attr == "bias":
            value = torch.zeros(shape, dtype=dtype)
        elif attr == "latents":  # as the model's own init (and the reference's randn)
            value = torch.randn(shape).to(dtype)
        elif isinstance(module, torch.nn.LayerNorm) or "norm" in module_name.rsplit(".", 1)[-1]:
            value = torch.ones(shape, dtype=dtype)
        else:
            value = torch.empty(shape, dtype=dtype).normal_(0.0, std)
        setattr(module, attr, torch.nn.Parameter(value, requires_grad=getattr(module, attr).requires_grad))


# ----- writing ---------------------------------------------------------------------------------------------------


def write_folder(
    model, processor, output: Path, args, sources: dict, notes: list[str], report, initialised=(), unwritten=()
):
    """Write into a temporary folder beside `output`, then rename it into place: an interrupted write leaves no
    `output` (or, with --overwrite, the old one) and no temporary folder."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        model.stop_generation_at_end_of_chunk()
        model.save_pretrained(staging, max_shard_size=args.max_shard_size)
        if processor is not None:
            processor.save_pretrained(staging)
        (staging / "README.md").write_text(model_card(model, args, sources, notes, report, initialised, unwritten))
        _move_into_place(staging, output, args.overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, output: Path, overwrite: bool):
    if output.exists():
        if any(output.iterdir()) and not overwrite:
            raise ConvertError(f"--output {output} is not empty (pass --overwrite to replace it)")
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        try:
            os.replace(output, old / output.name)
        except BaseException:
            old.rmdir()
            raise
        try:
            os.replace(staging, output)
        except BaseException:
            os.replace(old / output.name, output)  # the old folder back; if this fails too, it stays in `old`
            old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output)


def model_card(
    model, args, sources: dict, notes: list[str], report, initialised: Sequence[str] = (), unwritten: Sequence[str] = ()
) -> str:
    """The folder's README.md: Hub metadata (library, pipeline, license, tags), what was converted from what, and
    every checkpoint key the conversion renamed or dropped, every input tensor it did not write and every weight it
    initialised."""
    import yaml

    config = model.config
    family = "otter" if config.model_type == "otter" else "flamingo"
    title = "Otter" if family == "otter" else "OpenFlamingo"
    metadata = {"library_name": "transformers", "pipeline_tag": "image-text-to-text", "license": args.license}
    if args.license == "other":
        metadata["license_name"] = args.license_name
        if args.license_link:
            metadata["license_link"] = args.license_link
    metadata["tags"] = ["otter-flamingo", family, "multimodal", "image-text-to-text"]
    front = ["---", yaml.safe_dump(metadata, sort_keys=False).rstrip("\n"), "---", ""]
    text_config, vision_config = config.text_config, config.vision_config
    semantics = (
        "each token attends to the image of the latest `<image>` at or before it"
        if config.only_attend_previous
        else "text attends to the next image (OpenFlamingo v1 inference)"
    )
    lines = [
        f"# {title} ({config.text_config.model_type} + CLIP), converted with `otter convert`",
        "",
        f"This is an otter-flamingo `{type(model).__name__}`: a CLIP vision tower "
        f"({vision_config.num_hidden_layers} layers, width {vision_config.hidden_size}), a perceiver resampler "
        f"({config.perceiver_depth} layers, {config.perceiver_num_latents} latents) and gated cross-attention before "
        f"every {config.cross_attn_every_n_layers} of the {text_config.num_hidden_layers} decoder layers of a "
        f"`{text_config.model_type}` language model.",
        "",
        "## Conversion",
        "",
        f"- dtype: `{args.dtype}`",
        f"- `only_attend_previous`: `{config.only_attend_previous}` ({semantics})",
        f"- special tokens: `<image>` = {config.media_token_id}, `<|endofchunk|>` = {config.endofchunk_token_id}"
        + (f", `<answer>` = {config.answer_token_id}" if family == "otter" else ""),
    ]
    for what, where in sources.items():
        lines.append(f"- {what}: `{Path(where).name}`")
    if report is not None:
        layout = " (OpenFlamingo v1 layout)" if is_openflamingo_v1(report) else ""
        lines.append(
            f"- checkpoint keys{layout}: {len(report.renamed)} renamed, {len(report.dropped)} dropped (listed below)"
        )
    lines += [f"- {note}" for note in notes]
    if report is not None and report.renamed:
        lines += ["", "### Renamed checkpoint keys", "", "| from | to | keys |", "|---|---|---|"]
        lines += [f"| `{old}` | `{new}` | {count} |" for old, new, count in rename_rules(report.renamed)]
        lines += _details(f"All {len(report.renamed)} renamed keys", (f"{k} -> {v}" for k, v in report.renamed.items()))
    if report is not None and report.dropped:
        lines += ["", "### Dropped checkpoint keys", "", "| why | keys |", "|---|---|"]
        lines += [f"| {reason} | {count} |" for reason, count in Counter(map(drop_reason, report.dropped)).items()]
        lines += _details(f"All {len(report.dropped)} dropped keys", report.dropped)
    if unwritten:
        lines += [
            "",
            "### Input tensors not written",
            "",
            f"{len(unwritten)} input tensors have no place in the model.",
        ]
        lines += _details(f"All {len(unwritten)} tensors not written", unwritten)
    if initialised:
        lines += [
            "",
            "### Initialised weights",
            "",
            f"{len(initialised)} weights were in none of the inputs and were initialised (`--allow-missing`): gates, "
            "frame embeddings and biases to zero, norms to one, perceiver latents N(0, 1), the rest N(0, 0.02).",
        ]
        lines += _details(f"All {len(initialised)} initialised weights", initialised)
    lines += [
        "",
        "## Use",
        "",
        "```python",
        f"from {'otter' if family == 'otter' else 'flamingo'} import {type(model).__name__}",
        "",
        f'model = {type(model).__name__}.from_pretrained("{args.push_to_hub or args.output.name}")',
        "```",
        "",
        "## License",
        "",
    ]
    if args.license == "other":
        lines.append(
            "These weights are derived from the base language model, the CLIP vision tower and the trained "
            "checkpoint, and are subject to the licenses of each (for example LLaMA's license for the LLaMA-7B-based "
            "OpenFlamingo-9B and Otter-9B; the OpenFlamingo and Otter code is MIT-licensed)."
            + (f" License: {args.license_link}." if args.license_link else "")
        )
    else:
        lines.append(f"`{args.license}`.")
    lines.append("")
    return "\n".join(front + lines)


def rename_rules(renamed: dict[str, str]) -> list[tuple[str, str, int]]:
    """Group renames into rules, in order of first use: `(old pattern, new pattern, count)`, e.g.
    `("perceiver.layers.{i}.1.*", "perceiver.layers.{i}.feed_forward.*", 24)`. A rule is the part of the name that
    changed, after the common dotted prefix (indices shown as `{i}`); `.*` stands for the unchanged suffix."""
    rules: Counter = Counter()
    examples: dict[tuple[str, str], tuple[str, str]] = {}
    for old, new in renamed.items():
        a, b = old.split("."), new.split(".")
        head = 0
        while head < min(len(a), len(b)) and a[head] == b[head]:
            head += 1
        tail = 0
        while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
            tail += 1
        prefix = ["{i}" if part.isdigit() else part for part in a[:head]]
        middle_a, middle_b = a[head : len(a) - tail], b[head : len(b) - tail]
        suffix = [".*"] if tail else []
        rule = (_rule_side(prefix, middle_a, middle_b, suffix), _rule_side(prefix, middle_b, middle_a, suffix))
        rules[rule] += 1
        examples.setdefault(rule, (old, new))
    # a rule used once is shown as the rename itself (`visual.class_embedding`, not `visual.*`)
    return [(*(examples[rule] if count == 1 else rule), count) for rule, count in rules.items()]


def _rule_side(prefix: list[str], middle: list[str], other: list[str], suffix: list[str]) -> str:
    # An index in the changed part becomes {i} when both names keep it (a layer index), not when only one does (a
    # sub-module position such as perceiver's `.0.` / `.1.`).
    parts = prefix + ["{i}" if part.isdigit() and part in other else part for part in middle]
    return ".".join(parts) + "".join(suffix)


def drop_reason(key: str) -> str:
    for pattern, reason in DROP_REASONS:
        if re.search(pattern, key):
            return reason
    return "not used by the model"


def _details(summary: str, items: Iterable[str]) -> list[str]:
    """A collapsed block listing `items` in a code block (GitHub / Hub markdown)."""
    return ["", "<details>", f"<summary>{summary}</summary>", "", "```text", *items, "```", "", "</details>"]


def push(folder: Path, args):
    """Upload `folder` to the Hub repo `args.push_to_hub` in a single commit: one `create_commit` with one add
    operation per file. (`upload_folder` with hf_xet installed streams files in batches, each its own commit.)"""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=args.token)
    repo = api.create_repo(args.push_to_hub, private=args.private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo, "repo_id", args.push_to_hub)
    if args.revision:
        api.create_branch(repo_id, branch=args.revision, exist_ok=True, repo_type="model")
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    operations = [CommitOperationAdd(path.relative_to(folder).as_posix(), str(path)) for path in files]
    logger.info(f"pushing {len(operations)} files to {repo_id} in one commit")
    commit = api.create_commit(
        repo_id,
        operations,
        commit_message=f"Upload {folder.name} converted with otter convert",
        repo_type="model",
        revision=args.revision,
    )
    logger.info(f"pushed {folder} to {repo_id}: {getattr(commit, 'commit_url', commit)}")
    return commit


# ----- helpers ---------------------------------------------------------------------------------------------------


def _check_output(output: Path, overwrite: bool):
    if output.exists() and not output.is_dir():
        raise ConvertError(f"--output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConvertError(f"--output {output} is not empty (pass --overwrite to replace it)")


def _read(option: str, path: Path, read):
    """`read(path)`, with errors about the input named by the option that gave it."""
    try:
        return read(path)
    except (ValueError, FileNotFoundError) as error:
        raise ConvertError(f"{option}: {error}") from None


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _show_progress(level: int, bars: bool = True):
    """Show this command's messages on stderr while it runs (library code only logs; the command decides what is
    shown), and progress bars (reading shards, casting) unless `bars` is false; they are also off when stderr is not
    a terminal. Returns a function that puts the loggers and bars back as they were."""
    bars_were_on = logging.is_progress_bar_enabled()
    if not bars:
        logging.disable_progress_bar()
    handler = std_logging.StreamHandler(sys.stderr)
    handler.setFormatter(std_logging.Formatter("%(message)s"))
    saved = []
    for name in ("otter", "flamingo"):
        package_logger = std_logging.getLogger(name)
        saved.append((package_logger, package_logger.level))
        package_logger.addHandler(handler)
        package_logger.setLevel(level)

    def restore():
        for package_logger, old_level in saved:
            package_logger.removeHandler(handler)
            package_logger.setLevel(old_level)
        if bars_were_on and not bars:
            logging.enable_progress_bar()

    return restore


if __name__ == "__main__":
    sys.exit(main())
