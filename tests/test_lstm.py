"""MPO-LSTM: nn.LSTM's function at full rank, its interface, truncation and LFA."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from mpotn.calibration import output_error
from mpotn.compression.parameters import count_parameters, lfa_parameters
from mpotn.layers.lstm import MPOLSTM, lstm_input_covariances
from mpotn.layers.mpo import MPOLinear
from mpotn.mpo import MPO


def _lstm(**settings) -> nn.LSTM:
    torch.manual_seed(0)
    lstm = nn.LSTM(12, 8, dtype=torch.float64, **settings)
    with torch.no_grad():  # biases that differ, so their sum is tested
        for name, p in lstm.named_parameters():
            if name.startswith("bias"):
                p.normal_()
    return lstm


@pytest.mark.parametrize("settings", [
    {},
    {"num_layers": 2, "bidirectional": True, "batch_first": True},
    {"num_layers": 3, "bias": False},
])
def test_full_rank_mpo_lstm_computes_the_lstm_outputs_and_final_states(settings):
    lstm = _lstm(**settings)
    mpo = MPOLSTM.from_lstm(lstm, n=3)
    layers = settings.get("num_layers", 1) * (2 if settings.get("bidirectional") else 1)
    x = torch.randn(4, 7, 12, dtype=torch.float64)
    state = (torch.randn(layers, 4 if settings.get("batch_first") else 7, 8,
                         dtype=torch.float64),) * 2
    for args in ((x,), (x, state)):
        (out, (h, c)), (ref, (h_ref, c_ref)) = mpo(*args), lstm(*args)
        assert torch.allclose(out, ref, atol=1e-12)
        assert torch.allclose(h, h_ref, atol=1e-12) and torch.allclose(c, c_ref, atol=1e-12)


def test_packed_sequences_of_unsorted_lengths_match_the_lstm_in_both_directions():
    lstm = _lstm(num_layers=2, bidirectional=True, batch_first=True)
    mpo = MPOLSTM.from_lstm(lstm, n=2)
    lengths = torch.tensor([3, 7, 1, 5])
    x = pack_padded_sequence(torch.randn(4, 7, 12, dtype=torch.float64), lengths,
                             batch_first=True, enforce_sorted=False)
    (out, (h, c)), (ref, (h_ref, c_ref)) = mpo(x), lstm(x)
    assert torch.equal(out.batch_sizes, ref.batch_sizes)
    assert torch.equal(out.unsorted_indices, ref.unsorted_indices)
    assert torch.allclose(out.data, ref.data, atol=1e-12)
    assert torch.allclose(h, h_ref, atol=1e-12) and torch.allclose(c, c_ref, atol=1e-12)


def test_an_unbatched_sequence_gives_unbatched_outputs():
    lstm = _lstm(batch_first=True)
    mpo = MPOLSTM.from_lstm(lstm, n=2)
    x = torch.randn(5, 12, dtype=torch.float64)
    (out, (h, _)), (ref, (h_ref, _)) = mpo(x), lstm(x)
    assert out.shape == (5, 8) and h.shape == (1, 8)
    assert torch.allclose(out, ref, atol=1e-12) and torch.allclose(h, h_ref, atol=1e-12)


def test_truncated_mpo_lstm_counts_its_cores_and_converts_back_to_the_same_function():
    lstm = _lstm(num_layers=2)
    mpo = MPOLSTM.from_lstm(lstm, n=3, max_bond=4)
    cores = sum(c.numel() for m in mpo.matrices() for c in m.cores)
    biases = 2 * 32  # one summed bias of 4H per cell
    assert count_parameters(mpo.parameters()) == cores + biases
    assert cores < sum(p.numel() for n, p in lstm.named_parameters() if "weight" in n)
    assert all(max(m.bond_dims) <= 4 for m in mpo.matrices())
    dense = mpo.to_lstm()
    x = torch.randn(6, 3, 12, dtype=torch.float64)
    assert torch.allclose(dense(x)[0], mpo(x)[0], atol=1e-12)
    # each matrix is the truncated MPO of the LSTM's matrix, within the Eq. 4 bound
    w = lstm.weight_ih_l1.detach().T
    truncated = MPO.from_matrix(w, n=3).truncate(max_bond=4)
    error = float(torch.linalg.norm(mpo.cells[1].ih.matrix().detach() - w))
    assert 0 < error <= truncated.error_bound * (1 + 1e-9)


def test_spec_and_state_dict_rebuild_an_mpo_lstm_with_equal_outputs():
    mpo = MPOLSTM.from_lstm(_lstm(num_layers=2, bidirectional=True), n=3, max_bond=3)
    again = MPOLSTM.from_spec(mpo.spec(), dtype=torch.float64)
    again.load_state_dict(mpo.state_dict())
    x = torch.randn(5, 2, 12, dtype=torch.float64)
    assert torch.equal(again(x)[0], mpo(x)[0])
    assert [m.bond_dims for m in again.matrices()] == [m.bond_dims for m in mpo.matrices()]


def test_gradients_reach_every_core_and_lfa_trains_only_auxiliary_tensors_and_biases():
    mpo = MPOLSTM.from_lstm(_lstm(num_layers=2), n=3, max_bond=4)
    mpo(torch.randn(5, 2, 12, dtype=torch.float64))[0].square().sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0
               for m in mpo.matrices() for c in m.cores)
    chosen = {id(p) for _, p in lfa_parameters(mpo)}
    centrals = {id(m.central) for m in mpo.matrices()}
    auxiliary = {id(c) for m in mpo.matrices() for c in m.auxiliary}
    assert auxiliary <= chosen and not centrals & chosen
    assert sum(isinstance(m, MPOLinear) for m in mpo.modules()) == 4


def test_dropout_acts_between_layers_in_training_only():
    mpo = MPOLSTM(12, 8, num_layers=2, dropout=0.5, n=2, dtype=torch.float64)
    x = torch.randn(5, 2, 12, dtype=torch.float64)
    mpo.eval()
    assert torch.equal(mpo(x)[0], mpo(x)[0])
    mpo.train()
    torch.manual_seed(1)
    first = mpo(x)[0]
    torch.manual_seed(2)
    assert not torch.equal(first, mpo(x)[0])


def test_unsupported_lstms_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="proj_size"):
        MPOLSTM.from_lstm(nn.LSTM(4, 8, proj_size=2))
    with pytest.raises(ValueError, match=r"needs an nn\.LSTM"):
        MPOLSTM.from_lstm(nn.GRU(4, 8))
    with pytest.raises(ValueError, match="need 2 entries"):
        MPOLSTM(4, 8, bond_dims=[None])


def test_flatten_parameters_is_accepted_and_changes_nothing():
    mpo = MPOLSTM.from_lstm(_lstm(), n=2)
    x = torch.randn(3, 2, 12, dtype=torch.float64)
    before = mpo(x)[0]
    mpo.flatten_parameters()
    assert torch.equal(mpo(x)[0], before)


def test_input_covariances_are_the_inputs_and_fed_back_states_of_every_matrix():
    """Against two stacked one-layer LSTMs run sequence by sequence: W_ih sees every
    real step's input, W_hh every state the recurrence feeds back (not the last one)."""
    torch.manual_seed(0)
    first = nn.LSTM(12, 8, bidirectional=True, dtype=torch.float64)
    second = nn.LSTM(16, 8, bidirectional=True, dtype=torch.float64)
    lstm = _lstm(num_layers=2, bidirectional=True)
    lstm.load_state_dict({**first.state_dict(), **{
        k.replace("_l0", "_l1"): v for k, v in second.state_dict().items()}})
    lengths = torch.tensor([4, 6, 2])
    x = torch.randn(6, 3, 12, dtype=torch.float64)
    batches = [pack_padded_sequence(x, lengths, enforce_sorted=False), x[:3]]
    expected = [torch.zeros(12, 12), torch.zeros(8, 8), torch.zeros(12, 12),
                torch.zeros(8, 8), torch.zeros(16, 16), torch.zeros(8, 8),
                torch.zeros(16, 16), torch.zeros(8, 8)]
    expected = [e.double() for e in expected]
    sequences = [x[:n, b] for b, n in enumerate(lengths)] + [x[:3, b] for b in range(3)]
    for seq in sequences:
        hidden = first(seq)[0]
        for layer, (inputs, out) in enumerate(((seq, hidden), (hidden, second(hidden)[0]))):
            for d, fed in enumerate((out[:-1, :8], out[1:, 8:])):
                k = 4 * layer + 2 * d
                expected[k] += inputs.T @ inputs
                expected[k + 1] += fed.T @ fed
    got = lstm_input_covariances(lstm, batches)
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-10)


