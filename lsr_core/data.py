"""Training examples (query, one positive, N negatives, optional teacher scores) and their batching.

Sources (`data.format`):
- `jsonl`: `data.train_file`, one object a line, in one of two forms
    ids:    {"qid": "q1", "pos": "d1" | ["d1", ...], "negs": ["d5", "d9"], "scores": {"d1": 9.1, "d5": 2.0, ...}}
            (texts from `data.queries` and `data.corpus`)
    inline: {"query": "text", "pos": "text" | [...], "negs": ["text", ...], "scores": [s_pos, s_neg1, ...]}
            ("qid" optional; "scores" follows the order of pos then negs).
  A line with several positives gives one example per positive. A line's "negs" are its candidates: with more than
  N, each access draws N of them; with fewer, each access adds random `data.corpus` documents that are neither a
  positive of the line nor a qrels positive (`data.qrels`, optional) of the query. "scores" is optional but
  all-or-none.
- `msmarco`: the paper's files: `data.queries` (queries.train.tsv), `data.corpus` (collection.tsv), `data.qrels`
  (qrels.train.tsv) and `data.teacher_scores`, a dict qid -> {pid: score} as JSON(.gz) (RankLLaMA style) or as the
  pickle `cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz` (only with `data.trust_pickle: true`; or convert it
  once with `convert_scores_to_json`). One example per (query, qrels positive that has a teacher score); its
  candidates are the query's scored passages that are not qrels positives.

Negatives are drawn on every access, uniformly without replacement from the example's candidates, by a generator
seeded with (seed, epoch, example index): an epoch sees fresh negatives, as in the reference dataset (which draws
from the teacher's candidates on each access), and a resumed run draws the same ones as an uninterrupted run. No
negative is ever a positive of its query (the reference draws from all scored candidates, positives included).
Examples hold ids only; the texts, each stored once, are looked up when an example is drawn. Tokenization is the
trainer's job: `collate` returns strings.

    examples = load_examples(cfg.data, cfg.data.n_negatives, cfg.exp.seed)          # a TrainSet
    batch = collate([examples.sample(i, seed, epoch) for i in indices])
"""
from __future__ import annotations

import gzip
import json
import logging
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lsr_core.teachers import normalise_teacher
from lsr_core.utils import InputError, atomic_write_json, load_texts, read_jsonl, read_qrels, read_texts

logger = logging.getLogger(__name__)


@dataclass
class Candidates:
    """What one query (msmarco) or one jsonl line draws its negatives from; shared by its examples."""
    neg_ids: list[str]  # candidate negatives, none a positive of the query
    scores: dict[str, float] | None = None  # teacher score per document id (positives and candidates)
    avoid: frozenset[str] = frozenset()  # corpus top-up: ids never drawn (the query's positives)
    avoid_texts: frozenset[str] = frozenset()  # corpus top-up: texts never drawn (the line's positives)
    where: str = ""  # file:line, for messages


@dataclass
class TrainExample:
    """One (query, positive) pair, as ids; its negatives are drawn per access (`TrainSet.sample`)."""
    qid: str
    pos_id: str
    candidates: Candidates


@dataclass
class TrainSample:
    """An example as one step sees it: texts, the drawn negatives and their teacher scores."""
    qid: str
    query: str
    pos_id: str
    pos: str
    neg_ids: list[str]
    negs: list[str]
    scores: list[float] | None  # teacher scores for [pos] + negs, or None


@dataclass
class TrainBatch:
    queries: list[str]  # [B]
    docs: list[str]  # [B*(1+N)], per query: pos, neg1..negN
    teacher_scores: torch.Tensor | None  # [B, 1+N] float32, column 0 = positive


@dataclass
class TrainSet:
    """The training examples (ids) and the texts they use, each text stored once."""
    examples: list[TrainExample]
    queries: dict[str, str]  # query id -> text
    docs: dict[str, str]  # document id -> text (with a corpus top-up: the whole corpus)
    n_negatives: int
    corpus_ids: list[str] = field(default_factory=list)  # documents a top-up draws from

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def has_scores(self) -> bool:
        return bool(self.examples) and self.examples[0].candidates.scores is not None

    def sample(self, index: int, seed: int, epoch: int) -> TrainSample:
        """Example `index` with N negatives drawn by a generator seeded with (seed, epoch, index)."""
        example = self.examples[index]
        cand = example.candidates
        neg_ids = self.draw_negatives(cand, random.Random(f"{seed}:{epoch}:{index}"))
        return TrainSample(qid=example.qid, query=self.queries[example.qid], pos_id=example.pos_id,
                           pos=self.docs[example.pos_id], neg_ids=neg_ids, negs=[self.docs[d] for d in neg_ids],
                           scores=None if cand.scores is None else [cand.scores[d] for d in [example.pos_id, *neg_ids]])

    def draw_negatives(self, cand: Candidates, rng: random.Random) -> list[str]:
        """N distinct candidates (kept in their listed order); too few are topped up from the corpus."""
        listed = _pick(cand.neg_ids, self.n_negatives, rng)
        if len(listed) == self.n_negatives:
            return listed
        taken = set(listed)
        return listed + _sample_ids(self.corpus_ids, self.n_negatives - len(listed), rng, cand.where, lambda d: (
            d in taken or d in cand.avoid or self.docs[d] in cand.avoid_texts))


