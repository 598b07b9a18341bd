"""Tests of transfer/: the growth operators, the Hugging Face format and the checks' facade."""
