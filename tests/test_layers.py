"""MPOLinear and MPOEmbedding: fidelity, groups, caching, autograd, state_dict."""

import pytest
import torch
from conftest import DEVICES
from torch import nn

from mpotn.layers import MPOEmbedding, MPOLinear


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_rank_linear_gives_the_original_outputs(ffn, device, dtype):
    dense = nn.Linear(384, 1536).to(device, dtype)
    with torch.no_grad():
        dense.weight.copy_(ffn.T)
    layer = MPOLinear.from_linear(dense)
    x = torch.randn(4, 9, 384, device=device, dtype=dtype)
    for mode in (layer.train, layer.eval):
        mode()
        with torch.no_grad():
            assert float((layer(x) - dense(x)).abs().max()) <= 1e-5
    assert layer.bias is not dense.bias and torch.equal(layer.bias, dense.bias)


def test_full_rank_embedding_gives_the_original_rows(minilm):
    table = minilm["embeddings.word_embeddings.weight"]
    dense = nn.Embedding.from_pretrained(table, freeze=False, padding_idx=0)
    layer = MPOEmbedding.from_embedding(dense)
    assert (layer.num_embeddings, layer.row.padded_size) == (30522, 30720)
    ids = torch.tensor([[0, 101, 30521, 2023], [7, 8, 9, 30000]])
    for mode in (layer.train, layer.eval):
        mode()
        with torch.no_grad():
            assert float((layer(ids) - dense(ids)).abs().max()) <= 1e-5
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 30522\)"):
        layer.train()(torch.tensor([30522]))


def test_truncated_layer_equals_its_mpo_and_has_fewer_parameters(ffn):
    dense = nn.Linear(384, 1536)
    with torch.no_grad():
        dense.weight.copy_(ffn.T)
    layer = MPOLinear.from_linear(dense, ratio=0.3)
    assert layer.compression_ratio <= 0.3
    assert sum(c.numel() for c in layer.cores) < 0.3 * 384 * 1536
    x = torch.randn(16, 384)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.mpo().to_matrix() + dense.bias,
                                   rtol=1e-4, atol=1e-5)


def test_central_and_auxiliary_groups_freeze_independently():
    layer = MPOLinear(384, 1536)
    assert layer.central is layer.cores[2]
    assert layer.central_params + layer.auxiliary_params == sum(c.numel() for c in layer.cores)
    layer.freeze_central()
    assert layer.num_trainable() == layer.auxiliary_params + 1536
    layer.freeze_auxiliary()
    assert layer.num_trainable() == 1536  # the bias stays trainable
    layer.freeze_central(False)
    assert layer.num_trainable() == layer.central_params + 1536


@pytest.mark.parametrize("layer", [MPOLinear(64, 48, n=3), MPOEmbedding(100, 24, n=3)])
def test_gradients_reach_every_core_through_forward(layer):
    x = torch.randn(6, 64) if isinstance(layer, MPOLinear) else torch.randint(0, 100, (6,))
    layer(x).square().sum().backward()
    for core in layer.cores:
        assert core.grad is not None and float(core.grad.abs().sum()) > 0


def test_eval_cache_is_reused_and_invalidated_when_a_core_changes():
    layer = MPOLinear(64, 48, n=3).eval()
    x = torch.randn(200, 64)  # large batch: the cached weight is used
    with torch.no_grad():
        first = layer(x)
        cached = layer._cache[1]
        assert layer(x) is not None and layer._cache[1] is cached
        layer.cores[0].mul_(2.0)  # an in-place edit, like an optimizer step
        second = layer(x)
    assert layer._cache[1] is not cached
    torch.testing.assert_close(second - layer.bias, 2 * (first - layer.bias))


def test_no_cache_while_training_or_when_gradients_are_needed():
    layer = MPOLinear(64, 48, n=3)
    layer(torch.randn(200, 64))
    assert layer._cache is None
    layer.eval()
    layer(torch.randn(200, 64))  # grad enabled and cores require grad
    assert layer._cache is None


