"""The labelling page in headless Chromium: pairs from `diffalign sample`, ten choices by key and
mouse with an undo, a page reload and a server restart mid-way; the labeller's file then feeds
D3PO as it is, a second labeller's agreement is shown, and `label export` writes Pick-a-Pic parquet."""

from __future__ import annotations

import io
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="install the test extra: pip install -e '.[test]'")
pytest.importorskip("uvicorn")

from diffalign.cli import main  # noqa: E402
from diffalign.label import make_server  # noqa: E402


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """Ten pairs sampled by `diffalign sample` from the tiny SD (2 DDIM steps)."""
    import yaml

    root = tmp_path_factory.mktemp("label")
    recipe = root / "d3po.yaml"
    recipe.write_text(yaml.safe_dump({"method": "d3po", "model": "tiny-sd", "d3po": {
        "reward": "brightness", "num_steps": 2, "guidance_scale": 3.0,
        "prompts": ["a red cube", "a cat", "a tree", "a blue ball", "a house"]}}))  # fmt: skip
    assert main(["sample", str(recipe), "--out", str(root / "pairs"), "--num-pairs", "10", "--batch-size", "5"]) == 0
    return root / "pairs"


class Server:
    """The label server on 127.0.0.1 and a free port, run in a thread; stop() waits at most 10 s."""

    def __init__(self, pairs_dir, port: int | None = None) -> None:
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port, self.url = port, f"http://127.0.0.1:{port}/"
        self.server = make_server(pairs_dir, "127.0.0.1", port)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "label server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "label server did not stop"


def rendered_image_matches(page, png_path, image_id: str, screenshot) -> float:
    """Mean absolute difference (0..1) between the PNG and its drawn pixels in the screenshot."""
    import numpy as np
    from PIL import Image

    box = page.evaluate("""(id) => { const img = document.getElementById(id); const r = img.getBoundingClientRect();
        const s = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
        const w = img.naturalWidth * s, h = img.naturalHeight * s;
        return [r.x + (r.width - w) / 2, r.y + (r.height - h) / 2, w, h]; }""", image_id)
    x, y, w, h = box
    source = Image.open(png_path).convert("RGB")
    shot = np.asarray(screenshot.convert("RGB"), float)
    cols = (x + (np.arange(source.width) + 0.5) * w / source.width).astype(int)  # each source pixel's centre
    rows = (y + (np.arange(source.height) + 0.5) * h / source.height).astype(int)
    drawn = shot[rows][:, cols]
    return float(np.abs(drawn - np.asarray(source, float)).mean() / 255)


