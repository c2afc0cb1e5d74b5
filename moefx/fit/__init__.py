"""Numerical fitting of MoE layers, no graph surgery: calibration statistics, carving experts,
routers, closed-form refit, neuron importance, distillation."""
