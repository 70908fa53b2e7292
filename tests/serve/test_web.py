"""The web page served by `openmedgemma serve`, in headless Chromium (Debian's) against a real nano server.

One server and one browser per module; each test opens the page in a fresh browser context (empty
storage). The page's Content-Security-Policy forbids eval, so waits go through selectors and `expect`,
not `wait_for_function` strings. The nano model's words are meaningless: the tests check the page's
behaviour. Where a test must watch an answer stream (or stop it), `force_long_answers` adds the server's
`ignore_eos` extension to the page's requests, so the answer runs to the page's max tokens whatever nano
would say (retraining nano must not break these tests).
"""

from __future__ import annotations

import base64
import fnmatch
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from tests.serve.web_conftest import (  # noqa: F401  (fixtures)
    EXAMPLES, REPO_ROOT, browser, corrupt_dicom, ct_series_zip, new_page, start_server, stop_server, web,
    web_server,
)

WEB_DIR = REPO_ROOT / "src" / "openmedgemma" / "serve" / "web"
CXR = EXAMPLES / "cxr_nih_00000001_000.png"
CT = EXAMPLES / "CT_small.dcm"
# Temperature-2 sampling with fixed seeds: the page's Seed setting reaches the server (regenerate repeats words).
SEEDS = {"cxr": 8, "long": 20}
LONG_QUESTION = "Describe the findings"

XSS = [
    '<img src=x onerror="window.__xss = 1">',
    "<script>window.__xss = 2</script>",
    '<svg onload="window.__xss = 3"></svg>',
    '<a href="javascript:window.__xss = 4">click me</a>',
    "[markdown link](javascript:window.__xss=5)",
    '<iframe srcdoc="<script>parent.__xss = 6</script>"></iframe>',
]
# No script-capable markup inside a message, however it got there.
# (The page's own <img class="preview"> shows the server's PNG of an attachment.)
DANGEROUS = ("script, iframe, svg, object, embed, img:not(.preview), [onerror], [onload], [onclick], "
             "a[href^='javascript']")


def png_pixels(data_uri: str) -> np.ndarray:
    assert data_uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))).convert("RGB"))


def settings(page, *, temperature: str = "0", seed: str = "", max_tokens: str = "512") -> None:
    page.fill("#temperature", temperature)
    page.fill("#seed", seed)
    page.fill("#max-tokens", max_tokens)


def drop_file(page, name: str, data: bytes, mime: str = "") -> None:
    """Drags a file onto the page and drops it, as from a file manager (which gives DICOM no type)."""
    transfer = page.evaluate_handle("""([name, b64, mime]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: mime}));
        return transfer;
    }""", [name, base64.b64encode(data).decode(), mime])
    page.dispatch_event("#messages", "dragenter", {"dataTransfer": transfer})
    assert page.is_visible("#drop-overlay")
    page.dispatch_event("#messages", "drop", {"dataTransfer": transfer})
    assert page.is_hidden("#drop-overlay")


def watch_answers(page) -> None:
    """Records (state, text length) of the last answer at every DOM change, to see it stream in."""
    page.evaluate("""() => {
        window.__snapshots = [];
        new MutationObserver(() => {
            const answers = document.querySelectorAll('.message.assistant');
            const last = answers[answers.length - 1];
            if (last) window.__snapshots.push([last.dataset.state, last.querySelector('.answer').textContent.length]);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, attributes: true,
                                                         characterData: true});
    }""")


def test_page_loads_offline_with_notice_and_labelled_controls(web, web_server):
    page = web.page
    notice = page.inner_text("#notice")
    assert "Not for clinical use" in notice
    assert "medgemma-nano" in notice and "tiny demonstration model" in notice
    assert "Nothing is saved" in page.inner_text("#privacy-note")
    # Chat models only in the model list (the embedding model is served too).
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["medgemma-nano"]
    # Everything the page loaded came from our server: no CDN, no web font.
    assert web.requests and all(url.startswith(web_server.url + "/") for url in web.requests), web.requests
    # The browser is told so too: scripts only from here, none inline, no eval, no outside images.
    import urllib.request

    with urllib.request.urlopen(web_server.url + "/", timeout=10) as response:
        policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "unsafe" not in policy and "img-src 'self' data: blob:;" in policy
    # Every control has an accessible name (a <label>, aria-label or its text).
    unnamed = page.evaluate("""() => [...document.querySelectorAll('button, input, select, textarea')]
        .filter(e => !((e.labels && e.labels.length) || e.getAttribute('aria-label') || e.textContent.trim()))
        .map(e => e.outerHTML)""")
    assert unnamed == []


