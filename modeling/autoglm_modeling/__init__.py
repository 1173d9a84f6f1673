"""Models on torch, as both the pipeline and the server need them: loading sources (GGUF included),
quantized modules and their CPU kernels, and saving and loading model folders."""
