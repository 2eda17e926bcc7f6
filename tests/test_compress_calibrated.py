"""compress(..., calibration=...): calibrated structures, a model-wide budget, the CLI."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import mpotn
from mpotn.budget import mpo_path, spend
from mpotn.calibration import output_error, output_spectra_mpo
from mpotn.cli import main
from mpotn.compression.calibrate import calibrate, text_batches
from mpotn.compression.models import load_model, load_tokenizer
from mpotn.data import texts
from mpotn.truncation import ratio_params

TARGET = "encoder.layer.1.intermediate.dense"


def toy_model_and_inputs() -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """Two linears whose inputs have very unequal scales (as transformer activations do)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 16))
    scale = torch.logspace(-2, 1, 24)
    batches = [{"input": torch.randn(64, 24) * scale} for _ in range(4)]
    return model, batches


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.inner(input)


def test_calibrate_accumulates_x_transpose_x_over_real_tokens_only():
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, input: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.body(input)

    stats = calibrate(Masked(), [{"input": x, "attention_mask": mask}], {"0": model[0]})
    rows = x[mask.bool()].double()
    assert stats["0"].tokens == 5
    assert torch.allclose(stats["0"].covariance, rows.T @ rows)


def test_calibrated_svd_structure_has_lower_output_error_than_plain_svd():
    model, batches = toy_model_and_inputs()
    plain_model, _ = toy_model_and_inputs()
    stats = calibrate(Wrapper(model), batches, {"0": model[0]})
    cov = stats["0"].covariance
    matrix = model[0].weight.detach().T.double()
    calibrated = mpotn.compress(Wrapper(model), targets=["inner.0"], structure="svd",
                                ratio=0.4, calibration=batches, progress=False)
    plain = mpotn.compress(Wrapper(plain_model), targets=["inner.0"], structure="svd",
                           ratio=0.4, progress=False)
    [ours], [theirs] = calibrated.report(), plain.report()
    assert ours["structure"] == "svd" and ours["calibration"] == "whitened"
    assert ours["params"] == theirs["params"] <= 0.4 * 24 * 32
    assert theirs["output_error"] is None
    layer = calibrated.base_model.inner[0]
    weight = layer.contractor.rebuild(list(layer.cores)).double()
    assert ours["output_error"] == pytest.approx(output_error(matrix, weight, cov), rel=1e-5)
    plain_layer = plain.base_model.inner[0]
    plain_weight = plain_layer.contractor.rebuild(list(plain_layer.cores)).double()
    assert ours["output_error"] < 0.5 * output_error(matrix, plain_weight, cov)


def test_model_budget_spends_one_budget_unevenly_and_meets_it():
    model, batches = toy_model_and_inputs()
    compressed = mpotn.compress(Wrapper(model), targets=["inner.0", "inner.2"],
                                structure="svd", budget="model", ratio=0.5,
                                calibration=batches, progress=False)
    report = compressed.report()
    assert sum(r["params"] for r in report) <= 0.5 * (24 * 32 + 32 * 16)
    assert report[0]["ratio"] != pytest.approx(report[1]["ratio"], abs=0.02)


def _squared_output_errors(compressed: mpotn.MPOModel) -> float:
    return sum(r["output_error"] ** 2 for r in compressed.report())


def test_a_model_budget_over_als_fits_spends_by_output_error():
    """ALS-fitted MPOs keep the weights' spectra; the budget reads their whitened
    matrices' (output errors, like a whitened SVD's), and lowers the summed output error
    below the same ratio per matrix."""
    model, batches = toy_model_and_inputs()
    stats = calibrate(Wrapper(model), batches, {"0": model[0], "2": model[2]})
    settings = {"targets": ["inner.0", "inner.2"], "n": 2, "ratio": 0.4, "fit": "als",
                "damp": 0.0, "calibration": batches, "progress": False}
    budget = mpotn.compress(Wrapper(copy.deepcopy(model)), budget="model", **settings)
    per_matrix = mpotn.compress(Wrapper(copy.deepcopy(model)), **settings)
    paths = [mpo_path(f"inner.{k}", output_spectra_mpo(
        model[k].weight.detach().T, stats[str(k)].covariance, 2, damp=0.0)) for k in (0, 2)]
    cuts = spend(paths, ratio_params(0.4, 24 * 32 + 32 * 16))
    report = budget.report()
    assert [r["params"] for r in report] == [p.params_after(cuts[p.name]) for p in paths]
    assert {r["calibration"] for r in report} == {"als"}

    # measured 0.342 against 0.368 (with the larger factors first since even n puts the
    # largest at the central index; 0.8 of it with the other order)
    assert _squared_output_errors(budget) < 0.95 * _squared_output_errors(per_matrix)


