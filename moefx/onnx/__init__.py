"""ONNX export of moefx MoE models: com.microsoft.MoE for onnxruntime, standard ops for any runtime."""
from moefx.onnx.export import (ExportReport, LayerExport, UnsupportedLayerError, count_nodes, export_and_check,
                               export_onnx, max_abs_error, run_onnx)

__all__ = ["ExportReport", "LayerExport", "UnsupportedLayerError", "count_nodes", "export_and_check", "export_onnx",
           "max_abs_error", "run_onnx"]
