"""What encode.py and zeroshot_prompt.py read before they encode: the input texts (`read_input`) and the model to
encode with (`resolve_model_path`), and `local_path`, the form of a path that meta.json and settings record."""
from __future__ import annotations

from pathlib import Path

from lsr_core.config import ConfigError
from lsr_core.backbones import ModelLoadError
from lsr_core.backbones import resolve_model_path as package_path
from lsr_core.utils import InputError, check_id, read_texts


def read_input(path: str, kind: str) -> tuple[list[str], list[str]]:
    """(ids, texts) from any supported input; duplicate ids are an error, empty queries too (empty docs are kept).
    Ids must be non-empty and free of whitespace (`check_id`); errors name the file's line, or a table's row."""
    allow_empty = kind == "doc"
    from_table = path.startswith("irds:") or path.endswith((".parquet", ".arrow", ".csv"))  # rows, not lines
    if path.startswith("irds:"):
        import ir_datasets

        dataset = ir_datasets.load(path[len("irds:"):])
        rows = ((d.doc_id, irds_doc_text(d)) for d in dataset.docs_iter()) \
            if kind == "doc" else ((q.query_id, q.text) for q in dataset.queries_iter())
    elif from_table:
        import datasets

        table = datasets.load_dataset(path.rsplit(".", 1)[-1], data_files=path, split="train")
        id_col = next((c for c in ("id", "_id", "docid", "qid") if c in table.column_names), None)
        if id_col is None or "text" not in table.column_names:
            raise InputError(f"{path}: needs an id column (id/_id/docid/qid) and a 'text' column, "
                             f"found {table.column_names}")
        rows = ((r[id_col], "" if r["text"] is None else r["text"]) for r in table)
    else:
        rows = read_texts(path, allow_empty=allow_empty)  # checks ids and texts, naming file:line
    ids, texts, seen = [], [], set()
    for row, (rid, text) in enumerate(rows, 1):
        if from_table:
            rid = check_id(path, row, rid, row=True)
            if not isinstance(text, str):
                raise InputError(f"{path}: row {row}: field 'text' must be a string, got {type(text).__name__}")
        if rid in seen:
            raise InputError(f"{path}: {f'row {row}: ' if from_table else ''}duplicate id '{rid}'")
        if not allow_empty and not text.strip():
            raise InputError(f"{path}: {f'row {row}: ' if from_table else ''}empty query text for id '{rid}'")
        seen.add(rid)
        ids.append(rid)
        texts.append(text)
    if not ids:
        raise InputError(f"{path}: no texts")
    return ids, texts


def join_title(title, text: str) -> str:
    """A document's title and text as one text, as BEIR's models see it: `title + " " + text` when the title is not
    empty, else the text."""
    # BEIR's SentenceBERT and SPLADE models encode `(title + sep + text).strip()` with sep " " (beir-cellar/beir,
    # beir/retrieval/models/sentence_bert.py and splade.py), as ir_datasets' BEIR docs' default_text() does: a
    # BEIR score compares with others only on the same text
    if isinstance(title, str) and title.strip():
        return f"{title} {text}".strip()
    return text


def irds_doc_text(doc) -> str:
    """The text of an ir_datasets document of any docs type: its `text` (or `body`), after its `title` where the
    type has one (BeirTitleDoc, MsMarcoDocument, WapoDoc, ...)."""
    return join_title(getattr(doc, "title", None), getattr(doc, "text", "") or getattr(doc, "body", "") or "")


def resolve_model_path(cfg) -> tuple[str, str, bool]:
    """(the model to encode with, why it was chosen, whether that deserves a warning): `encode.model`; else
    `<output_dir>/final` when train.py has written it, unless the command line names another model than the one it
    was trained from in `model.name_or_path` (then that model); else `model.name_or_path`. The warning is for a
    final/ left unused, or used although the configured `model.name_or_path` did not train it."""
    named = cfg.model.name_or_path
    from_cli = "model.name_or_path" in cfg.cli_keys
    if cfg.encode.model:
        if from_cli and local_path(named) != local_path(cfg.encode.model):
            raise ConfigError(f"encode.model={cfg.encode.model!r} and model.name_or_path={named!r} (command line) "
                              f"name different models: give only one")
        return cfg.encode.model, "encode.model", False
    final = cfg.output_dir / "final"
    if not (final / "lsr_config.json").is_file():
        return named, "model.name_or_path" + (", given on the command line" if from_cli else ""), False
    trained_from = _trained_from(cfg.output_dir)
    origin = f"trained from {trained_from}" if trained_from else "its base model unrecorded"
    if named and (trained_from is None or local_path(named) != local_path(trained_from)):
        if from_cli:
            return named, f"model.name_or_path, given on the command line; {final} ({origin}) is not used", True
        return str(final), (f"train.py's model in exp.output_dir ({origin}), not model.name_or_path={named!r}: set "
                            f"encode.model to encode with another model"), True
    return str(final), f"train.py's model in exp.output_dir, {origin}", False


def _trained_from(output_dir: Path) -> str | None:
    """model.name_or_path of the config.yaml train.py saved in `output_dir`, if any."""
    import yaml

    try:
        return yaml.safe_load((output_dir / "config.yaml").read_text())["model"]["name_or_path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def local_path(name: str) -> str:
    """An existing local file or folder (a `pkg:` name included) as an absolute path, anything else (a hub name,
    `irds:...`) as it is: what meta.json records, so that folders encoded from different working directories
    compare equal."""
    try:
        path = Path(package_path(name))
    except ModelLoadError:  # a package not installed here: the name is all there is
        return name
    return str(path.resolve()) if name and path.exists() else name
