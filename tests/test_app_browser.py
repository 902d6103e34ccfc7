"""The map app in a real headless Chromium with the network blocked (only 127.0.0.1 reachable).

Checks that Leaflet (served by the app itself) initialised, the raster overlay is on the map,
a clicked grid tile and a drawn rectangle come back to Python, and after a count run the result
layer holds features. Screenshots go to /tmp/skymoe_app_*.png. Skipped where chromium/chromedriver are missing.
"""

from __future__ import annotations

import pytest

from tests.app_harness import shared_app
from tests.browser import chromium_paths, offline_chromium, wait_for

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(600),
    pytest.mark.skipif(chromium_paths() is None, reason="chromium / chromedriver not installed"),
]

MAP = "document.querySelector('[data-leaflet]')"


def _map_data(driver, key: str):
    return driver.execute_script(f"const e = {MAP}; return e ? e.dataset['{key}'] : null;")


def _click_text(driver, tag: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    element = wait_for(lambda: [e for e in driver.find_elements(By.XPATH, f"//{tag}[normalize-space()='{text}']")
                                if e.is_displayed()], 30, what=f"{tag} '{text}'")[0]
    element.click()


def _textbox(driver, label_start: str):
    from selenium.webdriver.common.by import By

    xpath = f"//span[starts-with(normalize-space(), '{label_start}')]/following::textarea[1]"
    return wait_for(lambda: driver.find_element(By.XPATH, xpath), 30, what=f"textbox '{label_start}'")


def _draw_rectangle(driver) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, ".skymoe-draw a").click()
    surface = driver.find_element(By.CSS_SELECTOR, ".skymoe-map")
    ActionChains(driver).move_to_element_with_offset(surface, -60, -40).click_and_hold() \
        .move_by_offset(120, 80).release().perform()


def _click_tile(driver) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    surface = driver.find_element(By.CSS_SELECTOR, ".skymoe-map")
    ActionChains(driver).move_to_element_with_offset(surface, -120, 90).click().perform()


def test_map_offline_overlay_aoi_and_results():
    from selenium.webdriver.common.by import By

    app = shared_app()
    with offline_chromium() as driver:
        driver.get(app.url)
        wait_for(lambda: _map_data(driver, "leaflet") == "ready", 90, what="Leaflet initialised")
        assert driver.execute_script("return typeof window.L === 'object' && L.version") == "1.9.3"
        wait_for(lambda: _map_data(driver, "overlay") == "on", 30, what="raster overlay on the map")
        assert driver.execute_script("return window.skymoeMap.map.hasLayer(window.skymoeMap.layers.overlay)")
        assert driver.execute_script("return window.skymoeMap.layers.grid.getLayers().length") == 6
        driver.save_screenshot("/tmp/skymoe_app_initial.png")

        _click_tile(driver)
        selected = wait_for(lambda: _textbox(driver, "Selected tile").get_attribute("value"), 30,
                            what="clicked grid tile back in Python")
        assert 0 <= int(selected) < 6

        _click_text(driver, "button", "Analyse")
        _draw_rectangle(driver)
        aoi = wait_for(lambda: _textbox(driver, "Area of interest:").get_attribute("value"), 30,
                       what="drawn AOI back in Python")
        west, south, east, north = (float(v) for v in aoi.split(","))
        assert west < east and south < north

        _click_text(driver, "span", "Whole scene")
        query = _textbox(driver, "Query")
        query.clear()
        query.send_keys("small vehicle")
        _click_text(driver, "button", "Run")
        features = wait_for(lambda: int(_map_data(driver, "resultFeatures") or 0), 180, what="result features")
        assert features >= 1
        assert driver.execute_script(
            "return document.querySelector('.skymoe-legend').innerText").startswith("Detections")
        driver.save_screenshot("/tmp/skymoe_app_count.png")

        zoom = driver.execute_script("return window.skymoeMap.map.getZoom()")
        _click_text(driver, "button", "Results")
        cells = wait_for(lambda: [c for c in driver.find_elements(By.XPATH, "//span[normalize-space()='small vehicle']")
                                  if c.is_displayed()][1:], 30, what="a detections row")
        cells[0].click()  # the first shown cell is in the Counts table, the next in Detections
        wait_for(lambda: driver.execute_script("return window.skymoeMap.map.getZoom()") > zoom, 30,
                 what="map zoomed to the clicked detection")
        driver.save_screenshot("/tmp/skymoe_app_results.png")

        _click_text(driver, "button", "Routing")
        _click_text(driver, "button", "Show routing on the selected tile")

        wait_for(lambda: driver.find_elements(By.XPATH, "//img[contains(@src, 'gradio_api/file')]"), 180,
                 what="routing figures")
        driver.save_screenshot("/tmp/skymoe_app_routing.png")
        _click_text(driver, "span", "OpenStreetMap (online)")  # blocked network: says so, no crash
        wait_for(lambda: "unreachable" in driver.find_element(By.CSS_SELECTOR, ".skymoe-map-status").text, 30,
                 what="the offline basemap notice")
        assert _map_data(driver, "overlay") == "on"
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "127.0.0.1" in e["message"]
                  and "favicon" not in e["message"]]
        assert not severe, severe
