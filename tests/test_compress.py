"""compress(): targeting, architectures, the report and its totals."""

import pytest
import torch
from torch import nn
from transformers import (
    AlbertConfig,
    AlbertModel,
    DistilBertConfig,
    DistilBertModel,
    MobileBertConfig,
    MobileBertModel,
)

from mpotn.compression import CompressionConfig, compress, lfa_parameters, plan
from mpotn.compression.models import load_model
from mpotn.layers import MPOLinear


@pytest.fixture(scope="module")
def minilm_full():
    """The embedded MiniLM with every matrix at full rank."""
    original = load_model()
    compressed = compress(load_model(), targets=["all-linear", "embeddings"], progress=False)
    return original, compressed.eval()


def hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


def test_full_rank_compression_of_minilm_keeps_its_outputs(minilm_full):
    original, compressed = minilm_full
    ids = torch.randint(0, 30522, (2, 16), generator=torch.Generator().manual_seed(0))
    assert float((hidden(compressed, ids) - hidden(original, ids)).abs().max()) <= 1e-4
    assert len(compressed.mpo_layers()) == 40


def test_report_and_totals_in_the_papers_terms(minilm_full):
    original, compressed = minilm_full
    report = compressed.report()
    assert len(report) == 40
    word = report[0]
    assert word["name"] == "embeddings.word_embeddings" and word["shape"] == "30522x384"
    assert word["bond_dims"] == word["full_bond_dims"] == "12,384,768,24"
    assert all(r["relative_error"] <= 1e-5 and r["relative_bound"] == 0 for r in report)
    totals = compressed.totals()
    layers = compressed.mpo_layers().values()
    assert totals["original_params"] == sum(p.numel() for p in original.parameters())
    assert totals["total_params"] == sum(p.numel() for p in compressed.parameters())
    assert totals["total_params"] > totals["original_params"]  # full rank adds 7-13%
    biases_and_norms = sum(
        p.numel() for n, p in compressed.base_model.named_parameters()
        if n.endswith("bias") or "LayerNorm" in n
    )
    assert totals["lfa_trainable_params"] == sum(m.auxiliary_params for m in layers) + (
        biases_and_norms)
    assert "aux-only fine-tuning updates (#Pr)" in compressed.summary()


def test_truncated_compression_meets_the_budget_and_reports_bound_and_error():
    model = load_model()
    compressed = compress(model, targets=["ffn"], ratio=0.4, progress=False)
    report = compressed.report()
    assert [r["type"] for r in report] == ["ffn_in", "ffn_out"] * 6
    for r in report:
        assert r["ratio"] <= 0.4
        assert 0 < r["relative_error"] <= r["relative_bound"] * (1 + 1e-6)
    saved = sum(r["original_params"] - r["params"] for r in report)
    totals = compressed.totals()
    assert totals["original_params"] - totals["total_params"] == saved


def test_presets_suffixes_regex_and_exclusions_select_the_right_modules():
    model = load_model()
    names = lambda **kw: [r["name"] for r in plan(model, **kw)]  # noqa: E731
    assert len(names(targets=["attention"])) == 24
    assert len(names(targets=["embeddings"])) == 3
    assert len(names(targets=["all-linear"])) == 37
    assert names(targets=["query"], exclude=r"encoder\.layer\.[1-5]\..*") == [
        "encoder.layer.0.attention.self.query"]
    assert names(targets=r"encoder\.layer\.0\.(intermediate|output)\.dense") == [
        "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"]
    assert names(targets=["ffn"], exclude=["output.dense"]) == [
        f"encoder.layer.{k}.intermediate.dense" for k in range(6)]


def test_per_target_overrides_and_dry_run_sizes():
    model = load_model()
    config = CompressionConfig(targets=["ffn", "query"], max_bond=16,
                               overrides={"query": {"n": 3, "ratio": 0.5}})
    rows = {r["name"]: r for r in plan(model, config)}
    assert rows["encoder.layer.0.attention.self.query"]["policy"] == "ratio=0.5"
    assert rows["encoder.layer.0.attention.self.query"]["n"] == 3
    assert rows["encoder.layer.0.attention.self.query"]["structure"] == "mpo"
    svd = plan(model, targets=["ffn"], structure="svd", ratio=0.5)  # the CLI's default
    assert {(r["structure"], r["n"]) for r in svd} == {("svd", 2)}
    assert rows["encoder.layer.0.intermediate.dense"]["policy"] == "max_bond=16"
    assert rows["encoder.layer.0.intermediate.dense"]["params"] == 384 * 1536
    budget = plan(model, targets=["ffn"], ratio=0.5, budget="model")
    assert {r["policy"] for r in budget} == {
        "share of one model budget (ratio=0.5 of all targets)"}
    compressed = compress(model, config, progress=False)
    layers = compressed.mpo_layers()
    assert layers["encoder.layer.0.attention.self.query"].n == 3
    assert max(layers["encoder.layer.0.intermediate.dense"].bond_dims) == 16


def test_an_override_that_matches_no_target_is_named_in_a_warning():
    model = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 8))
    with pytest.warns(UserWarning, match=r"overrides \['qurey'\] match none of the 2 "
                                         r"targets, so they change nothing"):
        compress(model, targets=["0", "1"], n=2, ratio=0.5, progress=False,
                 overrides={"qurey": {"ratio": 0.1}, "1": {"ratio": 0.3}})


