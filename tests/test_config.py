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


@pytest.mark.parametrize("override, message", [
    ("data.bad_samples=drop", "'data.bad_samples' is 'drop'; use one of 'skip', 'fail'"),
    ("engine.zero_stage=4", "'engine.zero_stage' is 4; use one of 0, 1, 2, 3"),
    ("engine.precision=fp8", "'engine.precision' is 'fp8'"),
])
def test_values_outside_their_choices_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_engine_combinations_that_cannot_work_are_refused():
    from unfused_dist.config import EngineConfig
    from unfused_dist.engine.dsconfig import deepspeed_config

    with pytest.raises(ConfigError, match="fp16 is not supported.*use bf16"):
        deepspeed_config(EngineConfig(precision="fp16"), 8, 1)
    with pytest.raises(ConfigError, match="offload=cpu needs engine.zero_stage 1, 2 or 3"):
        deepspeed_config(EngineConfig(zero_stage=0, offload="cpu"), 8, 1)
    ds = deepspeed_config(EngineConfig(zero_stage=3, offload="cpu", grad_accum=4, precision="bf16"), 8, 2)
    assert ds["train_batch_size"] == 64 and ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    # bf16 is autocast around the forward: DeepSpeed keeps the module (and its frontend) in fp32
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_how_a_run_runs_is_not_part_of_what_it_computes():
    base = load_config(None)
    assert load_config(None, ["run.nproc=4", "engine.save_every_steps=7"]).hash() == base.hash()
    assert load_config(None, ["pretrain.epochs=9"]).hash() != base.hash()
