"""`otter convert` (otter/convert.py): end to end on tiny models, from the source layouts to a folder that
`from_pretrained` loads with the source's logits; refusals (missing weights, unsafe pickles, a non-empty output);
dtype and sharding; the model card; the v1 attend-previous warning; progress bars; interrupted writes;
the Hub push in one commit through the real HfApi.create_commit (no network)."""

import json
import logging
import os
import re
import runpy
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import CONFIGS, TINY_TOKENIZER, prompt, random_images, tiny_config  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM  # noqa: E402

from flamingo import FlamingoForConditionalGeneration  # noqa: E402
from otter import OtterForConditionalGeneration  # noqa: E402
from otter.convert import build_parser, main  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5


def randomized(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.fill_(0.5)
            elif param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1 + (0 if "bias" in name else 1))
    return model.eval()


def logits(model):
    ids = torch.tensor([prompt("img", 3, "eoc", "img", 4, seed=1), prompt(2, "img", 4, "eoc", "img", 1, seed=2)])
    with torch.no_grad():
        return model(lang_x=ids, vision_x=random_images(2, 2, seed=3)).logits.float()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A source Flamingo model; its OpenFlamingo v1 checkpoint.pt (trainable weights, aliases, inv_freq); its LM as
    a LlamaForCausalLM folder with the tiny tokenizer; its vision tower as a CLIPVisionModel folder."""
    root = tmp_path_factory.mktemp("sources")
    source = randomized(FlamingoForConditionalGeneration(tiny_config("flamingo")), seed=7)
    sd = {k: v.clone() for k, v in source.state_dict().items()}

    lm = LlamaForCausalLM(source.config.text_config)
    lm.load_state_dict(
        {
            re.sub(r"^lang_encoder\.model\.layers\.(\d+)\.decoder_layer\.", r"model.layers.\1.", k).removeprefix(
                "lang_encoder."
            ): v
            for k, v in sd.items()
            if k.startswith("lang_encoder.") and ".gated_cross_attn_layer." not in k
        }
    )
    lm.generation_config.pad_token_id = 1  # a shipped LM generation config whose pad is not the tokenizer's
    lm.save_pretrained(root / "lm")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_TOKENIZER / name, root / "lm" / name)
    clip = CLIPVisionModel(source.config.vision_config)
    prefix = "vision_encoder.vision_model."
    clip.load_state_dict({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)})
    clip.save_pretrained(root / "clip")

    checkpoint = {}
    for key, value in sd.items():
        if not (key.startswith("perceiver.") or ".gated_cross_attn_layer." in key or "embed_tokens" in key):
            continue
        key = re.sub(r"^perceiver\.layers\.(\d+)\.feed_forward\.", r"perceiver.layers.\1.1.", key)
        key = re.sub(r"^perceiver\.layers\.(\d+)\.(?!1\.)", r"perceiver.layers.\1.0.", key)
        key = key.replace(".gated_cross_attn_layer.feed_forward.", ".gated_cross_attn_layer.ff.")
        checkpoint[key] = value
        alias = re.match(r"^lang_encoder\.model\.layers\.(\d+)\.gated_cross_attn_layer\.(.+)$", key)
        if alias:
            checkpoint[f"lang_encoder.gated_cross_attn_layers.{alias.group(1)}.{alias.group(2)}"] = value
    checkpoint["lang_encoder.model.layers.0.decoder_layer.self_attn.rotary_emb.inv_freq"] = torch.rand(4)
    torch.save(checkpoint, root / "checkpoint.pt")
    return {"model": source, "checkpoint": root / "checkpoint.pt", "lm": root / "lm", "clip": root / "clip"}


def argv(sources, output, *extra, checkpoint=True, base=True):
    args = ["--config", str(CONFIGS / "flamingo-tiny.json"), "--output", str(output), "--quiet"]
    if checkpoint:
        args += ["--checkpoint", str(sources["checkpoint"])]
    if base:
        args += ["--base-lm", str(sources["lm"]), "--vision", str(sources["clip"])]
    return [*args, *extra]


def no_staging_left(parent: Path):
    return not [p for p in parent.iterdir() if p.name.startswith(".")]


def test_parser_has_every_option():
    options = {a for action in build_parser()._actions for a in action.option_strings}
    for option in (
        "--checkpoint",
        "--base-lm",
        "--vision",
        "--config",
        "--to",
        "--dtype",
        "--max-shard-size",
        "--output",
        "--allow-missing",
        "--push-to-hub",
        "--private",
        "--revision",
        "--token",
    ):
        assert option in options


def test_convert_openflamingo_v1_end_to_end(sources, tmp_path):
    output = tmp_path / "openflamingo-tiny-hf"
    assert main(argv(sources, output)) == 0
    files = {p.name for p in output.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md", "tokenizer.json"} <= files
    assert no_staging_left(tmp_path)

    model = FlamingoForConditionalGeneration.from_pretrained(output).eval()
    torch.testing.assert_close(logits(model), logits(sources["model"]), atol=ATOL, rtol=0)
    assert model.generation_config.eos_token_id[0] == 3  # stops at <|endofchunk|>
    pad = AutoTokenizer.from_pretrained(output).pad_token_id
    assert pad != 1 and model.generation_config.pad_token_id == model.config.pad_token_id == pad

    card = (output / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n")
    assert "checkpoint.pt" in card and "dropped" in card
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.media_token_id == 4


def test_convert_bf16_sharded(sources, tmp_path):
    output = tmp_path / "bf16"
    assert main(argv(sources, output, "--dtype", "bf16", "--max-shard-size", "100KB")) == 0
    index = json.loads((output / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    with safe_open(str(output / sorted(shards)[0]), "pt") as handle:
        assert all(handle.get_tensor(k).dtype == torch.bfloat16 for k in handle.keys())
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"
    model = FlamingoForConditionalGeneration.from_pretrained(output, dtype=torch.bfloat16).eval()
    torch.testing.assert_close(logits(model), logits(sources["model"]), atol=0.5, rtol=0.1)


def test_missing_weights_are_refused_unless_allowed(sources, tmp_path, capsys):
    output = tmp_path / "partial"
    assert main(argv(sources, output, base=False)) == 2
    error = capsys.readouterr().err
    assert "weights are missing" in error and "vision_encoder.vision_model" in error and "--allow-missing" in error
    assert not output.exists() and no_staging_left(tmp_path)

    assert main(argv(sources, output, "--allow-missing", base=False)) == 0
    model = FlamingoForConditionalGeneration.from_pretrained(output)
    assert torch.isfinite(logits(model)).all()
    assert "missing and initialised" in (output / "README.md").read_text()


def test_unexpected_tensors_are_reported(sources, tmp_path, capsys):
    checkpoint = torch.load(sources["checkpoint"], weights_only=True)
    checkpoint["perceiver.extra.weight"] = torch.ones(2)
    torch.save(checkpoint, tmp_path / "extra.pt")
    output = tmp_path / "out"
    args = argv(sources, output, checkpoint=False) + ["--checkpoint", str(tmp_path / "extra.pt")]
    args.remove("--quiet")
    assert main(args) == 0
    assert "perceiver.extra.weight" in capsys.readouterr().err


def test_unsafe_pickle_is_refused(sources, tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    output = tmp_path / "out"
    args = argv(sources, output, checkpoint=False) + ["--checkpoint", str(tmp_path / "evil.pt")]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "unsafe pickle" in error and not output.exists()


def test_output_must_be_empty_unless_overwrite(sources, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("x")
    assert main(argv(sources, output)) == 2
    assert "not empty" in capsys.readouterr().err and (output / "keep.txt").exists()
    assert main(argv(sources, output, "--overwrite")) == 0
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").exists()
    assert no_staging_left(tmp_path)


def test_flamingo_to_otter(sources, tmp_path):
    """--to otter with a Flamingo config: the embeddings get Otter's extra row; old rows keep their logits."""
    lm_without_tokenizer = tmp_path / "lm"
    shutil.copytree(sources["lm"], lm_without_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (lm_without_tokenizer / name).unlink()
    output = tmp_path / "otter"
    args = argv(sources, output, "--to", "otter", base=False)
    args += ["--base-lm", str(lm_without_tokenizer), "--vision", str(sources["clip"])]
    assert main(args) == 0
    model = OtterForConditionalGeneration.from_pretrained(output).eval()
    assert model.config.model_type == "otter"
    assert model.config.text_config.vocab_size == 129 and model.config.answer_token_id == 127
    torch.testing.assert_close(logits(model)[..., :128], logits(sources["model"]), atol=ATOL, rtol=0)


def test_otter_config_needs_to_otter(sources, tmp_path, capsys):
    args = argv(sources, tmp_path / "out") + ["--config", str(CONFIGS / "otter-tiny.json")]
    assert main(args) == 2
    assert "--to otter" in capsys.readouterr().err


def test_push_to_hub_in_one_commit(sources, tmp_path, monkeypatch):
    """The real HfApi.create_commit runs; only what talks to the Hub is replaced (create_repo, create_branch, the
    README YAML check, the LFS pre-upload and the commit request), and any HTTP request fails the test."""
    import httpx2
    from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, _commit_api
    from huggingface_hub.hf_api import CommitInfo, RepoUrl

    def no_network(*args, **kwargs):
        raise AssertionError("the push reached the network")

    monkeypatch.setattr(httpx2.Client, "send", no_network)
    monkeypatch.setattr(httpx2.AsyncClient, "send", no_network)
    for method in ("upload_folder", "upload_file"):
        monkeypatch.setattr(HfApi, method, no_network)

    calls = []

    def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, **kwargs):
        calls.append(("create_repo", repo_id, private, exist_ok, repo_type, self.token))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, *, branch, exist_ok=False, repo_type=None, **kwargs):
        calls.append(("create_branch", repo_id, branch, exist_ok, self.token))

    def validate_yaml(self, content, *, repo_type=None, token=None):
        ModelCard(content)  # parses the metadata block, as the Hub would
        calls.append(("validate_yaml", content))

    def preupload_lfs_files(self, repo_id, additions, **kwargs):
        calls.append(("preupload", repo_id, [op.path_in_repo for op in additions], kwargs["revision"]))

    real_create_commit = HfApi.create_commit

    def create_commit(self, *args, **kwargs):
        calls.append(("create_commit", self.token))
        return real_create_commit(self, *args, **kwargs)

    def send_commit(**kwargs):
        calls.append(("send_commit", kwargs))
        return CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{'0' * 40}",
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid="0" * 40,
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "_validate_yaml", validate_yaml)
    monkeypatch.setattr(HfApi, "preupload_lfs_files", preupload_lfs_files)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(_commit_api, "_send_commit", send_commit)

    output = tmp_path / "pushed"
    args = argv(sources, output, "--push-to-hub", "someone/tiny", "--private", "--revision", "v1", "--token", "tok")
    args += ["--max-shard-size", "100KB"]
    assert main(args) == 0

    assert [call[0] for call in calls] == [
        "create_repo",
        "create_branch",
        "create_commit",
        "validate_yaml",
        "preupload",
        "send_commit",
    ]
    assert calls[0] == ("create_repo", "someone/tiny", True, True, "model", "tok")
    assert calls[1] == ("create_branch", "someone/tiny", "v1", True, "tok")
    assert calls[2] == ("create_commit", "tok")
    assert calls[3][1] == (output / "README.md").read_text()
    files = sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file())
    assert {"config.json", "generation_config.json", "README.md", "model.safetensors.index.json"} <= set(files)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert sum(name.endswith(".safetensors") for name in files) > 1  # sharded: still one commit
    assert calls[4][1:] == ("someone/tiny", files, "v1")

    commit = calls[5][1]
    assert (commit["repo_id"], commit["repo_type"], commit["revision"]) == ("someone/tiny", "model", "v1")
    assert commit["headers"]["authorization"] == "Bearer tok"
    operations = commit["operations"]
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    assert sorted(op.path_in_repo for op in operations) == files
    assert all(Path(op.path_or_fileobj) == output / op.path_in_repo for op in operations)
    assert 'from_pretrained("someone/tiny")' in (output / "README.md").read_text()