def test_keep_dense_leaves_a_matrix_dense_where_its_share_is_its_size_and_lowers_the_error():
    """At 0.9 of the size one budget over two SVDs keeps both above their break-even
    ranks; with ``keep_dense`` the second stays the original ``nn.Linear`` and the first
    gets the difference: within the same budget, under a fifth of the summed squared
    output error. A budget above every factorization leaves both matrices dense."""
    model, batches = toy_model_and_inputs()
    settings = {"targets": ["inner.0", "inner.2"], "structure": "svd", "ratio": 0.9,
                "budget": "model", "calibration": batches, "progress": False}
    both = mpotn.compress(Wrapper(copy.deepcopy(model)), **settings)
    kept = mpotn.compress(Wrapper(copy.deepcopy(model)), keep_dense=True, **settings)
    assert [r["structure"] for r in both.report()] == ["svd", "svd"]
    first, second = kept.report()
    assert (first["structure"], second["structure"]) == ("svd", "dense")
    assert (second["params"], second["ratio"], second["output_error"]) == (512, 1.0, 0.0)
    assert first["params"] > both.report()[0]["params"]
    layer = kept.base_model.inner[2]
    assert type(layer) is nn.Linear and torch.equal(layer.weight, model[2].weight)
    assert kept.totals()["compressed_matrices"] == 1
    budget = ratio_params(0.9, 24 * 32 + 32 * 16)
    assert first["params"] + second["params"] <= budget

    assert _squared_output_errors(kept) < 0.2 * _squared_output_errors(both)
    generous = mpotn.compress(Wrapper(copy.deepcopy(model)), **{
        **settings, "ratio": None, "params": 10**6, "keep_dense": True})
    assert [r["structure"] for r in generous.report()] == ["dense", "dense"]
    assert generous.totals()["total_params"] == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=r"keep_dense=True .* use it with budget='model'"):
        mpotn.CompressionConfig(ratio=0.5, keep_dense=True)


def test_calibrated_mpo_by_als_beats_plain_mpo_at_the_same_bonds_on_minilm():
    tokenizer = load_tokenizer()
    batches = text_batches(tokenizer, texts(samples=64))
    held_out = text_batches(tokenizer, texts(samples=64, seed=1))
    settings = {"targets": [TARGET], "n": 3, "ratio": 0.5, "progress": False}
    calibrated = mpotn.compress(load_model(), calibration=batches, fit="als", **settings)
    plain = mpotn.compress(load_model(), **settings)
    [ours], [theirs] = calibrated.report(), plain.report()
    assert ours["bond_dims"] == theirs["bond_dims"] and ours["params"] == theirs["params"]
    original = load_model()
    module = dict(original.named_modules())[TARGET]
    cov = calibrate(original, held_out, {TARGET: module})[TARGET].covariance
    matrix = module.weight.detach().T.double()

    def held_out_error(model: mpotn.MPOModel) -> float:
        layer = dict(model.base_model.named_modules())[TARGET]
        return output_error(matrix, layer.contractor.rebuild(list(layer.cores)).double(), cov)

    assert held_out_error(calibrated) < 0.7 * held_out_error(plain)


def test_structure_auto_keeps_the_lower_error_structure_per_matrix():
    model, batches = toy_model_and_inputs()
    compressed = mpotn.compress(Wrapper(model), targets=["inner.0"], structure="auto", n=2,
                                ratio=0.5, calibration=batches, progress=False)
    [row] = compressed.report()
    svd_model, _ = toy_model_and_inputs()
    svd = mpotn.compress(Wrapper(svd_model), targets=["inner.0"], structure="svd",
                         ratio=0.5, calibration=batches, progress=False)
    assert row["output_error"] <= svd.report()[0]["output_error"] + 1e-12


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": "model"}, "give ratio or params"),
    ({"structure": "auto", "max_bond": 4}, "equal parameter counts"),
    ({"structure": "auto", "ratio": 0.5, "overrides": {"0": {"max_bond": 4}}},
     "override '0': structure='auto' compares structures at equal parameter counts"),
    ({"max_bond": 4, "overrides": {"0": {"structure": "auto"}}}, "equal parameter counts"),
    ({"structure": "tree"}, "structure must be one of"),
    ({"fit": "dmrg"}, "fit must be one of"),
    ({"sweeps": -1}, "sweeps must be an integer"),
])
def test_bad_calibration_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mpotn.compress(nn.Sequential(nn.Linear(4, 4)), targets=["0"], progress=False, **kwargs)


@pytest.mark.parametrize("allocation", ["uniform", "optimal"])
def test_auto_structure_keeps_the_allocation_asked_for(allocation):
    from mpotn.compression.compress import _options, _policies, _Target
    from mpotn.compression.config import CompressionConfig

    linear = nn.Linear(64, 256)
    config = CompressionConfig(targets=["0"], n=3, structure="auto", ratio=0.3,
                               allocation=allocation)
    target = _Target("0", linear, linear.weight.detach().T, config.settings_for("0", linear))
    policies, _ = _policies([target], {"0": _options(target)}, config)
    assert policies["0"].allocation == allocation  # optimal before, whatever was asked
    assert policies["0"].params == ratio_params(0.3, 64 * 256)