def load_examples(data_cfg, n_negatives: int, seed: int) -> TrainSet:
    """Read the training examples described by `data_cfg` (a `DataConfig`); each draws `n_negatives` per access.

    `seed` only drives a trial draw of the corpus top-ups, so that too small a corpus fails here, at load.
    """
    if n_negatives < 1:
        raise ValueError(f"'data.n_negatives' must be > 0, got {n_negatives}")
    loaders = {"jsonl": _load_jsonl, "msmarco": _load_msmarco}
    if data_cfg.format not in loaders:
        raise ValueError(f"'data.format' must be one of {list(loaders)}, got {data_cfg.format!r}")
    examples = loaders[data_cfg.format](data_cfg, n_negatives, random.Random(seed))
    if not examples.examples:
        raise InputError(f"no training examples in {data_cfg.train_file or data_cfg.teacher_scores}")
    return examples


# ----------------------------------------------------------------------------------------------------------- jsonl
def _load_jsonl(data_cfg, n_negatives: int, rng: random.Random) -> TrainSet:
    path = data_cfg.train_file
    if not path:
        raise InputError("data.format=jsonl needs 'data.train_file'")
    corpus = load_texts(data_cfg.corpus, allow_empty=True) if data_cfg.corpus else None
    queries = load_texts(data_cfg.queries) if data_cfg.queries else None
    qrels = read_qrels(data_cfg.qrels) if data_cfg.qrels else {}
    data = TrainSet(examples=[], queries=queries or {}, docs=corpus if corpus is not None else {},
                    n_negatives=n_negatives, corpus_ids=list(corpus) if corpus else [])
    first_scored = None  # whether the first line had scores: all lines must agree
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        for key in ("pos", "negs"):
            if key not in obj:
                raise InputError(f"{where}: missing field '{key}'")
        positives = _str_list(obj["pos"], where, "pos")
        listed_negs = _str_list(obj["negs"], where, "negs", allow_empty=True)
        pos_fields = [f"pos[{i}]" for i in range(len(positives))] if isinstance(obj["pos"], list) else ["pos"]
        neg_fields = [f"negs[{i}]" for i in range(len(listed_negs))]
        has_scores = obj.get("scores") is not None
        if first_scored is None:
            first_scored = has_scores
        elif has_scores != first_scored:
            raise InputError(f"{where}: field 'scores' must be given on every line or on none")

        if "query" in obj:  # inline texts, stored under ids of their own line; items are (id, text, score)
            qid = str(obj.get("qid", f"{Path(path).name}:{lineno}"))
            query = obj["query"]
            if not isinstance(query, str) or not query.strip():
                raise InputError(f"{where}: field 'query' is empty or not a string")
            if data.queries.get(qid, query) != query:
                raise InputError(f"{where}: field 'qid': '{qid}' already names another query text")
            data.queries[qid] = query
            scores = (_score_list(obj["scores"], len(positives) + len(listed_negs), where) if has_scores
                      else [None] * (len(positives) + len(listed_negs)))
            pos_items = [(f"{where}:{f}", text, score) for f, text, score in zip(pos_fields, positives, scores)]
            neg_items = [(f"{where}:{f}", text, score)
                         for f, text, score in zip(neg_fields, listed_negs, scores[len(positives):])]
            data.docs.update((d, text) for d, text, _ in pos_items + neg_items)
            positive_ids: set[str] = set()
        else:  # ids resolved against data.queries / data.corpus
            if "qid" not in obj:
                raise InputError(f"{where}: missing field 'qid' (or give the query text as 'query')")
            if queries is None or corpus is None:
                raise InputError(f"{where}: ids need 'data.queries' and 'data.corpus' to look up their texts")
            qid = str(obj["qid"])
            if qid not in queries:
                raise InputError(f"{where}: field 'qid': unknown query id '{qid}' (not in {data_cfg.queries})")
            scores = obj["scores"] if has_scores else None
            if scores is not None and not isinstance(scores, dict):
                raise InputError(f"{where}: field 'scores' must map document ids to numbers")
            pos_items = [(d, _lookup(corpus, d, where, f, data_cfg.corpus), _id_score(scores, d, where))
                         for f, d in zip(pos_fields, positives)]
            neg_items = [(d, _lookup(corpus, d, where, f, data_cfg.corpus), _id_score(scores, d, where))
                         for f, d in zip(neg_fields, listed_negs)]
            positive_ids = set(positives) | {d for d, rel in qrels.get(qid, {}).items() if rel > 0}
        # a listed negative that is a positive of the query (by id, or by the same text) is dropped, never used
        pos_texts = {text for _, text, _ in pos_items}
        neg_items = [item for item in neg_items if item[0] not in positive_ids and item[1] not in pos_texts]
        cand = Candidates(neg_ids=[d for d, _, _ in neg_items],
                          scores={d: score for d, _, score in pos_items + neg_items} if has_scores else None,
                          avoid=frozenset(positive_ids), avoid_texts=frozenset(pos_texts), where=where)
        if len(neg_items) < n_negatives:
            if has_scores:
                raise InputError(f"{where}: {len(neg_items)} usable negative(s) < data.n_negatives={n_negatives}, "
                                 f"and sampled corpus negatives would have no teacher score")
            if corpus is None:
                raise InputError(f"{where}: {len(neg_items)} usable negative(s) < data.n_negatives={n_negatives}; "
                                 f"set 'data.corpus' to sample the missing ones")
            data.draw_negatives(cand, rng)  # a trial draw: too small a corpus fails now, not mid-training
        for pos_id, _, _ in pos_items:
            data.examples.append(TrainExample(qid=qid, pos_id=pos_id, candidates=cand))
            if data_cfg.max_examples and len(data.examples) >= data_cfg.max_examples:
                return data
    return data


