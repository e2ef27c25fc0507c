"""Recipes: strict typed loading, dotted overrides, clear errors, and a resolved dump that reloads."""

from pathlib import Path

import pytest
import yaml

from mentor.config import ConfigError, RunConfig, build_config, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_and_method_hparams(tmp_path):
    cfg = load_config(write(tmp_path, {"method": {"name": "supervised", "label_smoothing": 0.1}}))
    assert isinstance(cfg, RunConfig)
    assert cfg.method.name == "supervised" and cfg.method.label_smoothing == 0.1
    assert cfg.optim.name == "sgd" and cfg.trainer.max_steps == 1000


def test_unknown_key_suggests_near_match(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {"optim": {"lrr": 0.1}}))
    assert "optim.lrr" in str(e.value) and "'lr'" in str(e.value) and "r.yaml" in str(e.value)


def test_unknown_top_level_and_method_key(tmp_path):
    with pytest.raises(ConfigError, match="'trainer'"):
        load_config(write(tmp_path, {"trainr": {}}))
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(write(tmp_path, {"method": {"name": "supervised", "label_smoothin": 0.1}}))


def test_unknown_method_suggests(tmp_path):
    with pytest.raises(ConfigError, match="supervised"):
        load_config(write(tmp_path, {"method": {"name": "supervisd"}}))


def test_wrong_type_names_key_and_type(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {"optim": {"lr": "fast"}}))
    assert "optim.lr" in str(e.value) and "float" in str(e.value)
    with pytest.raises(ConfigError, match="trainer.max_steps: expected int"):
        load_config(write(tmp_path, {"trainer": {"max_steps": 1.5}}))
    with pytest.raises(ConfigError, match="expected bool"):
        load_config(write(tmp_path, {"trainer": {"compile": "yes"}}))
    with pytest.raises(ConfigError, match="one of 'sgd', 'adamw'"):
        load_config(write(tmp_path, {"optim": {"name": "adam"}}))


def test_yaml11_float_strings_are_accepted(tmp_path):
    cfg = load_config(write(tmp_path, {}), ["optim.lr=1e-3"])
    assert cfg.optim.lr == pytest.approx(1e-3)


def test_overrides(tmp_path):
    p = write(tmp_path, {"optim": {"lr": 0.1}})
    cfg = load_config(p, ["optim.lr=0.2", "trainer.max_steps=7", "trainer.clip_grad=null",
                          "schedule.milestones=[0.5,0.75]", "optim.betas=[0.8,0.9]"])
    assert cfg.optim.lr == 0.2 and cfg.trainer.max_steps == 7 and cfg.trainer.clip_grad is None
    assert cfg.schedule.milestones == [0.5, 0.75] and cfg.optim.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(p, ["optim.lr"])
    with pytest.raises(ConfigError, match="did you mean|Did you mean"):
        load_config(p, ["trainer.max_step=3"])
    with pytest.raises(ConfigError, match="2 values"):
        load_config(p, ["optim.betas=[0.9]"])


def test_invalid_values(tmp_path):
    with pytest.raises(ConfigError, match="max_steps must be >= 1"):
        load_config(write(tmp_path, {"trainer": {"max_steps": 0}}))
    with pytest.raises(ConfigError, match="ema is a decay"):
        load_config(write(tmp_path, {"trainer": {"ema": 1.5}}))


