"""quantize: static int8 post-training quantization to QDQ ONNX."""

from __future__ import annotations

from ir import Model

from ..calibration import capture
from ..cleanup import upgrade_opset
from ..core import Option, OptionError, Pass, PassContext, PassResult, register_pass
from .apply import apply_activation_matmul_qdq, apply_qdq, calibrated_params, output_tensor
from .bias_correction import correct_biases
from .equalize import equalize_model
from .metadata import write_quant_property
from .mixed_precision import choose_float_layers
from .qparams import dequantize, quantize_weight, weight_params
from .ranges import METHODS
from .targets import SUPPORTED_OPS, find_activation_matmuls, find_targets

__all__ = ["Quantize", "QDQ_MIN_OPSET"]

# DequantizeLinear's per-channel `axis` attribute exists from opset 13; older models are upgraded
# rather than given an attribute their opset does not define.
QDQ_MIN_OPSET = 13


@register_pass
class Quantize(Pass):
    """Static int8 post-training quantization to QDQ ONNX: the weights of Conv, ConvTranspose,
    MatMul and Gemm layers become int8 constants (symmetric, one scale per output channel) behind
    DequantizeLinear, and the activations those layers read get QuantizeLinear -> DequantizeLinear
    with one scale per tensor from calibration (`method` = minmax, percentile, entropy (KL) or
    mse; `activations` = uint8 asymmetric or int8 symmetric). Biases stay float (they absorb
    bias correction exactly; onnxruntime adds them after the integer product). `outputs=true`
    also quantizes each layer's output (after its bias Add and Relu) so onnxruntime runs whole
    int8 kernels (QLinearConv, QLinearAdd): faster, slightly less exact. Models below opset 13
    are upgraded first.

    Accuracy tools without training: `bias_correction=true` adds the mean output shift caused by
    quantization back to each layer's bias; `equalize=true` first runs cross-layer equalization
    (pass `equalize`); `max_drop=D` keeps the most sensitive layers in float until the drop of
    output fidelity on calibration data, 100 x (1 - mean cosine to the float outputs), is <= D,
    with a per-layer sensitivity report. `activation_matmuls=true` also quantizes MatMuls of two
    activations (attention's Q.K^T and probabilities.V): the first input as `activations`, the
    second int8 symmetric (the signed operand of integer dot-product kernels). Scales and zero points are recorded in
    `value.meta["quant"]` and the model property `compress.quantization`.
    """
    name = "quantize"
    options = {
        "method": Option(str, "minmax", "activation calibration", choices=METHODS),
        "percentile": Option(float, 99.99, "percentile method: percentile of |x| kept"),
        "activations": Option(str, "uint8", "activation type: uint8 (asymmetric) or int8 "
                              "(symmetric)", choices=("uint8", "int8")),
        "per_channel": Option(bool, True, "one weight scale per output channel"),
        "ops": Option(list, list(SUPPORTED_OPS), "op types to quantize"),
        "exclude": Option(list, [], "node names, weight names, op types or globs to keep float"),
        "samples": Option(int, 128, "calibration samples"),
        "bias_correction": Option(bool, False, "correct the mean output shift in the biases"),
        "equalize": Option(bool, False, "cross-layer equalization before quantizing"),
        "outputs": Option(bool, False, "also quantize each layer's output (after a fused Relu) "
                          "so onnxruntime runs int8 kernels end to end (faster, less exact)"),
        "activation_matmuls": Option(bool, False, "also quantize MatMuls of two activations "
                                     "(attention scores and probabilities x values)"),
        "max_drop": Option(float, None, "keep sensitive layers float until the output fidelity "
                           "drop (points of 100 x cosine) on calibration data is <= this"),
    }
    requires_static_shapes = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not 0.0 < self.percentile <= 100.0:
            raise OptionError(f"quantize: percentile={self.percentile} must be in (0, 100]")
        if self.samples < 1:
            raise OptionError(f"quantize: samples={self.samples} must be >= 1")
        unknown = [op for op in self.ops if op not in SUPPORTED_OPS]
        if unknown:
            raise OptionError(f"quantize: ops={unknown[0]!r} is not one of "
                              f"{', '.join(SUPPORTED_OPS)}")
        notes, details = [], {}
        before = model.opset
        upgraded = upgrade_opset(model, QDQ_MIN_OPSET)
        if upgraded:
            notes.append(f"quantize: opset {before} upgraded to {QDQ_MIN_OPSET} for per-channel "
                         "DequantizeLinear")
        if self.equalize:
            details["equalized"] = equalize_model(model)
        targets, skipped = find_targets(model, self.ops, self.exclude)
        details["skipped"] = skipped
        matmuls = (find_activation_matmuls(model, self.exclude)
                   if self.activation_matmuls and "MatMul" in self.ops else [])
        if not targets and not matmuls:
            return PassResult(upgraded, notes + ["quantize: no layer to quantize"], details)

        calibration = ctx.require_calibration(model, samples=self.samples)
        tensor_names = [t.activation.name for t in targets]
        if self.outputs:
            tensor_names += [output_tensor(t).name for t in targets]
        tensor_names = list(dict.fromkeys(tensor_names))
        pair_names = [v.name for node in matmuls for v in node.inputs]
        captured = capture(model, list(dict.fromkeys(tensor_names + pair_names)), calibration,
                           limit=self.samples)
        activation = calibrated_params({n: captured[n] for n in tensor_names}, self.method,
                                       self.activations, self.percentile)
        first = calibrated_params({node.inputs[0].name: captured[node.inputs[0].name]
                                   for node in matmuls}, self.method, self.activations,
                                  self.percentile)
        second = calibrated_params({node.inputs[1].name: captured[node.inputs[1].name]
                                    for node in matmuls}, self.method, "int8", self.percentile)

        float_layers: list[str] = []
        if self.max_drop is not None:
            feeds = calibration.feeds(model, self.samples)
            float_layers, fidelity, layers = choose_float_layers(
                model, targets, activation, feeds, self.max_drop, self.per_channel, self.outputs,
                ctx.progress)
            details["mixed_precision"] = {"max_drop": self.max_drop, **fidelity, "layers": layers}
            notes.append(f"quantize: {len(float_layers)} of {len(targets)} layers kept float; "
                         f"output drop {fidelity['final_drop']:.4f} (all int8: "
                         f"{fidelity['all_int8_drop']:.4f}, budget {self.max_drop})")
        chosen = [t for t in targets if t.name not in float_layers]

        # Bias correction needs each layer's float weight and its quantized twin; take them now.
        corrections = []
        if self.bias_correction:
            for t in chosen:
                params = weight_params(t.weight.const, t.axis if self.per_channel else None)
                dequantized = dequantize(quantize_weight(t.weight.const, params), params)
                corrections.append((t.node, t.weight.const, dequantized,
                                    activation[t.activation.name], t.activation.name))
        details["layers"] = apply_qdq(model, chosen, activation, self.per_channel, self.outputs)
        if matmuls:
            details["activation_matmuls"] = apply_activation_matmul_qdq(model, matmuls, first,
                                                                        second)
        if corrections:
            details["bias_correction"] = correct_biases(model.graph, corrections, captured)

        if any("sparsity" in v.meta for v in model.graph.initializers.values()):
            from ..sparsify.metadata import write_sparsity_property
            write_sparsity_property(model)
        write_quant_property(model, {"method": self.method, "activation_dtype": self.activations,
                                     "per_channel": self.per_channel,
                                     "float_layers": float_layers})
        notes.append(f"quantize: {len(chosen)} layers int8 ({self.method}, "
                     f"{self.activations} activations), {len(skipped)} skipped"
                     + (f", {len(matmuls)} activation MatMuls int8" if matmuls else ""))
        return PassResult(True, notes, details)
