"""What the end-to-end tests share: a tiny BERT trained on the tiny collection, its corpus and queries encoded."""
from pathlib import Path

import pytest

import encode
import train
from lsr_core.tiny import make_collection, make_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def train_tiny(tmp_path_factory):
    """A function (name, max_steps, *train flags, shard_size=) -> (root, run folder): the tiny collection in
    root/data, a tiny BERT trained on it for `max_steps` in float32 (whatever the CPU), corpus and queries encoded."""
    def run(name: str, max_steps: int, *flags: str, shard_size: int = 0):
        root = tmp_path_factory.mktemp(name)
        col = make_collection(root / "data")
        model = make_model(root / "bert", "bert", col["words"])
        out = root / "run"
        train.main(["--cfg", str(ROOT / "yamls/tiny/bert_mlm.yaml"), f"--model.name_or_path={model}",
                    f"--exp.output_dir={out}", f"--data.train_file={root}/data/train.jsonl",
                    f"--data.corpus={root}/data/corpus.jsonl", f"--data.queries={root}/data/queries.jsonl",
                    f"--train.max_steps={max_steps}", "--model.dtype=float32", '--train.mixed_precision="no"', *flags])
        shards = [f"--encode.shard_size={shard_size}"] if shard_size else []
        encode.main([f"--exp.output_dir={out}", f"--encode.input={root}/data/corpus.jsonl", "--encode.kind=doc",
                     *shards])
        encode.main([f"--exp.output_dir={out}", f"--encode.input={root}/data/queries.jsonl", "--encode.kind=query"])
        return root, out

    return run
