"""Task data: every file form, column mapping, label mapping, errors, metrics."""

import json
import os
import subprocess
import sys

import pytest

from mpotn.data import GLUE_TASKS, compute_metrics, load_glue, load_local, sst2_sample


def test_shipped_sst2_sample_is_balanced_like_the_training_set():
    data = sst2_sample()
    assert (len(data.train), len(data.eval)) == (2000, 872)
    assert sum(data.eval["label"]) == 444
    assert 1100 <= sum(data.train["label"]) <= 1130  # 55.8% positive, as in train.tsv
    assert data.num_labels == 2 and data.spec.metrics == ("accuracy",)
    assert data.eval[0]["text"].startswith("it 's a charming and often affecting journey")


def test_tsv_with_header_and_string_labels(tmp_path):
    (tmp_path / "train.tsv").write_text('q\tp\tanswer\n"quoted" a\tb\tyes\nc\td\tno\n')
    (tmp_path / "dev.tsv").write_text("q\tp\tanswer\ne\tf\tno\n")
    data = load_local(tmp_path / "dev.tsv", tmp_path / "train.tsv", text="q", text_pair="p",
                      label="answer")
    assert data.label_names == ["no", "yes"]
    assert data.train["label"] == [1, 0] and data.eval["label"] == [0]
    assert data.train[0] == {"text": '"quoted" a', "text_pair": "b", "label": 1}


def test_csv_without_header_uses_column_positions(tmp_path):
    (tmp_path / "dev.csv").write_text('1,"a, with comma"\n0,b\n')
    data = load_local(tmp_path / "dev.csv", text=1, label=0, header=False)
    assert data.eval["text"] == ["a, with comma", "b"] and data.eval["label"] == [1, 0]
    assert data.label_names == ["0", "1"]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_and_json_lines(tmp_path, suffix):
    records = [{"s1": "x", "s2": "y", "score": 3.5}, {"s1": "z", "s2": "w", "score": 1.0}]
    text = json.dumps(records) if suffix == ".json" else "\n".join(map(json.dumps, records))
    path = tmp_path / f"dev{suffix}"
    path.write_text(text)
    data = load_local(path, text="s1", text_pair="s2", label="score", regression=True)
    assert data.eval["label"] == [3.5, 1.0] and data.label_names is None
    assert data.num_labels == 1 and data.spec.metrics == ("pearson", "spearmanr")


def test_bad_columns_unknown_labels_and_formats_are_clear_errors(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\tpos\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nb\tneutral\n")
    with pytest.raises(ValueError, match=r"has no column 'text'; its columns are \['sentence', "):
        load_local(tmp_path / "dev.tsv", text="text")
    with pytest.raises(ValueError, match=r"has labels \['neutral'\] that the training data does "
                                         r"not have; known labels: \['pos'\]"):
        load_local(tmp_path / "dev.tsv", tmp_path / "train.tsv")
    (tmp_path / "dev.xml").write_text("<x/>")
    with pytest.raises(ValueError, match=r"must be \.tsv, \.csv, \.json or \.jsonl"):
        load_local(tmp_path / "dev.xml")
    with pytest.raises(ValueError, match="does not exist"):
        load_local(tmp_path / "missing.tsv")
    with pytest.raises(ValueError, match="regression labels must be numbers"):
        load_local(tmp_path / "dev.tsv", regression=True)
    with pytest.raises(ValueError, match="unknown metrics"):
        load_local(tmp_path / "dev.tsv", metrics=["bleu"])


def test_glue_metrics_against_hand_computed_values():
    predictions, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]
    scores = compute_metrics(["accuracy", "f1", "matthews_correlation"], predictions, labels)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["f1"] == pytest.approx(2 / 3)  # precision 2/3, recall 2/3
    assert scores["matthews_correlation"] == pytest.approx((2 * 2 - 1 * 1) / 9)
    ranks = compute_metrics(["spearmanr", "pearson"], [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 16.0])
    assert ranks["spearmanr"] == pytest.approx(1.0) and ranks["pearson"] < 1.0
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        compute_metrics(["accuracy"], [1, 0, 1], [1, 0])


def test_glue_tasks_by_name_and_offline_failure_is_a_clear_error(tmp_path):
    assert GLUE_TASKS["stsb"].regression and GLUE_TASKS["mnli"].eval_split == "validation_matched"
    with pytest.raises(ValueError, match="unknown GLUE task 'sst3'"):
        load_glue("sst3")
    # the real hub code path, offline (the flags are read when datasets is imported)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path)}
    code = "from mpotn.data import load_glue; load_glue('rte')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "could not load GLUE 'rte' from the hub" in result.stderr
    assert "without a network, pass local files" in result.stderr
