"""common/formats.py: the one set of formatters every layer prints with (bytes, SI counts, durations)."""
import pytest

from common.formats import duration, human, si


@pytest.mark.parametrize("n, text", [(None, "unknown"), (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                     (3 * 2**20, "3.0 MiB"), (5 * 2**40, "5.0 TiB"), (2**60, "1048576.0 TiB")])
def test_bytes_in_binary_units(n, text):
    assert human(n) == text


@pytest.mark.parametrize("x, text", [(None, "—"), (0, "0"), (950, "950"), (1234, "1.23k"), (45_600_000, "45.6M"),
                                     (7.891e9, "7.89G"), (1.5e12, "1.5T"), (2e15, "2P"), (3.2e18, "3.2E"),
                                     (-1500, "-1.5k"), (0.25, "0.25")])
def test_counts_in_si_units_to_three_digits(x, text):
    assert si(x) == text


@pytest.mark.parametrize("seconds, text", [(None, "—"), (0, "0 s"), (44.6, "45 s"), (59.4, "59 s"), (60, "1 min 0 s"),
                                           (723, "12 min 3 s"), (3599, "59 min 59 s"), (3600, "1 h 0 min"),
                                           (7500, "2 h 5 min"), (90_000, "25 h 0 min")])
def test_durations_as_people_read_them(seconds, text):
    assert duration(seconds) == text


def test_what_stands_for_a_missing_figure_is_the_callers():
    assert si(None, missing="-") == "-" and duration(None, missing="-") == "-"
