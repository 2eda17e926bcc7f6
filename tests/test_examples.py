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
