"""Real pretrained models that load offline from installed packages."""
