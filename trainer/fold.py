"""The frozen backbone's inference graph, with each BatchNormalization folded into its conv.

A frozen ResNet50 in inference mode computes, at every BatchNormalization, a fixed per-channel
scale and shift of the convolution before it. Folding them into that convolution's kernel and
bias (kernel x gamma / sqrt(variance + epsilon); (bias - mean) x that + beta) gives the same
function with 53 fewer layers, and lets TensorFlow fuse each conv with its bias and ReLU.
(Keras' BatchNormalization also upcasts bfloat16 activations to float32 and back at every
layer.) On a 2-core AVX512_BF16 CPU the folded graph ran ResNet50 at 160 px 1.7x as fast as
Keras' (docs/performance.md).

`fold_backbone` turns a Keras ResNet50 (weights loaded) into a `FoldedBackbone` layer: the same
inputs and pooled outputs, its weights stored in float32 (Keras' mixed-precision convention:
float32 variables, a lower-precision compute dtype) and never trained. The job uses it whenever
the backbone stays frozen for the whole run: the backbone pass and training on images compute
the features the same way; the export folds the trained backbone again in its serving dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf


@dataclass(frozen=True)
class Step:
    """One operation of the folded graph: `kind` applied to the `inputs` slots, into `output`."""

    kind: str  # conv | relu | add | pad | max_pool | mean
    name: str
    inputs: tuple[int, ...]
    output: int
    attrs: tuple = ()


class FoldedBackbone(keras.layers.Layer):
    """Preprocessed pixels [N, S, S, 3] -> pooled float32 features [N, width]: a folded Keras
    backbone (see `fold_backbone`). Its kernels and biases are non-trainable float32 weights,
    cast to the layer's compute dtype (bfloat16 under mixed_bfloat16) when called: variables in
    float32 are what every tf.distribute strategy can broadcast (MultiWorkerMirroredStrategy's
    CPU collectives have no bfloat16 kernel) and what a checkpoint or another dtype's serving
    model reads exactly. It is saved as weights (backups) and in the SavedModel, never as a
    Keras config: it has none.

    All kernels live in one weight (`kernel_values`, flattened one after another) and all
    biases in another, each conv reading its part: a SavedModel's save costs ~2 ms per
    variable, and with 106 weights here the 160 px model's export took 0.50-0.72 s; with two,
    0.15 s."""

    def __init__(self, steps: list[Step], shapes: dict[str, tuple], width: int, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.steps = list(steps)
        self.shapes = dict(shapes)  # conv name -> kernel shape, in the weights' order
        self.width = width

    def build(self, input_shape):
        self.kernel_values, self.bias_values = (
            self.add_weight(
                shape=(sum(lengths),),
                initializer="zeros",
                dtype="float32",
                name=name,
                trainable=False,
                autocast=False,
            )
            for lengths, name in zip(self._lengths(), ("kernel_values", "bias_values"), strict=True)
        )

    def _lengths(self) -> tuple[list[int], list[int]]:
        """Each conv's part of `kernel_values` (its kernel's size) and of `bias_values` (its
        output channels), in the weights' order."""
        shapes = self.shapes.values()
        return [int(np.prod(shape)) for shape in shapes], [shape[-1] for shape in shapes]

    def folded(self) -> Folded:
        """This layer's graph and its current (kernel, bias) per conv, in float32: what
        `folded_layer` builds another layer from (e.g. in another compute dtype)."""
        sizes, channels = self._lengths()
        kernels = np.split(self.kernel_values.numpy(), np.cumsum(sizes)[:-1])
        biases = np.split(self.bias_values.numpy(), np.cumsum(channels)[:-1])
        params = {
            name: (kernel.reshape(shape), bias)
            for (name, shape), kernel, bias in zip(
                self.shapes.items(), kernels, biases, strict=True
            )
        }
        return Folded(self.steps, params, self.width)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.width)

    def call(self, pixels):
        kernels, biases = self._split()
        values = {0: pixels}
        for step in self.steps:
            args = [values[i] for i in step.inputs]
            values[step.output] = self._apply(step, args, kernels, biases)
        return values[self.steps[-1].output]

    def _split(self) -> tuple[dict, dict]:
        """{conv name: kernel}, {conv name: bias}: one split of each weight, then each kernel
        reshaped (slicing the weights conv by conv made a trace twice as long)."""
        sizes, channels = self._lengths()
        dtype = self.compute_dtype
        kernels = tf.split(tf.cast(self.kernel_values.value, dtype), sizes)
        biases = tf.split(tf.cast(self.bias_values.value, dtype), channels)
        kernels = [tf.reshape(k, s) for k, s in zip(kernels, self.shapes.values(), strict=True)]
        return dict(zip(self.shapes, kernels, strict=True)), dict(
            zip(self.shapes, biases, strict=True)
        )

    def _apply(self, step: Step, args: list, kernels: dict, biases: dict):
        x = args[0]
        if step.kind == "conv":
            strides, padding = step.attrs
            conv = tf.nn.conv2d(x, kernels[step.name], strides, padding)
            return tf.nn.bias_add(conv, biases[step.name])
        if step.kind == "relu":
            return tf.nn.relu(x)
        if step.kind == "add":
            return tf.add_n(args)
        if step.kind == "pad":
            (top, bottom), (left, right) = step.attrs
            return tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
        if step.kind == "max_pool":
            size, strides, padding = step.attrs
            return tf.nn.max_pool2d(x, size, strides, padding)
        # "mean": global average pooling, summed in float32 (the head's dtype)
        return tf.reduce_mean(tf.cast(x, tf.float32), axis=[1, 2])

    def assign(self, params: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Set every conv's (kernel, bias), given in float32 for each name of `shapes`."""
        kernels = np.empty(self.kernel_values.shape, np.float32)
        start = 0
        for name in self.shapes:
            kernel = params[name][0].reshape(-1)
            kernels[start : start + kernel.size] = kernel
            start += kernel.size
        biases = np.concatenate([params[name][1] for name in self.shapes])
        self.kernel_values.assign(kernels)
        self.bias_values.assign(biases.astype(np.float32))


@dataclass(frozen=True)
class Folded:
    """A folded backbone's graph, its convs' (kernel, bias) in float32 and its output width:
    plain data, so one process can build many layers from it (a sweep's points)."""

    steps: list[Step]
    params: dict[str, tuple[np.ndarray, np.ndarray]]
    width: int


def fold(backbone: keras.Model) -> Folded:
    """The folded graph of `backbone` (a functional Keras model of Conv2D, BatchNormalization
    after a conv, ReLU, Add, ZeroPadding2D, MaxPooling2D and GlobalAveragePooling2D, as Keras'
    ResNet50 is) and each conv's folded (kernel, bias) in float32 (the per-channel scale and the
    bias computed in float64)."""
    consumers: dict[int, int] = {}
    for layer in backbone.layers:
        for tensor in _inputs(layer):
            consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    slots = {id(backbone.inputs[0]): 0}
    steps, params, folded = [], {}, {}  # folded: BN output id -> the conv slot it becomes

    def slot(tensor) -> int:
        return slots.setdefault(id(tensor), len(slots))

    for layer in backbone.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        inputs = _inputs(layer)
        if isinstance(layer, keras.layers.BatchNormalization):
            conv = folded.pop(id(inputs[0]), None)
            if conv is None or consumers[id(inputs[0])] != 1:
                raise ValueError(
                    f"{layer.name}: only a BatchNormalization right after a conv folds"
                )
            kernel, bias = params[conv]
            gamma, beta, mean, variance = _batchnorm_weights(layer)
            scale = gamma / np.sqrt(variance + layer.epsilon)
            params[conv] = (  # the kernel in float32 (23M values), the rest in float64
                kernel * scale.astype(np.float32),
                ((bias - mean) * scale + beta).astype(np.float32),
            )
            slots[id(layer.output)] = slots[id(inputs[0])]
            continue
        out = slot(layer.output)
        args = tuple(slots[id(t)] for t in inputs)
        steps.append(_step(layer, args, out))
        if isinstance(layer, keras.layers.Conv2D):
            kernel = np.asarray(layer.kernel.numpy(), np.float32)  # no copy
            bias = layer.bias.numpy() if layer.use_bias else np.zeros(kernel.shape[-1])
            params[layer.name] = (kernel, bias.astype(np.float64))
            folded[id(layer.output)] = layer.name
    params = {
        name: (np.asarray(k, np.float32), np.asarray(b, np.float32))
        for name, (k, b) in params.items()
    }
    return Folded(steps, params, int(backbone.outputs[0].shape[-1]))


def _batchnorm_weights(layer) -> tuple[np.ndarray, ...]:
    """gamma, beta, moving mean and moving variance in float64 (gamma 1 and beta 0 where the
    layer has none)."""
    mean = layer.moving_mean.numpy().astype(np.float64)
    gamma = layer.gamma.numpy().astype(np.float64) if layer.scale else np.ones_like(mean)
    beta = layer.beta.numpy().astype(np.float64) if layer.center else np.zeros_like(mean)
    return gamma, beta, mean, layer.moving_variance.numpy().astype(np.float64)


def _inputs(layer) -> list:
    inputs = layer.input
    return list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]


