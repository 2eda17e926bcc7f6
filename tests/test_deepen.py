"""Deeper models whose new layers share the central tensors (issue 14, MPOBERT):
deepen's placement, sharing, parameter counts, save/load and refusals."""

import copy
import json

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    ElectraConfig,
    ElectraModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from mpotn.compression import compress, deepen, load
from mpotn.compression.config import MPO_LAYERS
from mpotn.compression.serialization import CONFIG_NAME
from mpotn.compression.sharing import share_centrals, shared_central_groups

LAYERS = 3
TINY = {"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": LAYERS,
        "num_attention_heads": 2, "intermediate_size": 48}


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(**TINY)).eval()


def shared(bert):
    model = compress(copy.deepcopy(bert), targets=["attention", "ffn"], n=3, progress=False)
    share_centrals(model, init="layer")
    return model.eval()


def ids():
    return torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))


def output(model):
    with torch.no_grad():
        return model(input_ids=ids()).last_hidden_state


def non_central(layer):
    """Parameters of an encoder layer other than its MPO layers' central tensors."""
    centrals = {id(m.central) for m in layer.modules() if isinstance(m, MPO_LAYERS)}
    return sum(p.numel() for p in layer.parameters() if id(p) not in centrals)


@pytest.fixture(scope="module")
def deeper(bert):
    model = shared(bert)
    before = {"totals": model.totals(), "layers": list(model.encoder.layer),
              "centrals": {n: m.central for n, m in model.mpo_layers().items()}}
    report = deepen(model, depth=6)
    return model, report, before


def test_three_layers_become_six_sharing_the_same_centrals(deeper):
    model, report, before = deeper
    stack = model.encoder.layer
    assert len(stack) == 6 and model.config.num_hidden_layers == 6
    assert [(row["layer"], row["copy_of"]) for row in report] == [(1, 0), (3, 2), (5, 4)]
    assert [stack[i] for i in (0, 2, 4)] == before["layers"]  # the originals, moved
    assert [layer.attention.self.layer_idx for layer in stack] == list(range(6))
    assert torch.isfinite(output(model)).all()
    layers = model.mpo_layers()
    for i in range(6):  # layer i copies (or is) original layer i // 2
        for kind in ("attention.self.query", "attention.output.dense", "intermediate.dense",
                     "output.dense"):
            assert layers[f"encoder.layer.{i}.{kind}"].central is before["centrals"][
                f"encoder.layer.{i // 2}.{kind}"]
            assert layers[f"encoder.layer.{i}.{kind}"].central is layers[
                f"encoder.layer.0.{kind}"].central
    groups = shared_central_groups(model)
    assert len(groups) == 6 and all(len(names) == 6 for names in groups)
    assert groups[0] == [f"encoder.layer.{i}.attention.self.query" for i in range(6)]


def test_new_layers_copy_their_neighbour_except_the_central(deeper):
    model, report, _ = deeper
    stack = model.encoder.layer
    for row in report:
        new, old = stack[row["layer"]], stack[row["copy_of"]]
        new_params = dict(new.named_parameters(remove_duplicate=False))
        for name, param in old.named_parameters(remove_duplicate=False):
            assert torch.equal(new_params[name], param)
            if name.endswith("cores.1"):  # the central: the same object
                assert new_params[name] is param
            else:  # auxiliary tensors, biases, norms: the layer's own
                assert new_params[name] is not param
        assert row["shared_centrals"] == 6 and row["dense_params"] == 0
        assert row["params"] == row["lfa_params"] == non_central(new)


def test_parameter_count_grows_by_the_new_layers_non_central_parameters_only(deeper):
    model, report, before = deeper
    added = sum(non_central(model.encoder.layer[row["layer"]]) for row in report)
    assert added == sum(row["params"] for row in report)
    assert added == 3 * non_central(before["layers"][0])
    totals = model.totals()
    assert totals["total_params"] - before["totals"]["total_params"] == added
    assert totals["lfa_trainable_params"] - before["totals"]["lfa_trainable_params"] == added
    assert totals["central_params"] == before["totals"]["central_params"]


