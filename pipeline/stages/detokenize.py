"""Detokenize stage (CPU): generated token ids -> text, and the output contract's columns."""
import pyarrow as pa

from pipeline.columns import (
    ERROR,
    FINISH_REASON,
    GENERATED_TEXT,
    GENERATED_TOKENS,
    ID,
    NUM_GENERATED_TOKENS,
    INTERNAL,
    NUM_INPUT_TOKENS,
    TOKEN_LIST,
)
from pipeline.metrics import StageMeter
from pipeline.model import ResolvedModel


class Detokenize:
    def __init__(self, model: ResolvedModel, id_column: str, carried: list[str], sink_name: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model.path)
        self.id_column = id_column
        self.carried = [c for c in carried if c != id_column]
        self.meter = StageMeter("detokenize", sink_name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.meter.batch() as report:
            tokens = batch.column(GENERATED_TOKENS).to_pylist()
            texts = [self.tokenizer.decode(t, skip_special_tokens=True) if t is not None else None for t in tokens]
            report.rows = batch.num_rows
            report.output_tokens = sum(len(t or ()) for t in tokens)
            columns = {
                ID: batch.column(self.id_column),
                GENERATED_TEXT: pa.array(texts, pa.string()),
                GENERATED_TOKENS: pa.array(tokens, TOKEN_LIST),
                NUM_INPUT_TOKENS: batch.column(NUM_INPUT_TOKENS),
                NUM_GENERATED_TOKENS: pa.array([len(t or ()) for t in tokens], pa.int32()),
                FINISH_REASON: batch.column(FINISH_REASON),
                ERROR: batch.column(ERROR),
                **{name: batch.column(name) for name in batch.column_names if name.startswith(INTERNAL)},
            }
            columns.update({name: batch.column(name) for name in self.carried if name not in columns})
            return pa.table(columns)
