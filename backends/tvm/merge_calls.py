"""Merge runs of `call_tir` bindings of a Relax function into one PrimFunc each.

Why: on a small model the Relax VM's own work per kernel call dominates. Every `call_tir`
costs the VM an instruction dispatch, a tensor allocation from planned storage
(`alloc_storage` / `alloc_tensor`), the packed-function argument checks and a `null_value`
kill afterwards; on the int8 digits model (an 8x8 ResNet, 47 calls of a few microseconds each)
these builtins took about half of the run in the benchmark's profile. One call of one PrimFunc that runs all the kernels one
after the other removes that: the tensors passed between them become buffers allocated inside
the PrimFunc (small ones on the stack).

How: after scheduling, a maximal run of consecutive `call_tir` bindings with static shapes is
moved into a Relax function marked `Primitive`, the form FuseOps gives a fusion group, and
Relax's FuseTIR concatenates the callees' bodies into one PrimFunc, replacing each callee's
parameter buffers by the merged function's buffers. Kernels keep their loops and schedules and
run in binding order, so the numerics are identical. FuseTIR needs every callee in schedulable
form (a root block) and one buffer type per tensor; our hand-written kernels are plain TIR with
int32 shapes and legalized ops use int64 shapes, so each callee of a run gets a merge-only
copy: indices narrowed to int32, re-parsed as schedulable TIR and wrapped in a root block. A
binding that is not such a `call_tir` (a `call_dps_packed`, a tuple access, symbolic shapes, a
callee that cannot be converted: int64 data such as token ids, embedded constants) ends a run,
and the next run starts after it.

When it pays: always where measured (1 thread), most on small models: digits int8 (47 calls,
160 KiB of intermediates) 0.030 -> 0.026 ms, MiniLM int8 at 128 tokens (143 calls, 22 MiB)
12.1 -> 11.6 ms, and resident memory grows by the same ~4 MiB over the first runs either way
(TVM plans the merged function's buffers much as the VM plans its storage). The cost is compile
time: one large function
for LLVM (MiniLM int8: +11 s). So a run is merged only when its internal tensors (computed and
read only inside the run) total at most `max_intermediate_bytes`, which keeps large models
from making huge functions. CPU only: a GPU kernel's launch configuration belongs to its
PrimFunc, so GPU kernels cannot simply be concatenated.

Shapes: none of its own; tensors keep the shapes and dtypes of the Relax bindings.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx

__all__ = ["DEFAULT_MAX_INTERMEDIATE_BYTES", "MergeCallTIR", "merge_call_tir"]

# Digits holds 60-160 KiB of intermediates, MiniLM at 128 tokens 22 MiB (int8) to 41 MiB (fp32);
# both are faster merged, so the limit is set above them.
DEFAULT_MAX_INTERMEDIATE_BYTES = 64 << 20


@tvm.transform.module_pass(opt_level=0, name="MergeCallTIR")
class MergeCallTIR:
    """Module pass: merge runs of static `call_tir` bindings (see the module docstring)."""

    def __init__(self, max_intermediate_bytes: int = DEFAULT_MAX_INTERMEDIATE_BYTES,
                 min_calls: int = 2):
        self.max_intermediate_bytes = max_intermediate_bytes
        self.min_calls = min_calls

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return merge_call_tir(mod, self.max_intermediate_bytes, self.min_calls)


def merge_call_tir(mod: tvm.IRModule,
                   max_intermediate_bytes: int = DEFAULT_MAX_INTERMEDIATE_BYTES,
                   min_calls: int = 2) -> tvm.IRModule:
    """`mod` with each qualifying run of `call_tir` bindings of every Relax function replaced
    by one `call_tir` of a merged PrimFunc `<function>_merged<n>`; `mod` itself when no run
    qualifies."""
    builder = relax.BlockBuilder(mod)
    callees = _MergeableCallees(mod, builder)
    changed = False
    for gvar, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        rewriter = _FunctionRewriter(builder, callees, gvar.name_hint, max_intermediate_bytes,
                                     max(2, min_calls))
        new_func = rewriter.rewrite(func)
        if rewriter.groups:
            builder.update_func(gvar, new_func)
            changed = True
    if not changed:
        return mod
    try:
        merged = relax.transform.FuseTIR()(builder.get())
    except Exception as exc:  # merging is an optimization: never fail the build over it
        message = str(exc).strip().splitlines()
        warnings.warn(f"MergeCallTIR: FuseTIR failed, kernels left unmerged "
                      f"({message[-1] if message else type(exc).__name__})", stacklevel=2)
        return mod
    # The merge-only callee copies (and callees whose every call was merged) are unused now.
    return relax.transform.DeadCodeElimination(_entry_functions(merged))(merged)


def _entry_functions(mod: tvm.IRModule) -> list[str]:
    return [gv.name_hint for gv, f in mod.functions_items()
            if isinstance(f, relax.Function) and f.attrs is not None
            and "global_symbol" in f.attrs]


class _MergeableCallees:
    """Merge-only copies of callees in the form FuseTIR accepts, made once per callee and only
    for runs that qualify (the print/parse round trip is the slow part of the pass)."""

    def __init__(self, mod: tvm.IRModule, builder: relax.BlockBuilder):
        self.mod = mod
        self.builder = builder
        self.copies: dict[str, tuple | None] = {}  # callee name -> (copy's gvar, copy)

    def get(self, call: _Call) -> tvm.ir.GlobalVar | None:
        """The copy to call instead of `call`'s callee, or None when it cannot be merged."""
        gvar = call.binding.value.args[0]
        name = gvar.name_hint
        if name not in self.copies:
            func = _fusable_copy(self.mod[gvar])
            self.copies[name] = (None if func is None else
                                 (self.builder.add_func(func, f"{name}_merge_copy"), func))
        copy = self.copies[name]
        if copy is None or not _signature_matches(copy[1], call):
            return None
        return copy[0]


