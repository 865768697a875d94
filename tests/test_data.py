"""otter.data: label masks, readers and their errors, the lazy image index, the collator, the sampler, shapes."""

import base64
import io
import json
import logging
import os
import pickle

import pytest
import torch
from conftest import TINY_TOKENIZER
from PIL import Image
from transformers import AutoTokenizer

import otter.data.images as images_module
from otter.data import (
    DataError,
    ImageTransform,
    JsonImageStore,
    MimicitDataset,
    MimicitSource,
    MixtureBatchSampler,
    OtterDataCollator,
    ParquetImageStore,
    SpecialTokens,
    TaskType,
    build_labels,
    decode_base64,
    format_chunk,
    format_prompt,
    index_json_object,
    load_instructions,
    load_mixture_yaml,
    load_train_config,
    mask_labels,
)
from otter.data.images import repack_parquet
from otter.data.shapes import make_shapes_dataset

X = -100
BOS, EOS, PAD, EOC, IMG, ANS = 1, 2, 0, 3, 4, 5


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), seed=0, num_image=12, num_in_context=6, num_videos=4, frames=3
    )


def png_base64(colour=(255, 0, 0), size=8) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return base64.urlsafe_b64encode(buffer.getvalue()).decode()


def write_json(path, content):
    path.write_text(json.dumps(content))
    return path


def record(instruction="What colour is it?", answer="red", image_ids=("img0",), rel=()):
    return {"instruction": instruction, "answer": answer, "image_ids": list(image_ids), "rel_ins_ids": list(rel)}


def make_source(tmp_path, records, images=None, train_config=None, task_type=TaskType.IMAGE, name="T"):
    instructions = write_json(tmp_path / f"{name}_instructions.json", {"meta": {}, "data": records})
    images_path = None
    if images is not None:
        images_path = write_json(tmp_path / f"{name}_images.json", images)
    config_path = write_json(tmp_path / f"{name}_train.json", train_config) if train_config is not None else None
    return MimicitSource(name, task_type, instructions, images_path, config_path)


# ----- labels --------------------------------------------------------------------------------------------------------


def test_prompt_format():
    assert format_chunk(" What colour? ", " red ", True) == "<image>User: What colour? GPT:<answer> red<|endofchunk|>"
    turns = [("q1", "a1"), ("q2", "a2")]
    assert format_prompt(TaskType.IN_CONTEXT, turns) == (
        "<image>User: q1 GPT:<answer> a1<|endofchunk|><image>User: q2 GPT:<answer> a2<|endofchunk|>"
    )
    assert format_prompt(TaskType.VIDEO, turns) == (
        "<image>User: q1 GPT:<answer> a1<|endofchunk|>User: q2 GPT:<answer> a2<|endofchunk|>"
    )
    assert format_prompt(TaskType.TEXT, turns[:1]) == "User: q1 GPT:<answer> a1<|endofchunk|>"


def test_labels_single_answer():
    ids = [BOS, IMG, 10, 11, ANS, 20, 21, EOC, EOS]
    expected = [X, X, X, X, X, 20, 21, EOC, EOS]
    assert build_labels(ids, ANS, EOC, EOS) == expected


def test_labels_in_context_several_answers():
    ids = [BOS, IMG, 10, ANS, 20, EOC, IMG, 11, 12, ANS, 21, 22, EOC, IMG, 13, ANS, 23, EOC, EOS]
    expected = [X, X, X, X, 20, EOC, X, X, X, X, 21, 22, EOC, X, X, X, 23, EOC, EOS]
    assert build_labels(ids, ANS, EOC, EOS) == expected


def test_labels_truncated_answer_and_position_zero():
    assert build_labels([BOS, IMG, ANS, 20, 21], ANS, EOC, EOS) == [X, X, X, 20, 21]
    assert build_labels([EOS, 10, EOS], ANS, EOC, EOS) == [X, X, EOS]  # position 0 is never a target
    assert build_labels([], ANS, EOC, EOS) == []


