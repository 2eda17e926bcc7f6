"""Gradual pruning while fine-tuning (LPAF's first stage): movement scores, the cubic
schedule, exact sparsity, finalize, and the Trainer path."""

import itertools

import pytest
import torch
from torch import nn

from mpotn.data import sst2_sample
from mpotn.finetune.pruning import GradualPruning, PruningMask, cubic_sparsity, pruning_summary
from mpotn.finetune.strategies import optimizer_groups
from mpotn.finetune.training import TrainingConfig, finetune, prepare_model


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()


def test_cubic_schedule_starts_after_the_warmup_and_reaches_the_target_at_the_cooldown():
    values = [cubic_sparsity(t, 100, 0.9, warmup=0.1, cooldown=0.2) for t in range(100)]
    assert values[:11] == [0.0] * 11  # warm-up steps and the schedule's first step
    assert values[80:] == [0.9] * 20  # cool-down: the mask stays fixed
    assert all(a < b for a, b in itertools.pairwise(values[10:81]))
    t = 40  # s_f + (s_i - s_f)(1 - (t - t_w)/(T - t_w - t_c))^3
    assert values[t] == pytest.approx(0.9 * (1 - (1 - (t - 10) / 70) ** 3))


def test_movement_scores_accumulate_minus_gradient_times_weight_under_sgd():
    model = mlp()
    pruning = GradualPruning(model, 0.5, targets="0|2", warmup=0.2, cooldown=0.3)
    weights = dict(model.named_parameters())
    originals = [weights[f"{k}.parametrizations.weight.original"] for k in (0, 2)]
    masks = [model[k].parametrizations.weight[0] for k in (0, 2)]
    lr = 0.1
    optimizer = torch.optim.SGD(pruning.scores(), lr=lr)
    expected = [torch.zeros_like(w) for w in originals]
    x, y = torch.randn(32, 6, dtype=torch.double), torch.randn(32, 3, dtype=torch.double)
    for t in range(7):  # warm-up, then masks that prune more at every step
        pruning.step(t, 10)
        model.zero_grad()
        effective = [(w * m.mask).detach().requires_grad_(True)
                     for w, m in zip(originals, masks, strict=True)]
        hidden = torch.tanh(x @ effective[0].T + model[0].bias)
        loss = ((hidden @ effective[1].T + model[2].bias - y) ** 2).mean()
        grads = torch.autograd.grad(loss, effective)  # dL/dW', pruned entries included
        for k, (w, g) in enumerate(zip(originals, grads, strict=True)):
            expected[k] -= lr * g * w.detach()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
    assert 0 < int((~masks[0].mask).sum()) < 60  # the last steps ran with a partial mask
    for score, want in zip(pruning.scores(), expected, strict=True):
        assert score.dtype == torch.float32  # whatever the weight's dtype
        torch.testing.assert_close(score.detach(), want.float(), rtol=1e-5, atol=1e-7)


def test_the_cooldown_fixes_the_masks_and_stops_the_scores():
    model = mlp()
    pruning = GradualPruning(model, 0.6, targets="0|2", warmup=0.0, cooldown=0.4)
    optimizer = torch.optim.Adam(pruning.scores(), lr=0.1)
    mask = model[0].parametrizations.weight[0]
    x = torch.randn(16, 6, dtype=torch.double)
    for t in range(10):
        pruning.step(t, 10)
        if t == 6:  # the first cool-down step: the final sparsity, then nothing moves
            fixed_mask, fixed_scores = mask.mask.clone(), mask.scores.detach().clone()
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert bool(mask.fixed) and torch.equal(mask.mask, fixed_mask)
    assert torch.equal(mask.scores.detach(), fixed_scores)
    assert int((~fixed_mask).sum()) == 36  # 0.6 of 60 entries


@pytest.mark.parametrize("total", [1, 3, 10])
def test_the_last_step_reaches_the_final_sparsity_without_a_cooldown(total):
    assert cubic_sparsity(total - 1, total, 0.9, warmup=0.0, cooldown=0.0) == 0.9


