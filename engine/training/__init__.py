"""U-Net training: the one training loop (loop.fit), epoch selection and its guard (selection),
weight soups (soup), and fit_unet for in-memory arrays (inprocess)."""
