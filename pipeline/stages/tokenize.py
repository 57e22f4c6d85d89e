"""Tokenize stage (CPU): prompt text -> token ids, with a per-row error for prompts that cannot
be generated from. A prompt column of integer lists is taken as token ids already."""

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.columns import (
    ERROR,
    FINISH_REASON,
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
from pipeline.job.meter import StageMeter


class Tokenize:
    def __init__(self, model: ResolvedModel, input: InputConfig, max_tokens: int, sink_name: str):
        self.encoder = PromptEncoder(model, input, max_tokens)
        self.prompt_column = input.source_column
        self.meter = StageMeter("tokenize", sink_name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.meter.batch() as report:
            tokens, errors = self.encoder.encode_all(
                prompt_values(batch.column(self.prompt_column)), batch.column(ERROR).to_pylist()
            )
            lengths = pa.array([len(t) for t in tokens], pa.int32())
            report.rows = batch.num_rows
            report.input_tokens = int(pc.sum(lengths).as_py() or 0)
            return with_columns(
                batch,
                **{
                    PROMPT_TOKENS: pa.array(tokens, TOKEN_LIST),
                    NUM_INPUT_TOKENS: lengths,
                    FINISH_REASON: pa.nulls(batch.num_rows, pa.string()),
                    ERROR: pa.array(errors, pa.string()),
                },
            )


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

    def encode(self, prompt: object) -> tuple[list[int], str | None]:
        tokens, errors = self.encode_all([prompt], [None])
        return tokens[0], errors[0]

    def encode_all(self, prompts: list, errors: list[str | None]) -> tuple[list[list[int]], list[str | None]]:
        """Token ids and error per prompt; rows with an error already are left as they are. Text
        goes to the tokenizer in one call for the batch."""
        tokens: list[list[int]] = [[] for _ in prompts]
        errors = list(errors)
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
                    texts[i] = prompt
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
                if prompt.strip():
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
        return tokens, errors

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
        if not isinstance(turn.get("content"), str):
            return f"turn {n} has no text content"
    return None