def test_the_report_rows_follow_their_layers(deeper):
    model, _, _ = deeper
    names = [row["name"] for row in model.report()]
    assert len(names) == 6 * LAYERS
    assert "encoder.layer.2.attention.self.query" in names  # original layer 1, moved
    assert "encoder.layer.1.attention.self.query" not in names  # a copy: not compressed
    row = next(r for r in model.report() if r["name"] == "encoder.layer.4.output.dense")
    assert row["layer"] == 4


def test_an_update_of_a_shared_central_reaches_old_and_new_layers(deeper):
    model, _, _ = deeper
    model = copy.deepcopy(model)  # deepcopy keeps the sharing
    layers = model.mpo_layers()
    names = [f"encoder.layer.{i}.output.dense" for i in range(6)]
    before = {n: layers[n].matrix().detach().clone() for n in names}
    with torch.no_grad():
        layers[names[0]].central.add_(0.01)
    for n in names:
        assert not torch.equal(layers[n].matrix(), before[n])


def test_save_and_load_restore_the_deeper_model_exactly(deeper, tmp_path):
    model, _, _ = deeper
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["base_model"]["config"]["num_hidden_layers"] == 6
    assert config["shared_centrals"] == shared_central_groups(model)
    again = load(tmp_path)
    assert len(again.encoder.layer) == 6 and again.config.num_hidden_layers == 6
    assert shared_central_groups(again) == shared_central_groups(model)
    layers = again.mpo_layers()
    for names in shared_central_groups(again):
        assert all(layers[n].central is layers[names[0]].central for n in names)
    assert again.totals() == model.totals()
    assert torch.equal(output(again), output(model))
    state, loaded = model.base_model.state_dict(), again.base_model.state_dict()
    assert state.keys() == loaded.keys()
    assert all(torch.equal(state[k], loaded[k]) for k in state)


@pytest.mark.parametrize(("depth", "placement", "expected"), [
    (5, "interleave", [(2, 1), (4, 3)]),
    (4, "interleave", [(3, 2)]),
    (9, "interleave", [(1, 0), (2, 0), (4, 3), (5, 3), (7, 6), (8, 6)]),
    (5, "append", [(3, 2), (4, 2)]),
])
def test_placements(bert, depth, placement, expected):
    model = shared(bert)
    before = model.totals()["total_params"]
    report = deepen(model, depth=depth, placement=placement)
    assert [(row["layer"], row["copy_of"]) for row in report] == expected
    assert len(model.encoder.layer) == model.config.num_hidden_layers == depth
    assert all(len(names) == depth for names in shared_central_groups(model))
    assert model.totals()["total_params"] - before == sum(row["params"] for row in report)
    assert torch.isfinite(output(model)).all()


def test_the_same_depth_changes_nothing(bert):
    model = shared(bert)
    expected = output(model)
    assert list(deepen(model, depth=LAYERS)) == []
    assert len(model.encoder.layer) == LAYERS
    assert torch.equal(output(model), expected)


def test_refusals(bert):
    model = shared(bert)
    with pytest.raises(ValueError, match=r"only adds layers: depth=2 is below the model's 3"):
        deepen(model, depth=2)
    with pytest.raises(ValueError, match="placement must be one of"):
        deepen(model, depth=6, placement="middle")
    with pytest.raises(ValueError, match="depth must be a whole number"):
        deepen(model, depth=6.0)
    unshared = compress(copy.deepcopy(bert), targets=["attention", "ffn"], n=3, progress=False)
    with pytest.raises(ValueError, match=r"share its central tensor.*call share_centrals"):
        deepen(unshared, depth=6)
    with pytest.raises(ValueError, match="one stack of compressed layers"):
        deepen(copy.deepcopy(bert), depth=6)  # nothing compressed
    assert len(model.encoder.layer) == len(unshared.encoder.layer) == LAYERS


