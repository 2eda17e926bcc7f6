"""Task data: every file form, column mapping, label mapping, errors, metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpotn.data import (
    GLUE_FILES,
    GLUE_TASKS,
    compute_metrics,
    load_glue,
    load_local,
    sst2_sample,
    texts,
)

#: The real GLUE folders (SST-2, MRPC, RTE, WNLI), beside the repository, never in it.
SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


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
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\tpos\nc\tneg\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nb\tneutral\n")
    with pytest.raises(ValueError, match=r"has no column 'text'; its columns are \['sentence', "):
        load_local(tmp_path / "dev.tsv", text="text")
    with pytest.raises(ValueError, match=r"has labels \['neutral'\] that the training data does "
                                         r"not have; known labels: \['neg', 'pos'\]"):
        load_local(tmp_path / "dev.tsv", tmp_path / "train.tsv")
    with pytest.raises(ValueError, match=r"dev.tsv has one class only \(\['neutral'\]\): a "
                                         r"classifier needs examples of at least two"):
        load_local(tmp_path / "dev.tsv")  # it would be a one-output regression head
    (tmp_path / "three.tsv").write_text("sentence\tlabel\na\tpos\nb\tneg\nc\tneutral\n")
    with pytest.raises(ValueError, match=r"f1 scores class 1 of two classes, and the task has 3"):
        load_local(tmp_path / "three.tsv", metrics=["f1"])
    with pytest.raises(ValueError, match=r"metrics \['pearson'\] do not score a classification "
                                         r"task; use accuracy, f1 or matthews_correlation"):
        load_local(tmp_path / "three.tsv", metrics=["pearson"])
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


# --- GLUE in its own glue_data/ layout ------------------------------------------------------

#: Per task: folder, train file lines, dev file lines (GLUE's own formats, headers, quoting),
#: then expected train label ids, eval label ids, train[0]'s text and text_pair.
MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
               "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
MNLI_DEV_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse"
                   "\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\t"
                   "label3\tlabel4\tlabel5\tgold_label")
STSB_HEADER = ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\t"
               "score")
GLUE_SAMPLES = {
    "cola": ("CoLA",
             ["gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
              "gj04\t0\t*\tOne more pseudo generalization and I'm giving up.",
              'gj04\t1\t\tThe "sailors" rode the breeze clear of the rocks.'],
             ["gj04\t0\t*\tThe more we study verbs, the crazier they get get."],
             [1, 0, 1], [0],
             "Our friends won't buy this analysis, let alone the next one we propose.", None),
    "sst2": ("SST-2",
             ["sentence\tlabel", "hide new secretions from the parental units \t0",
              'the " greatest " film of the year \t1'],
             ["sentence\tlabel", "it 's a charming and often affecting journey . \t1"],
             [0, 1], [1], "hide new secretions from the parental units ", None),
    "mrpc": ("MRPC",
             ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
              '1\t702876\t702977\tAmrozi called him " the witness " .\t'
              'He was only " the witness " .',
              "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's ."],
             ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
              "1\t1355540\t1355592\tHe said the pie business does n't fit .\tIt does not fit ."],
             [1, 0], [1], 'Amrozi called him " the witness " .', 'He was only " the witness " .'),
    "qqp": ("QQP",
            ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
             "133273\t213221\t213222\tHow is the life of a math student?\tWhat is jlpt5?\t0",
             "402555\t536040\t536041\tHow do I control my horny emotions?\tHow do you control "
             "your horniness?\t1"],
            ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
             "201359\t303345\t303346\tWhy are African-Americans so beautiful?\tWhy are hispanics "
             "so beautiful?\t0"],
            [0, 1], [0], "How is the life of a math student?", "What is jlpt5?"),
    "stsb": ("STS-B",
             [STSB_HEADER,
              "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\t"
              "An air plane is taking off.\t5.000",
              "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man is playing a flute.\t"
              "A man is playing a bamboo flute.\t3.800"],
             [STSB_HEADER,
              "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat is "
              "dancing.\tA man wearing a hard hat is dancing.\t5.000"],
             [5.0, 3.8], [5.0], "A plane is taking off.", "An air plane is taking off."),
    "mnli": ("MNLI",
             [MNLI_HEADER,
              "0\t31193\t31193n\tgovernment\t( ( Conceptually ...\t( ( Product ...\t(ROOT ...\t"
              "(ROOT ...\tConceptually cream skimming has two basic dimensions.\tProduct and "
              "geography are what make cream skimming work.\tneutral\tneutral",
              "1\t101457\t101457e\ttelephone\t( you ...\t( You ...\t(ROOT ...\t(ROOT ...\tyou know "
              "during the season\tYou lose the things.\tentailment\tentailment",
              "2\t134793\t134793e\tfiction\t( ( One ...\t( ( I ...\t(ROOT ...\t(ROOT ...\tOne of "
              "our number will carry out your instructions.\tA member of my team will execute "
              "your orders.\tcontradiction\tcontradiction"],
             [MNLI_DEV_HEADER,
              "0\t63735\t63735n\tslate\t( ( The ...\t( ( The ...\t(ROOT ...\t(ROOT ...\tThe new "
              "rights are nice enough\tEveryone really likes the newest benefits\tneutral\t"
              "entailment\tneutral\tneutral\tneutral\tneutral"],
             [1, 0, 2], [1], "Conceptually cream skimming has two basic dimensions.",
             "Product and geography are what make cream skimming work."),
    "qnli": ("QNLI",
             ["index\tquestion\tsentence\tlabel",
              "0\tWhen did the third Digimon series begin?\tUnlike the two seasons before it, "
              "Tamers takes a darker tone.\tnot_entailment",
              "1\tWhich missile batteries often have individual launchers?\tThe missile "
              "batteries have individual launchers.\tentailment"],
             ["index\tquestion\tsentence\tlabel",
              "0\tWhat came into force after the new constitution was herald?\tAs of that day, "
              "the new constitution heralding the Second Republic came into force.\tentailment"],
             [1, 0], [0], "When did the third Digimon series begin?",
             "Unlike the two seasons before it, Tamers takes a darker tone."),
    "rte": ("RTE",
            ["index\tsentence1\tsentence2\tlabel",
             "0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons of Mass Destruction "
             "Found in Iraq.\tnot_entailment",
             "1\tHerceptin was already approved.\tHerceptin can be used.\tentailment"],
            ["index\tsentence1\tsentence2\tlabel",
             "0\tDana Reeve has died.\tChristopher Reeve had an accident.\tnot_entailment"],
            [1, 0], [1], "No Weapons of Mass Destruction Found in Iraq Yet.",
            "Weapons of Mass Destruction Found in Iraq."),
    "wnli": ("WNLI",
             ["index\tsentence1\tsentence2\tlabel",
              "0\tI stuck a pin through a carrot. When I pulled the pin out, it had a hole.\t"
              "The carrot had a hole.\t1",
              "1\tJohn couldn't see the stage with Billy in front of him.\tJohn is so short.\t0"],
             ["index\tsentence1\tsentence2\tlabel",
              "0\tThe drain is clogged with hair. It has to be cleaned.\tThe hair has to be "
              "cleaned.\t0"],
             [1, 0], [0],
             "I stuck a pin through a carrot. When I pulled the pin out, it had a hole.",
             "The carrot had a hole."),
}


GLUE_SAMPLES["mnlimm"] = GLUE_SAMPLES["mnli"]  # the same files; its dev file is another


def write_glue(root: Path, task: str) -> Path:
    """``root/FOLDER/train.tsv`` and the dev file of one task, as GLUE writes them."""
    folder, train, dev, *_ = GLUE_SAMPLES[task]
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / "train.tsv").write_text("\n".join(train) + "\n", encoding="utf-8")
    (root / folder / GLUE_FILES[task].dev).write_text("\n".join(dev) + "\n", encoding="utf-8")
    return root / folder


@pytest.mark.parametrize("task", sorted(GLUE_SAMPLES))
def test_every_glue_task_reads_its_official_files(tmp_path, task):
    write_glue(tmp_path, task)
    _, _, _, train_labels, eval_labels, text, text_pair = GLUE_SAMPLES[task]
    data = load_glue(task, data_dir=tmp_path)
    assert (len(data.train), len(data.eval)) == (len(train_labels), len(eval_labels))
    assert data.train["label"] == pytest.approx(train_labels)
    assert data.eval["label"] == pytest.approx(eval_labels)
    assert data.train[0]["text"] == text
    assert data.train[0].get("text_pair") == text_pair
    assert data.spec == GLUE_TASKS[task] and data.spec.metrics == GLUE_TASKS[task].metrics
    assert data.num_labels == {"stsb": 1, "mnli": 3, "mnlimm": 3}.get(task, 2)


def test_glue_label_ids_follow_the_hub_class_labels(tmp_path):
    names = {task: load_glue(task, data_dir=write_glue(tmp_path, task).parent).label_names
             for task in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")}
    assert names == {
        "cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"],
        "mrpc": ["not_equivalent", "equivalent"], "qqp": ["not_duplicate", "duplicate"],
        "stsb": None, "mnli": ["entailment", "neutral", "contradiction"],
        "qnli": ["entailment", "not_entailment"], "rte": ["entailment", "not_entailment"],
        "wnli": ["not_entailment", "entailment"],
    }
    # GLUE's folder spellings, and the task folder itself, work as well
    assert len(load_glue("STS-B", data_dir=tmp_path).train) == 2
    # MNLI-mm: MNLI's training set, its mismatched dev file
    row = GLUE_SAMPLES["mnli"][2][1].rsplit("\t", 1)[0] + "\tcontradiction"  # gold label
    (tmp_path / "MNLI" / "dev_mismatched.tsv").write_text(f"{MNLI_DEV_HEADER}\n{row}\n")
    mismatched = load_glue("MNLI-mm", data_dir=tmp_path)
    assert mismatched.spec.eval_split == "validation_mismatched"
    assert len(mismatched.train) == 3 and mismatched.eval["label"] == [2]
    assert len(load_glue("rte", data_dir=tmp_path / "RTE").train) == 2


def test_glue_folder_errors_name_the_file_and_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"no folder .*RTE: data_dir must be a folder in GLUE's "
                                         r"glue_data/ layout, holding RTE/train.tsv"):
        load_glue("rte", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown GLUE task 'sst3'"):
        load_glue("sst3", data_dir=tmp_path)
    folder = write_glue(tmp_path, "mnli")
    (folder / "dev_matched.tsv").rename(folder / "dev.tsv")
    with pytest.raises(ValueError, match=r"dev_matched.tsv does not exist; GLUE's MNLI folder "
                                         r"holds train.tsv and dev_matched.tsv"):
        load_glue("mnli", data_dir=tmp_path)
    folder = write_glue(tmp_path, "rte")
    (folder / "dev.tsv").write_text("index\tsentence1\tsentence2\tgold\n0\ta\tb\tentailment\n")
    with pytest.raises(ValueError, match=r"dev.tsv has no column 'label'; its header is index, "
                                         r"sentence1, sentence2, gold; GLUE's RTE files have the "
                                         r"header index, sentence1, sentence2, label"):
        load_glue("rte", data_dir=tmp_path)
    (folder / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"dev.tsv, line 2: label 'maybe' is not one of "
                                         r"entailment / not_entailment"):
        load_glue("rte", data_dir=tmp_path)
    (folder / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(ValueError, match=r"dev.tsv is empty \(no data rows\)"):
        load_glue("rte", data_dir=tmp_path)
    (folder / "train.tsv").write_text("")
    with pytest.raises(ValueError, match=r"RTE.train.tsv is empty"):
        load_glue("rte", data_dir=tmp_path)
    folder = write_glue(tmp_path, "cola")
    (folder / "dev.tsv").write_text("index\tsentence\n0\tBill whistled past the house.\n")
    with pytest.raises(ValueError, match=r"dev.tsv has 2 columns in its first row, not 4; "
                                         r"GLUE's CoLA files have no header row"):
        load_glue("cola", data_dir=tmp_path)
    folder = write_glue(tmp_path, "stsb")
    (folder / "dev.tsv").write_text(STSB_HEADER + "\n0\tg\tf\t2012\t1\tn\tn\ta\tb\thigh\n")
    with pytest.raises(ValueError, match=r"line 2: score 'high' is not a number"):
        load_glue("stsb", data_dir=tmp_path)


def test_glue_quotes_stay_literal_and_short_rows_are_dropped_with_a_warning(tmp_path):
    folder = write_glue(tmp_path, "sst2")
    (folder / "dev.tsv").write_text('sentence\tlabel\n" a quoted\t1\nno label\nb "c\t0\n')
    with pytest.warns(UserWarning, match=r"dev.tsv: dropped 1 rows with too few columns"):
        data = load_glue("sst2", data_dir=tmp_path)
    assert data.eval["text"] == ['" a quoted', 'b "c'] and data.eval["label"] == [1, 0]


def test_cli_reads_glue_from_data_dir(tmp_path):
    from mpotn.cli import build_parser
    from mpotn.cli.common import load_task

    write_glue(tmp_path, "wnli")
    for command in ("finetune", "squeeze"):
        args = build_parser().parse_args([command, "--glue", "wnli", "--data-dir", str(tmp_path)])
        data = load_task(args)
        assert (len(data.train), len(data.eval), data.train["label"]) == (2, 1, [1, 0])
    args = build_parser().parse_args(["finetune", "--data-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--data-dir is the folder of a GLUE task's files: "
                                         "give the task as --glue NAME"):
        load_task(args)


@pytest.mark.parametrize(("task", "train", "dev", "train_positive", "dev_positive", "first"), [
    ("rte", 2490, 277, 1241, 131, "No Weapons of Mass Destruction Found in Iraq Yet."),
    ("mrpc", 3667, 408, 2473, 279, "Amrozi accused his brother , whom he called \" the "
                                   "witness \" , of deliberately distorting his evidence ."),
    ("sst2", 67349, 872, 37569, 444, "hide new secretions from the parental units "),
    ("wnli", 635, 71, 312, 31, "I stuck a pin through a carrot. When I pulled the pin out, it "
                               "had a hole."),
])
def test_the_real_glue_folders(task, train, dev, train_positive, dev_positive, first):
    """Counts as the files hold them (label 1: not_entailment for RTE, equivalent for MRPC,
    positive for SST-2, entailment for WNLI). MRPC's train.tsv holds 3,667 rows: one fewer
    than the hub's 3,668, which it rebuilds from the original MSR files."""
    if not SHARED_GLUE.is_dir():
        pytest.skip(f"{SHARED_GLUE} is absent")
    data = load_glue(task, data_dir=SHARED_GLUE)
    assert (len(data.train), len(data.eval)) == (train, dev)
    assert (sum(data.train["label"]), sum(data.eval["label"])) == (train_positive, dev_positive)
    assert data.train[0]["text"] == first
    if task == "rte":
        assert data.label_names == ["entailment", "not_entailment"]
        assert data.train["label"][:2] == [1, 0] and data.eval["label"][0] == 1


