"""Tests of bench/: the GPU check script and the growth-vs-scratch comparison, at micro scale on the CPU."""
