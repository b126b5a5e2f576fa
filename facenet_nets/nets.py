"""P-Net, R-Net and O-Net as Keras models built from facenet's weight dicts, by layer name.

facenet (after the Caffe originals) feeds every net the image transposed, (N, W, H, C). These
models take images the usual way, (N, H, W, C), and compensate once, in the weights:
- each conv kernel is transposed in its two spatial axes (HWIO -> WHIO), so a conv over the
  untransposed image gives the untransposed result of facenet's conv;
- the first dense layer of R-Net and O-Net reads a flattened feature map whose order facenet
  takes from the transposed (W', H', C) map; its weight rows are permuted to the (H', W', C)
  order that Flatten produces here.
Max pooling is symmetric in H and W (square windows, SAME padding adds at the end of both), so
it needs nothing. Outputs therefore equal facenet's, transposed back where facenet does so.

PReLU is this module's own layer (see `PReLU`): the same numbers as Keras's, in fewer passes
over memory, which is where P-Net spends half its time on large images.

The layers are `keras.ops`, so the nets run on any Keras 3 backend: the one Keras chose
(`KERAS_BACKEND=tensorflow|jax|torch`, TensorFlow by default). TensorFlow keeps its graphs
and its CPU fast path; `TENSORFLOW` below is the one place that decides.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import keras
from keras import layers, ops

from facenet_nets import NORM_MEAN, NORM_SCALE
from facenet_nets.weights import load_weights

BACKEND = keras.backend.backend()
TENSORFLOW = BACKEND == "tensorflow"
if TENSORFLOW:
    import tensorflow as tf


def _conv(x, filters: int, size: int, name: str):
    return layers.Conv2D(filters, size, padding="valid", name=name)(x)


class PReLU(layers.Layer):
    """Per-channel PReLU, x where x > 0 else alpha * x, optionally followed by a stride-2 max
    pool: bitwise what Keras's PReLU (and MaxPooling2D) give, in fewer passes over memory.

    For alpha <= 1 the PReLU is max(x, alpha * x): two passes where Keras's takes five. A
    channel with alpha > 1 passes through that unchanged (max(x, x)) and gets min(y, alpha * y)
    instead, after the pool when there is one: the PReLU is increasing there, so it commutes
    with taking a maximum, and runs on a quarter of the values. `above_one` (set with the
    weights) says whether any channel needs that second step."""

    def __init__(self, pool: tuple[int, str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.pool = pool
        self.above_one = True

    def build(self, input_shape):
        self.alpha = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="alpha")

    def set_alpha(self, alpha: np.ndarray) -> None:
        alpha = alpha.reshape(-1)
        self.set_weights([alpha])
        self.above_one = bool(np.any(alpha > 1))

    @staticmethod
    def _scaled(x, per_channel):
        """x * per_channel over the last axis; on TensorFlow a 4-D map is viewed as (N*H, W*C)
        rows first, which TF's CPU kernels broadcast faster than a trailing axis of C (~15% on
        P-Net). The same products either way."""
        if not TENSORFLOW or len(x.shape) != 4:
            return x * per_channel
        n, h, w = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
        rows = tf.reshape(x, [n * h, w * x.shape[-1]])
        return tf.ensure_shape(tf.reshape(rows * tf.tile(per_channel, [w]), tf.shape(x)), x.shape)

    def call(self, x, valid=None):
        """`valid`: (rows, columns) of x that hold the map, the rest padding: they are taken
        as -inf before the pool, as the pool's SAME padding is."""
        x = ops.maximum(x, self._scaled(x, ops.minimum(self.alpha, 1.0)))
        if valid is not None:
            rows = ops.arange(ops.shape(x)[1]) < valid[0]
            cols = ops.arange(ops.shape(x)[2]) < valid[1]
            x = ops.where(rows[None, :, None, None] & cols[None, None, :, None], x, float("-inf"))
        if self.pool is not None:
            size, padding = self.pool
            x = ops.max_pool(x, size, 2, padding)
        if self.above_one:
            x = ops.minimum(x, self._scaled(x, ops.maximum(self.alpha, 1.0)))
        return x


class FaceProbability(layers.Layer):
    """P-Net's face probability from its two logits (background, face) on the last axis: the
    softmax's second channel, exp(l1 - m) / (exp(l0 - m) + exp(l1 - m)) with m the larger
    logit. Spelt out because TF's softmax kernel over an axis 2 wide took half of P-Net's
    head time on large images; it agrees with tf.nn.softmax to 2.4e-7."""

    def call(self, logits):
        l0, l1 = logits[..., 0], logits[..., 1]
        m = ops.maximum(l0, l1)
        e0, e1 = ops.exp(l0 - m), ops.exp(l1 - m)
        return e1 / (e0 + e1)


def _prelu(x, name: str, pool: tuple[int, str] | None = None):
    return PReLU(pool, name=name)(x)


