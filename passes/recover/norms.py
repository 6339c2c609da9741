"""refit-norms: refit the per-channel affine of normalization layers after compression.

Compression without retraining (pruning, sparsification) reconstructs each layer well on its own,
but the small errors compound from layer to layer. Normalization layers end in a per-channel
affine, y = gamma * n + beta, where n is the normalized input. Refitting that affine so that the
*compressed* model's normalization output matches the *original* model's output of the same layer
corrects per-channel drift in scale and offset where it enters the residual stream (post-LN
transformers such as BERT/MiniLM) or the next layer (conv nets with BatchNormalization). For each
channel c it is a closed-form 1-D least-squares problem over the calibration tokens t,

    gamma'_c, beta'_c = argmin_(g, b) sum_t (g * n_c[t] + b - y_ref_c[t])^2,

with n the compressed model's normalized value (before its affine) and y_ref the original model's
output of the same normalization node. `linear=true` adds the same fit on the output of each
compressed MatMul + bias layer (a per-output-channel scale and shift, folded into its weight
columns and bias: a generalisation of bias correction).

A channel whose compressed value correlates with the reference's by less than MIN_CORRELATION
keeps its affine: it is not the same feature (`sparsify:reorder=true` permutes FFN units and
rotates attention heads, so a layer's output channel j need not be the reference's channel j)
or it is too broken for a scale and shift to mend.

The fits run one at a time in graph order, each from the model with the earlier refits in place,
so later layers see what the earlier refits changed. Fitting them all from one capture of the
compressed model instead double-corrects: each affine undoes drift that the refits before it
already removed (MiniLM, SparseGPT 50%: cosine 0.911 -> 0.859 that way, vs 0.911 sequentially).
Layers that do not read each other's results (Q/K/V of one attention) share one calibration run.

Axes: LayerNormalization normalizes over dims [axis:]; its scale/bias hold one value per element
of those dims (the "channels" here), and the rows are the positions over dims [:axis] (tokens:
[B, S] for a [B, S, H] transformer activation with axis=-1). BatchNormalization (inference form)
has channel axis 1 of [N, C, *spatial]; every (n, spatial) position is a row. A MatMul output
[..., N] has its channels on the last axis. Padding tokens (zeros of the token-mask input, when
its shape equals the rows' [B, S]) are left out of the fit: their outputs are pooled away, and
fitting them would pull the affine towards garbage.

The pass needs the uncompressed model. `refit-norms:mark=true`, placed before the compressing
passes, keeps a copy of the model in the pass context (`PassContext.artifacts`) and changes
nothing; `refit-norms` after the compressing passes fits against that copy:

    refit-norms:mark=true,sparsify:method=sparsegpt:sparsity=0.5,refit-norms

From Python, `refit_norms(model, reference, calibration)` does the same with an explicit
reference (e.g. `ir.copy_model(model)` taken before compressing).

What it gives (bench/refit_norms.py, MiniLM embedding cosine): little after compressions that
already reconstruct each layer by least squares (SparseGPT, OBS pruning: +0.0002 to +0.0015),
because what error remains there is token-dependent, not a per-channel scale or offset; more
after compressions that do not (magnitude, Wanda), whose layers shrink their outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ir import Model, Node, copy_model

from ..calibration import CalibrationSet, capture_session, token_mask_input
from ..core import Option, Pass, PassContext, PassResult, PreconditionError, register_pass

__all__ = ["RefitNorms", "refit_norms", "find_norms", "find_linear_outputs", "AffineFit",
           "REFERENCE_KEY"]

# Where `refit-norms:mark=true` leaves the reference model in `PassContext.artifacts`.
REFERENCE_KEY = "refit-norms/reference"

NORM_OPS = ("LayerNormalization", "BatchNormalization")

# A channel whose normalized value hardly varies on the calibration tokens cannot tell scale from
# offset: keep its scale and fit only the offset. Relative to the mean variance over channels.
_FLAT_CHANNEL = 1e-8
# A channel whose compressed output correlates with the reference's by less than this is not the
# same feature any more (reordered, or broken beyond what an affine can mend): left as it is.
MIN_CORRELATION = 0.5


@dataclass
class NormLayer:
    """A normalization node whose affine can be refitted, paired with its reference twin.

    `reference_output` is the name of the same node's output in the reference model. The fit
    sees rows of the normalized input (`source` is the value captured to compute them).
    """
    node: Node
    reference_output: str

    @property
    def source(self) -> str:
        return self.node.input(0).name

    @property
    def channels(self) -> int:
        return int(self.node.input(1).const.size)

    def current(self) -> tuple[np.ndarray, np.ndarray]:
        """The affine (scale, bias) in place now, flattened to [channels] (float64)."""
        scale = np.asarray(self.node.input(1).const, np.float64).reshape(-1)
        bias = self.node.input(2)
        return scale, (np.zeros_like(scale) if bias is None
                       else np.asarray(bias.const, np.float64).reshape(-1))

    def rows(self, x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
        return normalized_rows(self.node, x)

    def reference_rows(self, y: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
        return channel_rows(self.node, y)

    def apply(self, model: Model, scale: np.ndarray, bias: np.ndarray) -> None:
        _set_affine(model, self.node, scale, bias)


@dataclass
class LinearOutput:
    """A compressed MatMul layer with a constant weight W [K, N] whose output is read only by
    an Add of a constant bias [N]; its output y [..., N] gets a per-channel affine
    s * y + t, folded into the layer as W[:, j] *= s_j and bias_j = s_j * bias_j + t_j (zeros
    of a sparse W stay zeros, so its sparsity pattern is kept)."""
    matmul: Node
    add: Node
    reference_output: str

    @property
    def node(self) -> Node:
        return self.matmul

    @property
    def source(self) -> str:
        return self.add.output.name

    @property
    def channels(self) -> int:
        return int(self.matmul.input(1).const.shape[-1])

    def current(self) -> tuple[np.ndarray, np.ndarray]:
        return np.ones(self.channels), np.zeros(self.channels)

    def rows(self, y: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
        y = np.asarray(y, dtype=np.float64)
        return y.reshape(-1, y.shape[-1]), tuple(y.shape[:-1])

    reference_rows = rows

    def apply(self, model: Model, scale: np.ndarray, shift: np.ndarray) -> None:
        weight = self.matmul.input(1)
        bias_index = 0 if self.add.input(0) is not self.matmul.output else 1
        bias = self.add.input(bias_index)
        scaled = (weight.const * scale).astype(weight.const.dtype)
        if len(weight.uses()) == 1:
            weight.const = scaled  # same value: its name and sparsity metadata stay
        else:
            new = model.graph.add_constant(f"{weight.name}_refit", scaled)
            new.meta = dict(weight.meta)
            self.matmul.set_input(1, new)
        self.add.set_input(bias_index, model.graph.add_constant(
            f"{bias.name}_refit", (bias.const * scale + shift).astype(bias.const.dtype)))


def _key(node: Node) -> str:
    """How a node is recognised across the compressed and the reference model: its name, or
    its first output's name for unnamed nodes (passes keep both when they edit weights)."""
    return node.name or node.outputs[0].name


