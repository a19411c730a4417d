"""Make HTML that refinery writes render with no network: vendored CSS and JavaScript instead of CDN links.

Great Expectations' Data Docs and DVC's plots page load Bootstrap, jQuery, Font Awesome and Vega from CDNs, so
offline (an air-gapped cluster, a CI artifact opened later) they render unstyled and without charts. The assets
come from pinned PyPI packages (``xstatic-bootstrap``, ``xstatic-jquery``, ``xstatic-font-awesome``, and
``vl-convert-python``'s Vega bundle), copied next to the pages or inlined, never fetched at run time.
bootstrap-table is on no package index: a small stand-in (``bootstrap_table_offline.js``) draws the tables the
Data Docs index fills from JavaScript, with clickable rows but no sorting, filtering or paging.
"""

from __future__ import annotations

import os
import re
import shutil
from functools import lru_cache
from pathlib import Path

from refinery.core.errors import RefineryError

ASSETS = Path(__file__).resolve().parent / "assets"
VENDOR = "static/vendor"  # under a site's root

# CDN URL (a regex over the URL) -> the vendored file that replaces it, or None to drop the tag
_RULES: list[tuple[re.Pattern[str], str | None]] = [(re.compile(p), f) for p, f in [
    (r"bootstrap(?:cdn)?[^\"']*/bootstrap\.min\.css$", "bootstrap/css/bootstrap.min.css"),
    (r"bootstrap(?:cdn)?[^\"']*/js/bootstrap\.min\.js$", "bootstrap/js/bootstrap.bundle.min.js"),  # with Popper
    (r"popper", None),  # in bootstrap.bundle.min.js
    (r"jquery[^\"']*\.js$", "jquery/jquery.min.js"),
    (r"font-awesome[^\"']*/all\.min\.css$", "font_awesome/css/all.min.css"),
    (r"bootstrap-table@[^\"']*/dist/bootstrap-table\.min\.js$", "bootstrap_table_offline.js"),
    (r"npm/vega-embed@", "vega-bundle.js"),  # Vega, Vega-Lite and Vega Embed in one file
    (r"npm/vega(?:-lite)?@", None),
    # bootstrap-table's CSS and filter control, the date picker, the dark theme: not needed by the stand-in
    (r"bootstrap-table|bootstrap-datepicker|bootstrap-dark", None),
]]
_TAG = re.compile(r"<link\b[^>]*\bhref=\"(https?://[^\"]+)\"[^>]*>|<script\b[^>]*\bsrc=\"(https?://[^\"]+)\"[^>]*>"
                  r"\s*</script>", re.S)
_GE_ASSET = re.compile(r"https://great-expectations-web-assets\.[^\"')]+?/([\w.-]+\.png)(?:\?[^\"')]*)?")


def _xstatic(package: str) -> Path:
    """Return the data folder of an installed xstatic package (e.g. ``bootstrap``)."""
    try:
        module = __import__(f"xstatic.pkg.{package}", fromlist=["BASE_DIR"])
    except ImportError:
        raise RefineryError(f"xstatic-{package.replace('_', '-')} is not installed: it ships the {package} assets "
                            "that offline HTML needs (make install)") from None
    return Path(module.BASE_DIR)


@lru_cache(maxsize=1)
def vega_bundle() -> str:
    """Return one JavaScript file holding Vega, Vega-Lite and Vega Embed, which sets ``window.vegaEmbed``."""
    try:
        import vl_convert
    except ImportError:
        raise RefineryError("vl-convert-python is not installed: it ships the Vega bundle that offline plots need "
                            "(make install)") from None
    return vl_convert.javascript_bundle()


def write_vendor(folder: Path) -> Path:
    """Copy every vendored asset into ``folder`` (created) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    for package, parts in (("bootstrap", ("css/bootstrap.min.css", "js/bootstrap.bundle.min.js")),
                           ("jquery", ("jquery.min.js",)),
                           ("font_awesome", ("css/all.min.css", "webfonts"))):
        base = _xstatic(package)
        for part in parts:
            src, dst = base / part, folder / package / part
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                shutil.copyfile(src, dst)
    shutil.copyfile(ASSETS / "bootstrap_table_offline.js", folder / "bootstrap_table_offline.js")
    (folder / "vega-bundle.js").write_text(vega_bundle(), encoding="utf-8")
    return folder


def offline_data_docs(site: Path) -> dict[str, int]:
    """Rewrite a Data Docs site in place so every page renders with no network.

    CDN ``<link>`` and ``<script>`` tags point at the copies under ``static/vendor`` (relative to each page) or
    are dropped where nothing offline needs them; GE's hosted logo images become the ones GE ships.

    Returns:
        ``{"pages": n, "replaced": n, "dropped": n}``.
    """
    vendor = write_vendor(site / VENDOR)
    images = site / "static" / "images"
    images.mkdir(parents=True, exist_ok=True)
    import great_expectations

    ge_images = Path(great_expectations.__file__).parent / "render" / "view" / "static" / "images"
    counts = {"pages": 0, "replaced": 0, "dropped": 0}

    for page in sorted(site.rglob("*.html")):
        def local(rel_file: Path) -> str:
            return os.path.relpath(rel_file, page.parent).replace(os.sep, "/")

        def swap(m: re.Match[str]) -> str:
            url = m.group(1) or m.group(2)
            target = next((f for rx, f in _RULES if rx.search(url)), None)
            if target is None:
                counts["dropped"] += 1
                return ""
            counts["replaced"] += 1
            # the CDN file's subresource-integrity hash does not match the vendored version: the browser would
            # refuse the file, so the attribute goes (the file is local, nothing is fetched)
            tag = re.sub(r"\s(?:integrity|crossorigin)=\"[^\"]*\"", "", m.group(0))
            return tag.replace(url, local(vendor / target))

        def logo(m: re.Match[str]) -> str:
            name = m.group(1) if (ge_images / m.group(1)).is_file() else "logo-long.png"
            if not (images / name).is_file():
                shutil.copyfile(ge_images / name, images / name)
            return local(images / name)

        text = page.read_text(encoding="utf-8")
        page.write_text(_GE_ASSET.sub(logo, _TAG.sub(swap, text)), encoding="utf-8")
        counts["pages"] += 1
    for css in site.glob("static/styles/*.css"):
        css.write_text(_GE_ASSET.sub(lambda m: "../images/logo-long.png", css.read_text(encoding="utf-8")),
                       encoding="utf-8")
        if not (images / "logo-long.png").is_file():
            shutil.copyfile(ge_images / "logo-long.png", images / "logo-long.png")
    return counts


def offline_html_template() -> str:
    """Return an HTML template for ``dvc plots show --html-template`` with the Vega bundle inlined, no CDN."""
    bundle = vega_bundle().replace("</script", "<\\/script")
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n{refresh_tag}\n<title>refinery plots</title>\n"
            f"<script>{bundle}</script>\n"
            "<style>body{font-family:system-ui,sans-serif;margin:1.5em} table{border-spacing:15px}</style>\n"
            "</head>\n<body>\n<h1>refinery plots</h1>\n{plot_divs}\n</body>\n</html>\n")