def _str_list(value, where: str, field: str, allow_empty: bool = False) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise InputError(f"{where}: field '{field}' must be a string or a list of strings")
    if not values and not allow_empty:
        raise InputError(f"{where}: field '{field}' is empty")
    return values


def _lookup(corpus: dict[str, str], doc_id: str, where: str, field: str, corpus_path: str) -> str:
    if doc_id not in corpus:
        raise InputError(f"{where}: field '{field}': unknown document id '{doc_id}' (not in {corpus_path})")
    return corpus[doc_id]


def _id_score(scores: dict | None, doc_id: str, where: str) -> float | None:
    if scores is None:
        return None
    if doc_id not in scores:
        raise InputError(f"{where}: field 'scores' has no score for document '{doc_id}'")
    return _number(scores[doc_id], where, f"scores[{doc_id!r}]")


def _score_list(scores, n: int, where: str) -> list[float]:
    if not isinstance(scores, list) or len(scores) != n:
        raise InputError(f"{where}: field 'scores' must be a list of {n} numbers (pos then negs)")
    return [_number(s, where, f"scores[{i}]") for i, s in enumerate(scores)]


def _number(value, where: str, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: field '{field}' must be a number, got {value!r}")
    return float(value)


def _pick(items: list, n: int, rng: random.Random) -> list:
    """Up to n items, a uniform sample without replacement when there are more (kept in their listed order)."""
    if len(items) <= n:
        return list(items)
    keep = sorted(rng.sample(range(len(items)), n))
    return [items[i] for i in keep]


def _sample_ids(ids: list[str], k: int, rng: random.Random, where: str, excluded) -> list[str]:
    """k distinct ids with excluded(id) False: rejection sampling, then an explicit pool for tiny corpora."""
    picked: list[str] = []
    for _ in range(20 * k + 50 if ids else 0):
        if len(picked) == k:
            return picked
        doc_id = ids[rng.randrange(len(ids))]
        if not excluded(doc_id) and doc_id not in picked:
            picked.append(doc_id)
    pool = [d for d in ids if not excluded(d) and d not in picked]
    if len(pool) < k - len(picked):
        raise InputError(f"{where}: the corpus has too few documents that are not positives to sample {k} "
                         f"negative(s)")
    return picked + rng.sample(pool, k - len(picked))


# --------------------------------------------------------------------------------------------------------- msmarco
def _load_msmarco(data_cfg, n_negatives: int, rng: random.Random) -> TrainSet:
    for key in ("queries", "corpus", "qrels", "teacher_scores"):
        if not getattr(data_cfg, key):
            raise InputError(f"data.format=msmarco needs 'data.{key}'")
    teacher = load_teacher_scores(data_cfg.teacher_scores, data_cfg.trust_pickle)
    teacher = normalise_teacher(teacher, data_cfg)  # data.teacher_norm: "none" leaves the scores as they are
    qrels = read_qrels(data_cfg.qrels)
    examples: list[TrainExample] = []
    no_positive = too_few = 0
    for qid, cand in teacher.items():
        relevant = {d for d, rel in qrels.get(qid, {}).items() if rel > 0}
        positives = [d for d in cand if d in relevant]
        if not positives:
            no_positive += 1
            continue
        candidates = Candidates(neg_ids=[d for d in cand if d not in relevant], scores=cand)
        if len(candidates.neg_ids) < n_negatives:
            too_few += 1
            continue
        examples += [TrainExample(qid=qid, pos_id=pos_id, candidates=candidates) for pos_id in positives]
        if data_cfg.max_examples and len(examples) >= data_cfg.max_examples:
            examples = examples[:data_cfg.max_examples]
            break
    if no_positive or too_few:
        logger.info("msmarco: skipped %d scored queries without a scored qrels positive and %d with fewer than %d "
                    "scored non-positive candidates", no_positive, too_few, n_negatives)
    # the texts of the ids in use only (the collection is 8.8M passages), each stored once
    queries = texts_for(data_cfg.queries, {ex.qid for ex in examples}, allow_empty=False)
    wanted = {ex.pos_id for ex in examples} | {d for ex in examples for d in ex.candidates.neg_ids}
    return TrainSet(examples=examples, queries=queries, docs=texts_for(data_cfg.corpus, wanted, allow_empty=True),
                    n_negatives=n_negatives)


def texts_for(path: str, wanted: set[str], allow_empty: bool = True,
              source: str = "teacher scores") -> dict[str, str]:
    """Texts of the `wanted` ids only (the MS MARCO collection is 8.8M passages); an id missing from `path` is an
    error naming `source`, where the ids came from."""
    found = {rid: text for rid, text in read_texts(path, allow_empty=True) if rid in wanted}
    missing = wanted - found.keys()
    if missing:
        raise InputError(f"{path}: {len(missing)} id(s) from the {source} are missing, e.g. "
                         f"'{sorted(missing)[0]}'")
    if not allow_empty:
        empty = sorted(rid for rid, text in found.items() if not text.strip())
        if empty:
            raise InputError(f"{path}: empty text for id '{empty[0]}'")
    return found


def _is_pickle(path: str | Path) -> bool:
    return str(path).endswith((".pkl", ".pkl.gz", ".pickle", ".pickle.gz"))


def load_teacher_scores(path: str | Path, trust_pickle: bool = False) -> dict[str, dict[str, float]]:
    """qid -> {pid: score} from JSON(.gz), or from a pickle(.gz) when `trust_pickle`; ids become strings."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    opener = gzip.open if path.name.endswith(".gz") else open
    if _is_pickle(path):
        if not trust_pickle:
            raise InputError(f"{path}: refusing to load a pickle (it can run arbitrary code). Convert it once, from "
                             f"a source you trust, with lsr_core.data.convert_scores_to_json(src, dst) and point "
                             f"'data.teacher_scores' at the JSON, or set 'data.trust_pickle: true'")
        with opener(path, "rb") as f:
            raw = pickle.load(f)
    else:
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping qid -> {{pid: score}}, got {type(raw).__name__}")
    scores: dict[str, dict[str, float]] = {}
    for qid, cand in raw.items():
        if not isinstance(cand, dict):
            raise InputError(f"{path}: scores of query '{qid}' must be a mapping pid -> score")
        scores[str(qid)] = {str(pid): _number(s, str(path), f"[{qid!r}][{pid!r}]") for pid, s in cand.items()}
    return scores


def convert_scores_to_json(src: str | Path, dst: str | Path) -> int:
    """Rewrite a pickled teacher-score dict as JSON (gzipped if dst ends in .gz); returns the number of queries.

    This loads the pickle, so run it only on a file from a source you trust.
    """
    scores = load_teacher_scores(src, trust_pickle=True)
    if str(dst).endswith(".gz"):
        with gzip.open(dst, "wt", encoding="utf-8") as f:
            json.dump(scores, f)
    else:
        atomic_write_json(dst, scores)
    return len(scores)


# -------------------------------------------------------------------------------------------------------- batching
def collate(samples: list[TrainSample]) -> TrainBatch:
    """B samples -> query texts [B], doc texts [B*(1+N)] (pos, neg1..negN per query), teacher [B, 1+N] or None."""
    if len({len(ex.negs) for ex in samples}) > 1:
        raise ValueError("examples in a batch must have the same number of negatives")
    with_scores = [ex.scores is not None for ex in samples]
    if any(with_scores) and not all(with_scores):
        raise ValueError("some examples in the batch have teacher scores and some do not")
    teacher = torch.tensor([ex.scores for ex in samples], dtype=torch.float32) if all(with_scores) else None
    return TrainBatch(queries=[ex.query for ex in samples],
                      docs=[doc for ex in samples for doc in [ex.pos, *ex.negs]],
                      teacher_scores=teacher)

