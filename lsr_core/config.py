"""Typed experiment config: YAML (safe_load) over dataclass defaults, one level of `base:`, dotted CLI overrides.

    cfg = load_config(["--cfg", "yamls/demo.yaml", "--train.lr=1e-4", "--exp.name=try2"])

Every script reads the same `Config` (one section per pipeline stage), so the resolved `config.yaml` that one step
writes next to its output is a valid `--cfg` for the next step. Unknown keys, wrong types and out-of-range values raise
`ConfigError` naming the key (and the file), with a did-you-mean suggestion.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and where it came from."""


@dataclass
class ExpConfig:
    name: str = "default"
    output_dir: str = ""  # default: runs/<name>
    seed: int = 42


@dataclass
class ModelConfig:
    name_or_path: str = ""  # local folder, hub name, or a folder saved by train.py (lsr_config.json inside)
    kind: str = "auto"  # auto | encoder | decoder | encoder_decoder
    query_head: str = "mlm"  # mlm | mlp
    doc_head: str = "mlm"  # mlm | mlp
    shared: bool = True  # one backbone for queries and documents; False = two copies (asymmetric training)
    pooling: str = "max"  # max | sum over positions
    decoding: str = "multi_token"  # encoder_decoder only: multi_token | single_token | encoder_only | decoder_only
    bidirectional: bool = False  # decoder only: replace the causal mask by a full one
    echo: bool = False  # decoder only: feed the text twice, read logits on the second copy
    drop_bos: bool = False  # decoder only: do not pool the first position (attention sink)
    special_tokens: str = "reference"  # which special tokens ([CLS], [SEP], BOS) pool: reference = as the paper's
    #   code (JingfenQiao/Decoder4LSR) does: left out by encoder heads and decoder MLM heads, kept by T5 heads and
    #   decoder MLP heads | keep = every non-pad position pools (sentence-transformers' and naver's SPLADE)
    query_prefix: str = ""
    doc_prefix: str = ""
    max_query_len: int = 32
    max_doc_len: int = 256
    gguf_file: str = ""
    trust_remote_code: bool = False
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (bfloat16 where it is native, see `native_bf16`):
    #                         weights when loading for inference
    head_chunk: int = 0  # vocabulary rows per chunk in the MLM head; 0 = automatic
    head_kernel: str = "auto"  # encoding head: auto (Triton kernel on CUDA in bf16/fp16, else torch) | torch | triton
    packed: str = "auto"  # encoding with an encoder: texts end to end without padding, varlen flash attention
    #                       (auto: on CUDA for BERT/DistilBERT/ELECTRA/RoBERTa/XLM-R) | true (any device) | false
    attention_kernel: str = "auto"  # packed attention on CUDA: auto (Triton kernel with small tiles in bf16/fp16 at
    #                                 inference, else varlen) | varlen (torch's varlen_attn, FlashAttention-2)
    logit_shift: float = 0.0  # added to every vocabulary logit of the MLM head before ReLU (train.calibrate_nnz)
    length_buckets: int = 1  # training: split each batch into this many length-sorted sub-batches (less padding)
    compile: str = "none"  # none | default | reduce-overhead: torch.compile the transformer blocks (train and encode)
    compile_scope: str = "stack"  # stack: the block stack as one graph (small models) | layer: each block (7B)
    pad_to_multiple: int = 0  # pad batches to a multiple of this many tokens; 0 = 16 when compiling, else none
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list = field(default_factory=lambda: ["all-linear"])
    quantization: str = "none"  # none | 4bit | 8bit (QLoRA, bitsandbytes; its CPU backend is slow, for tests)
    gradient_checkpointing: bool = False
    attn_implementation: str = ""  # "" = transformers default (sdpa)


