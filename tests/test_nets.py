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
    ref = dict(np.load(d / "out.npz"))
    ref["p1"] = ref["p1"][..., 1]         # our P-Net gives the face channel only
    return ours, ref, nets


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
    for name in ("r1", "o2"):
        np.testing.assert_allclose(ours[name].sum(axis=-1), 1.0, atol=1e-5)
    assert 0 <= ours["p1"].min() and ours["p1"].max() <= 1


@pytest.mark.parametrize("pool", [None, (2, "same"), (3, "same"), (3, "valid")])
def test_prelu_layer_is_bitwise_keras_prelu_then_pool(pool):
    from keras import layers
    from facenet_nets.nets import PReLU
    alpha = np.array([-1.3, -0.2, 0.0, 0.5, 1.0, 1.2, 3.0, 0.9], np.float32)   # < 0, <= 1, > 1
    x = np.random.default_rng(1).normal(size=(2, 13, 11, 8)).astype(np.float32)
    x[0, :3] = 0.0
    keras_prelu = layers.PReLU(shared_axes=[1, 2])
    keras_prelu.build(x.shape)
    keras_prelu.set_weights([alpha.reshape(1, 1, 8)])
    expected = keras_prelu(x)
    if pool:
        expected = layers.MaxPooling2D(pool[0], strides=2, padding=pool[1])(expected)
    ours = PReLU(pool)
    ours.build(x.shape)
    ours.set_alpha(alpha)
    assert ours.above_one
    assert np.array_equal(ours(x).numpy(), expected.numpy())
    if pool is None:     # and on a dense layer's (N, C) output
        flat = x.reshape(-1, 8)
        keras_prelu = layers.PReLU()
        keras_prelu.build(flat.shape)
        keras_prelu.set_weights([alpha])
        ours = PReLU()
        ours.build(flat.shape)
        ours.set_alpha(alpha)
        assert np.array_equal(ours(flat).numpy(), keras_prelu(flat).numpy())


def test_face_probability_is_softmax_face_channel():
    import tensorflow as tf
    from facenet_nets.nets import FaceProbability
    logits = np.random.default_rng(2).normal(scale=8, size=(3, 40, 30, 2)).astype(np.float32)
    logits[0, 0] = [100, -100]
    logits[0, 1] = [-100, 100]
    expected = tf.nn.softmax(logits)[..., 1].numpy()
    got = FaceProbability()(logits).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=3e-7, rtol=0)
