"""train(): a tiny end-to-end run writes a loadable artefact; the pieces around it behave."""
import json
import os

import numpy as np
import pytest

from trainer.train import TrainConfig, TrainingCollapsed, _check_collapse, _mean_pairwise_cosine, run, split_train

HAVE_DATA = os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz") or bool(
    os.environ.get("FASHION_MNIST_DIR"))


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        run(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--output", "--epochs", "--margin", "--distance", "--mining", "--embedding_dim", "--seed",
                 "--max_train_items", "--data_dir"):
        assert flag in text


def test_split_is_disjoint_stratified_and_seeded():
    labels = np.repeat(np.arange(10), 300)
    cfg = TrainConfig(validation_split=0.2, validation_items=200, calibration_items=300, seed=3)
    tr, va, ca = split_train(labels, cfg)
    assert len(va) == 200 and len(ca) == 300 and len(tr) == 3000 - 600
    assert not (set(tr) & set(va) or set(tr) & set(ca) or set(va) & set(ca))
    assert np.bincount(labels[va], minlength=10).tolist() == [20] * 10
    again = split_train(labels, cfg)
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, ca), again))


def test_collapse_detection():
    cfg = TrainConfig(margin=0.4)
    rng = np.random.default_rng(0)
    spread = rng.standard_normal((50, 8)).astype(np.float32)
    spread /= np.linalg.norm(spread, axis=1, keepdims=True)
    assert _mean_pairwise_cosine(spread) == pytest.approx(
        (spread @ spread.T)[np.triu_indices(50, 1)].mean(), abs=1e-6)
    _check_collapse(cfg, 1, 0.3, spread)  # healthy: no error
    same = np.tile(spread[:1], (50, 1))
    with pytest.raises(TrainingCollapsed, match="collapsed"):
        _check_collapse(cfg, 1, 0.3, same)
    with pytest.raises(TrainingCollapsed, match="stuck at the margin"):
        _check_collapse(cfg, 2, 0.4001, spread)


@pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST not installed")
def test_tiny_training_run_writes_a_loadable_artefact(tmp_path):
    from schemas.documents import validate_model_card
    from trainer.export import load_encoder, model_id_of

    out = tmp_path / "model"
    summary = run(["--output", str(out), "--max_train_items", "600", "--max_test_items", "300",
                   "--epochs", "1", "--embedding_dim", "16", "--seed", "1", "--quiet"])
    for name in ("model.keras", "model_card.json", "roc.png", "similarity_hist.png"):
        assert (out / name).is_file(), name
    card = json.loads((out / "model_card.json").read_text())
    validate_model_card(card)
    model, loaded = load_encoder(str(out))
    assert loaded["model_id"] == summary["model_id"] == model_id_of(model)
    assert model.output_shape == (None, 16) and card["embedding_dim"] == 16
    assert summary["model_dir"] == str(out)
    assert 0.5 <= summary["seed_auc"] <= 1.0 and 0.0 <= summary["recall_at_1"] <= 1.0
    assert summary["train_seconds"] > 0
    assert card["metrics"]["seed_protocol_split"] == "test" and card["metrics"]["test_items"] == 300
    # 600 items hold out 60: 30 validation, 30 calibration -> 435 instance impostor pairs: only the
    # 1e-2 target (>= 300 pairs) may be claimed.
    assert card["data"]["calibration_items"] == 30
    assert [t["target_fmr"] for t in card["thresholds"]["instance"]] == [0.01]
    assert card["thresholds"]["instance"][0]["impostor_pairs"] == 435
    assert card["training"]["margin"] == 0.4 and card["training"]["distance"] == "cosine"
