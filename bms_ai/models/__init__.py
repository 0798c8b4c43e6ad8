"""Shipped ONNX models: the manifest (what a model is and expects) and the verified runtime."""