def test_state_dict_round_trip_gives_identical_outputs():
    source = MPOLinear.from_linear(nn.Linear(96, 80), n=4, max_bond=6).eval()
    target = MPOLinear(96, 80, source.row.factors, source.col.factors, source.bond_dims).eval()
    target.load_state_dict(source.state_dict())
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_from_scratch_weights_have_linear_init_scale():
    layer = MPOLinear(768, 3072)
    std = float(layer.weight.detach().std())
    assert 0.5 / (3 * 768) ** 0.5 < std < 2.0 / (3 * 768) ** 0.5
    assert layer.weight.shape == (3072, 768)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match=r"needs an nn\.Linear"):
        MPOLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match=r"needs an nn\.Embedding"):
        MPOEmbedding.from_embedding(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="max_norm"):
        MPOEmbedding.from_embedding(nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(ValueError, match="unknown truncation settings"):
        MPOLinear.from_linear(nn.Linear(8, 8), n=3, rank=3)
    with pytest.raises(ValueError, match="bond_dims must be"):
        MPOLinear(8, 8, (2, 2, 2), (2, 2, 2), (1, 2, 1))
    with pytest.raises(ValueError, match="indices must be an integer tensor"):
        MPOEmbedding(10, 4, n=2)(torch.tensor([1.0]))


def test_left_and_central_gauges_give_the_same_layer(ffn):
    linear = torch.nn.Linear(384, 1536)
    with torch.no_grad():
        linear.weight.copy_(ffn.T)
    central = MPOLinear.from_linear(linear, max_bond=32)
    left = MPOLinear.from_linear(linear, max_bond=32, gauge="left")
    x = torch.randn(8, 384)
    torch.testing.assert_close(central(x), left(x), rtol=1e-4, atol=1e-5)
    # the spectrum sits in the central tensor in one gauge, in the last core in the other
    norm = float(central.matrix().detach().norm())
    assert float(central.central.detach().norm()) == pytest.approx(norm, rel=1e-4)
    assert float(left.cores[-1].detach().norm()) == pytest.approx(norm, rel=1e-4)


def test_every_layer_describes_itself_and_the_registry_rebuilds_it():
    from mpotn.layers import (
        LAYER_KINDS,
        FactorizedEmbedding,
        FactorizedLinear,
        TiedMPOLinear,
        layer_from_spec,
    )

    layers = [MPOLinear(12, 10, n=2, bias=False), MPOEmbedding(20, 6, n=2, padding_idx=0),
              TiedMPOLinear("embeddings", 6, 20, bias=True),
              FactorizedLinear.from_linear(nn.Linear(12, 10), "tucker", n=2),
              FactorizedEmbedding.from_embedding(nn.Embedding(20, 6), "cp", n=2, rank=3)]
    assert list(LAYER_KINDS) == ["linear", "embedding", "tied-linear", "factorized-linear",
                                 "factorized-embedding"]
    for layer in layers:
        spec = layer.spec()
        assert LAYER_KINDS[spec["kind"]] is type(layer) and spec.keys() == layer.SPEC_FIELDS
        again = layer_from_spec(spec, torch.float64)
        assert type(again) is type(layer) and again.spec() == spec
        assert all(p.dtype == torch.float64 for p in again.parameters())
    with pytest.raises(ValueError, match="unknown layer kind 'lora'; known: linear, embedding"):
        layer_from_spec({"kind": "lora"})


@pytest.mark.parametrize("method", ["contract", "rebuild"])
def test_mpo_and_factorized_layers_under_autocast_compute_in_its_dtype_as_nn_linear_does(method):
    from mpotn.layers import FactorizedLinear
    from mpotn.methods import decompose

    torch.manual_seed(0)
    dense = nn.Linear(48, 96)
    mpo = MPOLinear.from_linear(dense, n=3)  # full rank: the same map
    tt = FactorizedLinear(decompose(dense.weight.detach().T, "tt", n=3), bias=True)
    x = torch.randn(4, 48)
    with torch.no_grad():
        exact = {"mpo": mpo(x), "mpo-forced": mpo(x), "tt": tt(x), "bf16 input": mpo(x)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dense(x).dtype == torch.bfloat16
        forced = mpo.contractor.apply(x.bfloat16(), list(mpo.cores), method=method) + mpo.bias
        outputs = {"mpo": mpo(x), "mpo-forced": forced, "tt": tt(x),
                   "bf16 input": mpo(x.bfloat16())}
    for name, y in outputs.items():
        assert y.dtype == (torch.float32 if name == "mpo-forced" else torch.bfloat16), name
        scale = float(exact[name].abs().max())
        assert float((y.detach().float() - exact[name]).abs().max()) < 0.02 * scale, name
    outputs["mpo"].float().sum().backward()
    assert all(core.grad is not None and core.grad.dtype == torch.float32 for core in mpo.cores)


def test_a_weight_cached_under_inference_mode_is_not_reused_for_autograd():
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(16, 24), n=2).eval()
    layer.freeze_cores() if hasattr(layer, "freeze_cores") else layer.requires_grad_(False)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        before = layer(x)
    x.requires_grad_(True)
    after = layer(x)  # eval mode, cores frozen: the cached weight, not an inference tensor
    after.sum().backward()
    assert torch.equal(after.detach(), before)
    assert x.grad is not None and x.grad.shape == x.shape


def test_clear_cache_after_an_edit_through_data_serves_the_new_weight():
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(16, 24), n=2).eval().requires_grad_(False)
    x = torch.randn(3, 16)
    before = layer(x)
    layer.cores[1].data.mul_(0)  # not counted as a change by PyTorch
    layer.clear_cache()
    assert torch.equal(layer(x), layer.bias.expand(3, -1))
    assert not torch.equal(before, layer(x))


