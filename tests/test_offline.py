"""Offline HTML: CDN tags become vendored files (relative to each page) or go; nothing names a CDN afterwards."""

from __future__ import annotations

import re
from pathlib import Path

from refinery.core.offline import offline_data_docs, offline_html_template

PAGE = """<html><head>
<link rel="stylesheet" href="https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css"/>
<link rel="stylesheet" href="https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css">
<link rel="stylesheet" href="https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css">
<script src="https://cdn.jsdelivr.net/npm/vega@5"></script>
<script src="https://cdn.jsdelivr.net/npm/vega-embed@6"></script>
<script src="https://code.jquery.com/jquery-3.7.1.min.js"></script>
<script src="https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js"></script>
<script src="https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js" integrity="sha384-x"
  crossorigin="anonymous"></script>
<script src="https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js"></script>
</head><body><a href="https://greatexpectations.io">GX</a>
<img src="https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png?d=1"></body></html>"""


def test_cdn_tags_point_at_vendored_files_relative_to_each_page(tmp_path):
    nested = tmp_path / "validations/curated/run"
    nested.mkdir(parents=True)
    (tmp_path / "index.html").write_text(PAGE)
    (nested / "page.html").write_text(PAGE)
    counts = offline_data_docs(tmp_path)
    assert counts == {"pages": 2, "replaced": 2 * 6, "dropped": 2 * 3}
    for page, prefix in ((tmp_path / "index.html", ""), (nested / "page.html", "../../../")):
        text = page.read_text()
        loads = re.findall(r"<(?:link|script|img)\b[^>]*(?:href|src)=\"([^\"]+)\"", text)
        assert not [u for u in loads if u.startswith("http")], loads
        for url in loads:  # every load resolves to a file the site holds
            assert (page.parent / url).is_file(), url
        assert f'src="{prefix}static/vendor/bootstrap/js/bootstrap.bundle.min.js"' in text
        assert "integrity=" not in text  # the CDN file's hash would make the browser refuse the local copy
        assert '<a href="https://greatexpectations.io">' in text  # links are not loads: kept
    assert (tmp_path / "static/vendor/font_awesome/webfonts/fa-solid-900.woff2").is_file()
    assert "window.vegaEmbed" in (tmp_path / "static/vendor/vega-bundle.js").read_text()


def test_plots_template_inlines_vega_and_keeps_dvc_placeholders():
    template = offline_html_template()
    assert "{plot_divs}" in template and "{refresh_tag}" in template and "{scripts}" not in template
    assert "window.vegaEmbed" in template and "cdn.jsdelivr" not in template
    assert template.count("</script>") == 1  # the bundle cannot close its own script element early
