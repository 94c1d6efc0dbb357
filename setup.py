"""siamese-dedup: learned image similarity and deduplication with Apache Beam.

Dataflow ships this package to its workers with `--setup_file ./setup.py`.
"""
import setuptools

REQUIRED = [
    "tensorflow-cpu>=2.16,<2.21; platform_machine == 'x86_64'",
    "tensorflow>=2.16,<2.21; platform_machine != 'x86_64'",
    # Keras 3.9 fixed safe_mode (CVE-2025-1550: a config naming functions of any module); the encoder is
    # always loaded in safe mode (siamese_core.artefact.load_encoder).
    "keras>=3.9",
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
    "albumentations>=2.0,<3",  # trainer.copy_edits: the copy edits (training, planted copies, self-calibration)
    "scikit-image>=0.22",  # trainer.photo_corpus: the sample photographs inside the wheel (skimage/data)
    "threadpoolctl>=3.1",  # the match kernel runs single-threaded BLAS per kernel thread
]

setuptools.setup(
    name="siamese-dedup",
    version="0.1.0",
    description="Siamese/triplet image encoder and Beam pipelines for catalogue deduplication.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["siamese_core", "siamese_core.*", "trainer", "trainer.*", "beam_pipeline", "beam_pipeline.*", "schemas", "schemas.*"]),
    install_requires=REQUIRED,
    extras_require={"test": ["pytest>=8", "gcp-storage-emulator>=2024.8"],
                    "bench": ["faiss-cpu>=1.8"],  # bench/bench_matching.py: side by side with faiss
                    # bench/bench_neardup.py's peers: the light dependencies of imagededup's hashes and of
                    # fastdup. The two tools themselves go in with --no-deps first (their metadata would pull
                    # torch + CUDA, and pin numpy<2 / Pillow / scikit-learn exactly; bench/peers.py says why):
                    #   pip install --no-deps imagededup==0.3.3.post2 fastdup==2.54 && pip install -e '.[neardup]'
                    "neardup": ["PyWavelets>=1.4", "tqdm>=4.66", "pandas>=2.0.3", "opencv-python-headless>=4.8",
                                "sentry-sdk>=2", "pillow-heif>=0.16", "psutil>=5.9", "pyOpenSSL>=24",
                                "PyYAML>=6", "requests>=2.32", "packaging>=23"]},
    entry_points={"console_scripts": ["siamese-dedup=beam_pipeline.cli:console_main"]},
)