def force_long_answers(page) -> None:
    """Add `ignore_eos: true` to the page's chat requests (all else as the page sent it)."""
    def handle(route):
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

    page.route("**/v1/chat/completions", handle)


def test_cxr_question_streams_answer_with_preview(web):
    page = web.page
    force_long_answers(page)
    settings(page, temperature="2", seed=str(SEEDS["cxr"]), max_tokens="96")
    page.set_input_files("#file-input", str(CXR))
    preview = page.wait_for_selector("#attachments img.preview:not([hidden])")
    # What the model sees: the 512x512 X-ray as RGB, at its size before the model's resize.
    assert page.evaluate("img => [img.naturalWidth, img.naturalHeight]", preview) == [512, 512]
    preview_src = preview.get_attribute("src")
    seen = png_pixels(preview_src)
    source = np.asarray(Image.open(CXR).convert("RGB"))
    assert np.array_equal(seen, source)  # an 8-bit PNG X-ray goes to the model unchanged
    assert "512x512 RGB" in page.inner_text("#attachments")

    page.click("#prompt")
    page.keyboard.type("What does this")
    page.keyboard.press("Shift+Enter")  # a new line, not a send
    page.keyboard.type("chest X-ray show?")
    assert page.input_value("#prompt") == "What does this\nchest X-ray show?"
    assert page.locator(".message").count() == 0
    watch_answers(page)
    page.keyboard.press("Enter")

    answer = page.wait_for_selector(".message.assistant[data-state='done']", timeout=60_000)
    text = answer.query_selector(".answer").inner_text()
    snapshots = page.evaluate("window.__snapshots")
    partial = [length for state, length in snapshots if state == "streaming" and 0 < length < len(text)]
    assert partial, f"the answer never showed partly streamed ({snapshots[-5:]})"
    assert int(answer.get_attribute("data-chunks")) > 1
    assert text.strip()
    user = page.locator(".message.user")
    assert user.inner_text().count("chest X-ray show?") == 1
    assert "cxr_nih_00000001_000.png" in user.inner_text()
    assert user.locator("img.preview").get_attribute("src") == preview_src
    # Regenerate replaces the answer (same seed: the same words again).
    page.click("#regenerate")
    page.wait_for_selector(".message.assistant[data-state='done']", timeout=60_000)
    assert page.locator(".message.assistant").count() == 1
    assert page.locator(".message.assistant .answer").inner_text() == text


def test_dicom_ct_preview_follows_the_preset(web):
    page = web.page
    drop_file(page, "CT_small.dcm", CT.read_bytes())
    preview = page.locator("#attachments img.preview")
    page.wait_for_selector("#attachments img.preview[data-preset='medgemma']")
    medgemma = png_pixels(preview.get_attribute("src"))
    assert medgemma.shape == (128, 128, 3)
    page.select_option("#ct-preset", "report-v4")
    page.wait_for_selector("#attachments img.preview[data-preset='report-v4']")
    report_v4 = png_pixels(preview.get_attribute("src"))
    # The presets differ only in the R window (-1024..1024 vs -1225..1025 HU); G and B are the same.
    assert not np.array_equal(medgemma[..., 0], report_v4[..., 0])
    assert np.array_equal(medgemma[..., 1:], report_v4[..., 1:])
    assert not np.array_equal(medgemma[..., 0], medgemma[..., 1])  # R, G, B are different windows

    # A zipped series: the sampled slices as one contact sheet, in SLICE order.
    page.click("#attachments .remove")
    series = {"name": "series.zip", "mimeType": "application/zip", "buffer": ct_series_zip(4)}
    page.set_input_files("#file-input", files=[series])
    page.wait_for_selector("#attachments img.preview:not([hidden])")
    assert "4 slices" in page.inner_text("#attachments")
    sheet = png_pixels(page.locator("#attachments img.preview").get_attribute("src"))
    assert sheet.shape == (256, 256, 3)  # 2 x 2 tiles of 128 x 128
    tiles = [sheet[r:r + 128, c:c + 128] for r in (0, 128) for c in (0, 128)]
    assert all(not np.array_equal(a, b) for a, b in zip(tiles, tiles[1:]))