@dataclass
class DataConfig:
    format: str = "jsonl"  # jsonl | msmarco
    train_file: str = ""  # jsonl: {"qid","pos","negs",["scores"]} or {"query","pos","negs"} with texts
    corpus: str = ""  # jsonl/tsv: id, text
    queries: str = ""  # jsonl/tsv: id, text
    qrels: str = ""  # TREC qrels
    teacher_scores: str = ""  # msmarco: pickle.gz / json(.gz) {qid: {pid: score}}
    trust_pickle: bool = False  # allow loading a .pkl(.gz) teacher file (pickle can run code); else convert to JSON
    # msmarco: rescale the teacher's scores onto the reference teacher's mean and std, as the paper's RQ4 RankLLaMA
    # runs do (lsr_core/teachers.py): none | affine (one map for the file) | affine_query (one map per query)
    teacher_norm: str = "none"
    teacher_norm_reference: str = ""  # the teacher file whose scale to match (the MiniLM cross-encoder scores)
    n_negatives: int = 1
    max_examples: int = 0  # 0 = all


@dataclass
class TrainConfig:
    loss: str = "margin_mse"  # margin_mse | kl | infonce
    temperature: float = 1.0  # infonce / kl
    in_batch_negatives: bool = True  # infonce
    cross_device_negatives: bool = True  # infonce under DDP
    q_reg: str = "flops"  # flops | l1 | none
    d_reg: str = "flops"
    d_reg_form: str = "mean_of_groups"  # mean_of_groups (the reference's: (R(pos) + R(neg)) / 2) | concat (R(all docs))
    q_reg_weight: float = 0.0
    d_reg_weight: float = 0.0
    reg_warmup_steps: int = 0  # quadratic warm-up of regularizer weights, in optimizer steps
    lr: float = 2e-5
    weight_decay: float = 0.01
    optimizer: str = "adamw"  # adamw | adamw_8bit
    scheduler: str = "linear"  # linear | cosine | constant
    warmup_steps: int = 0
    batch_size: int = 8  # per device
    grad_accum: int = 1
    max_steps: int = 100  # optimizer steps
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16 | auto (bf16 where it is native, else no)
    save_every: int = 0  # optimizer steps between save_state; 0 = only at the end
    keep_checkpoints: int = 2
    resume: str = ""  # "" | auto | path to a checkpoint folder
    tracker: str = "none"  # none | tensorboard | wandb
    log_every: int = 10
    num_workers: int = 0
    deepspeed: str = ""  # path to a DeepSpeed json (or use an accelerate config)
    calibrate_nnz: int = 0  # >0: before training, set model.logit_shift so the first documents keep this many terms
    stop_after: int = 0  # testing aid: exit (as if killed) after this many optimizer steps


@dataclass
class EncodeConfig:
    model: str = ""  # default: <output_dir>/final if it exists, else model.name_or_path
    input: str = ""  # jsonl/tsv (id, text), a HF datasets file (.parquet/.arrow/.csv), or irds:<ir_datasets id>
    output: str = ""  # default: <output_dir>/encode/<input kind>
    kind: str = "doc"  # doc | query
    batch_size: int = 32
    topk: int = 0  # keep the k largest weights; 0 = all
    threshold: float = 0.0  # drop weights <= threshold
    quant_scale: float = 0.0  # >0: integer weights round(w * scale)
    shard_size: int = 0  # texts per shard; 0 = one shard per process
    num_workers: int = 0  # DataLoader workers tokenizing ahead of the model (GPU: ~4 on 16 cores; 0 on a 2-core CPU)
    num_writers: int = 0  # processes turning pruned vectors into JSON lines while the model runs (0: this process;
    #                       that Python work, ~1 us per term, can outpace a GPU: bench/vectors_cpu.py --writers)
    max_length: int = 0  # tokens per text; 0 = the model's (model.max_doc_len / max_query_len, or lsr_config.json)
    flops_docs: str = ""  # kind=query: encoded corpus folder for the FLOPs estimate; default: sibling 'corpus'
    overwrite: bool = False  # replace the output folder's shards when they were encoded with other settings (else
    #                          such a rerun is refused; with the same settings it resumes)


