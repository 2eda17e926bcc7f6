"""Every example runs, and its printed claims hold."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decompose_and_truncate_example(tmp_path):
    table = load("decompose_and_truncate").main(["--out", str(tmp_path)])
    rows = {r["policy"]: r for r in table}
    optimal, uniform = rows["optimal budget rho=0.3"], rows["uniform budget rho=0.3"]
    assert optimal["rho (Eq. 5)"] <= 0.3 and uniform["rho (Eq. 5)"] <= 0.3
    assert optimal["actual/|M|"] < uniform["actual/|M|"]
    assert rows["tolerance 0.85"]["bound/|M| (Eq. 4)"] <= 0.85
    for row in table:
        assert row["actual/|M|"] <= row["bound/|M| (Eq. 4)"] * (1 + 1e-6)
    assert (tmp_path / "network.png").read_bytes().startswith(b"\x89PNG")


def test_finetune_and_squeeze_example(tmp_path, tiny_bert):
    result = load("finetune_and_squeeze").main(["--fast", "--model", str(tiny_bert),
                                                "--out", str(tmp_path)])
    assert result["central_change"] == 0.0  # LFA leaves the central tensors alone
    assert result["lfa"]["steps"] == 4  # one epoch of 64 examples in batches of 16
    history = result["history"]
    assert [r["step"] for r in history] == [0, 1, 2, 3]
    assert history[-1]["params / original"] < history[0]["params / original"]
    assert (tmp_path / "model" / "mpotn_config.json").is_file()


def test_compare_methods_example(tmp_path):
    table = load("compare_methods").main(["--fast", "--out", str(tmp_path)])
    rows = {(r["label"], r["target"]): r for r in table}
    for label in ("SVD", "MPO n=3", "MPO n=5", "TT n=3", "Tucker n=3"):
        assert rows[(label, 0.2)]["relative_error"] < rows[(label, 0.05)]["relative_error"]
    assert (tmp_path / "compare.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "tucker.png").read_bytes().startswith(b"\x89PNG")


def test_custom_decomposition_example():
    from mpotn.methods import DECOMPOSITIONS

    try:
        result = load("custom_decomposition").main()
        assert result["registered"]
        assert result["network"].relative_error < 1e-12  # exact on a Kronecker product
        assert result["network"].num_params == 6 * 4 + 8 * 5
        assert len(result["model"].report()) == 2
    finally:
        DECOMPOSITIONS.pop("kronecker", None)
