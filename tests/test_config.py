import pytest

from unfused_dist.config import ConfigError, load_config, save_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: {name: x}\npretrain:\n  epochs: 3\n  optim: {lr: 0.5}\n")
    cfg = load_config(path, ["pretrain.batch_size=8", "finetune.rows=[scratch]", "pretrain.optim.lr=1e-3"])
    assert (cfg.run.name, cfg.pretrain.epochs, cfg.pretrain.batch_size) == ("x", 3, 8)
    assert cfg.finetune.rows == ["scratch"] and cfg.pretrain.optim.lr == 1e-3
    assert cfg.pretrain.optim.name == "adamw"  # untouched nested defaults survive a partial section


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["distill.epochs=7"])
    save_config(cfg, tmp_path / "r.yaml")
    again = load_config(tmp_path / "r.yaml")
    assert again.hash() == cfg.hash() and again.distill.epochs == 7


@pytest.mark.parametrize("override, message", [
    ("pretrain.batchsize=3", "unknown key 'pretrain.batchsize' (did you mean 'pretrain.batch_size'?)"),
    ("prtrain.epochs=1", "unknown key 'prtrain' (did you mean 'pretrain'?)"),
    ("pretrain.epochs=many", "'pretrain.epochs' expects int, got 'many'"),
    ("pretrain.epochs.x=1", "'pretrain.epochs' is a value, not a section"),
    ("novalue", "expected key=value"),
])
def test_bad_keys_give_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("distill:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'distill.epoch' \(did you mean 'distill.epochs'"):
        load_config(path)