@dataclass
class IndexConfig:
    engine: str = "qdrant-edge"  # exact | qdrant-edge | seismic | milvus (default chosen by bench/search.py on real vectors)
    input: str = ""  # folder of encoded documents
    output: str = ""  # default: <output_dir>/index/<engine>
    seismic_n_postings: int = 1000
    seismic_centroid_fraction: float = 0.1
    seismic_summary_energy: float = 0.4
    milvus_uri: str = ""  # "" = milvus-lite file inside the index folder
    milvus_algo: str = "TAAT_NAIVE"  # inverted_index_algo: TAAT_NAIVE | DAAT_MAXSCORE | DAAT_WAND
    milvus_collection: str = "lsr_docs"  # a cluster URI: this collection is replaced by index.py


@dataclass
class SearchConfig:
    engine: str = ""  # default: the engine recorded in the index
    index: str = ""
    queries: str = ""  # folder of encoded queries
    output: str = ""  # default: <output_dir>/search/<name>.trec
    name: str = ""  # run tag; default: <exp.name>
    topk: int = 1000
    threads: int = 1
    seismic_query_cut: int = 20  # 20 / 0.8: best recall-latency trade-off in bench/RESULTS.md
    seismic_heap_factor: float = 0.8
    latency_sample: int = 1000  # queries re-run one at a time (1 thread) for ms/query mean/p99; 0 = skip
    force: bool = False  # search queries encoded by another model or vocabulary than the index's documents (warned)


@dataclass
class EvalConfig:
    qrels: str = ""
    runs: list = field(default_factory=list)
    metrics: list = field(default_factory=lambda: ["mrr@10", "ndcg@10", "recall@100", "recall@1000"])
    output: str = ""  # default: <output_dir>/eval
    plot: bool = False
    alpha: float = 0.05  # significance level of the paired t-test against the first run
    corpus: str = ""  # optional corpus file: warn about (and count) judged doc ids that are not in it


@dataclass
class ZeroShotConfig:
    query_template: str = "Query: {text}\nUse one word to represent the query in a retrieval task. Make sure your word is in lowercase.\nThe word is: \""
    doc_template: str = "Passage: {text}\nUse one word to represent the passage in a retrieval task. Make sure your word is in lowercase.\nThe word is: \""
    use_chat_template: bool = True
    system_prompt: str = ""  # chat template only: a system turn; "" = the template's own default
    answer_prefix: str = ""  # appended after the chat generation prompt (or the plain prompt), e.g. 'The word is: "'
    steps: int = 1  # greedy steps whose logits are max-aggregated
    in_text_only: bool = True
    query_topk: int = 1000
    doc_topk: int = 128
    emit_dense: bool = False
    # next_token: log1p(relu) of the logits at the answer position (ours); multi_token: the reference's RQ1 method,
    # log1p(relu) of the logits at every position of prompt + text, max-pooled (zeroshot_prompt.py's docstring)
    method: str = "next_token"
    max_length: int = 250  # multi_token: tokens of the whole prompt + text, special tokens included