def test_cli_compress_calibrates_from_a_text_file_and_reports_fidelity(tiny_bert, tmp_path,
                                                                       capsys, monkeypatch):
    sentences = tmp_path / "calibration.txt"
    sentences.write_text("a fine film .\nan awful , boring mess .\nthe cast is great .\n")
    out = tmp_path / "out"
    assert main(["compress", str(tiny_bert), "--targets", "ffn", "--structure", "svd",
                 "--ratio", "0.5", "--calibrate", str(sentences), "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "expected fidelity: mean cosine" in printed
    assert "output error (Eq. 7)" in printed
    loaded = mpotn.load(out)
    assert all(r["calibration"] == "whitened" for r in loaded.report())
    # a matrix per group (32 x 32 float64 moments are 8 KiB): the same compression
    import importlib
    module = importlib.import_module("mpotn.compression.compress")
    passes = []
    monkeypatch.setattr(module, "calibrate", lambda *a, **k: passes.append(1) or calibrate(
        *a, **k))
    args = ["compress", str(tiny_bert), "--targets", "ffn", "--structure", "svd", "--ratio",
            "0.5", "--calibrate", str(sentences), "--no-progress"]
    assert main([*args, "--out", str(out / "g"), "--calibration-memory", str(9 / 2**20)]) == 0
    assert len(passes) == 8  # the 4 FFN matrices of 2 layers: for the budget, then the fits
    assert list(mpotn.load(out / "g").report()) == list(loaded.report())
    passes.clear()  # each matrix at the ratio: one round of passes
    assert main([*args, "--budget", "matrix", "--out", str(out / "m")]) == 0
    assert main([*args, "--budget", "matrix", "--out", str(out / "mg"),
                 "--calibration-memory", str(9 / 2**20)]) == 0
    assert len(passes) == 1 + 4
    assert list(mpotn.load(out / "mg").report()) == list(mpotn.load(out / "m").report())


def _tiny_bert_model(hidden: int = 32):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=97, hidden_size=hidden, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=48)).eval()


def test_position_embeddings_count_each_real_token_once_and_a_pooler_every_sentence():
    bert = _tiny_bert_model()
    ids = torch.randint(1, 97, (4, 32))  # padded to 32 = hidden size: the pooler's trap
    mask = torch.ones(4, 32, dtype=torch.long)
    mask[1:, 3:] = 0  # one long sentence, three of 3 tokens
    targets = {"position": bert.embeddings.position_embeddings,
               "word": bert.embeddings.word_embeddings,
               "query": bert.encoder.layer[0].attention.self.query,
               "pooler": bert.pooler.dense}
    stats = calibrate(bert, [{"input_ids": ids, "attention_mask": mask}], targets)
    real = int(mask.sum())  # 41
    expected = torch.zeros(512, dtype=torch.float64)
    expected[:32] = mask.sum(0).double()  # position p: sentences at least p + 1 long
    assert torch.equal(stats["position"].covariance, expected)
    assert stats["position"].tokens == stats["word"].tokens == stats["query"].tokens == real
    assert stats["pooler"].tokens == 4 and stats["pooler"].covariance.shape == (32, 32)


