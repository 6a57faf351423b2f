"""Byte sizes mean the same wherever a user writes one: `dtune plan --gpu-mem`, `train.gpu_mem`, `dtune doctor`."""

from __future__ import annotations

import pytest

from dtune.commands import doctor
from dtune.errors import ConfigError
from dtune.units import parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80GiB", 80 * 2**30),
        ("40GB", 40 * 10**9),  # decimal, as disk and link makers write it
        ("40gb", 40 * 10**9),
        ("24G", 24 * 2**30),  # a bare prefix is binary, as GPU memory is quoted
        ("512MiB", 512 * 2**20),
        ("64K", 64 * 2**10),
        ("1.5GiB", int(1.5 * 2**30)),
        ("1024", 1024),
        ("1024B", 1024),
    ],
)
def test_sizes(text: str, expected: int):
    assert parse_bytes(text) == expected


def test_a_plain_number_takes_the_default_unit():
    assert parse_bytes("80", "--gpu-mem", default_unit="G") == 80 * 2**30


@pytest.mark.parametrize("bad", ["lots", "", "GiB", "1iB", "-5G", "1.2.3G"])
def test_a_bad_size_names_where_it_came_from(bad: str):
    with pytest.raises(ConfigError, match="--gpu-mem: cannot read"):
        parse_bytes(bad, "--gpu-mem")


def test_doctor_reads_sizes_like_plan(capsys):
    """`40GB` was 40 GiB in `dtune doctor` and 40e9 bytes in `dtune plan`; both now read it through one parser, and a
    bad size is refused before any rank waits for the others."""
    assert doctor.main(["--sizes", "1M,lots"]) == 2
    assert "--sizes: cannot read 'lots'" in capsys.readouterr().err
