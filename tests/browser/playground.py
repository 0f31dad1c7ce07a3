#!/usr/bin/env python3
"""The playground (`GET /`) in a real browser: Debian's `chromium`, headless, driven by
Playwright (from PyPI; Playwright's own browser download is never used). Starts the server
binary with an API key and a SQLite log, then, as a person would: enters the key, generates
through the job API and watches the per-step progress, sees the image, rates it and finds the
rating in `GET /generations/{id}` and in the page's history; videos (GIF and MP4) play; a
running job is cancelled; an API error is shown; generation works from the keyboard alone; a
390x844 phone screen has no horizontal scroll. Exits non-zero on the first failure.

Usage: playground.py PATH/TO/fewstep [--chromium PATH] [--screenshot docs/playground.png]
(run from the repository root; see .ci/run)
"""

import argparse
import json
import os
import re
import shutil
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "clients"))
from check_clients import check, serving  # noqa: E402

from playwright.sync_api import expect, sync_playwright  # noqa: E402

KEY = "playground-test-key"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}

# Every text the status line shows, recorded as it changes: a few-step job can finish between
# two polls of the DOM, so the test reads this log instead of racing the page.
WATCH_STATUS = """
window.__statuses = [];
new MutationObserver(() => {
  const s = document.getElementById("status");
  if (s && window.__statuses.at(-1) !== s.textContent) window.__statuses.push(s.textContent);
}).observe(document, { subtree: true, childList: true, characterData: true });
"""


def api(base, path):
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def watch(page, problems):
    """Collects script errors and CSP violations (a 401 the page expects is not one)."""
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on(
        "console",
        lambda m: m.type == "error"
        and not m.text.startswith("Failed to load resource")
        and problems.append(f"console: {m.text}"),
    )


def generation_id(page):
    return page.locator("#results-meta").inner_text().split(" · ")[0]


def wait_for_images(page, count, size=32):
    page.wait_for_function(
        """([count, size]) => {
            const imgs = [...document.querySelectorAll("#results img")];
            return imgs.length === count && imgs.every((i) => i.complete && i.naturalWidth === size);
        }""",
        arg=[count, size],
    )


def check_no_overflow(page, where):
    """Nothing sticks out of the page or out of a result card."""
    widths = page.evaluate(
        """() => ({
            page: Math.max(document.documentElement.scrollWidth, document.body.scrollWidth),
            viewport: window.innerWidth,
            cards: [...document.querySelectorAll("#results .result")].map((c) => c.scrollWidth - c.clientWidth),
        })"""
    )
    check(widths["page"] <= widths["viewport"], f"{where}: horizontal scroll {widths}")
    check(all(d <= 0 for d in widths["cards"]), f"{where}: a result card overflows {widths}")
    return widths


def generate(page, *, model=None, prompt, steps=None, frames=None, fmt=None, n=None, seed=None):
    if model:
        page.get_by_label("Model", exact=True).select_option(model)
    if steps:
        page.get_by_label("Steps", exact=True).select_option(str(steps))
    if frames:
        page.get_by_label("Frames", exact=True).select_option(str(frames))
    if fmt:
        page.get_by_label("Format", exact=True).select_option(fmt)
    if n:
        page.get_by_label("Outputs (n)", exact=True).fill(str(n))
    page.get_by_label("Seed", exact=True).fill("" if seed is None else str(seed))
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_role("button", name="Generate").click()


