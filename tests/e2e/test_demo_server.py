"""What `make run` does, as whole processes: `tessera demo`, then `tessera serve` on the embedded SQLite
file of a fresh directory, then the README's two demo queries over real HTTP."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

TESSERA = Path(sys.executable).with_name("tessera")
STARTUP_LIMIT = 20.0  # seconds for the server to answer /healthz
IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Mobile/15E148 Safari/604.1"
)
CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)

HOME_HERO = """
query HomeHero($viewer: ViewerInput) {
  placement(key: "home-hero", viewer: $viewer) {
    key
    blocks { key variant fields decision { variant reason rule flag trace } }
  }
}
"""


def user_env() -> dict[str, str]:
    """A shell with no TESSERA_* settings: the embedded default, ./tessera.db."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def demo_keys(directory: Path) -> dict[str, str]:
    """Run `tessera demo` in ``directory``; the keys it prints, by scope."""
    result = subprocess.run(
        [TESSERA, "demo"], cwd=directory, env=user_env(), capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo shop imported" in result.stdout
    keys = dict(re.findall(r"^\s+(delivery|preview|admin|ingest)\s+(tess_\S+)$", result.stdout, re.MULTILINE))
    assert set(keys) == {"delivery", "preview", "admin", "ingest"}, result.stdout
    return keys


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The demo served from a fresh directory: (base URL, keys). The server is always stopped."""
    if not TESSERA.exists():
        pytest.fail(f"the tessera console script is missing at {TESSERA}: install the project (make install)")
    keys = demo_keys(tmp_path)
    assert (tmp_path / "tessera.db").exists()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [TESSERA, "serve", "--no-migrate", "--port", str(port)],
            cwd=tmp_path,
            env=user_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_healthy(server, base, log_path)
        yield base, keys
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def wait_until_healthy(server: subprocess.Popen[bytes], base: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_LIMIT
    while True:
        try:
            response = httpx.get(f"{base}/healthz", timeout=0.5)
        except httpx.TransportError:  # not listening yet
            pass
        else:
            assert response.status_code == 200, response.text
            assert response.json()["database"] == "ok"
            return
        if time.monotonic() > deadline:
            pytest.fail(f"tessera serve did not answer /healthz within {STARTUP_LIMIT} s:\n{log.read_text()}")
        try:  # between tries, wait on the one event that makes trying again pointless: the server exiting
            code = server.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"tessera serve exited with {code}:\n{log.read_text()}")


def home_hero(base: str, key: str, viewer: dict[str, Any] | None, user_agent: str) -> dict[str, Any]:
    response = httpx.post(
        f"{base}/graphql",
        json={"query": HOME_HERO, "variables": {"viewer": viewer}},
        headers={"Authorization": f"Bearer {key}", "User-Agent": user_agent},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    [block] = body["data"]["placement"]["blocks"]
    assert block["key"] == "hero-main"
    return dict(block)


def test_the_demo_serves_different_variants_to_different_viewers(demo: tuple[str, dict[str, str]]) -> None:
    base, keys = demo
    delivery = keys["delivery"]

    # A gold-tier user on a phone, the device said outright or read from the User-Agent
    gold_mobile = home_hero(base, delivery, {"userId": "u-ada", "device": "MOBILE"}, CHROME_WINDOWS)
    gold_iphone = home_hero(base, delivery, {"userId": "u-ada"}, IPHONE)
    # and an anonymous visitor on a desktop.
    anonymous = home_hero(base, delivery, {"anonymousId": "a-7f3c"}, CHROME_WINDOWS)

    assert gold_mobile == gold_iphone
    assert gold_mobile["variant"] == "gold-mobile"
    assert gold_mobile["fields"]["title"] == "Your gold offer"
    assert (gold_mobile["decision"]["rule"], gold_mobile["decision"]["flag"]) == ("gold-mobile", "new-hero-rules")
    assert anonymous["variant"] == "default"
    assert anonymous["fields"]["title"] == "Welcome to the shop"
    assert anonymous["decision"]["reason"] == "DEFAULT"
    for block in (gold_mobile, anonymous):
        assert block["decision"]["trace"], "every decision says why"
        assert all(isinstance(line, str) and line for line in block["decision"]["trace"])
    assert gold_mobile["decision"]["trace"] != anonymous["decision"]["trace"]


def test_the_demo_server_refuses_requests_without_a_valid_key(demo: tuple[str, dict[str, str]]) -> None:
    base, keys = demo
    query = {"query": HOME_HERO}

    missing = httpx.post(f"{base}/graphql", json=query, timeout=10)
    wrong = httpx.post(f"{base}/graphql", json=query, headers={"Authorization": "Bearer tess_nope"}, timeout=10)
    admin_key_on_delivery = httpx.post(
        f"{base}/graphql", json=query, headers={"Authorization": f"Bearer {keys['admin']}"}, timeout=10
    )

    assert (missing.status_code, wrong.status_code, admin_key_on_delivery.status_code) == (401, 401, 403)
    assert missing.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert admin_key_on_delivery.json()["errors"][0]["extensions"]["code"] == "FORBIDDEN"
