"""Images in prompts, with a tiny random vision-language checkpoint (tests/tiny_vlm.py): how a
row's images are fetched and decoded, and what makes one unreadable; how image parts are
rendered and their placeholders counted; the decode engine holds no vision encoder; and, on
the real engines, rows with images split give the same tokens as in one engine."""

import base64
import io
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from pipeline.config import KVConfig, PoolConfig
from pipeline.engine.build import CONSUMER, PRODUCER, image_args
from pipeline.engine.model import ResolvedModel, resolve_model
from pipeline.io.images import ImageUnreadable, load_images
from pipeline.io.storage import read_output
from pipeline.job.run import run
from pipeline.stages.tokenize import PromptEncoder
from tests import tiny_vlm
from tests.conftest import job_config


def png(seed: int, width: int = 100, height: int = 80) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def vlm_path(model, tmp_path_factory) -> Path:
    return tiny_vlm.build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-vlm", Path(model.path))


def vlm_overrides(path: Path) -> tuple[str, ...]:
    return ("model=hf", f"model.checkpoint={path}", "model.name=tiny-vlm", "model.max_model_len=1024")


@pytest.fixture(scope="module")
def vlm(vlm_path) -> ResolvedModel:
    cfg = job_config(*vlm_overrides(vlm_path))
    return resolve_model(cfg.model, cfg.engine)


def test_images_are_read_from_data_urls_files_and_fsspec(tmp_path):
    (tmp_path / "a.png").write_bytes(png(1))
    with fsspec.open("memory://images/b.png", "wb") as f:
        f.write(png(2))
    row = load_images(
        [data_url(png(0)), str(tmp_path / "a.png"), f"file://{tmp_path / 'a.png'}", "memory://images/b.png"]
    )
    assert [im.size for im in row.images] == [(100, 80)] * 4 and all(im.mode == "RGB" for im in row.images)
    assert row.digests[1] == row.digests[2] != row.digests[0]
    assert load_images([str(tmp_path / "a.png")]).digest != load_images(["memory://images/b.png"]).digest


@pytest.mark.parametrize(
    "name, url, reason",
    [
        ("truncated", "TRUNCATED", "not a readable image"),
        ("not an image", "data:image/png;base64," + base64.b64encode(b"hello, world").decode(), "not a readable image"),
        ("missing file", "/nowhere/at/all.png", "FileNotFoundError"),
        ("bad base64", "data:image/png;base64,@@@", "bad base64"),
        ("not base64", "data:image/png,rawtext", "must be base64"),
    ],
)
def test_an_unreadable_image_is_its_rows_error(tmp_path, name, url, reason):
    if url == "TRUNCATED":
        url = str(tmp_path / "cut.png")
        Path(url).write_bytes(png(3)[:200])
    with pytest.raises(ImageUnreadable) as raised:
        load_images([data_url(png(0)), url])
    message = str(raised.value)
    assert message.startswith("image_unreadable: ") and reason in message


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_image_parts_render_one_placeholder_per_image_and_are_counted(model, vlm):
    encoder = PromptEncoder(vlm, job_config("input.messages_column=messages").input, max_tokens=8)
    rows = [
        [{"role": "user", "content": [image("a.png"), text("Compare with"), image("b.png")]}],
        [{"role": "user", "content": "No image here."}],
        [{"role": "user", "content": "A literal <image> is a placeholder without an image."}],
        [{"role": "user", "content": [image("a.png"), text("and <image> again")]}],
        [{"role": "user", "content": [{"type": "audio"}]}],
    ]
    tokens, errors, images = encoder.encode_rows(rows, [None] * len(rows))
    assert tokens[0].count(vlm.image_token_id) == 2 and images[:2] == [["a.png", "b.png"], []]
    assert errors[:2] == [None, None]
    assert errors[2].startswith("invalid_messages: the prompt holds 1 image placeholders for 0 images")
    assert errors[3].startswith("invalid_messages: the prompt holds 2 image placeholders for 1 images")
    assert errors[4] == "invalid_messages: turn 0 part 0 has type 'audio'; parts are text, image_url"
    text_model = PromptEncoder(model, job_config("input.messages_column=messages").input, max_tokens=8)
    texts = [{"role": "user", "content": [text("Text parts alone "), text("are the turn's text.")]}]
    tokens, errors, _ = text_model.encode_rows(
        [rows[0], texts, [{**texts[0], "content": "Text parts alone are the turn's text."}]], [None] * 3
    )
    assert errors == ["invalid_messages: image parts need a vision-language model", None, None]
    assert tokens[1] == tokens[2]