def _refittable(node: Node) -> bool:
    scale, bias = node.input(1), node.input(2)
    if scale is None or not scale.is_constant or (bias is not None and not bias.is_constant):
        return False
    if node.op_type == "BatchNormalization":
        # Training mode also writes running statistics; inference form needs constant ones.
        return (not node.attr("training_mode", 0) and len(node.outputs) == 1
                and all(v is not None and v.is_constant for v in node.inputs[3:5]))
    return True


def find_norms(model: Model, reference: Model) -> tuple[list[NormLayer], list[str]]:
    """The normalization nodes of `model` (graph order) that can be refitted against
    `reference`, and a note for each one skipped (no twin, different width, computed affine)."""
    twins = {_key(n): n for n in reference.graph.nodes if n.op_type in NORM_OPS}
    layers, skipped = [], []
    for node in model.graph.nodes:
        if node.op_type not in NORM_OPS:
            continue
        twin = twins.get(_key(node))
        if twin is None:
            skipped.append(f"{_key(node)}: not in the reference model")
        elif not _refittable(node):
            skipped.append(f"{_key(node)}: scale/bias/statistics are not constants")
        elif twin.output.shape != node.output.shape:
            skipped.append(f"{_key(node)}: output shape {node.output.shape} differs from the "
                           f"reference's {twin.output.shape}")
        else:
            layer = NormLayer(node, twin.output.name)
            expected = _channel_count(node)
            if expected is None or layer.channels != expected or (
                    node.input(2) is not None and node.input(2).const.size != expected):
                skipped.append(f"{_key(node)}: scale/bias do not hold one value per channel")
            else:
                layers.append(layer)
    return layers, skipped


