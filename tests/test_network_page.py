"""The network page at `/`, looked at in a real browser (headless Chromium driven by selenium).

A live local network: two serving peers, a third serving peer with the gateway (the page's peer), and a
separate SDK client asking one verifier per request. SDK requests are made until there is one the page's peer
executed or verified (it holds the client's signed receipt: the page shows the verdicts and the ranking from
the receipt's signed bid set) and one it only bid on (the page shows the ranking from the signed BidSet the
client sent every bidder, every VRF proof re-checked). A request through the gateway appears with its
re-checked VRF ranking. The test saves a screenshot (docs/network-page.png was taken this
way, with P2PINFER_PAGE_SCREENSHOT=docs/network-page.png).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import trio

from p2pinfer.gateway.network_view import NETWORK_PATH
from p2pinfer.localnet import local_network
from p2pinfer.request.client import AsyncClient

from test_gateway import MODEL_NAME, gateway_peer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MAX_ELECTIONS = 24  # (2/3)^24: the chance that the page's peer is never a mere bidder is about 6e-5
PAGE_WAIT_S = 120  # generous: the machine may be loaded; the page polls every 2 s


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM and CHROMEDRIVER, "install Debian's chromium and chromium-driver (see .ci/run)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 "--disable-gpu", "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


async def test_a_request_made_through_the_sdk_appears_on_the_page_with_its_verdicts(model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    async with local_network([model], peers=2) as net, gateway_peer(net, [model]) as peer:
        async with AsyncClient(bootstrap=net.bootstrap_addrs, verifiers=1) as client:
            client_id = client.node.peer_id
            # Each request is a new election (a new request ID): ask until the page's peer has held each role.
            sdk_result = bid_only = None
            for attempt in range(MAX_ELECTIONS):
                result = await client.generate(model=MODEL_NAME, prompt="import os\nimport sys", max_tokens=8,
                                               temperature=0.7, seed=attempt)
                involved = peer.peer_id == result.executor or peer.peer_id in result.verification.verifiers
                if involved and sdk_result is None:
                    sdk_result = result
                elif not involved and bid_only is None:
                    bid_only = result
                if sdk_result and bid_only:
                    break
            assert sdk_result and bid_only, f"{MAX_ELECTIONS} elections never gave the page's peer both roles"
        via_gateway = await trio.to_thread.run_sync(lambda: httpx.post(
            f"{peer.gateway_url}/v1/completions", timeout=120,
            json={"model": MODEL_NAME, "prompt": "def main(", "max_tokens": 6, "seed": 3}).json())
        missing = await trio.to_thread.run_sync(lambda: httpx.post(
            f"{peer.gateway_url}/v1/completions", timeout=120,
            json={"model": "no-such-model", "prompt": "x", "max_tokens": 2}))
        assert missing.status_code == 404
        gateway_request = via_gateway["p2pinfer"]["request_id"]
        sdk_request = sdk_result.request_id.hex()
        bid_request = bid_only.request_id.hex()
        assert sdk_result.verification.outcome == "accepted"  # one executes, one verifies

        network = (await trio.to_thread.run_sync(lambda: httpx.get(f"{peer.gateway_url}{NETWORK_PATH}"))).json()

        def look() -> dict:
            driver = _browser()
            try:
                driver.get(f"{peer.gateway_url}/")
                wait = WebDriverWait(driver, PAGE_WAIT_S)
                sdk_card = wait.until(lambda d: d.find_element(
                    By.CSS_SELECTOR, f'[data-request-id="{sdk_request}"]'))
                gateway_card = wait.until(lambda d: d.find_element(
                    By.CSS_SELECTOR, f'[data-request-id="{gateway_request}"]'))
                bid_card = wait.until(lambda d: d.find_element(
                    By.CSS_SELECTOR, f'[data-request-id="{bid_request}"]'))
                wait.until(lambda d: d.find_element(By.ID, "sparkline").find_elements(By.TAG_NAME, "polyline"))
                failed = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".request .outcome.model_not_found"))
                failed_text = failed.find_element(By.XPATH, "ancestor::div[@class='request']").text
                # The SDK's client has left: its row goes once the page's peer sees its connection closed.
                wait.until(lambda d: client_id[-6:] not in d.find_element(By.ID, "peer-rows").text)
                out = {
                    "sdk_verdicts": [v.text for v in sdk_card.find_elements(By.CSS_SELECTOR, ".verdict")],
                    "sdk_outcome": sdk_card.find_element(By.CSS_SELECTOR, ".outcome").text,
                    "sdk_text": sdk_card.text,
                    "gateway_election": gateway_card.find_element(By.CSS_SELECTOR, ".election").text,
                    "gateway_dots": len(gateway_card.find_elements(By.CSS_SELECTOR, "svg.ranking circle")),
                    "sdk_election": sdk_card.find_element(By.CSS_SELECTOR, ".election").text,
                    "sdk_dots": len(sdk_card.find_elements(By.CSS_SELECTOR, "svg.ranking circle")),
                    "bid_text": bid_card.text,
                    "bid_election": bid_card.find_element(By.CSS_SELECTOR, ".election").text,
                    "bid_dots": len(bid_card.find_elements(By.CSS_SELECTOR, "svg.ranking circle")),
                    "peers": [row.text for row in driver.find_elements(By.CSS_SELECTOR, "#peer-rows tr")],
                    "balance": driver.find_element(By.ID, "balance").text,
                    "unit": driver.find_element(By.ID, "unit").text,
                    "live": driver.find_element(By.ID, "live").text,
                    "failed": failed_text,
                    "errors": [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"],
                }
                shot = tmp_path / "network-page.png"
                driver.save_screenshot(str(shot))
                out["screenshot"] = shot
                return out
            finally:
                driver.quit()

        seen = await trio.to_thread.run_sync(look)

    # The SDK's request, with the executor and every verdict the quorum counted, and the outcome.
    assert seen["sdk_outcome"] == "accepted"
    assert len(seen["sdk_verdicts"]) == 1 and seen["sdk_verdicts"][0].startswith("accept")
    assert sdk_result.executor[:8] in seen["sdk_text"]
    # The gateway's own request: the ranking re-derived in the peer from the bids, every proof checked.
    assert "VRF proofs checked here, all valid" in seen["gateway_election"]
    assert seen["gateway_dots"] == 3
    # Requests this peer did not send: the ranking from the client's signed bid set, every proof re-checked
    # here, whether it executed, verified or only bid.
    assert "3 VRF proofs checked here, all valid" in seen["sdk_election"] and seen["sdk_dots"] == 3
    assert "3 VRF proofs checked here, all valid" in seen["bid_election"] and seen["bid_dots"] == 3
    assert "you were the bidder" in seen["bid_text"] and "outcome not told" in seen["bid_text"]
    # Peers: the page's own peer marked, the other serving peer with its model and slots.
    assert any("(you)" in row for row in seen["peers"])
    assert not any(client_id[-6:] in row for row in seen["peers"])  # departed clients are dropped
    other = [row for row in seen["peers"] if net.peers[0].peer_id[-6:] in row]
    assert other and MODEL_NAME in other[0] and "connected" in other[0] and "loopback addresses" in other[0]
    # Its own ledger, with units: it earned credits for executing or verifying.
    assert int(seen["balance"]) > 0 and "credits balance" in seen["unit"]
    assert seen["live"].startswith("live")
    assert "no-such-model" in seen["failed"] and "no result: model not found" in seen["failed"]
    assert seen["errors"] == [], seen["errors"]
    assert seen["screenshot"].stat().st_size > 10_000

    # The JSON behind it says the same.
    by_id = {r["request_id"]: r for r in network["requests"]}
    assert by_id[sdk_request]["role"] in ("executor", "verifier") and by_id[sdk_request]["outcome"] == "accepted"
    assert by_id[gateway_request]["election"]["proof"] == "checked"
    assert by_id[sdk_request]["election"]["proof"] == "checked"
    bid_row = by_id[bid_request]
    assert bid_row["role"] == "bidder" and bid_row["via"] == "bid-set" and bid_row["client"] == client_id
    assert bid_row["election"]["proof"] == "checked" and len(bid_row["election"]["ranking"]) == 3
    # the ranking the page shows puts first the executor the client reported
    assert bid_row["election"]["first"] == bid_only.executor
    assert network["ledger"]["unit"] == "credit" and network["ledger"]["credits"] > 0

    target = os.environ.get("P2PINFER_PAGE_SCREENSHOT")
    if target:
        shutil.copyfile(seen["screenshot"], Path(target))


async def test_the_page_escapes_what_peers_say_and_needs_no_key_but_its_data_does(model):
    """The HTML carries no data; with a key, the JSON needs it; the page draws with textContent only."""
    from p2pinfer.gateway.page import PAGE_HTML

    assert "innerHTML" not in PAGE_HTML and "http://" not in PAGE_HTML.replace("http://www.w3.org/2000/svg", "")
    assert "<script src" not in PAGE_HTML and "<link rel=\"stylesheet\"" not in PAGE_HTML
    assert "https://" not in PAGE_HTML  # no CDN: peers may be offline from the web
    async with local_network([model], peers=1) as net, gateway_peer(net, [model], key="s3cret") as peer:
        def fetch() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
            return (httpx.get(f"{peer.gateway_url}/"), httpx.get(f"{peer.gateway_url}{NETWORK_PATH}"),
                    httpx.get(f"{peer.gateway_url}{NETWORK_PATH}", headers={"authorization": "Bearer s3cret"}))

        page, refused, allowed = await trio.to_thread.run_sync(fetch)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert refused.status_code == 401 and allowed.status_code == 200
    assert allowed.json()["peers"][0]["you"] is True
