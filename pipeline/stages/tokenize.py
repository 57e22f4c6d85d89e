"""Tokenize stage (CPU): prompt text -> token ids, with a per-row error for prompts that cannot
be generated from. A prompt column of integer lists is taken as token ids already."""
import pyarrow as pa

from pipeline.columns import ERROR, FINISH_REASON, NUM_INPUT_TOKENS, PROMPT_TOKENS, TOKEN_LIST, row_error, with_columns
from pipeline.config import InputConfig, Overlong
from pipeline.metrics import StageMeter
from pipeline.model import ResolvedModel


class Tokenize:
    def __init__(self, model: ResolvedModel, input: InputConfig, max_tokens: int, sink_name: str):
        self.encoder = PromptEncoder(model, input, max_tokens)
        self.prompt_column = input.prompt_column
        self.meter = StageMeter("tokenize", sink_name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.meter.batch() as report:
            tokens, errors = [], batch.column(ERROR).to_pylist()
            for i, prompt in enumerate(prompt_values(batch.column(self.prompt_column))):
                row_tokens, error = self.encoder.encode(prompt) if errors[i] is None else ([], errors[i])
                tokens.append(row_tokens)
                errors[i] = error
            report.rows = batch.num_rows
            report.input_tokens = sum(len(t) for t in tokens)
            return with_columns(
                batch,
                **{
                    PROMPT_TOKENS: pa.array(tokens, TOKEN_LIST),
                    NUM_INPUT_TOKENS: pa.array([len(t) for t in tokens], pa.int32()),
                    FINISH_REASON: pa.nulls(batch.num_rows, pa.string()),
                    ERROR: pa.array(errors, pa.string()),
                },
            )


def prompt_values(column: pa.ChunkedArray) -> list:
    """The column as Python values; text is decoded row by row, so one row of invalid UTF-8
    (Parquet does not check) spoils only itself."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = column.cast(pa.large_binary())
    return column.to_pylist()


class PromptEncoder:
    """Prompt -> token ids, or the reason there are none. Shared with the plain-vLLM baseline."""

    def __init__(self, model: ResolvedModel, input: InputConfig, max_tokens: int):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model.path)
        self.vocab_size = len(self.tokenizer)
        self.apply_chat_template = input.apply_chat_template
        self.overlong = input.overlong
        self.max_model_len = model.max_model_len
        # Truncation keeps room for the whole generation budget (and at least one token).
        self.truncated_len = model.max_model_len - min(max_tokens, model.max_model_len - 1)

    def encode(self, prompt: object) -> tuple[list[int], str | None]:
        if isinstance(prompt, bytes):
            try:
                prompt = prompt.decode("utf-8")
            except UnicodeDecodeError as error:
                return [], row_error("invalid_utf8", f"prompt is not valid UTF-8 ({error.reason} at byte {error.start})")
        if isinstance(prompt, list):
            tokens = prompt
            if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in tokens):
                return [], row_error("invalid_token_ids", "prompt token ids must be integers in the vocabulary")
        elif isinstance(prompt, str):
            tokens = self.tokenize(prompt) if prompt.strip() else []
        elif prompt is None:
            return [], row_error("null_prompt", "prompt is null")
        else:
            return [], row_error("not_text", f"prompt is {type(prompt).__name__}, not text")
        if not tokens:
            return [], row_error("empty_prompt", "prompt is empty")
        if len(tokens) >= self.max_model_len:
            if self.overlong is Overlong.truncate_left:
                return tokens[-self.truncated_len :], None
            return [], row_error(
                "overlong_prompt", f"prompt has {len(tokens)} tokens; model.max_model_len is {self.max_model_len}"
            )
        return tokens, None

    def tokenize(self, prompt: str) -> list[int]:
        if self.apply_chat_template and self.tokenizer.chat_template:
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return self.tokenizer(prompt, add_special_tokens=False).input_ids
        return self.tokenizer(prompt).input_ids