def find_linear_outputs(model: Model, reference: Model) -> tuple[list[LinearOutput], list[str]]:
    """The MatMul + bias layers of `model` whose weight differs from the reference's (the
    compressed ones) and whose output has the same shape there, in graph order."""
    twins = {_key(n): n for n in reference.graph.nodes if n.op_type == "MatMul"}
    layers, skipped = [], []
    for node in model.graph.nodes:
        twin = twins.get(_key(node)) if node.op_type == "MatMul" else None
        if twin is None or not _is_compressed(node, twin):
            continue
        add, twin_add = _bias_add(node), _bias_add(twin)
        if add is None or twin_add is None:
            skipped.append(f"{_key(node)}: no constant bias Add after the layer")
        elif add.output.shape != twin_add.output.shape:
            skipped.append(f"{_key(node)}: output shape {add.output.shape} differs from the "
                           f"reference's {twin_add.output.shape}")
        else:
            layers.append(LinearOutput(node, add, twin_add.output.name))
    return layers, skipped


def _is_compressed(node: Node, twin: Node) -> bool:
    weight, original = node.input(1), twin.input(1)
    if weight is None or not weight.is_constant or original is None or not original.is_constant:
        return False
    return weight.const.shape != original.const.shape or \
        not np.array_equal(weight.const, original.const)


def _bias_add(node: Node) -> Node | None:
    """The Add of a constant [N] bias that alone reads a MatMul's 2-D-weight output."""
    weight, output = node.input(1), node.output
    if weight is None or not weight.is_constant or weight.const.ndim != 2:
        return None
    found = output.sole_add()
    if found is None:
        return None
    add, index = found
    bias = add.input(index)
    if bias is None or not bias.is_constant or bias.const.shape != (weight.const.shape[1],):
        return None
    return add


def _channel_count(node: Node) -> int | None:
    shape = node.input(0).shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    if node.op_type == "BatchNormalization":
        return int(shape[1])
    axis = int(node.attr("axis", -1)) % len(shape)
    return int(np.prod(shape[axis:]))


def normalized_rows(node: Node, x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """The node's normalized input before its affine, as rows [positions, channels] (float64),
    and the shape of the position dims (to match against the token mask)."""
    x = np.asarray(x, dtype=np.float64)
    eps = float(node.attr("epsilon", 1e-5))
    if node.op_type == "BatchNormalization":
        mean = np.asarray(node.input(3).const, dtype=np.float64)
        var = np.asarray(node.input(4).const, dtype=np.float64)
        rows = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
        positions = (x.shape[0], *x.shape[2:])
        return (rows - mean) / np.sqrt(var + eps), positions
    axis = int(node.attr("axis", -1)) % x.ndim
    rows = x.reshape(int(np.prod(x.shape[:axis])), -1)
    centered = rows - rows.mean(axis=1, keepdims=True)
    n = centered / np.sqrt((centered ** 2).mean(axis=1, keepdims=True) + eps)
    return n, tuple(x.shape[:axis])


def channel_rows(node: Node, y: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """A normalization output y laid out like `normalized_rows` ([positions, channels])."""
    y = np.asarray(y, dtype=np.float64)
    if node.op_type == "BatchNormalization":
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1]), (y.shape[0], *y.shape[2:])
    axis = int(node.attr("axis", -1)) % y.ndim
    return y.reshape(int(np.prod(y.shape[:axis])), -1), tuple(y.shape[:axis])


