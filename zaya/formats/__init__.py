"""Weights that stay compressed in memory: GGUF blocks, FP8 and MXFP4 (``codecs``: stored
tensors -> ``zaya.kernels`` layouts; ``modules``: the module classes a loader swaps in)."""

from zaya.formats.codecs import GGUF_KEPT, Codec
from zaya.formats.modules import (COMPRESSED, KernelEmbedding, KernelExperts, KernelLinear, StoredMatrix,
                                  TiedKernelHead, swap_modules)

__all__ = ["COMPRESSED", "GGUF_KEPT", "Codec", "KernelEmbedding", "KernelExperts", "KernelLinear", "StoredMatrix",
           "TiedKernelHead", "swap_modules"]