def test_missing_and_malformed_recipe(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_dump_reloads_to_the_same_config(tmp_path):
    cfg = load_config(write(tmp_path, {"method": {"name": "supervised", "label_smoothing": 0.2},
                                       "optim": {"name": "adamw", "lr": 3e-4}, "schedule": {"milestones": [10]}}))
    again = build_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_is_valid(recipe):
    load_config(recipe)


# --------------------------------------------------------------------------------------------------
# every value validated where it is defined; each message names the key


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr"), ("optim.lr=0", "optim.lr"), ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=.inf", "optim.lr"), ("optim.lr=1e400", "optim.lr"), ("optim.momentum=1.5", "optim.momentum"),
    ("optim.momentum=1", "optim.momentum"), ("optim.betas=[0.9,1.0]", "optim.betas[1]"),
    ("optim.betas=[-0.1,0.9]", "optim.betas[0]"), ("optim.weight_decay=-1e-4", "optim.weight_decay"),
    ("trainer.clip_grad=-1", "trainer.clip_grad"), ("trainer.clip_grad=0", "trainer.clip_grad"),
    ("data.eval_batch_size=-1", "data.eval_batch_size"), ("data.eval_batch_size=0", "data.eval_batch_size"),
    ("data.batch_size=0", "data.batch_size"), ("data.batch_size=100000000", "data.batch_size"),
    ("data.val_size=-5", "data.val_size"), ("data.subset=0", "data.subset"),
    ("data.labels_per_class=0", "data.labels_per_class"), ("data.unlabeled_ratio=0", "data.unlabeled_ratio"),
    ("data.holdout_fraction=1", "data.holdout_fraction"), ("data.image_size=0", "data.image_size"),
    ("data.padding=-1", "data.padding"), ("data.num_workers=-1", "data.num_workers"),
    ("data.channels=2", "data.channels"), ("data.split_seed=-1", "data.split_seed"),
    ("data.label_seed=4294967296", "data.label_seed"), ("data.root=''", "data.root"),
    ("schedule.warmup_steps=-3", "schedule.warmup_steps"), ("schedule.milestones=[-1]", "schedule.milestones[0]"),
    ("schedule.milestones=[0.75,0.5]", "schedule.milestones"), ("schedule.milestones=[0.5,0.5]", "schedule.milestones"),
    ("schedule.min_lr=-1", "schedule.min_lr"), ("schedule.gamma=0", "schedule.gamma"),
    ("trainer.seed=-1", "trainer.seed"), ("trainer.seed=9223372036854775808", "trainer.seed"),
    ("trainer.threads=0", "trainer.threads"), ("trainer.threads=-1", "trainer.threads"),
    ("trainer.accumulate=0", "trainer.accumulate"), ("trainer.log_every=0", "trainer.log_every"),
    ("trainer.device=tpu", "trainer.device"), ("trainer.device=cuda:x", "trainer.device"),
    ("trainer.ema=1", "trainer.ema"), ("out_dir=", "out_dir"), ("out_dir='  '", "out_dir"),
    ("model.name=", "model.name"), ("model.init_from=''", "model.init_from"),
    ("method.label_smoothing=1.5", "method.name"),
])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert msg.startswith(key) and "\n" not in msg, msg


def test_out_of_range_message_says_what_is_allowed():
    with pytest.raises(ConfigError, match=r"optim\.momentum must be in \[0, 1\), got 1\.5"):
        load_config(None, ["optim.momentum=1.5"])
    with pytest.raises(ConfigError, match=r"trainer\.clip_grad must be > 0 or null, got -1\.0 .*reverse"):
        load_config(None, ["trainer.clip_grad=-1"])
    with pytest.raises(ConfigError, match="current directory"):
        load_config(None, ["out_dir="])


def test_null_means_off_and_skips_the_rules():
    cfg = load_config(None, ["trainer.clip_grad=null", "trainer.threads=null", "data.subset=null",
                             "trainer.ema=null", "model.init_from=null"])
    assert cfg.trainer.clip_grad is None and cfg.trainer.threads is None and cfg.data.subset is None


def test_values_at_the_edges_of_their_ranges_are_accepted():
    cfg = load_config(None, ["optim.momentum=0", "optim.weight_decay=0", "optim.betas=[0,0.999]",
                             "schedule.min_lr=0.05", "optim.lr=0.05", "schedule.milestones=[0,0.5,0.9]",
                             "data.val_size=0", "data.padding=0", "trainer.threads=1", "data.num_workers=0",
                             "schedule.warmup_steps=999", "trainer.max_steps=1000", "trainer.seed=2147483647",
                             "trainer.device=cpu"])
    assert cfg.schedule.min_lr == cfg.optim.lr and cfg.trainer.seed == 2**31 - 1


