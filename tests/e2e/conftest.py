"""End-to-end fixtures: moto's S3 server, the Pushgateway and a Ray cluster, started once per session on free ports.

Without the services the tests skip loudly, unless CI is set: then a missing service fails them.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "runner"))
from runner_helpers import start_moto, start_pushgateway, start_ray, stop  # noqa: E402


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server; AWS_* test credentials are set for s3fs while the session runs."""
    proc, url = start_moto()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield url
    finally:
        stop(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3fs_(s3_endpoint):
    """An s3fs filesystem on the moto server (fresh listings each test)."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.invalidate_cache()
    return fs


@pytest.fixture(scope="session")
def pushgateway():
    proc, url = start_pushgateway()
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def ray_cluster():
    """A one-node Ray cluster on 127.0.0.1: (address, env for a driver that connects to it)."""
    proc, address, env = start_ray()
    try:
        yield address, env
    finally:
        stop(proc)  # `--block` takes its cluster down with it
