"""`irds:` documents keep their titles: `title + " " + text` as BEIR's models and ir_datasets' own default_text()
join them, for every docs type with a title field; types without one give their text (or body) alone. Offline: the
real ir_datasets record types through a fake `ir_datasets.load`."""
import sys
import types

import pytest
from ir_datasets.datasets.beir import BeirTitleDoc, BeirTitleUrlDoc
from ir_datasets.datasets.msmarco_document import MsMarcoDocument
from ir_datasets.datasets.wapo import WapoDoc
from ir_datasets.formats import GenericDoc

from lsr_core.inputs import irds_doc_text, join_title, read_input
from lsr_core.utils import InputError


def fake_irds(monkeypatch, docs):
    """ir_datasets whose every dataset yields `docs`; records the names loaded."""
    loaded = []

    def load(name):
        loaded.append(name)
        return types.SimpleNamespace(docs_iter=lambda: iter(docs))

    module = types.ModuleType("ir_datasets")
    module.load = load
    monkeypatch.setitem(sys.modules, "ir_datasets", module)
    return loaded


def test_irds_docs_join_title_and_text(monkeypatch):
    docs = [BeirTitleDoc("d1", "Aspirin lowers fever.", "Aspirin"),
            BeirTitleDoc("d2", "No title here.", ""),
            BeirTitleUrlDoc("d3", "Body of three.", "Three", "http://x"),
            GenericDoc("d4", "generic text"),
            MsMarcoDocument("d5", "http://y", "Five", "body of five"),
            WapoDoc("d6", "http://z", "Six", "", "", "", "body of six", (), ()),
            BeirTitleDoc("d7", "", "Title only")]
    loaded = fake_irds(monkeypatch, docs)
    ids, texts = read_input("irds:beir/scifact/test", "doc")
    assert loaded == ["beir/scifact/test"]
    assert ids == ["d1", "d2", "d3", "d4", "d5", "d6", "d7"]
    assert texts == ["Aspirin Aspirin lowers fever.", "No title here.", "Three Body of three.", "generic text",
                     "Five body of five", "Six body of six", "Title only"]
    # the same text ir_datasets gives BEIR documents with a title
    assert [irds_doc_text(d) for d in docs[:1] + docs[2:3]] == [docs[0].default_text(), docs[2].default_text()]


def test_join_title():
    assert join_title("T", "x y") == "T x y"
    assert join_title("", "x y") == join_title(None, "x y") == join_title("  ", "x y") == "x y"
    assert join_title("T ", "") == "T"


def test_irds_doc_ids_are_still_checked(monkeypatch):
    fake_irds(monkeypatch, [BeirTitleDoc("d1", "a", "A"), BeirTitleDoc("d1", "b", "B")])
    with pytest.raises(InputError, match=r"^irds:x: row 2: duplicate id 'd1'$"):
        read_input("irds:x", "doc")
