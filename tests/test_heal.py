"""Healing (SPEC §7): distilling the original tiny BERT into its compressed copy."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import mpotn
from mpotn.cli import main
from mpotn.compression.parameters import lfa_parameters
from mpotn.data.texts import texts
from mpotn.finetune.heal import HealConfig, heal, hidden_state_mse
from mpotn.finetune.strategies import central_parameters


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny model's matrices gain nothing from more (and lose much
    on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tiny_bert):
    """The tiny BERT (teacher), its compressed copy (student) and the tokenizer."""
    from transformers import BertModel

    from mpotn.compression.models import load_tokenizer

    teacher = BertModel.from_pretrained(tiny_bert).eval()
    student = mpotn.compress(copy.deepcopy(teacher), targets=["attention", "ffn"], ratio=0.3,
                             progress=False)
    return teacher, student, load_tokenizer(tiny_bert)


@pytest.fixture(scope="module")
def sentences():
    return texts(samples=96)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_healing_the_auxiliary_tensors_lowers_the_held_out_error(models, sentences):
    teacher, original, tokenizer = models
    student = copy.deepcopy(original)
    student.train()
    for param in student.base_model.embeddings.parameters():
        param.requires_grad_(False)  # a frozen/trainable state the call must give back
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    teacher_before = state(teacher)
    student_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    config = HealConfig(steps=30, batch_size=8, max_length=32, heldout=16)
    result = heal(student, teacher, tokenizer, sentences, config, progress=False)

    assert result.steps == 30 and result.model is student
    assert result.train_texts == 80 and result.heldout_texts == 16
    assert result.mse_after <= 0.8 * result.mse_before  # measured: about 0.5x
    assert len(result.layers_before) == 3  # embeddings and two layers
    assert result.mse_before == pytest.approx(sum(result.layers_before) / 3)
    assert [r["step"] for r in result.history][:2] == [1, 10]
    # only the LFA set moved: central tensors and dense weights are bit-identical
    after = dict(student.named_parameters())
    lfa = {n for n, _ in lfa_parameters(student)}
    centrals = {f"base_model.{n}" for n, _ in central_parameters(student.base_model)}
    assert len(centrals) == 12 and not centrals & lfa
    for name, before in student_before.items():
        if name not in lfa:
            assert torch.equal(after[name], before), name
    assert any(not torch.equal(after[n], student_before[n]) for n in lfa)
    # the teacher is untouched, the student's flags and mode are restored
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training and student.training
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags
    assert hidden_state_mse(original, teacher, tokenizer, sentences[:8]) > 0


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(models, sentences,
                                                                     tmp_path):
    teacher, original, tokenizer = models
    config = HealConfig(steps=6, train="all", batch_size=8, max_length=32, heldout=16,
                        save_steps=3, logging_steps=2)
    whole = heal(copy.deepcopy(original), teacher, tokenizer, sentences, config,
                 out=tmp_path / "whole", progress=False)
    assert whole.trainable_params == whole.total_params
    # a run killed after its step-3 checkpoint: drop the later one, resume a fresh student
    run = tmp_path / "stopped"
    heal(copy.deepcopy(original), teacher, tokenizer, sentences, config, out=run,
         progress=False)
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3", "checkpoint-6"]
    shutil.rmtree(run / "checkpoints" / "checkpoint-6")
    with pytest.raises(ValueError, match="already holds a healing run"):
        heal(copy.deepcopy(original), teacher, tokenizer, sentences, config, out=run,
             progress=False)
    resumed = heal(copy.deepcopy(original), teacher, tokenizer, sentences, config, out=run,
                   resume=True, progress=False)
    assert resumed.steps == 6
    assert resumed.mse_after == pytest.approx(whole.mse_after, rel=1e-5)
    ours, theirs = state(resumed.model), state(whole.model)
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-6, atol=1e-7) for k in ours)
    assert not all(torch.equal(ours[k], v) for k, v in state(original).items())
    # killed while writing its first checkpoint (trainer_state.json comes last): a resumed
    # run starts again at step 0 and ends where an uninterrupted one does
    for name in ("checkpoint-3", "checkpoint-6"):
        (run / "checkpoints" / name / "trainer_state.json").unlink()
    again = heal(copy.deepcopy(original), teacher, tokenizer, sentences, config, out=run,
                 resume=True, progress=False)
    assert again.steps == 6 and again.mse_after == pytest.approx(whole.mse_after, rel=1e-5)
    with pytest.raises(ValueError, match="texts differ"):
        heal(copy.deepcopy(original), teacher, tokenizer, sentences[1:], config, out=run,
             resume=True, progress=False)
    other = mpotn.compress(copy.deepcopy(teacher), targets=["attention", "ffn"], ratio=0.2,
                           progress=False)  # another student: other bonds
    with pytest.raises(ValueError, match="the student is not the model the run"):
        heal(other, teacher, tokenizer, sentences, config, out=run, resume=True,
             progress=False)


def test_a_run_resumes_with_the_learning_rate_it_started_with(models, sentences, tmp_path):
    """A new run stores its resolved learning rate; one checkpointed by an earlier mpotn
    (learning rate not stored, so the default then: 1e-3 for ``all``) resumes at 1e-3
    although today's default is 1e-4, and says so."""
    from mpotn.finetune.heal import EARLIER_HEAL_LR, HEAL_LR, STATE_NAME

    teacher, original, tokenizer = models
    config = HealConfig(steps=4, train="all", batch_size=8, max_length=32, heldout=16,
                        save_steps=2, logging_steps=2)
    run = tmp_path / "run"
    heal(copy.deepcopy(original), teacher, tokenizer, sentences, config, out=run,
         progress=False)
    state_file = next(run.rglob(STATE_NAME))
    saved = json.loads(state_file.read_text())
    assert saved["config"]["learning_rate"] == HEAL_LR["all"] == 1e-4
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    saved["config"]["learning_rate"] = None  # as an earlier mpotn wrote it
    state_file.write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match="ignoring the new values of learning_rate"):
        resumed = heal(copy.deepcopy(original), teacher, tokenizer, sentences, config,
                       out=run, resume=True, progress=False)
    assert resumed.config.lr == EARLIER_HEAL_LR["all"] == 1e-3
    assert resumed.steps == 4


