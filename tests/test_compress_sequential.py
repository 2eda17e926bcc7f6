"""Sequential calibrated compression: each matrix fitted to the original's outputs from
the inputs the already compressed layers give it (Eq. 7')."""

from __future__ import annotations

import contextlib
import importlib
import warnings

import pytest
import torch
from torch import nn

import mpotn
from mpotn.calibration import compensated_matrix, output_error, paired_output_error
from mpotn.compression.calibrate import calibrate_paired


class Chain(nn.Module):
    """Three linears with GELUs between them, called as ``model(input=...)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 48), nn.GELU(),
                                 nn.Linear(48, 8))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.net(input)


TARGETS = ["net.0", "net.2", "net.4"]


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(16, 16, generator=g) * torch.logspace(-1, 0.5, 16)
    return [{"input": torch.randn(256, 16, generator=g) @ mix} for _ in range(8)]


def _inputs(model: nn.Module, module: nn.Module, batches) -> torch.Tensor:
    seen = []
    handle = module.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    return torch.cat(seen).double()


def test_compensated_matrix_minimises_the_error_against_the_reference_outputs():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(400, 12, dtype=torch.float64, generator=g)
    x = x0 + 0.2 * torch.randn(400, 12, dtype=torch.float64, generator=g)
    m = torch.randn(12, 5, dtype=torch.float64, generator=g)
    c, cross, c0 = x.T @ x, x.T @ x0, x0.T @ x0
    best = compensated_matrix(m, c, cross, damp=0.0)
    direct = float((x @ best - x0 @ m).norm() / (x0 @ m).norm())
    assert paired_output_error(m, best, c, cross, c0) == pytest.approx(direct, rel=1e-9)
    # any other matrix does worse; M itself by the error the changed inputs cause
    assert paired_output_error(m, m, c, cross, c0) > direct + 1e-3
    assert output_error(best, m, c) ** 2 * float((best * (c @ best)).sum()) == pytest.approx(
        float((x @ (m - best)).norm() ** 2), rel=1e-9)
    # damping moves M* towards M, never past it
    damped = compensated_matrix(m, c, cross, damp=0.5)
    assert float((damped - m).norm()) < float((best - m).norm())


def test_sequential_reports_each_layers_error_against_the_originals_outputs():
    batches = _batches()
    original, model = Chain(), Chain()
    compressed = mpotn.compress(model, targets=TARGETS, structure="svd", ratio=0.3,
                                calibration=batches, sequential=True, progress=False)
    for name, row in zip(TARGETS, compressed.report()):
        x = _inputs(model, model.get_submodule(name), batches)
        x0 = _inputs(original, original.get_submodule(name), batches)
        m0 = original.get_submodule(name).weight.detach().double().T
        m = model.get_submodule(name).mpo().to_matrix().double()
        direct = float((x @ m - x0 @ m0).norm() / (x0 @ m0).norm())
        assert row["output_error"] == pytest.approx(direct, rel=1e-4)


def test_sequential_fitting_lowers_the_whole_models_output_error():
    batches = _batches()
    original = Chain()
    reference = torch.cat([original(**b) for b in batches]).detach()

    def error(sequential: bool) -> float:
        model = Chain()
        mpotn.compress(model, targets=TARGETS, structure="svd", ratio=0.3,
                       calibration=batches, sequential=sequential, progress=False)
        out = torch.cat([model(**b) for b in batches]).detach()
        return float((out - reference).norm() / reference.norm())

    plain, sequential = error(False), error(True)
    assert sequential < 0.97 * plain  # 0.505 against 0.528


def test_sequential_at_full_rank_keeps_the_model_exact():
    batches = _batches()
    original, model = Chain(), Chain()
    mpotn.compress(model, targets=TARGETS, structure="svd", calibration=batches,
                   sequential=True, progress=False)
    for batch in batches:
        assert torch.allclose(model(**batch), original(**batch), atol=1e-4)


def test_sequential_on_tied_gpt2_puts_back_every_compressed_module():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=64, n_embd=24, n_layer=2, n_head=2)
    gpt2 = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (16, 64))  # 1,024 tokens: over 10 per input of c_proj (96)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    compressed = mpotn.compress(gpt2, targets=["all-linear", "embeddings"], structure="svd",
                                ratio=0.6, calibration=batches, calibrate_embeddings=True,
                                sequential=True, progress=False)
    kinds = {type(m).__name__ for m in gpt2.modules()}
    assert "Linear" not in kinds and "Conv1D" not in kinds and "Embedding" not in kinds
    assert gpt2.lm_head.embedding is gpt2.transformer.wte  # still tied to the MPO embedding
    calibrations = [r["calibration"] for r in compressed.report()]
    # every linear is paired, the first too: it reads the compressed embeddings
    assert calibrations == ["whitened"] * 2 + ["whitened, sequential"] * 8
    assert all(r["output_error"] is not None for r in compressed.report())
    assert torch.isfinite(gpt2(input_ids=ids).logits).all()


def test_sequential_pairs_every_call_of_a_layer_shared_across_depth():
    from transformers import AlbertConfig, AlbertModel
    torch.manual_seed(0)
    albert = AlbertModel(AlbertConfig(vocab_size=50, embedding_size=8, hidden_size=16,
                                      num_hidden_layers=3, num_attention_heads=2,
                                      intermediate_size=24)).eval()
    ids = torch.randint(1, 50, (4, 32))  # 128 tokens, seen by the shared layer 3 times
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    compressed = mpotn.compress(albert, targets=["ffn"], structure="svd", ratio=0.5,
                                calibration=batches, sequential=True, progress=False)
    report = compressed.report()  # the one shared layer's two FFN matrices
    assert [r["calibration"] for r in report] == ["whitened", "whitened, sequential"]
    assert torch.isfinite(albert(input_ids=ids).last_hidden_state).all()


def test_calibrate_paired_refuses_runs_that_differ():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))

    @contextlib.contextmanager
    def skip_second():
        saved = model[1]
        model[1] = nn.Identity()  # the reference never calls the target
        yield
        model[1] = saved

    with pytest.raises(ValueError, match="ran differently"):
        calibrate_paired(lambda input: model(input), [{"input": torch.randn(4, 3)}],
                         {"1": model[1]}, skip_second)


@pytest.mark.parametrize("kwargs, message", [
    ({"sequential": True}, "give calibration batches"),
    ({"sequential": "yes", "calibration": [{"input": torch.randn(2, 4)}]},
     "sequential must be True or False"),
])
def test_bad_sequential_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mpotn.compress(Chain(), targets=TARGETS, progress=False, **kwargs)


def test_sequential_warns_when_the_calibration_text_is_too_short_to_fit():
    few = [{"input": b["input"][:200]} for b in _batches()[:2]]  # 400 rows
    with pytest.warns(UserWarning, match="2 matrices are fitted without sequential "
                      "compensation, having fewer than 10 calibration rows per input"):
        model = Chain()
        report = mpotn.compress(model, targets=TARGETS, structure="svd", ratio=0.5,
                                calibration=few, sequential=True, progress=False).report()
    plain_model = Chain()
    mpotn.compress(plain_model, targets=TARGETS, structure="svd", ratio=0.5, calibration=few,
                   progress=False)
    # net.2 and net.4 (48 inputs) keep their plain calibrated fits; net.0 reads the input
    assert [r["calibration"] for r in report] == ["whitened"] * 3
    for k in (0, 2, 4):
        assert torch.equal(model.net[k].mpo().to_matrix(), plain_model.net[k].mpo().to_matrix())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 2,048 tokens: 42 per input
        mpotn.compress(Chain(), targets=TARGETS, structure="svd", ratio=0.5,
                       calibration=_batches(), sequential=True, progress=False)


class Repeats(nn.Module):
    """Runs its second linear ``repeats`` times: the number of calls varies by batch."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, input: torch.Tensor, repeats: int) -> torch.Tensor:
        x = self.first(input)
        for _ in range(repeats):
            x = self.second(x)
        return x


