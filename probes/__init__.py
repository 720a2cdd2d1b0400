"""probes: sites, activations and features of any PyTorch model."""
