"""flatness: reparameterisation-invariant flatness measures and the trainer behind flatness-repro."""

__version__ = "0.1.0"
