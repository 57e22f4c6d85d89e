"""Bad prompts become per-row errors with a stable kind; odd but valid text is generated from."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.stages.tokenize import PromptEncoder, prompt_values
from tests.conftest import job_config

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def encoder(model):
    return PromptEncoder(model, job_config().input, MAX_TOKENS)


@pytest.mark.parametrize(
    "prompt, error",
    [
        (None, "null_prompt: prompt is null"),
        (7, "not_text: prompt is int, not text"),
        ("", "empty_prompt: prompt is empty"),
        (" \n\t", "empty_prompt: prompt is empty"),
        ([], "empty_prompt: prompt is empty"),
        ([1, -5], "invalid_token_ids: prompt token ids must be integers in the vocabulary"),
        ([1, 10**9], "invalid_token_ids: prompt token ids must be integers in the vocabulary"),
        (b"\xff\xfe broken", "invalid_utf8: prompt is not valid UTF-8 (invalid start byte at byte 0)"),
    ],
)
def test_bad_prompts_are_row_errors(encoder, prompt, error):
    assert encoder.encode(prompt) == ([], error)


@pytest.mark.parametrize(
    "prompt",
    ["naïve café 東京 🚀👩🏽‍💻", "مرحبا بالعالم", "zero\u200bwidth\u00a0space", "\U0001d54f\U0001d550 maths", "a" * 3],
)
def test_exotic_unicode_is_tokenized(encoder, prompt):
    tokens, error = encoder.encode(prompt)
    assert error is None and tokens
    assert prompt in encoder.tokenizer.decode(tokens)


def test_invalid_utf8_in_a_text_column_spoils_only_its_row(tmp_path):
    text = pa.array([b"fine", b"\xc3\x28 bad", None], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"prompt": text}), tmp_path / "in.parquet")  # Parquet does not check
    values = prompt_values(pq.read_table(tmp_path / "in.parquet").column("prompt"))
    assert values == [b"fine", b"\xc3\x28 bad", None]


def test_invalid_utf8_in_a_dictionary_encoded_column_spoils_only_its_row(encoder):
    text = pa.array([b"fine", b"\xc3\x28 bad", b"fine"], pa.binary()).view(pa.string()).dictionary_encode()
    values = prompt_values(pa.chunked_array([text]))
    assert values == [b"fine", b"\xc3\x28 bad", b"fine"]
    tokens, errors = encoder.encode_all(values, [None] * 3)
    assert errors[1].startswith("invalid_utf8: ") and errors[0] is errors[2] is None and tokens[0] == tokens[2]


def test_invalid_utf8_inside_a_conversation_spoils_only_its_row(model, tmp_path):
    turns = pa.array(
        [[{"role": "user", "content": b"fine"}], [{"role": "user", "content": b"\xff broken"}]],
        pa.list_(pa.struct([("role", pa.string()), ("content", pa.binary())])),
    )
    messages = turns.view(pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))
    pq.write_table(pa.table({"messages": messages}), tmp_path / "in.parquet")
    values = prompt_values(pq.read_table(tmp_path / "in.parquet").column("messages"))
    encoder = PromptEncoder(model, job_config("input.messages_column=messages").input, MAX_TOKENS)
    tokens, errors = encoder.encode_all(values, [None, None])
    assert errors == [None, "invalid_utf8: messages is not valid UTF-8 (invalid start byte at byte 0)"] and tokens[0]


def test_a_batch_is_tokenized_as_each_prompt_alone(encoder):
    prompts = ["What is 2 + 2?", None, "Name a yellow fruit.", [5, 6, 7], ""]
    tokens, errors = encoder.encode_all(prompts, [None, None, None, None, None])
    assert list(zip(tokens, errors)) == [encoder.encode(p) for p in prompts]
    assert encoder.encode_all(prompts[:1], ["duplicate_id: kept"]) == ([[]], ["duplicate_id: kept"])


def test_overlong_prompt_is_an_error_or_keeps_its_end(model):
    prompt = list(range(1, model.max_model_len + 10))
    strict = PromptEncoder(model, job_config().input, MAX_TOKENS)
    assert strict.encode(prompt) == (
        [],
        f"overlong_prompt: prompt has {len(prompt)} tokens; model.max_model_len is {model.max_model_len}",
    )
    lenient = PromptEncoder(model, job_config("input.overlong=truncate_left").input, MAX_TOKENS)
    tokens, error = lenient.encode(prompt)
    assert error is None and tokens == prompt[-(model.max_model_len - MAX_TOKENS) :]
    fits = list(range(1, model.max_model_len))
    assert lenient.encode(fits) == (fits, None)  # room for one token is enough: not truncated