def _signature_matches(func: tirx.PrimFunc, call: _Call) -> bool:
    """Every tensor of the call has the shape and dtype of the buffer it is passed as (FuseTIR
    gives each Relax tensor one buffer; a kernel that reads its input under another shape, as
    call_tir allows, would make two)."""
    tensors = call.args + [call.binding.var]
    if len(func.params) != len(tensors):
        return False
    for param, tensor in zip(func.params, tensors):
        if not isinstance(param.ty, tirx.buffer.BufferType):
            return False
        if ([int(d) for d in param.ty.shape] != _shape(tensor.ty)
                or str(param.ty.dtype) != str(tensor.ty.dtype)):
            return False
    return True


def _fusable_copy(func) -> tirx.PrimFunc | None:
    """`func` with int32 indices, parsed as schedulable TIR under a root block, or None when it
    cannot be converted (then its calls are not merged)."""
    if not isinstance(func, tirx.PrimFunc):
        return None
    try:
        # Narrowing rewrites int64 shapes and indices to int32 (it refuses extents that do not
        # fit). Re-parsing the script with s_tir=True gives every buffer the same type whether
        # the callee was a legalized op or one of our plain-TIR kernels (whose buffers carry a
        # tile layout that FuseTIR would see as a different type).
        narrowed = tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule({"f": func}))["f"]
        source = narrowed.script()
        if "metadata[" in source:  # embedded constants do not survive a print/parse round trip
            return None
        if "s_tir=True" not in source:
            source = source.replace("@T.prim_func(private=True)",
                                    "@T.prim_func(private=True, s_tir=True)", 1)
            source = _dtype_views_as_declarations(source, narrowed)
        parsed = tvm.script.from_source(source)
    except Exception:  # any construct the round trip does not support: leave it unmerged
        return None
    if not isinstance(parsed.body, tvm.s_tir.SBlockRealize):
        root = tvm.s_tir.SBlock([], [], [], "root", parsed.body)
        parsed = parsed.with_body(tvm.s_tir.SBlockRealize([], True, root))
    return parsed


_DTYPE_VIEW = re.compile(r'^(?P<indent>\s*)(?P<name>\w+) = (?P<base>\w+)\.view\("(?P<dtype>\w+)"\)$',
                         re.MULTILINE)


