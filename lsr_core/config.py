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
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and where it came from."""


def one_of(*options: str, default: str | None = None):
    """A str field that `validate` keeps to `options` (default: the first)."""
    return field(default=options[0] if default is None else default, metadata={"choices": list(options)})


def positive(default):
    return field(default=default, metadata={"min": "> 0"})


def non_negative(default):
    return field(default=default, metadata={"min": ">= 0"})


@dataclass
class ExpConfig:
    name: str = "default"
    output_dir: str = ""  # default: runs/<name>
    seed: int = 42


@dataclass
class ModelConfig:
    name_or_path: str = ""  # local folder, hub name, or a folder saved by train.py (lsr_config.json inside)
    kind: str = one_of("auto", "encoder", "decoder", "encoder_decoder")
    query_head: str = one_of("mlm", "mlp")
    doc_head: str = one_of("mlm", "mlp")
    shared: bool = True  # one backbone for queries and documents; False = two copies (asymmetric training)
    pooling: str = one_of("max", "sum")  # over positions
    decoding: str = one_of("multi_token", "single_token", "encoder_only", "decoder_only")  # encoder_decoder only
    bidirectional: bool = False  # decoder only: replace the causal mask by a full one
    echo: bool = False  # decoder only: feed the text twice, read logits on the second copy
    drop_bos: bool = False  # decoder only: do not pool the first position (attention sink)
    # which special tokens ([CLS], [SEP], BOS) pool: reference = left out by encoder and decoder MLM heads, kept by T5
    # and decoder MLP heads, as JingfenQiao/Decoder4LSR does | keep = all non-pad positions (naver's SPLADE, sbert)
    special_tokens: str = one_of("reference", "keep")
    query_prefix: str = ""
    doc_prefix: str = ""
    max_query_len: int = positive(32)
    max_doc_len: int = positive(256)
    gguf_file: str = ""
    trust_remote_code: bool = False
    dtype: str = one_of("float32", "bfloat16", "float16", "auto")  # inference weights; auto: bf16 where native
    head_chunk: int = non_negative(0)  # vocabulary rows per chunk in the MLM head; 0 = automatic
    head_kernel: str = one_of("auto", "torch", "triton")  # encoding head; auto: Triton on CUDA in bf16/fp16
    packed: str = one_of("auto", "true", "false")  # encoders: texts end to end, no padding (auto: CUDA, BERT-likes)
    attention_kernel: str = one_of("auto", "varlen")  # packed on CUDA; auto: our Triton kernel at bf16/fp16 inference
    logit_shift: float = 0.0  # added to every vocabulary logit of the MLM head before ReLU (train.calibrate_nnz)
    length_buckets: int = 1  # training: split each batch into this many length-sorted sub-batches (less padding)
    compile: str = one_of("none", "default", "reduce-overhead", "max-autotune")  # torch.compile the blocks
    compile_scope: str = one_of("stack", "layer")  # stack: the blocks as one graph (small models) | layer: each (7B)
    pad_to_multiple: int = non_negative(0)  # pad batches to a multiple of this; 0: 16 when compiling, else none
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list = field(default_factory=lambda: ["all-linear"])
    quantization: str = one_of("none", "4bit", "8bit")  # QLoRA (bitsandbytes; its CPU backend is slow, for tests)
    gradient_checkpointing: bool = False
    attn_implementation: str = ""  # "" = transformers default (sdpa)


@dataclass
class DataConfig:
    format: str = one_of("jsonl", "msmarco")
    train_file: str = ""  # jsonl: {"qid","pos","negs",["scores"]} or {"query","pos","negs"} with texts
    corpus: str = ""  # jsonl/tsv: id, text
    queries: str = ""  # jsonl/tsv: id, text
    qrels: str = ""  # TREC qrels
    teacher_scores: str = ""  # msmarco: pickle.gz / json(.gz) {qid: {pid: score}}
    trust_pickle: bool = False  # allow loading a .pkl(.gz) teacher file (pickle can run code); else convert to JSON
    # msmarco: map the teacher's scores onto the reference teacher's mean and std (one map for the file, or one per
    # query), as the paper's RQ4 RankLLaMA runs do (lsr_core/teachers.py)
    teacher_norm: str = one_of("none", "affine", "affine_query")
    teacher_norm_reference: str = ""  # the teacher file whose scale to match (the MiniLM cross-encoder scores)
    n_negatives: int = positive(1)
    max_examples: int = 0  # 0 = all


@dataclass
class TrainConfig:
    loss: str = one_of("margin_mse", "kl", "infonce")  # losses.LOSSES
    temperature: float = positive(1.0)  # infonce / kl
    in_batch_negatives: bool = True  # infonce
    cross_device_negatives: bool = True  # infonce under DDP
    q_reg: str = one_of("flops", "l1", "none")  # losses.REGULARIZERS
    d_reg: str = one_of("flops", "l1", "none")
    d_reg_form: str = one_of("mean_of_groups", "concat")  # the reference's (R(pos) + R(neg)) / 2 | R(all docs)
    q_reg_weight: float = non_negative(0.0)
    d_reg_weight: float = non_negative(0.0)
    reg_warmup_steps: int = non_negative(0)  # quadratic warm-up of regularizer weights, in optimizer steps
    lr: float = non_negative(2e-5)
    weight_decay: float = non_negative(0.01)
    optimizer: str = one_of("adamw", "adamw_8bit")
    scheduler: str = one_of("linear", "cosine", "constant")
    warmup_steps: int = non_negative(0)
    batch_size: int = positive(8)  # per device
    grad_accum: int = positive(1)
    max_steps: int = positive(100)  # optimizer steps
    max_grad_norm: float = 1.0
    mixed_precision: str = one_of("no", "bf16", "fp16", "auto")  # auto: bf16 where it is native, else no
    save_every: int = non_negative(0)  # optimizer steps between save_state; 0 = only at the end
    keep_checkpoints: int = 2
    resume: str = ""  # "" | auto | path to a checkpoint folder
    tracker: str = one_of("none", "tensorboard")  # accelerate trackers installed by requirements.txt
    log_every: int = 10
    num_workers: int = 0
    deepspeed: str = ""  # path to a DeepSpeed json (or use an accelerate config)
    calibrate_nnz: int = non_negative(0)  # >0: set model.logit_shift so the first documents keep this many terms
    stop_after: int = non_negative(0)  # testing aid: exit (as if killed) after this many optimizer steps


@dataclass
class EncodeConfig:
    model: str = ""  # default: <output_dir>/final if it exists, else model.name_or_path
    input: str = ""  # jsonl/tsv (id, text), a HF datasets file (.parquet/.arrow/.csv), or irds:<ir_datasets id>
    output: str = ""  # default: <output_dir>/encode/<input kind>
    kind: str = one_of("doc", "query")
    batch_size: int = positive(32)
    topk: int = non_negative(0)  # keep the k largest weights; 0 = all
    threshold: float = 0.0  # drop weights <= threshold
    quant_scale: float = non_negative(0.0)  # >0: integer weights round(w * scale)
    shard_size: int = 0  # texts per shard; 0 = one shard per process
    num_workers: int = non_negative(0)  # DataLoader workers tokenizing ahead (GPU: ~4 on 16 cores; 2-core CPU: 0)
    num_writers: int = 0  # processes writing JSON lines while the model runs (a GPU can outpace one); 0: this one
    max_length: int = non_negative(0)  # tokens per text; 0: model.max_doc_len / max_query_len (or lsr_config.json)
    flops_docs: str = ""  # kind=query: encoded corpus folder for the FLOPs estimate; default: sibling 'corpus'
    overwrite: bool = False  # replace shards encoded with other settings (else refused; same settings resume)


@dataclass
class IndexConfig:
    # engines.ENGINES; the default chosen by bench/search.py on real vectors
    engine: str = one_of("exact", "qdrant-edge", "seismic", "milvus", default="qdrant-edge")
    input: str = ""  # folder of encoded documents
    output: str = ""  # default: <output_dir>/index/<engine>
    seismic_n_postings: int = positive(1000)
    seismic_centroid_fraction: float = positive(0.1)
    seismic_summary_energy: float = positive(0.4)
    milvus_uri: str = ""  # "" = milvus-lite file inside the index folder
    milvus_algo: str = one_of("TAAT_NAIVE", "DAAT_MAXSCORE", "DAAT_WAND")  # inverted_index_algo
    milvus_collection: str = "lsr_docs"  # a cluster URI: this collection is replaced by index.py


@dataclass
class SearchConfig:
    engine: str = one_of("", "exact", "qdrant-edge", "seismic", "milvus")  # "": the engine recorded in the index
    index: str = ""
    queries: str = ""  # folder of encoded queries
    output: str = ""  # default: <output_dir>/search/<name>.trec
    name: str = ""  # run tag; default: <exp.name>
    topk: int = positive(1000)
    threads: int = positive(1)
    seismic_query_cut: int = positive(20)  # 20 / 0.8: best recall-latency trade-off in bench/RESULTS.md
    seismic_heap_factor: float = positive(0.8)
    latency_sample: int = non_negative(1000)  # queries rerun one at a time for ms/query mean/p99; 0 = skip
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
    steps: int = positive(1)  # greedy steps whose logits are max-aggregated
    in_text_only: bool = True
    query_topk: int = non_negative(1000)
    doc_topk: int = non_negative(128)
    emit_dense: bool = False
    # next_token: log1p(relu) of the logits at the answer position (ours); multi_token: the reference's RQ1 method,
    # log1p(relu) of the logits at every position of prompt + text, max-pooled (zeroshot_prompt.py's docstring)
    method: str = one_of("next_token", "multi_token")
    max_length: int = positive(250)  # multi_token: tokens of the whole prompt + text, special tokens included


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


def _table(kind: str) -> dict:
    """{"section.key": the field's metadata[kind]} over every section, for the fields that have one."""
    return {f"{sec.name}.{f.name}": f.metadata[kind] for sec in dataclasses.fields(Config)
            for f in dataclasses.fields(sec.default_factory) if kind in f.metadata}


CHOICES = _table("choices")  # "section.key" -> allowed values
MINIMUM = _table("min")  # "section.key" -> "> 0" | ">= 0"


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
    """CLI values are YAML scalars (`1e-4`, `true`, `[a, b]`); bare strings stay strings. A string key takes the text
    exactly as typed, unless the whole value is one quoted YAML string (`'passage: '`, evaluate.py's JSON paths)."""
    quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
    if typ is str and not quoted:
        # YAML would read `no` as a bool and `query: ` as a mapping, strip `passage `'s space and `a #b`'s comment
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if typ is str:
        return value if isinstance(value, str) else raw
    return raw if value is None and raw != "" else value


def validate(cfg: Config) -> None:  # also for a Config built in code, which bypasses `_coerce`
    for dotted, value in ((f"{s.name}.{k}", v) for s in dataclasses.fields(cfg)
                          for k, v in dataclasses.asdict(getattr(cfg, s.name)).items()):
        options, bound = CHOICES.get(dotted), MINIMUM.get(dotted)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"'{dotted}' must be a finite number, got {value!r}")
        if options is not None and value not in options:
            raise ConfigError(f"'{dotted}' must be one of {options}, got {value!r}{_suggest(str(value), options)}")
        if bound is not None and (value < 0 or (bound == "> 0" and value == 0)):
            raise ConfigError(f"'{dotted}' must be {bound}, got {value!r}")
    if cfg.data.teacher_norm != "none" and cfg.data.format != "msmarco":  # the scores it rescales load there
        raise ConfigError(f"'data.teacher_norm={cfg.data.teacher_norm}' needs 'data.format=msmarco'")


def load_config(argv: list[str] | None = None, runs_model: bool = True) -> Config:
    """`--cfg FILE` (optional; several are merged in order, e.g. a method's yaml over a model's), then
    `--section.key=value` overrides in order. `runs_model=False` (index, search, evaluate): precision is resolved all
    the same, without the warning about computing in it."""
    argv = list(argv or [])
    cfg = Config()
    while "--cfg" in argv:
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
    from lsr_core.utils import resolve_precision

    resolve_precision(cfg, warn=runs_model)
    return cfg


def config_hash(cfg: Config, sections=("model",)) -> str:
    """Short hash of the sections that determine the vectors (recorded in meta.json)."""
    blob = json.dumps({s: dataclasses.asdict(getattr(cfg, s)) for s in sections}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def save_config(cfg: Config, folder: str | Path) -> Path:
    """Write the resolved config atomically as <folder>/config.yaml."""
    from lsr_core.utils import atomic_write_text

    path = Path(folder) / "config.yaml"
    atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    return path
