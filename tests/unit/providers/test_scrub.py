"""Scrubbing configured secrets from provider texts (issue 20, point 2)."""

import pytest

from server.errors import UpstreamInvalidRequest
from server.providers.adapter import Endpoint, Scrubber, Secret


@pytest.mark.parametrize("key", ["token-PROVSECRET-77", "Pz7q", "prv/SECRET+b64==", "with space 9", 'quo"te\\d'])
def test_every_form_of_the_key_and_the_headers_built_from_it_are_scrubbed(key):
    endpoint = Endpoint("openai-compatible", "m", "http://x", Secret(key), (("X-Org", "orgSECRET-1"), ("X-Flag", "1")))
    scrubber = Scrubber.for_endpoint(endpoint).with_headers({"authorization": f"Bearer {key}", "content-type": "application/json"})
    import json
    from urllib.parse import quote

    text = f"you sent Authorization=Bearer {key}; raw {key}; url {quote(key, safe='')}; json {json.dumps(key)}; org orgSECRET-1; HTTP 401"
    exc = scrubber.scrub_error(UpstreamInvalidRequest(f"rejected (HTTP 400): {text}", status=400, body=text, provider_type=key))
    for out in (exc.message, str(exc), exc.body, exc.provider_type):
        assert key not in out and "orgSECRET-1" not in out and quote(key, safe="") not in out
    assert "HTTP 401" in exc.message  # a short configured header value is not treated as a secret


def test_no_key_scrubs_only_key_shapes():
    assert Scrubber.for_endpoint(Endpoint("openai-compatible", "m", "http://x")).scrub("plain text") == "plain text"