def test_positions_the_calibration_never_reached_count_as_the_rarest_it_reached():
    """Short calibration text reaches the first positions only; the others count as the
    rarest reached one (not 0, where only the damping would keep them)."""
    from mpotn.compression.compress import _unseen_positions_counted
    counts = torch.tensor([4.0, 4.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    filled = _unseen_positions_counted("embeddings.position_embeddings", counts)
    assert filled.tolist() == [4.0, 4.0, 1.0, 1.0, 1.0]
    roberta = torch.tensor([0.0, 0.0, 2.0, 2.0, 1.0, 0.0], dtype=torch.float64)  # from 2
    assert _unseen_positions_counted("embeddings.position_embeddings", roberta).tolist() == [
        0.0, 0.0, 2.0, 2.0, 1.0, 1.0]
    for name in ("embeddings.word_embeddings", "transformer.wpe"):
        expected = [4.0, 4.0, 1.0, 0.0, 0.0] if name.endswith("word_embeddings") else (
            [4.0, 4.0, 1.0, 1.0, 1.0])
        assert _unseen_positions_counted(name, counts).tolist() == expected
    bert = _tiny_bert_model()
    ids = torch.randint(1, 97, (8, 6), generator=torch.Generator().manual_seed(2))
    settings = {"targets": ["embeddings"], "structure": "svd", "ratio": 0.3,
                "progress": False}
    calibrated = mpotn.compress(copy.deepcopy(bert), calibrate_embeddings=True,
                                calibration=[{"input_ids": ids}], **settings)
    plain = mpotn.compress(copy.deepcopy(bert), **settings)
    # every sentence reaches the first 6 positions: the 506 others count as often, so every
    # row weighs the same, as in the truncation of the weights (without: an error of
    # 0.0005 on the 6 rows and 0.82 on the others, against 0.75 and 0.79)
    cut, weights = (m.base_model.embeddings.position_embeddings.weight.detach()
                    for m in (calibrated, plain))
    assert torch.allclose(cut, weights, atol=1e-5)


def test_t5_is_calibrated_with_shifted_decoder_inputs_and_each_stack_its_own_mask():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(
        vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0)).eval()
    ids = torch.randint(1, 100, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    targets = {"encoder": t5.encoder.block[0].layer[0].SelfAttention.q,
               "decoder": t5.decoder.block[0].layer[0].SelfAttention.q}
    stats = calibrate(t5, [{"input_ids": ids, "attention_mask": mask}], targets)
    # the decoder reads the start token and the inputs but the last: the positions that
    # predict a real token, 5 + 2, as the two sentences give alone
    assert stats["encoder"].tokens == 7 and stats["decoder"].tokens == 7
    alone = calibrate(t5, [{"input_ids": ids[:1]}, {"input_ids": ids[1:, :2]}], targets)
    left = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])  # the short one padded left
    left_ids = torch.stack([ids[0], torch.cat([ids[1, 2:], ids[1, :2]])])
    left_padded = calibrate(t5, [{"input_ids": left_ids, "attention_mask": left}], targets)
    for name in targets:
        for padded in (stats, left_padded):
            assert alone[name].tokens == padded[name].tokens
            assert torch.allclose(alone[name].covariance, padded[name].covariance, rtol=1e-5,
                                  atol=1e-6)
    given = torch.tensor([[1, 1, 1], [1, 0, 0]])  # a decoder mask of another length
    batch = {"input_ids": ids, "attention_mask": mask,
             "decoder_input_ids": torch.randint(1, 100, (2, 3)), "decoder_attention_mask": given}
    stats = calibrate(t5, [batch], targets)
    assert stats["encoder"].tokens == 7 and stats["decoder"].tokens == 4
    # the shared embedding, which transformers 5 never calls: its weight's two users are
    shared = calibrate(t5, [batch], {"shared": t5.shared})["shared"]
    assert shared.tokens == 7 + 4
    counts = torch.bincount(ids[mask.bool()], minlength=100) + torch.bincount(
        batch["decoder_input_ids"][given.bool()], minlength=100)
    assert torch.equal(shared.covariance, counts.double())


def test_t5_cross_attention_counts_encoder_tokens_and_an_untied_head_decoder_tokens():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(
        vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, tie_word_embeddings=False)).eval()
    ids = torch.randint(1, 100, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])  # 9 encoder tokens
    cross = t5.decoder.block[0].layer[1].EncDecAttention
    targets = {"decoder.block.0.layer.1.EncDecAttention.k": cross.k,
               "decoder.block.0.layer.1.EncDecAttention.q": cross.q, "lm_head": t5.lm_head}
    for decoder_length in (5, 3):  # as long as the encoder, and not
        given = torch.ones(2, decoder_length, dtype=torch.long)
        given[1, 1:] = 0  # 1 + decoder_length decoder tokens
        stats = calibrate(t5, [{"input_ids": ids, "attention_mask": mask,
                                "decoder_input_ids": torch.randint(1, 100, (2, decoder_length)),
                                "decoder_attention_mask": given}], targets)
        assert stats["decoder.block.0.layer.1.EncDecAttention.k"].tokens == 9
        assert stats["decoder.block.0.layer.1.EncDecAttention.q"].tokens == 1 + decoder_length
        assert stats["lm_head"].tokens == 1 + decoder_length


def test_a_tokenizer_without_padding_pads_with_its_end_token(word_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from mpotn.compression.models import padding_tokenizer
    tokenizer = word_tokenizer
    assert tokenizer.pad_token is None
    batches = text_batches(tokenizer, ["a", "a longer sentence"], batch_size=2)
    assert batches[0]["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batches[0]["input_ids"].tolist() == [[1, 0, 0], [1, 2, 3]]  # padded with 0
    assert tokenizer.pad_token is None  # the caller's tokenizer is left as it was
    assert padding_tokenizer(padding_tokenizer(tokenizer)).pad_token == "<|endoftext|>"
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=7, n_embd=32, n_layer=2, n_head=2,
                                     n_positions=64, bos_token_id=0, eos_token_id=0))
    from mpotn.analysis.fidelity import sentence_embeddings
    with torch.no_grad():
        assert sentence_embeddings(gpt, tokenizer, ["a", "b c"]).shape == (2, 32)
    dense = sum(p.numel() for p in gpt.parameters())
    compressed = mpotn.compress(gpt, targets=["ffn"], ratio=0.5, calibration=batches,
                                progress=False)
    assert compressed.totals()["total_params"] < dense


