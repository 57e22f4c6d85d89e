"""Tokenize stage (CPU): prompt text -> token ids, with a per-row error for prompts that cannot
be generated from. A prompt column of integer lists is taken as token ids already."""

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.columns import (
    ERROR,
    FINISH_REASON,
    IMAGES,
    NUM_INPUT_TOKENS,
    PROMPT_TOKENS,
    TOKEN_LIST,
    ErrorKind,
    InvalidUTF8,
    python_values,
    row_error,
    with_columns,
)
from pipeline.config import InputConfig, Overlong
from pipeline.engine.model import ResolvedModel, load_tokenizer
from pipeline.io.images import data_url
from pipeline.job.meter import StageMeter


class Tokenize:
    def __init__(self, model: ResolvedModel, input: InputConfig, max_tokens: int, sink_name: str):
        self.encoder = PromptEncoder(model, input, max_tokens)
        self.prompt_column = input.source_column
        self.image_column = input.image_column
        self.takes_images = model.image_token_id is not None
        self.meter = StageMeter("tokenize", sink_name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.meter.batch() as report:
            leading = column_images(batch.column(self.image_column)) if self.image_column else None
            tokens, errors, images = self.encoder.encode_rows(
                prompt_values(batch.column(self.prompt_column)), batch.column(ERROR).to_pylist(), leading
            )
            lengths = pa.array([len(t) for t in tokens], pa.int32())
            report.rows = batch.num_rows
            report.input_tokens = int(pc.sum(lengths).as_py() or 0)
            columns = {
                PROMPT_TOKENS: pa.array(tokens, TOKEN_LIST),
                NUM_INPUT_TOKENS: lengths,
                FINISH_REASON: pa.nulls(batch.num_rows, pa.string()),
                ERROR: pa.array(errors, pa.string()),
            }
            if self.takes_images:  # every batch, so that all blocks have the same columns
                columns[IMAGES] = pa.array(images, pa.list_(pa.string()))
            return with_columns(batch, **columns)


def column_images(column: pa.ChunkedArray) -> list[list[str]]:
    """An image column's bytes (one image a row, or a list), as data URLs."""
    rows = column.to_pylist()
    return [[data_url(b) for b in ([row] if isinstance(row, bytes) else row or []) if b] for row in rows]


def prompt_values(column: pa.ChunkedArray) -> list:
    """The column as Python values; text is decoded row by row, so one row of invalid UTF-8
    (Parquet does not check) spoils only itself, as does one in a conversation's turns."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = column.cast(pa.large_binary())
    return python_values(column)


class PromptEncoder:
    """Prompt -> token ids, or the reason there are none. Shared with the plain-vLLM baseline."""

    def __init__(self, model: ResolvedModel, input: InputConfig, max_tokens: int):
        self.tokenizer = load_tokenizer(model.path)
        self.vocab_size = len(self.tokenizer)
        self.conversations = input.messages_column is not None
        self.templated = bool(self.tokenizer.chat_template) and (input.apply_chat_template or self.conversations)
        if self.conversations and not self.templated:
            raise ValueError(f"input.messages_column needs a chat template; model {model.path} has none")
        self.system_prompt = input.system_prompt
        self.chat_template_kwargs = dict(input.chat_template_kwargs)
        self.overlong = input.overlong
        self.max_model_len = model.max_model_len
        # Truncation keeps room for the whole generation budget (and at least one token).
        self.truncated_len = model.max_model_len - min(max_tokens, model.max_model_len - 1)
        self.image_token_id = model.image_token_id
        if input.image_column and (self.image_token_id is None or not self.templated):
            raise ValueError(
                f"input.image_column needs a vision-language model with a chat template; model {model.path} is not one"
            )

    def encode(self, prompt: object) -> tuple[list[int], str | None]:
        tokens, errors = self.encode_all([prompt], [None])
        return tokens[0], errors[0]

    def encode_all(self, prompts: list, errors: list[str | None]) -> tuple[list[list[int]], list[str | None]]:
        """Token ids and error per prompt; rows with an error already are left as they are. Text
        goes to the tokenizer in one call for the batch."""
        tokens, errors, _ = self.encode_rows(prompts, errors)
        return tokens, errors

    def encode_rows(
        self, prompts: list, errors: list[str | None], leading: list[list[str]] | None = None
    ) -> tuple[list[list[int]], list[str | None], list[list[str]]]:
        """Token ids, error and image URLs per prompt (those of its image parts, in order);
        `leading`: per row, the URLs of images that go before the text of its first user turn."""
        tokens: list[list[int]] = [[] for _ in prompts]
        errors = list(errors)
        images: list[list[str]] = [list(urls) if urls else [] for urls in leading or [None] * len(prompts)]
        texts: dict[int, str | list[dict]] = {}  # text, or a conversation
        for i, prompt in enumerate(prompts):
            if errors[i] is not None:
                continue
            if isinstance(prompt, InvalidUTF8):
                errors[i] = prompt.error("messages" if self.conversations else "prompt")
                continue
            if self.conversations:
                problem = conversation_problem(prompt)
                if problem:
                    errors[i] = row_error(ErrorKind.invalid_messages, problem)
                else:
                    texts[i], images[i] = with_image_parts(prompt, images[i])
                    if images[i] and self.image_token_id is None:  # before its template sees image parts
                        errors[i] = self.placeholder_problem([], len(images[i]))
                        del texts[i]
                continue
            if isinstance(prompt, bytes):
                try:
                    prompt = prompt.decode("utf-8")
                except UnicodeDecodeError as error:
                    errors[i] = row_error(
                        ErrorKind.invalid_utf8, f"prompt is not valid UTF-8 ({error.reason} at byte {error.start})"
                    )
                    continue
            if isinstance(prompt, list):
                if all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
                    tokens[i] = prompt
                else:
                    errors[i] = row_error(
                        ErrorKind.invalid_token_ids, "prompt token ids must be integers in the vocabulary"
                    )
            elif isinstance(prompt, str):
                if prompt.strip() and images[i]:
                    texts[i], images[i] = with_image_parts([{"role": "user", "content": prompt}], images[i])
                elif prompt.strip():
                    texts[i] = prompt
            elif prompt is None:
                errors[i] = row_error(ErrorKind.null_prompt, "prompt is null")
            else:
                errors[i] = row_error(ErrorKind.not_text, f"prompt is {type(prompt).__name__}, not text")
        for i, ids in zip(texts, self.tokenize(list(texts.values()))):
            tokens[i] = ids
        for i, ids in enumerate(tokens):
            if errors[i] is None:
                tokens[i], errors[i] = self.fit(ids)
            if errors[i] is None and (images[i] or self.image_token_id is not None):
                errors[i] = self.placeholder_problem(tokens[i], len(images[i]))
            if errors[i] is not None:
                images[i] = []
        return tokens, errors, images

    def placeholder_problem(self, tokens: list[int], count: int) -> str | None:
        """Why a prompt's rendered tokens do not place its `count` images, or None. The engine
        takes a placeholder without an image as text, and the literal text of a placeholder
        in a prompt is one too: the counts must agree."""
        if self.image_token_id is None:
            return row_error(ErrorKind.invalid_messages, "image parts need a vision-language model")
        found = tokens.count(self.image_token_id)
        if found != count:
            return row_error(
                ErrorKind.invalid_messages,
                f"the prompt holds {found} image placeholders for {count} images (is one in its text, or cut off?)",
            )
        return None

    def fit(self, tokens: list[int]) -> tuple[list[int], str | None]:
        """A prompt's tokens as the engine gets them, or why there are none."""
        if not tokens:
            return [], row_error(ErrorKind.empty_prompt, "prompt is empty")
        if len(tokens) >= self.max_model_len:
            if self.overlong is Overlong.truncate_left:
                return tokens[-self.truncated_len :], None
            return [], row_error(
                ErrorKind.overlong_prompt,
                f"prompt has {len(tokens)} tokens; model.max_model_len is {self.max_model_len}",
            )
        return tokens, None

    def tokenize(self, prompts: list[str | list[dict]]) -> list[list[int]]:
        """Texts and conversations to token ids, in one tokenizer call."""
        if not prompts:
            return []
        if not self.templated:
            return self.tokenizer(prompts).input_ids
        conversations = [
            self.with_system([{"role": "user", "content": p}] if isinstance(p, str) else p) for p in prompts
        ]
        rendered = self.tokenizer.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=True, **self.chat_template_kwargs
        )
        return self.tokenizer(rendered, add_special_tokens=False).input_ids

    def with_system(self, conversation: list[dict]) -> list[dict]:
        if self.system_prompt is None or any(turn["role"] == "system" for turn in conversation):
            return conversation
        return [{"role": "system", "content": self.system_prompt}, *conversation]


ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image_url")


