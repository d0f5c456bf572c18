"""Corpora from local files, cut into token windows up to a budget, and their errors."""

import json

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from common.corpus import CorpusSpec, check_source, read_documents, windows
from common.errors import UserError
from common.organism.files import Organism

DOCUMENTS = ["The quick brown fox jumps over the lazy dog near the river.",
             "Sam has 12 apples. Sam gets 7 more. How many apples does Sam have now?",
             "The grey storm passes at night. The cold wind blows by the house."]


@pytest.fixture(scope="module")
def tokenizer():
    return Organism().tokenizer()


def lengths(tokenizer):
    return [len(tokenizer(text, add_special_tokens=False).input_ids) for text in DOCUMENTS]


def token_windows(spec, tokenizer):
    return list(windows(spec, tokenizer))


def test_windows_stay_inside_documents_and_stop_at_the_budget(tmp_path, tokenizer):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, text in enumerate(DOCUMENTS):
        (folder / f"{i}.txt").write_text(text)
    whole = sum(lengths(tokenizer))
    cut = token_windows(CorpusSpec(path=folder, window=8, tokens=whole), tokenizer)
    bos = tokenizer.bos_token_id
    assert all(w.ids[0] == bos and w.prefix == 1 and 1 <= w.content <= 7 for w in cut)
    assert [w.start for w in cut] == list(np.cumsum([0] + [w.content for w in cut[:-1]]))
    rebuilt, at = [], 0
    for size in lengths(tokenizer):  # consecutive windows rebuild each document exactly
        document = []
        while len(document) < size:
            document += cut[at].ids[1:]
            at += 1
        rebuilt.append(document)
    assert rebuilt == [tokenizer(text, add_special_tokens=False).input_ids for text in DOCUMENTS] and at == len(cut)
    shorter = token_windows(CorpusSpec(path=folder, window=8, tokens=whole - 3), tokenizer)
    assert sum(w.content for w in shorter) == whole - 3 and shorter[:-1] == cut[: len(shorter) - 1]


def test_the_organism_text_is_endless_and_seeded(tokenizer):
    spec = CorpusSpec(builtin="organism", window=32, tokens=5000)
    first = token_windows(spec, tokenizer)
    assert sum(w.content for w in first) == 5000 and first == token_windows(spec, tokenizer)
    other = token_windows(spec.model_copy(update={"seed": 1}), tokenizer)
    assert [w.ids for w in other] != [w.ids for w in first]
    text = tokenizer.decode([t for w in first for t in w.ids[1:]])
    assert "Choice: " in text and "####" in text and "The " in text  # the three kinds of documents
    with pytest.raises(ValueError, match="exactly one of `path`"):
        CorpusSpec(tokens=5)


def test_jsonl_and_datasets_folders_read_the_named_field(tmp_path, tokenizer):
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(DOCUMENTS)) + "\n\n")
    assert list(read_documents(CorpusSpec(path=jsonl, text_field="body", tokens=10))) == DOCUMENTS
    Dataset.from_dict({"body": DOCUMENTS}).save_to_disk(tmp_path / "saved")
    spec = CorpusSpec(path=tmp_path / "saved", text_field="body", window=16, tokens=20)
    assert list(read_documents(spec)) == DOCUMENTS
    assert sum(w.content for w in token_windows(spec, tokenizer)) == 20


def test_bad_corpora_say_what_is_wrong_and_what_to_change(tmp_path, tokenizer):
    def refused(spec, message):
        with pytest.raises(UserError, match=message):
            token_windows(spec, tokenizer)

    refused(CorpusSpec(path=tmp_path / "absent.txt", tokens=5), r"corpus\.path: .*absent\.txt does not exist")
    (tmp_path / "blank.txt").write_text("  \n\n ")
    refused(CorpusSpec(path=tmp_path / "blank.txt", tokens=5), "holds no text")
    (tmp_path / "empty").mkdir()
    refused(CorpusSpec(path=tmp_path / "empty", tokens=5), "holds no .txt files")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "wrong key"}\n')
    refused(CorpusSpec(path=bad, tokens=50), r"corpus\.text_field: line 2 of .* has no 'text' \(it has \['body'\]\)")
    bad.write_text('{"text": "fine"}\nnot json\n')
    refused(CorpusSpec(path=bad, tokens=50), r"line 2 of .* is not JSON")
    DatasetDict({"train": Dataset.from_dict({"text": ["a"]}), "test": Dataset.from_dict({"text": ["b"]})}).save_to_disk(
        tmp_path / "splits")
    refused(CorpusSpec(path=tmp_path / "splits", tokens=5), r"holds the splits \['test', 'train'\]; point it at one")
    Dataset.from_dict({"text": ["a"]}).save_to_disk(tmp_path / "cut")
    (tmp_path / "cut" / "state.json").write_text("{}")  # dataset_info.json there, the rest of the layout not
    refused(CorpusSpec(path=tmp_path / "cut", tokens=5), r"corpus\.path: .*cut is not a folder written by datasets' "
                                                         r"save_to_disk \(KeyError: .*save the dataset again")
    Dataset.from_dict({"body": ["a"]}).save_to_disk(tmp_path / "nocolumn")
    refused(CorpusSpec(path=tmp_path / "nocolumn", tokens=5), r"no column 'text' \(columns: \['body'\]\)")
    refused(CorpusSpec(builtin="organism", window=1, tokens=5), r"corpus\.window: 1 tokens leave no room after "
                                                                 r"the tokenizer's 1 prefix")
    with pytest.raises(UserError, match="blank.txt holds no text"):
        check_source(CorpusSpec(path=tmp_path / "blank.txt", tokens=5))
    with pytest.raises(UserError, match="absent.txt does not exist"):
        check_source(CorpusSpec(path=tmp_path / "absent.txt", tokens=5))


def test_a_budget_beyond_the_corpus_is_refused_unless_allowed(tmp_path, tokenizer):
    (tmp_path / "one.txt").write_text(DOCUMENTS[0])
    size = lengths(tokenizer)[0]
    with pytest.raises(UserError, match=rf"corpus\.tokens: the corpus holds only {size} tokens of the 1,000 asked; "
                                        r"lower corpus\.tokens, or set corpus\.allow_short: true"):
        token_windows(CorpusSpec(path=tmp_path / "one.txt", tokens=1000), tokenizer)
    found = token_windows(CorpusSpec(path=tmp_path / "one.txt", tokens=1000, allow_short=True), tokenizer)
    assert sum(w.content for w in found) == size
