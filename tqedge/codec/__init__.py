"""TurboQuant vector codec: rotation, Lloyd–Max codebooks, quantizers, bit packing, kernels.

Public API (lazy: importing ``tqedge.codec`` loads neither Numba nor any kernel)::

    from tqedge.codec.quantizer import CodecConfig, TurboQuant
    from tqedge.codec.packing import packed_bytes, pack, unpack
    from tqedge.codec.config import bytes_per_token, select_outlier_channels
"""
