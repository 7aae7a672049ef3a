"""Drives Ottomato's fleet page in headless Chromium (Debian's chromium and
chromium-driver, through Selenium's WebDriver client).

Usage: ui_check.py URL [SCREENSHOT]. Prints READY after the first checks,
then waits for a line on stdin (the test kills node b), checks that the page
shows it live, then searches and runs a task from the page. Prints OK at the
end; any failure exits non-zero with what the page showed.
"""
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

url = sys.argv[1]
shot = sys.argv[2] if len(sys.argv) > 2 else None
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--window-size=1400,1000"]:
    opts.add_argument(a)
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def text(css):
    return " ".join(e.text for e in d.find_elements(By.CSS_SELECTOR, css))


def wait(pred, what, secs=30):
    deadline = time.time() + secs
    while time.time() < deadline:
        try:
            if pred():
                return
        except Exception:  # the page may be mid-render
            pass
        time.sleep(0.2)
    print(f"FAILED: {what}\n--- page ---\n{d.find_element(By.TAG_NAME, 'body').text}", flush=True)
    sys.exit(1)


def nodes():
    return sorted(e.get_attribute("data-node") for e in d.find_elements(By.CSS_SELECTOR, "#nodes tr[data-node]"))


try:
    d.get(url)
    wait(lambda: text("#conn") == "live", "the page connects to the live stream")
    wait(lambda: "running: 6" in text("#bystatus"), "six workloads running")
    wait(lambda: nodes() == ["a", "b"], "two nodes listed")
    wait(lambda: "never" in text("#failing") and "simulated init failure" in text("#failing"),
         "the failing workload with its reason")
    def leases():
        cells = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#nodes tbody tr td:nth-child(6)")]
        return len(cells) == 2 and all(c.endswith(" s") and float(c[:-2]) > 0 for c in cells)
    wait(leases, "each node's lease time left")
    # A workload's detail, from the failing list.
    # (The table is re-rendered on every summary: find and click in one go.)
    def open_detail():
        d.find_element(By.CSS_SELECTOR, '#failing a[data-id="never"]').click()
        return '"kind": "sim"' in text("#detail") and "init_fail_rate" in text("#detail")
    wait(open_detail, "the failing workload's spec and state in its detail")
    if shot:
        d.save_screenshot(shot)
    print("READY", flush=True)
    sys.stdin.readline()  # the test kills node b now
    wait(lambda: nodes() == ["a"], "node b gone from the page, live")
    wait(lambda: "running: 6" in text("#bystatus") and "b" not in text("#failing td:nth-child(3)"),
         "every workload running again on a")
    wait(lambda: len(d.find_elements(By.CSS_SELECTOR, "#feed tbody tr")) > 0,
         "changes in the live feed")
    # Search by label.
    d.find_element(By.ID, "q").send_keys("site=oslo")
    d.find_element(By.CSS_SELECTOR, "#searchForm button").click()
    wait(lambda: len(d.find_elements(By.CSS_SELECTOR, "#results tbody tr")) == 3, "three oslo workloads found")
    # Run a task from the form.
    d.find_element(By.ID, "tid").clear()  # a click on a workload fills it in
    d.find_element(By.ID, "tid").send_keys("w-1")
    d.find_element(By.ID, "tcmd").send_keys("hello")
    d.find_element(By.CSS_SELECTOR, "#taskForm button").click()
    wait(lambda: "hello from w-1" in text("#taskResult"), "the task result on the page")
    print("OK", flush=True)
finally:
    d.quit()
