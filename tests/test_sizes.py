import pytest

from vdisk.errors import RequestError
from vdisk.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("512", 512),
        ("64k", 65536),
        ("64K", 65536),
        ("1M", 1 << 20),
        ("1.5M", 3 << 19),
        ("10G", 10 << 30),
        ("2T", 2 << 40),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1Q", "-5", "0.3"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(RequestError):
        parse_size(text)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1024, "1 KiB"),
        (196 << 10, "196 KiB"),
        (1 << 30, "1 GiB"),
        (3 << 19, "1.5 MiB"),
        (1000 << 10, "0.977 MiB"),
    ],
)
def test_format_size_matches_qemu(n: int, text: str) -> None:
    assert format_size(n) == text


def test_parse_size_plain_spellings_read_as_the_pattern() -> None:
    """The spellings parse_size reads without re ("4k", "512") give what its pattern gives."""
    import re

    from vdisk.sizes import _SIZE_PATTERN, _SUFFIXES

    def by_pattern(text: str, default_suffix: str) -> int:
        m = re.match(_SIZE_PATTERN, text, re.IGNORECASE)
        assert m is not None
        return int(m.group(1)) << _SUFFIXES[(m.group(2) or default_suffix).lower()]

    for number in ("0", "1", "512", "4096", "007"):
        for suffix in ("", "b", "B", "k", "K", "m", "M", "g", "G", "t", "T", "p", "P", "e", "E"):
            for default in ("", "M"):
                text = number + suffix
                assert parse_size(text, default) == by_pattern(text, default), (text, default)
    for odd in ("1x", "k", "1kk", "\u0661\u0662", "1 k"):  # not plain: the pattern decides
        try:
            expected: int | None = by_pattern(odd, "")
        except AssertionError:
            expected = None
        if expected is None:
            with pytest.raises(RequestError):
                parse_size(odd)
        else:
            assert parse_size(odd) == expected