def test_an_image_columns_images_go_before_the_first_user_turns_text(vlm):
    encoder = PromptEncoder(vlm, job_config("input.image_column=image").input, max_tokens=8)
    tokens, errors, images = encoder.encode_rows(["Describe it.", "Two."], [None, None], [["u1"], ["u2", "u3"]])
    assert errors == [None, None] and images == [["u1"], ["u2", "u3"]]
    first = tokens[0].index(vlm.image_token_id)
    assert encoder.tokenizer.decode(tokens[0][first:]).startswith("<image>Describe it.")
    assert tokens[1].count(vlm.image_token_id) == 2


def test_only_the_decode_engine_runs_the_language_model_alone(vlm, model):
    engine = job_config().engine
    assert image_args(vlm, engine, CONSUMER) == {"language_model_only": True}
    assert image_args(vlm, engine, PRODUCER) == image_args(vlm, engine, None) == {"limit_mm_per_prompt": {"image": 4}}
    assert image_args(model, engine, CONSUMER) == {}


@pytest.mark.slow
def test_the_decode_engine_holds_no_vision_encoder(ray_cluster, vlm):
    # Built in a worker process, as a job builds it: vLLM's start inspects every module loaded in
    # its process, and this one holds the S3 fixture's Flask, which refuses to be inspected.
    names, vision_params = ray.get(ray.remote(decode_engine_modules).options(num_cpus=0).remote(vlm))
    assert "StageMissingLayer" in names and vision_params == 0
    assert not {n for n in names if "Vision" in n or "Connector" in n}


def decode_engine_modules(vlm: ResolvedModel) -> tuple[set[str], int]:
    """The decode engine's module classes, and its vision and connector parameters."""
    from pipeline.engine.build import build_engine

    cfg = job_config(*vlm_overrides(vlm.path))
    llm = build_engine(vlm, cfg.engine, PoolConfig(max_num_seqs=4), CONSUMER, KVConfig())

    def modules(model) -> tuple[set[str], int]:
        names = {type(m).__name__ for m in model.modules()}
        vision = sum(p.numel() for n, p in model.named_parameters() if "vision" in n or "connector" in n)
        return names, vision

    return llm.apply_model(modules)[0]


LONG = " ".join(f"word{i}" for i in range(70))
ROWS = [  # id, content parts (an image part's url: an int seeds a PNG as a data URL, "FILE" the local file)
    ("pic0", [0, "Describe the picture."]),
    ("pic1", [1, "Describe the picture."]),  # the same ids as pic0, another image
    ("long2", [2, LONG]),  # past a cache block: the decode engine's prefix cache would
    ("long3", [3, LONG]),  # give this row long2's image KV, were its images not in its salt
    ("file", ["FILE", "What is this?"]),
    ("two", [4, "and", 5, "compare them."]),
    ("text", ["No image here, just text."]),
    ("broken", ["BROKEN", "Describe the picture."]),
]
PART = pa.struct([("type", pa.string()), ("text", pa.string()), ("image_url", pa.struct([("url", pa.string())]))])
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(PART))]))


