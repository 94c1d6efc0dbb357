"""Apache Beam pipelines: embed image catalogues into templates, match them, deduplicate, report.

Pure logic (decode, similarity blocks, clustering, report building) lives in plain modules; the pipeline
modules (`embed`, `match`, `dedup`, `report`) are thin PTransforms around it with `run(argv=None)` entry
points.
"""

import siamese_core  # noqa: F401,E402  (first: it sets TensorFlow's CPU kernels before any stage imports TensorFlow)