def test_wrapper_script_runs_the_same_main():
    namespace = runpy.run_path(str(REPO_ROOT / "scripts" / "convert_openflamingo_checkpoint.py"), run_name="wrapper")
    assert namespace["main"] is main


def test_model_is_built_on_meta_and_takes_the_tensors_without_copying(sources):
    """assign=True: the written model's parameters are the loaded tensors themselves (one copy in memory)."""
    from otter.convert import build_model

    state_dict = {k: v.clone() for k, v in sources["model"].state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in state_dict.items()}
    model, missing, unexpected = build_model(tiny_config("flamingo"), state_dict, torch.float32, "flamingo")
    assert missing == [] and unexpected == []
    for name, param in model.named_parameters():
        assert param.data_ptr() == pointers[name], name


# ----- the model card ----------------------------------------------------------------------------------------------


def test_model_card_metadata_and_lists(sources, tmp_path):
    from huggingface_hub import ModelCard

    output = tmp_path / "card"
    assert main(argv(sources, output)) == 0
    card = ModelCard.load(output / "README.md")  # a local file: no network
    assert card.data.license == "other" and card.data.license_name == "base-model-license"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    # the rename rules applied, with counts (tiny config: 2 perceiver layers, 2 cross-attention blocks), the full
    # lists collapsed, and each dropped key with its reason
    assert "| `perceiver.layers.{i}.0.*` | `perceiver.layers.{i}.*` |" in card.text
    assert "| `perceiver.layers.{i}.1.*` | `perceiver.layers.{i}.feed_forward.*` |" in card.text
    ff_rule = "`lang_encoder.model.layers.{i}.gated_cross_attn_layer.ff.*` | "
    assert f"| {ff_rule}`lang_encoder.model.layers.{{i}}.gated_cross_attn_layer.feed_forward.*` | 8 |" in card.text
    assert "OpenFlamingo v1 layout" in card.text
    checkpoint = torch.load(sources["checkpoint"], weights_only=True)
    aliases = [key for key in checkpoint if key.startswith("lang_encoder.gated_cross_attn_layers.")]
    assert f"| alias of `lang_encoder.<layers>.{{i}}.gated_cross_attn_layer.*` | {len(aliases)} |" in card.text
    assert "| `rotary_emb.inv_freq` buffer (recomputed by transformers) | 1 |" in card.text
    details = card.text.split(f"<summary>All {len(aliases) + 1} dropped keys</summary>")[1].split("</details>")[0]
    assert set(details.split("```text\n")[1].split("\n```")[0].splitlines()) == {
        *aliases,
        "lang_encoder.model.layers.0.decoder_layer.self_attn.rotary_emb.inv_freq",
    }
    assert "perceiver.layers.0.1.0.weight -> perceiver.layers.0.feed_forward.0.weight" in card.text
    assert "## License" in card.text


