"""train(): a tiny end-to-end run writes a loadable artefact; the pieces around it behave."""
import json
import os

import numpy as np
import pytest

from trainer.train import (PRESETS, TrainConfig, TrainingCollapsed, _check_collapse, _mean_pairwise_cosine, run,
                           split_train)

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
    from siamese_core.artefact import load_encoder, model_id_of

    out = tmp_path / "model"
    summary = run(["--output", str(out), "--max_train_items", "600", "--max_test_items", "300",
                   "--epochs", "1", "--embedding_dim", "16", "--seed", "1", "--quiet"])
    for name in ("model.keras", "model_card.json", "roc.png", "similarity_hist.png"):
        assert (out / name).is_file(), name
    card = json.loads((out / "model_card.json").read_text())
    validate_model_card(card)
    model, loaded = load_encoder(str(out))
    assert loaded["model_id"] == summary["model_id"] == model_id_of(model, card["input_spec"])
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


TINY = ["--filters", "4,8", "--dense_units", "16", "--embedding_dim", "8", "--quiet", "--instance_test_items", "60"]


def _card(path):
    return json.loads((path / "model_card.json").read_text())


def test_new_flags_are_listed(capsys):
    with pytest.raises(SystemExit):
        run(["--help"])
    text = capsys.readouterr().out
    for flag in ("--data", "--data_path", "--preset", "--backbone", "--weights", "--freeze_until", "--resume",
                 "--checkpoint_dir", "--tensorboard_dir", "--train_classes", "--instance_only", "--convs_per_stage"):
        assert flag in text


def test_architecture_flags_reach_the_encoder():
    from trainer.train import config_from_flags, encoder_kwargs

    config = config_from_flags(["--preset", "quality", "--convs_per_stage", "2", "--output", "m"])
    kwargs = encoder_kwargs(config)
    assert kwargs["convs_per_stage"] == 2 and kwargs["filters"] == (32, 64, 128) and kwargs["padding"] == "same"
    assert config.output_dir == "m" and config.epochs == PRESETS["quality"]["epochs"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_value_becomes_the_flag_default(preset):
    from trainer.train import build_parser

    parsed = vars(build_parser(preset).parse_args([]))
    for key, value in PRESETS[preset].items():
        assert parsed[key] == value, (preset, key)
    # An explicit flag still wins over the preset.
    assert vars(build_parser(preset).parse_args(["--epochs", "1"]))["epochs"] == 1


@pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST not installed")
def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    """Two epochs in one go == one epoch, stop, --resume: same weights (same model_id), same history. The
    class proxies of the proxy loss (trained, not exported) and the weights' moving average (validated and
    exported) are part of what a checkpoint must restore."""
    args = TINY + ["--max_train_items", "400", "--max_test_items", "100", "--epochs", "2", "--patience", "5",
                   "--seed", "4", "--proxy_weight", "0.5", "--ema_momentum", "0.9"]
    whole = run(args + ["--output", str(tmp_path / "whole"), "--tensorboard_dir", str(tmp_path / "tb")])
    run(args + ["--output", str(tmp_path / "half"), "--checkpoint_dir", str(tmp_path / "ck"),
                "--stop_after_epoch", "1"])
    state = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert state["epoch"] == 1 and len(state["history"]) == 1
    resumed = run(["--resume", str(tmp_path / "ck"), "--output", str(tmp_path / "resumed"), "--quiet"])
    assert resumed["model_id"] == whole["model_id"]
    assert [h["loss"] for h in _card(tmp_path / "resumed")["training"]["history"]] == \
        [h["loss"] for h in _card(tmp_path / "whole")["training"]["history"]]
    assert _card(tmp_path / "resumed")["training"]["resumed"] is True
    # The moving average is what was exported: without it the same run ends on other weights.
    assert _card(tmp_path / "whole")["training"]["ema_momentum"] == 0.9
    plain = run(args[:-2] + ["--output", str(tmp_path / "plain")])
    assert plain["model_id"] != whole["model_id"]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    with pytest.raises(FileNotFoundError, match="state.json"):
        run(["--resume", str(tmp_path / "whole"), "--quiet"])


@pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST not installed")
def test_pairs_unlabelled_and_unseen_class_runs(tmp_path):
    from PIL import Image

    from trainer.augment import augment_batch
    from trainer.data import load_fashion_mnist
    from siamese_core.artefact import load_encoder
    images, labels = load_fashion_mnist("test")
    originals, copies = images[:120], augment_batch(images[:120], np.random.default_rng(0))
    for i in range(120):  # a pairs layout: an image and an edited copy under the same name, other sizes
        for side, img in (("left", originals[i]), ("right", copies[i])):
            (tmp_path / "pairs" / side).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).resize((32, 32)).save(tmp_path / "pairs" / side / f"{i:03d}.png")
    out = tmp_path / "pairs_model"
    summary = run(TINY + ["--data", "pairs", "--data_path", str(tmp_path / "pairs"), "--image_size", "28",
                          "--channels", "1", "--epochs", "1", "--output", str(out)])
    card = _card(out)
    assert card["data"]["mode"] == "pair" and card["input_spec"]["height"] == 28
    assert card["data"]["train_items"] + card["data"]["validation_items"] + card["data"]["calibration_items"] \
        <= 2 * 96 and card["metrics"]["test_items"] == 48  # 24 held-out pairs
    assert 0 <= summary["recall_at_1"] <= 1 and "map_at_r" in card["metrics"]
    load_encoder(str(out))
    with pytest.raises(ValueError, match="proxy_weight needs class labels"):
        run(TINY + ["--data", "pairs", "--data_path", str(tmp_path / "pairs"), "--image_size", "28",
                    "--channels", "1", "--epochs", "1", "--output", str(tmp_path / "x"), "--proxy_weight", "1"])

    np.savez(tmp_path / "u.npz", images=images[:300])  # no labels: instance mode
    out = tmp_path / "instance_model"
    summary = run(TINY + ["--data", "npz", "--data_path", str(tmp_path / "u.npz"), "--epochs", "1",
                          "--output", str(out)])
    card = _card(out)
    assert card["data"]["mode"] == "instance" and card["thresholds"]["class"] == []
    assert card["metrics"]["validation_metric"] == "instance TMR at FMR 1e-3"
    assert [r["target_fmr"] for r in card["metrics"]["test_instance"]["recall_at_fmr"]] == [0.01]  # 60 items
    for name in ("roc.png", "similarity_hist.png", "fmr_fnmr.png", "example_pairs.png"):
        assert (out / name).is_file()

    out = tmp_path / "unseen"
    summary = run(TINY + ["--train_classes", "0,1,2,3,4", "--max_train_items", "800", "--max_test_items", "200",
                          "--epochs", "1", "--output", str(out), "--proxy_weight", "1"])
    card = _card(out)
    # The five proxies belong to the loss: the exported tower is the plain encoder.
    assert card["training"]["proxy_weight"] == 1.0
    assert not any("prox" in w.path for w in load_encoder(str(out))[0].weights)
    assert card["metrics"]["unseen_classes"]["classes"] == [5, 6, 7, 8, 9]
    assert card["data"]["train_classes"] == [0, 1, 2, 3, 4] and card["data"]["classes"] == 5
    assert summary["unseen_classes"]["seed_protocol_auc"] == card["metrics"]["unseen_classes"]["seed_protocol_auc"]


