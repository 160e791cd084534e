"""em-unet: train, tune and serve U-Nets that segment neuronal membranes in EM stacks."""

__version__ = "0.1.0"
