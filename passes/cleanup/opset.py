"""upgrade-opset: convert the model to a newer default-domain opset."""

from __future__ import annotations

import onnx
from onnx import version_converter

from ir import Model, UnsupportedModelError, from_onnx, to_onnx

from ..core import Option, Pass, PassContext, PassResult, register_pass

__all__ = ["UpgradeOpset", "upgrade_opset"]


def upgrade_opset(model: Model, version: int) -> bool:
    """Convert `model` in place to opset `version` with ONNX's converter; False if already there."""
    if model.opset >= version:
        return False
    proto = to_onnx(model, value_info=False)
    try:
        converted = version_converter.convert_version(proto, version)
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise UnsupportedModelError(f"cannot upgrade opset {model.opset} -> {version}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                                    ) from None
    upgraded = from_onnx(converted)
    upgraded.ir_version = max(model.ir_version, converted.ir_version)
    model.__dict__.update(upgraded.__dict__)
    return True


@register_pass
class UpgradeOpset(Pass):
    """Convert the model to a newer default-domain opset (default 17) with ONNX's version
    converter, so later passes and runtimes see one common op set. Never downgrades."""
    name = "upgrade-opset"
    options = {"version": Option(int, 17, "target opset")}

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        before = model.opset
        changed = upgrade_opset(model, self.version)
        notes = [f"opset {before} -> {self.version}"] if changed else []
        return PassResult(changed=changed, notes=notes)