def test_structure_auto_drops_a_structure_that_cannot_shrink_enough_and_floors_at_none():
    def token_type_row(ratio):
        compressed = mpotn.compress(_tiny_bert_model(), targets=["embeddings"],
                                    structure="auto", n=2, ratio=ratio, progress=False,
                                    calibrate_embeddings=True,
                                    calibration=[{"input_ids": torch.randint(1, 97, (2, 6))}])
        return next(r for r in compressed.report()
                    if r["name"].endswith("token_type_embeddings"))

    # 2 x 32 at 0.5: 32 parameters; the SVD needs 34 at rank 1, the MPO 1·2 x 4·8 reaches
    row = token_type_row(0.5)
    assert row["structure"] == "mpo" and row["params"] <= 32
    # at 0.3 (19) neither reaches (MPO 20 and SVD 34 at bonds of 1): floored, with a warning
    with pytest.warns(UserWarning, match="cannot reach their ratio"):
        row = token_type_row(0.3)
    # the smaller structure at bonds of 1 (n = 2: one inner bond)
    assert row["bond_dims"] == "1" and row["structure"] == "mpo" and row["params"] == 20


def test_structure_auto_under_a_model_budget_keeps_only_structures_that_reach_the_share():
    """The budget reads the SVD's path; an MPO that cannot get down to a matrix's share is
    not a candidate (it raised an error before)."""
    model = _tiny_bert_model()
    sizes = [m.weight.numel() for n, m in model.named_modules()
             if n.endswith(("query", "key", "value", "attention.output.dense"))]
    compressed = mpotn.compress(model, targets=["attention"], n=2, structure="auto",
                                budget="model", ratio=0.08, progress=False,
                                calibration=[{"input_ids": torch.randint(1, 97, (2, 6))}])
    assert sum(r["params"] for r in compressed.report()) <= 0.08 * sum(sizes)


@pytest.mark.parametrize(("kwargs", "calibration", "message"), [
    ({}, [], r"the calibration is empty \(no batches"),
    ({"method": "svd"}, None, "none of the 1 targets is calibrated: calibration applies to "
                              "method='mpo'"),
])
def test_calibration_that_reaches_no_target_is_a_clear_error(kwargs, calibration, message):
    model, batches = toy_model_and_inputs()
    with pytest.raises(ValueError, match=message):
        mpotn.compress(Wrapper(model), targets=["inner.0"], ratio=0.5, progress=False,
                       calibration=batches if calibration is None else calibration, **kwargs)


def test_an_als_fit_reports_no_eq4_bound_of_its_weights():
    """The bound is the truncation's, before the sweeps: not the layer's."""
    model, batches = toy_model_and_inputs()
    compressed = mpotn.compress(Wrapper(model), targets=["inner.0"], n=3, ratio=0.3,
                                fit="als", calibration=batches, progress=False)
    [row] = compressed.report()
    assert row["calibration"] == "als" and row["relative_bound"] is None


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2)).eval()


