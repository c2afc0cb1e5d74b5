"""moefx: run dense PyTorch models as Mixture-of-Experts models.

convert (moefx.convert) -> fuse (torch.ops.moefx.moe, moefx.codegen) -> compile
(torch.compile(backend="moefx")) -> export (moefx.export_onnx).
"""
from moefx import backend  # noqa: F401  (registers torch.compile(backend="moefx"))
from moefx.convert import ConversionReport, convert
from moefx.layer import MoELayer
from moefx.op import moe_op
from moefx.summary import Summary, summary

__all__ = ["ConversionReport", "MoELayer", "Summary", "convert", "export_onnx", "moe_op", "summary"]
__version__ = "0.1.0"


def __getattr__(name):
    # the ONNX stack (onnx, onnxscript) loads only when export is used
    if name == "export_onnx":
        from moefx.onnx import export_onnx
        return export_onnx
    raise AttributeError(f"module 'moefx' has no attribute {name!r}")
