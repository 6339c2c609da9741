"""The networkx view mirrors the use-def chains."""

import networkx as nx

import ir
from tests.helpers import conv_bn_relu_gemm


def test_edges_follow_values_and_order_is_topological():
    model = ir.load_model(conv_bn_relu_gemm())
    view = ir.to_networkx(model.graph)
    assert view.number_of_nodes() == len(model.graph.nodes)
    by_name = {n.name: n for n in model.graph.nodes}
    edge = view.get_edge_data(by_name["conv"], by_name["bn"])
    assert [data["value"].name for data in edge.values()] == ["c"]
    assert nx.is_directed_acyclic_graph(view)
    order = [n.name for n in nx.topological_sort(view)]
    assert order == ["conv", "bn", "relu", "identity", "gap", "flatten", "fc"]
    assert nx.has_path(view, by_name["conv"], by_name["fc"])