@pytest.mark.parametrize("side", ["right", "left"])
def test_mask_labels_every_row_of_a_batch(side):
    """Otter v0.2 masked the prompt of the batch's last row only; here every row gets its own mask."""
    rows = [
        [BOS, IMG, 10, ANS, 20, EOC, EOS],
        [BOS, IMG, 10, 11, 12, ANS, 21, 22, EOC, IMG, 13, ANS, 23, EOC, EOS],
        [BOS, 14, ANS, 24, EOC, EOS],
    ]
    expected = [
        [X, X, X, X, 20, EOC, EOS],
        [X, X, X, X, X, X, 21, 22, EOC, X, X, X, 23, EOC, EOS],
        [X, X, X, 24, EOC, EOS],
    ]
    width = max(map(len, rows))
    ids = torch.full((3, width), PAD)
    mask = torch.zeros(3, width, dtype=torch.long)
    want = torch.full((3, width), X)
    for i, (row, labels) in enumerate(zip(rows, expected, strict=True)):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
        want[i, span] = torch.tensor(labels)
    assert torch.equal(mask_labels(ids, mask, ANS, EOC, EOS), want)


def test_labels_through_the_tokenizer(tokenizer, tmp_path):
    """Real prompts: the supervised tokens of each row decode to exactly its answers, `<|endofchunk|>` and EOS."""
    records = {
        "q0": record("What colour is the shape?", "red", ["i0"]),
        "c0": record("What shape is it?", "circle", ["i1"]),
        "c1": record("How many shapes are there?", "two", ["i2"]),
    }
    images = {f"i{n}": png_base64() for n in range(3)}
    source = make_source(tmp_path, records, images, {"q0": ["c0", "c1"]}, TaskType.IN_CONTEXT)
    plain = make_source(tmp_path, {"p0": record("What is it?", "a square", ["i0"])}, images, None, name="P")
    dataset = MimicitDataset([source, plain], tokenizer, ImageTransform(32), shuffle_in_context=False)
    batch = OtterDataCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    supervised = []
    for row in range(2):
        keep = batch["labels"][row] != X
        assert torch.equal(batch["labels"][row][keep], batch["input_ids"][row][keep])
        supervised.append(tokenizer.decode(batch["labels"][row][keep]).replace(" ", ""))
    assert supervised[0] == "circle<|endofchunk|>two<|endofchunk|>red<|endofchunk|></s>"
    assert supervised[1] == "asquare<|endofchunk|></s>"
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    assert (tokens.bos, tokens.eos, tokens.pad, tokens.end_of_chunk, tokens.image, tokens.answer) == (1, 2, 0, 3, 4, 5)


