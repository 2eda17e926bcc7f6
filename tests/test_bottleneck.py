"""Bottleneck adapters per layer (issue 14, MPOBERT's optional adapters): identity at the
start, parameter counts, what LFA trains, sharing beside them, and save/load."""

import copy
import json

import pytest
import torch
from transformers import BertConfig, BertModel

from mpotn.compression import compress, load, share_centrals
from mpotn.compression.bottleneck import add_bottleneck_adapters, bottleneck_spec
from mpotn.compression.parameters import lfa_parameters
from mpotn.compression.serialization import CONFIG_NAME
from mpotn.compression.sharing import shared_central_groups
from mpotn.layers.bottleneck import Adapted, BottleneckAdapter

HIDDEN, LAYERS, SIZE = 32, 3, 8
PER_ADAPTER = 2 * HIDDEN * SIZE + HIDDEN + SIZE  # down and up weights, their biases


def tiny_bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=97, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                num_attention_heads=2, intermediate_size=48)).eval()


def ids():
    torch.manual_seed(1)
    return torch.randint(0, 97, (2, 6))


def test_adapters_start_as_the_identity_and_cost_2hm_plus_h_plus_m():
    model = compress(tiny_bert(), targets=["attention", "ffn"], n=3, progress=False)
    before_total = model.totals()["total_params"]
    with torch.no_grad():
        before = model(ids()).last_hidden_state
    report = add_bottleneck_adapters(model, size=SIZE)
    assert [r["type"] for r in report] == ["attn_out", "ffn_out"] * LAYERS
    assert {r["params"] for r in report} == {PER_ADAPTER}
    assert model.totals()["total_params"] == before_total + 2 * LAYERS * PER_ADAPTER
    with torch.no_grad():
        assert torch.equal(model(ids()).last_hidden_state, before)
    assert "encoder.layer.0.output.dense.layer" in model.mpo_layers()


def test_lfa_trains_the_adapters_with_the_auxiliary_tensors():
    model = compress(tiny_bert(), targets=["ffn"], n=3, progress=False)
    add_bottleneck_adapters(model, size=SIZE)
    chosen = {name for name, _ in lfa_parameters(model.base_model)}
    adapter = "encoder.layer.1.attention.output.dense.adapter"
    assert {f"{adapter}.{p}" for p in ("down.weight", "down.bias", "up.weight", "up.bias")
            } <= chosen
    assert "encoder.layer.1.output.dense.layer.cores.0" in chosen
    assert "encoder.layer.1.output.dense.layer.cores.1" not in chosen  # the central


def test_shared_centrals_and_adapters_save_and_load_together(tmp_path):
    model = compress(tiny_bert(), targets=["attention", "ffn"], n=3, progress=False)
    add_bottleneck_adapters(model, size=SIZE)
    share_centrals(model, init="layer")
    groups = shared_central_groups(model)
    assert len(groups) == 6 and all(name.endswith(".layer") for name in groups[3])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BottleneckAdapter):
                module.up.weight.normal_(0, 0.1)  # as if trained
        expected = model(ids()).last_hidden_state
    model.save_pretrained(tmp_path / "saved")
    again = load(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(ids()).last_hidden_state, expected)
    assert bottleneck_spec(again) == bottleneck_spec(model) and len(bottleneck_spec(again)) == 6
    assert shared_central_groups(again) == groups
    assert isinstance(again.base_model.get_submodule("encoder.layer.2.output.dense"), Adapted)


def test_bad_adapter_settings_and_edited_saves_are_refused(tmp_path):
    with pytest.raises(ValueError, match="size must be a whole number >= 1"):
        add_bottleneck_adapters(tiny_bert(), size=0)
    with pytest.raises(ValueError, match="no matrix of types"):
        add_bottleneck_adapters(tiny_bert(), types=["nothing"])
    model = compress(tiny_bert(), targets=["ffn"], n=3, progress=False)
    add_bottleneck_adapters(model, size=SIZE)
    with pytest.raises(ValueError, match="without an adapter"):
        add_bottleneck_adapters(model, size=SIZE)  # every one has an adapter already
    model.save_pretrained(tmp_path)
    path = tmp_path / CONFIG_NAME
    config = json.loads(path.read_text())
    edited = copy.deepcopy(config)
    edited["bottleneck_adapters"]["encoder.layer.0.output.dense"] = -1
    path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="invalid bottleneck_adapters"):
        load(tmp_path)


def test_merge_keeps_the_adapters_and_warns():
    model = compress(tiny_bert(), targets=["ffn"], n=3, progress=False)
    add_bottleneck_adapters(model, size=SIZE)
    with torch.no_grad():
        expected = model(ids()).last_hidden_state
    with pytest.warns(UserWarning, match="bottleneck adapters"):
        dense = model.merge()
    assert type(dense.get_submodule("encoder.layer.0.output.dense.layer")) is torch.nn.Linear
    with torch.no_grad():
        assert float((dense(ids()).last_hidden_state - expected).abs().max()) < 1e-5


def test_adapters_on_t5_keep_its_feed_forward_working(tmp_path):
    from conftest import tiny_t5

    t5 = tiny_t5().eval()
    x = torch.randint(1, 97, (2, 5))
    with torch.no_grad():
        expected = t5(input_ids=x, decoder_input_ids=x).logits
    model = compress(copy.deepcopy(t5), targets=["ffn"], n=3, progress=False)
    add_bottleneck_adapters(model, size=4)
    wo = model.base_model.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo")
    assert wo.weight.dtype == torch.float32  # T5 reads wo.weight: the wrapped layer's
    assert torch.equal(wo.weight, wo.layer.weight)
    with torch.no_grad():
        got = model(input_ids=x, decoder_input_ids=x).logits
    assert float((got - expected).abs().max()) < 1e-3  # full-rank MPOs, identity adapters
    model.save_pretrained(tmp_path / "t5")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "t5")(input_ids=x, decoder_input_ids=x).logits, got)
