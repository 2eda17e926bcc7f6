"""Mixtures of experts whose MPOs share one central tensor (issue 14, MPOE): routing,
the load-balancing loss, upcycling, parameter counts, gradients and save/load."""

import copy
import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from mpotn.compression import compress, load
from mpotn.compression.config import layer_holder
from mpotn.compression.experts import experts_spec, upcycle_experts
from mpotn.compression.parameters import count_parameters, lfa_parameters
from mpotn.layers.experts import MixtureOfExperts, router_loss, router_stats

HIDDEN, INTERMEDIATE, LAYERS = 32, 48, 2
#: One BERT feed-forward block: 32 x 48 and 48 x 32 matrices with their biases.
BLOCK = 32 * 48 + 48 + 48 * 32 + 32


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=97, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                num_attention_heads=2, intermediate_size=INTERMEDIATE)).eval()


def ids(seed=1, batch=3, length=7):
    torch.manual_seed(seed)
    return torch.randint(0, 97, (batch, length))


def expert_layers(model, layer=0):
    moe = model.get_submodule(f"encoder.layer.{layer}.intermediate")
    return moe, [e.intermediate.dense for e in moe.experts], [e.output.dense for e in moe.experts]


def test_one_expert_equals_the_dense_feed_forward_block():
    dense = tiny_bert()
    model = compress(copy.deepcopy(dense), targets=["ffn"], n=3, progress=False)
    upcycle_experts(model, experts=1, top_k=1)
    x = ids()
    with torch.no_grad():
        expected = dense(x).last_hidden_state
        got = model(x).last_hidden_state
    assert float((got - expected).abs().max()) < 1e-5
    assert float(router_loss(model)) == pytest.approx(LAYERS * 0.01)  # E f P = 1 per block


def test_experts_share_one_central_parameter_and_it_is_counted_once():
    model = compress(tiny_bert(), targets=["ffn"], n=3, progress=False)
    before = model.totals()["total_params"]
    report = upcycle_experts(model, experts=4, top_k=2)
    _, ins, outs = expert_layers(model)
    assert len({layer.central.data_ptr() for layer in ins}) == 1
    assert all(layer.central is ins[0].central for layer in ins)
    assert all(layer.central is outs[0].central for layer in outs)
    assert len({layer.cores[0].data_ptr() for layer in ins}) == 4  # each owns its auxiliary tensors
    row = report[0]
    own = sum(c.numel() for c in ins[1].cores if c is not ins[1].central) + INTERMEDIATE \
        + sum(c.numel() for c in outs[1].cores if c is not outs[1].central) + HIDDEN
    assert row["expert_params"] == own
    assert row["router_params"] == HIDDEN * 4
    assert row["moe_params"] == row["block_params"] + 3 * own + HIDDEN * 4
    assert model.totals()["total_params"] == before + LAYERS * (3 * own + HIDDEN * 4)
    assert model.totals()["central_params"] == LAYERS * (ins[0].central.numel()
                                                        + outs[0].central.numel())
    assert row["ffn_params_multiple"] < 2  # four experts for less than two blocks


def test_plain_experts_are_full_copies_from_the_same_code():
    model = tiny_bert()
    report = upcycle_experts(model, experts=4, top_k=1, share_central=False)
    assert [r["block_params"] for r in report] == [BLOCK] * LAYERS
    assert [r["moe_params"] for r in report] == [4 * BLOCK + 4 * HIDDEN] * LAYERS
    assert report[0]["ffn_params_multiple"] == pytest.approx(4 + 4 * HIDDEN / BLOCK)
    _, ins, _ = expert_layers(model)
    a, b = ins[0].weight.detach(), ins[1].weight.detach()
    diff = (b - a).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()
    assert 0.005 < float(diff) < 0.02  # perturbed by noise = 0.01 in relative RMS


def test_top_two_upcycled_experts_start_as_the_block_itself():
    dense = tiny_bert()
    model = compress(copy.deepcopy(dense), targets=["ffn"], n=3, progress=False)
    upcycle_experts(model, experts=4, top_k=2, noise=0.0, capacity_factor=None)
    x = ids()
    with torch.no_grad():
        diff = (model(x).last_hidden_state - dense(x).last_hidden_state).abs().max()
    assert float(diff) < 1e-5