def test_label_ten_pairs_in_chromium(browser_page, pairs_dir, tmp_path):
    from PIL import Image

    from diffalign.feedback import load_labelled_pairs
    from diffalign.label import export_pickapic

    page = browser_page
    page.set_default_timeout(15_000)
    page.set_viewport_size({"width": 1200, "height": 900})
    template = [json.loads(line) for line in (pairs_dir / "labels.jsonl").read_text().splitlines()]
    ids = [pair["pair_id"] for pair in template]

    def showing(index: int) -> None:
        page.wait_for_function(f"document.body.dataset.pairId === {json.dumps(ids[index])}")
        assert page.text_content("#prompt") == template[index]["prompt"]
        assert page.text_content("#progress") == f"{len(labels_so_far())} / 10 labelled"

    def labels_so_far() -> list:
        path = pairs_dir / "labels-alice.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [line for line in lines if line["choice"] is not None]

    server = Server(pairs_dir)
    try:
        page.goto(server.url)
        page.fill("#name", "alice")  # a new labeller types a name
        page.press("#name", "Enter")
        showing(0)
        page.wait_for_function("document.getElementById('image0').naturalWidth > 0 && "
                               "document.getElementById('image1').naturalWidth > 0")
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot))
        screenshot = Image.open(io.BytesIO(shot.read_bytes()))
        diff = {(side, k): rendered_image_matches(page, pairs_dir / template[0][f"image_{k}"], f"image{side}", screenshot)
                for side in (0, 1) for k in (0, 1)}  # fmt: skip
        # each side draws its own image: close to its PNG, and closer to it than to the other one
        assert diff[0, 0] < 0.005 and diff[1, 1] < 0.005, diff
        assert diff[0, 0] < diff[0, 1] / 3 and diff[1, 1] < diff[1, 0] / 3, diff

        page.keyboard.press("1")            # pair 0: left
        showing(1)
        page.click("#right")                # pair 1: right, with the mouse
        showing(2)
        page.keyboard.press("t")            # pair 2: tie
        showing(3)
        page.keyboard.press("s")            # pair 3: skip
        showing(4)
        assert page.text_content("#eta").startswith("ETA ")  # 6 pairs left at this session's pace
        page.keyboard.press("2")            # pair 4: right ... undone
        showing(5)
        page.keyboard.press("u")
        showing(4)
        page.keyboard.press("1")            # pair 4: left
        showing(5)
        page.reload()                       # the page comes back where it was, name remembered
        showing(5)
        assert page.text_content("#labeller") == "labeller: alice"
    finally:
        server.stop()

    server = Server(pairs_dir, port=server.port)  # a restarted server resumes at the first unlabelled pair
    try:
        page.reload()
        showing(5)
        page.click("#left")                 # pair 5
        showing(6)
        for key, index in (("2", 7), ("1", 8), ("t", 9)):
            page.keyboard.press(key)
            showing(index)
        page.click("#right")                # pair 9: the last one
        page.wait_for_selector("#done", state="visible")
        assert page.text_content("#progress") == "10 / 10 labelled"

        page.goto(server.url + "?name=bob")  # a second labeller, kept apart
        page.wait_for_function("document.body.dataset.pairId === '000000'")
        for count, key in enumerate(("1", "1", "2"), start=1):  # agrees with alice on pair 0, not on pair 1
            page.keyboard.press(key)
            page.wait_for_function(f"document.getElementById('progress').textContent === '{count} / 10 labelled'")
        page.reload()
        page.wait_for_function("document.getElementById('agreement').textContent.length > 0")
        assert page.text_content("#agreement") == "alice vs bob: agree on 1/2 pairs (50%)"
        assert page.console_errors == []
    finally:
        server.stop()

    lines = [json.loads(line) for line in (pairs_dir / "labels-alice.jsonl").read_text().splitlines()]
    assert [line["pair_id"] for line in lines] == ids
    assert [line["choice"] for line in lines] == [0, 1, "tie", "skip", 0, 0, 1, 0, "tie", 1]
    seqs = [line["seq"] for line in lines]
    assert seqs == sorted(seqs) and len(set(seqs)) == 10  # chosen in order; the undone choice left no trace
    assert all(line["choice"] is None for line in map(json.loads, (pairs_dir / "labels.jsonl").read_text().splitlines()))
    bob = [json.loads(line)["choice"] for line in (pairs_dir / "labels-bob.jsonl").read_text().splitlines()]
    assert bob == [0, 0, 1] + [None] * 7

    # The labeller's file is D3PO's labels file as it is: ties and skips are left out.
    pairs = load_labelled_pairs(pairs_dir / "labels-alice.jsonl", model="tiny-sd")
    assert (pairs.rows, pairs.winners, pairs.skipped) == ([0, 1, 4, 5, 6, 7, 9], [0, 1, 0, 0, 1, 0, 1], 3)

    # Pick-a-Pic export, both labellers by majority: pair 0 both 0 -> 1.0; pair 1 alice 1, bob 0 -> tie;
    # pair 2 alice tie, bob 1 -> mean 0.25 -> image 1 wins; pair 3 skipped by alice, unlabelled by bob -> left out.
    import pyarrow.parquet as pq

    path, count = export_pickapic(pairs_dir, tmp_path / "picks")
    table = pq.read_table(path).to_pydict()
    assert count == 9 and table["label_0"] == [1.0, 0.5, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0]
    assert table["caption"][:3] == [template[i]["prompt"] for i in range(3)]
    assert table["jpg_0"][0] == (pairs_dir / template[0]["image_0"]).read_bytes()
    from diffalign.data import open_preference_pairs

    assert len(open_preference_pairs(str(tmp_path / "picks"))) == 7  # Diffusion-DPO's reader drops the two ties


def test_label_command_errors_are_one_line(tmp_path, capsys):
    assert main(["label", str(tmp_path)]) == 2
    assert f"{tmp_path}: no labels.jsonl; write pairs with `diffalign sample CONFIG --out {tmp_path}`" in capsys.readouterr().err
    (tmp_path / "labels.jsonl").write_text('{"pair_id": "000000", "prompt": "p", "image_0": "a.png", "image_1": "b.png"}\n')
    assert main(["label", str(tmp_path), "--name", "al ice"]) == 2
    assert "labeller name 'al ice': use 1-40 letters, digits" in capsys.readouterr().err
    assert main(["label", "export", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no labelled pairs to export" in capsys.readouterr().err
