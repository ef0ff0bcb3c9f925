"""The test suite's own rules (tests/conftest.py): markers follow from the fixtures a test uses,
and a test without ``ray`` or ``training`` that starts Ray or trains fails instead of silently
slowing the fast lane. Checked on small test files run by an inner pytest session."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")
MARKERS = ("ray", "training", "data", "subprocess", "gpu")


@pytest.fixture(scope="module")
def _compiler_imported() -> None:
    """torch._dynamo imported before pytester's snapshot of ``sys.modules``: pytester removes
    what an inner run imported, and an inner test that trains imports torch._dynamo (its
    optimizer does), whose operator libraries torch registers once per process: imported again
    by a later test of this process, it would fail."""
    import torch._dynamo  # noqa: F401


@pytest.fixture
def inner(_compiler_imported: None, pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester directory with this suite's conftest and markers (and no plugins it does not
    need: hypothesis's alone takes seconds to summarize a run)."""
    pytester.makeconftest(CONFTEST.read_text())
    markers = "".join(f"\n    {marker}: {marker}" for marker in MARKERS)
    pytester.makeini(
        f"[pytest]\nmarkers ={markers}\naddopts = -p no:cacheprovider -p no:hypothesispytest -p no:benchmark\n"
    )
    return pytester


def test_markers_follow_the_fixtures_a_test_uses(inner: pytest.Pytester):
    inner.makepyfile(
        """
        import pytest

        @pytest.fixture
        def cifar_images(cifar10_dir):
            return cifar10_dir

        def test_plain(): pass
        def test_session_ray(ray_session): pass
        def test_own_ray(own_ray): pass
        def test_cluster(ray_cluster): pass
        def test_trains(train_model): pass
        def test_trained(trained_digits_dssn): pass
        def test_in_job(ray_session, trains_in_ray_job): pass
        def test_through_a_fixture(cifar_images): pass
        def test_paper(dssn_paper): pass
        def test_interpreters(fresh_python): pass
        def test_cuda(cuda): pass
        """
    )

    items, _ = inner.inline_genitems()
    marked = {marker: {item.name for item in items if item.get_closest_marker(marker)} for marker in MARKERS}
    assert marked == {
        "ray": {"test_session_ray", "test_own_ray", "test_cluster", "test_in_job"},
        "training": {"test_trains", "test_trained", "test_in_job"},
        "data": {"test_through_a_fixture", "test_paper"},
        "subprocess": {"test_interpreters"},
        "gpu": {"test_cuda"},
    }
    assert {item.name for item in items if not any(item.get_closest_marker(m) for m in MARKERS)} == {"test_plain"}


def test_an_unmarked_test_that_starts_ray_or_trains_fails(inner: pytest.Pytester):
    inner.makepyfile(
        """
        import socket
        import pytest

        # Each call is one that would fail or do nothing unguarded: a broken guard cannot touch a
        # Ray that runs here, and the message checked below tells the two failures apart.
        def test_init():
            import ray
            ray.init(address="127.0.0.1")  # no port: refused at once

        def test_local_ray():
            from cluster.client import local_ray
            local_ray.start(private=True, num_cpus=-1)

        def test_simulated_cluster():
            from ray.cluster_utils import Cluster
            Cluster(initialize_head=False)

        def test_dashboard_that_answers():
            from ray.job_submission import JobSubmissionClient
            with socket.socket() as listening:
                listening.bind(("127.0.0.1", 0))
                listening.listen()
                try:
                    JobSubmissionClient(f"http://127.0.0.1:{listening.getsockname()[1]}")
                except Exception:  # the guard's failure is no Exception: it is not caught here
                    pass

        def test_dashboard_where_nothing_listens():
            from ray.job_submission import JobSubmissionClient
            with socket.socket() as unused:
                unused.bind(("127.0.0.1", 0))
                port = unused.getsockname()[1]
            with pytest.raises(Exception):
                JobSubmissionClient(f"http://127.0.0.1:{port}")

        def test_training(tmp_path):
            from certlib.data import load_digits
            from certlib.training import TrainConfig, train_model
            train_model(TrainConfig("digits", "dssn", 0.5, epochs=1), tmp_path / "m.pt", load_digits("train"),
                        load_digits("test"), log=lambda line: None)
        """
    )
    result = inner.runpytest("-q")
    result.assert_outcomes(passed=1, failed=5)
    for name in ("test_init", "test_local_ray", "test_simulated_cluster", "test_dashboard_that_answers"):
        result.stdout.fnmatch_lines([f"*{name} starts or connects to Ray but is not marked 'ray'*ray_session*"])
    result.stdout.fnmatch_lines(["*test_training runs the training loop but is not marked 'training'*train_model*"])
