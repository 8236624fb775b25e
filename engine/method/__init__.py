"""The paper's method as plain numpy / torch functions (no Ray): U-Net, losses, augmentation, resizing,
mask cleaning, prompts, SAM refinement (sam/), the quality gate and its calibration, metrics, and
the per-image pseudo-labelling that the label job runs."""
