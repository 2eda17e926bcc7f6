"""Issue 11, inputs: truncation limits, data files, training runs and command lines.

Every bad input gives the exact result or a clear error that names it; each case is its own
test, named ``test_inputs_*`` (truncation policies: issue 11 case 2, issue 10's
``TruncationPolicy``), ``test_data_*`` (task files: case 3 and the data-file errors),
``test_api_*`` (library calls: case 7 and the API errors) or ``test_cli_*`` (the ``mpotn``
command: exit code 2 and a one-line message, checked before any work).
"""

import json
import sys

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from mpotn.cli import main
from mpotn.compression import CompressionConfig, compress
from mpotn.data import load_local
from mpotn.finetune.training import (
    TrainingConfig,
    evaluate_task,
    finetune,
    prepare_model,
    save_model,
    training_arguments,
    write_run,
)
from mpotn.layers import MPOLinear
from mpotn.methods import decompose
from mpotn.mpo import MPO
from mpotn.truncation import POLICY_KEYS, TruncationPolicy

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def mpo() -> MPO:
    torch.manual_seed(0)
    return MPO.from_matrix(torch.randn(64, 48), n=3)


def small_bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=32))


def write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# --------------------------------------------------------------- truncation policies
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tol": NAN}, r"tol must be a finite number \(a relative error\) >= 0, got nan"),
        ({"tol": INF}, r"tol must be a finite number .* got inf"),
        ({"max_bond": NAN}, r"max_bond must be >= 1 \(an integer\), got nan"),
        ({"max_bond": 2.5}, r"max_bond must be >= 1 \(an integer\), got 2.5"),
        ({"max_bond": True}, r"max_bond must be >= 1 \(an integer\), got True"),
        ({"params": NAN}, r"params must be >= 1 \(an integer\), got nan"),
        ({"params": 100.0}, r"params must be >= 1 \(an integer\), got 100.0"),
        ({"params": -3}, r"params must be >= 1 \(an integer\), got -3"),
        ({"ratio": NAN}, r"ratio must be a finite number > 0 .* got nan"),
        ({"ratio": INF}, r"ratio must be a finite number > 0 .* got inf"),
        ({"ratio": "0.5"}, r"ratio must be a finite number > 0 .* got '0.5'"),
        ({"ratio": -0.5}, r"ratio must be > 0 .* got -0.5"),
        ({"tol": "0.1"}, r"tol must be a finite number .* got '0.1'"),
        ({"tol": -1e-3}, r"tol is a relative error and must be >= 0, got -0.001"),
        ({"bond_dims": "44"}, r"bond_dims must be a sequence of integers >= 1 .* got '44'"),
        ({"ratio": 0.5, "allocation": "best"}, r"allocation must be one of \('optimal', "),
        ({"ratio": 0.5, "max_bond": 4}, r"at most one truncation policy .* got \['max_bond', "
                                        r"'ratio'\]"),
    ],
)
def test_inputs_policy_refuses_values_it_does_not_allow(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TruncationPolicy(**kwargs)


@pytest.mark.parametrize("kwargs", [{"tol": NAN}, {"max_bond": NAN}, {"params": NAN},
                                    {"ratio": INF}, {"max_bond": 2.5}, {"ratio": "0.5"}])
def test_inputs_truncate_refuses_nan_inf_fractions_and_strings(mpo, kwargs):
    key = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"^{key} must be"):
        mpo.truncate(**kwargs)


def test_inputs_bond_dims_entries_are_checked_bond_by_bond(mpo):
    with pytest.raises(ValueError, match=r"bond_2: a bond dimension must be an integer >= 1, "
                                         r"got 2.5"):
        mpo.truncate([4, 2.5])
    with pytest.raises(ValueError, match=r"bond_1: a bond dimension must be an integer >= 1, "
                                         r"got nan"):
        mpo.truncate({1: NAN})


def test_inputs_policy_normalizes_numbers_and_describes_itself(mpo):
    import numpy as np

    policy = TruncationPolicy(max_bond=np.int64(3))
    assert type(policy.max_bond) is int and policy.describe() == "max_bond=3"
    assert TruncationPolicy(ratio=1).ratio == 1.0 and type(TruncationPolicy(ratio=1).ratio) is float
    assert TruncationPolicy().key is None and TruncationPolicy().describe() == "full rank"
    assert mpo.truncate_to(TruncationPolicy()) is mpo
    assert mpo.truncate_to(policy).bond_dims == mpo.truncate(max_bond=3).bond_dims == (1, 3, 3, 1)


