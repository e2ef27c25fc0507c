"""`mentor report`: tables checked against the summaries, test details against numpy, a page that needs no
network and renders in a headless browser, and clear errors before anything is written."""

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _helpers import FixedMLP  # noqa: F401  (registers test_mlp)

from mentor.cli import main
from mentor.config import load_config
from mentor.engine import train
from mentor.engine.details import BINS, DetailsRecorder, network_details
from mentor.engine.evaluate import Evaluator
from mentor.errors import ReportError
from mentor.report import make_report
from mentor.report.collect import find_runs
from mentor.report.tables import group_runs, sections, summary_table

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

CHROMIUM = Path("/usr/bin/chromium")
TINY = ["data.name=digits", "data.val_size=200", "data.batch_size=32", "data.augment=none", "model.name=test_mlp",
        "trainer.max_steps=8", "trainer.eval_every=4", "trainer.ckpt_every=8", "trainer.log_every=2",
        "trainer.progress=false", "optim.lr=0.05"]
GROUPS = {"supervised": [], "mean_teacher": ["data.labels_per_class=20"]}
SEEDS = (0, 1)
SUMMARY_TITLE = "Mean ± std over seeds, and paired gains against the baseline"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 methods x 2 seeds of a few steps on digits, and their report made through the command line."""
    root = tmp_path_factory.mktemp("sweep")
    for method, extra in GROUPS.items():
        for seed in SEEDS:
            train(load_config(None, [f"out_dir={root / method / f'seed{seed}'}", f"method.name={method}",
                                     f"trainer.seed={seed}", *TINY, *extra]))
    out = root.parent / f"{root.name}-report"
    assert main(["report", str(root), "--out", str(out), "--baseline", "supervised"]) == 0
    return root, out / "report.html"


# -- reading the page back -----------------------------------------------------------------------------


class _Tables(HTMLParser):
    """Every <table> of a page as (caption, rows of cell texts), and every <img> src."""

    def __init__(self):
        super().__init__()
        self.tables, self.images = [], []
        self._cell = self._caption = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append(["", []])
        elif tag == "caption":
            self._caption = ""
        elif tag == "tr":
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][1][-1].append(self._cell)
            self._cell = None
        elif tag == "caption":
            self.tables[-1][0] = self._caption
            self._caption = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        elif self._caption is not None:
            self._caption += data


def html_tables(path: Path) -> _Tables:
    parser = _Tables()
    parser.feed(path.read_text())
    return parser


def md_unescape(cell: str) -> str:
    out, i = "", 0
    while i < len(cell):
        if cell[i] == "\\" and i + 1 < len(cell):
            out += cell[i + 1]
            i += 2
        else:
            out += cell[i]
            i += 1
    return out.replace("&lt;", "<")


def md_table(text: str, title: str) -> list[list[str]]:
    """The rows (header first) of the Markdown table under the bold line ``title``."""
    lines = text.splitlines()
    start = lines.index(f"**{title}**") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in __import__("re").split(r"(?<!\\)\|", line.strip())[1:-1]]
        if all(set(c) <= set(":-") for c in cells):
            continue
        rows.append([md_unescape(c) for c in cells])
    return rows


def pct(mean: float, std: float, sign: bool = False) -> str:
    return f"{mean * 100:{'+' if sign else ''}.2f} ± {std * 100:.2f}"


# -- the summary table -----------------------------------------------------------------------------------


def test_summary_table_matches_the_summaries(sweep):
    root, page = sweep
    summaries = {(m, s): json.loads((root / m / f"seed{s}" / "summary.json").read_text())
                 for m in GROUPS for s in SEEDS}
    md = md_table((page.parent / "report.md").read_text(), SUMMARY_TITLE)
    header, rows = md[0], {r[0]: r for r in md[1:]}
    assert set(rows) == {"supervised (baseline)", "mean_teacher"}
    assert header[:4] == ["group", "n seeds", "test_acc_last (%)", "test_acc_best (%)"]
    for method in GROUPS:
        row = rows["supervised (baseline)" if method == "supervised" else method]
        assert row[1] == "2"
        for col, key in ((2, "test_acc_last"), (3, "test_acc_best")):
            values = np.array([summaries[method, s][key] for s in SEEDS])
            assert row[col] == pct(values.mean(), values.std(ddof=1))
    # paired gains of mean_teacher over supervised: mean ± std of the per-seed differences
    for key in ("test_acc_last", "test_acc_best"):
        diff = np.array([summaries["mean_teacher", s][key] - summaries["supervised", s][key] for s in SEEDS])
        cell = rows["mean_teacher"][header.index(f"gain {key} (pp)")]
        clear = abs(diff.mean()) > 2 * diff.std(ddof=1)
        assert cell == pct(diff.mean(), diff.std(ddof=1), sign=True) + (" *" if clear else "")
        assert rows["supervised (baseline)"][header.index(f"gain {key} (pp)")] == "baseline"
    # the HTML holds the same table, cell for cell
    tables = {caption: rows for caption, rows in html_tables(page).tables}
    assert tables[SUMMARY_TITLE] == md


def test_baseline_by_name_and_unknown_name(sweep):
    root, _ = sweep
    groups = group_runs(find_runs([root]))
    assert [g.name for g in groups] == ["mean_teacher", "supervised"]  # path order
    (sec,) = sections(groups, baseline="mean_teacher")
    table = summary_table(sec)
    row = next(r for r in table.rows if r[0] == "supervised")
    a = [json.loads((root / "supervised" / f"seed{s}" / "summary.json").read_text())["test_acc_last"] for s in SEEDS]
    b = [json.loads((root / "mean_teacher" / f"seed{s}" / "summary.json").read_text())["test_acc_last"]
         for s in SEEDS]
    diff = np.array(a) - np.array(b)
    assert row[table.columns.index("gain test_acc_last (pp)")].rstrip(" *") == pct(diff.mean(), diff.std(ddof=1), True)
    with pytest.raises(ReportError, match="'mean_teacher'; 'supervised'"):
        sections(groups, baseline="kd")


def fake_run(folder: Path, config: dict, acc: float) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "summary.json").write_text(json.dumps({"select": "val_acc", "test_acc_last": acc, "steps": 1}))


def test_grouping_ignores_seeds_bookkeeping_unset_keys_and_teacher_folders(tmp_path):
    def recipe(seed, method="rkd_unlabeled", **extra):
        return {"method": {"name": method, **extra}, "data": {"name": "digits", "label_seed": seed},
                "trainer": {"seed": seed, "threads": seed + 1}, "out_dir": f"x{seed}"}

    for s in (0, 1):
        fake_run(tmp_path / "teacher" / f"seed{s}", recipe(s, "fixmatch"), 0.5)
        # the student of each seed learns from the teacher of that seed; only seed 0 says imbalance: None
        data = {"unlabeled_imbalance": None} if s == 0 else {}
        config = recipe(s, teacher=str(tmp_path / "teacher" / f"seed{s}"))
        config["data"].update(data)
        fake_run(tmp_path / "student" / f"seed{s}", config, 0.6 + s / 10)
        for ls in (0.0, 0.1):
            fake_run(tmp_path / f"sup{ls}" / f"seed{s}", recipe(s, "supervised", label_smoothing=ls), 0.4 + ls + s)
    groups = group_runs(find_runs([tmp_path]))
    names = {g.name: sorted(r.label for r in g.runs) for g in groups}
    assert names == {
        "rkd_unlabeled": ["student/seed0", "student/seed1"],
        "supervised method.label_smoothing=0": ["sup0.0/seed0", "sup0.0/seed1"],
        "supervised method.label_smoothing=0.1": ["sup0.1/seed0", "sup0.1/seed1"],
        "fixmatch": ["teacher/seed0", "teacher/seed1"]}
    student = next(g for g in groups if g.method == "rkd_unlabeled")
    assert student.key["method.teacher"].startswith("<run of fixmatch ")
    assert student.by_seed("test_acc_last") == pytest.approx({"(0, 0, 0)": 0.6, "(1, 1, 0)": 0.7})
    assert [r.seed for r in student.runs] == ["0", "1"]


# -- test details ------------------------------------------------------------------------------------------


def numpy_details(logits: np.ndarray, labels: np.ndarray, num_classes: int, bins: int = BINS):
    """Confusion matrix, per-class accuracy and ECE by brute force (bins (k/B, (k+1)/B], the first closed)."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    conf, pred = p.max(1), p.argmax(1)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for t, q in zip(labels, pred):
        cm[t, q] += 1
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece, counts = 0.0, []
    for b in range(bins):
        inside = (conf > edges[b]) & (conf <= edges[b + 1]) if b else (conf <= edges[1])
        counts.append(int(inside.sum()))
        if inside.any():
            ece += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    per_class = [cm[i, i] / cm[i].sum() if cm[i].sum() else None for i in range(num_classes)]
    return cm, per_class, ece, counts


