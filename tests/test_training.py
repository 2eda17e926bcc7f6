"""Fine-tuning with the Trainer: one path per strategy, exact counts, records, saved runs."""

import json

import pytest
import torch

import mpotn
from mpotn.compression import MPOModel
from mpotn.data import sst2_sample
from mpotn.finetune.training import (
    TrainingConfig,
    finetune,
    lfa_budget,
    prepare_model,
    write_run,
)
from mpotn.layers import MPOEmbedding, MPOLinear

SMALL = {"max_steps": 3, "batch_size": 8, "train_limit": 48, "eval_limit": 32}


@pytest.fixture(scope="module")
def data():
    return sst2_sample()


def expected_lfa_trainable(model):
    """Auxiliary cores, every bias, LayerNorms and the head, counted by hand."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, (MPOLinear, MPOEmbedding)):
            total += module.auxiliary_params + (module.bias.numel()
                                                if getattr(module, "bias", None) is not None
                                                else 0)
        elif isinstance(module, torch.nn.LayerNorm):
            total += sum(p.numel() for p in module.parameters())
        elif isinstance(module, torch.nn.Linear):
            bias = module.bias.numel() if module.bias is not None else 0
            total += module.weight.numel() + bias if name == "classifier" else bias
    return total


def test_lfa_trains_exactly_the_auxiliary_tensors_and_records_the_run(tiny_bert, data):
    config = TrainingConfig(strategy="lfa", **SMALL)
    model, tokenizer = prepare_model(tiny_bert, data, config, progress=False)
    assert isinstance(model, MPOModel) and len(model.mpo_layers()) == 2 * 6
    centrals = [m.central.detach().clone() for m in model.mpo_layers().values()]
    result = finetune(model, tokenizer, data, config, progress=False)
    record = result.record
    assert record["trainable_params"] == expected_lfa_trainable(model.base_model)
    assert record["total_params"] == sum(p.numel() for p in model.base_model.parameters())
    assert record["steps"] == 3 and record["train_examples"] == 48
    assert record["train_seconds"] > 0 and record["eval_seconds"] > 0
    assert 0 <= record["accuracy"] <= 1 and record["loss"] > 0
    for before, layer in zip(centrals, model.mpo_layers().values()):
        assert torch.equal(before, layer.central)  # central tensors stayed frozen
    assert lfa_budget(model.base_model) == record["trainable_params"]


def test_lfa_budget_of_a_dense_model_counts_the_full_rank_auxiliary_tensors(tiny_bert, data):
    config = TrainingConfig(strategy="lfa", **SMALL)
    dense, _ = prepare_model(tiny_bert, data, TrainingConfig(strategy="full", **SMALL))
    compressed, _ = prepare_model(tiny_bert, data, config, progress=False)
    assert lfa_budget(dense) == lfa_budget(compressed.base_model)


def test_lora_rank_defaults_to_the_lfa_budget(tiny_bert, data):
    config = TrainingConfig(strategy="lora", **SMALL)
    model, tokenizer = prepare_model(tiny_bert, data, config)
    budget = lfa_budget(model)
    record = finetune(model, tokenizer, data, config, progress=False).record
    assert record["lora_rank"] >= 1
    # adapters plus the head hold LFA's budget to within one rank's worth of adapters
    one_rank = 2 * (6 * 32 * 2 + 2 * (32 + 64))  # r * (in + out) summed over the 12 linears
    assert abs(record["trainable_params"] - budget) <= one_rank


@pytest.mark.parametrize(("strategy", "k"), [("full", None), ("last-k", 1), ("central", None)])
def test_every_strategy_runs_the_same_training_path(tiny_bert, data, strategy, k):
    config = TrainingConfig(strategy=strategy, k=k, **SMALL)
    model, tokenizer = prepare_model(tiny_bert, data, config, progress=False)
    record = finetune(model, tokenizer, data, config, progress=False).record
    assert record["strategy"] == (f"last-{k}" if k else strategy)
    assert 0 < record["trainable_params"] <= record["total_params"]
    assert record["steps"] == 3 and "accuracy" in record


def test_a_saved_run_loads_back_with_identical_outputs(tiny_bert, data, tmp_path):
    config = TrainingConfig(strategy="lfa", **SMALL)
    model, tokenizer = prepare_model(tiny_bert, data, config, progress=False)
    result = finetune(model, tokenizer, data, config, progress=False)
    paths = write_run(result, tokenizer, tmp_path, "test")
    assert json.loads(paths["metrics"].read_text())["steps"] == 3
    assert paths["history_csv"].read_text().startswith("loss,")
    assert paths["plot"].stat().st_size > 0
    loaded, loaded_tokenizer = prepare_model(tmp_path / "model", data, config)
    batch = loaded_tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        diff = (loaded(**batch).logits - model.eval()(**batch).logits).abs().max()
    assert float(diff) == 0.0
    assert isinstance(mpotn.load(tmp_path / "model"), MPOModel)


def test_bad_training_settings_are_clear_errors(data):
    with pytest.raises(ValueError, match="unknown strategy"):
        TrainingConfig(strategy="adapters")
    with pytest.raises(ValueError, match="needs k"):
        TrainingConfig(strategy="last-k")
    with pytest.raises(ValueError, match="max_steps > 0 or epochs > 0"):
        TrainingConfig(epochs=0)


def test_core_changes_are_recorded_for_mpo_models(tiny_bert, data, tmp_path):
    lfa = TrainingConfig(strategy="lfa", **SMALL)
    model, tokenizer = prepare_model(tiny_bert, data, lfa, progress=False)
    result = finetune(model, tokenizer, data, lfa, progress=False)
    assert len(result.core_changes) == 12
    assert all(r["central_change"] == 0.0 and r["auxiliary_change"] > 0
               for r in result.core_changes)
    full = TrainingConfig(strategy="full", **SMALL)
    model, tokenizer = prepare_model(tiny_bert, data, full, compress_model=True, progress=False)
    result = finetune(model, tokenizer, data, full, progress=False)
    assert all(r["central_change"] > 0 and r["auxiliary_change"] > 0
               for r in result.core_changes)
    assert result.record["mean_central_change"] > 0
    paths = write_run(result, tokenizer, tmp_path, "full on the MPO model")
    assert paths["core_changes"].read_text().startswith("name,type,layer,central_change")


def test_inspect_changes_compares_two_saves(tiny_bert, data, tmp_path, capsys):
    from mpotn.cli import main

    config = TrainingConfig(strategy="lfa", **SMALL)
    model, tokenizer = prepare_model(tiny_bert, data, config, progress=False)
    model.save_pretrained(str(tmp_path / "before"))
    finetune(model, tokenizer, data, config, progress=False)
    model.save_pretrained(str(tmp_path / "after"))
    assert main(["inspect", "--changes", str(tmp_path / "before"), str(tmp_path / "after"),
                 "--out", str(tmp_path / "out")]) == 0
    rows = (tmp_path / "out" / "core_changes.csv").read_text().splitlines()
    assert len(rows) == 13 and all(r.split(",")[3] == "0.0" for r in rows[1:])  # LFA


def test_training_arguments_leave_the_device_to_the_trainer(tmp_path):
    """No run is forced onto the CPU: with CUDA present, the Trainer would use it."""
    from mpotn.finetune.training import training_arguments

    args = training_arguments(TrainingConfig(), tmp_path, progress=False, steps=10)
    assert args.use_cpu is False
    assert args.max_steps == 10 and args.warmup_steps == 1


def test_lfa_on_two_core_mpos_defaults_to_the_smaller_learning_rate(tiny_bert, data):
    from mpotn.compression import compress
    from mpotn.compression.models import load_classifier, load_tokenizer
    from mpotn.types import DEFAULT_LR, LFA_LR_TWO_CORE

    tokenizer = load_tokenizer(tiny_bert)
    runs = {}
    for structure, lr in (("svd", None), ("mpo", None), ("svd", 1e-3)):
        model = compress(load_classifier(tiny_bert, data.num_labels), targets=["ffn"],
                         structure=structure, progress=False)
        config = TrainingConfig(strategy="lfa", lr=lr, **{**SMALL, "max_steps": 1})
        runs[(structure, lr)] = finetune(model, tokenizer, data, config,
                                         progress=False).record["lr"]
    assert runs[("svd", None)] == LFA_LR_TWO_CORE == 5e-5
    assert runs[("mpo", None)] == DEFAULT_LR["lfa"] == 5e-4
    assert runs[("svd", 1e-3)] == 1e-3  # a learning rate given is kept
