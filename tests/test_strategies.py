"""Parameter selection per fine-tuning strategy, with exact counts."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from mpotn.compression import compress
from mpotn.finetune.strategies import apply_strategy, lora_rank_for_budget, optimizer_groups
from mpotn.layers import MPOEmbedding, MPOLinear

CONFIG = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=40, num_labels=2)


def classifier():
    torch.manual_seed(0)
    return BertForSequenceClassification(CONFIG)


def compressed():
    model = classifier()
    compress(model, targets=["all-linear", "embeddings"], exclude=["classifier"], n=3,
             max_bond=6, progress=False)
    return model


def count(model, predicate=lambda name, param: True):
    return sum(p.numel() for n, p in model.named_parameters() if predicate(n, p))


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def mpo_layers(model):
    return [m for m in model.modules() if isinstance(m, (MPOLinear, MPOEmbedding))]


def test_full_trains_everything():
    model = compressed()
    report = apply_strategy(model, "full")
    assert report["trainable_params"] == report["total_params"] == count(model)


def test_lfa_trains_auxiliary_tensors_biases_norms_and_head_only():
    model = compressed()
    report = apply_strategy(model, "lfa")
    layers = mpo_layers(model)
    auxiliary = sum(m.auxiliary_params for m in layers)
    biases = count(model, lambda n, p: n.endswith("bias") and "classifier" not in n)
    norms = count(model, lambda n, p: "LayerNorm.weight" in n)
    head = count(model, lambda n, p: n.startswith("classifier."))
    assert report["trainable_params"] == auxiliary + biases + norms + head
    assert not any(m.central.requires_grad for m in layers)
    assert all(core.requires_grad for m in layers for core in m.auxiliary)
    assert report["trainable_params"] < 0.5 * report["total_params"]


def test_central_trains_central_tensors_and_head_only():
    model = compressed()
    report = apply_strategy(model, "central")
    head = count(model, lambda n, p: n.startswith("classifier."))
    assert report["trainable_params"] == sum(m.central_params for m in mpo_layers(model)) + head


@pytest.mark.parametrize("k", [1, 2, 3])
def test_last_k_trains_the_last_k_layers_and_head(k):
    model = classifier()
    report = apply_strategy(model, "last-k", k=k)
    layer = count(model, lambda n, p: n.startswith("bert.encoder.layer.0."))
    head = count(model, lambda n, p: n.startswith("classifier."))
    assert report["trainable_params"] == k * layer + head
    assert report["strategy"] == f"last-{k}"
    assert "bert.encoder.layer.2.output.dense.weight" in trainable_names(model)
    assert ("bert.encoder.layer.0.output.dense.weight" in trainable_names(model)) == (k == 3)


def test_lora_rank_matches_a_budget_and_counts_adapters_exactly():
    model = classifier()
    width = 3 * (4 * (32 + 32) + (32 + 64) + (64 + 32))  # q, k, v, attn-out; FFN in and out
    assert lora_rank_for_budget(model, 4 * width) == 4
    head = count(model, lambda n, p: n.startswith("classifier."))
    report = apply_strategy(model, "lora", lora_rank=4)
    assert report["trainable_params"] == 4 * width + head
    assert report["model"] is not model and report["rank"] == 4


def test_optimizer_groups_give_central_and_auxiliary_their_own_learning_rates():
    model = compressed()
    apply_strategy(model, "full")
    groups = {g["name"]: g for g in optimizer_groups(model, 1e-3, central_lr=1e-5,
                                                      auxiliary_lr=1e-4)}
    assert groups["central"]["lr"] == 1e-5 and groups["auxiliary"]["lr"] == 1e-4
    assert groups["other"]["lr"] == 1e-3
    assert sum(p.numel() for p in groups["central"]["params"]) == sum(
        m.central_params for m in mpo_layers(model))
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == count(model)
    apply_strategy(model, "lfa")
    assert "central" not in {g["name"] for g in optimizer_groups(model, 1e-3)}


@pytest.mark.parametrize(
    ("strategy", "kwargs", "message"),
    [("adapters", {}, "unknown strategy"), ("last-k", {}, "needs k"),
     ("last-k", {"k": 4}, r"1 <= k <= 3"), ("lora", {}, "needs a rank"),
     ("lfa", {}, "needs MPO layers: compress the model first")],
)
def test_bad_strategy_arguments_are_clear_errors(strategy, kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_strategy(classifier(), strategy, **kwargs)


def test_what_lfa_counts_differs_only_by_the_head_argument():
    from mpotn.compression.model import MPOModel
    from mpotn.compression.parameters import head_parameters, lfa_parameters
    from mpotn.finetune.training import lfa_budget

    model = classifier()
    wrapped = compress(model, targets=["all-linear", "embeddings"], exclude=["classifier"],
                       n=3, max_bond=6, progress=False)
    assert isinstance(wrapped, MPOModel)
    without = sum(p.numel() for _, p in lfa_parameters(model, head=False))
    with_head = sum(p.numel() for _, p in lfa_parameters(model, head=True))
    head_weights = sum(p.numel() for n, p in head_parameters(model) if not n.endswith("bias"))
    assert wrapped.totals()["lfa_trainable_params"] == without  # #Pr: no head weights
    assert with_head == without + head_weights == lfa_budget(model)
    assert apply_strategy(model, "lfa")["trainable_params"] == with_head