def test_calibrated_truncation_lowers_every_matrix_output_error_and_is_exact_at_full_rank():
    lstm = _lstm(num_layers=2)
    batches = [torch.randn(10, 4, 12, dtype=torch.float64) for _ in range(3)]
    covariances = lstm_input_covariances(lstm, batches)
    plain = MPOLSTM.from_lstm(lstm, structure="svd", ratio=0.3)
    calibrated = MPOLSTM.from_lstm(lstm, structure="svd", ratio=0.3, calibration=batches,
                                   damp=0.0)
    dense = [w.detach().T for w in (lstm.weight_ih_l0, lstm.weight_hh_l0,
                                           lstm.weight_ih_l1, lstm.weight_hh_l1)]
    for m, p, c, cov in zip(dense, plain.matrices(), calibrated.matrices(), covariances,
                            strict=True):
        assert c.bond_dims == p.bond_dims and c.row.factors == (m.shape[0], 1)
        # SVD-LLM's optimum at equal rank: strictly below the plain SVD's output error
        assert (output_error(m, c.matrix().detach(), cov)
                < 0.999 * output_error(m, p.matrix().detach(), cov))
    full = MPOLSTM.from_lstm(lstm, n=3, calibration=batches)
    assert torch.allclose(full(batches[0])[0], lstm(batches[0])[0], atol=1e-9)
    with pytest.raises(ValueError, match="structure"):
        MPOLSTM.from_lstm(lstm, structure="tt")
    with pytest.raises(ValueError, match="no calibration inputs"):
        MPOLSTM.from_lstm(lstm, n=3, ratio=0.3, calibration=[])
