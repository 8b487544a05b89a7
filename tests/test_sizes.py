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
