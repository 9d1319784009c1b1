"""Stimulus generation: losses, autoencoders, training, and stimulus-set writing.

The losses live in ``generation.losses`` (one registry, ``build_loss(name)``); training
and the stimulus-set writer build on them. Nothing here imports the web app.
"""