def test_details_match_numpy_on_known_logits():
    g = torch.Generator().manual_seed(3)
    n, k = 500, 6
    logits = torch.randn(n, k, generator=g) * torch.linspace(0.2, 4.0, n)[:, None]  # every confidence range
    labels = torch.randint(0, k - 1, (n,), generator=g)  # class 5 has no test image
    labels[:200] = logits[:200].argmax(1).clamp(max=k - 2)  # and many right answers
    split, other = object(), object()
    rec = DetailsRecorder({id(split): "test"}, k, torch.device("cpu"))
    for part in (slice(0, 173), slice(173, n)):  # two batches add up
        rec.add(split, logits[part], labels[part])
    rec.add(other, logits, labels)  # another split: not recorded
    got = rec.result(lambda t: t)["test"]
    cm, per_class, ece, counts = numpy_details(logits.numpy(), labels.numpy(), k)
    assert got["confusion"] == cm.tolist()
    assert got["n"] == n and got["acc"] == pytest.approx(np.trace(cm) / n)
    assert got["per_class_acc"][:5] == pytest.approx(per_class[:5]) and got["per_class_acc"][5] is None
    assert got["bins"]["count"] == counts and sum(c > 0 for c in counts) >= 8
    assert got["ece"] == pytest.approx(ece, abs=1e-6)
    assert ece > 0.01
    twice = DetailsRecorder({id(split): "test"}, k, torch.device("cpu"), sizes={"test": n})
    twice.add(split, logits, labels)
    assert twice.result(lambda t: t)["test"] == got  # the expected count
    twice.add(split, logits, labels)
    assert twice.result(lambda t: t) == {}  # a split scored twice is left out, not doubled


