"""The project's tests; the folders mirror the package tree (tests/data tests data/, ...). Shared builders live in
helpers.py, growth_pairs.py, hf_pairs.py, relabel.py and conftest.py; no test module imports another
(tests/test_architecture.py). Every folder is a package, so pytest's default (prepend) import mode imports a test
module as tests.<folder>.<name> and `from tests.helpers import ...` works from anywhere; basenames stay unique
all the same, so `-k`, tracebacks and the docs name one file."""