def key_and_first_image(page, base):
    page.goto(base + "/")
    # The server has keys: the page says so and asks for one.
    expect(page.locator("#error")).to_contain_text("missing_api_key")
    expect(page.locator("#key-note")).to_have_text("This server needs an API key.")
    expect(page.locator("#api-key")).to_be_focused()
    page.locator("#api-key").fill("wrong-key")
    page.locator("#api-key").press("Enter")
    expect(page.locator("#error")).to_contain_text("invalid_api_key")
    expect(page.locator("#key-note")).to_have_text("The server refused this API key.")
    page.locator("#api-key").fill(KEY)
    page.locator("#api-key").press("Enter")
    expect(page.locator("#error")).to_be_hidden()
    # Defaults come from the chosen model's card.
    expect(page.get_by_label("Model", exact=True)).to_have_value("tiny-shapes")
    expect(page.get_by_label("Steps", exact=True)).to_have_value("4")
    page.get_by_label("Model", exact=True).select_option("tiny-shapes-teacher")
    expect(page.get_by_label("Steps", exact=True)).to_have_value("20")
    expect(page.get_by_label("Guidance", exact=True)).to_have_value("3")

    generate(page, prompt="a red circle", steps=40, seed=7)
    wait_for_images(page, 1)
    steps = [
        int(m.group(1))
        for s in page.evaluate("window.__statuses")
        if (m := re.match(r"Step (\d+) of 40\b", s))
    ]
    check(any(0 < k < 40 for k in steps), f"no live progress seen: {page.evaluate('window.__statuses')}")
    expect(page.locator("#status")).to_contain_text("Done: 1 output")
    expect(page.locator("#bar")).to_have_attribute("value", "100")
    card = page.locator("#results .result").first
    expect(card.locator(".seed")).to_have_text("7")
    version = api(base, "/v1/models/tiny-shapes-teacher")["version"]
    expect(card).to_contain_text(f"tiny-shapes-teacher @ {version[:12]}")
    expect(card).to_contain_text("denoise")
    gid = generation_id(page)
    check(gid.startswith("gen_"), f"generation id {gid!r}")

    # Rate it: 4 of 5, then thumbs up; each is saved and shown as saved.
    card.get_by_role("button", name="4 of 5").click()
    expect(card.locator(".saved")).to_have_text("Saved: 4 of 5.")
    card.get_by_role("button", name="Thumbs up for output 1").click()
    expect(card.locator(".saved")).to_have_text("Saved: 4 of 5, thumbs up.")
    feedback = api(base, f"/generations/{gid}")["feedback"]
    check(
        [(f["output_index"], f["score"], f["thumbs"]) for f in feedback]
        == [(0, 0.75, None), (0, 0.75, "up")],
        f"feedback in the log: {feedback}",
    )
    # The history reads it back from the server.
    entry = page.locator(f'#history li[data-id="{gid}"]')
    expect(entry).to_contain_text("a red circle")
    expect(entry).to_contain_text("#1: 4 of 5, thumbs up (2 ratings logged)")
    print(f"desktop: key, progress ({len(set(steps))} distinct steps shown), image, rating in {gid}: ok")
    return gid


def videos(page):
    generate(page, model="tiny-shapes", prompt="a green square moving right", frames=8, seed=3)
    wait_for_images(page, 1)
    expect(page.locator("#results .result").first).to_contain_text("image/gif, 32×32, 8 frames")
    generate(page, prompt="a green square moving right", frames=8, fmt="mp4", seed=3)
    page.wait_for_function(
        """() => {
            const v = document.querySelector("#results video");
            return v && v.readyState >= 2 && v.videoWidth === 32;
        }"""
    )
    page.wait_for_function("() => document.querySelector('#results video').currentTime > 0")
    print("videos: GIF shown, MP4 plays: ok")


def cancel_and_errors(page, base):
    with page.expect_response(lambda r: r.url.endswith("/generate")) as accepted:
        generate(page, model="tiny-shapes-teacher", prompt="a blue square", steps=50, frames=8, n=8)
    check(accepted.value.status == 202, f"POST /generate answered {accepted.value.status}")
    job = accepted.value.json()["id"]
    expect(page.locator("#status")).to_contain_text("Step ", timeout=30_000)
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#status")).to_have_text("Cancelled.")
    expect(page.get_by_role("button", name="Cancel")).to_be_hidden()
    check(api(base, f"/jobs/{job}")["state"] == "cancelled", "the job is cancelled server-side")

    # The API's problem+json, shown with its title, detail and code.
    page.get_by_label("Prompt", exact=True).fill("a red circle " * 50)
    page.get_by_role("button", name="Generate").click()
    error = page.get_by_role("alert")
    expect(error).to_have_text(re.compile(r"^Bad Request \(400\) .*\b500\b.*prompt_too_long$"))
    expect(error).to_be_in_viewport()
    print(f"cancel ({job}) and a 400 shown: ok")