def test_inputs_policy_keys_are_the_user_facing_names():
    assert POLICY_KEYS == ("bond_dims", "max_bond", "tol", "ratio", "params")
    fields = set(CompressionConfig.__dataclass_fields__)
    assert set(POLICY_KEYS) <= fields and "allocation" in fields
    policy = TruncationPolicy.from_settings({"ratio": 0.25, "tol": None, "n": 3,
                                             "allocation": None})
    assert (policy.key, policy.ratio, policy.allocation) == ("ratio", 0.25, "optimal")
    with pytest.raises(ValueError, match=r"unknown truncation settings \['rank'\]"):
        TruncationPolicy.from_settings({"rank": 3}, strict=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tol": NAN}, "tol must be a finite number"),
        ({"max_bond": 2.5}, r"max_bond must be >= 1 \(an integer\), got 2.5"),
        ({"ratio": "0.5"}, r"ratio must be a finite number > 0 .* got '0.5'"),
        ({"ratio": INF}, "ratio must be a finite number > 0"),
        ({"params": NAN}, r"params must be >= 1 \(an integer\)"),
        ({"overrides": {"query": {"max_bond": NAN}}}, r"override 'query': max_bond must be"),
    ],
)
def test_api_compress_refuses_bad_limits_before_any_work(kwargs, message):
    model = nn.Sequential(nn.Linear(16, 16))
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=message):
        compress(model, targets=["0"], n=2, progress=False, **kwargs)
    assert isinstance(model[0], nn.Linear) and torch.equal(model[0].weight, before)