def test_bad_requests_fail_before_training(models, sentences, tmp_path):
    teacher, original, tokenizer = models
    with pytest.raises(ValueError, match="nothing to resume"):
        heal(copy.deepcopy(original), teacher, tokenizer, sentences, out=tmp_path, resume=True)
    with pytest.raises(ValueError, match="return logits"):
        heal(copy.deepcopy(original), teacher, tokenizer, sentences,
             HealConfig(steps=1, logits_weight=1.0), progress=False)
    with pytest.raises(ValueError, match="MPO layers"):
        heal(copy.deepcopy(teacher), teacher, tokenizer, sentences, progress=False)
    with pytest.raises(ValueError, match="unknown train"):
        HealConfig(train="central")


def test_the_cli_heals_a_saved_model_end_to_end(models, tiny_bert, tmp_path):
    _, original, _ = models
    original.save_pretrained(str(tmp_path / "compressed"))
    out = tmp_path / "healed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mpotn.cli", "heal", str(tmp_path / "compressed"), "--out",
         str(out), "--teacher", str(tiny_bert), "--samples", "24", "--steps", "4",
         "--batch-size", "4", "--max-length", "32", "--heldout", "4", "--logging-steps", "2",
         "--lr", "5e-4",
         "--no-progress"],
        capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "hidden-state error on 4 held-out sentences" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["trainable_params"] > 0
    assert metrics["mse_after"] < metrics["mse_before"]
    assert {"seconds", "config", "train_texts"} <= set(metrics)
    assert (out / "history.csv").read_text().splitlines()[0].split(",")[:2] == ["loss",
                                                                                "grad_norm"]
    healed = mpotn.load(out / "model")
    assert (out / "model" / "tokenizer_config.json").is_file()
    assert healed.totals()["total_params"] == original.totals()["total_params"]
    fidelity = json.loads((out / "fidelity.json").read_text())
    before, after = fidelity["before"]["mean_cosine"], fidelity["after"]["mean_cosine"]
    assert 0 < before < 1 and 0 < after < 1 and before != after
    assert (f"expected fidelity: mean cosine {before:.4f} -> {after:.4f}" in done.stdout)