def test_stop_cancels_the_answer_on_the_server(web, web_server):
    page = web.page
    force_long_answers(page)
    settings(page, temperature="2", seed=str(SEEDS["long"]), max_tokens="1500")
    page.fill("#prompt", LONG_QUESTION)
    page.press("#prompt", "Enter")
    page.wait_for_selector(".message.assistant[data-state='streaming']:not([data-chunks='0'])")
    assert web_server.gauge("openmedgemma_requests_running") == 1, (
        "the answer already ended before Stop could be pressed")
    assert page.is_enabled("#stop") and page.is_disabled("#send")
    page.click("#stop")
    answer = page.wait_for_selector(".message.assistant[data-state='stopped']")
    assert "stopped" in answer.inner_text()
    web_server.wait_gauge("openmedgemma_requests_running", 0)  # the closed stream freed its slot
    assert page.is_enabled("#send") and page.is_disabled("#stop")

    # Several conversations: a new one starts empty, the stopped one is still there.
    page.click("#new-conversation")
    assert page.locator(".message").count() == 0
    assert page.locator("#conversation-list li").count() == 2
    page.click("#conversation-list li:nth-child(2) .open")
    assert page.locator(".message.assistant[data-state='stopped']").count() == 1


def test_corrupt_dicom_shows_a_readable_error(web):
    page = web.page
    broken = {"name": "broken.dcm", "mimeType": "application/dicom", "buffer": corrupt_dicom()}
    page.set_input_files("#file-input", files=[broken])
    alert = page.wait_for_selector("#attachments [role='alert']")
    message = alert.inner_text()
    assert "pixel data" in message and "Traceback" not in message
    # Sent anyway, the server's 400 shows next to the answer, and the page keeps working.
    page.fill("#prompt", "What is this?")
    page.click("#send")
    error = page.wait_for_selector(".message.assistant[data-state='error'] [role='alert']")
    assert "pixel data" in error.inner_text()
    assert page.is_enabled("#send") and page.is_enabled("#regenerate")
    # The failed exchange is left out of the next request, so the conversation goes on.
    page.fill("#prompt", "Is the heart enlarged?")
    page.click("#send")
    page.wait_for_selector(".message.assistant:nth-of-type(4)[data-state='done']", timeout=60_000)
    assert page.locator(".message.assistant[data-state='error']").count() == 1


def test_xss_payloads_stay_inert(web):
    page = web.page
    payload = " ".join(XSS)
    # In a file name and in the user's own text, through the real server.
    cxr = {"name": f'{XSS[0]}.png', "mimeType": "image/png", "buffer": CXR.read_bytes()}
    page.set_input_files("#file-input", files=[cxr])
    page.wait_for_selector("#attachments img.preview:not([hidden])")
    page.fill("#prompt", payload)
    page.press("#prompt", "Enter")
    page.wait_for_selector(".message.assistant[data-state='done']", timeout=60_000)
    user_text = page.inner_text(".message.user")
    assert XSS[0] in user_text and XSS[1] in user_text  # shown as the text it is

    # In the model's answer and thinking: nano cannot be made to write them, so this one stream comes
    # from the browser's network layer; the page parses, renders and sanitises it as any other.
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    for piece in [payload[i:i + 7] for i in range(0, len(payload), 7)]:
        chunks.append({"choices": [{"index": 0, "delta": {"reasoning_content": piece}}]})
        chunks.append({"choices": [{"index": 0, "delta": {"content": piece}}]})
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    page.click("#regenerate")
    thinking = page.wait_for_selector(".message.assistant[data-state='done'] .thinking")
    assert thinking.get_attribute("open") is None  # collapsed until asked for
    page.click(".message.assistant .thinking summary")  # open it: its Markdown is rendered too
    for link in page.locator(".message a").all():
        link.click(no_wait_after=True)
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None
    assert page.locator(f"body :is({DANGEROUS})").count() == 0  # messages, file names, conversation titles
    assert "click me" in page.inner_text(".message.assistant .answer")
    page.uncheck("#show-thinking")
    assert not thinking.is_visible()
    sources = page.eval_on_selector_all("img.preview", "images => images.map(i => i.getAttribute('src'))")
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)