def test_evaluator_records_the_logits_it_scores():
    from mentor.data.readers import ArrayDataset

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (70, 1, 4, 4), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (70,), generator=g)
    split = ArrayDataset(images, labels, 3, "toy")
    weight = torch.randn(16, 3, generator=g)
    net = lambda x: 3 * x.flatten(1) @ weight  # noqa: E731
    mean, std = torch.tensor([0.5]).view(1, -1, 1, 1), torch.tensor([0.25]).view(1, -1, 1, 1)
    ev = Evaluator(mean, std, 32, torch.device("cpu"))
    ev.details = DetailsRecorder({id(split): "test"}, 3, torch.device("cpu"))
    acc = ev.accuracy(net, split)
    got = ev.details.result(ev.total)["test"]
    logits = net((images.float() / 255 - 0.5) / 0.25).numpy()
    cm, _, ece, _ = numpy_details(logits, labels.numpy(), 3)
    assert got["confusion"] == cm.tolist() and got["acc"] == pytest.approx(acc)
    assert got["ece"] == pytest.approx(ece, abs=1e-6)
    assert network_details(net, split, Evaluator(mean, std, 16, torch.device("cpu")), 3) == got  # one pass, alone


def test_trained_runs_record_their_test_details(sweep):
    root, _ = sweep
    for method in GROUPS:
        for s in SEEDS:
            run = root / method / f"seed{s}"
            details = json.loads((run / "test_details.json").read_text())
            summary = json.loads((run / "summary.json").read_text())
            split = details["splits"]["test"]
            assert details["classes"] == [str(i) for i in range(10)] and details["step"] == 8
            assert split["acc"] == pytest.approx(summary["test_acc_last"], abs=1e-12)
            cm = np.array(split["confusion"])
            assert cm.sum() == split["n"] and np.trace(cm) / cm.sum() == pytest.approx(summary["test_acc_last"])
            bins = split["bins"]
            ece = sum(k * abs(a - c) for k, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"]) if k)
            assert split["ece"] == pytest.approx(ece / split["n"])


# -- the page --------------------------------------------------------------------------------------------


def test_page_is_self_contained_and_markdown_has_the_same_tables(sweep):
    _, page = sweep
    text = page.read_text()
    assert "http://" not in text.lower() and "https://" not in text.lower()
    assert "<link" not in text and "<script" not in text
    parsed = html_tables(page)
    assert len(parsed.images) >= 2 + 4 + 1  # confusion and reliability per group, curves per run, overlay
    for src in parsed.images:
        assert not Path(src).is_absolute() and ".." not in src
        data = (page.parent / src).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    md = (page.parent / "report.md").read_text()
    assert "http" not in md
    md_images = __import__("re").findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert md_images == parsed.images
    for caption, rows in parsed.tables:
        assert md_table(md, caption) == rows, caption
    per_class = dict((c, r) for c, r in parsed.tables)["Test accuracy per class (%), last step"]
    assert [r[0] for r in per_class[1:]] == [str(i) for i in range(10)]


def test_rendered_in_headless_chromium(sweep, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed (scripts/ensure-chromium.sh, or apt-get install chromium)")
    from matplotlib.image import imread

    _, page = sweep
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()],
                   capture_output=True, timeout=120, check=False)
    pixels = imread(shot)
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels[..., :3].std() > 0.05  # not a blank page
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=False).stdout
    parsed = _Tables()
    parsed.feed(dom)
    assert parsed.images == html_tables(page).images
    assert len(parsed.tables) == len(html_tables(page).tables) >= 4
    assert SUMMARY_TITLE in dom


# -- other kinds of runs -----------------------------------------------------------------------------------


