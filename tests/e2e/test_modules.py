"""The dashboard's pure modules, run in the browser: rates from counter deltas, number formats, header parsing."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_rates_from_counter_deltas(page):
    page.goto("/ui/icon.svg")  # same origin, no app running
    rates = page.evaluate(
        """async () => {
            const {RateMeter} = await import('/ui/rates.js');
            const meter = new RateMeter();
            const first = meter.sample(10, {published: 100, delivered: 50, acked: 40});
            const second = meter.sample(12, {published: 130, delivered: 60, acked: 40});
            const restarted = meter.sample(13, {published: 5, delivered: 5, acked: 5});
            const after = meter.sample(15, {published: 25, delivered: 5, acked: 9});
            return {first, second, restarted, after};
        }"""
    )
    assert rates["first"] == {"published": None, "delivered": None, "acked": None}  # one sample: no rate yet
    assert rates["second"] == {"published": 15, "delivered": 5, "acked": 0}
    assert rates["restarted"] == {"published": None, "delivered": None, "acked": None}  # counters went down
    assert rates["after"] == {"published": 10, "delivered": 0, "acked": 2}


def test_formats_and_header_parsing(page):
    page.goto("/ui/icon.svg")
    out = page.evaluate(
        """async () => {
            const fmt = await import('/ui/format.js');
            const {parseHeaders} = await import('/ui/ui.js');
            let error = null;
            try { parseHeaders('no colon here'); } catch (e) { error = e.message; }
            return {
                count: fmt.count(1234567), rate: [fmt.rate(null), fmt.rate(2.345), fmt.rate(1234.5)],
                bytes: [fmt.bytes(512), fmt.bytes(1536), fmt.bytes(5 * 1024 ** 3)],
                duration: [fmt.duration(3.25), fmt.duration(300), fmt.duration(3725), fmt.duration(90000)],
                headers: parseHeaders('a: 1\\n\\n b : two: parts \\n'), empty: parseHeaders('  \\n'), error,
            };
        }"""
    )
    assert out["count"] == "1,234,567"
    assert out["rate"] == ["–", "2.3", "1,235"]
    assert out["bytes"] == ["512 B", "1.5 KiB", "5.0 GiB"]
    assert out["duration"] == ["3.3 s", "5 min", "1 h 2 min", "1 d 1 h"]
    assert out["headers"] == {"a": "1", "b": "two: parts"}
    assert out["empty"] is None
    assert out["error"] == 'header line 1 must look like "name: value"'
