"""The decomposition benchmark runs (quick mode) and its accuracy claims hold."""

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).parent.parent / "benchmarks" / "decompose.py"


def test_decompose_benchmark_quick_mode(tmp_path):
    spec = importlib.util.spec_from_file_location("decompose_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "decompose.json"
    assert module.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["decomposition"]
    assert {r["setting"] for r in rows} == {"full rank", "max bond 32", "optimal at rho=0.25"}
    for row in rows:
        if row["mpotn_svd"] == "full":  # at equal ranks, at least as accurate as tensorly
            assert row["mpotn_rel_error"] <= row["tensorly_rel_error"] * (1 + 1e-3)
        assert row["mpotn_rel_error"] <= row["mpotn_bound"] * (1 + 1e-6) + 1e-6
    for row in report["contraction_flops"]:
        assert 1.0 <= row["planned_over_optimal"] <= 1.001
    assert (tmp_path / "decompose.md").read_text().startswith("### Decomposition")
