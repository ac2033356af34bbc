"""launch.py numbers a sweep's points as Hydra's basic sweeper numbers its jobs."""

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from launch import sweep_points


def _points(*overrides):
    return sweep_points(OverridesParser.create().parse_overrides(list(overrides)))


def test_product_of_values_in_order_of_keys():
    assert _points("a=1,2", "b=x", "c=range(0,2)") == [["a=1", "b=x", "c=0"], ["a=1", "b=x", "c=1"],
                                                       ["a=2", "b=x", "c=0"], ["a=2", "b=x", "c=1"]]


def test_a_repeated_key_keeps_its_place_and_its_last_value():
    assert _points("a=1,2", "b=y", "a=3") == [["a=3", "b=y"]]


def test_quoted_and_nested_values_keep_their_text():
    assert _points("m=peer,dense", "t=[1,2]") == [["m=peer", "t=[1,2]"], ["m=dense", "t=[1,2]"]]


def test_an_interval_is_refused():
    with pytest.raises(HydraException, match="list of values"):
        _points("a=interval(0,1)")