def _step(layer, args: tuple[int, ...], out: int) -> Step:
    name = layer.name
    if isinstance(layer, keras.layers.Conv2D):
        if (
            layer.dilation_rate != (1, 1)
            or layer.groups != 1
            or layer.activation.__name__ != "linear"
        ):
            raise ValueError(f"{name}: only plain convolutions fold")
        return Step("conv", name, args, out, (layer.strides, layer.padding.upper()))
    if isinstance(layer, keras.layers.Activation) and layer.activation.__name__ == "relu":
        return Step("relu", name, args, out)
    if isinstance(layer, keras.layers.Add):
        return Step("add", name, args, out)
    if isinstance(layer, keras.layers.ZeroPadding2D):
        return Step("pad", name, args, out, tuple(tuple(p) for p in layer.padding))
    if isinstance(layer, keras.layers.MaxPooling2D):
        return Step(
            "max_pool", name, args, out, (layer.pool_size, layer.strides, layer.padding.upper())
        )
    if isinstance(layer, keras.layers.GlobalAveragePooling2D):
        return Step("mean", name, args, out)
    raise ValueError(f"{name}: a {type(layer).__name__} layer does not fold")


def folded_layer(
    folded: Folded, input_shape: tuple, name: str = "backbone", dtype: str | None = None
) -> FoldedBackbone:
    """A built `FoldedBackbone` holding `folded`'s weights. Call it inside the strategy's scope;
    it computes in `dtype` (a dtype or policy name), else in the global precision policy's
    compute dtype (its weights are float32 either way)."""
    shapes = {conv: kernel.shape for conv, (kernel, _) in folded.params.items()}
    layer = FoldedBackbone(folded.steps, shapes, folded.width, name=name, dtype=dtype)
    layer.build(input_shape)
    layer.assign(folded.params)
    return layer


def fold_backbone(backbone: keras.Model, name: str = "backbone") -> FoldedBackbone:
    """A `FoldedBackbone` computing what `backbone` (frozen, inference mode) computes."""
    return folded_layer(fold(backbone), tuple(backbone.inputs[0].shape), name)