def test_model_card_license_options_and_initialised_list(sources, tmp_path):
    from huggingface_hub import ModelCard

    output = tmp_path / "mit"
    assert main(argv(sources, output, "--license", "mit", "--allow-missing", base=False)) == 0
    card = ModelCard.load(output / "README.md")
    assert card.data.license == "mit" and card.data.get("license_name") is None
    initialised = card.text.split("<summary>All ")[-1]
    assert "initialised weights</summary>" in initialised
    assert "vision_encoder.vision_model.encoder.layers.0.self_attn.q_proj.weight" in initialised

    output = tmp_path / "llama"
    link = "https://github.com/facebookresearch/llama/blob/main/LICENSE"
    assert main(argv(sources, output, "--license-name", "llama-license", "--license-link", link)) == 0
    card = ModelCard.load(output / "README.md")
    assert (card.data.license, card.data.license_name, card.data.license_link) == ("other", "llama-license", link)


# ----- OpenFlamingo v1 and attend_previous -------------------------------------------------------------------------

REFERENCE = REPO_ROOT / "tests" / "fixtures" / "reference"
V1_WARNING = "OpenFlamingo v1 runs with attend_previous off at inference"


def reference_config(tmp_path: Path, version: str, only_attend_previous: bool) -> Path:
    fields = json.loads((REFERENCE / version / "meta.json").read_text())["flamingo_config"]
    path = tmp_path / f"{version}-{only_attend_previous}.json"
    path.write_text(json.dumps({**fields, "only_attend_previous": only_attend_previous}))
    return path


