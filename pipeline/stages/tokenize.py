"""Tokenize stage (CPU): prompt text -> token ids, with a per-row error for prompts that cannot
be generated from. A prompt column of integer lists is taken as token ids already."""
import pyarrow as pa

from pipeline.columns import ERROR, FINISH_REASON, NUM_INPUT_TOKENS, PROMPT_TOKENS, TOKEN_LIST, with_columns
from pipeline.config import InputConfig
from pipeline.metrics import StageMeter
from pipeline.model import ResolvedModel


class Tokenize:
    def __init__(self, model: ResolvedModel, input: InputConfig, sink_name: str):
        self.encoder = PromptEncoder(model, input)
        self.prompt_column = input.prompt_column
        self.meter = StageMeter("tokenize", sink_name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.meter.batch() as report:
            tokens, errors = zip(*map(self.encoder.encode, batch.column(self.prompt_column).to_pylist()))
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


class PromptEncoder:
    """Prompt -> token ids, or the reason there are none. Shared with the plain-vLLM baseline."""

    def __init__(self, model: ResolvedModel, input: InputConfig):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model.path)
        self.vocab_size = len(self.tokenizer)
        self.apply_chat_template = input.apply_chat_template
        self.max_model_len = model.max_model_len

    def encode(self, prompt: object) -> tuple[list[int], str | None]:
        if isinstance(prompt, list):
            tokens = prompt
            if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in tokens):
                return [], "prompt token ids must be integers in the vocabulary"
        elif isinstance(prompt, str):
            tokens = self.tokenize(prompt) if prompt.strip() else []
        else:
            return [], f"prompt is {type(prompt).__name__ if prompt is not None else 'null'}, not text"
        if not tokens:
            return [], "prompt is empty"
        if len(tokens) >= self.max_model_len:
            return [], f"prompt has {len(tokens)} tokens; model.max_model_len is {self.max_model_len}"
        return tokens, None

    def tokenize(self, prompt: str) -> list[int]:
        if self.apply_chat_template and self.tokenizer.chat_template:
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return self.tokenizer(prompt, add_special_tokens=False).input_ids
        return self.tokenizer(prompt).input_ids
