import contextlib
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")

from aiayn.data.corpus import ASSETS  # noqa: E402
from aiayn.serve.app import create_app  # noqa: E402
from aiayn.serve.models import Limits, load_models  # noqa: E402


@pytest.fixture(scope="session")
def shipped_models():
    """The shipped en->de and Shakespeare models, loaded once for every serve test."""
    return load_models(ASSETS / "models" / "en-de", ASSETS / "models" / "shakespeare-char")


@pytest.fixture(scope="module")
def client(shipped_models):
    from fastapi.testclient import TestClient

    with TestClient(create_app(shipped_models, Limits(max_chars=2000, max_texts=8)),
                    raise_server_exceptions=False) as c:
        yield c


@contextlib.contextmanager
def serving(app):
    """`app` on a real socket of 127.0.0.1 (uvicorn in a thread) -> its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(600):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def live_app(shipped_models):
    return create_app(shipped_models)


@pytest.fixture(scope="module")
def live_server(live_app):
    with serving(live_app) as url:
        yield url