def test_roberta_classifier_and_electra(tmp_path):
    torch.manual_seed(1)
    roberta = RobertaForSequenceClassification(RobertaConfig(
        **TINY, max_position_embeddings=40, num_labels=2)).eval()
    model = compress(roberta, targets=["attention", "ffn"], n=3, progress=False)
    share_centrals(model, init="layer")
    report = deepen(model, depth=4, placement="append")
    assert [row["name"] for row in report] == ["roberta.encoder.layer.3"]
    assert len(model.roberta.encoder.layer) == model.config.num_hidden_layers == 4
    model.eval().save_pretrained(tmp_path)
    again = load(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids()).logits, model(input_ids=ids()).logits)
    assert shared_central_groups(again) == shared_central_groups(model)
    electra = compress(ElectraModel(ElectraConfig(**TINY, embedding_size=16)),
                       targets=["ffn"], n=3, progress=False)
    share_centrals(electra, init="fit", sweeps=1)
    before = electra.totals()["total_params"]
    report = deepen(electra, depth=6)
    assert len(electra.encoder.layer) == 6
    # attention stays dense here: its weights are copied (dense_params), the FFN's
    # centrals shared
    assert all(row["dense_params"] == 4 * 32 * 32 and row["shared_centrals"] == 2
               for row in report)
    assert electra.totals()["total_params"] - before == sum(row["params"] for row in report)


def test_a_deeper_qwen2_keeps_each_layers_attention_type_and_its_cache():
    """Qwen2's config lists each layer's attention (full or sliding window): the copies take
    their neighbour's, and generation with the cache gives the logits of a full pass."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_sliding_window=True, sliding_window=4, max_window_layers=1)).eval()
    assert qwen.config.layer_types == ["full_attention", "sliding_attention"]
    model = compress(qwen, targets=["ffn"], n=3, progress=False)
    share_centrals(model, init="layer")
    deepen(model, depth=4)
    assert model.config.layer_types == ["full_attention", "full_attention",
                                        "sliding_attention", "sliding_attention"]
    tokens = ids()[:1]
    with torch.no_grad():
        full = model(input_ids=tokens).logits
        first = model(input_ids=tokens[:, :-1], use_cache=True)
        last = model(input_ids=tokens[:, -1:], cache=first.cache).logits
    torch.testing.assert_close(last[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


def test_a_deeper_model_heals_from_its_shallow_original_at_matched_layers():
    from mpotn.compression.models import load_tokenizer
    from mpotn.finetune.heal import HealConfig, heal, matched_layers

    assert matched_layers(6, 3) == [0, 2, 4, 6]
    torch.manual_seed(0)  # the tokenizer's vocabulary, so that real sentences fit
    bert = BertModel(BertConfig(**{**TINY, "vocab_size": 30522})).eval()
    model = shared(bert)
    deepen(model, depth=6)
    sentences = ["a fine film .", "dull and slow .", "it works .", "not at all ."] * 4
    config = HealConfig(steps=4, batch_size=4, heldout=4, learning_rate=5e-4)
    result = heal(model, bert, load_tokenizer(), sentences, config, progress=False)
    assert result.steps == 4 and result.mse_after < result.mse_before
    assert len(model.encoder.layer) == 6


@pytest.mark.parametrize(("placement", "origins"), [("append", [0, 1, 2, 2, 2]),
                                                    ("interleave", [0, 1, 1, 2, 2])])
def test_healing_compares_each_original_layer_after_its_copies(placement, origins, tmp_path):
    from mpotn.compression.deepen import layer_origins
    from mpotn.compression.models import load_tokenizer
    from mpotn.finetune.heal import hidden_state_mse

    torch.manual_seed(0)  # the tokenizer's vocabulary, so that real sentences fit
    teacher = shared(BertModel(BertConfig(**{**TINY, "vocab_size": 30522})).eval())
    model = copy.deepcopy(teacher)
    deepen(model, depth=5, placement=placement)
    assert layer_origins(model) == origins
    model.save_pretrained(tmp_path)
    again = load(tmp_path)
    assert layer_origins(again) == origins
    errors = hidden_state_mse(again, teacher, load_tokenizer(), ["a fine film ."],
                              per_layer=True)
    assert len(errors) == 4
    # before any copy the student's hidden states are the teacher's own
    exact = {"append": 3, "interleave": 2}[placement]
    assert errors[:exact] == [pytest.approx(0.0, abs=1e-12)] * exact
    assert min(errors[exact:]) > 1e-4  # a copy applies its layer once more


def test_origins_compose_when_deepened_twice(bert):
    from mpotn.compression.deepen import layer_origins

    model = shared(bert)
    deepen(model, depth=4, placement="append")
    deepen(model, depth=8)
    assert layer_origins(model) == [0, 0, 1, 1, 2, 2, 2, 2]