@dataclass
class Config:
    exp: ExpConfig = field(default_factory=ExpConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    cli_keys = frozenset()  # not a field, so not saved: the dotted keys load_config took from the command line

    @property
    def output_dir(self) -> Path:
        return Path(self.exp.output_dir or os.path.join("runs", self.exp.name))


CHOICES = {
    "model.kind": ["auto", "encoder", "decoder", "encoder_decoder"],
    "model.query_head": ["mlm", "mlp"],
    "model.doc_head": ["mlm", "mlp"],
    "model.pooling": ["max", "sum"],
    "model.decoding": ["multi_token", "single_token", "encoder_only", "decoder_only"],
    "model.special_tokens": ["reference", "keep"],
    "model.dtype": ["float32", "bfloat16", "float16", "auto"],
    "model.quantization": ["none", "4bit", "8bit"],
    "model.compile": ["none", "default", "reduce-overhead", "max-autotune"],
    "model.compile_scope": ["stack", "layer"],
    "model.head_kernel": ["auto", "torch", "triton"],
    "model.packed": ["auto", "true", "false"],
    "model.attention_kernel": ["auto", "varlen"],
    "data.format": ["jsonl", "msmarco"],
    "data.teacher_norm": ["none", "affine", "affine_query"],
    "train.loss": ["margin_mse", "kl", "infonce"],
    "train.q_reg": ["flops", "l1", "none"],
    "train.d_reg": ["flops", "l1", "none"],
    "train.d_reg_form": ["mean_of_groups", "concat"],
    "train.optimizer": ["adamw", "adamw_8bit"],
    "train.scheduler": ["linear", "cosine", "constant"],
    "train.mixed_precision": ["no", "bf16", "fp16", "auto"],
    "train.tracker": ["none", "tensorboard", "wandb"],
    "encode.kind": ["doc", "query"],
    "zeroshot.method": ["next_token", "multi_token"],
    "index.engine": ["exact", "qdrant-edge", "seismic", "milvus"],
    "search.engine": ["", "exact", "qdrant-edge", "seismic", "milvus"],
    "index.milvus_algo": ["TAAT_NAIVE", "DAAT_MAXSCORE", "DAAT_WAND"],
}
POSITIVE = {"model.max_query_len", "model.max_doc_len", "train.batch_size", "train.grad_accum", "train.max_steps",
            "encode.batch_size", "search.topk", "search.threads",
            "index.seismic_n_postings", "index.seismic_centroid_fraction", "index.seismic_summary_energy",
            "search.seismic_query_cut", "search.seismic_heap_factor", "zeroshot.steps", "zeroshot.max_length", "data.n_negatives"}
NON_NEGATIVE = {"train.lr", "train.weight_decay", "train.warmup_steps", "train.q_reg_weight", "train.d_reg_weight",
                "train.reg_warmup_steps", "train.save_every", "encode.topk", "encode.quant_scale", "encode.max_length", "encode.num_workers",
                "zeroshot.query_topk", "zeroshot.doc_topk", "model.head_chunk", "train.stop_after",
                "model.pad_to_multiple", "train.calibrate_nnz",
                "search.latency_sample"}


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value, typ, key: str, where: str):
    """Check (and for CLI strings, parse) one value against its dataclass field type."""
    origin = typing.get_origin(typ) or typ  # typing.get_type_hints has resolved the annotations
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif origin is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):  # YAML 1.1 reads `1e-4` as a str
            try:
                number = float(value)
            except OverflowError:  # an integer beyond float's range
                number = math.inf
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # YAML `.nan`/`.inf`, `--train.lr=nan`: no range check would catch NaN
                raise ConfigError(f"{where}: '{key}' must be a finite number, got {value!r}")
            return number
    elif origin is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML reads `packed: true` as a bool
            return "true" if value else "false"
        if value is None:
            return ""
    elif origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
    raise ConfigError(f"{where}: '{key}' must be {origin.__name__}, got {type(value).__name__} {value!r}")