# ----- readers and their errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"instruction": "q", "answer": "", "image_ids": []}, "'answer' is empty"),
        ({"instruction": "q", "answer": "   ", "image_ids": []}, "'answer' is empty"),
        ({"instruction": "q", "answer": 3, "image_ids": []}, "'answer' must be a string"),
        ({"instruction": "q", "answer": "a", "image_ids": "img0"}, "'image_ids' must be a list of strings"),
        ({"instruction": "q", "answer": "a", "image_ids": [1]}, "'image_ids' must be a list of strings"),
        ({"instruction": "q", "answer": "a", "rel_ins_ids": None}, "'rel_ins_ids' must be a list"),
        ({"answer": "a"}, "missing field 'instruction'"),
        (["not", "a", "record"], "must be an object"),
    ],
)
def test_instruction_errors_name_file_and_record(tmp_path, bad, message):
    path = write_json(tmp_path / "X_instructions.json", {"meta": {}, "data": {"good": record(), "BAD_001": bad}})
    with pytest.raises(DataError) as caught:
        load_instructions(path)
    assert caught.value.file == str(path) and caught.value.record_id == "BAD_001"
    assert str(path) in str(caught.value) and "'BAD_001'" in str(caught.value) and message in str(caught.value)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_instructions(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": {')
    with pytest.raises(DataError, match="broken.json: invalid JSON"):
        load_instructions(broken)
    with pytest.raises(DataError, match='expected an object {"meta"'):
        load_instructions(write_json(tmp_path / "list.json", [1, 2]))
    config = write_json(tmp_path / "cfg.json", {"q": ["a", 2]})
    with pytest.raises(DataError) as caught:
        load_train_config(config)
    assert caught.value.file == str(config) and caught.value.record_id == "q"


def test_dataset_errors_name_file_and_record(tmp_path, tokenizer):
    images = {"img0": png_base64()}
    source = make_source(tmp_path, {"r1": record(image_ids=["nope"])}, images)
    with pytest.raises(DataError) as caught:
        MimicitDataset([source], tokenizer, ImageTransform(32))
    assert caught.value.file == str(source.mimicit_path) and caught.value.record_id == "r1"
    assert "image id 'nope' not found" in str(caught.value)

    source = make_source(tmp_path, {"r1": record()}, images, {"r1": ["ghost"]}, TaskType.IN_CONTEXT)
    with pytest.raises(DataError) as caught:
        MimicitDataset([source], tokenizer, ImageTransform(32))
    assert caught.value.file == str(source.train_config_path) and caught.value.record_id == "r1"
    assert "in-context id 'ghost'" in str(caught.value)

    source = make_source(tmp_path, {"r1": record(image_ids=[])}, images)
    with pytest.raises(DataError, match="r1.*no image_ids"):
        MimicitDataset([source], tokenizer, ImageTransform(32))


@pytest.mark.parametrize(
    "value, message",
    [
        ("***not base64***", "bad base64"),
        (base64.urlsafe_b64encode(b"definitely not a PNG file").decode(), "undecodable image"),
        (base64.urlsafe_b64encode(base64.urlsafe_b64decode(png_base64())[:40]).decode(), "undecodable image"),
    ],
)
def test_bad_images_raise_naming_file_and_image(tmp_path, tokenizer, value, message):
    source = make_source(tmp_path, {"r1": record(image_ids=["img0"])}, {"img0": value})
    dataset = MimicitDataset([source], tokenizer, ImageTransform(32))  # image bytes are only checked when loaded
    with pytest.raises(DataError) as caught:
        dataset[0]
    assert caught.value.file == str(source.images_path) and caught.value.record_id == "img0"
    assert message in str(caught.value) and "'r1'" in str(caught.value)  # and which record uses it
    with pytest.raises(DataError, match=message):
        dataset.check_images()


def test_image_value_of_the_wrong_type(tmp_path):
    path = write_json(tmp_path / "imgs.json", {"ok": png_base64(), "BAD_IMG": 42})
    with pytest.raises(DataError) as caught:
        JsonImageStore(path)
    assert caught.value.record_id == "BAD_IMG" and "got a number" in str(caught.value)


def test_skip_bad_records_logs_and_counts(tmp_path, tokenizer, caplog):
    images = {"img0": png_base64(), "broken": "@@@"}
    records = {
        "good1": record(),
        "empty": record(answer=""),
        "typed": {"instruction": "q", "answer": 1},
        "missing_image": record(image_ids=["nope"]),
        "bad_image": record(image_ids=["broken"]),
        "good2": record(answer="blue"),
    }
    source = make_source(tmp_path, records, images)
    with pytest.raises(DataError):
        MimicitDataset([source], tokenizer, ImageTransform(32))
    caplog.set_level(logging.WARNING)
    dataset = MimicitDataset([source], tokenizer, ImageTransform(32), skip_bad_records=True)
    assert dataset.sample_ids() == ["good1", "bad_image", "good2"]
    assert dataset.bad_records.total == 3 and dataset.bad_records.counts[str(source.mimicit_path)] == 3
    for record_id in ("empty", "typed", "missing_image"):
        assert any(record_id in message for message in caplog.messages)
    # The undecodable image is found when loaded: the sample is replaced by the next one, and reported.
    sample = dataset[1]
    assert sample["id"] == "good2" and sample["skipped_records"] == [f"{source.images_path}:broken"]
    assert dataset.bad_records.total == 4
    # check_images finds it up front and removes the sample.
    dataset.check_images()
    assert dataset.sample_ids() == ["good1", "good2"] and dataset.source_ranges == [(0, 2, -1)]


def test_mixture_yaml(tmp_path, shapes):
    sources = load_mixture_yaml(shapes.train_yaml)
    assert [(s.name, s.group, s.task_type) for s in sources] == [
        ("SHAPES_IMAGE", "IMAGE_TEXT", TaskType.IMAGE),
        ("SHAPES_ICL", "IMAGE_TEXT_IN_CONTEXT", TaskType.IN_CONTEXT),
        ("SHAPES_VIDEO", "VIDEO_TEXT", TaskType.VIDEO),
        ("SHAPES_TEXT", "TEXT_ONLY", TaskType.TEXT),
    ]
    assert sources[0].mimicit_path == shapes.output_dir / "SHAPES_IMAGE_instructions.json"
    assert sources[3].images_path is None and sources[0].num_samples == -1
    bad = tmp_path / "bad.yaml"
    bad.write_text("PICTURES:\n  X:\n    mimicit_path: a.json\n")
    with pytest.raises(DataError, match="bad.yaml: unknown group 'PICTURES'"):
        load_mixture_yaml(bad)
    bad.write_text("IMAGE_TEXT:\n  X:\n    mimicit_path: a.json\n    num_samples: many\n")
    with pytest.raises(DataError, match="record 'X': .*images_path"):
        load_mixture_yaml(bad)
    bad.write_text("IMAGE_TEXT:\n  X:\n    mimicit_path: a.json\n    images_path: i.json\n    num_samples: many\n")
    with pytest.raises(DataError, match="record 'X': num_samples"):
        load_mixture_yaml(bad)


# ----- lazy image index ----------------------------------------------------------------------------------------------


class CountingFile:
    def __init__(self, handle, reads):
        self.handle, self.reads = handle, reads

    def read(self, size=-1):
        if size is None or size < 0:
            raise AssertionError("read() of the whole file")
        data = self.handle.read(size)
        self.reads.append(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_json_index_reads_in_chunks_and_fetches_only_one_image(tmp_path, monkeypatch):
    """A 6 MB dummy image ahead of the real ones: indexing reads 64 KiB chunks, fetching reads one value."""
    real = {f"img{n}": png_base64((n * 40, 0, 0)) for n in range(5)}
    path = tmp_path / "big.json"
    with open(path, "w") as handle:
        handle.write('{"dummy": "' + "A" * 6_000_000 + '", ')
        handle.write(json.dumps(real)[1:])
    reads = []
    real_open = open
    monkeypatch.setattr(images_module, "open", lambda *a, **k: CountingFile(real_open(*a, **k), reads), raising=False)
    store = JsonImageStore(path, chunk_size=1 << 16)
    assert max(reads) <= 1 << 16 and sum(reads) == os.path.getsize(path)
    assert len(store) == 6 and "img3" in store and "dummy" in store
    reads.clear()
    assert store.get_base64("img3") == real["img3"]
    assert reads == [len(real["img3"])]  # exactly the image's own bytes
    assert store.load("img3").getpixel((0, 0)) == (120, 0, 0)
    with pytest.raises(DataError, match="big.json: record 'nope': image id not found"):
        store.get_base64("nope")


def test_json_index_cache(tmp_path, monkeypatch):
    path = write_json(tmp_path / "imgs.json", {"a": png_base64(), "b": png_base64((0, 255, 0))})
    cache = tmp_path / "cache"
    first = JsonImageStore(path, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1
    opened = []
    real_open = open

    def recording_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(images_module, "open", recording_open, raising=False)
    second = JsonImageStore(path, cache_dir=cache)
    assert str(path) not in opened  # the offsets came from the cache: the images file was not scanned
    assert second.get_base64("b") == first.get_base64("b")
    write_json(path, {"c": png_base64()})  # a changed file gets a new cache entry
    assert list(JsonImageStore(path, cache_dir=cache).ids()) == ["c"]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 64, 1 << 20])
def test_json_index_agrees_with_json_load(tmp_path, chunk_size):
    content = {"a": "QUJD", 'k\u00e9y \\ "q"': "RA==", "esc/": "a\\/b", "": "", "dup": "x", "z": "eg"}
    text = ' \n{ "a" : "QUJD",\n\t"k\\u00e9y \\\\ \\"q\\"":"RA==" , "esc/":"a\\\\/b","":"","dup":"x","z":"eg"}\n'
    assert json.loads(text) == content
    path = tmp_path / "tricky.json"
    path.write_text(text)
    store = JsonImageStore(path, chunk_size=chunk_size)
    assert {key: store.get_base64(key) for key in store.ids()} == content


@pytest.mark.parametrize(
    "text, message",
    [
        ('["a"]', "expected a JSON object"),
        ('{"a": "QUJD"', "expected ',' or '}'"),
        ('{"a": "QUJ', "truncated JSON"),
        ('{"a": null}', "record 'a': wrong type"),
        ('{"a" "b"}', "expected ':'"),
    ],
)
def test_json_index_malformed(tmp_path, text, message):
    path = tmp_path / "m.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        index_json_object(path, chunk_size=4)


def test_decode_base64_strict():
    assert decode_base64("QUJD") == b"ABC"
    assert decode_base64("QUI") == b"AB"  # missing padding tolerated
    assert decode_base64("-_8") == decode_base64("+/8")  # urlsafe and standard alphabets
    with pytest.raises(DataError, match="bad base64"):
        decode_base64("QU JD!")
    with pytest.raises(DataError, match="empty image string"):
        decode_base64("")


def test_parquet_store_matches_json(tmp_path, tokenizer):
    json_paths = make_shapes_dataset(tmp_path / "j", num_image=6, num_in_context=3, num_videos=2)
    parquet_paths = make_shapes_dataset(
        tmp_path / "p", num_image=6, num_in_context=3, num_videos=2, images_format="parquet", parquet_row_group_size=5
    )
    store = ParquetImageStore(parquet_paths.images)
    reference = json.loads(json_paths.images.read_text())
    assert len(store) == len(reference) and store.id_column == "id"
    for image_id in list(reference)[::7]:
        assert store.get_base64(image_id) == reference[image_id]
    with pytest.raises(DataError, match="record 'nope': image id not found"):
        store.get_base64("nope")
    datasets = [
        MimicitDataset(load_mixture_yaml(p.train_yaml), tokenizer, ImageTransform(32))
        for p in (json_paths, parquet_paths)
    ]
    for index in range(len(datasets[0])):
        a, b = datasets[0][index], datasets[1][index]
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert (a["images"] is None and b["images"] is None) or torch.equal(a["images"], b["images"])


def write_one_row_group_parquet(path, num_rows, value_bytes, seed=0):
    """`num_rows` random base64 values of `value_bytes` characters in ONE row group, in small pages (as a repacked
    or page-limited writer makes them). Returns {id: value}."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    values = {
        f"img{n:05d}": base64.urlsafe_b64encode(rng.bytes(value_bytes * 3 // 4)).decode() for n in range(num_rows)
    }
    table = pa.table({"id": list(values), "base64": list(values.values())})
    pq.write_table(table, path, row_group_size=num_rows, write_batch_size=4, data_page_size=1 << 16)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    return values


_POOLS = []  # proxy memory pools stay alive: Arrow buffers allocated from one must never outlive it


def arrow_peak_bytes(function):
    """Run `function()` with a fresh Arrow default memory pool; (result, peak bytes allocated in it)."""
    import pyarrow as pa

    previous = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(previous)
    _POOLS.append(pool)
    pa.set_memory_pool(pool)
    try:
        return function(), pool.max_memory()
    finally:
        pa.set_memory_pool(previous)


def test_parquet_large_row_group_is_read_lazily(tmp_path, caplog):
    """A 20 MB file in ONE row group: a lookup anywhere in it allocates < 5 MB (the old store read the group whole)
    and the open warns, naming the file, the row group size and the repack fix."""
    path = tmp_path / "one_group.parquet"
    values = write_one_row_group_parquet(path, num_rows=400, value_bytes=50_000)
    assert os.path.getsize(path) > 20_000_000
    caplog.set_level(logging.WARNING)
    store = ParquetImageStore(path)
    warning = " ".join(caplog.messages)
    assert str(path) in warning and "400 images" in warning and "scripts/repack_parquet.py" in warning
    ids = list(values)
    for image_id in (ids[0], ids[-1], ids[200], ids[201], ids[3], ids[399]):  # backwards, forwards, repeated
        value, peak = arrow_peak_bytes(lambda image_id=image_id: store.get_base64(image_id))
        assert value == values[image_id]
        assert peak < 5_000_000, f"{image_id}: {peak} bytes allocated for one lookup"
    assert store._cache == {}  # nothing of the big group kept
    clone = pickle.loads(pickle.dumps(store))  # DataLoader workers get no open reader or cursor
    assert clone._cursor is None and clone.get_base64(ids[123]) == values[ids[123]]
    # Small row groups (under max_cached_row_group_bytes) are still read whole and cached: the same file with a
    # higher limit takes ~20 MB for one lookup, which the bound above would catch.
    whole = ParquetImageStore(path, max_cached_row_group_bytes=1 << 30)
    value, peak = arrow_peak_bytes(lambda: whole.get_base64(ids[5]))
    assert value == values[ids[5]] and peak > 20_000_000


def test_repack_parquet(tmp_path, caplog):
    import pyarrow.parquet as pq

    path = tmp_path / "one_group.parquet"
    values = write_one_row_group_parquet(path, num_rows=150, value_bytes=100)
    before = path.read_bytes()

    def interrupted(rows):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        repack_parquet(path, path, row_group_size=64, progress=interrupted)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]  # atomic
    progress = []
    repack_parquet(path, path, row_group_size=64, progress=progress.append)
    assert sum(progress) == 150 and [p.name for p in tmp_path.iterdir()] == [path.name]
    metadata = pq.ParquetFile(path).metadata
    assert [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)] == [64, 64, 22]
    caplog.clear()  # the repack's own INFO line shows up when an earlier test left verbosity at INFO
    store = ParquetImageStore(path, max_cached_row_group_bytes=64 * 200)  # the old group: 150 * 100
    warnings = [record.message for record in caplog.records if record.levelno >= logging.WARNING]
    assert not warnings and store._streamed == set()
    assert {image_id: store.get_base64(image_id) for image_id in store.ids()} == values


# ----- samples, collator, sampler ------------------------------------------------------------------------------------


def test_samples_by_task_type(shapes, tokenizer):
    dataset = MimicitDataset(load_mixture_yaml(shapes.train_yaml), tokenizer, ImageTransform(32), max_frames=8)
    by_source = {}
    for index in range(len(dataset)):
        sample = dataset[index]
        by_source.setdefault(sample["source"], sample)
    image, icl, video, text = (by_source[k] for k in ("SHAPES_IMAGE", "SHAPES_ICL", "SHAPES_VIDEO", "SHAPES_TEXT"))
    assert image["images"].shape == (1, 1, 3, 32, 32)
    assert icl["images"].shape == (3, 1, 3, 32, 32)  # T_img = N examples, F = 1
    assert video["images"].shape == (1, 3, 3, 32, 32)  # one <image>, frames on F
    assert text["images"] is None
    count = {name: int((s["input_ids"] == IMG).sum()) for name, s in by_source.items()}
    assert count == {"SHAPES_IMAGE": 1, "SHAPES_ICL": 3, "SHAPES_VIDEO": 1, "SHAPES_TEXT": 0}
    assert int((video["labels"] == EOC).sum()) == 2  # both turns of the conversation are supervised
    # Frames are resampled evenly (first and last kept) to max_frames.
    fewer = MimicitDataset(load_mixture_yaml(shapes.train_yaml), tokenizer, ImageTransform(32), max_frames=2)
    sample = fewer[fewer.source_ranges[2][0]]
    assert sample["images"].shape == (1, 2, 3, 32, 32)
    full = dataset[dataset.source_ranges[2][0]]["images"]
    assert torch.equal(sample["images"][0, 0], full[0, 0]) and torch.equal(sample["images"][0, 1], full[0, -1])


def test_in_context_shuffle_is_seeded_per_epoch(shapes, tokenizer):
    def orders(seed, epoch):
        dataset = MimicitDataset(load_mixture_yaml(shapes.train_yaml), tokenizer, ImageTransform(32), seed=seed)
        dataset.set_epoch(epoch)
        start, stop, _ = dataset.source_ranges[1]
        return [dataset.ordered_ids(dataset.specs[i]) for i in range(start, stop)]

    assert orders(0, 0) == orders(0, 0)
    assert orders(0, 0) != orders(0, 1)
    assert all(sorted(a) == sorted(b) for a, b in zip(orders(0, 0), orders(0, 1), strict=True))


def sample(ids, images=None, labels=None):
    ids = torch.tensor(ids)
    return {
        "id": "s",
        "input_ids": ids,
        "labels": ids.clone() if labels is None else torch.tensor(labels),
        "images": images,
    }


def test_collator_shapes_and_padding():
    icl = torch.randn(3, 1, 3, 32, 32)
    single = torch.randn(1, 1, 3, 32, 32)
    samples = [sample([1, 4, 10, 2], single), sample([1, 4, 11, 4, 12, 4, 13, 2], icl), sample([1, 14, 2])]
    batch = OtterDataCollator(pad_token_id=0)(samples)
    assert batch["input_ids"].tolist() == [
        [1, 4, 10, 2, 0, 0, 0, 0],
        [1, 4, 11, 4, 12, 4, 13, 2],
        [1, 14, 2, 0, 0, 0, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 4 + [0] * 4, [1] * 8, [1] * 3 + [0] * 5]
    assert batch["labels"][0].tolist() == [1, 4, 10, 2, X, X, X, X]
    vision_x = batch["vision_x"]
    assert vision_x.shape == (3, 3, 1, 3, 32, 32)
    assert torch.equal(vision_x[0, :1], single) and not vision_x[0, 1:].any()
    assert torch.equal(vision_x[1], icl) and not vision_x[2].any()  # text-only row: zero images
    left = OtterDataCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=5)(samples)
    assert left["input_ids"][2].tolist() == [0] * 7 + [1, 14, 2] and left["labels"][2, :7].eq(X).all()
    with pytest.raises(ValueError, match="different frame counts"):
        OtterDataCollator(0)([sample([1, 4], single), sample([1, 4], torch.randn(1, 4, 3, 32, 32))])
    with pytest.raises(ValueError, match="image_shape"):
        OtterDataCollator(0)([sample([1, 14, 2])])
    text_only = OtterDataCollator(0, image_shape=(3, 32, 32))([sample([1, 14, 2])])
    assert text_only["vision_x"].shape == (1, 1, 1, 3, 32, 32)


def test_sampler_is_deterministic_and_resumes():
    ranges = [(0, 10, -1), (10, 14, 9), (14, 30, 5)]
    keys = [1] * 10 + [4] * 4 + [1] * 16
    make = lambda **kw: MixtureBatchSampler(ranges, 3, bucket_keys=keys, seed=7, **kw)  # noqa: E731
    sampler = make()
    first = sampler.all_batches(0)
    assert first == make().all_batches(0)  # same seed, same epoch: same batches
    assert first != sampler.all_batches(1) and first != MixtureBatchSampler(
        ranges, 3, bucket_keys=keys, seed=8
    ).all_batches(0)
    indices = sampler.epoch_indices(0)
    assert len(indices) == 10 + 9 + 5
    assert sorted(i for i in indices if i < 10) == list(range(10))  # -1: every sample once
    assert sorted(set(i for i in indices if 10 <= i < 14)) == [10, 11, 12, 13]  # 9 of 4: two rounds + 1
    assert len({i for i in indices if i >= 14}) == 5  # 5 of 16, without replacement
    assert all(len({keys[i] for i in batch}) == 1 for batch in first)  # never mixes frame counts
    sampler.set_epoch(0)
    assert list(sampler) == first and len(sampler) == len(first)
    sampler.set_epoch(0, start_batch=4)
    assert list(sampler) == first[4:] and len(sampler) == len(first) - 4
    state = sampler.state_dict()
    restored = make()
    restored.load_state_dict(state)
    assert list(restored) == first[4:]
    # Two replicas: equal shares that together are the (padded) batch list.
    shards = [make(num_replicas=2, rank=r) for r in (0, 1)]
    lists = [s.epoch_batches(0) for s in shards]
    assert len(lists[0]) == len(lists[1]) == -(-len(first) // 2)
    assert sorted(map(tuple, lists[0] + lists[1])) == sorted(map(tuple, first + first[: len(first) % 2]))


# ----- shapes --------------------------------------------------------------------------------------------------------


def test_shapes_dataset_is_deterministic_and_in_mimicit_format(tmp_path, shapes):
    again = make_shapes_dataset(tmp_path / "again", seed=0, num_image=12, num_in_context=6, num_videos=4, frames=3)
    names = sorted(p.name for p in shapes.output_dir.iterdir())
    assert names == sorted(p.name for p in again.output_dir.iterdir())
    for name in names:
        assert (shapes.output_dir / name).read_bytes() == (again.output_dir / name).read_bytes(), name
    other = make_shapes_dataset(tmp_path / "other", seed=1, num_image=12, num_in_context=6, num_videos=4, frames=3)
    assert other.images.read_bytes() != shapes.images.read_bytes()
    instructions = json.loads((shapes.output_dir / "SHAPES_IMAGE_instructions.json").read_text())
    assert set(instructions) == {"meta", "data"}
    first = next(iter(instructions["data"].values()))
    assert {"instruction", "answer", "image_ids", "rel_ins_ids"} <= set(first)
    assert load_train_config(shapes.output_dir / "SHAPES_ICL_val.json")  # held-out split
    val = load_mixture_yaml(shapes.val_yaml)
    assert [s.name for s in val] == ["SHAPES_IMAGE", "SHAPES_ICL", "SHAPES_VIDEO"]
    image = Image.open(io.BytesIO(decode_base64(json.loads(shapes.images.read_text())["SHAPES_IMG_000000"])))
    assert image.size == (32, 32)
