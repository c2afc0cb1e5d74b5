"""moefx: run dense PyTorch models as Mixture-of-Experts models.

convert (moefx.convert) -> fuse (torch.ops.moefx.moe, moefx.codegen) -> compile
(torch.compile(backend="moefx"), found through the torch_dynamo_backends entry point: importing moefx
does not load Dynamo) -> export (moefx.export_onnx).
"""
from moefx.convert import ConversionReport, LayerOrigin, convert
from moefx.recipe import Recipe
from moefx.checkpoint import load_pretrained, save_pretrained
from moefx.stream import convert_pretrained
from moefx.layer import MoELayer
from moefx.fit.distill import DistillReport, distill
from moefx.convert.pregate import lookahead
from moefx.op import moe_op
from moefx.evaluation.layers import QualityReport, evaluate
from moefx import offload  # noqa: F401  (moefx.offload.offload: run with experts on a slow tier)
from moefx.offload import layer_ahead_recall, routing_consistency
from moefx.summary import Summary, summary

__all__ = ["ConversionReport", "DistillReport", "LayerOrigin", "MoELayer", "QualityReport", "Recipe", "Summary", "convert",
           "convert_pretrained", "distill", "evaluate", "export_onnx", "layer_ahead_recall", "load_pretrained", "lookahead",
           "moe_op", "routing_consistency", "save_pretrained", "summary"]
__version__ = "0.1.0"


def __getattr__(name):
    # the ONNX stack (onnx, onnxscript) loads only when export is used
    if name == "export_onnx":
        from moefx.onnx import export_onnx
        return export_onnx
    raise AttributeError(f"module 'moefx' has no attribute {name!r}")
