"""The project's tests; the folders mirror the package tree (tests/data tests data/, ...). Shared builders live in
helpers.py, growth_pairs.py, hf_pairs.py, relabel.py and conftest.py; no test module imports another."""
