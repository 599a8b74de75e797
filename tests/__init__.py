"""The test suite: `python -m unittest` at the repository's top runs it, in a few processes
(tests/parallel.py)."""

import os


def load_tests(loader, standard_tests, pattern):
    """Discovery's hook for this package: every test module here, run by ParallelSuite."""
    from tests.parallel import ParallelSuite, worker_count

    here = os.path.dirname(os.path.abspath(__file__))
    suite = loader.discover(start_dir=here, pattern=pattern or "test*.py")
    workers = worker_count()
    return ParallelSuite(suite, workers) if workers > 1 else suite