def _photo_tiles(folder, n: int = 96) -> None:
    """`n` distinct 256 px tiles of scikit-image's sample photographs as JPEG files in `folder`."""
    from PIL import Image

    from trainer import photo_corpus
    tiles, _ = photo_corpus.tile_photos(photo_corpus.photo_files(["skimage"]))
    folder.mkdir(parents=True, exist_ok=True)
    for i, tile in enumerate(tiles[:n]):
        Image.fromarray(tile).save(folder / f"p{i:03d}.jpg", quality=90)


def test_a_seed_gives_the_same_photo_encoder_in_two_processes_running_at_once(tmp_path):
    """The catalogue recipe trained twice at the same time (each a fresh process, competing for the cores,
    which is when thread timing varies most): the same model, and the card says the run was deterministic.
    Before --deterministic made TensorFlow run one op at a time, such runs drifted apart within a few steps."""
    import subprocess
    import sys
    _photo_tiles(tmp_path / "photos")
    argv = ["--data", "unlabelled", "--data_path", str(tmp_path / "photos"), "--preset", "catalogue",
            "--epochs", "3", "--epoch_items", "1024", "--quiet"]
    code = "import sys; from trainer.train import run; run(sys.argv[1:])"
    procs = [subprocess.Popen([sys.executable, "-c", code, *argv, "--output", str(tmp_path / f"m{k}")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    cards = [_card(tmp_path / f"m{k}") for k in (0, 1)]
    assert cards[0]["training"]["deterministic"] is True
    assert cards[0]["model_id"] == cards[1]["model_id"]
    assert [h["loss"] for h in cards[0]["training"]["history"]] == [h["loss"] for h in cards[1]["training"]["history"]]


def test_a_process_whose_tensorflow_already_runs_ops_side_by_side_trains_and_says_it_is_not_deterministic(
        tmp_path, monkeypatch):
    import tensorflow as tf

    from trainer import train as train_module
    monkeypatch.setattr(tf.config.threading, "get_inter_op_parallelism_threads", lambda: 0)

    def started(_n):
        raise RuntimeError("Inter op parallelism cannot be modified after initialization.")
    monkeypatch.setattr(tf.config.threading, "set_inter_op_parallelism_threads", started)
    assert train_module.pin_op_threads(True) is False
    assert train_module.pin_op_threads(False) is False
    _photo_tiles(tmp_path / "photos", n=40)
    run(["--data", "unlabelled", "--data_path", str(tmp_path / "photos"), "--preset", "catalogue", "--epochs", "1",
         "--epoch_items", "128", "--image_size", "32", "--quiet", "--output", str(tmp_path / "m")])
    assert _card(tmp_path / "m")["training"]["deterministic"] is False