@pytest.fixture(scope="module")
def image_rows(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("image_rows")
    (folder / "photo.png").write_bytes(png(3, 64, 48))
    (folder / "broken.png").write_bytes(png(6)[:300])

    def part(p: object) -> dict:
        if isinstance(p, str) and p not in ("FILE", "BROKEN"):
            return {"type": "text", "text": p}
        url = {"FILE": str(folder / "photo.png"), "BROKEN": str(folder / "broken.png")}.get(p) or data_url(png(p))
        return {"type": "image_url", "image_url": {"url": url}}

    messages = [[{"role": "user", "content": [part(p) for p in parts]}] for _, parts in ROWS]
    path = folder / "prompts.parquet"
    pq.write_table(pa.table({"id": [r[0] for r in ROWS], "messages": pa.array(messages, MESSAGES)}), path)
    return path


@pytest.mark.slow
def test_rows_with_images_split_as_one_engine_runs_them(ray_cluster, vlm_path, image_rows, tmp_path):
    common = (
        *vlm_overrides(vlm_path),
        f"input.path={image_rows}",
        "input.messages_column=messages",
        "sampling.max_tokens=8",
        "sampling.logprobs=1",
    )
    run(job_config(*common, "mode=colocated", f"output.path={tmp_path / 'colocated'}"))
    run(job_config(*common, "mode=disaggregated", f"output.path={tmp_path / 'disaggregated'}"))
    colocated, split = (
        {r["id"]: r for r in read_output(str(tmp_path / mode)).to_pylist()} for mode in ("colocated", "disaggregated")
    )
    for rows in (colocated, split):
        assert rows["broken"]["error_kind"] == "image_unreadable" and "broken.png" in rows["broken"]["error"]
        assert all(r["error"] is None for i, r in rows.items() if i != "broken"), rows
    for i in colocated:
        a, b = colocated[i], split[i]
        assert a["generated_tokens"] == b["generated_tokens"], i
        assert a["num_input_tokens"] == b["num_input_tokens"], i
        if i != "broken":
            assert all(abs(x["logprob"] - y["logprob"]) <= 1e-4 for x, y in zip(a["logprobs"], b["logprobs"]))
    # An image column's bytes go before the prompt's text: as an image part there.
    column_rows = tmp_path / "column.parquet"
    images = [png(0), png(1), png(6)[:300]]
    pq.write_table(
        pa.table({"id": ["pic0", "pic1", "broken"], "prompt": ["Describe the picture."] * 3, "image": images}),
        column_rows,
    )
    run(
        job_config(
            *vlm_overrides(vlm_path),
            "mode=colocated",
            f"input.path={column_rows}",
            "input.image_column=image",
            "sampling.max_tokens=8",
            f"output.path={tmp_path / 'column'}",
        )
    )
    by_column = {r["id"]: r for r in read_output(str(tmp_path / "column")).to_pylist()}
    assert [by_column[i]["generated_tokens"] for i in ("pic0", "pic1")] == [
        colocated[i]["generated_tokens"] for i in ("pic0", "pic1")
    ]
    assert by_column["broken"]["error_kind"] == "image_unreadable"
    # A prompt counts its image tokens; two images with the same text complete unlike.
    assert colocated["pic0"]["num_input_tokens"] == colocated["pic1"]["num_input_tokens"] > tiny_vlm.IMAGE_TOKENS
    assert colocated["pic0"]["generated_tokens"] != colocated["pic1"]["generated_tokens"]


def test_a_payload_of_other_images_is_refused(vlm):
    """A row's KV is bound to its images as to its adapter: the same ids with other images are
    other KV."""
    import torch

    from pipeline.kv.payload import KVPayload, PayloadMismatch
    from pipeline.stages.decode import checked

    tokens = 40
    kv = torch.randn(vlm.cache.token_shape(tokens), generator=torch.Generator().manual_seed(0))
    p = KVPayload.encode(kv, vlm, "none", conditioning="+images:aaaa")
    assert checked(p, vlm, tokens, "+images:aaaa") is p
    refused = checked(p, vlm, tokens, "+images:bbbb")
    assert isinstance(refused, PayloadMismatch) and str(refused).startswith("kv_mismatch: ")
    assert "no LoRA adapter with images aaaa, the row runs under no LoRA adapter with images bbbb" in str(refused)
    assert isinstance(checked(p, vlm, tokens, ""), PayloadMismatch)
