"""The dashboard's files as the broker serves them: content types, a strict Content-Security-Policy, no stale
caches (no-cache with an ETag), and nothing outside the app's own files."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.e2e


def fetch(url: str, headers: dict | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read()


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css"),
     ("/ui/icon.svg", "image/svg+xml")],  # fmt: skip
)
def test_files_have_their_content_type_a_csp_and_no_cache(base_url, path, content_type):
    status, headers, body = fetch(base_url + path)
    assert status == 200
    assert headers["Content-Type"].startswith(content_type)
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert body


def test_a_revalidation_with_the_etag_is_answered_304(base_url):
    _, headers, _ = fetch(base_url + "/ui/app.js")
    status, again, body = fetch(base_url + "/ui/app.js", {"If-None-Match": headers["ETag"]})
    assert status == 304 and body == b""
    assert again["Cache-Control"] == "no-cache"


@pytest.mark.parametrize("path", ["/ui/nothing.js", "/ui/..%2F__init__.py", "/ui/%2E%2E%2Fhttp.py"])
def test_only_the_apps_files_are_served(base_url, path):
    status, _, _ = fetch(base_url + path)
    assert status == 404


def test_the_page_loads_nothing_from_other_hosts(base_url):
    _, _, body = fetch(base_url + "/")
    html = body.decode()
    assert "http://" not in html and "https://" not in html
    assert 'type="module" src="/ui/app.js"' in html