def test_an_mpo_layer_needs_two_cores_and_bonds_may_be_numpy_integers():
    import numpy as np

    with pytest.raises(ValueError, match=r"needs n >= 2 cores \(a chain with a bond\), got n=1"):
        MPOLinear(16, 24, n=1)
    layer = MPOLinear.from_linear(nn.Linear(16, 24), n=2)
    assert layer.mpo().truncate(bond_dims=[np.int64(3)]).bond_dims == (1, 3, 1)


def test_a_weight_cached_under_autocast_serves_calls_outside_it():
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(16, 24), n=2).eval().requires_grad_(False)
    x = torch.randn(3, 16)
    expected = layer(x)
    layer.clear_cache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    assert torch.equal(layer(x), expected)  # the cache holds the float32 weight


def test_embeddings_under_autocast_keep_the_tables_dtype_in_every_mode_as_nn_embedding():
    from mpotn.layers import FactorizedEmbedding
    from mpotn.methods import decompose

    torch.manual_seed(0)
    dense = nn.Embedding(64, 16)
    indices = torch.randint(0, 64, (4, 8))
    layers = {"mpo": MPOEmbedding.from_embedding(dense, n=3),
              "tt": FactorizedEmbedding(decompose(dense.weight.detach(), "tt", n=3))}
    for name, layer in layers.items():
        exact = layer(indices).detach()
        for mode, grad in (("train", True), ("eval", True), ("eval", False)):
            getattr(layer, mode)()
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
                assert dense(indices).dtype == torch.float32
                out = layer(indices)
            assert out.dtype == torch.float32, (name, mode, grad)
            assert float((out.detach() - exact).abs().max()) < 1e-5, (name, mode, grad)


def test_moving_a_layer_forgets_its_contract_or_rebuild_choices():
    layer = MPOLinear.from_linear(nn.Linear(64, 64), n=3)
    layer(torch.randn(8, 64))
    assert layer._methods
    layer.double()
    assert layer._methods == {}
    assert layer(torch.randn(8, 64, dtype=torch.float64)).dtype == torch.float64
