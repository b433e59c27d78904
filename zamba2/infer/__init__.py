"""Inference on a loaded model: generate/stream, CUDA-graph decode, int8 weights."""