def _dtype_views_as_declarations(source: str, func: tirx.PrimFunc) -> str:
    """Rewrite `V = P.view("dtype")` of a parameter P (a reinterpreting view; schedulable TIR
    has no buffer layouts to view through) as `V = T.decl_buffer(shape, "dtype", data=P.data)`,
    the same storage with the last axis rescaled by the size ratio of the two dtypes."""
    params = {p.name: p for p in func.params}

    def declaration(match):
        base = params.get(match["base"])
        if base is None:
            raise ValueError(f"view of {match['base']}, not a parameter")
        shape = [int(d) for d in base.ty.shape]
        old_bits, new_bits = tvm.DataType(base.ty.dtype).bits, tvm.DataType(match["dtype"]).bits
        if (shape[-1] * old_bits) % new_bits:
            raise ValueError(f"view of {match['base']} does not divide its last axis")
        shape[-1] = shape[-1] * old_bits // new_bits
        return (f'{match["indent"]}{match["name"]} = T.decl_buffer({tuple(shape)}, '
                f'"{match["dtype"]}", data={match["base"]}.data)')

    return _DTYPE_VIEW.sub(declaration, source)


@dataclass
class _Call:
    """A binding `var = call_tir(callee, args)` with static-shape tensors only."""
    index: int                  # position in its block
    binding: relax.VarBinding
    args: list                  # relax.Var or constant


class _FunctionRewriter:
    def __init__(self, builder, callees, func_name, max_intermediate_bytes, min_calls):
        self.builder = builder
        self.callees = callees
        self.func_name = func_name
        self.max_intermediate_bytes = max_intermediate_bytes
        self.min_calls = min_calls
        self.groups: list[tvm.ir.GlobalVar] = []

    def rewrite(self, func: relax.Function) -> relax.Function:
        seq = func.body
        blocks = list(seq.blocks)
        later_uses = _later_uses(blocks, seq.body)
        new_blocks = []
        for block, uses in zip(blocks, later_uses):
            dataflow = isinstance(block, relax.DataflowBlock)
            new_bindings, run = [], []
            for i, binding in enumerate(block.bindings):
                call = _as_call(i, binding)
                if call is not None:
                    run.append(call)
                    continue
                new_bindings += self._replace(run, uses, dataflow)
                run = []
                new_bindings.append(binding)
            new_bindings += self._replace(run, uses, dataflow)
            new_blocks.append(relax.DataflowBlock(new_bindings) if dataflow
                              else relax.BindingBlock(new_bindings))
        if not self.groups:
            return func
        return relax.Function(func.params, relax.SeqExpr(new_blocks, seq.body), func.ret_ty,
                              func.is_pure, func.attrs, func.span)

    def _replace(self, run: list[_Call], uses: list[set], dataflow: bool) -> list:
        """The bindings that replace `run`: calls of merged functions for the parts that
        qualify, the original bindings for the rest."""
        if not self._qualifies(run, uses):
            return [c.binding for c in run]
        # Callees that cannot be converted split the run; each part is judged again.
        result, part, copies = [], [], []
        for call in run + [None]:
            copy = None if call is None else self.callees.get(call)
            if copy is not None:
                part.append(call)
                copies.append(copy)
                continue
            if self._qualifies(part, uses):
                result += self._merge(part, copies, uses[part[-1].index + 1], dataflow)
            else:
                result += [c.binding for c in part]
            if call is not None:
                result.append(call.binding)
            part, copies = [], []
        return result

    def _qualifies(self, run: list[_Call], uses: list[set]) -> bool:
        if len(run) < self.min_calls:
            return False
        after = uses[run[-1].index + 1]
        internal = sum(_nbytes(c.binding.var.ty) for c in run if c.binding.var not in after)
        return internal <= self.max_intermediate_bytes and any(
            c.binding.var in after for c in run)

    def _merge(self, run: list[_Call], copies: list, uses_after: set, dataflow: bool) -> list:
        """Bindings calling one new primitive function that computes `run`."""
        exported = [c.binding.var for c in run if c.binding.var in uses_after]
        inputs, group = _group_function(run, copies, exported)
        name = f"{self.func_name}_merged{len(self.groups)}"
        gvar = self.builder.add_func(group, name)
        self.groups.append(gvar)
        call = relax.Call(gvar, inputs)
        if len(exported) == 1:
            return [relax.VarBinding(exported[0], call)]
        make_var = relax.DataflowVar if dataflow else relax.Var
        results = make_var(f"{name}_out", relax.TupleType([v.ty for v in exported]))
        return [relax.VarBinding(results, call)] + [
            relax.VarBinding(var, relax.TupleGetItem(results, i))
            for i, var in enumerate(exported)]


