"""Lowering to deployment formats: the trunk without supervision branches, as checked ONNX.

``deploy`` (pure Python) plans what the deployed graph computes; ``onnx_export`` builds a new aux-free
module, exports and checks it; ``precision`` makes fp16 and int8 variants. Importing this package
imports neither torch nor onnx; the submodules that need them import them.
"""

from .deploy import LOGITS, PRECISIONS, DeployPlan, parse_features, plan_deploy

__all__ = ["LOGITS", "PRECISIONS", "DeployPlan", "parse_features", "plan_deploy", "export_onnx"]


def __getattr__(name: str):
    if name == "export_onnx":
        from .onnx_export import export_onnx

        return export_onnx
    raise AttributeError(name)
