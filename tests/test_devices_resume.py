"""Issue 13, item 5: the device is the user's choice, and fine-tuning checkpoints and resumes.

No GPU here: the device selection is checked on the CPU, with CUDA faked (``torch.cuda``'s
``is_available``, ``device_count`` and ``set_device``) where the Trainer's choice on a GPU
machine is the point. Resuming is checked against an uninterrupted run of a tiny BERT
(``tiny_bert``, 2 layers of width 32): a run is killed mid-step after a checkpoint, then
resumed, and must end with the same weights and scores.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open

from mpotn.cli import build_parser, main
from mpotn.cli import common as cli_common
from mpotn.cli import finetune as cli_finetune
from mpotn.data import sst2_sample
from mpotn.devices import check_device, resolve_device
from mpotn.finetune.heal import EARLIER_HEAL_LR, HealConfig, _heal_arguments, _resume_config
from mpotn.finetune.heal import STATE_NAME as HEAL_STATE
from mpotn.finetune.squeeze import SqueezeConfig, Squeezer
from mpotn.finetune.training import (
    DEVICE_HELP,
    FINETUNE_STATE,
    SAVE_STEPS,
    TrainingConfig,
    finetune,
    prepare_model,
    trainer_arguments,
    training_arguments,
)

NO_CUDA = ("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
           "omit --device or pass --device cpu")


@pytest.fixture(scope="module")
def data():
    return sst2_sample()


@pytest.fixture
def two_gpus(monkeypatch):
    """CUDA faked with two visible devices; returns the devices ``set_device`` was given."""
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(device))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    yield chosen
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # forget the faked CUDA device


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


# --------------------------------------------------------------------- device selection
def test_no_device_leaves_the_choice_to_the_trainer(tmp_path, no_gpu):
    args = training_arguments(TrainingConfig(), tmp_path, progress=False, steps=10)
    assert args.use_cpu is False and type(args).__name__ == "TrainingArguments"
    assert str(args.device) == "cpu" and args.n_gpu == 0  # no GPU here, so the CPU
    assert args.dataloader_pin_memory is False
    heal_args = _heal_arguments(HealConfig(), tmp_path, progress=False, save=False)
    assert heal_args.use_cpu is False


def test_no_device_takes_every_visible_gpu_when_cuda_is_present(tmp_path, two_gpus):
    for device in (None, "cuda"):
        args = training_arguments(TrainingConfig(device=device), tmp_path, False, 10)
        assert args.use_cpu is False
        assert str(args.device) == "cuda:0" and args.n_gpu == 2  # DataParallel over both
        assert args.dataloader_pin_memory is True
    assert two_gpus == [torch.device("cuda", 0)] * 2


def test_cpu_is_the_users_choice_even_with_a_gpu(tmp_path, two_gpus):
    args = training_arguments(TrainingConfig(device="cpu"), tmp_path, False, 10)
    assert args.use_cpu is True and str(args.device) == "cpu" and args.n_gpu == 0
    assert args.dataloader_pin_memory is False
    heal_args = _heal_arguments(HealConfig(device="cpu"), tmp_path, False, False)
    assert heal_args.use_cpu is True and str(heal_args.device) == "cpu"
    assert two_gpus == []


def test_cuda_n_pins_that_gpu_alone(tmp_path, two_gpus, monkeypatch):
    args = trainer_arguments("cuda:1", output_dir=str(tmp_path), report_to=[])
    assert args.device == torch.device("cuda", 1) and args.n_gpu == 1 and not args.use_cpu
    assert two_gpus[-1] == torch.device("cuda", 1)  # the current device, for accelerate
    with pytest.raises(ValueError, match=r"--device cuda:2: only 2 CUDA device\(s\) are "
                                         r"visible \(cuda:0 to cuda:1\)"):
        check_device("cuda:2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one of 2 processes of a distributed launch"):
        check_device("cuda:1")
    assert check_device("cuda") == torch.device("cuda")  # each process its own GPU
    # loading a save onto this process's GPU is what each process of a launch does
    assert check_device("cuda:1", "device", trainer=False) == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device='cuda:2': only 2 CUDA device\(s\)"):
        check_device("cuda:2", "device", trainer=False)


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, no_gpu):
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError) as error:
            training_arguments(TrainingConfig(device=device), tmp_path, False, 1)
        assert str(error.value) == NO_CUDA.replace("--device cuda:", f"--device {device}:")
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        _heal_arguments(HealConfig(device="cuda"), tmp_path, False, False)


@pytest.mark.parametrize("device, message", [
    ("gpu", "--device 'gpu' is not a device name; pass cpu, cuda or cuda:N"),
    ("cuda:x", "--device 'cuda:x' is not a device name"),
    ("cuda:-1", "--device 'cuda:-1' is not a device name"),
    ("", "--device '' is not a device name"),
    ("mps", "--device 'mps': mpotn runs on cpu, cuda or cuda:N"),
    (0, "--device must be a device name (cpu, cuda or cuda:N), got 0"),
])
def test_a_bad_device_name_is_a_clear_error(device, message):
    for build in (TrainingConfig, HealConfig):
        with pytest.raises(ValueError) as error:
            build(device=device)
        assert message in str(error.value)


# --------------------------------------------------------------------- the command line
def test_the_commands_that_train_take_device(tmp_path):
    parser = build_parser()
    for command in (["finetune"], ["squeeze"], ["heal", "saved", "--out", "o"]):
        assert parser.parse_args(command).device is None
        args = parser.parse_args([*command, "--device", "cuda:1"])
        assert args.device == "cuda:1"
    finetune_args = parser.parse_args(["finetune", "--device", "cpu", "--max-steps", "3"])
    assert cli_common.training_config(finetune_args, "lfa").device == "cpu"
    heal_args = parser.parse_args(["heal", "saved", "--out", "o", "--device", "cpu"])
    from mpotn.cli.heal import OPTIONS

    assert HealConfig(**cli_common.config_settings(heal_args, OPTIONS)).device == "cpu"
    helps = [a.help for p in ("finetune", "squeeze", "heal")
             for a in parser._subparsers._group_actions[0].choices[p]._actions
             if a.dest == "device"]
    assert helps == [DEVICE_HELP] * 3


def test_finetune_takes_save_steps_and_resume():
    parser = build_parser()
    args = parser.parse_args(["finetune"])
    assert (args.save_steps, args.resume) == (None, False)
    assert cli_finetune.SAVE_STEPS == SAVE_STEPS == 500
    args = parser.parse_args(["finetune", "--save-steps", "25", "--resume"])
    assert (args.save_steps, args.resume) == (25, True)
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--save-steps", "0"])


def fail_to_load(monkeypatch):
    import mpotn.compression.models as models

    monkeypatch.setattr(models, "load_pretrained", lambda *a: pytest.fail("loaded a model"))
    monkeypatch.setattr(cli_common, "load_task", lambda *a: pytest.fail("loaded the task"))


@pytest.mark.parametrize("command", [["finetune"], ["squeeze"], ["heal", "saved"]])
def test_cli_cuda_without_a_gpu_exits_2_before_loading(capsys, tmp_path, monkeypatch, no_gpu,
                                                       command):
    fail_to_load(monkeypatch)
    code = main([*command, "--device", "cuda", "--out", str(tmp_path / "o")])
    assert code == 2
    assert f"mpotn {command[0]}: error: {NO_CUDA}" in capsys.readouterr().err
    code = main([*command, "--device", "xpu:0", "--out", str(tmp_path / "o")])
    assert code == 2 and "mpotn runs on cpu, cuda or cuda:N" in capsys.readouterr().err


def test_cli_resume_without_a_checkpoint_exits_2_before_loading(capsys, tmp_path,
                                                                monkeypatch):
    fail_to_load(monkeypatch)
    code = main(["finetune", "--resume", "--out", str(tmp_path / "new")])
    assert code == 2
    err = capsys.readouterr().err
    assert (f"nothing to resume: {tmp_path / 'new' / 'checkpoints'} holds no fine-tuning run "
            "(its finetune_state.json)") in err and "run without --resume" in err


def test_cli_run_into_checkpoints_exits_2_and_deletes_nothing(capsys, tmp_path, monkeypatch):
    fail_to_load(monkeypatch)
    old = tmp_path / "out" / "checkpoints" / "checkpoint-3"
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"someone's")
    code = main(["finetune", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out'} already holds checkpoints of a run ({old})" in err
    assert "pass --resume (resume=True) to continue it, or choose another --out" in err
    assert (old / "model.safetensors").read_bytes() == b"someone's"
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == [
        "checkpoint-3", "checkpoints", "model.safetensors"]


# ------------------------------------------------------------------------------- resume
SMALL = {"max_steps": 6, "batch_size": 8, "train_limit": 64, "eval_limit": 32}


def weights(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def kill_a_run(fresh, data, config, out, monkeypatch, kill_at_step) -> None:
    """Fine-tune ``fresh()``'s model into ``out``, checkpointing every 2 steps, killed as it
    starts step 4."""
    with monkeypatch.context() as patch:
        kill_at_step(patch, 3)
        model, tokenizer = fresh()
        with pytest.raises(KeyboardInterrupt):
            finetune(model, tokenizer, data, config, progress=False, out=out, save_steps=2)


@pytest.mark.parametrize("strategy, targets", [("lfa", ["word_emb", "ffn"]), ("lora", None)])
def test_a_resumed_finetune_ends_with_the_weights_of_an_uninterrupted_one(
        tiny_bert, data, tmp_path, monkeypatch, kill_at_step, strategy, targets):
    config = TrainingConfig(strategy=strategy, **SMALL)

    def fresh():
        return prepare_model(tiny_bert, data, config, targets=targets, progress=False)

    model, tokenizer = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    whole = finetune(model, tokenizer, data, config, progress=False, out=tmp_path / "whole",
                     save_steps=2)
    checkpoints = tmp_path / "whole" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "checkpoint-4", "checkpoint-6", FINETUNE_STATE]  # every 2 steps, the last two kept

    kill_a_run(fresh, data, config, tmp_path / "killed", monkeypatch, kill_at_step)
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == [
        "checkpoint-2", FINETUNE_STATE]
    model, tokenizer = fresh()
    resumed = finetune(model, tokenizer, data, config, progress=False,
                       out=tmp_path / "killed", resume=True, save_steps=2)

    assert resumed.record["steps"] == whole.record["steps"] == 6
    assert resumed.record["resumed_from"] == "checkpoint-2"
    assert resumed.record["loss"] == pytest.approx(whole.record["loss"], abs=1e-6)
    assert resumed.record["accuracy"] == whole.record["accuracy"]
    ours, theirs = weights(resumed), weights(whole)
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-6
    if strategy == "lfa":  # training moved the weights: the comparison means something
        assert any(not torch.equal(before[k], theirs[k]) for k in before)
    else:  # LoRA's B matrices start at zero
        assert any(float(v.abs().max()) > 0 for k, v in theirs.items() if "lora_B" in k)
    assert [row["loss"] for row in resumed.history] == pytest.approx(
        [row["loss"] for row in whole.history], abs=1e-6)
    if strategy == "lfa":  # the checkpoint holds every tensor of the MPO model, by name
        base = whole.model.base_model.state_dict()
        with safe_open(str(checkpoints / "checkpoint-6" / "model.safetensors"), "pt") as saved:
            names = set(saved.keys())
            assert names == set(base)
            assert all(torch.equal(saved.get_tensor(k), base[k]) for k in names)

    # resuming a finished run takes no further step and ends with the same weights
    model, tokenizer = fresh()
    again = finetune(model, tokenizer, data, config, progress=False, out=tmp_path / "whole",
                     resume=True, save_steps=2)
    assert again.record["steps"] == 6 and again.record["train_loss"] is None
    assert all(torch.equal(v, theirs[k]) for k, v in weights(again).items())
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "checkpoint-4", "checkpoint-6", FINETUNE_STATE]

    # stopped while saving step 6 (the Trainer writes trainer_state.json last): from step 4
    (checkpoints / "checkpoint-6" / "trainer_state.json").unlink()
    model, tokenizer = fresh()
    redone = finetune(model, tokenizer, data, config, progress=False, out=tmp_path / "whole",
                      resume=True, save_steps=2)
    assert redone.record["resumed_from"] == "checkpoint-4" and redone.record["steps"] == 6
    ours = weights(redone)
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-6


@pytest.mark.parametrize("sharing", ["centrals", "layers"])
def test_a_model_with_shared_tensors_checkpoints_and_resumes_with_them_shared(
        tiny_bert, data, tmp_path, monkeypatch, kill_at_step, sharing):
    """Central tensors shared across layers (MPOBERT), or a layer repeated (ALBERT), are
    one tensor under several names: the checkpoints store it once and a killed fine-tuning
    and a healing stopped while saving resume to the weights of uninterrupted runs, the
    tensor still shared; a finished healing resumed takes no further step."""
    from transformers import Trainer

    from mpotn.compression.sharing import share_centrals
    from mpotn.data.texts import texts
    from mpotn.finetune.heal import heal
    from mpotn.finetune.shared_checkpoints import distinct_state_dict

    config = TrainingConfig(strategy="full", **SMALL)

    def layers(model):
        return model.base_model.bert.encoder.layer  # model: an MPOModel

    def fresh():
        model, tokenizer = prepare_model(tiny_bert, data, config, targets=["ffn"],
                                         compress_model=True, progress=False)
        if sharing == "centrals":
            share_centrals(model, init="layer")
        else:
            layers(model)[1] = layers(model)[0]
        return model, tokenizer

    def shared(model):
        first, second = (layer.intermediate.dense.central for layer in layers(model)[:2])
        return first is second

    model, tokenizer = fresh()
    whole = finetune(model, tokenizer, data, config, progress=False, out=tmp_path / "whole",
                     save_steps=2)
    with safe_open(str(tmp_path / "whole" / "checkpoints" / "checkpoint-6" /
                        "model.safetensors"), "pt") as saved:
        names = set(saved.keys())
    central = "bert.encoder.layer.{}.intermediate.dense.cores.{}"
    index = layers(model)[0].intermediate.dense.central_index
    assert central.format(0, index) in names and central.format(1, index) not in names
    kill_a_run(fresh, data, config, tmp_path / "killed", monkeypatch, kill_at_step)
    model, tokenizer = fresh()
    reported = []  # the keys the Trainer would report missing after loading

    def issue_warnings(self, load_result):
        reported.append(load_result)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_issue_warnings_after_load", issue_warnings)
        resumed = finetune(model, tokenizer, data, config, progress=False,
                           out=tmp_path / "killed", resume=True, save_steps=2)
    assert resumed.record["resumed_from"] == "checkpoint-2" and shared(resumed.model)
    assert distinct_state_dict(resumed.model.base_model)[1]  # names left out of the file,
    assert [r.missing_keys for r in reported] == [[]]  # none of them reported missing
    ours, theirs = weights(resumed), weights(whole)
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-6

    sentences = texts(None, samples=32)  # the shipped SST-2 sample
    heal_config = HealConfig(steps=3, batch_size=8, save_steps=1, train="all")
    teacher = copy.deepcopy(whole.model)

    def healed(resume=False):
        student, _ = fresh()
        return heal(student, teacher, tokenizer, sentences, heal_config,
                    out=tmp_path / "heal", resume=resume, progress=False)

    whole_heal = healed()
    expected = {k: v.clone() for k, v in whole_heal.model.state_dict().items()}
    # stopped while saving step 3 (its trainer_state.json not yet written): from step 2
    (tmp_path / "heal" / "checkpoints" / "checkpoint-3" / "trainer_state.json").unlink()
    for resumed_heal in (healed(resume=True), healed(resume=True)):  # then from step 3
        assert resumed_heal.steps == 3 and shared(resumed_heal.model)
        got = resumed_heal.model.state_dict()
        assert max(float((got[k] - v).abs().max()) for k, v in expected.items()) <= 1e-6


def test_resume_and_fresh_runs_refuse_the_wrong_folder(tiny_bert, data, tmp_path):
    config = TrainingConfig(strategy="full", max_steps=3, batch_size=8, train_limit=32,
                            eval_limit=8)
    model, tokenizer = prepare_model(tiny_bert, data, config, progress=False)
    with pytest.raises(ValueError, match=r"nothing to resume: .* holds no fine-tuning run"):
        finetune(model, tokenizer, data, config, progress=False, out=tmp_path, resume=True)
    with pytest.raises(ValueError, match="resume needs out"):
        finetune(model, tokenizer, data, config, progress=False, resume=True)
    done = finetune(model, tokenizer, data, config, progress=False, out=tmp_path)
    assert done.record["steps"] == 3  # save_steps (500) > steps: one checkpoint, at the end
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-3"]
    model, tokenizer = prepare_model(tiny_bert, data, config, progress=False)
    with pytest.raises(ValueError, match="already holds checkpoints of a run"):
        finetune(model, tokenizer, data, config, progress=False, out=tmp_path)
    other = TrainingConfig(strategy="full", max_steps=3, batch_size=8, train_limit=16,
                           eval_limit=8, lr=1e-3)
    with pytest.raises(ValueError) as error:
        finetune(model, tokenizer, data, other, progress=False, out=tmp_path, resume=True)
    assert ("differs in settings lr (None -> 0.001), train_limit (32 -> 16); the training "
            "examples (32 -> 16)") in str(error.value)
    # where it runs is not what it computes: another device or eval_limit resumes
    moved = TrainingConfig(strategy="full", max_steps=3, batch_size=8, train_limit=32,
                           eval_limit=4, device="cpu")
    resumed = finetune(model, tokenizer, data, moved, progress=False, out=tmp_path,
                       resume=True)
    assert resumed.record["steps"] == 3 and resumed.record["resumed_from"] == "checkpoint-3"
    # stopped while writing its first checkpoint (the Trainer writes trainer_state.json
    # last): a fresh run refuses the folder, a resumed one starts again at step 0
    (tmp_path / "checkpoints" / "checkpoint-3" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="already holds checkpoints of a run"):
        finetune(model, tokenizer, data, config, progress=False, out=tmp_path)
    model, tokenizer = prepare_model(tiny_bert, data, config, progress=False)
    again = finetune(model, tokenizer, data, config, progress=False, out=tmp_path, resume=True)
    assert again.record["steps"] == 3 and "resumed_from" not in again.record
    assert again.record["loss"] == pytest.approx(done.record["loss"], rel=1e-5)


# -------------------------------------------------- saved runs of earlier versions resume
def test_a_squeeze_state_without_device_resumes_on_the_given_device(tiny_bert, data,
                                                                    tmp_path):
    training = TrainingConfig(strategy="lfa", batch_size=8, train_limit=48, eval_limit=32)
    model, tokenizer = prepare_model(tiny_bert, data, training, targets=["ffn"],
                                     progress=False)
    config = SqueezeConfig(budget=None, training_steps=3, step_limit=2)
    Squeezer(model, tokenizer, data, config, training, tmp_path, False).save_checkpoint()
    path = tmp_path / "checkpoints" / "latest.json"
    saved = json.loads(path.read_text())
    assert saved["training"]["device"] is None
    del saved["training"]["device"]  # as versions before issue 13 wrote it
    path.write_text(json.dumps(saved))
    resumed = Squeezer(None, tokenizer, data, SqueezeConfig(),
                       TrainingConfig(device="cpu", batch_size=4), tmp_path, False)
    with pytest.warns(UserWarning, match="ignoring the new values of budget, step_limit, "
                      "training_steps, batch_size, eval_limit, train_limit"):
        resumed.resume()
    assert resumed.config == config and resumed.training.device == "cpu"
    assert resumed.training.batch_size == 8 and resumed.training.max_steps == 3


def test_a_heal_state_without_device_resumes_on_the_given_device(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "checkpoint-2").mkdir(parents=True)
    (checkpoints / "checkpoint-2" / "trainer_state.json").write_text("{}")  # complete
    saved = HealConfig(steps=4, batch_size=8).to_dict()
    del saved["device"]  # as versions before issue 13 wrote it
    (checkpoints / HEAL_STATE).write_text(json.dumps({"config": saved,
                                                      "texts_sha256": "abc", "texts": 3}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only the device differs: nothing to warn about
        config = _resume_config(checkpoints, HealConfig(steps=4, batch_size=8, device="cpu"),
                                "abc")
    # the learning rate then unstored: the default of that time, resolved
    assert config == HealConfig(steps=4, batch_size=8, device="cpu",
                                learning_rate=EARLIER_HEAL_LR["auxiliary"])
    with pytest.warns(UserWarning, match="ignoring the new values of steps"):
        config = _resume_config(checkpoints, HealConfig(steps=9, batch_size=8), "abc")
    assert config.steps == 4 and config.device is None
    shutil.rmtree(checkpoints)


def test_a_checkpoint_with_other_optimizer_groups_is_refused_with_what_to_do(
        tiny_bert, data, tmp_path):
    """An optimizer state another mpotn version wrote (other parameter groups) cannot be
    resumed: the error says so and what to do."""
    import itertools
    config = TrainingConfig(strategy="lfa", **SMALL)
    model, tokenizer = prepare_model(tiny_bert, data, config, progress=False)
    finetune(model, tokenizer, data, config, progress=False, out=tmp_path, save_steps=2)
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "checkpoint-6" / "trainer_state.json").unlink()  # resume from step 4
    path = checkpoints / "checkpoint-4" / "optimizer.pt"
    state = torch.load(path, weights_only=False)
    state["param_groups"] = [{**state["param_groups"][0], "params": list(
        itertools.chain.from_iterable(g["params"] for g in state["param_groups"]))}]
    torch.save(state, path)  # one group, as before mpotn split out no_decay
    model, tokenizer = prepare_model(tiny_bert, data, config, progress=False)
    with pytest.raises(ValueError, match=r"checkpoint-4 holds an optimizer state whose "
                                         r"parameter groups are not this run's .* start the "
                                         r"run again in a new --out"):
        finetune(model, tokenizer, data, config, progress=False, out=tmp_path, resume=True,
                 save_steps=2)