def v1_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and V1_WARNING in r.getMessage()]


@pytest.mark.parametrize(
    ("version", "only_attend_previous", "family", "warns"),
    [
        ("of1", True, "flamingo", True),  # v1 with Otter / v2 semantics: warned
        ("of1", False, "flamingo", False),  # v1 as it runs
        ("of1", True, "otter", False),  # Otter was trained from v1 weights with attend_previous on
        ("of2", True, "flamingo", False),  # v2's full state_dict (aliases and old_decoder_blocks): v2 semantics
    ],
)
def test_v1_checkpoint_with_attend_previous_warns(version, only_attend_previous, family, warns, tmp_path, caplog):
    """The full state dicts of the real OpenFlamingo 0.0.2 (v1) and 2.0.1 (v2) packages."""
    config = reference_config(tmp_path, version, only_attend_previous)
    args = ["--checkpoint", str(REFERENCE / version / "model.safetensors"), "--config", str(config), "--quiet"]
    with caplog.at_level(logging.WARNING, logger="otter"):
        assert main([*args, "--to", family, "--output", str(tmp_path / "out")]) == 0
    found = v1_warnings(caplog)
    assert len(found) == warns
    if warns:
        message = found[0]
        assert "text attends to the image of the next <image> token" in message
        assert "configs/openflamingo-v1-9b.json" in message and '"only_attend_previous": false' in message


