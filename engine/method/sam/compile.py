"""Compiled SAM inference: ``torch.compile`` of the image encoder and the mask decoder.

The maths is unchanged (float32 stays float32); inductor fuses the element-wise work and the
copies around the matrix products into generated kernels, and on CPU "freezing" folds the
weights into the graph as constants so that convolutions and linear layers use pre-packed
oneDNN weights. Measured on a 2-core AMD EPYC (AVX2, one thread, LiteMedSAM, JSRT images):
image encoder 2.79 -> 1.71 s per image, the two decoder stages for 5 classes 1.90 -> 1.28 s per
image, outputs within 2e-6 of eager (benchmarks/speed.py measures the whole refinement).

The price is start-up time: each new input shape compiles (about 1 min for the encoder and half
a minute per decoder shape on that CPU; inductor caches the code on disk under
``TORCHINDUCTOR_CACHE_DIR``, so later processes on the same machine start faster). Shapes are
static: :class:`plabel.method.sam.refine.SamRefiner` pads encoder batches to one size, and the decoder's
input shape depends on how many classes (and so points) an image has, so
:class:`CompiledDecoder` compiles the first few shapes it meets (the common ones: all classes
present) and runs the others eagerly. Compiling with dynamic shapes instead was slower than eager
on that CPU (1.53 s per image).
"""
from __future__ import annotations

import torch
from torch import nn

from plabel.method.sam.backends import SamModel

#: decoder input shapes compiled per process; later new shapes run eagerly
MAX_DECODER_SHAPES = 4


class CompiledDecoder(nn.Module):
    """A mask decoder compiled for its first ``max_shapes`` input shapes, eager for the rest.

    Same call as ``segment_anything.modeling.MaskDecoder`` (the same weights: ``eager`` is the
    original module, the compiled function wraps it).
    """

    def __init__(self, decoder: nn.Module, max_shapes: int = MAX_DECODER_SHAPES):
        super().__init__()
        self.eager = decoder
        self.compiled = torch.compile(decoder, dynamic=False)
        self.max_shapes = max_shapes
        self.shapes: set[tuple] = set()

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output: bool):
        key = (tuple(image_embeddings.shape), tuple(sparse_prompt_embeddings.shape),
               tuple(dense_prompt_embeddings.shape), bool(multimask_output))
        if key not in self.shapes and len(self.shapes) < self.max_shapes:
            self.shapes.add(key)
        fn = self.compiled if key in self.shapes else self.eager
        return fn(image_embeddings=image_embeddings, image_pe=image_pe,
                  sparse_prompt_embeddings=sparse_prompt_embeddings,
                  dense_prompt_embeddings=dense_prompt_embeddings, multimask_output=multimask_output)


def compile_sam(model: SamModel, max_decoder_shapes: int = MAX_DECODER_SHAPES) -> SamModel:
    """Replace ``model.sam``'s image encoder and mask decoder by compiled versions (in place,
    once). Returns the model. Compilation happens lazily at the first call of each shape. On CPU,
    inductor's weight freezing is switched on for this process (inference only: weights must not
    change afterwards)."""
    import torch._dynamo.config as dynamo_config  # local: the compiler only when compiling
    import torch._inductor.config as inductor_config  # local: the compiler only when compiling

    sam = model.sam.eval()
    if is_compiled(model):
        return model
    if sam.device.type == "cpu":
        inductor_config.freezing = True
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, max_decoder_shapes + 2)
    sam.image_encoder = torch.compile(sam.image_encoder, dynamic=False)
    sam.mask_decoder = CompiledDecoder(sam.mask_decoder, max_decoder_shapes)
    return model


def is_compiled(model: SamModel) -> bool:
    return isinstance(model.sam.mask_decoder, CompiledDecoder)
