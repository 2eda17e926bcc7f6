"""LPAF's factorization and training stages: the sparsity-aware SVD, factorize_pruned
and mixed-rank fine-tuning, and the three stages end to end."""

import itertools

import pytest
import torch
from torch import nn

from mpotn.compression.lpaf import factorize_pruned
from mpotn.data import sst2_sample
from mpotn.finetune.mixed_rank import MixedRank
from mpotn.finetune.pruning import GradualPruning
from mpotn.finetune.training import TrainingConfig, finetune, prepare_model
from mpotn.layers import MPOLinear
from mpotn.linalg import sparsity_aware_svd, truncated_svd


def low_rank_with_mask(rows=40, cols=30, rank=3, pruned=0.4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    matrix = (torch.randn(rows, rank, generator=generator, dtype=torch.float64)
              @ torch.randn(rank, cols, generator=generator, dtype=torch.float64))
    mask = torch.rand(rows, cols, generator=generator) >= pruned
    return matrix, mask


def test_the_masked_error_never_rises_and_a_low_rank_matrix_is_recovered_from_its_kept_entries():
    matrix, mask = low_rank_with_mask()
    cut, errors = sparsity_aware_svd(matrix * mask, mask, 3, iterations=2000, rtol=1e-12)
    assert all(b <= a + 1e-10 for a, b in itertools.pairwise(errors))  # rounding at 1e-13
    assert errors[0] > 0.25 * float(matrix.norm())  # the plain SVD fits the zeros too
    recovered = (cut.U * cut.S) @ cut.Vh
    assert float(cut.error) == pytest.approx(errors[-1])
    assert float((recovered - matrix).norm() / matrix.norm()) < 1e-4  # the pruned ones too


def test_no_iteration_is_the_plain_truncated_svd_of_the_pruned_matrix():
    matrix, mask = low_rank_with_mask(rank=8)
    pruned = matrix * mask
    cut, errors = sparsity_aware_svd(pruned, mask, 4, iterations=0)
    plain = truncated_svd(pruned, 4, method="full")
    torch.testing.assert_close((cut.U * cut.S) @ cut.Vh, (plain.U * plain.S) @ plain.Vh)
    assert len(errors) == 1


def test_with_nothing_pruned_it_is_the_truncated_svd():
    matrix, _ = low_rank_with_mask(rank=8)
    everything = torch.ones_like(matrix, dtype=torch.bool)
    cut, errors = sparsity_aware_svd(matrix, everything, 4)
    assert len(errors) == 2 and errors[1] == pytest.approx(errors[0])  # one fill, no change
    assert float(cut.error) == pytest.approx(float(truncated_svd(matrix, 4, "full").error))


@pytest.mark.parametrize("mask", [torch.ones(3, 4, dtype=torch.bool), torch.ones(4, 3)])
def test_a_mask_of_another_shape_or_type_is_refused(mask):
    with pytest.raises(ValueError, match="boolean tensor of the matrix's shape"):
        sparsity_aware_svd(torch.randn(4, 3), mask, 2)


def pruned_bert(sparsity=0.5):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64))
    with torch.no_grad():
        for layer in bert.encoder.layer:
            for m in (layer.intermediate.dense, layer.output.dense):
                m.weight[m.weight.abs() < m.weight.abs().quantile(sparsity)] = 0
    return bert


