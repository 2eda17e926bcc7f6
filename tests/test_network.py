"""The tensornetwork graph, its networkx export and its drawing."""

import pytest
import tensornetwork as tn
import torch

from mpotn import MPO
from mpotn.network import core_name


@pytest.fixture(scope="module")
def mpo(ffn):
    return MPO.from_matrix(ffn).truncate(ratio=0.3)


def test_nodes_are_named_by_role_and_edges_by_bond_row_col(mpo):
    nodes = mpo.network()
    assert [n.name for n in nodes] == [
        "auxiliary_1",
        "auxiliary_2",
        "central",
        "auxiliary_4",
        "auxiliary_5",
    ]
    inner = {e.name for e in tn.get_all_nondangling(nodes)}
    assert inner == {"bond_1", "bond_2", "bond_3", "bond_4"}
    dangling = {e.name for e in tn.get_all_dangling(nodes)}
    assert dangling == {f"row_{k}" for k in range(1, 6)} | {f"col_{k}" for k in range(1, 6)} | {
        "bond_0",
        "bond_5",
    }
    for node, core in zip(nodes, mpo.cores):
        assert node.tensor is core  # no copies


def test_contracting_the_tensornetwork_graph_gives_the_matrix(mpo):
    nodes = mpo.network()
    rows = [nodes[k][f"row_{k + 1}"] for k in range(5)]
    cols = [nodes[k][f"col_{k + 1}"] for k in range(5)]
    ends = [nodes[0]["bond_0"], nodes[-1]["bond_5"]]
    result = tn.contractors.auto(nodes, output_edge_order=rows + cols + ends)
    dense = result.tensor.reshape(mpo.padded_shape)
    torch.testing.assert_close(dense, mpo.to_matrix(padded=True), rtol=1e-5, atol=1e-6)


def test_central_index_for_odd_and_even_n():
    assert [core_name(k, 2) for k in range(2)] == ["central", "auxiliary_2"]
    assert [core_name(k, 4) for k in range(4)] == [
        "auxiliary_1",
        "central",
        "auxiliary_3",
        "auxiliary_4",
    ]


def test_networkx_graph_carries_shapes_dims_entropies_and_errors(mpo):
    graph = mpo.to_networkx()
    assert graph.nodes["central"]["shape"] == tuple(mpo.central.shape)
    assert graph.nodes["central"]["params"] == mpo.central_params
    bond = graph.edges["auxiliary_2", "central"]
    assert bond["name"] == "bond_2" and bond["dim"] == mpo.bond_dims[2]
    assert bond["entropy"] == pytest.approx(mpo.entropy(2))
    assert bond["next_cut_error"] == pytest.approx(mpo.truncation_error(2, mpo.bond_dims[2] - 1))
    assert bond["full_dim"] == mpo.full_bond_dims[2]
    assert graph.edges["central", "row_3"]["dim"] == mpo.row_shape[2]
    assert graph.number_of_nodes() == 5 + 10


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_draw_writes_a_picture_file(mpo, tmp_path, suffix):
    path = mpo.draw(tmp_path / f"network{suffix}", title="layer 0 ffn_in")
    data = path.read_bytes()
    assert len(data) > 5000
    assert data.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in data[:2000]


def test_draw_rejects_unknown_formats(mpo, tmp_path):
    with pytest.raises(ValueError, match="must end in one of"):
        mpo.draw(tmp_path / "network.bmp")
