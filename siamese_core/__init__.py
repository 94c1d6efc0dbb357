"""The core both halves share: what a similarity is, how an image becomes the model's input, and the encoder
artefact (the saved tower and its card).

`trainer` (which makes encoders) and `beam_pipeline` (which runs them over catalogues) import this package;
it imports neither. Modules: `similarity` (angular similarity, the one score of the project, and kNN
normalisation), `decode` (bytes -> the model's input spec, exactly as training saw it), `artefact`
(export, load and verify an encoder and its model card).

Importing this package is cheap; TensorFlow is imported by the modules that need it.
"""
import os

# TensorFlow's oneDNN CPU kernels. TensorFlow turns them on by itself only on some CPUs; on the AMD EPYC of
# the 2-core reference machine it leaves them off, and turning them on makes a training step of the photo
# encoder 1.75x faster and its forward pass 1.4x (BENCHMARKS.md "oneDNN"), with runs still deterministic.
# Read once when TensorFlow starts, so it is set here, before any module of ours imports it (trainer and
# beam_pipeline import this package first); a user's own setting, e.g. TF_ENABLE_ONEDNN_OPTS=0, is kept.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