def keyboard_only(page):
    page.reload()
    expect(page.get_by_label("Model", exact=True)).to_have_value("tiny-shapes-teacher")
    page.get_by_label("Model", exact=True).select_option("tiny-shapes")
    page.evaluate("document.activeElement.blur()")
    order = []
    for _ in range(6):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
        if order[-1] == "prompt":
            break
    check(order[-1] == "prompt", f"Tab never reached the prompt: {order}")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    check(outline not in ("", "none"), f"no visible focus on the prompt ({outline})")
    before = page.locator("#results-meta").inner_text()
    page.keyboard.type("a yellow triangle")
    page.keyboard.press("Enter")
    expect(page.locator("#results-meta")).not_to_have_text(before)
    wait_for_images(page, 1)
    first = generation_id(page)
    # Ctrl+Enter from a field where Enter does not submit (a select).
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    check(page.evaluate("document.activeElement.id") == "model", "Tab order: prompt, negative, model")
    page.keyboard.press("Control+Enter")
    expect(page.locator("#results-meta")).not_to_contain_text(first)
    wait_for_images(page, 1)
    # Rating from the keyboard: focus the first star, Enter.
    page.locator("#results .star").first.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#results .saved").first).to_have_text("Saved: 1 of 5.")
    print(f"keyboard only: Tab order {order}, Enter, Ctrl+Enter, rating: ok")


def phone(browser, base, storage):
    context = browser.new_context(
        viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True, storage_state=storage
    )
    page = context.new_page()
    problems = []
    watch(page, problems)
    page.goto(base + "/")
    expect(page.get_by_label("Model", exact=True)).to_have_value("tiny-shapes")
    generate(page, prompt="a small red circle on the left", n=4, seed=11)
    wait_for_images(page, 4)
    expect(page.locator("#history li.entry").first).to_be_visible()
    widths = check_no_overflow(page, "phone")
    box = page.get_by_role("button", name="Generate").bounding_box()
    check(box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], f"Generate at {box}")
    check(not problems, f"phone: {problems}")
    context.close()
    print(f"phone 390x844: no horizontal scroll (scroll width {widths['page']}): ok")


def desktop_grid(page, screenshot):
    """Four outputs side by side fit their cards; optionally the README's screenshot."""
    page.set_viewport_size({"width": 1280, "height": 1000})
    generate(page, model="tiny-shapes", prompt="a small red circle on the left", n=4, seed=11, frames=1)
    wait_for_images(page, 4)
    card = page.locator("#results .result").first
    card.get_by_role("button", name="5 of 5").click()
    expect(card.locator(".saved")).to_contain_text("Saved")
    expect(page.locator("#history li.entry").first).to_contain_text("#1: 5 of 5")
    check_no_overflow(page, "desktop")
    print("desktop: four outputs fit: ok")
    if screenshot:
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=screenshot, type="png", animations="disabled", caret="hide")
        print(f"screenshot: {screenshot} ({os.path.getsize(screenshot)} bytes)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?", default=os.path.join(ROOT, "target/debug/fewstep"))
    ap.add_argument("--chromium", default=shutil.which("chromium"), help="the browser to drive")
    ap.add_argument("--screenshot", help="also save a desktop screenshot after a generation")
    args = ap.parse_args()
    check(args.chromium, "no chromium: install Debian's (tools/chromium.sh)")
    start = time.monotonic()
    server = serving(
        args.binary,
        models="tiny-shapes,tiny-shapes-teacher",
        env_extra={"FEWSTEP_API_KEYS": f"[{KEY}]"},
    )
    with server as (base, _), sync_playwright() as p:
        # Root in a container: Chromium's sandbox needs user namespaces it may not have.
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        context = browser.new_context(viewport=DESKTOP)
        # Generous: the debug server shares the machine with whatever else CI runs.
        context.set_default_timeout(30_000)
        expect.set_options(timeout=30_000)
        context.add_init_script(WATCH_STATUS)
        page = context.new_page()
        problems = []
        watch(page, problems)
        key_and_first_image(page, base)
        videos(page)
        cancel_and_errors(page, base)
        keyboard_only(page)
        desktop_grid(page, args.screenshot and os.path.abspath(args.screenshot))
        check(not problems, f"desktop: {problems}")
        phone(browser, base, context.storage_state())
        browser.close()
    print(f"playground in chromium: ok ({time.monotonic() - start:.1f} s)")


if __name__ == "__main__":
    main()