def test_min_lr_above_lr_and_warmup_past_the_end_name_both_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lr=0.1", "schedule.min_lr=0.5"])
    assert "schedule.min_lr" in str(e.value) and "optim.lr" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["trainer.max_steps=10", "schedule.warmup_steps=10"])
    assert "schedule.warmup_steps" in str(e.value) and "trainer.max_steps" in str(e.value)


def test_cuda_asked_for_on_a_machine_without_it(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for device in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ConfigError, match=rf"^trainer\.device={device}: CUDA is not available.*device=cpu"):
            load_config(None, [f"trainer.device={device}"])
    for device in ("auto", "cpu"):
        with pytest.raises(ConfigError, match=r"^trainer\.cuda_graph: it needs a CUDA device.*cuda_graph=false"):
            load_config(None, [f"trainer.device={device}", "trainer.cuda_graph=true"])
    assert load_config(None, ["trainer.device=auto"]).trainer.device == "auto"


def test_a_gpu_index_beyond_the_machine(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert load_config(None, ["trainer.device=cuda:1"]).trainer.device == "cuda:1"
    with pytest.raises(ConfigError, match=r"trainer\.device=cuda:2: this machine has 2 GPU"):
        load_config(None, ["trainer.device=cuda:2"])


@pytest.mark.parametrize("method, override", [
    ("kd", "temperature=0"), ("kd", "kd_weight=-1"), ("kd", "ce_weight=-0.5"), ("dkd", "warmup_epochs=-1"),
    ("dkd", "beta=-8"), ("rld", "scd_temperature=0"), ("at", "p=0"), ("rkd", "angle_weight=-1"),
    ("crd", "nce_m=1"), ("crd", "nce_k=0"), ("simkd", "factor=0"), ("semckd", "embed_dim=0"),
    ("dskd", "weight_temperature=-1"), ("avg_mkd", "temperature=-4"), ("camkd", "feat_warmup_epochs=-1"),
    ("mmkd", "virtual_lr=-1"), ("mmkd", "buffer_size=0"), ("dml", "num_peers=1"), ("okddip", "num_branches=2"),
    ("mbd", "diversity_weight=-1"), ("pseudo_label", "p_cutoff=1.5"), ("pseudo_label", "unsup_warmup=-0.1"),
    ("edm", "label_dropout=1"), ("edm", "sigma_min=0"), ("edm", "eval_images=0"), ("erm", "label_smoothing=-1"),
])
def test_method_hyperparameters_out_of_range_name_the_key(method, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^method\.{key}(\[\d+\])? must be"):
        load_config(None, [f"method.name={method}", f"method.{override}"])


def test_every_method_default_keeps_its_own_rules():
    from mentor.config import check_values
    from mentor.methods import METHODS, load_builtin_methods

    load_builtin_methods()
    for name in METHODS.names():
        check_values(METHODS.get(name).Config(name=name), "method")  # the paper's defaults are in range


def test_rules_refuse_a_field_that_does_not_exist():
    import dataclasses

    from mentor.config import POSITIVE, rules

    with pytest.raises(TypeError, match="no field named lrr"):
        rules(lrr=POSITIVE)(dataclasses.make_dataclass("C", [("lr", float, 0.1)]))


def test_model_kwargs_are_checked_against_the_model():
    with pytest.raises(ConfigError, match=r"model\.kwargs: resnet8 takes no argument 'width'"):
        load_config(None, ["model.name=resnet8", "model.kwargs={width: 2}"])
    with pytest.raises(ConfigError, match=r"model\.kwargs\.num_classes is set from the data"):
        load_config(None, ["model.name=resnet8", "model.kwargs={num_classes: 3}"])


def test_method_must_name_a_method():
    for bad in ("method={}", "method=[]", "method.name=[1]", "method.name=null", "method.label_smoothing=0.1"):
        with pytest.raises(ConfigError, match=r"^method"):
            load_config(None, [bad])


# --------------------------------------------------------------------------------------------------
# case-insensitive near matches


def test_case_changed_keys_and_values_get_a_suggestion():
    from mentor.registry import suggest

    assert suggest("OUT_DIR", ["out_dir", "resume"]) == " Did you mean 'out_dir'?"
    assert suggest("Resnet8", ["resnet8", "resnet14"]).startswith(" Did you mean 'resnet8'")
    for override, near in (("OUT_DIR=x", "'out_dir'"), ("Optim.lr=0.1", "'optim'"), ("optim.LR=0.1", "'lr'"),
                           ("optim.name=SGD", "'sgd'"), ("trainer.precision=BF16", "'bf16'")):
        with pytest.raises(ConfigError, match=f"Did you mean {near}"):
            load_config(None, [override])


# --------------------------------------------------------------------------------------------------
# reading recipe files: YAML strictness, encodings, depth, empty recipes


def write_text(tmp_path, text: str | bytes, name="r.yaml") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def one_paragraph(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_duplicate_keys_name_the_key_and_lines(tmp_path):
    top = write_text(tmp_path, "optim: {lr: 0.1}\nmodel: {name: resnet8}\noptim: {lr: 0.2}\n")
    with pytest.raises(ConfigError) as e:
        load_config(top)
    assert "'optim'" in one_paragraph(e) and "lines 1 and 3" in str(e.value) and "r.yaml" in str(e.value)
    nested = write_text(tmp_path, "trainer:\n  max_steps: 10\n  seed: 1\n  max_steps: 20\n", "n.yaml")
    with pytest.raises(ConfigError, match=r"'max_steps' is given twice.*lines 2 and 4"):
        load_config(nested)
    with pytest.raises(ConfigError, match=r"override 'optim=\{lr: 1, lr: 2\}'.*'lr' is given twice"):
        load_config(None, ["optim={lr: 1, lr: 2}"])
    # a merge key may be overridden: that is what it is for
    merged = write_text(tmp_path, "base: &b {lr: 0.1, momentum: 0.8}\n", "m.yaml")
    from mentor.config import load_yaml

    assert load_yaml(merged.read_text() + "optim: {<<: *b, lr: 0.2}\n")["optim"] == {"lr": 0.2, "momentum": 0.8}


def test_python_tags_are_refused(tmp_path):
    p = write_text(tmp_path, "out_dir: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        load_config(p)
    one_paragraph(e)


def test_yaml_errors_are_one_line_with_the_position(tmp_path):
    p = write_text(tmp_path, "optim: {lr: 0.1\ntrainer: {max_steps: 3}\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: .* at line \d+, column \d+") as e:
        load_config(p)
    one_paragraph(e)
    with pytest.raises(ConfigError, match=r"override 'optim\.betas=\[0\.9': the value is not valid YAML") as e:
        load_config(None, ["optim.betas=[0.9"])
    one_paragraph(e)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-be"])
def test_recipes_with_a_byte_order_mark_are_decoded(tmp_path, encoding):
    text = "# é\noptim: {lr: 0.25}\n"
    data = text.encode(encoding)
    bom = {"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff", "utf-32-be": b"\x00\x00\xfe\xff"}.get(encoding, b"")
    assert load_config(write_text(tmp_path, bom + data)).optim.lr == 0.25


def test_a_file_that_is_not_text_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe '.*bin\.yaml' is not a text file") as e:
        load_config(write_text(tmp_path, bytes(range(256)) * 4, "bin.yaml"))
    one_paragraph(e)
    with pytest.raises(ConfigError, match=r"recipe '.*l1\.yaml' is not UTF-8 text \(byte 0xe9 at offset 5\)"):
        load_config(write_text(tmp_path, "# caf\xe9\noptim: {lr: 0.1}\n".encode("latin-1"), "l1.yaml"))
    with pytest.raises(ConfigError, match="not a text file"):  # UTF-16 without its byte-order mark
        load_config(write_text(tmp_path, "optim: {lr: 0.1}\n".encode("utf-16-le"), "u16.yaml"))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize("text", [
    "a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 3000)) + "  " * 3000 + "v: 1\n",
    "optim: " + "[" * 3000 + "]" * 3000 + "\n",
    "model: {kwargs: " + "{a: " * 3000 + "1" + "}" * 3000 + "}\n",
])
def test_deep_nesting_is_a_clear_error_not_a_recursion_error(tmp_path, text):
    with pytest.raises(ConfigError, match=r"nesting deeper than 64 levels at line \d+") as e:
        load_config(write_text(tmp_path, text))
    one_paragraph(e)
    with pytest.raises(ConfigError, match="nesting deeper than 64"):
        load_config(None, ["model.kwargs=" + "[" * 100 + "]" * 100])


def test_an_alias_inside_itself_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"alias \*x .*cycle"):
        load_config(write_text(tmp_path, "model: {kwargs: &x {a: *x}}\n"))


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "{}\n", "---\n", "null\n"])
def test_an_empty_recipe_says_what_a_recipe_needs(tmp_path, text):
    with pytest.raises(ConfigError) as e:
        load_config(write_text(tmp_path, text))
    msg = one_paragraph(e)
    assert "r.yaml" in msg and "empty" in msg and "method" in msg and "data" in msg


def test_defaults_without_a_file_still_load():
    cfg = load_config(None, ["out_dir=runs/x"])
    assert cfg == load_config(None, ["out_dir=runs/x"]) and cfg.method.name == "supervised"


def test_a_recipe_without_out_dir_gets_a_directory_of_its_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_text(tmp_path, "model: {name: resnet8}\n")
    first = load_config(recipe).out_dir
    assert first.startswith("runs/r-") and first[len("runs/r-"):].replace("-", "").isdigit()
    (tmp_path / first).mkdir(parents=True)
    second = load_config(recipe).out_dir
    assert second != first and second.startswith("runs/r-")  # never the directory of another run
    assert load_config(None).out_dir.startswith("runs/run-")


# --------------------------------------------------------------------------------------------------
# sizes only the data knows (digits: 1,198 training images, 10 classes)


def digits_data(*extra):
    pytest.importorskip("sklearn")
    from mentor.engine.inputs import load_splits

    return load_splits(load_config(None, ["data.name=digits", "data.val_size=200", *extra]).data)


def test_val_size_larger_than_the_data_names_the_key():
    with pytest.raises(ConfigError, match=r"data\.val_size=5000 leaves no training images: digits has 1198"):
        digits_data("data.val_size=5000")


def test_labels_per_class_and_subset_larger_than_the_data_name_the_key():
    with pytest.raises(ConfigError, match=r"data\.labels_per_class=500 is larger than class"):
        digits_data("data.labels_per_class=500")
    with pytest.raises(ConfigError, match=r"data\.subset=5000 is larger than the 998 training images"):
        digits_data("data.subset=5000")


def test_a_semi_supervised_method_without_unlabelled_images_names_the_key(tmp_path):
    pytest.importorskip("sklearn")
    from mentor.engine import Trainer

    with pytest.raises(ConfigError, match=r"method\.name=fixmatch learns from unlabelled images.*"
                                          r"data\.labels_per_class=not set.*set data\.labels_per_class=N"):
        Trainer(load_config(None, ["data.name=digits", "data.val_size=200", "method.name=fixmatch",
                                   f"out_dir={tmp_path}"]))
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_subset_smaller_than_a_batch_is_repeated_to_fill_it():
    import torch

    from mentor.engine.inputs import TrainInputs

    splits = digits_data("data.subset=5", "data.batch_size=32")
    assert len(splits.train) == 5
    cfg = load_config(None, ["data.name=digits", "data.batch_size=32", "data.augment=none"]).data
    batch = TrainInputs(splits, cfg, ("train",), seed=0, rank=0, world_size=1, device=torch.device("cpu"))(0)
    assert batch["x"].shape[0] == 32 and set(batch["index"].tolist()) <= set(range(5))