def test_the_loss_is_the_masked_relative_error_per_layer_plus_weighted_logits():
    from types import SimpleNamespace as Out

    from mpotn.finetune.heal import distillation_loss

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    teacher = Out(hidden_states=(torch.randn(2, 4, 8), torch.randn(2, 4, 8)),
                  logits=torch.randn(2, 4, 5))
    student = Out(hidden_states=tuple(h + 0.1 * torch.randn_like(h)
                                      for h in teacher.hidden_states),
                  logits=teacher.logits + 1.0)
    # padding (mask 0) does not count, whatever the student does there
    student.hidden_states[0][0, 3] += 100.0
    student.logits[1, 2:] += 100.0
    real = mask.bool()
    expected = sum(float((s[real] - t[real]).square().sum() / t[real].square().sum())
                   for s, t in zip(student.hidden_states, teacher.hidden_states)) / 2
    assert float(distillation_loss(student, teacher, mask)) == pytest.approx(expected, rel=1e-5)
    assert float(distillation_loss(student, teacher, mask, logits_weight=0.5)) == pytest.approx(
        expected + 0.5 * 1.0, rel=1e-5)


def test_the_loss_of_float16_models_is_summed_in_float32():
    """Float16 sums of squared hidden states overflow past 65504 (16 x 20 x 384 entries
    near 1 reach 1.2e5): the loss is that of the same outputs in float32, not 0 or NaN."""
    from types import SimpleNamespace as Out

    from mpotn.finetune.heal import distillation_loss

    torch.manual_seed(0)
    teacher = [torch.randn(16, 20, 384) for _ in range(2)]
    student = [t + 0.1 * torch.randn_like(t) for t in teacher]
    logits = torch.randn(16, 20, 300) * 20, torch.randn(16, 20, 300) * 20
    mask = torch.ones(16, 20)
    exact = distillation_loss(Out(hidden_states=student, logits=logits[0]),
                              Out(hidden_states=teacher, logits=logits[1]), mask, 1e-3)
    half = distillation_loss(Out(hidden_states=[h.half() for h in student],
                                 logits=logits[0].half()),
                             Out(hidden_states=[h.half() for h in teacher],
                                 logits=logits[1].half()), mask.half(), 1e-3)
    assert half.dtype == torch.float32
    assert float(exact) == pytest.approx(0.01 + 1e-3 * 800, rel=0.05)
    assert float(half) == pytest.approx(float(exact), rel=1e-3)


@pytest.mark.parametrize("settings", [{"learning_rate": math.nan},
                                      {"learning_rate": math.inf},
                                      {"logits_weight": math.nan},
                                      {"logits_weight": math.inf},
                                      {"warmup_ratio": math.nan}])
def test_a_heal_setting_that_is_not_a_finite_number_is_refused(settings):
    with pytest.raises(ValueError, match=r"finite number|warmup_ratio in"):
        HealConfig(**settings)


@pytest.mark.parametrize(("steps", "warmup"), [(1, 0), (2, 1), (100, 6)])
def test_a_heal_run_never_spends_every_step_warming_up(steps, warmup, tmp_path):
    from mpotn.finetune.heal import HealConfig, _heal_arguments

    arguments = _heal_arguments(HealConfig(steps=steps), tmp_path, progress=False, save=False)
    assert arguments.warmup_steps == warmup