def test_albert_shared_layer_is_decomposed_once_and_stays_shared():
    config = AlbertConfig(vocab_size=120, embedding_size=16, hidden_size=32,
                          num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    model = AlbertModel(config).eval()
    ids = torch.randint(0, 120, (2, 7))
    before = hidden(model, ids)
    compressed = compress(model, targets=["all-linear", "embeddings"], n=3, progress=False)
    layer = model.encoder.albert_layer_groups[0].albert_layers[0]
    assert isinstance(layer.ffn, MPOLinear)
    # 6 linears of the one shared layer + embedding projection + pooler, for 3 hidden layers
    assert sum(isinstance(m, MPOLinear) for m in model.modules()) == 8
    assert len(compressed.mpo_layers()) == 8 + 3
    assert float((hidden(compressed, ids) - before).abs().max()) <= 1e-4


@pytest.mark.parametrize(
    ("model", "count"),
    [
        (DistilBertModel(DistilBertConfig(vocab_size=90, dim=32, n_layers=2, n_heads=2,
                                          hidden_dim=64)), 2 * 6 + 2),
        (MobileBertModel(MobileBertConfig(vocab_size=90, hidden_size=64, embedding_size=32,
                                          num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, intra_bottleneck_size=32,
                                          num_feedforward_networks=2)), 2 * 12 + 3),
    ],
)
def test_distilbert_and_mobilebert_compress_at_full_rank_without_changing_outputs(model, count):
    model.eval()
    ids = torch.randint(0, 90, (2, 9))
    before = hidden(model, ids)
    compressed = compress(model, targets=["all-linear", "embeddings"], n=3, progress=False)
    assert len(compressed.mpo_layers()) == count
    assert float((hidden(compressed, ids) - before).abs().max()) <= 1e-4


def test_any_module_of_linears_and_embeddings():
    model = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    compressed = compress(model, targets=["embeddings", "all-linear"], n=2, max_bond=4,
                          progress=False)
    assert len(compressed.mpo_layers()) == 3
    out = compressed(torch.randint(0, 100, (3, 5)))
    assert out.shape == (3, 5, 4)


def test_pattern_matching_nothing_lists_candidates():
    with pytest.raises(ValueError, match=r"match no nn\.Linear, Conv1D or nn\.Embedding .* "
                                         r"The model's matrices \(40, with their types\): "
                                         r"embeddings\.word_embeddings \(word_emb\)"):
        plan(load_model(), targets=["nonexistent"])


def test_unsupported_modules_are_skipped_with_a_warning_naming_them():
    model = nn.Sequential(nn.Conv1d(4, 4, 1), nn.Linear(4, 4))
    skipped = "skipping 0: Conv1d is not nn.Linear, Conv1D or nn.Embedding"
    with pytest.warns(UserWarning, match=skipped):
        compressed = compress(model, targets=r"\d", n=2, progress=False)
    assert list(compressed.mpo_layers()) == ["1"]


def test_a_head_tied_to_an_embedding_follows_it_and_other_ties_are_skipped_with_a_warning():
    embedding = nn.Embedding(40, 8)
    head = nn.Linear(8, 40, bias=False)
    head.weight = embedding.weight
    model = nn.Sequential(embedding, head)
    compressed = compress(model, targets=["embeddings", "all-linear"], n=2, progress=False)
    assert [(r["name"], r["tied"]) for r in compressed.report()] == [("0", "1")]
    ids = torch.tensor([[3, 7, 39]])
    with torch.no_grad():
        dense = embedding(ids) @ embedding.weight.T
        torch.testing.assert_close(compressed(ids), dense, atol=1e-5, rtol=1e-5)
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight
    with pytest.warns(UserWarning, match=r"skipping 0: its weight is tied to \['1'\]"), \
            pytest.warns(UserWarning, match=r"skipping 1: its weight is tied to \['0'\]"), \
            pytest.raises(ValueError, match="match no"):
        compress(nn.Sequential(first, second), targets=["all-linear"], n=2, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": []}, "targets is empty"),
        ({"max_bond": 4, "ratio": 0.5}, "at most one truncation policy"),
        ({"overrides": {"query": {"rank": 3}}}, "unknown settings"),
    ],
)
def test_bad_configs_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig(**kwargs)


def test_lfa_parameters_are_auxiliary_cores_biases_and_norms():
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16))
    compressed = compress(model, targets=["0"], n=3, progress=False)
    names = [n for n, _ in lfa_parameters(compressed.base_model)]
    assert names == ["0.cores.0", "0.cores.2", "0.bias", "1.weight", "1.bias"]


def test_a_matrix_that_cannot_reach_the_ratio_is_cut_to_bonds_of_one_with_a_warning():
    """At ratio 0.5 a 2 x 384 SVD needs rank 1 (0.503 of it): it is floored, and said so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 384), nn.Linear(64, 64))
    with pytest.warns(UserWarning, match=r"1 matrices cannot reach their ratio .*: 0 \("):
        compressed = compress(model, targets=["0", "1"], ratio=0.5, structure="svd",
                              progress=False)
    small, square = compressed.report()
    assert small["bond_dims"] == "1" and small["ratio"] == pytest.approx(386 / 768)
    assert square["bond_dims"] == "16" and square["ratio"] == 0.5
    # so are parameters below its bonds of 1, named the same way (it raised before)
    with pytest.warns(UserWarning, match=r"1 matrices cannot reach their ratio \(or params\)"
                                         r".*: 0 \("):
        compressed = compress(nn.Sequential(nn.Linear(2, 384), nn.Linear(64, 64)),
                              targets=["0", "1"], structure="svd", progress=False,
                              overrides={"0": {"params": 100}, "1": {"ratio": 0.5}})
    assert compressed.report()[0]["params"] == 386
