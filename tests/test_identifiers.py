"""Public UIDs from domain IDs and back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shanoir_dicomweb_proxy._identifiers import UidFormatter

SHANOIR = UidFormatter(study_root="1.4.9.12.34.1.8527", series_root="1.4.9.12.34.2.8527")
BARE = UidFormatter(study_root="", series_root="9")


def test_shanoir_front_end_format() -> None:
    assert SHANOIR.study_uid(42) == "1.4.9.12.34.1.8527.42"
    assert SHANOIR.series_uid(7) == "1.4.9.12.34.2.8527.7"
    assert BARE.study_uid(42) == "42"


@given(st.integers(min_value=1, max_value=10**20 - 1))
def test_round_trip(value: int) -> None:
    for formatter in (SHANOIR, BARE):
        assert formatter.exam_id(formatter.study_uid(value)) == value
        assert formatter.acquisition_id(formatter.series_uid(value)) == value
        assert len(formatter.study_uid(value)) <= 64


@pytest.mark.parametrize(
    "uid",
    [
        "1.4.9.12.34.1.8527",  # the root alone
        "1.4.9.12.34.1.8527.042",  # leading zero: not how IDs are written
        "1.4.9.12.34.1.8527.0",
        "1.4.9.12.34.1.8527.42.1",  # deeper: a real UID under the same root
        "1.4.9.12.34.2.8527.42",  # a series UID given as a study
        "1.2.840.113619.2.55.3.42",  # a real UID
        "1.4.9.12.34.1.85271",
        "",
    ],
)
def test_not_public_study_uids(uid: str) -> None:
    assert SHANOIR.exam_id(uid) is None


def test_ids_are_positive() -> None:
    with pytest.raises(ValueError):
        SHANOIR.study_uid(0)