def _merge(cfg: Config, data: dict, where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a mapping of sections, got {type(data).__name__}")
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    for sec_name, values in data.items():
        if sec_name not in sections:
            raise ConfigError(f"{where}: unknown section '{sec_name}'{_suggest(sec_name, sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section '{sec_name}' must be a mapping")
        section = getattr(cfg, sec_name)
        hints = typing.get_type_hints(type(section))
        for key, value in values.items():
            dotted = f"{sec_name}.{key}"
            if key not in hints:
                raise ConfigError(f"{where}: unknown key '{dotted}'{_suggest(key, hints)}")
            setattr(section, key, _coerce(value, hints[key], dotted, where))


def _read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:  # its str() spans several lines: keep the problem and where it is
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError(f"{where}: invalid YAML ({getattr(err, 'problem', None) or err})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def _parse_cli_value(raw: str, typ=None):
    """CLI values are YAML scalars (`1e-4`, `true`, `[a, b]`); bare strings stay strings. For a string key the text
    is taken as it is (`no`, `query: ` would otherwise parse as a bool or a mapping), unless it is a quoted YAML
    string."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if typ is str and not isinstance(value, str):
        return raw
    return raw if value is None and raw != "" else value


def validate(cfg: Config) -> None:
    for section in dataclasses.fields(cfg):  # a Config built in code bypasses `_coerce`
        for name, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"'{section.name}.{name}' must be a finite number, got {value!r}")
    for dotted, options in CHOICES.items():
        sec, key = dotted.split(".")
        value = getattr(getattr(cfg, sec), key)
        if value not in options:
            raise ConfigError(f"'{dotted}' must be one of {options}, got {value!r}{_suggest(str(value), options)}")
    for dotted in POSITIVE | NON_NEGATIVE:
        sec, key = dotted.split(".")
        value = getattr(getattr(cfg, sec), key)
        if dotted in POSITIVE and value <= 0:
            raise ConfigError(f"'{dotted}' must be > 0, got {value!r}")
        if value < 0:
            raise ConfigError(f"'{dotted}' must be >= 0, got {value!r}")
    if cfg.train.temperature <= 0:
        raise ConfigError(f"'train.temperature' must be > 0, got {cfg.train.temperature!r}")
    if cfg.data.teacher_norm != "none" and cfg.data.format != "msmarco":  # the scores it rescales load there
        raise ConfigError(f"'data.teacher_norm={cfg.data.teacher_norm}' needs 'data.format=msmarco'")


def load_config(argv: list[str] | None = None, runs_model: bool = True) -> Config:
    """`--cfg FILE` (optional, first) then `--section.key=value` overrides, applied in order. `runs_model=False`
    (index, search, evaluate): precision is resolved all the same, without the warning about computing in it."""
    argv = list(argv or [])
    cfg = Config()
    if "--cfg" in argv:
        i = argv.index("--cfg")
        if i + 1 >= len(argv):
            raise ConfigError("--cfg needs a file path")
        path = argv.pop(i + 1)
        argv.pop(i)
        data = _read_yaml(path)
        base = data.pop("base", None)
        if base:
            base_path = str(Path(path).parent / base) if not Path(base).is_absolute() else base
            base_data = _read_yaml(base_path)
            if "base" in base_data:
                raise ConfigError(f"{base_path}: only one level of 'base:' is allowed")
            _merge(cfg, base_data, base_path)
        _merge(cfg, data, path)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"bad argument {arg!r}: expected --section.key=value")
        dotted, raw = arg[2:].split("=", 1)
        sec, _, key = dotted.partition(".")
        section = getattr(cfg, sec, None)
        typ = typing.get_type_hints(type(section)).get(key) if dataclasses.is_dataclass(section) else None
        _merge(cfg, {sec: {key: _parse_cli_value(raw, typ)}}, "command line")
        cfg.cli_keys = cfg.cli_keys | {dotted}
    validate(cfg)
    resolve_precision(cfg, warn=runs_model)
    return cfg


def resolve_precision(cfg: Config, warn: bool = True) -> None:
    """`auto` in model.dtype / train.mixed_precision -> bf16 where this machine computes it natively, else float32 /
    no; an explicit bf16 on a CPU that emulates it gets a warning. The saved config.yaml records the choice."""
    wants_bf16 = {cfg.model.dtype, cfg.train.mixed_precision} & {"auto", "bfloat16", "bf16"}
    if not wants_bf16:
        return
    from lsr_core.utils import native_bf16

    native = native_bf16()
    if cfg.model.dtype == "auto":
        cfg.model.dtype = "bfloat16" if native else "float32"
    if cfg.train.mixed_precision == "auto":
        cfg.train.mixed_precision = "bf16" if native else "no"
    if warn and not native and wants_bf16 - {"auto"}:
        logging.getLogger(__name__).warning(
            "bf16 requested on a CPU without AVX512-BF16 or AMX: its bf16 matmuls are emulated, many times slower "
            "than float32; 'auto' picks float32 here")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Config, sections=("model",)) -> str:
    """Short hash of the sections that determine the vectors (recorded in meta.json)."""
    blob = json.dumps({s: dataclasses.asdict(getattr(cfg, s)) for s in sections}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def save_config(cfg: Config, folder: str | Path) -> Path:
    """Write the resolved config atomically as <folder>/config.yaml."""
    from lsr_core.utils import atomic_write_text

    path = Path(folder) / "config.yaml"
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
