"""Calibrating losses on human 2AFC judgments: triplets and their loaders
(``judgments``), the fit (``fit``), the model card (``card``), simulated judgments
(``synthetic``) and the ``pstudy losses`` commands (``cli``). See docs/losses.md,
"Calibrating a loss"."""
