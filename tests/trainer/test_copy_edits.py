"""trainer.copy_edits: every planted edit family does what its name says; training edits are seeded."""
import numpy as np
import pytest

from trainer import copy_edits as ce


@pytest.fixture(scope="module")
def photo():
    """A 160 x 200 RGB 'photo' with structure (gradients, a disc, stripes), so edits are visible."""
    yy, xx = np.mgrid[0:160, 0:200]
    img = np.stack([xx * 255 // 199, yy * 255 // 159, ((xx // 10 + yy // 10) % 2) * 200 + 30], -1)
    img[(yy - 80) ** 2 + (xx - 100) ** 2 < 900] = (250, 40, 40)
    return img.astype(np.uint8)


@pytest.mark.parametrize("family", ce.EDIT_FAMILIES)
def test_each_family_makes_a_different_rgb_copy(photo, family):
    out = ce.plant_copy(photo, family, np.random.default_rng(3))
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[-1] == 3
    same_shape = out.shape == photo.shape
    assert not same_shape or np.abs(out.astype(int) - photo).mean() > 0.5, f"{family} left the photo unchanged"
    again = ce.plant_copy(photo, family, np.random.default_rng(3))
    assert np.array_equal(out, again), "a seed gives the same copy"


def test_families_change_what_they_name(photo):
    rng = np.random.default_rng(0)
    grey = ce.plant_copy(photo, "grey", rng).astype(int)
    assert np.abs(grey[..., 0] - grey[..., 1]).mean() < 3 and np.abs(grey[..., 1] - grey[..., 2]).mean() < 3
    h, w = photo.shape[:2]
    crop = ce.plant_copy(photo, "crop", rng)
    assert 0.69 * h <= crop.shape[0] <= h and 0.69 * w <= crop.shape[1] <= w and crop.shape != photo.shape
    assert ce.plant_copy(photo, "caption", rng).shape[0] > h and ce.plant_copy(photo, "caption", rng).shape[1] == w
    border = ce.plant_copy(photo, "border", rng)
    assert border.shape[0] > h and border.shape[1] > w
    pad = ce.plant_copy(photo, "pad", rng)
    assert pad.shape[0] / pad.shape[1] != pytest.approx(h / w, abs=0.02)
    assert max(ce.plant_copy(photo, "resize", rng).shape[:2]) <= 0.71 * w
    mirrored = ce.plant_copy(photo, ce.MIRROR, rng).astype(int)
    assert np.abs(mirrored - photo[:, ::-1]).mean() < np.abs(mirrored - photo).mean() / 4


def test_unknown_family_and_bad_pixels_are_refused(photo):
    with pytest.raises(ValueError, match="edit family must be one of"):
        ce.plant_copy(photo, "sepia", np.random.default_rng(0))
    with pytest.raises(TypeError, match="uint8"):
        ce.plant_copy(photo.astype(np.float32), "jpeg", np.random.default_rng(0))


def test_choose_families_cycles_evenly_and_can_leave_mirrors_out():
    rng = np.random.default_rng(1)
    chosen = ce.choose_families(3 * len(ce.EDIT_FAMILIES), rng)
    assert {f: chosen.count(f) for f in ce.EDIT_FAMILIES} == {f: 3 for f in ce.EDIT_FAMILIES}
    assert ce.MIRROR not in ce.choose_families(50, rng, mirror=False)


def test_batch_augmenter_is_seeded_and_sized(photo):
    aug = ce.BatchAugmenter(32)
    batch = np.stack([photo[:128, :128]] * 6)
    a = aug(batch, np.random.default_rng(7))
    b = aug(batch, np.random.default_rng(7))
    assert a.shape == (6, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert len({x.tobytes() for x in a}) > 1, "each image of a batch gets its own edits"
