"""Trainer: learns a shared-weight (Siamese/triplet) image encoder and exports its single tower.

Importing this package is cheap; TensorFlow is imported by the modules that need it.
"""