@pytest.mark.parametrize(("warmup", "cooldown", "total"), [(0.8, 0.15, 2), (0.6, 0.0, 1)])
def test_the_last_step_reaches_the_final_sparsity_when_the_rounded_warmup_reaches_it(
        warmup, cooldown, total):
    pruning = GradualPruning(mlp(), 0.5, targets="0|2", criterion="magnitude", warmup=warmup,
                             cooldown=cooldown)
    assert [pruning.step(t, total) for t in range(total)][-1] == 0.5
    assert int((~pruning.modules["0"].parametrizations.weight[0].mask).sum()) == 30  # of 60


def test_each_matrix_keeps_exactly_its_top_scored_entries_and_finalize_writes_them():
    model = mlp()
    pruning = GradualPruning(model, 0.7, targets="0|2", warmup=0.0, cooldown=0.5)
    torch.manual_seed(1)
    for score in pruning.scores():
        score.data.copy_(torch.randn_like(score))
    assert pruning.step(5, 10) == 0.7  # the cool-down: the final sparsity
    first = model[0].parametrizations.weight
    keep = round(0.3 * 60)
    top = torch.topk(first[0].scores.flatten(), keep).indices
    assert int(first[0].mask.sum()) == keep and bool(first[0].mask.flatten()[top].all())
    x = torch.randn(5, 6, dtype=torch.double)
    with torch.no_grad():
        before = model(x)
        masked = first.original * first[0].mask
    rows = pruning.finalize()
    assert not any(isinstance(m, PruningMask) for m in model.modules())
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert torch.equal(model[0].weight.detach(), masked)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert [r["sparsity"] for r in rows] == [1 - keep / 60, 1 - round(0.3 * 30) / 30]
    assert all(1 <= r["rank"] <= min(r["shape"]) for r in rows)
    summary = pruning_summary(rows)
    assert summary["sparsity"] == pytest.approx((60 - keep + 30 - 9) / 90)


def test_magnitude_criterion_keeps_the_largest_weights():
    model = mlp()
    pruning = GradualPruning(model, 0.5, "magnitude", targets="0", warmup=0.0, cooldown=0.5)
    assert pruning.scores() == []
    weight = model[0].parametrizations.weight.original.detach().clone()
    pruning.step(9, 10)
    rows = pruning.finalize()
    kept = model[0].weight.detach() != 0
    assert int(kept.sum()) == 30 and rows[0]["sparsity"] == 0.5
    assert weight.abs()[kept].min() >= weight.abs()[~kept].max()


def test_scores_get_their_own_optimizer_group_without_weight_decay():
    model = mlp()
    pruning = GradualPruning(model, 0.5, targets="0|2")
    groups = {g["name"]: g for g in optimizer_groups(model, 1e-3, weight_decay=0.01,
                                                     scores=pruning.scores())}
    assert groups["scores"]["weight_decay"] == 0.0 and groups["other"]["weight_decay"] == 0.01
    assert len(groups["scores"]["params"]) == 2 and len(groups["other"]["params"]) == 2
    assert groups["no_decay"]["weight_decay"] == 0.0  # the two biases, as the Trainer has it
    assert {id(p) for p in groups["no_decay"]["params"]} == {id(model[0].bias),
                                                             id(model[2].bias)}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sparsity": 1.0}, "in \\[0, 1\\)"),
    ({"sparsity": 0.5, "criterion": "random"}, "unknown criterion"),
    ({"sparsity": 0.5, "warmup": 0.5, "cooldown": 0.5}, "summing to less than 1"),
    ({"sparsity": 0.5, "targets": "1"}, "match no nn.Linear"),
])
def test_bad_settings_are_refused_with_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradualPruning(mlp(), **{"targets": "0|2", **kwargs})


def test_an_embedding_alone_is_not_pruned():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"select no nn\.Linear or Conv1D layer"):
        GradualPruning(model, 0.5, targets="0")


def test_a_model_being_pruned_refuses_a_second_pruning():
    model = mlp()
    GradualPruning(model, 0.5, targets="0|2")
    with pytest.raises(ValueError, match="already being pruned"):
        GradualPruning(model, 0.5, targets="0|2")


