"""Backends: turn a compressed IR model into something that runs (ONNX export, TVM code)."""