def test_adaptation_generalisation_diffusion_and_older_runs(sweep, tmp_path):
    root, _ = sweep
    for method in ("source", "lame"):
        for s in SEEDS:
            assert main(["adapt", str(root / "supervised" / f"seed{s}"), "--shift", "digits_domains", "--limit", "20",
                         f"method.name={method}", f"out_dir={tmp_path / 'adapt' / method / str(s)}",
                         "data.batch_size=20"]) == 0
    train(load_config(None, [f"out_dir={tmp_path / 'dg'}", "method.name=erm", "data.name=digits_domains",
                             "data.test_domains=[handwritten]", *TINY[2:], "trainer.max_steps=2"]))
    train(load_config(None, [f"out_dir={tmp_path / 'edm'}", *TINY[:4], *TINY[5:], "method.name=edm",
                             "model.name=edm_unet", "model.kwargs={channels: 8, channel_mult: [1], num_blocks: 1, "
                             "attention: false}", "method.eval_images=20", "optim.name=adamw", "optim.lr=0.001",
                             "trainer.ema=0.9", "trainer.max_steps=2"]))
    assert not (tmp_path / "edm" / "test_details.json").exists()  # not selected on accuracy
    bare = tmp_path / "edm_bare"  # a run without checkpoints (and of another recipe: its own group)
    shutil.copytree(tmp_path / "edm", bare)
    for p in bare.glob("*.pt"):
        p.unlink()
    cfg = yaml.safe_load((bare / "config.yaml").read_text())
    cfg["method"]["P_mean"] = -1.0
    (bare / "config.yaml").write_text(yaml.safe_dump(cfg))
    old = tmp_path / "old"  # trained before test_details.json existed
    shutil.copytree(root / "supervised" / "seed0", old)
    (old / "test_details.json").unlink()

    page = make_report([tmp_path / "adapt", tmp_path / "dg", tmp_path / "edm", bare, old], out=tmp_path / "r")
    md = (page.parent / "report.md").read_text()
    streams = md_table(md, "Accuracy per stream (%)")
    assert streams[0] == ["stream", "lame", "source"]
    lame = [json.loads((tmp_path / "adapt" / "lame" / str(s) / "summary.json").read_text()) for s in SEEDS]
    names = [k.split("@", 1)[1] for k in lame[0] if k.startswith("acc@")]
    assert [r[0] for r in streams[1:]] == names and len(names) == 5
    values = np.array([[summ[f"acc@{n}"] for n in names] for summ in lame])
    assert [r[1] for r in streams[1:]] == [pct(m, s) for m, s in zip(values.mean(0), values.std(0, ddof=1))]
    assert "| source (baseline) | 2 |" in md
    dg = json.loads((tmp_path / "dg" / "summary.json").read_text())
    held = md_table(md, "test_acc_last per held-out domain")
    assert held[0] == ["domain", "erm"] and held[1] == ["handwritten", f"{dg['test_acc_last@handwritten'] * 100:.2f}"]
    files = {Path(src).name for src in html_tables(page).images}
    edm = "edm_method.P_mean_-1.2.png"  # the group of the run with a checkpoint
    assert {f"samples_{edm}", f"trajectory_{edm}", "confusion_erm.png", "reliability_erm.png"} <= files
    assert not any(f.endswith("_-1.png") for f in files if f.startswith(("samples", "trajectory")))
    from matplotlib.image import imread

    assert imread(page.parent / "figures" / f"samples_{edm}").shape[:2] == (4 * 65 + 1, 4 * 65 + 1)  # 16 8x8, x8
    assert "No samples of edm_bare: run" in md and "no best.pt or last.pt" in md
    assert "No test_details.json in old: these runs were trained before" in md


# -- errors --------------------------------------------------------------------------------------------------


def test_bad_input_is_one_clear_error_and_nothing_is_written(sweep, tmp_path, capsys, monkeypatch):
    root, _ = sweep
    (tmp_path / "empty" / "deep").mkdir(parents=True)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "config.yaml").write_text("method: [unclosed\n")
    (tmp_path / "damaged" / "summary.json").write_text("{}")
    out = tmp_path / "out"
    cases = [([str(tmp_path / "missing")], "does not exist"), ([str(tmp_path / "empty")], "holds no run"),
             ([str(tmp_path / "file.txt")], "is a file"), ([str(root), "--baseline", "kd"], "names no group"),
             ([str(root), str(tmp_path / "damaged")], "config.yaml cannot be read")]
    for args, words in cases:
        assert main(["report", *args, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("mentor: error: ") and words in err and "Traceback" not in err
        assert err.count("\n") == 1  # one paragraph
        assert not out.exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the plots extra is not installed
    with pytest.raises(ReportError, match=r"pip install 'mentor\[plots\]'"):
        make_report([root], out=out)
    assert not out.exists()
