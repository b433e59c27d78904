"""The model: config (config.json keys), the SSD scan, the plain-torch Zamba2 model, its cache, checkpoints."""