def test_the_cli_heals_on_every_shipped_sentence_by_default(models, tiny_bert, tmp_path):
    _, original, _ = models
    original.save_pretrained(str(tmp_path / "compressed"))
    out = tmp_path / "healed"
    assert main(["heal", str(tmp_path / "compressed"), "--out", str(out), "--teacher",
                 str(tiny_bert), "--steps", "1", "--batch-size", "2", "--max-length", "16",
                 "--heldout", "4", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_texts"] == 2000 - 4  # the whole shipped sample but the held-out


@pytest.mark.parametrize("command", ["heal", "squeeze", "finetune"])
def test_a_run_never_writes_its_output_over_its_input_model(models, tiny_bert, tmp_path,
                                                            command, capsys):
    from mpotn.cli import main
    _, original, _ = models
    saved = tmp_path / "run" / "model"
    original.save_pretrained(str(saved))
    before = sorted(p.name for p in saved.iterdir())
    extra = ["--teacher", str(tiny_bert)] if command == "heal" else []
    assert main([command, str(saved), "--out", str(tmp_path / "run"), "--overwrite",
                 *extra]) == 2
    assert (f"would write {saved}, which is the input model {saved} itself, and replace it; "
            "choose another --out") in capsys.readouterr().err
    assert sorted(p.name for p in saved.iterdir()) == before


@pytest.mark.parametrize("resume", [True, False])
def test_the_cli_checks_the_run_folder_before_loading_any_model(models, tmp_path, monkeypatch,
                                                                resume, capsys):
    import mpotn.compression as compression
    import mpotn.compression.models as loaders

    _, original, _ = models
    original.save_pretrained(str(tmp_path / "compressed"))
    out = tmp_path / "healed"
    if not resume:  # a fresh run into a folder that holds one
        (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    monkeypatch.setattr(compression, "load", lambda *a, **k: pytest.fail("loaded the student"))
    monkeypatch.setattr(loaders, "load_pretrained", lambda *a: pytest.fail("loaded the teacher"))
    assert main(["heal", str(tmp_path / "compressed"), "--out", str(out),
                 *(["--resume"] if resume else [])]) == 2
    err = capsys.readouterr().err
    assert (f"nothing to resume: {out / 'checkpoints'} holds no healing run" in err if resume
            else f"{out} already holds a healing run; pass resume=True (--resume)" in err)


def test_the_cli_refuses_a_teacher_of_another_width_with_heals_own_error(models, tmp_path,
                                                                        capsys):
    from transformers import BertConfig, BertModel

    from mpotn.compression.models import load_tokenizer

    _, original, _ = models
    original.save_pretrained(str(tmp_path / "compressed"))
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(str(tmp_path / "narrow"))
    load_tokenizer().save_pretrained(str(tmp_path / "narrow"))
    assert main(["heal", str(tmp_path / "compressed"), "--out", str(tmp_path / "healed"),
                 "--teacher", str(tmp_path / "narrow"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "(student) and" in err and "heal needs the model that was compressed as teacher" in err
    assert not (tmp_path / "healed" / "model").exists()


def test_training_batches_are_padded_on_the_right_as_the_held_out_ones(models, sentences,
                                                                       monkeypatch):
    import transformers

    from mpotn.compression.models import load_tokenizer

    original, student, _ = models
    left = load_tokenizer()
    left.padding_side = "left"
    sides = []
    collator = transformers.DataCollatorWithPadding

    def spy(tokenizer, *args, **kwargs):
        sides.append(tokenizer.padding_side)
        return collator(tokenizer, *args, **kwargs)

    monkeypatch.setattr(transformers, "DataCollatorWithPadding", spy)
    heal(copy.deepcopy(student), original, left, sentences,
         HealConfig(steps=1, batch_size=4, heldout=4), progress=False)
    assert sides == ["right"] and left.padding_side == "left"  # the caller's is unchanged
