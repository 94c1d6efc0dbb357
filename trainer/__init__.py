"""Trainer: learns a shared-weight (Siamese/triplet) image encoder and exports its single tower.

Importing this package is cheap; TensorFlow is imported by the modules that need it.
"""
import siamese_core  # noqa: F401  (first: it sets TensorFlow's CPU kernels before TensorFlow is imported)