def test_calibrate_paired_takes_each_batchs_own_calls():
    model = Repeats()
    batches = [{"input": torch.randn(5, 4), "repeats": 1}, {"input": torch.randn(5, 4),
                                                             "repeats": 3}]
    paired = calibrate_paired(model, batches, {"second": model.second}, contextlib.nullcontext)
    assert paired["second"].tokens == 20  # 5 rows once, then 5 rows three times
    assert torch.allclose(paired["second"].cross, paired["second"].covariance)


class Routed(nn.Module):
    """Sends to its second linear only the rows whose first feature is positive."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.first(input)
        return self.second(x[x[:, 0] > 0])


def test_unpairable_inputs_fall_back_to_the_plain_calibrated_fit():
    batches = [{"input": torch.randn(400, 8)} for _ in range(2)]
    model = Routed()
    with pytest.warns(UserWarning, match="1 matrices are fitted without sequential "
                      "compensation, their inputs differing in number"):
        report = mpotn.compress(model, targets=["first", "second"], structure="svd", ratio=0.3,
                                calibration=batches, sequential=True, progress=False).report()
    assert [r["calibration"] for r in report] == ["whitened", "whitened"]


def test_a_failed_compression_leaves_the_model_as_it_was(monkeypatch):
    compress_module = importlib.import_module("mpotn.compression.compress")
    model = Chain()
    before = dict(model.named_modules())
    replace = compress_module._replace
    done = []

    def fail_on_the_third(*args, **kwargs):
        if len(done) == 2:
            raise RuntimeError("out of memory")
        done.append(replace(*args, **kwargs))
        return done[-1]

    monkeypatch.setattr(compress_module, "_replace", fail_on_the_third)
    for sequential in (False, True):
        done.clear()
        with pytest.raises(RuntimeError, match="out of memory"):
            mpotn.compress(model, targets=TARGETS, structure="svd", ratio=0.3,
                           calibration=_batches(), sequential=sequential, progress=False)
        assert len(done) == 2
        assert dict(model.named_modules()) == before  # the very same modules, nothing else