def test_factorize_pruned_holds_the_fitted_factors_exactly_and_reports_the_pruned_matrix():
    bert = pruned_bert()
    before = {n: m.weight.detach().clone() for n, m in bert.named_modules()
              if n.endswith(("intermediate.dense", "output.dense")) and "attention" not in n}
    model, pruned = factorize_pruned(bert, 0.3, targets=["ffn"], fit="sparsity-aware",
                                     iterations=200, progress=False)
    assert set(pruned) == set(before) == {r["name"] for r in model.report()}
    for record in model.report():
        name = record["name"]
        assert torch.equal(pruned[name], before[name])
        layer = model.base_model.get_submodule(name)
        assert isinstance(layer, MPOLinear) and len(layer.cores) == 2
        rank = layer.bond_dims[1]
        a = before[name].T.double()  # in x out
        mask = a != 0
        assert rank * sum(a.shape) <= 0.3 * a.numel() < (rank + 1) * sum(a.shape)
        cut, _ = sparsity_aware_svd(a, mask, rank, iterations=200)
        fitted = (cut.U * cut.S) @ cut.Vh
        torch.testing.assert_close(layer.matrix().double(), fitted, rtol=0, atol=1e-5)
        assert record["relative_error"] == pytest.approx(
            float((a - fitted).norm() / a.norm()), rel=1e-6)  # the layer holds float32
        assert record["kept_error"] < record["plain_kept_error"]
        assert record["sparsity"] == pytest.approx(0.5, abs=0.01)
        assert record["params"] == rank * sum(a.shape)
        assert record["calibration"] == "sparsity-aware"


def test_the_plain_fit_is_the_truncated_svd_of_the_pruned_matrix():
    model, pruned = factorize_pruned(pruned_bert(), 0.3, targets=["ffn"], progress=False)
    for record in model.report():
        assert record["kept_error"] == pytest.approx(record["plain_kept_error"], rel=1e-5)
        a = pruned[record["name"]].T.double()
        best = truncated_svd(a, int(record["bond_dims"]), "full").error / a.norm()
        assert record["relative_error"] == pytest.approx(float(best), rel=1e-5)
        assert record["calibration"] == "none"


def test_the_whitened_fit_keeps_the_pruned_models_outputs_better_than_the_others():
    """On the inputs it is calibrated on, the whitened SVD has the lowest output error of
    the three fits (SVD-LLM's optimum); the sparsity-aware fit, which leaves the pruned
    entries free, has the highest."""
    import copy

    from mpotn.calibration import output_error
    from mpotn.compression.calibrate import calibrate

    bert = pruned_bert()
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 97, (8, 12), generator=generator),
                "attention_mask": torch.ones(8, 12, dtype=torch.long)} for _ in range(4)]
    names = [n for n, m in bert.named_modules() if n.endswith("intermediate.dense")]
    covariances = calibrate(bert, batches, {n: bert.get_submodule(n) for n in names})
    errors = {}
    for fit in ("whitened", "plain", "sparsity-aware"):
        model, pruned = factorize_pruned(copy.deepcopy(bert), 0.3, targets=["ffn"], fit=fit,
                                         calibration=batches if fit == "whitened" else None,
                                         progress=False)
        errors[fit] = [output_error(pruned[n].T.double(),
                                    model.base_model.get_submodule(n).matrix().double(),
                                    covariances[n].covariance) for n in names]
        if fit == "whitened":
            assert [r["output_error"] for r in model.report() if r["name"] in names] == \
                pytest.approx(errors[fit], rel=1e-4)
    for k in range(len(names)):
        assert errors["whitened"][k] < errors["plain"][k] < errors["sparsity-aware"][k]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"fit": "exact"}, "unknown fit"),
    ({"fit": "whitened"}, "needs calibration batches"),
    ({"fit": "plain", "calibration": [{}]}, "needs calibration batches"),
])
def test_factorize_pruned_refuses_a_fit_without_what_it_needs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        factorize_pruned(pruned_bert(), 0.3, targets=["ffn"], progress=False, **kwargs)


def test_factorize_pruned_leaves_embeddings_and_other_matrices_alone():
    bert = pruned_bert()
    embedding = bert.embeddings.word_embeddings.weight.detach().clone()
    model, pruned = factorize_pruned(bert, 0.3, targets=["ffn", "embeddings"],
                                     progress=False)
    assert len(pruned) == 4 and {r["name"] for r in model.report()} == set(pruned)
    assert type(model.base_model.embeddings.word_embeddings) is nn.Embedding
    assert torch.equal(model.base_model.embeddings.word_embeddings.weight, embedding)