def test_reload_keeps_nothing_unless_opted_in(web):
    page = web.page
    page.set_input_files("#file-input", str(CXR))
    page.wait_for_selector("#attachments img.preview:not([hidden])")
    page.fill("#prompt", "Is the heart enlarged?")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".message.assistant[data-state='done']", timeout=60_000)
    storage = "() => [localStorage.length, sessionStorage.length, document.cookie]"
    assert page.evaluate(storage) == [0, 0, ""]
    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    assert page.locator(".message").count() == 0
    assert page.locator("#conversation-list li").count() == 1
    assert page.evaluate(storage) == [0, 0, ""]

    # Opt in: the text survives a reload, the image does not.
    page.check("#persist")
    page.set_input_files("#file-input", str(CXR))
    page.wait_for_selector("#attachments img.preview:not([hidden])")
    page.fill("#prompt", "Is the heart enlarged?")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".message.assistant[data-state='done']", timeout=60_000)
    kept = page.evaluate("() => localStorage.getItem('openmedgemma.conversations')")
    assert "Is the heart enlarged?" in kept and "base64" not in kept
    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    assert page.is_checked("#persist")
    assert "Is the heart enlarged?" in page.inner_text(".message.user")
    assert "image not kept" in page.inner_text(".message.user")
    page.uncheck("#persist")  # opting out forgets at once
    assert page.evaluate(storage) == [0, 0, ""]


def test_api_key_is_asked_for_and_used(browser):
    server = start_server("--api-key", "s3cret-key")
    server.api_key = "s3cret-key"
    context, web = new_page(browser, server)
    try:
        import urllib.error
        import urllib.request

        for path in ("/", "/static/js/app.js", "/static/vendor/purify.min.js"):  # the page needs no key
            with urllib.request.urlopen(server.url + path, timeout=10) as response:
                assert response.status == 200
        request = urllib.request.Request(server.url + "/v1/preview", data=b'{"image_url": "data:,"}',
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:  # the API behind it does
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
        web.open()
        page = web.page
        expect(page.locator("#notice")).to_contain_text("needs an API key", timeout=30_000)
        assert page.locator("#model option").count() == 0
        page.fill("#api-key", "wrong")
        page.press("#api-key", "Enter")
        expect(page.locator("#api-key-help")).to_contain_text("refused", timeout=30_000)
        page.fill("#api-key", "s3cret-key")
        page.press("#api-key", "Enter")
        page.wait_for_selector("#model option", state="attached")
        expect(page.locator("#notice")).to_contain_text("tiny demonstration model")  # may update just after
        page.set_input_files("#file-input", str(CXR))
        page.wait_for_selector("#attachments img.preview:not([hidden])")
        assert "s3cret" not in page.content()  # the key is in memory, not in the document
        assert not web.errors
    finally:
        context.close()
        stop_server(server)


def post_preview(server, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(server.url + "/v1/preview", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_preview_endpoint_answers_and_refuses_as_the_api_does(web_server):
    ct = "data:application/dicom;base64," + base64.b64encode(CT.read_bytes()).decode()
    status, body = post_preview(web_server, {"image_url": ct, "ct_preset": "report-v4"})
    assert status == 200 and (body["images"], body["width"], body["height"]) == (1, 128, 128)
    status, body = post_preview(web_server, {"image_url": ct, "ct_preset": "bone"})
    assert status == 400 and body["error"]["param"] == "ct_preset" and "report-v4" in body["error"]["message"]
    status, body = post_preview(web_server, {"image_url": "https://example.org/x.png"})
    assert status == 400 and "only data: URIs" in body["error"]["message"]
    status, body = post_preview(web_server, {"ct_preset": "medgemma"})
    assert status == 400 and body["error"]["param"] == "image_url"


def test_preset_choices_match_the_imaging_presets():
    from openmedgemma.imaging.windowing import PRESETS

    html = (WEB_DIR / "index.html").read_text()
    select = re.search(r'<select id="ct-preset">(.*?)</select>', html, re.S).group(1)
    assert re.findall(r'<option value="([^"]+)"', select) == list(PRESETS)
    for name, windows in PRESETS.items():  # the labels show the windows
        label = re.search(rf'<option value="{name}"[^>]*>([^<]+)<', select).group(1)
        assert all(f"{low:g}..{high:g}" in label for low, high in windows), label


def test_web_files_ship_in_the_wheel():
    """Every file of web/ matches the package-data patterns (a missing pattern = a page missing in the wheel)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["openmedgemma.serve"]
    package_dir = WEB_DIR.parent
    files = [p.relative_to(package_dir).as_posix() for p in WEB_DIR.rglob("*") if p.is_file()]
    assert files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert missing == []
    for name in ["index.html", "style.css", "js/app.js", "vendor/marked.umd.js", "vendor/purify.min.js",
                 "vendor/LICENSE-marked.md", "vendor/LICENSE-dompurify"]:
        assert (WEB_DIR / name).is_file(), name