def test_a_decoder_is_calibrated_without_a_key_value_cache_and_to_the_same_moments():
    gpt = _tiny_gpt2()
    assert gpt.config.use_cache
    batch = {"input_ids": torch.randint(0, 97, (2, 6)),
             "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    called = []
    handle = gpt.register_forward_pre_hook(
        lambda _m, _a, kwargs: called.append(kwargs.get("use_cache")), with_kwargs=True)
    stats = calibrate(gpt, [batch], {"lm_head": gpt.lm_head})
    cached = calibrate(gpt, [{**batch, "use_cache": True}],  # the caller's choice stands
                       {"lm_head": gpt.lm_head})
    handle.remove()
    assert called == [False, True]
    assert torch.equal(stats["lm_head"].covariance, cached["lm_head"].covariance)


def test_keep_dense_puts_gpt2_conv1d_back_and_saves_and_loads_equal(tmp_path):
    """A GPT-2 ``Conv1D`` kept dense is GPT-2's own module again (so the save stores it
    as GPT-2 reads it), in one pass and in groups, and loads with equal logits."""
    from transformers.pytorch_utils import Conv1D
    ids = torch.randint(1, 97, (3, 10), generator=torch.Generator().manual_seed(8))
    settings = {"targets": ["all-linear"], "structure": "svd", "ratio": 0.95,
                "budget": "model", "keep_dense": True, "calibration": [{"input_ids": ids}],
                "progress": False}
    original = dict(_tiny_gpt2().named_modules())
    one_pass = mpotn.compress(_tiny_gpt2(), **settings)
    grouped = mpotn.compress(_tiny_gpt2(), calibration_memory=9000, **settings)
    report = list(one_pass.report())
    assert json.dumps(report) == json.dumps(list(grouped.report()))  # NaN as NaN
    dense = [r["name"] for r in report if r["structure"] == "dense"]
    assert "transformer.h.0.attn.c_proj" in dense and len(dense) < len(report)  # square
    modules = dict(one_pass.base_model.named_modules())
    for name in dense:
        assert type(modules[name]) is Conv1D
        assert torch.equal(modules[name].weight, original[name].weight)
    one_pass.save_pretrained(tmp_path / "gpt2")
    loaded = mpotn.load(tmp_path / "gpt2")
    with torch.no_grad():
        logits = one_pass(input_ids=ids).logits
        assert torch.equal(loaded(input_ids=ids).logits, logits)
        assert torch.equal(grouped(input_ids=ids).logits, logits)


@pytest.mark.parametrize("structure", ["svd", "mpo"])
def test_calibrating_in_groups_that_fit_the_memory_gives_the_one_pass_result(structure):
    """Above calibration_memory the targets are calibrated, fitted and replaced group by
    group, one pass each with the original modules in place: the same layers as one pass
    (GPT-2: Conv1D layers and an lm_head tied to the calibrated embedding included)."""
    ids = torch.randint(1, 97, (3, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}] * 2
    settings = {"targets": ["all-linear", "embeddings"], "structure": structure,
                "n": 3, "ratio": 0.4, "calibrate_embeddings": True, "progress": False}
    one_pass = mpotn.compress(_tiny_gpt2(), calibration=batches, **settings)
    model, passes = _tiny_gpt2(), []
    model.register_forward_pre_hook(lambda module, args: passes.append(1))
    # float64 moments of two 32-input matrices: groups [wte (97 tokens), wpe (1024)],
    # then per layer [c_attn, attn c_proj], [c_fc], [mlp c_proj (128 inputs) alone]
    budget = 8 * 2 * 32 * 32
    grouped = mpotn.compress(model, calibration=batches, calibration_memory=budget,
                             **settings)
    report = list(grouped.report())
    assert len(report) == 10 and len(passes) == 2 * 7  # 7 groups, each a pass of 2 batches
    assert report == list(one_pass.report())
    whitened = {r["name"] for r in report if r["calibration"] == "whitened"}
    if structure == "svd":
        assert whitened == {r["name"] for r in report}
    else:  # 52 rows: the 128-input mlp.c_proj is whitened instead of refined by ALS
        assert whitened == {"transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"}
        assert {r["calibration"] for r in report} == {"als", "whitened"}
    head = grouped.base_model.get_output_embeddings()
    assert head.embedding is grouped.base_model.get_input_embeddings()
    with torch.no_grad():
        assert torch.equal(grouped(input_ids=ids).logits, one_pass(input_ids=ids).logits)


@pytest.mark.parametrize("model_type", ["gpt2-tt-override", "t5", "mpo-budget"])
def test_groups_give_the_one_pass_result_with_overrides_encoder_decoders_and_als(
        model_type, monkeypatch):
    """A factorized (TT) override, T5's shared embedding and cross-attention, and a model
    budget over ALS-fitted MPOs, whose output spectra take a round of passes of their own."""
    from transformers import T5Config, T5ForConditionalGeneration
    ids = torch.randint(1, 97, (3, 10), generator=torch.Generator().manual_seed(6))

    def build():
        if model_type != "t5":
            return _tiny_gpt2()
        torch.manual_seed(0)
        return T5ForConditionalGeneration(T5Config(
            vocab_size=97, d_model=32, num_layers=2, num_heads=2, d_ff=48, d_kv=16,
            decoder_start_token_id=0)).eval()

    settings = {"targets": ["all-linear", "embeddings"], "structure": "svd", "n": 3,
                "ratio": 0.5, "calibrate_embeddings": True, "progress": False,
                "calibration": [{"input_ids": ids}]}
    if model_type == "gpt2-tt-override":
        settings["overrides"] = {"attn.c_attn": {"method": "tt", "structure": "mpo", "n": 2}}
    if model_type == "mpo-budget":
        settings.update(structure="mpo", budget="model", targets=["all-linear"])
    one_pass = mpotn.compress(build(), **settings)
    passes = _counting_calibrate(monkeypatch)
    grouped = mpotn.compress(build(), calibration_memory=9000, **settings)
    report = list(grouped.report())
    assert json.dumps(report) == json.dumps(list(one_pass.report()))  # NaN as NaN
    assert len(passes) > 2
    if model_type == "mpo-budget":  # a round of passes for the ALS fits' output spectra
        budget_passes = len(passes)
        mpotn.compress(build(), calibration_memory=9000, **{**settings, "budget": "matrix"})
        assert budget_passes == 2 * (len(passes) - budget_passes)
    if model_type == "gpt2-tt-override":
        assert {r["method"] for r in report if "c_attn" in r["name"]} == {"tt"}
    decoder = {"decoder_input_ids": ids} if model_type == "t5" else {}
    with torch.no_grad():
        assert torch.equal(grouped(input_ids=ids, **decoder).logits,
                           one_pass(input_ids=ids, **decoder).logits)


def test_a_model_budget_in_groups_is_the_one_pass_budget():
    """Above the memory a first round of passes reads the spectra for the one budget, a
    second fits: the same allocation and layers as one pass (an uncalibrated embedding in
    the budget too)."""
    ids = torch.randint(1, 97, (3, 10), generator=torch.Generator().manual_seed(5))
    batches = [{"input_ids": ids}]
    settings = {"targets": ["all-linear", "embeddings"], "structure": "svd", "n": 3,
                "ratio": 0.4, "budget": "model", "progress": False}
    uncalibrated = (r"weighs the calibrated matrices' output errors against the weight errors "
                    r"of 2 uncalibrated ones \(transformer.wte, transformer.wpe\).* pass "
                    r"calibrate_embeddings=True")
    with pytest.warns(UserWarning, match=uncalibrated):
        one_pass = mpotn.compress(_tiny_gpt2(), calibration=batches, **settings)
    with pytest.warns(UserWarning, match=uncalibrated):
        grouped = mpotn.compress(_tiny_gpt2(), calibration=batches, calibration_memory=9000,
                                 **settings)
    assert list(grouped.report()) == list(one_pass.report())
    bonds = {r["bond_dims"] for r in grouped.report() if r["type"] == "ffn_in"}
    assert grouped.totals()["total_params"] == one_pass.totals()["total_params"]
    assert len(bonds) == 2  # the budget is spent unevenly over the layers
    with torch.no_grad():
        assert torch.equal(grouped(input_ids=ids).logits, one_pass(input_ids=ids).logits)


def _counting_calibrate(monkeypatch) -> list[int]:
    """Count the whole-model calibration passes compress makes (one list entry each)."""
    import importlib
    module = importlib.import_module("mpotn.compression.compress")
    passes = []
    monkeypatch.setattr(module, "calibrate", lambda *a, **k: passes.append(1) or calibrate(
        *a, **k))
    return passes


def test_sequential_fit_above_the_memory_warns_and_makes_one_pass(monkeypatch):
    batches = [{"input_ids": torch.randint(1, 97, (2, 8))}]
    passes = _counting_calibrate(monkeypatch)
    with pytest.warns(UserWarning, match=r"sequential=True needs the input moments of all 8 "
                                         r"calibrated matrices at once, 0\.0 GiB"):
        mpotn.compress(_tiny_gpt2(), targets=["all-linear"], structure="svd", ratio=0.4,
                       sequential=True, calibration=batches, calibration_memory=1000,
                       progress=False)
    assert len(passes) == 1
    with pytest.raises(ValueError, match="calibration_memory must be a number of bytes > 0"):
        mpotn.compress(_tiny_gpt2(), calibration=batches, calibration_memory=0)


@pytest.mark.parametrize("memory", [None, 9000])
def test_a_floored_ratio_is_one_warning_at_the_users_call(memory):
    import warnings
    batches = [{"input_ids": torch.randint(1, 97, (2, 8))}]
    limit = {} if memory is None else {"calibration_memory": memory}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mpotn.compress(_tiny_gpt2(), targets=["attention", "ffn"], structure="svd", ratio=0.02,
                       calibration=batches, progress=False, **limit)
    floored = [w for w in caught if "cannot reach their ratio" in str(w.message)]
    assert len(floored) == 1 and floored[0].filename == __file__
    assert str(floored[0].message).startswith("8 matrices cannot reach their ratio")


@pytest.mark.parametrize("structure", ["svd", "mpo"])
def test_a_calibrated_fit_reports_the_entropy_of_the_original_matrix(structure):
    model, batches = toy_model_and_inputs()
    plain_model, _ = toy_model_and_inputs()
    options = {"targets": ["inner.0", "inner.2"], "structure": structure, "ratio": 0.4,
               "progress": False, **({"n": 3, "fit": "whiten"} if structure == "mpo" else {})}
    calibrated = mpotn.compress(Wrapper(model), calibration=batches, **options)
    plain = mpotn.compress(Wrapper(plain_model), **options)
    ours, theirs = calibrated.report(), plain.report()
    assert [r["calibration"] for r in ours] == ["whitened", "whitened"]
    assert [r["central_entropy"] for r in ours] == pytest.approx(
        [r["central_entropy"] for r in theirs], rel=1e-9)


def test_a_kronecker_whitened_fit_reports_how_much_of_c_its_factors_keep():
    """SPEC §7: the share of ``||C||^2`` kept by ``C_1 (x) ... (x) C_n``, per matrix; 1 for
    a ``C`` that is a Kronecker product, absent for the SVD's exact whitening."""
    from mpotn.analysis.reports import report_table
    from mpotn.calibration import kronecker_factors
    from mpotn.shapes import Factorization

    model, batches = toy_model_and_inputs()
    compressed = mpotn.compress(Wrapper(model), targets=["inner.0"], n=3, ratio=0.4,
                                fit="whiten", calibration=batches, progress=False)
    [row] = compressed.report()
    covariance = sum(b["input"].double().T @ b["input"].double() for b in batches)
    row_shape = tuple(int(f) for f in row["factorization"].split(" x ")[0].split("·"))
    expected = kronecker_factors(covariance, Factorization(24, row_shape)).kept
    assert 0 < row["kronecker_kept"] < 1 and row["kronecker_kept"] == pytest.approx(expected)
    assert "C kept by C_1 x ... x C_n" in report_table(compressed)
    svd = mpotn.compress(Wrapper(toy_model_and_inputs()[0]), targets=["inner.0"], ratio=0.4,
                         structure="svd", calibration=batches, progress=False)
    assert svd.report()[0]["kronecker_kept"] is None
    assert "C kept by" not in report_table(svd)


def test_als_falls_back_to_whitening_for_a_matrix_with_fewer_calibration_rows_than_inputs():
    """ALS on a singular C fits the calibration rows, not the layer: such a matrix is
    whitened instead, with a warning naming it; one with enough rows keeps ALS."""
    model, batches = toy_model_and_inputs()
    few = [{"input": batches[0]["input"][:20]}]  # 20 rows: < 24 and < 32 inputs
    settings = {"targets": ["inner.0", "inner.2"], "n": 2, "ratio": 0.4, "fit": "als",
                "progress": False}
    with pytest.warns(UserWarning, match=r"2 matrices saw fewer calibration rows than they "
                                         r"have inputs.*inner\.0, inner\.2"):
        refitted = mpotn.compress(Wrapper(copy.deepcopy(model)), calibration=few, **settings)
    assert {r["calibration"] for r in refitted.report()} == {"whitened"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # 256 rows: no fallback, no warning
        kept = mpotn.compress(Wrapper(copy.deepcopy(model)), calibration=batches, **settings)
    assert {r["calibration"] for r in kept.report()} == {"als"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an SVD is whitened anyway: no warning
        svd = mpotn.compress(Wrapper(copy.deepcopy(model)), calibration=few,
                             **{**settings, "structure": "svd"})
    assert {r["calibration"] for r in svd.report()} == {"whitened"}


@pytest.mark.parametrize("structure", ["svd", "auto"])
def test_a_one_pass_model_budget_holds_decompositions_only_within_the_memory(
        structure, monkeypatch):
    """budget="model" decomposes every target to read its spectra; it keeps for the fits
    only the decompositions that fit calibration_memory (above the moments here: one
    pass) and decomposes the rest again: the same model, the same structures chosen."""
    import importlib
    module = importlib.import_module("mpotn.compression.compress")
    ids = torch.randint(1, 97, (4, 40), generator=torch.Generator().manual_seed(7))
    settings = {"targets": ["all-linear"], "structure": structure, "n": 3, "ratio": 0.4,
                "budget": "model", "progress": False, "calibration": [{"input_ids": ids}]}
    decomposed = []
    options = module._options
    monkeypatch.setattr(module, "_options",
                        lambda t: decomposed.append(t.name) or options(t))
    held = mpotn.compress(_tiny_gpt2(), **settings)
    assert len(decomposed) == 8  # 8 blocks (the head is the tied embedding's), each once
    moments = 8 * (6 * 32 * 32 + 2 * 128 * 128)  # one pass: above all the moments
    decomposed.clear()
    bounded = mpotn.compress(_tiny_gpt2(), calibration_memory=moments, **settings)
    assert 8 < len(decomposed) < 16  # some held, the others decomposed again
    grouped = mpotn.compress(_tiny_gpt2(), calibration_memory=9000, **settings)
    for other in (bounded, grouped):  # groups drop the unreachable structures alike
        assert json.dumps(list(other.report())) == json.dumps(list(held.report()))
        with torch.no_grad():
            assert torch.equal(other(input_ids=ids).logits, held(input_ids=ids).logits)


def test_an_als_fit_of_an_embedding_gives_unused_tokens_their_damped_weight(monkeypatch):
    import importlib

    compressing = importlib.import_module("mpotn.compression.compress")

    torch.manual_seed(0)
    vocab, width = 512, 32

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, width)
            with torch.no_grad():
                self.emb.weight.copy_(torch.randn(vocab, 8) @ torch.randn(8, width)
                                      + 0.5 * torch.randn(vocab, width))

        def forward(self, input_ids, attention_mask=None):
            return self.emb(input_ids)

    used = torch.randperm(vocab, generator=torch.Generator().manual_seed(1))[:100]
    batches = [{"input_ids": used[torch.randint(0, 100, (8, 16))],
                "attention_mask": torch.ones(8, 16, dtype=torch.long)} for _ in range(2)]
    given = []
    refine = compressing.refine
    monkeypatch.setattr(compressing, "refine",
                        lambda mpo, m, c, **k: given.append(c.clone()) or refine(mpo, m, c, **k))
    mpotn.compress(Net(), targets=["emb"], structure="mpo", n=3, ratio=0.3, fit="als",
             calibrate_embeddings=True, calibration=batches, progress=False)
    [counts] = given
    seen = torch.bincount(torch.cat([b["input_ids"].reshape(-1) for b in batches]),
                          minlength=vocab).double()
    # counts + damp * mean count: 256 tokens over 512 rows, damp 1e-2 (0 before)
    torch.testing.assert_close(counts, seen + 1e-2 * 256 / 512)