# --- texts for calibration and healing -----------------------------------------------------

def test_texts_default_is_a_seeded_ordered_subset_of_the_shipped_sample():
    everything = [t.strip() for t in sst2_sample().train["text"]]  # GLUE's trailing spaces go
    assert len(texts(samples=None)) == len(everything) == 2000
    chosen = texts()
    assert len(chosen) == 256 and chosen == texts(seed=0) and chosen != texts(seed=1)
    source = iter(everything)
    assert all(t in source for t in chosen)  # a subsequence: the source's order is kept
    assert texts(samples=5000) == texts(samples=None) and texts(samples=None)[0] == everything[0]


def test_texts_of_a_glue_pair_task_give_both_texts(tmp_path):
    write_glue(tmp_path, "rte")
    found = texts("rte", samples=None, data_dir=tmp_path)
    assert found == ["No Weapons of Mass Destruction Found in Iraq Yet.",
                     "Weapons of Mass Destruction Found in Iraq.",
                     "Herceptin was already approved.", "Herceptin can be used."]
    assert len(texts("RTE", samples=3, data_dir=tmp_path)) == 3
    write_glue(tmp_path, "sst2")
    assert texts("sst2", data_dir=tmp_path) == ["hide new secretions from the parental units",
                                                'the " greatest " film of the year']


def test_texts_from_a_text_file_and_errors(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text("\ufefffirst sentence .\n\n  second sentence .  \nthird\n", encoding="utf-8")
    assert texts(path) == ["first sentence .", "second sentence .", "third"]
    assert texts(str(path), samples=2) == texts(path, samples=2) and len(texts(path, 2)) == 2
    with pytest.raises(ValueError, match=r"text file .*missing.txt does not exist; pass a GLUE "
                                         r"task name"):
        texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty.txt holds no sentences"):
        texts(tmp_path / "empty.txt")
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=r"samples must be a whole number of at least 1"):
            texts(samples=bad)
