"""LightningModules of the suite (RQ-VAE training, QLoRA alignment) and their metrics."""
