"""The only place that knows the hardware: the compiled CPU kernels (csrc/), the compiled decode step, Triton kernels."""