def test_released_v1_checkpoint_layout_warns(sources, tmp_path, caplog):
    """A v1 checkpoint.pt as released (trainable weights, aliases, inv_freq) with an attend-previous config."""
    with caplog.at_level(logging.WARNING, logger="otter"):
        assert main(argv(sources, tmp_path / "out")) == 0
    assert len(v1_warnings(caplog)) == 1


def test_v1_config_is_the_9b_config_with_attend_previous_off():
    v1 = json.loads((CONFIGS / "openflamingo-v1-9b.json").read_text())
    shipped = json.loads((CONFIGS / "openflamingo-9b.json").read_text())
    assert v1.pop("only_attend_previous") is False and shipped.pop("only_attend_previous") is True
    assert v1 == shipped  # same architecture; no frame embeddings (v1 has none)
    assert "max_num_frames" not in v1
    assert "configs/openflamingo-v1-9b.json" in (REPO_ROOT / "README.md").read_text()


# ----- progress bars -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bars_over_shards_and_cast(sources, tmp_path, monkeypatch, quiet):
    from transformers.utils import logging as hf_logging

    lm = tmp_path / "sharded-lm"
    LlamaForCausalLM.from_pretrained(sources["lm"]).save_pretrained(lm, max_shard_size="50KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(sources["lm"] / name, lm / name)
    shards = json.loads((lm / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) > 1

    bars = []
    real_tqdm = hf_logging.tqdm

    def tqdm(iterable=None, *args, **kwargs):
        bars.append((kwargs.get("desc"), kwargs.get("unit"), len(iterable), hf_logging.is_progress_bar_enabled()))
        return real_tqdm(iterable, *args, **kwargs)

    monkeypatch.setattr(hf_logging, "tqdm", tqdm)
    args = argv(sources, tmp_path / "out", base=False) + ["--base-lm", str(lm), "--vision", str(sources["clip"])]
    if not quiet:
        args.remove("--quiet")
    assert main(args) == 0
    assert ("reading sharded-lm", "shard", len(set(shards)), not quiet) in bars
    assert any(desc.startswith("casting to") and unit == "tensor" for desc, unit, _, _ in bars)
    assert hf_logging.is_progress_bar_enabled()  # --quiet turned them off for the run only


# ----- interrupted writes ------------------------------------------------------------------------------------------


class ShardWriteFails:
    """Stands in for safetensors' save_file inside save_pretrained: writes the first shard, then raises."""

    def __init__(self, error: BaseException):
        from transformers import modeling_utils

        self.real, self.error, self.written = modeling_utils.safe_save_file, error, []

    def __call__(self, tensors, filename, metadata=None):
        if self.written:
            raise self.error
        self.real(tensors, filename, metadata=metadata)
        self.written.append(Path(filename))


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_interrupted_write_leaves_no_output(sources, tmp_path, monkeypatch, capsys, error):
    from transformers import modeling_utils

    fails = ShardWriteFails(error)
    monkeypatch.setattr(modeling_utils, "safe_save_file", fails)
    output = tmp_path / "out"
    args = argv(sources, output, "--max-shard-size", "100KB")
    if isinstance(error, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            main(args)
    else:
        assert main(args) == 2
        assert "No space left on device" in capsys.readouterr().err
    assert len(fails.written) == 1 and fails.written[0].parent.name.startswith(".out.tmp-")  # failed midway
    assert not output.exists() and no_staging_left(tmp_path)


def test_interrupted_overwrite_keeps_the_old_output(sources, tmp_path, monkeypatch, capsys):
    from transformers import modeling_utils

    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    fails = ShardWriteFails(OSError(28, "No space left on device"))
    monkeypatch.setattr(modeling_utils, "safe_save_file", fails)
    assert main(argv(sources, output, "--overwrite", "--max-shard-size", "100KB")) == 2
    assert len(fails.written) == 1
    assert [p.name for p in output.iterdir()] == ["old.txt"] and no_staging_left(tmp_path)


def test_failed_rename_restores_the_old_output(sources, tmp_path, monkeypatch, capsys):
    """The last step (staging folder -> --output, the old folder set aside) fails: the old folder is put back."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst, **kwargs):
        if Path(dst) == output and Path(src).name.startswith(".out.tmp-"):
            raise OSError(18, "Invalid cross-device link")
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    assert main(argv(sources, output, "--overwrite")) == 2
    assert "Invalid cross-device link" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["old.txt"] and no_staging_left(tmp_path)
