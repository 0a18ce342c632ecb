"""export_st.py: for every backbone family, sentence-transformers' SparseEncoder loads the exported folder and its
encode_query / encode_document give encode.py's vectors (max |diff| <= 1e-5, same terms).

encode.py runs in float32 with no top-k and no quantisation, so it writes every weight, rounded to 5 decimals
(`sparse.quantize`): a term it writes has a weight >= 5e-6, and one it leaves out is below that.
Each model is a tiny random one saved as train.py's final/ would be, with a logit shift, query/document prefixes and
a query max length shorter than the longest query (truncation must agree too).
"""
import ast
import json
from pathlib import Path

import pytest
import torch

import encode
import export_st
from lsr_core.backbones import ModelLoadError
from lsr_core.config import ConfigError, ModelConfig
from lsr_core.modeling import build_model
from lsr_core.sparse import id_to_token_list, load_vectors
from lsr_core.tiny import make_collection, make_model
from lsr_core.utils import run_script

ROOT = Path(__file__).resolve().parents[2]
QUERIES = ["star star planet", "music", "the recipe of the bread with butter and sugar and the bread in the kitchen"]
DOCS = ["astronomy star orbit telescope galaxy comet moon", "cooking bread", "football goal team match league "
        "player score coach stadium ball season the a of and in to is was for with on by as from that"]
# family -> (tiny arch, model section overrides, whether sentence-transformers' own modules carry it)
FAMILIES = {
    "bert_mlm": ("bert", {}, False),  # [CLS]/[SEP] left out of pooling: SpladePooling cannot, so the module file
    "bert_mlm_keep": ("bert", {"special_tokens": "keep", "pooling": "sum"}, True),
    "opt": ("opt", {}, False),
    "llama_options": ("llama", {"bidirectional": True, "drop_bos": True}, False),
    "llama_echo": ("llama", {"echo": True}, False),
    "t5_multi_token": ("t5", {"decoding": "multi_token"}, False),
    "t5_single_token": ("t5", {"decoding": "single_token"}, False),
    "t5_encoder_only": ("t5", {"decoding": "encoder_only"}, False),
    "t5_decoder_only_qmlp": ("t5", {"decoding": "decoder_only", "query_head": "mlp"}, False),
    "bert_mlp": ("bert", {"query_head": "mlp", "doc_head": "mlp"}, False),
    "opt_mlp": ("opt", {"query_head": "mlp", "doc_head": "mlp"}, False),
    "asymmetric_t5": ("t5", {"query_head": "mlp", "doc_head": "mlm", "shared": False}, False),
    "asymmetric_bert_keep": ("bert", {"special_tokens": "keep", "shared": False}, True),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("st_export")
    words = make_collection(root / "data")["words"]
    for name, texts in (("queries", QUERIES), ("docs", DOCS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"id": f"{name}{i}", "text": t}) + "\n"
                                                    for i, t in enumerate(texts)))
    return root, {arch: make_model(root / arch, arch, words) for arch in ("bert", "opt", "llama", "t5")}


@torch.no_grad()
def save_final(hf_folder: Path, final: Path, overrides: dict) -> None:
    """A SparseModel saved as train.py saves final/, with a logit shift, prefixes, MLP heads that weight most tokens,
    and (asymmetric) a query backbone that differs from the document one."""
    model = build_model(ModelConfig(name_or_path=str(hf_folder), max_query_len=8, max_doc_len=24,
                                    query_prefix="search for ", doc_prefix="text of ", **overrides))
    model.spec.logit_shift = -0.1
    gen = torch.Generator().manual_seed(1)
    for mlp in (model.query_mlp, model.doc_mlp):
        if mlp is not None:
            mlp.weight.copy_(torch.randn(mlp.weight.shape, generator=gen) * 0.1)
            mlp.bias.fill_(2.0)
    if model.query_backbone is not None:
        for param in model.query_backbone.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    model.save(final)


def encoded(root: Path, final: Path, kind: str) -> list[dict]:
    out = encode.main([f"--exp.output_dir={root / 'run'}", f"--encode.model={final}", "--model.dtype=float32",
                       f"--encode.input={root / ('queries' if kind == 'query' else 'docs')}.jsonl",
                       f"--encode.kind={kind}", f"--encode.output={final.parent / kind}"])
    return load_vectors(out)[1]