def test_router_loss_and_gradients_reach_every_expert_and_the_shared_central():
    model = compress(tiny_bert(), targets=["ffn"], n=3, progress=False)
    upcycle_experts(model, experts=4, top_k=2, capacity_factor=None)
    model.train()
    output = model(ids(batch=8, length=16)).last_hidden_state
    loss = output.pow(2).mean() + router_loss(model)
    loss.backward()
    moe, ins, outs = expert_layers(model)
    assert moe.router.weight.grad is not None and float(moe.router.weight.grad.abs().sum()) > 0
    for layer in ins + outs:
        for core in layer.cores:
            assert core.grad is not None and float(core.grad.abs().sum()) > 0
    assert ins[0].central.grad is ins[3].central.grad  # one tensor, one gradient


def test_load_balancing_loss_is_one_when_even_and_e_when_one_expert_takes_all():
    experts = [nn.Linear(4, 4) for _ in range(4)]
    moe = MixtureOfExperts(experts, hidden_size=4, top_k=1, capacity_factor=None)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 10.0  # every token with positive sum goes to expert 2
    x = torch.rand(32, 4) + 0.1
    with torch.no_grad():
        moe(x)
        p2 = float(torch.softmax(moe.router(x), -1)[:, 2].mean())
    assert float(moe.aux_loss) == pytest.approx(4 * 1.0 * p2, rel=1e-6)  # f_2 = 1
    assert float(moe.aux_loss) > 3.9
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities: f and P even
        moe(x)
    assert float(moe.aux_loss) == pytest.approx(1.0, rel=1e-6)


def test_capacity_drops_the_tokens_over_it_and_top_two_gates_sum_to_one():
    experts = [nn.Linear(4, 4) for _ in range(2)]
    moe = MixtureOfExperts(experts, hidden_size=4, top_k=1, capacity_factor=0.5)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # all 8 tokens choose expert 0
    x = torch.rand(8, 4) + 0.1
    assert moe.capacity(8) == 2
    gates, chosen, _ = moe.route(x)
    assert gates[:, 0].gt(0).sum() == 2 and bool((chosen == 0).all())
    y = moe(x)
    assert bool((y[2:] == 0).all()) and bool((y[:2] != 0).any())
    assert float(moe.dropped) == pytest.approx(6 / 8)  # 6 of the 8 assignments
    moe.eval()
    moe(x)
    assert float(moe.dropped) == 0.0  # no capacity limit in evaluation
    top2 = MixtureOfExperts(experts, hidden_size=4, top_k=2, capacity_factor=None)
    gates, _, _ = top2.route(x)
    assert torch.allclose(gates.sum(-1), torch.ones(8))


def test_lfa_trains_the_router_and_the_auxiliary_tensors_not_the_central():
    model = compress(tiny_bert(), targets=["ffn"], n=3, progress=False)
    upcycle_experts(model, experts=2, top_k=1)
    moe, ins, _ = expert_layers(model)
    chosen = {id(p) for _, p in lfa_parameters(model.base_model)}
    assert id(moe.router.weight) in chosen
    assert id(ins[1].cores[0]) in chosen and id(ins[1].central) not in chosen


def test_save_and_load_rebuild_the_experts_with_one_central(tmp_path):
    model = compress(tiny_bert(), targets=["ffn"], n=3, progress=False)
    upcycle_experts(model, experts=3, top_k=2)
    model.eval()
    x = ids()
    with torch.no_grad():
        expected = model(x).last_hidden_state
    model.save_pretrained(tmp_path / "moe")
    again = load(tmp_path / "moe")
    with torch.no_grad():
        assert torch.equal(again(x).last_hidden_state, expected)
    _, ins, outs = expert_layers(again, layer=1)
    assert len({layer.central.data_ptr() for layer in ins}) == 1
    assert len({layer.central.data_ptr() for layer in outs}) == 1
    assert experts_spec(again) == experts_spec(model)
    assert again.totals()["total_params"] == model.totals()["total_params"]


def test_gpt2_mlp_blocks_become_experts():
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)).eval()
    model = compress(copy.deepcopy(gpt), targets=["ffn"], n=3, progress=False)
    report = upcycle_experts(model, experts=1, top_k=1)
    assert [r["name"] for r in report] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    x = ids()
    with torch.no_grad():
        assert float((model(x).logits - gpt(x).logits).abs().max()) < 1e-4


