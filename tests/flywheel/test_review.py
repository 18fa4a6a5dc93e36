"""The review page in a real headless browser (Debian chromium + chromedriver, Selenium): sign in,
approve, reject, see the decisions persisted in the Lance `reviews` table; plus 401s without a
session, CSRF-protected writes, an escaped <script> caption, ids only in thumbnail URLs, and the
table browser (filter, sort by score, dedup cluster beside its survivor)."""

from __future__ import annotations

import shutil
import threading
import time
from datetime import UTC, datetime

import httpx
import pyarrow as pa
import pytest
from fwtest import flywheel_config

from captioning.testing import free_port
from flywheel.config import load_config
from flywheel.review.app import create_app
from flywheel.schema import QUEUE
from flywheel.store import connect, open_table, read, upsert

XSS = "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned=2\">"


@pytest.fixture
def server(tmp_path, pool, tiny_models):
    import uvicorn

    cfg = load_config(flywheel_config(tmp_path, pool, tiny_models))
    db = connect(cfg.workdir)
    now = datetime.now(UTC)
    items = [dict(item_id=f"item{i}", case_id="case0", kind="pool_item", pool="main", pool_id=pid,
                  text=f"a zebra grazing, photo {i}", category="zebra", source="retrieval:main", similarity=0.5,
                  keep=True, provenance="{}", created_at=now) for i, pid in enumerate(pool["ids"]["zebra"])]
    items.append(dict(item_id="item-xss", case_id="case0", kind="prompt_variant", text=XSS, category="zebra",
                      source="llm:test", provenance="{}", created_at=now))
    upsert(open_table(db, "queue"), pa.Table.from_pylist(items, schema=QUEUE))
    app = create_app(cfg)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", db, cfg
    srv.should_exit = True
    th.join(timeout=10)


def test_unauthenticated_and_csrf(server, pool):
    url, db, _ = server
    for path in ("/queue", "/", f"/thumb/main/{pool['ids']['zebra'][0]}", "/browse/main"):
        r = httpx.get(url + path)
        assert r.status_code == 401 and 'name="token"' in r.text, path
    assert httpx.post(url + "/review", data={"item_id": "item0", "decision": "approve"}).status_code == 401
    c = httpx.Client(base_url=url)
    assert c.post("/login", data={"token": "wrong", "reviewer": "eve"}).status_code == 401
    assert c.post("/login", data={"token": "test-token", "reviewer": "ann"}).status_code == 303
    assert c.post("/review", data={"item_id": "item0", "decision": "approve", "csrf": "forged"}).status_code == 403
    assert open_table(db, "reviews").count_rows() == 0
    # ids only: a path in the id is refused before any lookup; an unknown table is 404
    assert c.get("/thumb/main/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert c.get("/thumb/nosuch/abc").status_code == 404
    r = c.get(f"/thumb/main/{pool['ids']['zebra'][0]}")
    assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"
    page = c.get("/queue").text
    assert XSS not in page and "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in page


def test_browse_filter_sort_and_cluster(server, pool):
    url, _, _ = server
    c = httpx.Client(base_url=url)
    c.post("/login", data={"token": "test-token", "reviewer": "ann"})
    page = c.get("/browse/main", params={"keep": "False", "sort": "clip_score", "order": "desc"}).text
    rejected = [pool["balance_id"], pool["dedup"][0]]
    assert all(i in page for i in rejected) and pool["ids"]["bus"][5] not in page
    dup, survivor = pool["dedup"]
    assert page.index(dup) < page.index(pool["balance_id"])  # the copy has the higher clip_score
    assert f'/thumb/main/{survivor}' in page  # the survivor beside its duplicate
    cluster = c.get(f"/cluster/main/{survivor}").text
    assert dup in cluster
    caps = c.get("/browse/main_captions", params={"caption_status": "ok"})
    assert caps.status_code == 200 and "a red bus on a double road, photo 0" in caps.text  # caption_general en.short
    assert c.get(f"/thumb/main_captions/{pool['ids']['zebra'][0]}").status_code == 200


def test_browser_sign_in_approve_reject_persisted(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian chromium + chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    def click(selector: str, by=By.CSS_SELECTOR) -> None:  # a form post: wait for the next page
        el = driver.find_element(by, selector)
        el.click()
        WebDriverWait(driver, 30).until(ec.staleness_of(el))

    url, db, _ = server
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(url + "/queue")
        assert driver.find_elements(By.ID, "token")  # the sign-in page
        driver.find_element(By.ID, "reviewer").send_keys("ann")
        driver.find_element(By.ID, "token").send_keys("test-token")
        click("signin", By.ID)
        assert "/queue" in driver.current_url
        assert driver.execute_script("return window.pwned === undefined")
        xss = driver.find_element(By.ID, "item-item-xss").find_element(By.CLASS_NAME, "text")
        assert xss.text == XSS  # shown as text
        imgs = driver.find_elements(By.CSS_SELECTOR, "#item-item0 img")
        assert imgs and driver.execute_script("return arguments[0].naturalWidth", imgs[0]) > 0
        click("#item-item0 .approve-btn")
        click("#item-item1 .reject-btn")
        # "open" hides decided items; show all and see the decisions on the page
        driver.get(url + "/queue?status=all")
        assert "approved by ann" in driver.find_element(By.ID, "item-item0").text
        assert "rejected by ann" in driver.find_element(By.ID, "item-item1").text
        got = {r["item_id"]: (r["decision"], r["reviewer"]) for r in read(open_table(db, "reviews")).to_pylist()}
        assert got == {"item0": ("approve", "ann"), "item1": ("reject", "ann")}
        version = open_table(db, "reviews").version
        click("#item-item0 .approve-btn")  # again: idempotent
        assert open_table(db, "reviews").version == version
        driver.get(url + "/queue?status=open")
        click("reject-page", By.ID)  # the rest of the page at once
        assert read(open_table(db, "reviews"), ["item_id", "decision"], "item_id = 'item-xss'")["decision"].to_pylist() == ["reject"]
    finally:
        driver.quit()
