"""Round-37 review of configuration: fetch_data's URLs judged as the download judges them (a scheme in any case,
a host required), so what params accepts can be fetched and what it refuses is refused for the right reason."""

import pytest
import yaml

from faceage.config import ConfigError, params_from_dict
from tests.conftest import REPO


def raw_params(**fetch_data) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["fetch_data"].update(fetch_data)
    return raw


@pytest.mark.parametrize("mirror", ["HTTPS://example.com/appa-real-release.zip",
                                    "Http://158.109.8.102/AppaRealAge/appa-real-release.zip"])
def test_a_mirror_whose_scheme_is_spelled_in_capitals_is_an_http_url(mirror):
    """URL schemes are case-insensitive (RFC 3986), and fetch_data.source took HTTPS://...; the same URL as a
    mirror was refused with "must be http(s) URLs", which it is."""
    params = params_from_dict(raw_params(mirrors=[mirror]))
    assert params.fetch_data.mirrors == (mirror,)


@pytest.mark.parametrize("key, value", [("mirrors", ["https:///AppaRealAge/appa-real-release.zip"]),
                                        ("mirrors", ["http:/158.109.8.102/AppaRealAge/appa-real-release.zip"]),
                                        ("source", "https:/data.chalearnlap.cvc.uab.cat/appa-real-release.zip"),
                                        ("source", "http://")])
def test_a_url_without_a_host_is_refused_naming_the_key(key, value):
    """A slash too few (``https:/host/...``) left no host: params took it, and fetch_data failed on it after
    check_sources, with requests' "Invalid URL ... No host supplied"."""
    with pytest.raises(ConfigError, match=rf"fetch_data\.{key}.*no host"):
        params_from_dict(raw_params(**{key: value}))


@pytest.mark.parametrize("mirror", ["http://[::1/appa-real-release.zip", " https://example.com/a.zip", "ftp://a/b.zip"])
def test_a_mirror_that_is_not_a_usable_http_url_is_one_config_error(mirror):
    """Refused with the key named, never a traceback (urllib's parser raises ValueError on an unclosed ``[``)."""
    with pytest.raises(ConfigError, match=r"fetch_data\.mirrors"):
        params_from_dict(raw_params(mirrors=[mirror]))