@pytest.mark.parametrize("kwargs, message", [
    ({"experts": 0}, "experts must be"),
    ({"experts": 2, "top_k": 3}, "top_k must be"),
    ({"capacity_factor": 0.0}, "capacity_factor must be positive"),
    ({"layers": [7]}, "layers \\[7\\] have no feed-forward block"),
    ({"noise": -1.0}, "noise must be"),
])
def test_upcycle_refuses_bad_settings(kwargs, message):
    model = compress(tiny_bert(), targets=["ffn"], n=3, progress=False)
    with pytest.raises(ValueError, match=message):
        upcycle_experts(model, **kwargs)


def test_sharing_needs_compressed_blocks():
    with pytest.raises(ValueError, match=r"holds no MPO layer.*share_central=False"):
        upcycle_experts(tiny_bert(), experts=2)


def test_capacity_formula():
    moe = MixtureOfExperts([nn.Identity()] * 4, hidden_size=4, top_k=2, capacity_factor=1.25)
    assert moe.capacity(10) == math.ceil(1.25 * 10 * 2 / 4)
    assert count_parameters(moe.parameters()) == 16
    moe.capacity_factor = 1.1
    assert moe.capacity(100) == 55  # 1.1 * 100 * 2 / 4 is 55.000000000000014 in floats


@pytest.mark.parametrize("strategy", ["central", "last-k", "lora"])
def test_every_strategy_trains_the_routers_which_start_random(strategy):
    from mpotn.finetune.strategies import apply_strategy

    model = compress(tiny_bert(), targets=["ffn"], n=3, progress=False)
    upcycle_experts(model, experts=2, top_k=1)
    routers = [m.router.weight for m in model.modules() if isinstance(m, MixtureOfExperts)]
    assert len(routers) == 2
    result = apply_strategy(model.base_model, strategy, k=1, lora_rank=2)
    assert all(router.requires_grad for router in routers)
    trained = [p for p in result.get("model", model.base_model).parameters() if p.requires_grad]
    assert sum(p is r for p in trained for r in routers) == 2