def _set(model: keras.Model, weights: dict) -> keras.Model:
    """Copy facenet's {layer: {param: array}} into the model's layers of the same names."""
    for layer in model.layers:
        if layer.name not in weights:
            continue
        params = weights[layer.name]
        if isinstance(layer, layers.Conv2D):
            kernel = np.transpose(params["weights"], (1, 0, 2, 3))
            layer.set_weights([kernel, params["biases"]])
        elif isinstance(layer, PReLU):
            layer.set_alpha(params["alpha"])
        elif isinstance(layer, layers.Dense):
            kernel = params["weights"]
            flat_in = layer.input.shape[-1]
            if getattr(layer, "_feature_map_shape", None) is not None:
                h, w, c = layer._feature_map_shape
                kernel = kernel.reshape(w, h, c, -1).transpose(1, 0, 2, 3).reshape(flat_in, -1)
            layer.set_weights([kernel, params["biases"]])
    missing = {l.name for l in model.layers if l.weights} - set(weights)
    if missing:
        raise ValueError(f"weights lack layers {sorted(missing)}")
    return model


def _dense_after_map(x, units: int, name: str):
    """A dense layer over a flattened (H', W', C) map; remembers the map shape for `_set`."""
    shape = tuple(int(d) for d in x.shape[1:])
    dense = layers.Dense(units, name=name)
    dense._feature_map_shape = shape
    return dense(layers.Flatten()(x))


def build_pnet(weights: dict) -> keras.Model:
    """P-Net: (N, H, W, 3) normalised image -> (box regression (N, H', W', 4), face
    probability (N, H', W')), H' = ceil((H - 2) / 2) - 4; any H, W >= 12."""
    x = inp = keras.Input((None, None, 3), name="data")
    x = _prelu(_conv(x, 10, 3, "conv1"), "PReLU1", pool=(2, "same"))
    x = _prelu(_conv(x, 16, 3, "conv2"), "PReLU2")
    x = _prelu(_conv(x, 32, 3, "conv3"), "PReLU3")
    prob = FaceProbability(name="prob1")(_conv(x, 2, 1, "conv4-1"))
    reg = _conv(x, 4, 1, "conv4-2")
    return _set(keras.Model(inp, [reg, prob], name="pnet"), weights)


def build_rnet(weights: dict) -> keras.Model:
    """R-Net: (N, 24, 24, 3) -> (box regression (N, 4), face probability (N, 2))."""
    x = inp = keras.Input((24, 24, 3), name="data")
    x = _prelu(_conv(x, 28, 3, "conv1"), "prelu1", pool=(3, "same"))
    x = _prelu(_conv(x, 48, 3, "conv2"), "prelu2", pool=(3, "valid"))
    x = _prelu(_conv(x, 64, 2, "conv3"), "prelu3")
    x = _prelu(_dense_after_map(x, 128, "conv4"), "prelu4")
    prob = layers.Softmax(axis=-1, name="prob1")(layers.Dense(2, name="conv5-1")(x))
    reg = layers.Dense(4, name="conv5-2")(x)
    return _set(keras.Model(inp, [reg, prob], name="rnet"), weights)


def build_onet(weights: dict) -> keras.Model:
    """O-Net: (N, 48, 48, 3) -> (box regression (N, 4), landmarks (N, 10) as facenet orders
    them (5 x then 5 y, fractions of the box), face probability (N, 2))."""
    x = inp = keras.Input((48, 48, 3), name="data")
    x = _prelu(_conv(x, 32, 3, "conv1"), "prelu1", pool=(3, "same"))
    x = _prelu(_conv(x, 64, 3, "conv2"), "prelu2", pool=(3, "valid"))
    x = _prelu(_conv(x, 64, 3, "conv3"), "prelu3", pool=(2, "same"))
    x = _prelu(_conv(x, 128, 2, "conv4"), "prelu4")
    x = _prelu(_dense_after_map(x, 256, "conv5"), "prelu5")
    prob = layers.Softmax(axis=-1, name="prob1")(layers.Dense(2, name="conv6-1")(x))
    reg = layers.Dense(4, name="conv6-2")(x)
    landmarks = layers.Dense(10, name="conv6-3")(x)
    return _set(keras.Model(inp, [reg, landmarks, prob], name="onet"), weights)


def compiled(fn: Callable, shape: tuple, dtype: str = "float32") -> Callable:
    """`fn` of one tensor of `shape` (None: any size) and `dtype`, as this backend runs it best:
    TensorFlow: one tf.function, traced once for every shape; JAX: jax.jit, over the batch
    padded to a power of two (a compilation per input size and batch size; P-Net's sizes are
    bucketed, see `_pnet_in_buckets`); PyTorch: eager, without autograd; other backends: as
    it is."""
    if TENSORFLOW:
        return tf.function(fn, input_signature=[tf.TensorSpec(shape, dtype)])
    if BACKEND == "jax":
        import jax
        jitted = jax.jit(fn)

        def batch_of_power_of_two(x):
            """A compilation per input size and power of two, not per batch size."""
            return [np.asarray(o)[:len(x)] for o in jitted(_padded(x, _power_of_two(len(x))))]
        batch_of_power_of_two.compilations = jitted._cache_size
        return batch_of_power_of_two
    if BACKEND == "torch":
        import torch

        def no_grad(x):
            with torch.no_grad():
                return fn(x)
        return no_grad
    return fn


