"""Central tensors shared across layers (issue 14, MPOBERT): share_centrals, counts,
training, save/load, cutting a shared bond (squeezing) and the refusal of load_mpo."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import BertConfig, BertModel

from mpotn.compression import compress, load
from mpotn.compression.parameters import count_parameters, lfa_parameters
from mpotn.compression.serialization import CONFIG_NAME
from mpotn.compression.sharing import (
    cut_shared_bond,
    share_centrals,
    shared_bond_spectrum,
    shared_central_groups,
)
from mpotn.finetune.squeeze import (
    SqueezeConfig,
    Squeezer,
    SqueezeState,
    candidates,
    cut,
    direct_truncation,
    estimated_error,
    squeeze_units,
    unit_spectrum,
)
from mpotn.finetune.strategies import apply_strategy
from mpotn.finetune.training import TrainingConfig

#: Layers of the tiny BERT, and the central tensor sizes |C| of its matrix types
#: (32 x 32: bonds (1, 4, 16, 1), C is 4 x 4 x 4 x 16; 32 x 48 / 48 x 32: 6 x 4 x 4 x 16).
LAYERS = 3
CENTRAL = {"query": 1024, "key": 1024, "value": 1024, "attn_out": 1024, "ffn_in": 1536,
           "ffn_out": 1536}
SAVED = (LAYERS - 1) * sum(CENTRAL.values())  # 14336
QUERY = [f"encoder.layer.{i}.attention.self.query" for i in range(LAYERS)]


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=LAYERS,
                                num_attention_heads=2, intermediate_size=48)).eval()


@pytest.fixture(scope="module")
def bert():
    return tiny_bert()


def compressed(bert):
    return compress(copy.deepcopy(bert), targets=["attention", "ffn"], n=3, progress=False)


@pytest.fixture(scope="module")
def shared_layer(bert):
    model = compressed(bert)
    before = {"totals": model.totals(),
              "matrices": {n: m.matrix().detach().clone() for n, m in model.mpo_layers().items()}}
    report = share_centrals(model, init="layer")
    return model, report, before


@pytest.fixture(scope="module")
def shared_fit(bert):
    model = compressed(bert)
    matrices = {n: m.matrix().detach().clone() for n, m in model.mpo_layers().items()}
    report = share_centrals(model, init="fit", sweeps=3)
    return model, report, matrices


def ids():
    return torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))


def output(model):
    with torch.no_grad():
        return model(input_ids=ids()).last_hidden_state


def test_one_parameter_object_is_the_central_of_every_layer_of_a_group(shared_layer):
    model, report, _ = shared_layer
    layers = model.mpo_layers()
    groups = shared_central_groups(model)
    assert [row["group"] for row in report if row["kind"] == "group"] == list(CENTRAL)
    assert len(groups) == 6 and groups[0] == QUERY
    for names in groups:
        shared = layers[names[0]].central
        assert isinstance(shared, nn.Parameter) and shared.numel() == CENTRAL[
            report[[r["name"] for r in report].index(names[0])]["group"]]
        for name in names:
            layer = layers[name]
            assert layer.central is shared and layer.cores[layer.central_index] is shared
            assert layer.central.data_ptr() == shared.data_ptr()
        auxiliary = [id(c) for name in names for c in layers[name].auxiliary]
        assert len(set(auxiliary)) == 2 * LAYERS  # each layer keeps its own
    assert sum(p is layers[QUERY[0]].central for p in model.parameters()) == 1


def test_counts_take_a_shared_central_once(shared_layer):
    model, report, before = shared_layer
    totals = model.totals()
    assert before["totals"]["total_params"] == 48200
    assert totals["total_params"] == 48200 - SAVED == 33864
    assert sum(row["saved_params"] for row in report if row["kind"] == "group") == SAVED
    assert count_parameters(model.parameters()) == totals["total_params"]
    assert totals["central_params"] == before["totals"]["central_params"] - SAVED
    # #Pr (auxiliary tensors, biases, norms) does not change: no central is in it
    assert totals["lfa_trainable_params"] == before["totals"]["lfa_trainable_params"]
    names = [name for name, _ in lfa_parameters(model.base_model)]
    assert not any(name.endswith("cores.1") for name in names)


def test_strategies_train_the_shared_central_once(bert):
    model = compressed(bert)
    share_centrals(model, init="layer")
    central = apply_strategy(model.base_model, "central")
    assert central["trainable_params"] == sum(CENTRAL.values()) == 7168
    lfa = apply_strategy(model.base_model, "lfa")
    assert lfa["trainable_params"] == model.totals()["lfa_trainable_params"]
    assert all(not layer.central.requires_grad for layer in model.mpo_layers().values())


def test_layer_init_takes_the_first_layers_central(shared_layer):
    model, report, before = shared_layer
    rows = {row["name"]: row for row in report if row["kind"] == "layer"}
    for names in shared_central_groups(model):
        assert rows[names[0]]["layer_init_error"] < 1e-6  # its own central, unchanged
        for name in names[1:]:  # random layers: another layer's central is far off
            assert rows[name]["layer_init_error"] > 1.2
            assert rows[name]["error"] == rows[name]["layer_init_error"]
    for name, layer in model.mpo_layers().items():
        m = before["matrices"][name]
        actual = float((layer.matrix().detach() - m).norm() / m.norm())
        assert actual == pytest.approx(rows[name]["error"], rel=1e-4, abs=1e-6)


def test_fit_init_is_closer_than_layer_init_on_every_group(shared_fit):
    model, report, matrices = shared_fit
    groups = [row for row in report if row["kind"] == "group"]
    assert len(groups) == 6
    for row in groups:
        assert row["error"] <= row["layer_init_error"]
        assert row["layer_init_error"] > 1.1 and row["error"] < 0.7
    rows = {row["name"]: row for row in report if row["kind"] == "layer"}
    for name, layer in model.mpo_layers().items():
        m = matrices[name]
        actual = float((layer.matrix().detach() - m).norm() / m.norm())
        assert actual == pytest.approx(rows[name]["error"], rel=1e-4, abs=1e-6)
    assert model.totals()["total_params"] == 48200 - SAVED


def test_fit_reproduces_identical_layers_exactly():
    bert = tiny_bert(1)
    with torch.no_grad():
        for layer in bert.encoder.layer[1:]:
            layer.load_state_dict(bert.encoder.layer[0].state_dict())
    model = compressed(bert)
    matrices = {n: m.matrix().detach().clone() for n, m in model.mpo_layers().items()}
    report = share_centrals(model, init="fit", sweeps=2)
    assert max(row["error"] for row in report) < 1e-6
    for name, layer in model.mpo_layers().items():
        assert float((layer.matrix().detach() - matrices[name]).abs().max()) < 1e-6


def test_explicit_groups_of_consecutive_layers(bert):
    model = compressed(bert)
    report = share_centrals(model, groups=[QUERY[:2]], init="fit", sweeps=1)
    assert [row["group"] for row in report] == ["group 0"] * 3
    assert shared_central_groups(model) == [QUERY[:2]]
    layers = model.mpo_layers()
    assert layers[QUERY[2]].central is not layers[QUERY[0]].central
    assert model.totals()["total_params"] == 48200 - CENTRAL["query"]


def test_mismatched_or_bad_groups_are_refused(bert):
    model = compressed(bert)
    mismatched = [QUERY[0], "encoder.layer.0.intermediate.dense"]
    with pytest.raises(ValueError, match=r"col_shape of 'encoder.layer.0.intermediate.dense' "
                                         r"is \[3, 4, 4\].*compress them with the same n"):
        share_centrals(model, groups=[mismatched])
    with pytest.raises(ValueError, match="not an MPO layer"):
        share_centrals(model, groups=[[QUERY[0], "pooler.dense"]])
    with pytest.raises(ValueError, match="more than one group"):
        share_centrals(model, groups=[QUERY[:2], QUERY[1:]])
    with pytest.raises(ValueError, match="two or more"):
        share_centrals(model, groups=[QUERY[:1]])
    with pytest.raises(ValueError, match="init must be one of"):
        share_centrals(model, init="mean")
    assert shared_central_groups(model) == []  # nothing was changed


def test_a_training_step_updates_the_shared_central_once(bert):
    model = compressed(bert)
    share_centrals(model, init="layer")
    model.eval()  # no dropout: both models compute the same function
    untied = copy.deepcopy(model)  # the same values, each layer its own central
    for layer in untied.mpo_layers().values():
        layer.cores[layer.central_index] = nn.Parameter(layer.central.detach().clone())
    assert shared_central_groups(untied) == []
    weights = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(4))
    for m in (model, untied):  # (the squared norm of a LayerNorm output is constant)
        m.zero_grad()
        (m(input_ids=ids()).last_hidden_state * weights).sum().backward()
    layers, separate = model.mpo_layers(), untied.mpo_layers()
    shared = layers[QUERY[0]].central
    expected = sum(separate[name].central.grad for name in QUERY)
    assert float(expected.norm()) > 1e-3
    assert torch.allclose(shared.grad, expected, atol=1e-6)
    before = {name: layers[name].matrix().detach().clone() for name in QUERY}
    value = shared.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.step()
    assert torch.allclose(shared, value - 0.1 * expected, atol=1e-6)  # one step, not three
    for name in QUERY:
        assert layers[name].central is shared
        assert not torch.equal(layers[name].matrix(), before[name])  # every user sees it


def test_save_and_load_keep_the_sharing(shared_fit, tmp_path, load_onto_meta):
    model, _, _ = shared_fit
    model.eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["format_version"] == 1
    assert config["shared_centrals"] == shared_central_groups(model)
    with safe_open(str(tmp_path / config["weights"]), framework="pt") as handle:
        names = handle.keys()  # a safe_open handle is not iterable
    centrals = [k for k in names if k.endswith("cores.1")]
    assert len(centrals) == 6  # one tensor per group, not per layer
    again = load(tmp_path)
    assert shared_central_groups(again) == shared_central_groups(model)
    layers = again.mpo_layers()
    for names in shared_central_groups(again):
        assert all(layers[n].central is layers[names[0]].central for n in names)
        assert len({layers[n].central.data_ptr() for n in names}) == 1
    assert torch.equal(output(again), output(model))
    assert again.totals() == model.totals()
    on_meta = load_onto_meta(tmp_path)  # onto a device: still one tensor per group
    meta_layers = on_meta.mpo_layers()
    assert shared_central_groups(on_meta) == shared_central_groups(model)
    for names in shared_central_groups(on_meta):
        assert all(meta_layers[n].central is meta_layers[names[0]].central for n in names)
        assert meta_layers[names[0]].central.is_meta
    with pytest.raises(ValueError, match="shared by 3 layers"):
        layers[QUERY[1]].load_mpo(layers[QUERY[1]].mpo())


def test_saves_without_sharing_have_no_new_field(bert, tmp_path):
    model = compressed(bert)
    model.save_pretrained(tmp_path)
    assert "shared_centrals" not in json.loads((tmp_path / CONFIG_NAME).read_text())
    assert shared_central_groups(load(tmp_path)) == []


def test_load_mpo_refuses_a_shared_central_and_keeps_working_elsewhere(bert):
    model = compressed(bert)
    share_centrals(model, groups=[QUERY[:2]], init="layer")
    layers = model.mpo_layers()
    with pytest.raises(ValueError, match="this layer's central tensor is shared by 2 layers"):
        layers[QUERY[0]].load_mpo(layers[QUERY[0]].mpo().truncate(max_bond=2))
    assert layers[QUERY[0]].central is layers[QUERY[1]].central
    assert layers[QUERY[0]].bond_dims == (1, 4, 16, 1)
    layers[QUERY[2]].load_mpo(layers[QUERY[2]].mpo().truncate(max_bond=2))  # not shared
    assert layers[QUERY[2]].bond_dims == (1, 2, 2, 1)


def identical_queries(bert):
    """The compressed tiny BERT with every layer's query set to layer 0's, shared."""
    twin = copy.deepcopy(bert)
    for layer in twin.encoder.layer[1:]:
        layer.attention.self.query.load_state_dict(
            twin.encoder.layer[0].attention.self.query.state_dict())
    model = compressed(twin)
    share_centrals(model, groups=[QUERY], init="layer")
    return model


def test_cutting_a_shared_bond_cuts_every_layer_with_one_projection(bert):
    model = identical_queries(bert)
    layers = [model.mpo_layers()[name] for name in QUERY]
    single = layers[0].mpo()  # each layer alone, in its canonical form
    best = single.truncate(bond_dims={2: 8}).to_matrix().double()
    bound = single.truncate(bond_dims={2: 8}).error_bound / single.norm
    spectrum = shared_bond_spectrum(layers, 2)
    # three identical layers: each value is sqrt(3) times the bond's singular value
    expected = [3 ** 0.5 * v for v in single.singular_values[1].tolist()]
    assert spectrum["values"][:16] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert spectrum["norm"] == pytest.approx(3 ** 0.5 * single.norm, rel=1e-5)
    result = cut(model, QUERY[0], 2, 8)
    assert len({layer.central.data_ptr() for layer in layers}) == 1
    assert all(layer.bond_dims == (1, 4, 8, 1) for layer in layers)
    for layer in layers:  # identical layers: the optimal single-bond cut of each
        assert torch.allclose(layer.matrix().detach().double(), best, atol=1e-5)
    assert result["error"] == pytest.approx(bound, rel=1e-4)
    assert result["error"] == pytest.approx(estimated_error(spectrum, 8), rel=1e-4)
    with pytest.raises(ValueError, match="this layer's central tensor is shared by 3 layers"):
        layers[1].load_mpo(layers[1].mpo())


def test_cutting_a_shared_bond_of_different_layers_counts_the_central_once(bert):
    model = compressed(bert)
    share_centrals(model, init="fit", sweeps=2)
    layers = [model.mpo_layers()[name] for name in QUERY]
    before = model.totals()["total_params"]
    matrices = [layer.matrix().detach().double() for layer in layers]
    result = cut(model, QUERY[1], 1, 2)  # the left bond of C, from 4 to 2
    assert len({layer.central.data_ptr() for layer in layers}) == 1
    assert layers[0].central.shape == (2, 4, 4, 16)
    # freed per unit of the bond: each layer's first core (1 x i1 x j1, i1 j1 = 4) and the
    # central's 4 x 4 x 16, once
    assert before - model.totals()["total_params"] == 2 * (3 * 4 + 256)
    lost = sum(float((layer.matrix().detach().double() - m).pow(2).sum())
               for layer, m in zip(layers, matrices))
    assert result["error"] == pytest.approx((lost / sum(float(m.pow(2).sum())
                                                        for m in matrices)) ** 0.5, rel=1e-6)
    with pytest.raises(ValueError, match="pass the whole group"):
        cut_shared_bond(layers[:2], 2, 4)
    with pytest.raises(ValueError, match="not a bond of the shared central"):
        cut_shared_bond(layers, 3, 1)
    with pytest.raises(ValueError, match="is a boundary of the chain"):
        cut_shared_bond(layers, 0, 1)


def test_a_squeeze_step_and_direct_truncation_keep_the_sharing(tiny_bert, tmp_path):
    from mpotn.data import sst2_sample
    from mpotn.finetune.training import prepare_model

    data = sst2_sample()
    training = TrainingConfig(strategy="lfa", batch_size=8, train_limit=16, eval_limit=16)
    model, tokenizer = prepare_model(tiny_bert, data, training, targets=["attention", "ffn"],
                                     progress=False)
    share_centrals(model, init="layer")
    groups = shared_central_groups(model)
    squeezer = Squeezer(model, tokenizer, data, SqueezeConfig(cut=0.5, step_limit=1,
                                                              training_steps=1),
                        training, tmp_path / "run", progress=False)
    result = squeezer.run()
    cutting = squeezer.state.cuts[0]
    group = next(g for g in groups if cutting["matrix"] in g)
    layers = [result.model.mpo_layers()[name] for name in group]
    assert len({layer.central.data_ptr() for layer in layers}) == 1
    assert {layer.bond_dims[cutting["bond"]] for layer in layers} == {cutting["new_dim"]}
    assert shared_central_groups(result.model) == groups
    again = load(tmp_path / "run" / "model")
    assert shared_central_groups(again) == groups
    dims = {name: list(layer.bond_dims) for name, layer in result.model.mpo_layers().items()}
    fresh, _ = prepare_model(tiny_bert, data, training, targets=["attention", "ffn"],
                             progress=False)
    share_centrals(fresh, init="layer")
    direct_truncation(fresh, tokenizer, data, dims, training, 0, progress=False)
    assert {n: list(m.bond_dims) for n, m in fresh.mpo_layers().items()} == dims
    assert shared_central_groups(fresh) == groups
    uneven = {**dims, group[0]: [1, 1, 1, 1]}
    with pytest.raises(ValueError, match="must all be given the same bond dimensions"):
        direct_truncation(fresh, tokenizer, data, uneven, training, 0, progress=False)


def test_an_edited_shared_centrals_field_is_refused(shared_layer, tmp_path):
    model, _, _ = shared_layer
    model.save_pretrained(tmp_path)
    path = tmp_path / CONFIG_NAME
    config = json.loads(path.read_text())
    config["shared_centrals"] = [QUERY[:1]]
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="invalid shared_centrals"):
        load(tmp_path)
    config["shared_centrals"] = [QUERY[:2]]  # well-formed, but not what was saved
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="was edited after it was saved"):
        load(tmp_path)


def test_adapters_and_merge_respect_the_sharing(bert, tmp_path):
    model = compressed(bert)
    share_centrals(model, init="layer")
    model.save_pretrained(tmp_path / "base")
    tuned = load(tmp_path / "base")
    assert apply_strategy(tuned.base_model, "central")["trainable_params"] == 7168
    with torch.no_grad():
        for layer in tuned.mpo_layers().values():
            layer.central.add_(0.01)  # three times on each shared tensor
    tuned.save_pretrained(tmp_path / "adapter", adapter_only=True)
    again = load(tmp_path / "adapter", base=tmp_path / "base")
    assert shared_central_groups(again) == shared_central_groups(tuned)
    assert torch.equal(output(again), output(tuned.eval()))
    expected = output(tuned)
    dense = copy.deepcopy(tuned).merge()
    assert float((output(dense) - expected).abs().max()) < 1e-5


def test_an_adapter_of_a_shared_central_saved_under_another_of_its_names(tmp_path):
    torch.manual_seed(0)
    names = ["8", "9", "10"]  # the save keeps the tensor as 10's, training names it 8's
    model = compress(nn.Sequential(*[nn.Linear(16, 16) for _ in range(11)]), targets=names,
                     n=3, progress=False)
    share_centrals(model, groups=[names], init="layer")
    model.save_pretrained(tmp_path / "base")
    tuned = load(tmp_path / "base", model=nn.Sequential(*[nn.Linear(16, 16) for _ in range(11)]))
    apply_strategy(tuned.base_model, "central")
    with torch.no_grad():
        tuned.base_model[8].central.add_(0.01)
    tuned.save_pretrained(tmp_path / "adapter", adapter_only=True)
    again = load(tmp_path / "adapter", base=tmp_path / "base",
                 model=nn.Sequential(*[nn.Linear(16, 16) for _ in range(11)]))
    assert again.base_model[10].central is again.base_model[8].central
    x = torch.randn(3, 16)
    assert torch.equal(again.base_model(x), tuned.base_model.eval()(x))


def test_a_shared_central_is_drawn_once_with_every_layer_chain(shared_layer, tmp_path):
    from mpotn.analysis.inspection import draw_shared_centrals
    from mpotn.network import shared_graph

    model, _, _ = shared_layer
    paths = draw_shared_centrals(model, tmp_path)
    assert len(paths) == 6 and all(path.stat().st_size > 10_000 for path in paths.values())
    layers = [model.mpo_layers()[name] for name in QUERY]
    graph = shared_graph({f"query {i}": [tuple(c.shape) for c in layer.cores]
                          for i, layer in enumerate(layers)})
    assert graph.number_of_nodes() == 1 + LAYERS * 2  # the central once, two auxiliaries each
    assert graph.degree("central") == 2 * LAYERS
    assert graph.nodes["central"]["params"] == CENTRAL["query"]
    assert sum(a["params"] for _, a in graph.nodes(data=True)) == sum(
        layer.num_params for layer in layers) - (LAYERS - 1) * CENTRAL["query"]


def test_a_group_of_mixed_types_is_cut_only_when_every_type_may_be(bert):
    model = compressed(bert)
    key = "encoder.layer.0.attention.self.key"
    share_centrals(model, groups=[[QUERY[0], key]], init="layer")
    state = SqueezeState()
    state.spectra = {unit: unit_spectrum(model, names)
                     for unit, names in squeeze_units(model).items()}
    assert squeeze_units(model)[QUERY[0]] == [QUERY[0], key]

    def cut_units(types):
        return {row["matrix"] for row in candidates(model, state, SqueezeConfig(types=types))}

    assert cut_units(["query"]) == set(QUERY[1:])  # the group holds a key: left alone
    assert cut_units(["key"]) == {f"encoder.layer.{i}.attention.self.key" for i in (1, 2)}
    assert cut_units(["query", "key"]) == {*QUERY, "encoder.layer.1.attention.self.key",
                                           "encoder.layer.2.attention.self.key"}


def test_sharing_counts_what_it_saves_and_keeps_experts_together(bert):
    from mpotn.compression.experts import upcycle_experts
    model = compress(copy.deepcopy(bert), targets=["ffn"], n=3, progress=False)
    upcycle_experts(model, experts=2, top_k=1)  # each block's experts share one central
    before = model.totals()["total_params"]
    report = share_centrals(model, init="layer")
    groups = [r for r in report if r["kind"] == "group"]
    assert [r["name"] for r in groups] == ["6 layers", "6 layers"]
    # 3 distinct centrals per type become 1: 2 |C| saved, not (6 - 1) |C|
    assert [r["saved_params"] for r in groups] == [2 * CENTRAL["ffn_in"], 2 * CENTRAL["ffn_out"]]
    assert before - model.totals()["total_params"] == sum(r["saved_params"] for r in groups)
    # each compressed matrix's row gets its group and the mean error of its experts
    errors = {r["name"]: r["error"] for r in report if r["kind"] == "layer"}
    for record in model.records:
        layer, part = record["name"].rsplit(".", 2)[0], record["name"].split(".")[-2]
        experts = [errors[f"{layer}.intermediate.experts.{e}.{part}.dense"] for e in (0, 1)]
        assert record["shared_group"] == record["type"]  # one group per matrix type
        assert record["sharing_error"] == pytest.approx(sum(experts) / 2, rel=1e-12)
        # layer 0 gave the central ("layer" init): its experts are as they were
        assert (record["sharing_error"] > 0.1) == (record["layer"] != 0)
    fresh = compress(copy.deepcopy(bert), targets=["ffn"], n=3, progress=False)
    upcycle_experts(fresh, experts=2, top_k=1)
    first = [f"encoder.layer.{i}.intermediate.experts.0.intermediate.dense" for i in range(2)]
    with pytest.raises(ValueError, match=r"experts\.1\.intermediate\.dense.*which sharing "
                                         r"would split; put them in the same group"):
        share_centrals(fresh, groups=[first])


def test_layers_inside_bottleneck_adapters_get_their_sharing_in_the_report(bert):
    from mpotn.compression.bottleneck import add_bottleneck_adapters
    model = compressed(bert)
    add_bottleneck_adapters(model, 4)  # attn_out and ffn_out now sit inside wrappers
    report = share_centrals(model, init="fit")
    errors = {r["name"].removesuffix(".layer"): r["error"] for r in report
              if r["kind"] == "layer"}
    assert len(model.records) == 6 * LAYERS
    for record in model.records:
        assert record["shared_group"] == record["type"]
        assert record["sharing_error"] == errors[record["name"]]


def test_core_changes_count_a_layer_inside_a_bottleneck_adapter_once(bert):
    from mpotn.compression.bottleneck import add_bottleneck_adapters
    from mpotn.finetune.core_changes import core_changes, snapshot_cores

    model = compressed(bert)
    add_bottleneck_adapters(model, 4)  # attn_out and ffn_out now sit inside wrappers
    start = snapshot_cores(model.base_model)
    assert len(start) == 6 * LAYERS  # the wrapper's is its layer's, under the layer's name
    assert sum(name.endswith(".layer") for name in start) == 2 * LAYERS
    wrapped = "encoder.layer.0.output.dense.layer"
    with torch.no_grad():
        model.base_model.get_submodule(wrapped).cores[0].mul_(2.0)
    rows = core_changes(start, model.base_model)
    assert len(rows) == 6 * LAYERS
    assert [(r["name"], r["type"]) for r in rows if r["auxiliary_change"] > 0] == [
        (wrapped, "ffn_out")]


def test_default_groups_keep_an_encoder_decoders_stacks_and_attentions_apart():
    from conftest import tiny_t5

    model = compress(tiny_t5(), targets=["attention"], n=3, progress=False)
    report = share_centrals(model, init="layer")
    groups = [g for g in shared_central_groups(model) if g[0].endswith("q")]
    assert sorted(groups) == sorted([
        [f"encoder.block.{i}.layer.0.SelfAttention.q" for i in range(2)],
        [f"decoder.block.{i}.layer.0.SelfAttention.q" for i in range(2)],
        [f"decoder.block.{i}.layer.1.EncDecAttention.q" for i in range(2)]])
    assert sorted(row["group"] for row in report
                  if row["kind"] == "group" and row["group"].endswith("q")) == [
        "decoder.block.*.layer.0.SelfAttention.q", "decoder.block.*.layer.1.EncDecAttention.q",
        "encoder.block.*.layer.0.SelfAttention.q"]
    encoder = model.base_model.get_submodule("encoder.block.0.layer.0.SelfAttention.q")
    first = [row["layer_init_error"] for row in report
             if row["name"] == "encoder.block.0.layer.0.SelfAttention.q"]
    assert len(first) == 1 and first[0] < 1e-6  # its own central, not the decoder's
    assert encoder.central is model.base_model.get_submodule(
        "encoder.block.1.layer.0.SelfAttention.q").central
