"""embedforge: decoder LLMs into embedders; distill, compress, export.

Kept import-light on purpose: `embedforge --help` must not import torch.
"""

__version__ = "0.1.0"
