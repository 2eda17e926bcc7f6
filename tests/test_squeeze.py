"""Dimension squeezing (Algorithm 2): the step's choice, stopping, resume, the direct ablation."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mpotn.data import sst2_sample
from mpotn.finetune.squeeze import (
    SqueezeConfig,
    Squeezer,
    SqueezeState,
    candidates,
    central_spectrum,
    cut,
    direct_truncation,
    plan_step,
)
from mpotn.finetune.training import TrainingConfig, prepare_model, tokenize

TRAINING = TrainingConfig(strategy="lfa", batch_size=8, train_limit=48, eval_limit=32)


@pytest.fixture(scope="module")
def data():
    return sst2_sample()


def tokenized(tokenizer, data):
    return tokenize(data, tokenizer, TRAINING.max_length, TRAINING.train_limit,
                    TRAINING.eval_limit)


def fresh(tiny_bert, data):
    model, tokenizer = prepare_model(tiny_bert, data, TRAINING, targets=["attention", "ffn"],
                                     progress=False)
    return model, tokenizer


def test_a_step_cuts_the_matrix_with_the_least_true_error(tiny_bert, data):
    model, _ = fresh(tiny_bert, data)
    state = SqueezeState(spectra={n: central_spectrum(m) for n, m in model.mpo_layers().items()})
    config = SqueezeConfig(cut=0.3)
    ranked = candidates(model, state, config)
    assert len(ranked) == 12
    # brute force: cut every candidate for real and measure ||M - M~|| / ||M|| on the matrix
    true = {}
    for row in ranked:
        layer = model.base_model.get_submodule(row["matrix"])
        before = layer.matrix().detach().double()
        mpo = layer.mpo().truncate(bond_dims={row["bond"]: row["new_dim"]})
        true[row["matrix"]] = float((mpo.to_matrix().double() - before).norm() / before.norm())
        assert row["estimated_error"] == pytest.approx(true[row["matrix"]], rel=1e-4, abs=1e-6)
    assert ranked[0]["matrix"] == min(true, key=true.get)
    name, bond, dim = ranked[0]["matrix"], ranked[0]["bond"], ranked[0]["new_dim"]
    spectrum = cut(model, name, bond, dim)
    assert model.base_model.get_submodule(name).bond_dims[bond] == dim
    assert len(spectrum["values"]) == dim
    assert spectrum["error"] == pytest.approx(true[name], rel=1e-4, abs=1e-6)


def test_a_budgeted_step_takes_one_dimension_cuts_by_least_error_until_the_budget(tiny_bert,
                                                                                   data):
    model, _ = fresh(tiny_bert, data)
    state = SqueezeState(spectra={n: central_spectrum(m) for n, m in model.mpo_layers().items()})
    layers = model.mpo_layers()
    budget = 3000
    plan = plan_step(model, state, SqueezeConfig(cut=1, budget=budget))
    # brute force: every remaining singular value of every central bond, relative to ||M||,
    # taken smallest first; a cut frees its two cores' slices of that bond
    values = []
    for name, spectrum in state.spectra.items():
        layer, bond = layers[name], spectrum["bond"]
        left, right = layer.cores[bond - 1].shape, layer.cores[bond].shape
        per_dim = left[0] * left[1] * left[2] + right[1] * right[2] * right[3]
        dim = layer.bond_dims[bond]
        values += [(spectrum["values"][k] / spectrum["norm"], name, per_dim)
                   for k in range(1, dim)]
    values.sort()
    expected, removed = {}, 0
    for _, name, per_dim in values:
        expected[name] = expected.get(name, 0) + 1
        removed += per_dim
        if removed >= budget:
            break
    assert {row["matrix"]: row["dim"] - row["new_dim"] for row in plan} == expected
    assert sum(row["removed_params"] for row in plan) == removed >= budget
    before = sum(p.numel() for p in model.base_model.parameters())
    for row in plan:  # Eq. 3 over the whole cut of each matrix, and the real parameter drop
        spectrum = cut(model, row["matrix"], row["bond"], row["new_dim"])
        assert row["estimated_error"] == pytest.approx(spectrum["error"], rel=1e-4, abs=1e-6)
    assert before - sum(p.numel() for p in model.base_model.parameters()) == removed
    assert plan_step(model, state, SqueezeConfig(cut=1, budget=None)).__len__() == 1
    assert SqueezeConfig(budget=0.01).step_budget(10**6) == 10**4
    with pytest.raises(ValueError, match="budget must be a whole number"):
        SqueezeConfig(budget=2.5)


def test_cut_sizes_and_settings():
    assert SqueezeConfig(cut=1).next_dim(12) == 11
    assert SqueezeConfig(cut=3).next_dim(12) == 9
    assert SqueezeConfig(cut=0.25).next_dim(12) == 9
    assert SqueezeConfig(cut=0.01).next_dim(12) == 11  # at least one dimension
    assert SqueezeConfig(cut=4, min_bond=10).next_dim(12) == 10
    with pytest.raises(ValueError, match="whole number"):
        SqueezeConfig(cut=1.5)
    with pytest.raises(ValueError, match="monitor"):
        SqueezeConfig(monitor="accuracy")
    with pytest.raises(ValueError, match="delta"):
        SqueezeConfig(delta=-1)


def test_squeeze_cuts_only_allowed_types_and_writes_its_history(tiny_bert, data, tmp_path):
    model, tokenizer = fresh(tiny_bert, data)
    config = SqueezeConfig(types=["ffn_in", "ffn_out"], cut=0.5, budget=None, training_steps=2,
                           step_limit=3, delta=1.0)
    result = Squeezer(model, tokenizer, data, config, TRAINING, tmp_path, False).run()
    history = result.history
    assert [r["step"] for r in history] == [0, 1, 2, 3]
    assert all(r["matrix"].endswith(("intermediate.dense", "output.dense"))
               and "attention" not in r["matrix"] for r in history[1:])
    assert [r["params"] for r in history] == sorted((r["params"] for r in history), reverse=True)
    assert result.record["stop_reason"] == "step_limit"
    assert result.record["fine_tuning_steps"] == 6 and result.record["matrix_cuts"] == 3
    cuts = (tmp_path / "cuts.csv").read_text().splitlines()
    assert len(cuts) == 4 and [line.split(",")[1] for line in cuts[1:]] == [
        r["matrix"] for r in history[1:]]
    for name in ("metrics.json", "history.csv", "history.json", "history.png"):
        assert (tmp_path / name).stat().st_size > 0
    with pytest.raises(ValueError, match="already holds a squeeze run"):
        Squeezer(model, tokenizer, data, config, TRAINING, tmp_path, False).run()


class ScriptedScores(Squeezer):
    """A squeezer whose evaluations return a given sequence of accuracies."""

    scores = (0.90, 0.89, 0.85, 0.95)

    def _evaluate(self):
        return {"loss": 0.5, "accuracy": self.scores[len(self.state.history)]}


def started(tiny_bert, data, tmp_path, step_limit=3, training_steps=0):
    """A scripted squeezer of the fresh model past step 0 (cuts of half, delta 0.02)."""
    model, tokenizer = fresh(tiny_bert, data)
    config = SqueezeConfig(cut=0.5, budget=None, training_steps=training_steps,
                           step_limit=step_limit, delta=0.02)
    squeezer = ScriptedScores(model, tokenizer, data, config, TRAINING, tmp_path, False)
    squeezer._tokenized = tokenized(tokenizer, data)
    squeezer.start()
    return squeezer


def test_squeeze_refuses_a_type_the_model_does_not_have_before_any_step(tiny_bert, data,
                                                                        tmp_path):
    model, tokenizer = fresh(tiny_bert, data)
    config = SqueezeConfig(types=["ffn_in", "ffn-out"], training_steps=1, step_limit=1)
    with pytest.raises(ValueError, match=r"types \['ffn-out'\] match no MPO layer of this "
                                         r"model; its types are \[.*'ffn_out'"):
        Squeezer(model, tokenizer, data, config, TRAINING, tmp_path, False).run()
    assert not (tmp_path / "checkpoints").exists()


def test_a_drop_beyond_delta_stops_and_returns_the_last_model_within_it(tiny_bert, data,
                                                                        tmp_path):
    squeezer = started(tiny_bert, data, tmp_path)
    model = squeezer.model
    squeezer.step()  # 0.90 -> 0.89: within delta
    after_first = {n: m.bond_dims for n, m in model.mpo_layers().items()}
    result = squeezer.run(resume=True)  # 0.90 -> 0.85: beyond delta, stop
    assert result.record["stop_reason"] == "delta"
    assert result.record["squeeze_steps"] == 2 and result.record["accepted_step"] == 1
    assert result.record["accuracy"] == 0.89 and result.record["fine_tuning_steps"] == 0
    assert {n: m.bond_dims for n, m in result.model.mpo_layers().items()} == after_first
    assert {n: m.bond_dims for n, m in squeezer.model.mpo_layers().items()} != after_first


def test_a_score_that_is_not_a_number_stops_the_squeeze_as_beyond_delta(tiny_bert, data,
                                                                         tmp_path):
    model, tokenizer = fresh(tiny_bert, data)
    config = SqueezeConfig(cut=0.5, budget=None, training_steps=0, step_limit=3, delta=0.02)
    squeezer = ScriptedScores(model, tokenizer, data, config, TRAINING, tmp_path, False)
    squeezer.scores = (0.90, math.nan, 0.95)
    result = squeezer.run()
    assert result.record["stop_reason"] == "delta"
    assert result.record["squeeze_steps"] == 1 and result.record["accepted_step"] == 0


@pytest.mark.parametrize("settings", [{"cut": math.nan}, {"cut": math.inf},
                                      {"budget": math.nan}, {"delta": math.nan},
                                      {"target_ratio": math.nan}])
def test_a_squeeze_setting_that_is_not_a_finite_number_is_refused(settings):
    name = next(iter(settings))
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        SqueezeConfig(**settings)


def test_a_resume_on_other_task_data_is_refused_and_changed_settings_are_named(
        tiny_bert, data, tmp_path, monkeypatch):
    """The checkpointed settings win (with a warning naming what differs); other training
    or evaluation examples are an error; the model is loaded where the Trainer runs."""
    import dataclasses
    import importlib

    squeeze = importlib.import_module("mpotn.finetune.squeeze")  # the package's squeeze()
    model, tokenizer = fresh(tiny_bert, data)
    config = SqueezeConfig(cut=0.5, budget=None, training_steps=0, step_limit=2)
    squeezer = Squeezer(model, tokenizer, data, config, TRAINING, tmp_path, False)
    squeezer._tokenized = tokenized(tokenizer, data)
    squeezer.start()
    places = []
    load = squeeze.load
    monkeypatch.setattr(squeeze, "load", lambda path, device: places.append(device)
                        or load(path, device=device))
    other = dataclasses.replace(data, eval=data.eval.select(range(1, len(data.eval))))
    resumed = Squeezer(None, tokenizer, other, SqueezeConfig(step_limit=5), TRAINING,
                       tmp_path, False)
    with (pytest.warns(UserWarning, match="ignoring the new values of budget, cut, "
                       "step_limit, training_steps$"),
          pytest.raises(ValueError, match="the task data differ from those of the run "
                                          "checkpointed in")):
        resumed.run(resume=True)
    assert places == [torch.device("cpu")]  # the Trainer's device here
    same = Squeezer(None, tokenizer, data, config, TRAINING, tmp_path, False)
    assert same.run(resume=True).record["squeeze_steps"] == 2


def test_spent_checkpoints_are_removed_but_for_a_users_file_in_them(tiny_bert, data,
                                                                   tmp_path):
    squeezer = started(tiny_bert, data, tmp_path, step_limit=4)
    for _ in range(3):  # 0.89 (accepted), 0.85, 0.95 (accepted): steps 1 and 2 are spent
        squeezer.step()
        if squeezer.state.step == 1:
            (squeezer.checkpoints / "step-0001" / "notes.txt").write_text("the user's")
    folders = sorted(p.name for p in squeezer.checkpoints.iterdir() if p.is_dir())
    assert folders == ["step-0000", "step-0001", "step-0003"]
    assert [p.name for p in (squeezer.checkpoints / "step-0001").iterdir()] == ["notes.txt"]


def test_direct_truncation_reaches_the_given_bonds(tiny_bert, data):
    model, tokenizer = fresh(tiny_bert, data)
    name, layer = next(iter(model.mpo_layers().items()))
    before = sum(p.numel() for p in model.base_model.parameters())
    dims = list(layer.bond_dims)
    dims[2] = 12
    record = direct_truncation(model, tokenizer, data, {name: dims},
                               TRAINING, steps=2, progress=False)
    assert list(model.base_model.get_submodule(name).bond_dims) == dims
    assert record["strategy"] == "direct" and record["steps"] == 2
    assert record["params"] < before and record["fine_tuning_steps"] == 2


def squeeze_command(model, out, *extra):
    return [sys.executable, "-m", "mpotn.cli", "squeeze", str(model), "--out", str(out),
            "--types", "ffn_in", "ffn_out", "--cut", "0.25", "--budget", "0",
            "--training-steps", "2", "--step-limit", "6", "--delta", "1", "--init-epochs", "0.5",
            "--batch-size", "8", "--train-limit", "48", "--eval-limit", "32", "--no-progress",
            *extra]


def test_a_killed_squeeze_resumes_where_it_stopped(tiny_bert, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    reference = tmp_path / "uninterrupted"
    subprocess.run(squeeze_command(tiny_bert, reference), check=True, env=env,
                   capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen(squeeze_command(tiny_bert, killed), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill it once step 2 is checkpointed
        if state.is_file() and json.loads(state.read_text())["state"]["step"] >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    step = json.loads(state.read_text())["state"]["step"]
    assert 2 <= step < 6, "the run was not killed mid-way"
    assert not (killed / "metrics.json").exists()
    subprocess.run(squeeze_command(tiny_bert, killed, "--resume"), check=True, env=env,
                   capture_output=True)

    def history(folder):
        rows = json.loads((folder / "history.json").read_text())
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    # the same cuts in the same order; scores equal up to multi-threaded float reductions
    resumed, uninterrupted = history(killed), history(reference)
    assert len(resumed) == len(uninterrupted) == 7
    for a, b in zip(resumed, uninterrupted):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
            else:
                assert a[key] == b[key], key
    from mpotn import load

    # the same model: equal matrices (cores are equal up to the gauge of their SVDs)
    a, b = load(reference / "model"), load(killed / "model")
    for (name, layer), other in zip(a.mpo_layers().items(), b.mpo_layers().values()):
        assert layer.bond_dims == other.bond_dims, name
        torch.testing.assert_close(layer.matrix(), other.matrix(), rtol=1e-4, atol=1e-5)
    dense = {n: p for n, p in a.named_parameters() if ".cores." not in n}
    for name, param in b.named_parameters():
        if name in dense:
            torch.testing.assert_close(param, dense[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_direct_ablation_of_the_cli_truncates_to_the_squeezed_bonds(tiny_bert, tmp_path):
    from mpotn.cli import main

    out = tmp_path / "run"
    assert main(squeeze_command(tiny_bert, out, "--direct")[3:]) == 0
    squeezed = json.loads((out / "metrics.json").read_text())
    direct = json.loads((out / "direct" / "metrics.json").read_text())
    assert direct["strategy"] == "direct"
    assert direct["params"] == direct["total_params"] == squeezed["params"] == 1_002_498
    assert direct["steps"] == squeezed["fine_tuning_steps"] == 12


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, tiny_bert):
    result = subprocess.run(squeeze_command(tiny_bert, tmp_path / "none", "--resume"),
                            capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "nothing to resume" in result.stderr


def test_the_command_refuses_an_unknown_type_before_fine_tuning(tmp_path, tiny_bert,
                                                                capsys, monkeypatch):
    from mpotn.cli import main

    monkeypatch.setattr("mpotn.finetune.training.finetune",
                        lambda *args, **kwargs: pytest.fail("fine-tuned before checking"))
    command = squeeze_command(tiny_bert, tmp_path / "run")[3:]
    command[command.index("ffn_out")] = "ffn-out"
    assert main(command) == 2
    assert "types ['ffn-out'] match no MPO layer of this model" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints" / "step-0000").exists()


def test_a_checkpoint_saved_with_the_old_setting_names_resumes(tiny_bert, data, tmp_path):
    """latest.json of earlier versions names steps_per_cut and max_cuts: read as today's."""
    squeezer = started(tiny_bert, data, tmp_path, step_limit=5, training_steps=3)
    config, tokenizer = squeezer.config, squeezer.tokenizer
    path = squeezer.checkpoints / "latest.json"
    saved = json.loads(path.read_text())
    saved["config"]["steps_per_cut"] = saved["config"].pop("training_steps")
    saved["config"]["max_cuts"] = saved["config"].pop("step_limit")
    saved["training"]["extra"] = {}  # a field earlier versions had and never read
    path.write_text(json.dumps(saved))
    resumed = Squeezer(None, tokenizer, data, SqueezeConfig(), TRAINING, tmp_path, False)
    with pytest.warns(UserWarning, match="ignoring the new values of budget, cut, delta, "
                      "step_limit, training_steps$"):
        resumed.resume()
    assert resumed.config == config and resumed.training.max_steps == 3
    assert resumed.state.step == 0 and resumed.model is not None


def test_the_command_takes_its_squeeze_defaults_and_help_from_the_config():
    from mpotn.cli import build_parser
    from mpotn.cli.squeeze import OPTIONS

    parser = build_parser()
    assert all(getattr(parser.parse_args(["squeeze"]), field) is None for field in OPTIONS)
    old = parser.parse_args(["squeeze", "--steps-per-cut", "3", "--max-cuts", "5"])
    assert (old.training_steps, old.step_limit) == (3, 5)
    squeeze = next(a for a in parser._subparsers._group_actions[0].choices["squeeze"]._actions
                   if a.dest == "step_limit" and a.option_strings == ["--step-limit"])
    assert squeeze.help == SqueezeConfig.help("step_limit").replace("%", "%%")
    assert "(default: 4)" in squeeze.help
