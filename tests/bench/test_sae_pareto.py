"""bench/sae_objectives.py --sweep compares objectives at matched CE-loss increase: its interpolation."""

import pytest

from tests.bench_scripts import bench_script


@pytest.fixture(scope="module")
def bench():
    with bench_script("sae_objectives") as module:
        yield module


def run(ce: float, l0: float, alive: int) -> dict:
    return {"ce_increase": ce, "l0": l0, "alive": alive}


def test_l0_is_interpolated_log_log_along_a_sweep_and_not_outside_it(bench):
    points = [run(0.1, 1000, 4000), run(0.4, 250, 3000)]  # L0 ∝ CE^-1 between them
    assert bench.at_ce(points, 0.2, "l0") == pytest.approx(500)
    assert bench.at_ce(points, 0.1, "l0") == pytest.approx(1000)
    assert bench.at_ce(points, 0.05, "l0") is None and bench.at_ce(points, 0.5, "l0") is None


def test_objectives_are_compared_only_where_every_sweep_reaches(bench):
    runs = {"local": [run(0.2, 800, 4600), run(2.0, 80, 4000)],
            "e2e": [run(0.05, 900, 3000), run(0.8, 90, 1000)]}
    got = bench.matched(runs)
    assert [m["ce_increase"] for m in got] == pytest.approx([0.2, 0.4, 0.8])
    assert got[0]["local_l0"] == pytest.approx(800) and got[-1]["e2e_l0"] == pytest.approx(90)
    assert all(m["e2e_l0"] < m["local_l0"] for m in got)
    assert bench.matched({"local": [run(1, 10, 1), run(2, 5, 1)], "e2e": [run(3, 9, 1), run(4, 8, 1)]}) == []