def _power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def _padded(x: np.ndarray, *sizes: int) -> np.ndarray:
    """x in the corner of zeros `sizes` long in its first axes (each >= x's)."""
    padded = np.zeros(sizes + x.shape[len(sizes):], x.dtype)
    padded[tuple(slice(0, n) for n in x.shape[:len(sizes)])] = x
    return padded


def _normalised(levels):
    """uint8 pyramid levels as P-Net takes them, normalised as facenet normalises them."""
    return (ops.cast(levels, "float32") - NORM_MEAN) * NORM_SCALE


def bucket(n: int) -> int:
    """n rounded up to a size of four a doubling (12, 14, 16, 20, 24, 28, 32, 40, ...): at
    most a quarter more."""
    step = max(2, 1 << max(0, n.bit_length() - 3))
    return -(-n // step) * step


def _pnet_in_buckets(model: keras.Model, normalise: bool) -> Callable:
    """P-Net for JAX, which compiles once for every input shape: each pyramid level is padded
    (bottom, right) to a bucket() size and a power-of-two batch, and the map is cut back to the
    level's own. The conv map rows and columns that the padding reaches are taken as -inf
    before the pool (the SAME padding the level alone would get), so the map is the level's
    own: the outputs that P-Net's valid convs take from the padding are cut away."""
    import jax
    conv1, prelu1 = model.get_layer("conv1"), model.get_layer("PReLU1")
    rest = [model.get_layer(n) for n in ("conv2", "PReLU2", "conv3", "PReLU3")]
    head_prob, head_reg = model.get_layer("conv4-1"), model.get_layer("conv4-2")
    prob1 = model.get_layer("prob1")

    def forward(x, conv_rows, conv_cols):
        if normalise:
            x = _normalised(x)
        x = prelu1(conv1(x), valid=(conv_rows, conv_cols))
        for layer in rest:
            x = layer(x)
        return head_reg(x), prob1(head_prob(x))
    jitted = jax.jit(forward)

    def run(x):
        n, h, w = x.shape[:3]
        reg, prob = jitted(_padded(x, _power_of_two(n), bucket(h), bucket(w)), h - 2, w - 2)
        out_h, out_w = -(-(h - 2) // 2) - 4, -(-(w - 2) // 2) - 4
        return np.asarray(reg)[:n, :out_h, :out_w], np.asarray(prob)[:n, :out_h, :out_w]
    run.compilations = jitted._cache_size
    return run


def traces(fn: Callable) -> int:
    """How many times a `compiled` function was traced or compiled (0 where nothing is)."""
    if TENSORFLOW:
        return fn.experimental_get_tracing_count()
    return fn.compilations() if hasattr(fn, "compilations") else 0


def to_numpy(tensor) -> np.ndarray:
    return ops.convert_to_numpy(tensor)


@dataclass(frozen=True)
class Nets:
    """The three models, each behind one `compiled` function (on TensorFlow traced once for
    every input shape: P-Net's spatial size and all batch sizes are dynamic in its signature),
    and P-Net over uint8 pyramid levels, normalised on the device as facenet normalises them."""
    pnet_model: keras.Model
    rnet_model: keras.Model
    onet_model: keras.Model
    pnet: Callable
    rnet: Callable
    onet: Callable
    pnet_levels: Callable

    def trace_counts(self) -> dict[str, int]:
        return {name: traces(getattr(self, name)) for name in ("pnet", "rnet", "onet")}


def _traced(model: keras.Model, shape) -> Callable:
    return compiled(lambda x: model(x, training=False), shape)


def build_nets(weights_dir: str | os.PathLike | None = None) -> Nets:
    """Load and verify det1..3.npy (see facenet_nets.weights) and build the three nets, on
    the device of the enclosing `keras.device` scope (the backend's default otherwise)."""
    pnet = build_pnet(load_weights("det1.npy", weights_dir))
    rnet = build_rnet(load_weights("det2.npy", weights_dir))
    onet = build_onet(load_weights("det3.npy", weights_dir))

    def pnet_levels(levels):
        return pnet(_normalised(levels), training=False)

    if BACKEND == "jax":
        pnet_any, pnet_levels_any = _pnet_in_buckets(pnet, False), _pnet_in_buckets(pnet, True)
    else:
        pnet_any = _traced(pnet, (None, None, None, 3))
        pnet_levels_any = compiled(pnet_levels, (None, None, None, 3), "uint8")
    return Nets(pnet, rnet, onet, pnet_any,
                _traced(rnet, (None, 24, 24, 3)),
                _traced(onet, (None, 48, 48, 3)),
                pnet_levels_any)