def assert_same(written: list[dict], st_reps: torch.Tensor, vocab: list[str]) -> None:
    """encode.py's vectors ({token: weight}) == sentence-transformers' dense rows [N, V]."""
    assert len(written) == st_reps.shape[0]
    for vector, row in zip(written, st_reps):
        assert vector, "an empty vector compares nothing"
        st = {vocab[i]: float(row[i]) for i in row.nonzero().flatten().tolist()}
        assert set(vector) <= set(st)
        assert {t for t, w in st.items() if w >= 1e-5} <= set(vector)
        assert max(abs(vector.get(t, 0.0) - st.get(t, 0.0)) for t in set(vector) | set(st)) <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_folder_encodes_as_encode_py(tiny, tmp_path, family):
    from sentence_transformers import SparseEncoder

    root, hf = tiny
    arch, overrides, own_modules = FAMILIES[family]
    final = tmp_path / "final"
    save_final(hf[arch], final, overrides)
    queries, docs = encoded(root, final, "query"), encoded(root, final, "doc")
    # a folder name of its own: transformers caches a folder's module file under the folder's name
    out = export_st.main([f"--encode.model={final}", f"--out={tmp_path / ('st_' + family)}"])

    types = [m["type"] for m in json.loads((out / "modules.json").read_text())]
    assert (out / "lsr_sparse.py").is_file() != own_modules
    if own_modules:  # sentence-transformers' classes only: no trust_remote_code needed
        for router_config in out.rglob("router_config.json"):  # the routes' own modules
            types += json.loads(router_config.read_text())["types"].values()
        assert all(t.startswith("sentence_transformers.") for t in types), types
        encoder = SparseEncoder(str(out), device="cpu")
    else:
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            SparseEncoder(str(out), device="cpu")
        encoder = SparseEncoder(str(out), device="cpu", trust_remote_code=True)
    assert types[0].endswith(".Router") == (overrides.get("shared") is False)
    vocab = id_to_token_list(encoder.tokenizer)
    with torch.no_grad():
        q = encoder.encode_query(QUERIES, convert_to_tensor=True, batch_size=2).to_dense()
        d = encoder.encode_document(DOCS, convert_to_tensor=True, batch_size=2).to_dense()
    assert_same(queries, q, vocab)
    assert_same(docs, d, vocab)
    assert torch.equal(encoder.encode(DOCS, convert_to_tensor=True, batch_size=2).to_dense(), d)  # no task: documents
    assert not torch.allclose(q[:1], encoder.encode_document(QUERIES[:1], convert_to_tensor=True).to_dense())


def test_module_file_stands_alone():
    """The module file imports no decoder-lsr code: the exported folder must work without this repository."""
    tree = ast.parse((ROOT / "lsr_core" / "lsr_sparse.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "os", "torch", "transformers", "safetensors", "sentence_transformers"}


def test_module_file_covers_every_kind_and_decoding():
    """A kind or decoding added to backbones.KINDS needs its restatement in the module file (else export refuses)."""
    from lsr_core.backbones import KINDS
    from lsr_core.st_export import _module_file

    module = _module_file()
    assert {kind: tuple(row.decodings) for kind, row in KINDS.items()} == module.DECODINGS
    assert {kind: row.auto_class for kind, row in KINDS.items()} == module.AUTO_CLASSES
    assert set(KINDS) == set(module.INPUTS) == set(module.HIDDEN)


def test_bad_input(tiny, tmp_path, capsys):
    root, hf = tiny
    with pytest.raises(ModelLoadError, match=r"bert: not a model folder saved by train.py \(no lsr_config.json\)"):
        export_st.main([f"--encode.model={hf['bert']}", f"--out={tmp_path / 'st'}"])
    final = tmp_path / "final"
    save_final(hf["bert"], final, {})
    (tmp_path / "st").mkdir()
    with pytest.raises(ModelLoadError, match=r"st exists: remove it or choose another output folder"):
        export_st.main([f"--encode.model={final}", f"--out={tmp_path / 'st'}"])
    (tmp_path / "st2.tmp").mkdir()  # what an export killed before its rename left
    (tmp_path / "st2.tmp" / "junk").write_text("x")
    out = export_st.main([f"--encode.model={final}", f"--out={tmp_path / 'st2'}"])
    assert not (tmp_path / "st2.tmp").exists() and not (out / "junk").exists() and (out / "modules.json").is_file()
    with pytest.raises(ConfigError, match="give the output folder once"):
        export_st.main([f"--encode.model={final}", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as stop:  # the script's way out: one line on stderr, status 1
        run_script(lambda: export_st.main([f"--encode.model={tmp_path}"]))
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: {tmp_path}: not a model folder saved by train.py (no lsr_config.json)"
