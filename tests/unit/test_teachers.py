"""Teacher-score normalisation (lsr_core.teachers) against the reference's formulas, written out again here:

global (`affine`, the reference's zero_shot/rankllama.py): a = std(ref) / std(teacher), b = mean(ref) - a *
mean(teacher) over all scores of each file, population std; per query (`affine_query`, its scripts/try2.py): the same
per query, a = 0 for a teacher query without spread, queries missing from the reference unchanged."""
import json
import math
from pathlib import Path

import pytest

from lsr_core.config import ConfigError, DataConfig, load_config
from lsr_core.data import load_examples
from lsr_core.teachers import affine, affine_fit, affine_per_query, normalise_teacher
from lsr_core.utils import InputError

MSM = Path(__file__).resolve().parents[1] / "fixtures" / "train" / "msmarco"

# RankLLaMA-like teacher (large spread, offset) and MiniLM-like reference (different ids on purpose: the fit uses
# each file whole, no pairing by id)
TEACHER = {"q1": {"a": 4.25, "b": -1.5, "c": 0.75}, "q2": {"d": 2.0, "e": 2.0}, "q3": {"f": 7.5, "g": -3.0}}
REFERENCE = {"q1": {"a": 9.0, "b": 1.0, "x": -2.0, "y": 0.5}, "q2": {"d": -5.0, "e": 3.0}, "q9": {"z": 6.0}}


def mean_pstd(values):
    n = len(values)
    mean = math.fsum(values) / n
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n)


def reference_global(teacher, reference):
    mu_t, sd_t = mean_pstd([s for c in teacher.values() for s in c.values()])
    mu_r, sd_r = mean_pstd([s for c in reference.values() for s in c.values()])
    a = sd_r / sd_t
    b = mu_r - a * mu_t
    return {q: {d: a * s + b for d, s in c.items()} for q, c in teacher.items()}


def reference_per_query(teacher, reference):
    out = {}
    for q, c in teacher.items():
        if q not in reference:
            out[q] = dict(c)
            continue
        mu_t, sd_t = mean_pstd(list(c.values()))
        mu_r, sd_r = mean_pstd(list(reference[q].values()))
        a = sd_r / sd_t if sd_t != 0 else 0
        out[q] = {d: a * s + mu_r - a * mu_t for d, s in c.items()}
    return out


def assert_close(got, expected):
    assert got.keys() == expected.keys()
    for q in expected:
        assert got[q].keys() == expected[q].keys()
        for d in expected[q]:
            assert got[q][d] == pytest.approx(expected[q][d], abs=1e-12), (q, d)


def test_affine_matches_the_reference_formula_and_the_reference_moments():
    got = affine(TEACHER, REFERENCE)
    assert_close(got, reference_global(TEACHER, REFERENCE))
    # by hand: teacher scores have mean 12.0 / 7 and the reference's 12.5 / 7
    a, b = affine_fit(TEACHER, REFERENCE)
    assert a > 0 and a * 12.0 / 7 + b == pytest.approx(12.5 / 7, abs=1e-12)
    mu, sd = mean_pstd([s for c in got.values() for s in c.values()])
    assert (mu, sd) == pytest.approx(mean_pstd([s for c in REFERENCE.values() for s in c.values()]), abs=1e-12)
    # the ranking of each query and the ratio of margins are kept
    assert got["q1"]["a"] - got["q1"]["b"] == pytest.approx(a * 5.75, abs=1e-12)
    assert sorted(got["q1"], key=got["q1"].get) == ["b", "c", "a"]


def test_affine_query_matches_the_reference_formula():
    got = affine_per_query(TEACHER, REFERENCE)
    assert_close(got, reference_per_query(TEACHER, REFERENCE))
    assert got["q2"] == {"d": -1.0, "e": -1.0}  # no teacher spread: a = 0, every score becomes the reference mean
    assert got["q3"] == TEACHER["q3"]  # no reference scores for q3: unchanged
    mu, sd = mean_pstd(list(got["q1"].values()))
    assert (mu, sd) == pytest.approx(mean_pstd(list(REFERENCE["q1"].values())), abs=1e-12)


def test_affine_needs_a_teacher_spread():
    with pytest.raises(InputError, match="every teacher score is the same"):
        affine({"q": {"a": 1.0, "b": 1.0}}, REFERENCE)


def test_config_choices_and_missing_reference():
    cfg = load_config(["--data.format=msmarco", "--data.teacher_norm=affine_query"])
    assert cfg.data.teacher_norm == "affine_query"
    with pytest.raises(ConfigError, match="'data.teacher_norm' must be one of"):
        load_config(["--data.teacher_norm=zscore"])
    with pytest.raises(ConfigError, match="'data.teacher_norm=affine' needs 'data.format=msmarco'"):
        load_config(["--data.teacher_norm=affine"])  # jsonl scores would be left as they are
    assert normalise_teacher(TEACHER, DataConfig()) is TEACHER
    with pytest.raises(ConfigError, match="needs 'data.teacher_norm_reference'"):
        normalise_teacher(TEACHER, DataConfig(teacher_norm="affine"))


@pytest.mark.parametrize("norm, formula", [("affine", reference_global), ("affine_query", reference_per_query)])
def test_msmarco_examples_carry_normalised_scores(tmp_path, norm, formula):
    reference = {"100": {"0": 1.0, "1": 0.0, "9": -1.0}, "200": {"2": 3.0, "4": 1.0}}
    (tmp_path / "ref.json").write_text(json.dumps(reference))
    teacher = json.loads((MSM / "scores.json").read_text())
    expected = formula(teacher, reference)

    def cfg(**kw):
        return DataConfig(format="msmarco", queries=str(MSM / "queries.train.tsv"), corpus=str(MSM / "collection.tsv"),
                          qrels=str(MSM / "qrels.train.tsv"), teacher_scores=str(MSM / "scores.json"), **kw)

    plain = load_examples(cfg(), n_negatives=2, seed=0)
    scaled = load_examples(cfg(teacher_norm=norm, teacher_norm_reference=str(tmp_path / "ref.json")),
                           n_negatives=2, seed=0)
    draws = [[data.sample(i, seed=0, epoch=0) for i in range(len(data))] for data in (plain, scaled)]
    assert [(ex.qid, ex.pos_id, ex.neg_ids) for ex in draws[1]] == [(ex.qid, ex.pos_id, ex.neg_ids) for ex in draws[0]]
    for ex in draws[1]:
        want = [expected[ex.qid][d] for d in [ex.pos_id, *ex.neg_ids]]
        assert ex.scores == pytest.approx(want, abs=1e-12)
        assert ex.scores != [teacher[ex.qid][d] for d in [ex.pos_id, *ex.neg_ids]]
