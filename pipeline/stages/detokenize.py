"""Detokenize stage (CPU): generated token ids -> text, and the output contract's columns."""

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.columns import (
    ENGINE_TEXT,
    ERROR,
    ERROR_KIND,
    FINISH_REASON,
    GENERATED_TEXT,
    GENERATED_TOKENS,
    ID,
    INTERNAL,
    LOGPROBS,
    NUM_GENERATED_TOKENS,
    NUM_INPUT_TOKENS,
    TOKEN_LIST,
    error_kind,
)
from pipeline.engine.model import ResolvedModel, load_tokenizer
from pipeline.job.meter import StageMeter


class Detokenize:
    def __init__(self, model: ResolvedModel, id_column: str, carried: list[str], sink_name: str):
        self.tokenizer = load_tokenizer(model.path)
        self.id_column = id_column
        self.carried = [c for c in carried if c != id_column]
        self.meter = StageMeter("detokenize", sink_name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.meter.batch() as report:
            column = batch.column(GENERATED_TOKENS)
            many = pa.types.is_list(column.type.value_type)  # n completions a row
            rows = column.to_pylist()
            samples = [s for r in rows if r is not None for s in (r if many else [r])]
            decoded = iter(self.tokenizer.batch_decode(samples, skip_special_tokens=True))
            texts = [None if r is None else [next(decoded) for _ in r] if many else next(decoded) for r in rows]
            if ENGINE_TEXT in batch.column_names:  # the engine's, where it cut the text at a stop string
                texts = [
                    own if own is not None else text for own, text in zip(batch.column(ENGINE_TEXT).to_pylist(), texts)
                ]
            if many:
                lengths = pa.array([None if r is None else [len(s) for s in r] for r in rows], pa.list_(pa.int32()))
            else:
                lengths = pc.fill_null(pc.list_value_length(column), 0).cast(pa.int32())
            report.rows = batch.num_rows
            report.output_tokens = sum(len(s) for s in samples)
            columns = {
                ID: batch.column(self.id_column),
                GENERATED_TEXT: pa.array(texts, pa.list_(pa.string()) if many else pa.string()),
                GENERATED_TOKENS: column.cast(pa.list_(TOKEN_LIST) if many else TOKEN_LIST),
                NUM_INPUT_TOKENS: batch.column(NUM_INPUT_TOKENS),
                NUM_GENERATED_TOKENS: lengths,
                FINISH_REASON: batch.column(FINISH_REASON),
                ERROR: batch.column(ERROR),
                ERROR_KIND: error_kind(batch.column(ERROR)),
                **{name: batch.column(name) for name in (LOGPROBS,) if name in batch.column_names},
                **{name: batch.column(name) for name in batch.column_names if name.startswith(INTERNAL)},
            }
            columns.update({name: batch.column(name) for name in self.carried if name not in columns})
            return pa.table(columns)
