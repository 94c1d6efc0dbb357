"""report.html as a person sees it: opened in headless Chromium (tests/browser.py) at desktop and phone size,
with no console error, every image loaded, something on the screen, and no sideways scrolling on a phone;
and pages that are broken in each of those ways, so that the checker is seen to fail.

Skipped only when Chromium is not installed (scripts/setup_env.sh installs Debian's `chromium` with apt)."""
import json

import pytest
from PIL import Image

from beam_pipeline import report
from tests.beam_pipeline import test_report as report_fixtures
from tests.browser import DESKTOP, PHONE, chromium_path, check_page

pytestmark = pytest.mark.skipif(
    chromium_path() is None,
    reason="chromium is not installed (scripts/setup_env.sh, run by `make setup`, installs Debian's chromium "
           "with apt); the report's browser checks need it")

# test_report's work directory: templates and failures tables, matched and deduplicated by the real pipelines.
workdir = report_fixtures.workdir


@pytest.fixture(scope="module")
def report_html(workdir, tmp_path_factory):
    """report.html with every section filled: evaluation against planted pairs, per edit family, model card
    with calibrated thresholds."""
    model_dir = tmp_path_factory.mktemp("model")
    card = {"model_id": report_fixtures.MODEL, "embedding_dim": 3, "card_version": 2, "artifact_sha256": "0" * 64,
            "input_spec": {"height": 28, "width": 28, "channels": 1, "dtype": "uint8", "value_range": [0, 255]},
            "training": {}, "data": {}, "metrics": {"recall_at_1": 0.91, "seed": {"auc": 0.97}},
            "thresholds": {"instance": [{"target_fmr": 0.001, "angular_similarity": 0.8, "cosine": 0.809,
                                         "fmr": 0.0009, "fmr_upper_95": 0.0012, "fnmr": 0.05,
                                         "impostor_pairs": 100000}]}}
    (model_dir / "model_card.json").write_text(json.dumps(card))
    (workdir / "manifest.csv").write_text("item_id,edit\na,\nb,crop\nc,jpeg\nd,\ne,crop\nf,\n")
    summary = report.run(["--workdir", str(workdir), "--ground_truth", str(workdir / "planted.csv"),
                          "--manifest", str(workdir / "manifest.csv"), "--model_dir", str(model_dir),
                          "--linkage", "single"])
    return summary["report_html"]


def _screenshot_size(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_report_in_a_desktop_browser(report_html, tmp_path):
    result = check_page(report_html, tmp_path / "desktop.png", *DESKTOP)
    assert result.problems == []
    assert len(result.images) >= 2 and all(i["ok"] and i["width"] > 100 for i in result.images), result.images
    assert result.visible_text_chars > 500
    assert _screenshot_size(tmp_path / "desktop.png") == DESKTOP
    assert not result.scrolls_sideways, result.overflow_summary()


def test_report_on_a_phone(report_html, tmp_path):
    # Phone emulation: the page's meta viewport decides the width it is laid out in.
    result = check_page(report_html, tmp_path / "phone.png", *PHONE, mobile=True)
    assert result.problems == []
    assert len(result.images) >= 2 and all(i["ok"] for i in result.images), result.images
    assert _screenshot_size(tmp_path / "phone.png") == PHONE
    assert result.client_width == PHONE[0], "laid out wider than the phone: no <meta name=viewport> width=device-width"
    assert not result.scrolls_sideways, result.overflow_summary()


# --- pages broken on purpose: the checker must say so ------------------------------------------------------

def _page(tmp_path, body, name="page.html"):
    path = tmp_path / name
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>t</title></head>"
                    f"<body>{body}</body></html>")
    return path


def test_a_broken_image_fails(tmp_path):
    result = check_page(_page(tmp_path, "<p>A picture:</p><img src='missing.png' alt='gone'>"),
                        tmp_path / "shot.png", *DESKTOP)
    assert result.broken_images == [f"{(tmp_path / 'missing.png').as_uri()} (alt 'gone')"]
    assert any(p.startswith("broken image:") for p in result.problems)
    # Chromium also logs the failed load as a console error, as DevTools shows it.
    assert any("ERR_FILE_NOT_FOUND" in e for e in result.console_errors)


def test_a_javascript_error_fails(tmp_path):
    result = check_page(_page(tmp_path, "<p>Text</p><script>undefined_function()</script>"
                                        "<script>console.error('told the console')</script>"),
                        tmp_path / "shot.png", *PHONE)
    assert len(result.exceptions) == 1 and "undefined_function is not defined" in result.exceptions[0]
    assert any("told the console" in e for e in result.console_errors)
    assert not result.blank and result.broken_images == []
    assert any(p.startswith("uncaught exception:") for p in result.problems)


@pytest.mark.parametrize("body", ["", "<p style='color:white'>white on white</p>"], ids=["empty", "invisible"])
def test_a_blank_page_fails(tmp_path, body):
    result = check_page(_page(tmp_path, body), tmp_path / "shot.png", *DESKTOP)
    assert result.blank and result.non_background_pixels == 0
    assert any(p.startswith("blank page:") for p in result.problems)
    assert result.console_errors == result.exceptions == []


def test_a_page_wider_than_a_phone_scrolls_sideways(tmp_path):
    page = tmp_path / "wide.html"
    page.write_text("<!DOCTYPE html><html><head><meta name='viewport' content='width=device-width, initial-scale=1'>"
                    "</head><body><h2>Wide</h2><div id='wide' style='width:900px'>a wide box</div>"
                    "<p>/a/path/with/no/space/to/break/it/that/runs/far/past/a/phone/screen.parquet</p></body></html>")
    expected = [("div#wide", "Wide", "wider than the window"), ("p", "Wide", "content spills out")]
    for mobile in (False, True):  # a phone zooms out to fit (innerWidth grows): still caught
        result = check_page(page, tmp_path / "shot.png", *PHONE, mobile=mobile)
        assert result.problems == [] and result.client_width == PHONE[0]
        assert result.scrolls_sideways and result.scroll_width > 900
        assert [(o["element"], o["section"], o["kind"]) for o in result.overflowing] == expected
    assert not check_page(page, tmp_path / "shot.png", *DESKTOP).scrolls_sideways


def test_a_page_without_a_viewport_is_laid_out_wider_than_a_phone(tmp_path):
    result = check_page(_page(tmp_path, "<p>Small print</p>"), tmp_path / "shot.png", *PHONE, mobile=True)
    assert result.problems == [] and result.client_width == 980