def test_finetune_prunes_to_the_target_sparsity_and_records_the_ranks(tiny_bert):
    data = sst2_sample()
    config = TrainingConfig(strategy="full", max_steps=6, batch_size=8, train_limit=48,
                            eval_limit=16)
    model, tokenizer = prepare_model(tiny_bert, data, config, progress=False)
    pruning = GradualPruning(model, 0.6, warmup=0.2, cooldown=0.3)
    assert len(pruning.modules) == 2 * 6  # attention and FFN matrices of both layers
    record = finetune(model, tokenizer, data, config, progress=False, pruning=pruning).record
    assert record["criterion"] == "movement" and record["steps"] == 6
    assert record["pruned_matrices"] == list(pruning.modules) and len(pruning.modules) == 12
    assert 0 < record["mean_energy_rank_share"] <= record["mean_rank_share"] <= 1
    matrices = 2 * (4 * 32 * 32 + 2 * 32 * 64)  # attention and FFN of both layers
    assert record["score_params"] == matrices  # one score per pruned entry, counted apart
    assert record["trainable_params"] == record["total_params"] == sum(
        p.numel() for p in model.parameters()) == record["original_params"]
    assert record["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert len(record["pruned"]) == 12 and 0 < record["mean_rank_share"] <= 1
    dense = model.bert.encoder.layer[0].intermediate.dense
    assert type(dense) is nn.Linear and float((dense.weight == 0).double().mean()) == \
        pytest.approx(0.6, abs=1e-3)
    assert 0 <= record["accuracy"] <= 1


def test_a_resumed_pruning_run_ends_with_the_weights_of_an_uninterrupted_one(
        tiny_bert, tmp_path, monkeypatch, kill_at_step):
    data = sst2_sample()
    config = TrainingConfig(strategy="full", max_steps=6, batch_size=8, train_limit=48,
                            eval_limit=16)

    def run(out, **kwargs):
        model, tokenizer = prepare_model(tiny_bert, data, config, progress=False)
        pruning = GradualPruning(model, 0.5, warmup=0.2, cooldown=0.3)
        return finetune(model, tokenizer, data, config, progress=False, out=out,
                        save_steps=2, pruning=pruning, **kwargs)

    whole = run(tmp_path / "whole")
    with monkeypatch.context() as patch:
        kill_at_step(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "killed")
    resumed = run(tmp_path / "killed", resume=True)
    assert resumed.record["resumed_from"] == "checkpoint-2"
    ours, theirs = resumed.model.state_dict(), whole.model.state_dict()
    assert ours.keys() == theirs.keys() and all("parametrizations" not in k for k in ours)
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-6
    assert resumed.record["pruned"] == whole.record["pruned"]
    model, tokenizer = prepare_model(tiny_bert, data, config, progress=False)
    other = GradualPruning(model, 0.7, warmup=0.2, cooldown=0.3)
    with pytest.raises(ValueError, match="pruning"):
        finetune(model, tokenizer, data, config, progress=False, out=tmp_path / "killed",
                 resume=True, save_steps=2, pruning=other)


def test_finetune_refuses_pruning_with_a_strategy_that_is_not_full(tiny_bert):
    data = sst2_sample()
    config = TrainingConfig(strategy="last-k", k=1, max_steps=1, batch_size=8, train_limit=8)
    model, tokenizer = prepare_model(tiny_bert, data, config, progress=False)
    with pytest.raises(ValueError, match="strategy 'full', not 'last-k'"):
        finetune(model, tokenizer, data, config, progress=False,
                 pruning=GradualPruning(model, 0.5))


def test_energy_rank_counts_the_singular_values_that_hold_most_of_the_matrix():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.tensor([3.0, 1.0, 1.0, 1.0])))
    pruning = GradualPruning(model, 0.5, "magnitude", targets="0", warmup=0.0, cooldown=0.5)
    rows = pruning.finalize()  # no step taken: nothing pruned
    # the energy kept by 1, 2, 3 values: 9, 10, 11 of 12; 11/12 is the first >= 0.9
    assert rows[0]["rank"] == 4 and rows[0]["energy_rank_share"] == 3 / 4
    with pytest.raises(ValueError, match="finalize\\(\\) runs once"):
        pruning.finalize()
