"""Runner test fixtures: helpers on sys.path; the tiny model comes from tests/conftest.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