def test_api_layers_and_methods_take_the_same_policy():
    with pytest.raises(ValueError, match=r"max_bond must be >= 1 \(an integer\), got nan"):
        MPOLinear.from_linear(nn.Linear(8, 8), n=3, max_bond=NAN)
    with pytest.raises(ValueError, match="ratio must be a finite number > 0"):
        decompose(torch.randn(8, 8), "tucker", n=2, ratio=NAN)
    with pytest.raises(ValueError, match="ratio must be a finite number > 0"):
        decompose(torch.randn(8, 8), "mpo", n=2, ratio=INF)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (123, r"targets must be a regular expression \(a string\) or a list .* got 123"),
        ([1, 2], r"targets must be .* got \[1, 2\]"),
        ("encoder.(0", r"targets 'encoder.\(0' is not a valid regular expression \(missing \), "
                       r"unterminated subpattern"),
    ],
)
def test_api_targets_that_are_not_names_or_a_regex(targets, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig(targets=targets)
    with pytest.raises(ValueError, match=message.replace("targets", "exclude", 1)):
        CompressionConfig(exclude=targets)


def test_api_compressing_a_compressed_model_says_it_is_compressed():
    model = small_bert()
    compressed = compress(model, targets=["ffn"], max_bond=4, progress=False)
    counts = compressed.totals()
    for again in (compressed, compressed.base_model):
        with pytest.raises(ValueError, match=r"this model is already compressed \(2 compressed "
                                             r"layers: encoder.layer.0.intermediate.dense, "
                                             r"encoder.layer.0.output.dense\); compress the "
                                             r"original model instead"):
            compress(again, targets=["attention"], max_bond=4, progress=False)
    assert compressed.totals() == counts


def test_api_complex_matrix_error_names_real_and_abs_not_float():
    with pytest.raises(ValueError, match=r"got torch.complex64; .* Choose what to keep: \.real "
                                         r"\(the real part\), \.abs\(\) \(the magnitudes\)"):
        MPO.from_matrix(torch.randn(8, 8, dtype=torch.complex64), n=2)


# ------------------------------------------------------------------- data files
def test_data_integer_labels_are_the_classes_that_occur_in_order(tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\na\t3\nb\t1\nc\t4\nd\t2\ne\t4\n")
    dev = write(tmp_path / "dev.tsv", "sentence\tlabel\nx\t2\ny\t4\n")
    data = load_local(dev, train)
    assert data.label_names == ["1", "2", "3", "4"] and data.num_labels == 4
    assert data.train["label"] == [2, 0, 3, 1, 3] and data.eval["label"] == [1, 3]


def test_data_negative_and_sparse_integer_labels_are_ordered_numerically(tmp_path):
    dev = write(tmp_path / "dev.csv", "text,label\na,10\nb,-1\nc,2\nd,010\n")
    data = load_local(dev, text="text")
    assert data.label_names == ["-1", "2", "10"] and data.eval["label"] == [2, 0, 1, 2]


def test_data_header_read_with_no_header_is_an_error_naming_the_flag(tmp_path):
    dev = write(tmp_path / "dev.tsv", "sentence\tlabel\na\t0\nb\t1\n")
    with pytest.raises(ValueError, match=r"dev.tsv: its first row looks like a header \(label "
                                         r"'label'\), but the file is read without one "
                                         r"\(--no-header / header=False\)"):
        load_local(dev, text=0, label=1, header=False)


def test_data_word_header_above_word_labels_is_an_error_too(tmp_path):
    dev = write(tmp_path / "dev.csv", "text,class\na,pos\nb,neg\nc,pos\n")
    with pytest.raises(ValueError, match=r"first row looks like a header \(label 'class'\)"):
        load_local(dev, text=0, label=1, header=False)
    dev = write(tmp_path / "score.tsv", "s1\ts2\tscore\na\tb\t1.5\nc\td\t4.0\n")
    with pytest.raises(ValueError, match=r"first row looks like a header \(label 'score'\)"):
        load_local(dev, text=0, text_pair=1, label=2, header=False, regression=True)


def test_data_headerless_file_without_a_header_row_still_reads(tmp_path):
    dev = write(tmp_path / "dev.tsv", "a\tpos\nb\tneg\nc\tpos\n")
    data = load_local(dev, text=0, label=1, header=False)
    assert data.label_names == ["neg", "pos"] and data.eval["label"] == [1, 0, 1]


def test_data_label_names_are_saved_in_the_model_config(tiny_bert, tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\na b\t3\nc d\t1\ne f\t2\n")
    data = load_local(train, train)
    config = TrainingConfig(strategy="full", max_steps=1, batch_size=2)
    model, _ = prepare_model(str(tiny_bert), data, config, progress=False)
    assert model.config.id2label == {0: "1", 1: "2", 2: "3"}
    assert model.config.label2id == {"1": 0, "2": 1, "3": 2}
    assert model.classifier.out_features == 3


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.tsv", "", r"empty.tsv is empty; it needs a header row and one example per line"),
        ("blank.tsv", "\n\n", r"blank.tsv is empty"),
        ("header.tsv", "sentence\tlabel\n", r"header.tsv has a header row but no examples"),
        ("bad.tsv", b"sentence\tlabel\na\t0\nb\xff c\t1\n",
         r"bad.tsv, line 3: byte 0xff is not UTF-8; save the file as UTF-8"),
        ("extra.tsv", "sentence\tlabel\na\t0\nb\tc\t1\n",
         r"extra.tsv, line 3: 3 fields, but the first row has 2 \(a tab inside a text "
         r"field\?\); every row needs the same columns"),
        ("short.csv", "sentence,label\na,0\nb\n",
         r"short.csv, line 3: 1 fields, but the first row has 2 \(quote fields that contain "
         r"commas\)"),
        ("twice.tsv", "label\tlabel\na\t0\n", r"twice.tsv: the header names \['label'\] more "
                                              r"than once"),
        ("empty.json", "  ", r"empty.json is empty; it needs a JSON list of records"),
        ("none.json", "[]", r"none.json holds no examples"),
        ("broken.jsonl", '{"sentence": "a", "label": 1}\n{"sentence"',
         r"broken.jsonl is not valid JSON Lines"),
        ("nolabel.tsv", "sentence\tlabel\na\t0\nb\t \n",
         r"nolabel.tsv, example 2: the label is empty"),
    ],
)
def test_data_bad_files_are_errors_naming_the_file(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(ValueError, match=message):
        load_local(path)


def test_data_directory_given_as_a_file(tmp_path):
    (tmp_path / "dev.tsv").mkdir()
    with pytest.raises(ValueError, match=r"dev.tsv is a folder, not a data file"):
        load_local(tmp_path / "dev.tsv")


def test_data_training_labels_outside_label_names_are_named_as_such(tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\na\tpos\nb\tmaybe\n")
    with pytest.raises(ValueError, match=r"train.tsv has labels \['maybe'\] that label_names "
                                         r"does not have; known labels: \['neg', 'pos'\]"):
        load_local(train, train, label_names=["neg", "pos"])


def test_data_unknown_label_error_caps_its_lists(tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\n"
                  + "".join(f"s\tlabel-{k:05d}-{'x' * 60}\n" for k in range(3000)))
    dev = write(tmp_path / "dev.tsv", "sentence\tlabel\n"
                + "".join(f"s\tnew-{k}\n" for k in range(50)))
    with pytest.raises(ValueError) as caught:
        load_local(dev, train)
    message = str(caught.value)
    assert len(message) < 2000
    assert "and 30 more (50 in all)" in message and "and 2980 more (3000 in all)" in message
    assert "'label-00000-" + "x" * 25 + "...'" in message  # names cut to 40 characters


def test_data_real_valued_labels_suggest_regression(tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\na\t0.5\nb\t1.5\n")
    dev = write(tmp_path / "dev.tsv", "sentence\tlabel\na\t0.7\n")
    with pytest.raises(ValueError, match=r"\(real-valued labels\? pass --regression / "
                                         r"regression=True\)"):
        load_local(dev, train)
    with pytest.raises(ValueError, match=r"regression labels must be numbers \(finite\), got "
                                         r"\['nan'\]"):
        load_local(write(tmp_path / "nan.tsv", "sentence\tlabel\na\tnan\n"), regression=True)


def test_data_glue_file_with_bad_utf8_names_file_and_line(tmp_path):
    from mpotn.data import load_glue

    folder = tmp_path / "RTE"
    folder.mkdir()
    header = "index\tsentence1\tsentence2\tlabel\n"
    write(folder / "train.tsv", header + "0\ta\tb\tentailment\n")
    write(folder / "dev.tsv", header.encode() + b"0\ta\xc3\tb\tentailment\n")
    with pytest.raises(ValueError, match=r"RTE.dev.tsv, line 2: byte 0xc3 is not UTF-8"):
        load_glue("rte", data_dir=tmp_path)


# --------------------------------------------------------------- training runs
def test_api_one_step_run_trains_with_a_learning_rate_above_zero(tmp_path):
    config = TrainingConfig(max_steps=1)
    assert training_arguments(config, tmp_path, False, 1).warmup_steps == 0
    assert training_arguments(config, tmp_path, False, 2).warmup_steps == 1
    assert training_arguments(config, tmp_path, False, 1000).warmup_steps == 60


def test_api_one_step_finetune_changes_the_weights_and_saves_the_labels(tiny_bert, tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\nfine film\t2\nbad film\t5\n")
    data = load_local(train, train)
    config = TrainingConfig(strategy="full", max_steps=1, batch_size=2, lr=1e-3)
    model, tokenizer = prepare_model(str(tiny_bert), data, config, progress=False)
    before = model.classifier.weight.detach().clone()
    result = finetune(model, tokenizer, data, config, progress=False)
    assert result.record["steps"] == 1
    assert not torch.equal(model.classifier.weight, before)
    assert result.record["id2label"] == {0: "2", 1: "5"}
    assert result.record["label2id"] == {"2": 0, "5": 1}
    paths = write_run(result, tokenizer, tmp_path / "run", "one step")
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["id2label"] == {"0": "2", "1": "5"} and metrics["label2id"] == {"2": 0, "5": 1}
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["id2label"] == {"0": "2", "1": "5"}


def test_api_saved_classifier_with_other_classes_is_refused(tiny_bert, tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\nfine\tpos\nbad\tneg\n")
    data = load_local(train, train)
    config = TrainingConfig(strategy="lfa", max_steps=1, batch_size=2)
    model, tokenizer = prepare_model(str(tiny_bert), data, config, targets=["ffn"],
                                     progress=False)
    save_model(model, tokenizer, tmp_path / "saved")
    other = load_local(write(tmp_path / "other.tsv", "sentence\tlabel\na\tyes\nb\tno\n"))
    with pytest.raises(ValueError, match=r"saved was trained on the classes \['neg', 'pos'\], "
                                         r"but the task's classes are \['no', 'yes'\]"):
        prepare_model(str(tmp_path / "saved"), other, config)
    same, _ = prepare_model(str(tmp_path / "saved"), data, config)
    assert same.base_model.config.id2label == {0: "neg", 1: "pos"}


def test_api_a_fine_tuned_transformers_classifier_keeps_its_classes_or_is_refused(
        tiny_bert, tmp_path):
    """A classifier saved by transformers (as LPAF's pruning run writes it) is read with its
    head: the task must have its classes in its order, not relabel the head's rows."""
    train = write(tmp_path / "train.tsv", "sentence\tlabel\nfine\tpos\nbad\tneg\n")
    data = load_local(train, train)
    config = TrainingConfig(strategy="full", max_steps=1, batch_size=2)
    model, tokenizer = prepare_model(str(tiny_bert), data, config, progress=False)
    model.save_pretrained(tmp_path / "fine-tuned")
    tokenizer.save_pretrained(tmp_path / "fine-tuned")
    swapped = load_local(train, train, label_names=["pos", "neg"])
    with pytest.raises(ValueError, match=r"fine-tuned was trained on the classes \['neg', "
                                         r"'pos'\], but the task's classes are \['pos', 'neg'\]"):
        prepare_model(str(tmp_path / "fine-tuned"), swapped, config, progress=False)
    again, _ = prepare_model(str(tmp_path / "fine-tuned"), data, config, progress=False)
    assert again.config.id2label == {0: "neg", 1: "pos"}
    shouting = load_local(write(tmp_path / "upper.tsv", "sentence\tlabel\na\tPOS\nb\tNEG\n"))
    assert prepare_model(str(tmp_path / "fine-tuned"), shouting, config,
                         progress=False)[0].config.id2label == {0: "NEG", 1: "POS"}
    numbered = load_local(write(tmp_path / "digits.tsv", "sentence\tlabel\na\t1\nb\t0\n"))
    assert numbered.label_names == ["0", "1"]  # integers say nothing: not compared
    prepare_model(str(tmp_path / "fine-tuned"), numbered, config, progress=False)


def test_api_evaluation_without_examples_is_an_error(tiny_bert, tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\nfine\tpos\nbad\tneg\n")
    data = load_local(train, train)
    config = TrainingConfig(strategy="full", max_steps=1, batch_size=2)
    model, tokenizer = prepare_model(str(tiny_bert), data, config, progress=False)
    data.eval = data.eval.select([])
    with pytest.raises(ValueError, match="the task has no evaluation examples to score"):
        evaluate_task(model, tokenizer, data, config)


@pytest.mark.parametrize("key", ["train_limit", "eval_limit"])
def test_api_limits_of_zero_examples_are_refused(key):
    with pytest.raises(ValueError, match=rf"{key} must be >= 1 \(examples used\) or None "
                                         r"\(all\), got 0"):
        TrainingConfig(**{key: 0})


# ---------------------------------------------------------------- command line
def cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def argparse_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--tol", "nan", "argument --tol: must be > 0 (a finite number), got 'nan'"),
        ("--tol", "inf", "argument --tol: must be > 0 (a finite number), got 'inf'"),
        ("--ratio", "inf", "argument --ratio: must be > 0 (a finite number), got 'inf'"),
        ("--ratio", "nan", "argument --ratio: must be > 0 (a finite number), got 'nan'"),
        ("--ratio", "half", "argument --ratio: must be > 0 (a finite number), got 'half'"),
        ("--max-bond", "2.5", "argument --max-bond: must be an integer >= 1, got '2.5'"),
        ("--n", "x", "argument --n: an MPO needs at least 2 cores (an integer), got 'x'"),
    ],
)
def test_cli_nan_inf_and_non_numbers_exit_2(capsys, tmp_path, flag, value, message):
    assert message in argparse_error(capsys, "compress", flag, value, "--out",
                                     str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_cli_finetune_flags_refuse_nan_and_fractions(capsys):
    assert "argument --ratio: must be > 0 (a finite number), got 'nan'" in argparse_error(
        capsys, "finetune", "--ratio", "nan")
    assert "argument --max-bond: must be an integer >= 1, got '0'" in argparse_error(
        capsys, "finetune", "--max-bond", "0")


@pytest.mark.parametrize(("argv", "message"), [
    (["compare", "--batch", "0"], "argument --batch: must be an integer >= 1, got '0'"),
    (["heal", "saved", "--train", "central"], "argument --train: invalid choice: 'central'"),
    (["heal", "saved", "--lr", "-1"], "argument --lr: must be > 0"),
    (["heal", "saved", "--samples", "0"], "argument --samples: must be an integer >= 1"),
    (["squeeze", "--init-epochs", "-1"], "argument --init-epochs: must be > 0"),
    (["squeeze", "--epochs", "2"], "unrecognized arguments: --epochs"),  # its own steps
])
def test_cli_flags_refuse_values_they_cannot_use(capsys, argv, message):
    assert message in argparse_error(capsys, *argv)


def test_cli_heal_refuses_a_data_dir_without_a_task_before_loading(capsys, tmp_path,
                                                                    monkeypatch):
    import mpotn.compression.models as models

    monkeypatch.setattr(models, "load_pretrained", lambda *a: pytest.fail("loaded a model"))
    code, err = cli(capsys, "heal", "saved", "--data-dir", "glue_data", "--out",
                    str(tmp_path / "o"))
    assert code == 2 and "--data-dir is the folder of a GLUE task's files: give the task as " \
                          "--texts NAME" in err


def test_cli_compare_refuses_a_matrix_file_that_is_not_one(capsys, tmp_path):
    for name in ("m.npy", "m.safetensors"):
        write(tmp_path / name, "garbage")
        code, err = cli(capsys, "compare", str(tmp_path / name), "--out", str(tmp_path / "o"))
        assert code == 2 and "is not a" in err and "file" in err and "Traceback" not in err


def test_cli_invalid_regex_exits_2_before_loading(capsys, tmp_path, monkeypatch):
    import mpotn.compression.models as models

    monkeypatch.setattr(models, "load_pretrained", lambda *a: pytest.fail("loaded a model"))
    code, err = cli(capsys, "compress", "--regex", "encoder.(0", "--out", str(tmp_path / "o"))
    assert code == 2
    assert ("mpotn compress: error: targets 'encoder.(0' is not a valid regular expression "
            "(missing ), unterminated subpattern at position 8)") in err


def test_cli_out_that_is_a_file_exits_2_before_working(capsys, tmp_path, monkeypatch):
    import mpotn.compression.models as models

    monkeypatch.setattr(models, "load_pretrained", lambda *a: pytest.fail("loaded a model"))
    out = write(tmp_path / "out", "mine")
    for command in ("compress", "inspect", "finetune", "heal", "squeeze"):
        code, err = cli(capsys, command, *(["saved"] if command == "heal" else []),
                        "--out", str(out))
        assert code == 2 and f"--out {out} is a file, not a folder; choose a folder" in err
    assert out.read_text() == "mine"


def test_cli_out_that_cannot_be_written_exits_2_before_working(capsys, tmp_path, monkeypatch):
    import tempfile

    import mpotn.compression.models as models

    def refuse(dir=None):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(models, "load_pretrained", lambda *a: pytest.fail("loaded a model"))
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    code, err = cli(capsys, "compress", "--out", str(tmp_path / "new" / "out"))
    assert code == 2
    assert f"--out {tmp_path / 'new' / 'out'} cannot be written ({tmp_path}: Permission " \
           "denied); choose a writable folder" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /sys")
def test_cli_out_on_a_read_only_filesystem_exits_2(capsys):
    import tempfile

    try:
        with tempfile.TemporaryFile(dir="/sys"):
            pytest.skip("/sys is writable here")
    except OSError:
        pass
    code, err = cli(capsys, "inspect", "--out", "/sys/mpotn-out")
    assert code == 2 and "--out /sys/mpotn-out cannot be written (/sys: " in err


def test_cli_compressing_an_mpotn_save_says_it_is_compressed(capsys, tmp_path):
    compress(small_bert(), targets=["ffn"], max_bond=4, progress=False).save_pretrained(
        tmp_path / "saved")
    code, err = cli(capsys, "compress", str(tmp_path / "saved"), "--out", str(tmp_path / "o"))
    assert code == 2 and "is already a compressed model (an mpotn save); compress the " \
                         "original model instead" in err


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('{"model_type": ', r"config file at .* is not a valid JSON file"),
        ("[1, 2]", r"Should have a `model_type` key"),
    ],
)
def test_cli_inspect_on_a_broken_config_names_the_folder(capsys, tmp_path, config, message):
    import re

    folder = tmp_path / "model"
    folder.mkdir()
    write(folder / "config.json", config)
    code, err = cli(capsys, "inspect", str(folder), "--out", str(tmp_path / "o"))
    assert code == 2 and "not a local folder" not in err
    assert re.search(message, err) and str(folder) in err


def test_cli_compare_missing_npy_exits_2(capsys, tmp_path):
    code, err = cli(capsys, "compare", str(tmp_path / "m.npy"), "--out", str(tmp_path / "o"))
    assert code == 2
    assert f"matrix file {tmp_path / 'm.npy'} does not exist; give a .npy or .safetensors" in err


def test_cli_empty_eval_file_exits_2(capsys, tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\na\t0\nb\t1\n")
    dev = write(tmp_path / "dev.tsv", "sentence\tlabel\n")
    code, err = cli(capsys, "finetune", "--train-file", str(train), "--eval-file", str(dev),
                    "--out", str(tmp_path / "o"))
    assert code == 2 and "dev.tsv has a header row but no examples" in err
    assert not (tmp_path / "o").exists()


def test_cli_policy_dry_run_describes_the_validated_policy(capsys, tmp_path):
    assert main(["compress", "--targets", "ffn", "--tol", "0.25", "--dry-run", "--no-calibrate",
                 "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out.count("tol=0.25") == 12


@pytest.mark.parametrize("setting, message", [
    ({"lr": -1e-3}, r"lr must be a finite number > 0 \(or None: the default\), got -0\.001"),
    ({"central_lr": 0.0}, r"central_lr must be a finite number > 0"),
    ({"auxiliary_lr": float("nan")}, r"auxiliary_lr must be a finite number > 0"),
    ({"weight_decay": -0.1}, r"weight_decay must be >= 0 and warmup_ratio in \[0, 1\)"),
    ({"warmup_ratio": 1.0}, r"weight_decay must be >= 0 and warmup_ratio in \[0, 1\)"),
])
def test_a_training_config_refuses_rates_that_would_not_descend(setting, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(strategy="full", max_steps=1, **setting)


def test_a_central_rate_is_used_as_given_not_replaced_by_the_base_rate():
    from mpotn.finetune.strategies import optimizer_groups
    from mpotn.layers import MPOLinear

    layer = MPOLinear.from_linear(nn.Linear(8, 12), n=2)
    groups = {g["name"]: g["lr"] for g in optimizer_groups(layer, lr=1e-3, central_lr=0.0)}
    assert groups["central"] == 0.0 and groups["auxiliary"] == 1e-3


@pytest.mark.parametrize("settings, message", [
    ({"overrides": {"0": {"structure": "SVD"}}},
     r"override '0': structure must be one of \('mpo', 'svd', 'auto'\), got 'SVD'"),
    ({"overrides": {"0": {"fit": "dmrg"}}}, r"override '0': fit must be one of"),
    ({"overrides": {"0": {"sweeps": -3}}}, r"override '0': sweeps must be an integer >= 0"),
    ({"overrides": {"0": {"damp": -1.0}}}, r"override '0': damp must be a finite number"),
    ({"overrides": {"0": {"method": "tucker", "structure": "svd"}}},
     r"override '0': structure='svd' is for method='mpo'"),
    ({"method": "tucker", "max_bond": 4}, r"method 'tucker' is truncated by ratio only"),
    ({"overrides": {"0": {"method": "cp", "max_bond": 4}}},
     r"override '0': method 'cp' is truncated by ratio only"),
])
def test_compression_settings_are_checked_in_every_override_before_compressing(settings,
                                                                                message):
    from mpotn.compression import CompressionConfig

    with pytest.raises(ValueError, match=message):
        CompressionConfig(targets=["0"], **settings)


def test_an_override_to_another_method_ignores_the_inherited_structure():
    from mpotn.compression import CompressionConfig

    config = CompressionConfig(targets=["0", "2"], structure="svd", ratio=0.5,
                               overrides={"2": {"method": "tt"}})
    assert config.overrides == {"2": {"method": "tt"}}