def test_the_training_loss_adds_the_router_loss_and_evaluation_does_not(tmp_path):
    from transformers import BertForSequenceClassification

    from mpotn.compression.models import load_tokenizer
    from mpotn.finetune.training import _task_trainer, trainer_arguments

    torch.manual_seed(0)
    classifier = BertForSequenceClassification(BertConfig(
        vocab_size=97, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=INTERMEDIATE, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
    model = compress(classifier, targets=["ffn"], n=3, progress=False)
    upcycle_experts(model, experts=2, top_k=1, router_loss_weight=0.5)
    trainer = _task_trainer(model, trainer_arguments("cpu", output_dir=tmp_path),
                            load_tokenizer())
    inputs = {"input_ids": ids(), "labels": torch.tensor([0, 1, 0])}
    model.train()
    loss = trainer.compute_loss(model, inputs).detach()  # a training step: with gradients
    task = model(**inputs).loss.detach()
    extra = router_loss(model).detach()
    assert float(loss) == pytest.approx(float(task + extra), rel=1e-6) and float(extra) > 0
    with torch.no_grad():  # an evaluation: the task's loss alone
        assert float(trainer.compute_loss(model, inputs)) == pytest.approx(
            float(model(**inputs).loss), rel=1e-6)
    # the next training log gets the router statistics of the training steps since the
    # last (the evaluation above is not one of them), and then starts again
    model.train()
    trainer.compute_loss(model, inputs)
    second = router_stats(model)
    logged = []
    trainer.callback_handler.on_log = lambda args, state, control, logs: logged.append(logs)
    trainer.log({"loss": 1.0})
    first_aux = float(extra) / 0.5  # the first step's aux_loss, summed over the layers
    layers = sum(isinstance(m, MixtureOfExperts) for m in model.modules())
    assert logged[-1]["router_aux_loss"] == pytest.approx(
        (first_aux / layers + float(second["aux_loss"])) / 2, rel=1e-5)
    assert 0 <= logged[-1]["router_dropped"] < 1
    trainer.log({"eval_loss": 1.0})
    assert "router_aux_loss" not in logged[-1]  # an evaluation log: none


def test_a_model_with_experts_is_refused_on_several_gpus_of_one_process(tmp_path,
                                                                        monkeypatch):
    """DataParallel's replicas would keep the load-balancing loss to themselves."""
    from transformers import Trainer, TrainingArguments

    from mpotn.compression.models import load_tokenizer
    from mpotn.finetune.training import _task_trainer, trainer_arguments

    monkeypatch.setattr(Trainer, "train", lambda self: "trained")  # what would run next
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    model = compress(tiny_bert(), targets=["ffn"], n=3, progress=False)
    args = trainer_arguments("cpu", output_dir=tmp_path)
    assert _task_trainer(model, args, load_tokenizer()).train() == "trained"  # no experts
    upcycle_experts(model, experts=2, top_k=1)
    trainer = _task_trainer(model, args, load_tokenizer())  # evaluating needs no refusal
    with pytest.raises(ValueError, match=r"one process over 2 GPUs.*accelerate launch"):
        trainer.train()


def test_merge_keeps_the_experts_dense_and_warns():
    model = compress(tiny_bert(), targets=["ffn"], n=3, progress=False)
    upcycle_experts(model, experts=2, top_k=1)
    x = ids()
    with torch.no_grad():
        expected = model(x).last_hidden_state
    with pytest.warns(UserWarning, match="mixtures of experts"):
        dense = model.merge()
    _, ins, _ = expert_layers(dense)
    assert all(type(layer) is nn.Linear for layer in ins)
    with torch.no_grad():
        assert float((dense(x).last_hidden_state - expected).abs().max()) < 1e-5


def test_the_experts_shared_central_is_drawn_once(tmp_path):
    from mpotn.analysis.inspection import draw_shared_centrals

    model = compress(tiny_bert(), targets=["ffn"], n=3, progress=False)
    upcycle_experts(model, experts=3, top_k=2)
    paths = draw_shared_centrals(model, tmp_path)
    assert len(paths) == 2 * LAYERS  # one drawing per block and matrix
    assert all(path.stat().st_size > 10_000 for path in paths.values())


def test_a_trained_mixture_deep_copies_and_deepens_then_saves_and_loads(tmp_path):
    from mpotn.compression import deepen, share_centrals

    model = compress(tiny_bert(), targets=["ffn"], n=3, progress=False)
    share_centrals(model, init="layer")
    upcycle_experts(model, experts=2, top_k=1)
    model.train()
    model(ids()).last_hidden_state.sum().backward()  # aux_loss now holds a graph
    assert copy.deepcopy(model).get_submodule("encoder.layer.0.intermediate").aux_loss is None
    deepen(model, depth=4)
    assert sorted(experts_spec(model)) == [f"encoder.layer.{i}.intermediate" for i in range(4)]
    assert {s["output"] for s in experts_spec(model).values()} == {
        f"encoder.layer.{i}.output.dense" for i in range(4)}
    model.eval()
    with torch.no_grad():
        expected = model(ids()).last_hidden_state
    model.save_pretrained(tmp_path / "deep")
    again = load(tmp_path / "deep")
    with torch.no_grad():
        assert torch.equal(again(ids()).last_hidden_state, expected)


def test_evaluation_has_no_capacity_limit():
    moe = MixtureOfExperts([nn.Linear(4, 4) for _ in range(2)], hidden_size=4, top_k=1,
                           capacity_factor=0.5)
    assert moe.capacity(8) == 2
    moe.eval()
    assert moe.capacity(8) == 8


def _no_dropout_bert(seed=0):
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=97, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                num_attention_heads=2, intermediate_size=INTERMEDIATE,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def test_padding_does_not_count_for_capacity_or_the_load_balancing_loss():
    torch.manual_seed(0)
    moe = MixtureOfExperts([nn.Linear(8, 8) for _ in range(4)], 8, top_k=1,
                           capacity_factor=1.0, router_std=1.0).train()
    x = torch.randn(2, 7, 8)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 2:] = 0
    real = torch.cat([x[0], x[1, :2]])[None]  # the 9 real tokens, in order, unpadded
    with torch.no_grad():
        alone = moe(real)  # capacity ceil(9 / 4) = 3
        alone_loss = float(moe.aux_loss)
        unmasked = moe(x)  # the padding counted: capacity ceil(14 / 4) = 4
        unmasked_loss = float(moe.aux_loss)
        moe.token_mask = mask
        masked = moe(x)
    got = torch.cat([masked[0], masked[1, :2]])
    assert torch.allclose(got, alone[0], atol=1e-6)
    assert float(masked[1, 2:].abs().max()) == 0.0  # padding gets nothing
    assert float(moe.aux_loss) == pytest.approx(alone_loss, abs=1e-6)
    # without the mask the same real tokens come out differently: the test can fail
    assert not torch.allclose(torch.cat([unmasked[0], unmasked[1, :2]]), alone[0], atol=1e-6)
    assert unmasked_loss != pytest.approx(alone_loss, abs=1e-6)


@pytest.mark.parametrize("saved", [False, True])
def test_a_model_hands_its_attention_mask_to_the_experts(tmp_path, saved):
    model = compress(_no_dropout_bert(), targets=["ffn"], n=3, progress=False)
    upcycle_experts(model, experts=4, top_k=2, capacity_factor=None)
    if saved:
        model.save_pretrained(tmp_path / "moe")
        model = load(tmp_path / "moe")
    x = ids(batch=2, length=7)
    mask = torch.ones_like(x)
    mask[1, 2:] = 0
    model.train()
    with torch.no_grad():
        padded = model(input_ids=x, attention_mask=mask).last_hidden_state
        padded_loss = float(router_loss(model))
        each = [model(input_ids=x[:1]).last_hidden_state,
                model(input_ids=x[1:, :2]).last_hidden_state]
    assert float((padded[0] - each[0][0]).abs().max()) < 1e-5
    assert float((padded[1, :2] - each[1][0]).abs().max()) < 1e-5
    # the loss of the padded batch is the loss of its 9 real tokens, padding left out
    moe, _, _ = expert_layers(model)
    hidden = {}
    moe.register_forward_hook(lambda m, a, out: hidden.update(x=a[0]))
    with torch.no_grad():
        model(input_ids=x, attention_mask=mask)
        real = torch.cat([hidden["x"][0], hidden["x"][1, :2]])
        _, _, expected = moe.route(real)
        model(input_ids=x, attention_mask=mask)
    assert float(moe.aux_loss) == pytest.approx(float(expected), abs=1e-6)
    assert float(router_loss(model)) == pytest.approx(padded_loss, abs=1e-6)
    assert moe.token_mask is None  # cleared after the call


def test_feed_forward_chunking_is_turned_off_so_padding_is_read_where_it_is():
    """BERT's ``chunk_size_feed_forward`` runs the block on slices of the sequence, which
    would read the padding mask of the wrong positions: upcycling turns it off, with a
    warning, and the padded batch gives the outputs of its rows alone."""
    bert = _no_dropout_bert()
    bert.config.chunk_size_feed_forward = 2
    for layer in bert.encoder.layer:
        layer.chunk_size_feed_forward = 2
    model = compress(bert, targets=["ffn"], n=3, progress=False)
    with pytest.warns(UserWarning, match=r"chunking \(chunk_size_feed_forward\) turned off"):
        upcycle_experts(model, experts=4, top_k=2, capacity_factor=None)
    assert {layer.chunk_size_feed_forward for layer in model.encoder.layer} == {0}
    x = ids(batch=2, length=6)
    mask = torch.ones_like(x)
    mask[0, 4:] = 0
    with torch.no_grad():
        padded = model(input_ids=x, attention_mask=mask).last_hidden_state
        alone = model(input_ids=x[:1, :4]).last_hidden_state
    assert float((padded[0, :4] - alone[0]).abs().max()) < 1e-5


def test_a_mask_that_does_not_fit_the_tokens_is_refused():
    moe = MixtureOfExperts([nn.Linear(4, 4), nn.Linear(4, 4)], 4)
    moe.token_mask = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention mask \(2, 3\) does not fit the tokens "
                                         r"\(2, 5\)"):
        moe(torch.randn(2, 5, 4))