def with_image_parts(conversation: list[dict], leading: list[str]) -> tuple[list[dict], list[str]]:
    """The conversation as the chat template takes it, and its image URLs in order: `leading`
    (an image column's) go before the text of the first user turn. An image part renders as
    {"type": "image"}, which a vision-language model's template turns into its placeholder; a
    turn of text parts alone, as its text."""
    urls: list[str] = []
    turns = []
    for turn in conversation:
        content = turn["content"]
        if leading and turn["role"] == "user":
            text = [{"type": "text", "text": content}] if isinstance(content, str) else content
            content = [*({"type": "image_url", "image_url": {"url": url}} for url in leading), *text]
            leading = []
        if isinstance(content, list) and all(part["type"] == "text" for part in content):
            content = "".join(part["text"] for part in content)  # as every template takes it
        elif isinstance(content, list):
            content = [rendered_part(part, urls) for part in content]
        turns.append({"role": turn["role"], "content": content})
    return turns, urls


def rendered_part(part: dict, urls: list[str]) -> dict:
    """A content part for the template; an image part's URL goes to `urls`."""
    if part["type"] == "image_url":
        urls.append(part["image_url"]["url"])
        return {"type": "image"}
    return {"type": "text", "text": part["text"]}


def conversation_problem(conversation: object) -> str | None:
    """Why a row's messages are not a conversation, or None."""
    if not isinstance(conversation, list):
        return f"messages are {type(conversation).__name__}, not a list of turns"
    if not conversation:
        return "messages are empty"
    for n, turn in enumerate(conversation):
        if not isinstance(turn, dict) or set(turn) - {"role", "content"}:
            return f"turn {n} is not a {{role, content}} struct"
        if turn.get("role") not in ROLES:
            return f"turn {n} has role {turn.get('role')!r}; roles are {', '.join(ROLES)}"
        content = turn.get("content")
        if isinstance(content, list):
            problem = parts_problem(content)
            if problem:
                return f"turn {n} {problem}"
        elif not isinstance(content, str):
            return f"turn {n} has no text content"
    return None


def parts_problem(parts: list) -> str | None:
    """Why a turn's content parts are not text and image_url parts, or None."""
    if not parts:
        return "has no content parts"
    for n, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in PART_TYPES:
            return f"part {n} has type {kind!r}; parts are {', '.join(PART_TYPES)}"
        if kind == "text" and not isinstance(part.get("text"), str):
            return f"part {n} is text with no text"
        url = (part.get("image_url") or {}).get("url") if kind == "image_url" else ""
        if not isinstance(url, str) or (kind == "image_url" and not url):
            return f"part {n} is an image_url with no url"
    return None
