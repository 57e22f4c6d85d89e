"""The bundled sample: a few hundred varied prompts, from a few tokens to ~700 (questions,
poems, explanations, and tasks over documents of 1 to ~60 sentences), reproducible by seed."""

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TOPICS = [
    "the ocean",
    "a city at night",
    "machine learning",
    "the history of printing",
    "volcanoes",
    "coffee",
    "the moon landing",
    "honeybees",
    "railways",
    "the water cycle",
    "chess",
    "autumn",
]
QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "How do vaccines work?",
    "What is a prime number?",
    "Who wrote Hamlet?",
    "How far is the Moon from the Earth?",
    "What causes the seasons?",
    "What is photosynthesis?",
    "How does a refrigerator keep food cold?",
    "What is the difference between weather and climate?",
]
SENTENCES = [
    "The committee met on Tuesday to review the budget for the coming year.",
    "Rainfall in the northern valleys was twice the seasonal average.",
    "Engineers replaced the old bridge with a lighter steel design.",
    "The library extended its opening hours during the examination period.",
    "Local farmers reported an early harvest of apples and pears.",
    "A new study suggests that regular walking improves sleep quality.",
    "The museum acquired a collection of maps from the sixteenth century.",
    "Traffic on the main road was diverted while the pipes were repaired.",
    "Students built a small weather station on the school roof.",
    "The orchestra announced a series of free concerts in the park.",
    "Shipping costs rose sharply after the canal was closed for repairs.",
    "Volunteers planted three hundred trees along the river bank.",
    "The council approved plans for a cycle lane through the town centre.",
    "Researchers observed a rare bird nesting on the cliffs.",
    "The bakery on the corner now opens at six in the morning.",
    "Sales of electric bicycles doubled over the past two years.",
]


def make_prompt(rng: random.Random, document_sentences: int | None = None) -> str:
    """A varied prompt; with `document_sentences`, always a task over a document of about that
    many sentences (a long-prompt workload: ~12 tokens a sentence)."""
    if document_sentences:
        return document_task(rng, int(rng.triangular(0.9, 1.1) * document_sentences))
    kind = rng.random()
    if kind < 0.2:
        return rng.choice(QUESTIONS)
    if kind < 0.35:
        return f"Write a short poem about {rng.choice(TOPICS)}."
    if kind < 0.5:
        return f"Explain {rng.choice(TOPICS)} to a ten-year-old in three sentences."
    # Documents of 1 to ~60 sentences: ~15 to ~700 tokens.
    return document_task(rng, int(rng.triangular(1, 62, 10)))


def document_task(rng: random.Random, sentences: int) -> str:
    document = " ".join(rng.choice(SENTENCES) for _ in range(sentences))
    task = rng.choice(
        [
            "Summarize the following report in one sentence.",
            "List the main facts in this text.",
            "Write a headline for this news item.",
        ]
    )
    return f"{task}\n\n{document}"


def write_sample(path: Path, rows: int, seed: int, document_sentences: int | None = None) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    prompts = [make_prompt(rng, document_sentences) for _ in range(rows)]
    pq.write_table(pa.table({"id": [f"sample-{i:04d}" for i in range(rows)], "prompt": prompts}), path)
