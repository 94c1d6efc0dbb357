"""siamese-dedup: learned image similarity and deduplication with Apache Beam.

Dataflow ships this package to its workers with `--setup_file ./setup.py`.
"""
import setuptools

REQUIRED = [
    "tensorflow-cpu>=2.16,<2.21; platform_machine == 'x86_64'",
    "tensorflow>=2.16,<2.21; platform_machine != 'x86_64'",
    "apache-beam[gcp]>=2.60,<3",
    "numpy>=1.26,<3",
    "pyarrow>=14",
    "scikit-learn>=1.4",
    "google-cloud-storage>=2.14",
    "google-crc32c>=1.5",  # TFRecord framing CRCs (beam_pipeline.sources)
    "pillow>=10.3",
    "matplotlib>=3.8",
    "jsonschema>=4.20",
    "scipy>=1.11",  # complete linkage (dedup), Clopper-Pearson bounds
    "threadpoolctl>=3.1",  # the match kernel runs single-threaded BLAS per kernel thread
]

setuptools.setup(
    name="siamese-dedup",
    version="0.1.0",
    description="Siamese/triplet image encoder and Beam pipelines for catalogue deduplication.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["trainer", "trainer.*", "beam_pipeline", "beam_pipeline.*", "schemas", "schemas.*"]),
    install_requires=REQUIRED,
    extras_require={"test": ["pytest>=8", "gcp-storage-emulator>=2024.8"],
                    "bench": ["faiss-cpu>=1.8"]},  # bench/bench_matching.py: side by side with faiss
    entry_points={"console_scripts": ["siamese-dedup=beam_pipeline.cli:main"]},
)