def test_t5_decoder_experts_take_the_decoders_mask_not_the_encoders():
    from conftest import tiny_t5

    model = compress(tiny_t5(), targets=["ffn"], n=3, progress=False)
    upcycle_experts(model, experts=2, top_k=1)
    seen = []
    for name, module in layer_holder(model).named_modules():
        if isinstance(module, MixtureOfExperts):
            module.register_forward_pre_hook(lambda m, a, name=name: seen.append(
                (name.split(".")[0], None if m.token_mask is None else int(m.token_mask.sum()))))
    x = ids(batch=2, length=7)
    mask = torch.ones_like(x)
    mask[1, 4:] = 0
    with torch.no_grad():  # decoder as long as the encoder: the encoder's mask must not fit
        model.train()(input_ids=x, attention_mask=mask, decoder_input_ids=ids(2, 2, 7))
    assert seen == [("encoder", 11), ("encoder", 11), ("decoder", None), ("decoder", None)]


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_routes_the_rerun_as_the_forward_pass(reentrant):
    def gradients(checkpointing):
        model = compress(_no_dropout_bert(), targets=["ffn"], n=3, progress=False)
        upcycle_experts(model, experts=4, top_k=2, capacity_factor=0.5)
        base = model.base_model.train()
        if checkpointing:
            base.activation_checkpointing_enable({"use_reentrant": reentrant})
        x = ids(batch=2, length=6)
        mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
        base(input_ids=x, attention_mask=mask).last_hidden_state.sum().backward()
        return {n: p.grad for n, p in base.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert max(float((plain[n] - checkpointed[n]).abs().max()) for n in plain) < 1e-5


def test_a_mixture_of_experts_save_loads_into_a_given_model(tmp_path):
    model = compress(tiny_bert(), targets=["ffn"], n=3, progress=False)
    upcycle_experts(model, experts=2, top_k=1)
    model.eval().save_pretrained(tmp_path / "moe")
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).last_hidden_state
        again = load(tmp_path / "moe", model=tiny_bert(seed=5))  # its own, real weights
        assert torch.equal(again(input_ids=x).last_hidden_state, expected)
    assert not any(t.is_meta for t in [*again.parameters(), *again.buffers()])


