"""The Python faces of the compiled kernels (converter._kernels): numpy, torch, CUDA, custom ops."""
