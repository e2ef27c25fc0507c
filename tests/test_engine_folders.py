"""Image-folder trees through the engine: in memory and streamed by DataLoader workers give the same run."""

import json

import numpy as np
import pytest

from mentor.config import ConfigError, load_config
from mentor.engine import Trainer, train

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/{train,test}/{a,b,c}/*.png: classes differ by the colour of a bar, plus noise."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 10)):
        for c, name in enumerate("abc"):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (12, 12, 3), dtype=np.uint8)
                img[4:8, :, c] = 220
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def cfg(tree, out, *extra):
    return load_config(None, [f"out_dir={out}", "data.name=image_folder", f"data.root={tree}", "data.image_size=12",
                              "data.val_size=15", "data.batch_size=16", "data.padding=1", "model.name=resnet8",
                              "trainer.max_steps=8", "trainer.eval_every=4", "trainer.ckpt_every=4",
                              "trainer.log_every=2", "trainer.progress=false", *extra])


def losses(run):
    events = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [e["loss"] for e in events if e["split"] == "train"]


def test_streamed_equals_in_memory(tree, tmp_path):
    mem = train(cfg(tree, tmp_path / "mem"))
    streamed = train(cfg(tree, tmp_path / "stream", "data.stream=true", "data.num_workers=1"))
    assert losses(tmp_path / "mem") == pytest.approx(losses(tmp_path / "stream"), rel=1e-4)
    assert mem["test_acc_last"] == pytest.approx(streamed["test_acc_last"], abs=1 / 30 + 1e-9)
    assert streamed["test_acc_last"] > 0.8  # the bar's colour is the class: 8 steps learn it (chance 1/3)


def test_streamed_run_resumes(tree, tmp_path):
    # A constant schedule, so stopping at max_steps=4 and extending to 8 is the same run as 8 straight.
    common = ["data.stream=true", "data.num_workers=0", "schedule.name=constant"]
    run = tmp_path / "r"
    train(cfg(tree, run, *common, "trainer.max_steps=4"))
    resumed = Trainer(cfg(tree, run, *common))
    resumed.fit()
    assert resumed.start_step == 4
    straight = tmp_path / "s"
    train(cfg(tree, straight, *common))
    assert losses(run) == losses(straight)


def test_missing_root_or_test_split(tmp_path):
    with pytest.raises(ConfigError, match="data.root is required"):
        Trainer(load_config(None, ["data.name=image_folder", f"out_dir={tmp_path}"]))
    (tmp_path / "only" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="needs a test split"):
        Trainer(load_config(None, ["data.name=image_folder", f"data.root={tmp_path / 'only'}", f"out_dir={tmp_path}"]))
