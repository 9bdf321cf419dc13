"""What the tests share (test code, not part of the package).

Two kinds of thing live here, and each is reached one way:

* fixtures -- the shared worlds (an S3 endpoint, a local Ray, the tiny encoders, the finished
  smoke run) and the reliability ledger -- live in the plugin modules that tests/conftest.py
  lists in ``pytest_plugins``; a test names the fixture as an argument and never imports it;
* plain helpers (tar and dataset writers, the smoke spec, the ``t2i`` subprocess, the trained
  run writer, fault injection, the local Ray cluster) are imported package-qualified:
  ``from tests.support.data import write_tar``.

A fixture that only one folder uses lives in that folder's conftest.py; one that only one module
uses stays in the module.
"""
