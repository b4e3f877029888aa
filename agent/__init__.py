"""dpgan: decentralized parallel optimistic SGD (DPOSG) for GANs and other min-max problems."""

__version__ = "0.1.0"