@dataclass
class AffineFit:
    """Running sums for the per-channel fit of y ~ g * n + b over rows ([rows, channels])."""
    channels: int
    count: int = 0
    n_sum: np.ndarray = field(init=False)
    nn_sum: np.ndarray = field(init=False)
    y_sum: np.ndarray = field(init=False)
    ny_sum: np.ndarray = field(init=False)
    yy_sum: np.ndarray = field(init=False)

    def __post_init__(self):
        for name in ("n_sum", "nn_sum", "y_sum", "ny_sum", "yy_sum"):
            setattr(self, name, np.zeros(self.channels))

    def add(self, n: np.ndarray, y: np.ndarray) -> None:
        self.count += len(n)
        self.n_sum += n.sum(axis=0)
        self.nn_sum += np.einsum("ij,ij->j", n, n)
        self.y_sum += y.sum(axis=0)
        self.ny_sum += np.einsum("ij,ij->j", n, y)
        self.yy_sum += np.einsum("ij,ij->j", y, y)

    def _moments(self):
        """Per channel: means of n and y, variances of n and y, their covariance, and which
        channels are flat (n hardly varies)."""
        count = max(self.count, 1)
        n_mean, y_mean = self.n_sum / count, self.y_sum / count
        n_var = self.nn_sum / count - n_mean ** 2
        y_var = self.yy_sum / count - y_mean ** 2
        covariance = self.ny_sum / count - n_mean * y_mean
        flat = n_var <= _FLAT_CHANNEL * max(float(n_var.mean()), 1e-30)
        return n_mean, y_mean, n_var, y_var, covariance, flat

    def solve(self, scale: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The least-squares (g, b) per channel; flat channels keep `scale` and fit b only;
        unmatched channels (`unmatched`) keep `scale` and `bias`."""
        n_mean, y_mean, n_var, _, covariance, flat = self._moments()
        scale = np.asarray(scale, np.float64).reshape(-1)
        g = np.where(flat, scale, covariance / np.where(flat, 1.0, n_var))
        b = y_mean - g * n_mean
        unmatched = self.unmatched()
        return np.where(unmatched, scale, g), np.where(unmatched, bias, b)

    def unmatched(self) -> np.ndarray:
        """Channels whose values correlate with the reference's by less than MIN_CORRELATION:
        not the same feature (e.g. channels that `sparsify:reorder` permuted or rotated), so a
        scale and shift would only squash them towards the reference's mean."""
        _, _, n_var, y_var, covariance, flat = self._moments()
        spread = np.sqrt(np.maximum(n_var * y_var, 1e-300))
        return ~flat & (covariance < MIN_CORRELATION * spread)

    def error(self, g: np.ndarray, b: np.ndarray) -> float:
        """sum (g n + b - y)^2 / sum y^2 over all channels and rows, from the sums."""
        squared = (g ** 2 * self.nn_sum + 2 * g * b * self.n_sum + b ** 2 * self.count
                   - 2 * g * self.ny_sum - 2 * b * self.y_sum + self.yy_sum)
        return float(max(squared.sum(), 0.0) / max(self.yy_sum.sum(), 1e-30))


def _token_rows(positions: tuple[int, ...], feed: dict, mask_name: str | None):
    """Boolean row selector from the token mask when it covers exactly these positions."""
    if mask_name is None:
        return None
    mask = np.asarray(feed[mask_name])
    return mask.reshape(-1) != 0 if tuple(mask.shape) == tuple(positions) else None


def _set_affine(model: Model, node: Node, scale: np.ndarray, bias: np.ndarray) -> None:
    """Give the node new scale/bias constants (never edited in place: they may be shared)."""
    graph = model.graph
    old_scale = node.input(1)
    dtype = old_scale.const.dtype
    node.set_input(1, graph.add_constant(f"{old_scale.name}_refit",
                                         scale.reshape(old_scale.const.shape).astype(dtype)))
    old_bias = node.input(2)
    shape = old_scale.const.shape if old_bias is None else old_bias.const.shape
    new_bias = graph.add_constant(f"{old_bias.name if old_bias else old_scale.name + '_bias'}"
                                  "_refit", bias.reshape(shape).astype(dtype))
    if old_bias is None:
        node.inputs = [*node.inputs[:2], new_bias, *node.inputs[3:]]
    else:
        node.set_input(2, new_bias)


Point = NormLayer | LinearOutput


def _capture_reference(reference: Model, points: list[Point], feeds: list[dict],
                       mask_name: str | None) -> list[list[np.ndarray]]:
    """Per point, per feed: the reference output rows of the kept tokens (float32, to bound
    memory; the fit itself runs in float64)."""
    names = [point.reference_output for point in points]
    session = capture_session(reference, names)
    rows: list[list[np.ndarray]] = [[] for _ in points]
    for feed in feeds:
        for index, (point, y) in enumerate(zip(points, session.run(names, feed))):
            y_rows, positions = point.reference_rows(y)
            rows[index].append(_kept(y_rows, positions, feed, mask_name).astype(np.float32))
    return rows


def _kept(rows: np.ndarray, positions: tuple[int, ...], feed: dict,
          mask_name: str | None) -> np.ndarray:
    keep = _token_rows(positions, feed, mask_name)
    return rows if keep is None or len(keep) != len(rows) else rows[keep]


def _fit_stage(model: Model, stage: list[int], points: list[Point],
               targets: list[list[np.ndarray]], feeds: list[dict],
               mask_name: str | None) -> list[AffineFit]:
    """Fold the compressed model's rows of the stage's points (normalized inputs, layer
    outputs), paired with the reference rows of the same tokens, into one AffineFit per point
    (one run over the feeds)."""
    names = list(dict.fromkeys(points[i].source for i in stage))
    session = capture_session(model, names)
    fits = [AffineFit(points[i].channels) for i in stage]
    for feed_index, feed in enumerate(feeds):
        captured = dict(zip(names, session.run(names, feed)))
        for fit, i in zip(fits, stage):
            rows, positions = points[i].rows(captured[points[i].source])
            fit.add(_kept(rows, positions, feed, mask_name),
                    np.asarray(targets[i][feed_index], dtype=np.float64))
    return fits


def _graph_order(model: Model, points: list[Point]) -> list[Point]:
    """Points sorted by where their affine acts: the norm node, or the linear layer's bias Add."""
    index = {id(node): i for i, node in enumerate(model.graph.nodes)}
    return sorted(points, key=lambda p: index[id(p.add if isinstance(p, LinearOutput)
                                                  else p.node)])


def _independent_runs(points: list[Point]) -> list[list[int]]:
    """Split the points (graph order) into consecutive stages whose members do not read each
    other's results: refitting one cannot change another's rows, so one calibration run serves
    the whole stage and the fit stays sequential (e.g. the Q/K/V projections of one layer)."""
    stages: list[list[int]] = []
    downstream: set[int] = set()  # ids of nodes that read the current stage's results
    for index, point in enumerate(points):
        producer = point.node if isinstance(point, NormLayer) else point.add
        source = point.node.input(0).producer if isinstance(point, NormLayer) else point.matmul
        if not stages or (source is not None and id(source) in downstream) \
                or id(point.node) in downstream:
            stages.append([])
            downstream = set()
        stages[-1].append(index)
        downstream |= _descendants(producer)
    return stages


def _descendants(node: Node) -> set[int]:
    """ids of `node` and every node that reads its outputs, directly or not."""
    seen, todo = {id(node)}, [node]
    while todo:
        for value in todo.pop().outputs:
            for reader in (value.consumers() if value is not None else ()):
                if id(reader) not in seen:
                    seen.add(id(reader))
                    todo.append(reader)
    return seen


def refit_norms(model: Model, reference: Model, calibration: CalibrationSet,
                samples: int | None = None, sequential: bool = True, linear: bool = False,
                token_mask: str = "auto",
                progress: Callable[..., Iterator] | None = None) -> dict:
    """Refit the scale/bias of every LayerNormalization/BatchNormalization of `model` in place
    (with `linear`, also a per-channel scale and shift of each compressed MatMul + bias layer's
    output) so that its outputs match the same nodes of `reference` (the uncompressed model) on
    `calibration` (at most `samples` samples). Returns the report details: per refitted point
    the relative squared error of its output against the reference before and after the refit
    (on the calibration tokens, with the earlier refits in place when `sequential`)."""
    progress = progress or (lambda items, total=None, desc="": iter(items))
    model.graph.toposort()
    points, skipped = find_norms(model, reference)
    if linear:
        outputs, skipped_linear = find_linear_outputs(model, reference)
        points, skipped = _graph_order(model, [*points, *outputs]), skipped + skipped_linear
    details: dict = {"layers": [], "skipped": skipped}
    if not points:
        return details
    mask_name = token_mask_input(model, token_mask, RefitNorms.name)
    feeds = calibration.feeds(model, samples)
    targets = _capture_reference(reference, points, feeds, mask_name)
    # Sequential: one run per point, each from the model with the earlier refits in place.
    # Otherwise one run gathers every point's rows from the compressed model as it came.
    stages = _independent_runs(points) if sequential else [list(range(len(points)))]
    for stage in progress(stages, total=len(stages), desc="refit-norms"):
        fits = _fit_stage(model, stage, points, targets, feeds, mask_name)
        for i, fit in zip(stage, fits):
            point = points[i]
            old_scale, old_bias = point.current()
            scale, bias = fit.solve(old_scale, old_bias)
            details["layers"].append({
                "node": _key(point.node), "op": point.node.op_type, "rows": fit.count,
                "unmatched_channels": int(fit.unmatched().sum()),
                "error_before": round(fit.error(old_scale, old_bias), 6),
                "error_after": round(fit.error(scale, bias), 6)})
            point.apply(model, scale, bias)
    model.graph.remove_unused_constants()
    return details


@register_pass
class RefitNorms(Pass):
    """Refit the per-channel affine (scale, bias) of every LayerNormalization and inference
    BatchNormalization after compression so that its output matches the uncompressed model's on
    calibration data: a closed-form least-squares fit per channel, layer by layer in graph order,
    each from the model with the earlier refits in place; `linear=true` also fits a scale and
    shift per output channel of each compressed MatMul + bias layer (channels whose output no
    longer correlates with the reference's, e.g. reordered by `sparsify:reorder`, are left as
    they are). Place
    `refit-norms:mark=true` before the compressing passes (it keeps a copy of the model as the
    reference and changes nothing) and `refit-norms` after them; needs calibration data
    (`--calib`). Helps most after compression without reconstruction (MiniLM, magnitude 50%:
    embedding cosine 0.769 -> 0.842 with `linear=true`); after SparseGPT or OBS pruning, whose
    layers are already least-squares fits, it gains little (+0.001 to +0.003).

    Example: `refit-norms:mark=true,sparsify:method=magnitude:sparsity=0.5,refit-norms`.
    Layers are matched by node name between the reference and the compressed model; those whose
    output width changed (pruned channels), whose affine is computed, or (linear) that have no
    constant bias Add are left as they are and listed in the report.
    """
    name = "refit-norms"
    options = {
        "mark": Option(bool, False, "keep a copy of the model as the reference and change "
                       "nothing (place before the compressing passes)"),
        "samples": Option(int, 128, "calibration samples for the fit"),
        "linear": Option(bool, False, "also refit a per-channel scale and shift of the "
                         "output of each compressed MatMul + bias layer"),
        "token_mask": Option(str, "auto", "graph input whose 0s mark padding tokens to leave "
                             "out of the fit (auto: an input named attention_mask; none)"),
    }
    requires_static_shapes = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if self.mark:
            ctx.artifacts[REFERENCE_KEY] = copy_model(model)
            return PassResult(False, details={"marked": True})
        reference = ctx.artifacts.get(REFERENCE_KEY)
        if reference is None:
            raise PreconditionError(
                "refit-norms: no reference model; place refit-norms:mark=true before the "
                "compressing passes, e.g. refit-norms:mark=true,sparsify:sparsity=0.5,refit-norms")
        if ctx.calibration is None or getattr(ctx.calibration, "synthetic", False):
            raise PreconditionError(
                "refit-norms: needs calibration data (--calib DATA.npz, or calibration= in "
                "passes.apply/compress); fitting to synthetic inputs would move the affines "
                "away from real data")
        details = refit_norms(model, reference, ctx.calibration, samples=self.samples,
                              linear=self.linear, token_mask=self.token_mask,
                              progress=ctx.progress)
        notes = [f"refit-norms: skipped {note}" for note in details["skipped"]]
        if not details["layers"]:
            notes.append("refit-norms: no normalization layer to refit")
        return PassResult(bool(details["layers"]), notes, details)
