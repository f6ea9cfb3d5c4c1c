"""reporting/html: the pieces of the self-contained report escape text and embed images."""

from __future__ import annotations


def test_report_pieces_escape_text_and_embed_images(tmp_path):
    from covidseg.reporting.html import image, page, section, table
    from covidseg.reporting.plots import loss_curves

    png = tmp_path / "curve.png"
    loss_curves([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}], ["loss"], png)
    text = page("a <b>", "lead & more", [section("s", table(["x<y"], [["<script>"]]), image(png, 'c"d'))])
    assert "<script>" not in text and "&lt;script&gt;" in text and "x&lt;y" in text
    assert text.count("data:image/png;base64,") == 1 and 'alt="c&quot;d"' in text
    assert image(tmp_path / "missing.png", "gone") == ""