def test_an_unreachable_ratio_cuts_to_rank_one_as_compress_does():
    bert = pruned_bert()
    with pytest.warns(UserWarning, match="cut to bonds of 1"):
        model, _ = factorize_pruned(bert, 0.001, targets=["ffn"], progress=False)
    assert {r["bond_dims"] for r in model.report()} == {"1"}


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_factorize_pruned_refuses_a_ratio_outside_zero_one(ratio):
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        factorize_pruned(pruned_bert(), ratio, targets=["ffn"], progress=False)


def factorized_mlp():
    from mpotn.compression import compress

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    dense = {k: model[int(k)].weight.detach().clone() for k in ("0", "2")}
    return compress(model, targets="0|2", structure="svd", ratio=0.5, progress=False), dense


def test_a_full_rank_step_computes_with_the_dense_matrices_and_trains_only_the_biases():
    model, dense = factorized_mlp()
    mixing = MixedRank(model, dense, p=1.0, anneal=0.5)
    x = torch.randn(5, 6)
    assert mixing.step(0, 4) == 1.0 and mixing.full_rank == ["0", "2"]
    base = model.base_model
    expected = torch.tanh(x @ dense["0"].T + base[0].bias) @ dense["2"].T + base[2].bias
    out = model(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert all(c.grad is None for c in base[0].cores) and base[0].bias.grad is not None
    model.eval()  # evaluation always uses the factors
    factorized = base[2](torch.tanh(base[0](x)))
    torch.testing.assert_close(model(x), factorized)
    model.train()
    assert mixing.step(2, 4) == 0.0 and mixing.full_rank == []  # annealed after 2 of 4
    torch.testing.assert_close(model(x), factorized)
    mixing.close()


def test_the_choices_depend_only_on_the_seed_and_the_step():
    model, dense = factorized_mlp()
    mixing = MixedRank(model, dense, p=0.5, anneal=1.0, seed=3)
    drawn = {}
    for step in range(40):
        mixing.step(step, 100)
        drawn[step] = list(mixing.full_rank)
    assert 0 < sum(len(v) for v in drawn.values()) < 80  # some layers swapped, not all
    for step in (31, 4, 17):  # drawn again in another order, as a resumed run does
        mixing.step(step, 100)
        assert mixing.full_rank == drawn[step]
    mixing.close()
    other = MixedRank(model, dense, p=0.5, anneal=1.0, seed=4)
    differs = []
    for step in range(40):
        other.step(step, 100)
        differs.append(other.full_rank != drawn[step])
    assert any(differs)  # another seed, other choices
    other.close()


def test_the_full_rank_matrices_are_buffers_that_move_with_the_model_and_are_freed():
    model, dense = factorized_mlp()
    before = set(model.base_model.state_dict())
    mixing = MixedRank(model, dense, p=1.0, anneal=0.5)
    layer = model.base_model[0]
    assert torch.equal(layer.mixed_rank_dense, dense["0"])
    assert set(model.base_model.state_dict()) == before  # not saved, not counted
    model.double()
    mixing.step(0, 10)
    x = torch.randn(3, 6, dtype=torch.float64)
    assert layer.mixed_rank_dense.dtype == torch.float64 and model(x).dtype == torch.float64
    mixing.step(5, 10)  # annealed to 0: the matrices are freed
    assert not hasattr(layer, "mixed_rank_dense")
    mixing.close()


def test_mixed_rank_refuses_what_it_cannot_swap():
    model, dense = factorized_mlp()
    with pytest.raises(ValueError, match="not an MPO linear layer"):
        MixedRank(model, {"1": dense["0"]})
    with pytest.raises(ValueError, match="a full-rank weight of shape"):
        MixedRank(model, {"0": dense["2"]})
    with pytest.raises(ValueError, match="0 <= p <= 1"):
        MixedRank(model, dense, p=1.5)
    with pytest.raises(ValueError, match="'3' is not a module of the model"):
        MixedRank(model, {"3": dense["0"]})


def test_mixed_rank_takes_the_module_an_mpo_model_wraps_too(tiny_bert):
    """A transformers model's own ``base_model`` is its backbone: the module itself is
    what the weights' names are relative to."""
    from mpotn.compression import compress
    from mpotn.compression.models import load_classifier

    model = compress(load_classifier(str(tiny_bert)), targets=["ffn"], structure="svd",
                     ratio=0.5, progress=False)
    name, layer = next(iter(model.mpo_layers().items()))
    dense = {name: layer.weight.detach().clone()}
    for given in (model, model.base_model):
        mixing = MixedRank(given, dense, p=1.0)
        assert mixing.layers == {name: layer}
        # not broadcast by DistributedDataParallel: a name of the module it wraps
        ignored = model.base_model._ddp_params_and_buffers_to_ignore
        assert ignored == [f"{name}.mixed_rank_dense"]
        assert ignored[0] in dict(model.base_model.named_buffers())
        mixing.close()
        assert not hasattr(model.base_model, "_ddp_params_and_buffers_to_ignore")


def test_prune_factorize_and_mixed_rank_fine_tuning_end_to_end(tiny_bert):
    data = sst2_sample()
    config = TrainingConfig(strategy="full", max_steps=4, batch_size=8, train_limit=32,
                            eval_limit=16)
    model, tokenizer = prepare_model(tiny_bert, data, config, progress=False)
    pruning = GradualPruning(model, 0.5, warmup=0.25, cooldown=0.25)
    finetune(model, tokenizer, data, config, progress=False, pruning=pruning)
    dense_params = sum(p.numel() for p in model.parameters())
    compressed, pruned = factorize_pruned(model, 0.4, fit="sparsity-aware", iterations=20,
                                          progress=False)
    matrices = sum(w.numel() for w in pruned.values())
    assert len(pruned) == 12 and compressed.totals()["total_params"] == pytest.approx(
        dense_params - 0.6 * matrices, rel=0.01)  # each matrix at 0.4 of its size, or less
    mixing = MixedRank(compressed, pruned, p=0.5, anneal=0.5)
    record = finetune(compressed, tokenizer, data, config, progress=False,
                      mixed_rank=mixing).record
    assert record["mixed_rank_p"] == 0.5 and len(record["mixed_rank_layers"]) == 12
    assert record["steps"] == 4 and 0 <= record["accuracy"] <= 1
    assert mixing.full_rank == [] and not mixing._hooks  # closed: the factors alone


def test_the_cli_prunes_in_one_run_and_factorizes_its_model_in_a_second(tiny_bert, tmp_path,
                                                                       capsys):
    import json

    import mpotn
    from mpotn.cli import main

    common = ["--max-steps", "4", "--batch-size", "8", "--train-limit", "32",
              "--eval-limit", "16", "--no-progress"]
    assert main(["finetune", str(tiny_bert), "--strategy", "full", "--prune", "0.6",
                 *common, "--out", str(tmp_path / "pruned")]) == 0
    pruned = json.loads((tmp_path / "pruned" / "metrics.json").read_text())
    assert pruned["criterion"] == "movement" and pruned["sparsity"] == pytest.approx(0.6, 1e-3)
    assert main(["finetune", str(tmp_path / "pruned" / "model"), "--strategy", "full",
                 "--factorize", "0.4", "--calibration-samples", "32", *common,
                 "--out", str(tmp_path / "lpaf")]) == 0
    record = json.loads((tmp_path / "lpaf" / "metrics.json").read_text())
    assert record["mixed_rank_p"] == 0.5 and len(record["mixed_rank_layers"]) == 12
    model = mpotn.load(tmp_path / "lpaf" / "model")
    assert {r["calibration"] for r in model.report()} == {"whitened"}
    assert all(r["output_error"] < 1 for r in model.report())
    assert all(len(layer.cores) == 2 for layer in model.mpo_layers().values())
    out = capsys.readouterr().out
    assert "pruned_matrices" not in out and "mixed_rank_layers" not in out  # lists: in the JSON
    assert " sparsity |" in out and " mixed_rank_p |" in out


@pytest.mark.parametrize(("flags", "message"), [
    (["--prune", "0.5", "--strategy", "lfa"], "--prune prunes a dense model"),
    (["--prune", "0.5", "--strategy", "full", "--factorize", "0.3"], "second run"),
    (["--factorize", "0.3", "--strategy", "full", "--ratio", "0.5"], "drop --compress"),
    (["--factorize", "0.3", "--strategy", "lora"], "--strategy full or lfa"),
    (["--prune-criterion", "magnitude"], "give --prune too"),
    (["--mixed-rank", "0"], "--mixed-rank shape --factorize: give --factorize too"),
    (["--ssvd-iterations", "3"], "give --factorize too"),
    (["--factorize", "0.3", "--ssvd-iterations", "3"], "counts the fills of --factorize-fit"),
    (["--factorize", "0.3", "--factorize-fit", "plain", "--calibration-samples", "8"],
     "feeds --factorize-fit whitened"),
])
def test_the_cli_refuses_lpaf_flags_that_do_not_go_together(tmp_path, capsys, flags, message):
    from mpotn.cli import main

    assert main(["finetune", *flags, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_cli_refuses_to_prune_a_compressed_save_and_says_to_give_the_dense_model(
        tmp_path, capsys):
    from mpotn.cli import main
    from mpotn.compression.serialization import CONFIG_NAME

    saved = tmp_path / "compressed"
    saved.mkdir()
    (saved / CONFIG_NAME).write_text("{}")  # what marks an mpotn save; nothing else is read
    assert main(["finetune", str(saved), "--strategy", "full", "--prune", "0.5",
                 "--out", str(tmp_path / "run")]) == 2
    assert (f"--prune prunes a dense model, and {saved} is an mpotn save (compressed): give "
            "the dense model it came from") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--prune", "1", "must be a share in (0, 1), got '1'"),
    ("--factorize", "0", "must be a share in (0, 1), got '0'"),
    ("--mixed-rank", "1.5", "must be a share in [0, 1], got '1.5'"),
    ("--ssvd-iterations", "-1", "must be an integer >= 0, got '-1'"),
])
def test_the_cli_refuses_lpaf_values_out_of_range(capsys, flag, value, message):
    from mpotn.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["finetune", flag, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_factorize_pruned_refuses_a_compressed_model_before_changing_it():
    model, _ = factorize_pruned(pruned_bert(), 0.3, targets=["ffn"], progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="this model is already compressed"):
        factorize_pruned(model, 0.3, targets=["ffn"], progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_gpt2_conv1d_layers_are_pruned_factorized_and_swapped_in_their_orientation():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50,
                                       n_positions=16)).eval()
    x = torch.randint(0, 50, (2, 8))
    pruning = GradualPruning(model, 0.5, "magnitude", warmup=0.0, cooldown=0.5)
    assert len(pruning.modules) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per layer
    pruning.step(9, 10)
    with torch.no_grad():
        masked = model(x).logits
        pruning.finalize()
        dense = model(x).logits
    torch.testing.assert_close(dense, masked)
    c_attn = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # in x out
    compressed, pruned = factorize_pruned(model, 0.9, progress=False)
    assert torch.equal(pruned["transformer.h.0.attn.c_attn"], c_attn.T)
    assert all(r["relative_error"] < 1 for r in compressed.report())
    mixing = MixedRank(compressed, pruned, p=1.0)
    mixing.step(0, 10)
    compressed.train()
    for module in compressed.modules():  # no dropout: compare the functions
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        torch.testing.assert_close(compressed(x).logits, dense, rtol=1e-4, atol=1e-4)
    mixing.close()
