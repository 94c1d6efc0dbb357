"""trainer.photo_corpus: distinct tiles, disjoint regions, the deny-list, determinism, missing sources.

Synthetic photographs in temporary folders (a monkeypatched PACKAGES entry) test the logic anywhere; the
tests on the real Debian packages skip, saying which package to install, where those are absent.
(No test name here may hold a deny-listed word: pytest's tmp_path is named after the test.)
"""
from __future__ import annotations

import itertools
import os
import re

import numpy as np
import pytest
from PIL import Image

from trainer import photo_corpus as pc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    """A photo-like RGB image (h, w, 3) uint8: coloured noise at several scales, no flat areas."""
    rng = np.random.default_rng(seed)
    out = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 60.0), (16, 40.0), (64, 25.0), (256, 12.0)):
        small = rng.normal(0.0, 1.0, (max(2, cells * h // max(h, w)), cells, 3)).astype(np.float32)
        for c in range(3):
            out[..., c] += amp * np.asarray(Image.fromarray(small[..., c]).resize((w, h), Image.Resampling.BICUBIC))
    return np.clip(out + 128.0, 0, 255).astype(np.uint8)


def _save(path, array, **kw):
    Image.fromarray(array).save(path, **kw)
    return str(path)


@pytest.fixture
def synth_source(tmp_path, monkeypatch):
    """Register PACKAGES['synth'] over tmp_path/photos (no dpkg ownership); returns the folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    monkeypatch.setitem(pc.PACKAGES, "synth", {"apt": ("synth-photos",), "owned": False,
                                               "globs": (str(folder / "*.png"), str(folder / "*.jpg"))})
    return folder


def _boxes_overlap(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _real(*sources: str) -> None:
    """Skip unless the real sources are installed (with the reason: which package is missing)."""
    for s in sources:
        try:
            pc._source_candidates(s, pc.PACKAGES[s])
        except FileNotFoundError as e:
            pytest.skip(str(e))


# --- layout ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("w,h", [(1920, 1080), (1080, 1920), (6000, 4000), (4096, 4096), (720, 360), (1365, 1074)])
def test_layout_tiles_never_overlap_and_scales_use_disjoint_blocks(w, h):
    layout = pc.tile_layout(w, h, (2, 4, 8), min_tile_px=128, seed=3)
    assert layout
    s = min(w, h)
    for k, _, (l, t, r, b) in layout:
        assert 0 <= l < r <= w and 0 <= t < b <= h
        assert r - l == b - t and abs((r - l) - s / k) <= s / k * 0.05 + 1  # side = 1/k of the short side
        assert r - l >= 128
    # no two tiles share a pixel, whatever their scales: so no tile is a crop of another
    for (_, _, a), (_, _, b) in itertools.combinations(layout, 2):
        assert not _boxes_overlap(a, b), (a, b)
    # each block holds one scale only, and blocks do not overlap
    scale_of, extent = {}, {}
    for k, blk, (l, t, r, b) in layout:
        assert scale_of.setdefault(blk, k) == k
        e = extent.get(blk, (l, t, r, b))
        extent[blk] = (min(e[0], l), min(e[1], t), max(e[2], r), max(e[3], b))
    for a, b in itertools.combinations(extent.values(), 2):
        assert not _boxes_overlap(a, b)
    if min(w, h) >= 8 * 128 and len(extent) >= 3:
        assert {k for k, _, _ in layout} == {2, 4, 8}


def test_layout_skips_scales_too_small_and_validates_scales():
    assert {k for k, _, _ in pc.tile_layout(720, 360, (2, 4, 8), min_tile_px=128)} == {2}
    assert pc.tile_layout(200, 200, (2, 4, 8), min_tile_px=128) == []
    with pytest.raises(ValueError):
        pc.tile_layout(1000, 1000, (4, 2))
    with pytest.raises(ValueError):
        pc.tile_layout(1000, 1000, (2, 3))


# --- tiles: distinct, not flat, traceable ---------------------------------------------------------

def test_tiles_are_distinct_not_flat_and_traceable(synth_source):
    img = np.tile(_texture(150, 150, seed=1), (8, 12, 1))  # a repeated pattern: its 1/8 tiles are copies
    img[:600, :600] = (90, 140, 200)                         # a flat patch of sky: one block
    _save(synth_source / "a.png", img)
    _save(synth_source / "b.png", _texture(1000, 1000, seed=2))
    files = pc.photo_files("synth")
    assert [os.path.basename(f.path) for f in files] == ["a.png", "b.png"]
    stats = {}
    tiles, prov = pc.tile_photos(files, size=64, stats=stats, min_tile_px=64)
    assert tiles.dtype == np.uint8 and tiles.shape == (len(prov), 64, 64, 3)
    assert stats["near_duplicate"] > 0 and stats["flat"] > 0
    assert stats["kept"] == len(tiles) == stats["candidates"] - stats["flat"] - stats["near_duplicate"]
    # no two tiles closer than the near-duplicate cut
    d = pc.thumbnail_distances(pc.thumbnails(tiles), pc.thumbnails(tiles))
    np.fill_diagonal(d, np.inf)
    assert d.min() >= 0.25
    std, grad, flat = pc.flatness(tiles)
    assert (std >= 14).all() and (grad >= 4).all() and (flat <= 0.6).all()
    # provenance: re-cutting the box from the file gives the tile back
    for tile, o in list(zip(tiles, prov))[::7]:
        assert o.source == "synth" and (o.width, o.height) == Image.open(o.file).size
        again = Image.open(o.file).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS, box=o.box,
                                                         reducing_gap=3.0)
        assert np.abs(np.asarray(again, np.int16) - tile).mean() < 2.0
    for (a, b) in itertools.combinations(prov, 2):
        if a.file == b.file:
            assert not _boxes_overlap(a.box, b.box)


def test_near_duplicate_check_sees_brightness_changes_and_keeps_the_first():
    rng = np.random.default_rng(0)
    base = _texture(64, 64, seed=5)
    brighter = np.clip(base.astype(np.int16) * 0.8 + 40, 0, 255).astype(np.uint8)
    other = _texture(64, 64, seed=6)
    th = pc.thumbnails(np.stack([base, other, brighter]))
    assert pc.thumbnail_distances(th[:1], th[2:])[0, 0] < 0.05
    assert pc.drop_near_duplicates(th, 0.25).tolist() == [True, True, False]
    pairs = pc.near_duplicate_pairs(th, 0.25)
    assert pairs.tolist() == [[0, 2]]
    noise = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    assert pc.drop_near_duplicates(pc.thumbnails(noise), 0.25).all()


def test_same_picture_at_several_sizes_is_kept_once_the_largest(synth_source):
    big = _texture(900, 1600, seed=7)
    _save(synth_source / "Wall_1600x900.png", big)
    small = Image.fromarray(big).resize((800, 450), Image.Resampling.LANCZOS)
    _save(synth_source / "Wall_800x450.png", np.asarray(small))
    _save(synth_source / "Wall_4x3.jpg", big[:, 200:1400], quality=90)     # same artwork, other aspect
    _save(synth_source / "Wall_506x900_Portrait.png", big[:, :506])        # a crop no thumbnail matches
    _save(synth_source / "copy.jpg", np.asarray(Image.fromarray(big).resize((1200, 675))), quality=85)
    _save(synth_source / "other.png", _texture(600, 800, seed=8))
    _save(synth_source / "logo.png", np.where(_texture(400, 400, 9) > 128, 255, 0).astype(np.uint8))
    _save(synth_source / "tiny.png", _texture(100, 100, seed=10))
    rejected = []
    files = pc.photo_files("synth", rejected=rejected)
    assert [os.path.basename(f.path) for f in files] == ["Wall_1600x900.png", "other.png"]
    why = {os.path.basename(p): r for p, r in rejected}
    assert set(why) == {"Wall_800x450.png", "Wall_4x3.jpg", "Wall_506x900_Portrait.png", "copy.jpg", "logo.png",
                        "tiny.png"}
    assert "same artwork" in why["Wall_506x900_Portrait.png"]
    assert "same" in why["Wall_800x450.png"] and "same" in why["copy.jpg"] and "small" in why["tiny.png"]
    assert "colour" in why["logo.png"] or "flat" in why["logo.png"]


def test_artwork_key_strips_sizes_only():
    key = pc.artwork_key
    assert key("/b/sway/Sway_Wallpaper_Blue_1920x1080_Portrait.png") == key("/b/sway/Sway_Wallpaper_Blue_768x1024.png")
    assert key("/t/grub/grub-16x9.png") == key("/t/grub/grub-4x3.png")
    assert key("/l/beach1.jpg") != key("/l/beach2.jpg")
    assert key("/a/grub-16x9.png") != key("/b/grub-16x9.png")


def test_tiles_are_deterministic_whatever_the_threads(synth_source):
    for i in range(3):
        _save(synth_source / f"p{i}.png", _texture(700 + 100 * i, 900, seed=20 + i))
    files = pc.photo_files("synth")
    a, pa = pc.tile_photos(files, size=48, min_tile_px=48, threads=1)
    b, pb = pc.tile_photos(files, size=48, min_tile_px=48, threads=3)
    assert len(a) > 20 and pa == pb
    np.testing.assert_array_equal(a, b)
    assert pc.photo_files("synth") == files


# --- deny-list ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/usr/share/wallpapers/Next/contents/images/1920x1080.png",
    "/usr/share/wallpapers/Flow/contents/images/5120x2880.jpg",
    "/usr/share/backgrounds/gnome/adwaita-l.jpg",
    "/usr/share/backgrounds/mate/nature/Aqua.jpg",
    "/usr/share/backgrounds/ukui/default.jpg",
    "/usr/share/backgrounds/ukui-wallpapers/x.png",
    "/usr/share/plasma/look-and-feel/org.debian.desktop/contents/previews/fullscreenpreview.jpg",
    "/usr/share/lxqt/wallpapers/kde-plasma.png",
    "/usr/share/backgrounds/MATE-Stripes.png",
])
def test_deny_list_rejects_held_out_desktops(path):
    assert pc.deny_reason(path)
    with pytest.raises(ValueError, match="deny-list"):
        pc.check_allowed(path)


@pytest.mark.parametrize("path", [
    "/usr/share/backgrounds/Bridge_by_Sander_Klootwijk.jpg",
    "/usr/share/games/endless-sky/images/land/ultimate-matera.jpg",
    "/usr/share/openuniverse/textures/mars.jpg",
])
def test_deny_list_lets_other_paths_through(path):
    assert pc.deny_reason(path) is None


def test_deny_list_covers_package_owned_files_and_symlinks(synth_source, tmp_path, monkeypatch):
    owned = _save(synth_source / "looks_harmless.png", _texture(600, 800, seed=30))
    _save(synth_source / "fine.png", _texture(600, 800, seed=31))
    held = tmp_path / "share" / "plasma-wallpapers"
    held.mkdir(parents=True)
    target = _save(held / "pic.png", _texture(600, 800, seed=32))
    os.symlink(target, synth_source / "link.png")
    info = tmp_path / "dpkg-info"
    info.mkdir()
    (info / "ukui-wallpapers.list").write_text(f"/usr/share\n{owned}\n")
    (info / "endless-sky-data.list").write_text(f"{synth_source / 'fine.png'}\n")
    monkeypatch.setattr(pc, "DPKG_INFO_DIR", str(info))
    assert pc.deny_reason(owned) == "owned by a denied package"
    assert pc.deny_reason(str(synth_source / "link.png"))
    assert pc.deny_reason(str(synth_source / "fine.png")) is None
    rejected = []
    files = pc.photo_files("synth", rejected=rejected)
    assert [os.path.basename(f.path) for f in files] == ["fine.png"]
    assert sum(r.startswith("denied") for _, r in rejected) == 2
    with pytest.raises(ValueError, match="deny-list"):
        pc.tile_photos([owned])


def test_no_source_reaches_into_a_held_out_desktop():
    for name, entry in pc.PACKAGES.items():
        for pattern in entry.get("globs", ()):
            assert pc.deny_reason(pattern) is None, (name, pattern)
        for pkg in entry.get("apt", ()):
            assert not pc.DENY_PACKAGE_RE.search(pkg), (name, pkg)
    for pkg in ("plasma-workspace-wallpapers", "gnome-backgrounds", "mate-backgrounds", "ukui-wallpapers",
                "kde-wallpapers"):
        assert pc.DENY_PACKAGE_RE.search(pkg)


# --- missing sources, split, set-up ------------------------------------------------------------------

def test_missing_source_names_the_package_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(pc.PACKAGES, "gone", {"apt": ("no-such-photo-pkg",), "globs": (str(tmp_path / "*.jpg"),)})
    with pytest.raises(FileNotFoundError, match="apt-get install no-such-photo-pkg"):
        pc.photo_files(["gone"])
    monkeypatch.setitem(pc.PACKAGES, "empty", {"apt": ("empty-photo-pkg",), "owned": False,
                                               "globs": (str(tmp_path / "*.jpg"),)})
    with pytest.raises(FileNotFoundError, match="empty-photo-pkg"):
        pc.photo_files("empty")
    monkeypatch.setitem(pc.PACKAGES, "samples", {"pip": "scikit-image", "samples": ("astronaut",),
                                                 "dir": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="scikit-image"):
        pc.photo_files("samples")
    with pytest.raises(KeyError, match="unknown photo source"):
        pc.photo_files(["no-such-source"])


def test_split_keeps_sides_apart(tmp_path, monkeypatch):
    for side in ("one", "two"):
        (tmp_path / side).mkdir()
        monkeypatch.setitem(pc.PACKAGES, side, {"apt": (f"{side}-pkg",), "owned": False,
                                                "globs": (str(tmp_path / side / "*.png"),)})
    shared = _texture(800, 800, seed=40)
    _save(tmp_path / "one" / "shared.png", shared)                      # the same picture on both sides
    _save(tmp_path / "two" / "shared_copy.png", np.asarray(Image.fromarray(shared).resize((700, 700))))
    _save(tmp_path / "one" / "a.png", _texture(800, 800, seed=41))
    _save(tmp_path / "two" / "b.png", _texture(800, 800, seed=42))
    stats = {}
    out = pc.build_split(["one"], ["two"], size=48, min_tile_px=48, stats=stats)
    tr, ho = out["train"], out["heldout"]
    assert {o.source for o in tr[1]} == {"one"} and {o.source for o in ho[1]} == {"two"}
    assert not any("shared" in o.file for o in ho[1])
    assert len(tr[0]) == stats["train"]["kept"] and len(ho[0]) == stats["heldout"]["kept"] > 0
    d = pc.thumbnail_distances(pc.thumbnails(ho[0]), pc.thumbnails(tr[0]))
    assert d.min() >= 0.25
    with pytest.raises(ValueError, match="both sides"):
        pc.build_split(["one"], ["one", "two"])


def test_default_split_is_disjoint_and_setup_script_installs_every_package():
    train, held = pc.DEFAULT_SPLIT["train"], pc.DEFAULT_SPLIT["heldout"]
    assert not set(train) & set(held) and set(train) | set(held) <= set(pc.PACKAGES)
    script = open(os.path.join(ROOT, "scripts", "setup_env.sh")).read()
    listed = re.search(r'PHOTO_PACKAGES="([^"]*)"', script).group(1).split()
    assert sorted(listed) == sorted(pc.apt_packages())
    assert "DPkg::Lock::Timeout=600" in script


# --- the real packages ------------------------------------------------------------------------------

def test_real_photos_tile_into_distinct_items():
    _real("skimage", "endless-sky", "planets")
    files = pc.photo_files(["skimage", "endless-sky", "planets"])
    by_source = {s: [f for f in files if f.source == s] for s in ("skimage", "endless-sky", "planets")}
    assert len(by_source["skimage"]) >= 10 and len(by_source["endless-sky"]) >= 200
    for f in files:
        assert pc.deny_reason(f.path) is None
    sample = by_source["skimage"] + by_source["endless-sky"][::8] + by_source["planets"][:4]
    stats = {}
    tiles, prov = pc.tile_photos(sample, size=128, stats=stats)
    assert tiles.shape[1:] == (128, 128, 3) and len(tiles) > 150
    d = pc.thumbnail_distances(pc.thumbnails(tiles), pc.thumbnails(tiles))
    np.fill_diagonal(d, np.inf)
    assert d.min() >= 0.25
    for a, b in itertools.combinations(prov, 2):
        if a.file == b.file:
            assert not _boxes_overlap(a.box, b.box)
    assert {o.source for o in prov} == {"skimage", "endless-sky", "planets"}


def test_real_lomiri_sources_do_not_mix():
    _real("lomiri-16.04", "lomiri-20.04")
    a = {f.path for f in pc.photo_files("lomiri-16.04")}
    b = {f.path for f in pc.photo_files("lomiri-20.04")}
    assert len(a) >= 10 and len(b) >= 2 and not a & b