def test_the_router_scores_in_float32_under_autocast_and_in_a_bfloat16_model():
    """Switch Transformer's selective precision: half-precision router scores flip
    choices (2 of 512 tokens here before the router ran in float32)."""
    torch.manual_seed(0)
    moe = MixtureOfExperts([nn.Linear(64, 64) for _ in range(8)], 64, top_k=1,
                           capacity_factor=None)
    tokens = torch.randn(512, 64) * 4
    gates, chosen, _ = moe.route(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gates_autocast, chosen_autocast, _ = moe.route(tokens)
    assert torch.equal(chosen_autocast, chosen) and torch.equal(gates_autocast, gates)
    half = copy.deepcopy(moe).bfloat16()
    gates_half, chosen_half, loss_half = half.route(tokens.bfloat16())
    assert gates_half.dtype == torch.float32 and loss_half.dtype == torch.float32
    expected = torch.softmax(tokens.bfloat16().float() @ half.router.weight.float().T, -1)
    assert torch.equal(chosen_half[:, 0], expected.argmax(-1))
    loss_half.backward()
    assert half.router.weight.grad is not None


def test_hooks_and_a_peft_lora_on_the_router_change_its_scores():
    """The router is a module that runs: its forward hooks see the tokens, and PEFT's LoRA
    on it changes the choices (it used to read the base weight directly)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    moe = MixtureOfExperts([nn.Linear(16, 16) for _ in range(4)], 16, top_k=1,
                           capacity_factor=None)
    tokens = torch.randn(64, 16)
    seen = []
    handle = moe.router.register_forward_hook(lambda _m, args, out: seen.append(out.shape))
    _, chosen, _ = moe.route(tokens)
    handle.remove()
    assert seen == [(64, 4)]
    wrapped = get_peft_model(nn.Sequential(moe), LoraConfig(target_modules=["0.router"], r=2,
                                                            init_lora_weights=False))
    routed = wrapped.base_model.model[0]
    with torch.no_grad():
        delta = routed.router(tokens) - tokens @ routed.router.base_layer.weight.T
        _, lora_chosen, _ = routed.route(tokens)
    assert float(delta.abs().max()) > 0.1
    assert not torch.equal(lora_chosen, chosen)
