"""`otter convert` (otter/convert.py): end to end on tiny models, from the source layouts to a folder that
`from_pretrained` loads with the source's logits; refusals (missing weights, unsafe pickles, a non-empty output);
dtype and sharding; the Hub push through a stand-in HfApi (no network)."""

import json
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


class FakeHfApi:
    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, repo_id, branch, exist_ok=False, repo_type=None):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, folder_path, repo_id, repo_type=None, revision=None, commit_message=None):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(("upload_folder", repo_id, revision, files))
        return type("CommitInfo", (), {"commit_url": "https://example.invalid/commit/1"})()


def test_push_to_hub_in_one_commit(sources, tmp_path, monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    output = tmp_path / "pushed"
    args = argv(sources, output, "--push-to-hub", "someone/tiny", "--private", "--revision", "v1", "--token", "tok")
    assert main(args) == 0
    names = [call[0] for call in FakeHfApi.calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    assert FakeHfApi.calls[0] == ("init", "tok")
    assert FakeHfApi.calls[1] == ("create_repo", "someone/tiny", True, True)
    _, repo_id, revision, files = FakeHfApi.calls[-1]
    assert (repo_id, revision) == ("someone/tiny", "v1")
    assert {"model.safetensors", "config.json", "README.md"} <= set(files)
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
