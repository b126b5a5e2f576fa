"""Each Keras net alone against facenet's own graph on the same input tensor."""
import numpy as np
import pytest

from conftest import run_reference


@pytest.fixture(scope="module")
def net_outputs(weights, tmp_path_factory):
    from facenet_nets.nets import build_nets
    rng = np.random.default_rng(0)
    x = {"p": rng.uniform(-1, 1, (2, 37, 53, 3)).astype(np.float32),
         "r": rng.uniform(-1, 1, (7, 24, 24, 3)).astype(np.float32),
         "o": rng.uniform(-1, 1, (7, 48, 48, 3)).astype(np.float32)}
    d = tmp_path_factory.mktemp("nets")
    np.savez(d / "in.npz", **x)
    run_reference(weights, "--nets", d / "in.npz", d / "out.npz")
    nets = build_nets(weights)
    ours = {}
    ours["p0"], ours["p1"] = (t.numpy() for t in nets.pnet(x["p"]))
    ours["r0"], ours["r1"] = (t.numpy() for t in nets.rnet(x["r"]))
    ours["o0"], ours["o1"], ours["o2"] = (t.numpy() for t in nets.onet(x["o"]))
    return ours, dict(np.load(d / "out.npz")), nets


@pytest.mark.parametrize("name", ["p0", "p1", "r0", "r1", "o0", "o1", "o2"])
def test_net_matches_facenet_graph(net_outputs, name):
    ours, ref, _ = net_outputs
    assert ours[name].shape == ref[name].shape
    np.testing.assert_allclose(ours[name], ref[name], atol=1e-4, rtol=0)


def test_pnet_traces_once_for_every_size(net_outputs):
    _, _, nets = net_outputs
    for shape in [(1, 12, 12, 3), (3, 100, 61, 3), (2, 250, 250, 3)]:
        reg, prob = nets.pnet(np.zeros(shape, np.float32))
        assert prob.shape[1:3] == (int(np.ceil((shape[1] - 2) / 2)) - 4, int(np.ceil((shape[2] - 2) / 2)) - 4)
    assert nets.trace_counts()["pnet"] == 1


def test_probabilities_sum_to_one(net_outputs):
    ours, _, _ = net_outputs
    for name in ("p1", "r1", "o2"):
        np.testing.assert_allclose(ours[name].sum(axis=-1), 1.0, atol=1e-5)
