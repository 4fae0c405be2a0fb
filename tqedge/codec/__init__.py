"""TurboQuant vector codec: rotation, Lloyd–Max codebooks, quantizers, bit packing, kernels."""
