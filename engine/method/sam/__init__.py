"""SAM backends and batched multi-stage refinement."""
from plabel.method.sam.backends import (
    BACKENDS,
    RANDOM_BACKENDS,
    ChecksumError,
    SamModel,
    build_architecture,
    build_random_sam,
    checkpoint_sha256,
    download_checkpoint,
    load_sam,
    load_state_dict,
)
from plabel.method.sam.refine import (
    autocast_dtype,
    DEFAULT_STAGES,
    STAGE_PROMPTS,
    RefinementResult,
    SamRefiner,
    refine_reference,
    refiner_from_config,
    validate_stages,
)

__all__ = [
    "autocast_dtype",
    "BACKENDS",
    "RANDOM_BACKENDS",
    "ChecksumError",
    "DEFAULT_STAGES",
    "STAGE_PROMPTS",
    "RefinementResult",
    "SamModel",
    "SamRefiner",
    "build_architecture",
    "build_random_sam",
    "checkpoint_sha256",
    "download_checkpoint",
    "load_sam",
    "load_state_dict",
    "refine_reference",
    "refiner_from_config",
    "validate_stages",
]