def _as_call(index: int, binding) -> _Call | None:
    """The binding as a candidate for merging, or None."""
    if not isinstance(binding, relax.VarBinding):
        return None
    value = binding.value
    if not (isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.call_tir")):
        return None
    gvar, arg_tuple = value.args[0], value.args[1]
    if not isinstance(gvar, tvm.ir.GlobalVar) or not isinstance(arg_tuple, relax.Tuple):
        return None
    args = list(arg_tuple.fields)
    # A tuple-valued call_tir is read through TupleGetItem bindings that would have to join
    # the run too; our lowering emits none, so such a call just ends the run.
    if not (_static_tensor(value.ty) and all(
            isinstance(a, (relax.Var, tvm.ir.expr.Constant)) and _static_tensor(a.ty)
            for a in args)):
        return None
    return _Call(index, binding, args)


def _group_function(run: list[_Call], copies: list, exported: list):
    """(inputs, primitive Relax function computing `exported` from `inputs`): each tensor the
    run reads but does not compute, constants included, becomes a parameter."""
    inputs, params, renamed = [], [], {}
    bindings = []
    for call, copy in zip(run, copies):
        args = []
        for arg in call.args:
            if arg not in renamed:  # not computed earlier in the run: an input
                param = relax.Var(f"p{len(params)}", arg.ty)
                inputs.append(arg)
                params.append(param)
                renamed[arg] = param
            args.append(renamed[arg])
        var = call.binding.var
        new_var = relax.DataflowVar(var.name, var.ty)
        renamed[var] = new_var
        bindings.append(relax.VarBinding(new_var, relax.call_tir(copy, relax.Tuple(args), var.ty)))
    if len(exported) == 1:
        result_value, result_ty = renamed[exported[0]], exported[0].ty
    else:
        result_value = relax.Tuple([renamed[v] for v in exported])
        result_ty = relax.TupleType([v.ty for v in exported])
    result = relax.Var("result", result_ty)
    bindings.append(relax.VarBinding(result, result_value))
    body = relax.SeqExpr([relax.DataflowBlock(bindings)], result)
    func = relax.Function(params, body, result_ty).with_attr("Primitive", True)
    return inputs, func


def _later_uses(blocks, result) -> list[list[set]]:
    """uses[b][i]: the Relax vars read by block b's bindings from binding i on, by the blocks
    after b, or by the function's result."""
    seen = {result} if isinstance(result, relax.Var) else set(relax.analysis.all_vars(result))
    uses = [None] * len(blocks)
    for b in range(len(blocks) - 1, -1, -1):
        bindings = list(blocks[b].bindings)
        per_binding = [None] * (len(bindings) + 1)
        per_binding[len(bindings)] = set(seen)
        for i in range(len(bindings) - 1, -1, -1):
            value = bindings[i].value
            seen |= {value} if isinstance(value, relax.Var) else \
                set(relax.analysis.all_vars(value))
            per_binding[i] = set(seen)
        uses[b] = per_binding
    return uses


def _static_tensor(ty) -> bool:
    return (isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr)
            and all(isinstance(d, tirx.IntImm) for d in ty.shape.values))


def _shape(ty) -> list[int]:
    return [int(d) for d in ty.shape.values]


def _nbytes(ty) -> int:
    return int(np.prod(_shape(ty), dtype=np.int64)) * ((tvm.DataType(ty.dtype).bits + 7) // 8)
