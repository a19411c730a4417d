"""Shared fixtures: the repo root, shared datasets, and a tiny seed written per test."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REFINERY_SHARED", ROOT.parent / "shared" / "datasets"))
COSMOSQA = SHARED / "cosmosqa" / "cosmosqa_dev_part.csv"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_DOCS = [
    {"doc_id": "d1", "title": "Refunds", "text": "Refunds are issued within 14 days.  Contact billing to start one.",
     "updated_at": "2023-01-05", "category": "policy", "supersedes": None},
    {"doc_id": "d2", "title": "Refunds (new)", "text": "Refunds are issued within 30 days. Start one in Settings.",
     "updated_at": "2024-06-01", "category": "policy", "supersedes": "d1"},
    {"doc_id": "d3", "title": "Export", "text": "You can export notes as PDF or Markdown from the File menu.",
     "updated_at": "2024-02-01", "category": "help_center", "supersedes": None},
    {"doc_id": "d4", "title": "Sync", "text": "Sync runs every 5 minutes on the Pro plan and hourly on Free.",
     "updated_at": "2024-03-01", "category": "help_center", "supersedes": None},
    {"doc_id": "d5", "title": "Passwords", "text": "Reset your password from the login page with the Forgot link.",
     "updated_at": "2024-04-01", "category": "help_center", "supersedes": None},
]
TINY_QA = [
    {"qa_id": "q1", "doc_id": "d1", "question": "How long do refunds take?", "answer": "Within 14 days.",
     "intent": "billing", "evidence": "Refunds are issued within 14 days."},
    {"qa_id": "q2", "doc_id": "d2", "question": "What is the refund window now?", "answer": "It is 30 days.",
     "intent": "billing", "evidence": "Refunds are issued within 30 days."},
    {"qa_id": "q3", "doc_id": "d3", "question": "Which export formats exist?", "answer": "PDF and Markdown.",
     "intent": "how_to", "evidence": "export notes as PDF or Markdown"},
    {"qa_id": "q4", "doc_id": "d3", "question": "Where is export?", "answer": "In the File menu.",
     "intent": "how_to", "evidence": "from the File menu"},
    {"qa_id": "q5", "doc_id": "d4", "question": "How often does sync run on Pro?", "answer": "Every 5 minutes.",
     "intent": "feature_info", "evidence": "Sync runs every 5 minutes on the Pro plan"},
    {"qa_id": "q6", "doc_id": "d4", "question": "how often on free?", "answer": "Hourly.",
     "intent": "feature_info", "evidence": "hourly on Free"},
    {"qa_id": "q7", "doc_id": "d5", "question": "I forgot my password", "answer": "Use the Forgot link on login.",
     "intent": "account_access", "evidence": "Reset your password from the login page with the Forgot link."},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as UTF-8 JSONL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def tiny_seed(tmp_path: Path) -> Path:
    """A seed folder in the native format: five documents (one stale) and seven QA pairs."""
    seed = tmp_path / "seed"
    write_jsonl(seed / "documents.jsonl", TINY_DOCS)
    write_jsonl(seed / "qa.jsonl", TINY_QA)
    return seed


def params_for(tmp_path: Path, **overrides: dict) -> Path:
    """Write a params.yaml from the project's own, with per-section overrides."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section] = {**params[section], **values}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test from inside ``tmp_path`` (stage scratch folders are created in the working directory)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def needs_cosmosqa():
    """Skip marker for tests that read the shared CosmosQA file."""
    return pytest.mark.skipif(not COSMOSQA.exists(), reason=f"shared dataset absent: {COSMOSQA} "
                                                            f"(set REFINERY_SHARED to its folder)")


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory) -> Path:
    """A plain fp32 SmolLM2 folder: the provisioned one when `dvc repro` ran, else converted once per session."""
    from refinery.core.errors import ModelResolutionError
    from refinery.models import resolve

    provisioned = ROOT / "models" / "base" / "weights" / "embedded--smollm2-135m-instruct"
    if (provisioned / "config.json").is_file():
        return provisioned
    try:
        _, gguf, _ = resolve.embedded_source(resolve.parse_spec("teacher", "embedded:smollm2-135m-instruct"))
    except ModelResolutionError as e:
        pytest.skip(f"no real model to test on: {e}")
    out = tmp_path_factory.mktemp("smollm2_fp32")
    resolve.convert_gguf(gguf, out)
    return out


@pytest.fixture(scope="session")
def ci_project(tmp_path_factory) -> Path:
    """A fresh copy of the project with the ``ci`` profile after a full ``dvc repro`` (once per session; tests
    that use it leave its outputs as the repro made them)."""
    import time

    from tests.ci_project import ci_clone, run

    a = ci_clone(tmp_path_factory.mktemp("clone") / "a")
    t0 = time.perf_counter()
    run([sys.executable, "-m", "dvc", "repro"], a)
    print(f"ci project: dvc repro {time.perf_counter() - t0:.0f} s")
    return a


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The embedded all-MiniLM-L6-v2 folder, straight from its package."""
    from refinery.core.errors import ModelResolutionError
    from refinery.models import resolve

    try:
        _, folder, _ = resolve.embedded_source(resolve.parse_spec("embedder", "embedded:all-minilm-l6-v2"))
    except ModelResolutionError as e:
        pytest.skip(f"no embedding model to test on: {e}")
    return folder


# Screenshots the browser tests take land here (gitignored build/ by default; CI can collect the folder).
SCREENSHOTS = Path(os.environ.get("REFINERY_SCREENSHOTS", ROOT / "build" / "screenshots"))


@pytest.fixture
def chromium():
    """A headless Chromium driven by playwright (the system browser, no download); skips where either is missing.

    Yields ``(browser, shoot)``: ``shoot(page, name)`` saves a full-page screenshot under ``SCREENSHOTS`` and
    prints its path, so it shows in the test output. :func:`watched_page` opens a page that records its requests
    and script errors.
    """
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no headless Chromium (apt-get install -y chromium, or make test-tools)")

    def shoot(page, name: str, full_page: bool = True) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        print(f"screenshot: {path}")
        return path

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            yield browser, shoot
        finally:
            browser.close()


def watched_page(browser, width: int = 1280, height: int = 900):
    """A new page of ``browser`` and the lists its requests (URLs) and uncaught script errors are appended to."""
    requests: list[str] = []
    errors: list[str] = []
    page = browser.new_page(viewport={"width": width, "height": height})
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page, requests, errors


def offline(requests: list[str]) -> list[str]:
    """The requests that left the machine (anything but file:, data: and blob: URLs): [] for an offline page."""
    return [u for u in requests if not u.startswith(("file:", "data:", "blob:"))]
