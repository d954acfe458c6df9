"""Config errors surface when the config loads, as one line naming the key, the value, its source and what
to use; the run dir's identity does not depend on how its path or the data paths are spelled."""
import pytest

from unfused_dist.cli import prepare_run_dir
from unfused_dist.config import ConfigError, load_config


def _error(overrides=(), path=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- A: the run's identity -------------------------------------------------------------------------------

def test_the_same_run_dir_spelled_differently_is_the_same_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepare_run_dir(load_config(None, ["run.dir=runs/same", "data.pool=data/pool"]))
    for run_dir, pool in [("runs/same/", "data/pool/"), ("./runs/same", "./data//pool"),
                          (str(tmp_path / "runs/same"), str(tmp_path / "data/pool"))]:
        prepare_run_dir(load_config(None, [f"run.dir={run_dir}", f"data.pool={pool}"]))  # accepted


def test_a_moved_run_dir_keeps_its_hash(tmp_path):
    here = load_config(None, [f"run.dir={tmp_path / 'a'}"])
    assert load_config(None, [f"run.dir={tmp_path / 'b'}"]).hash() == here.hash()


def test_a_different_run_is_refused_without_suggesting_to_delete_it(tmp_path):
    prepare_run_dir(load_config(None, [f"run.dir={tmp_path}"]))
    with pytest.raises(ConfigError) as e:
        prepare_run_dir(load_config(None, [f"run.dir={tmp_path}/", "pretrain.epochs=9"]))
    message = str(e.value)
    assert "pretrain.epochs: 2 -> 9" in message and "run.dir" not in message.split("(")[1].split(")")[0]
    assert "delete" not in message


def test_an_unwritable_run_dir_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"run.dir .*file/run: cannot write the run dir .*writable directory"):
        prepare_run_dir(load_config(None, [f"run.dir={tmp_path / 'file' / 'run'}"]))


# ---- C: choices and ranges ------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("finetune.rows=[scratch, teacher_prob]", "'finetune.rows' has 'teacher_prob'; use one of 'scratch', "),
    ("pretrain.optim.name=adma", "'pretrain.optim.name' is 'adma'; use one of 'sgd', 'adam', 'adamw'"),
    ("finetune.probe_optim.schedule=linear", "'finetune.probe_optim.schedule' is 'linear'; use one of 'cosine'"),
    ("distill.n_fc=4", "'distill.n_fc' is 4; use one of 2, 3"),
    ("pretrain.batch_size=0", "'pretrain.batch_size' is 0; use an integer >= 1"),
    ("finetune.epochs=0", "'finetune.epochs' is 0; use an integer >= 1"),
    ("distill.epochs=-1", "'distill.epochs' is -1; use an integer >= 1"),
    ("pretrain.optim.lr=.nan", "'pretrain.optim.lr' is nan; use a finite number > 0"),
    ("distill.optim.lr=0", "'distill.optim.lr' is 0.0; use a finite number > 0"),
    ("audio.f_min=.inf", "'audio.f_min' is inf; use a finite number >= 0"),
    ("pseudolabel.k=1", "'pseudolabel.k' is 1; use an integer >= 2"),
    ("pseudolabel.iterations=0", "'pseudolabel.iterations' is 0; use an integer >= 1"),
    ("metrics.port=70000", "'metrics.port' is 70000; use an integer from 0 to 65535"),
    ("data.num_workers=-1", "'data.num_workers' is -1; use an integer >= 0"),
    ("engine.keep_checkpoints=0", "'engine.keep_checkpoints' is 0; use an integer >= 1"),
    ("run.nproc=0", "'run.nproc' is 0; use an integer >= 1"),
    ("run.seed=4294967296", "'run.seed' is 4294967296; use an integer from 0 to 4294967295"),
    ("pseudolabel.init_points=8", "'pseudolabel.init_points' is 8; use at least pseudolabel.k (32)"),
    ("audio.f_max=9000", "'audio.f_max' is 9000.0; use more than audio.f_min (60) and at most half of"),
])
def test_values_outside_their_choices_or_range_fail_at_load(override, message):
    assert _error([override]).startswith(f"command line: {message}")


def test_the_error_names_where_the_value_came_from(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  optim: {name: adma}\n")
    assert _error(path=path).startswith(f"{path}: 'pretrain.optim.name' is 'adma'")
    path.write_text("engine:\n  precision: fp32\n")
    assert _error(["engine.precision=fp8"], path).startswith("command line: 'engine.precision' is 'fp8'")


def test_a_moved_key_names_its_new_place(tmp_path):
    assert _error(["pretrain.norm_clips=64"]) == ("command line: 'pretrain.norm_clips' has moved: write "
                                                  "'audio.norm_clips' instead (same meaning)")
    path = tmp_path / "old.yaml"
    path.write_text("pseudolabel:\n  batch_size: 64\n")
    assert _error(path=path).startswith(f"{path}: 'pseudolabel.batch_size' has moved: write 'data.eval_batch_size'")


def test_finetune_rows_are_checked_against_the_stage_tables_rows():
    assert _error(["finetune.rows=[scratch,unfused_finetun]"]).startswith(
        "command line: 'finetune.rows' has 'unfused_finetun'; use one of 'scratch', 'teacher_probe'")
    assert "(did you mean 'unfused_finetune'?)" in _error(["finetune.rows=[scratch,unfused_finetun]"])


# ---- E: YAML --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("run:\n  name: x\n\tseed: 3\n", "not valid YAML: line 3, column 1: found character '\\t' that cannot start"),
    ("pretrain:\n  epochs: 5\npretrain:\n  n_fc: 2\n", "line 3, column 1: duplicate key 'pretrain' (first on line 1)"),
    ("pretrain:\n  epochs: 5\n  epochs: 7\n", "line 3, column 3: duplicate key 'epochs' (first on line 2)"),
])
def test_yaml_errors_say_where_and_what(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert message in _error(path=path)


def test_a_section_with_every_key_commented_out_is_empty(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  name: x\npretrain:\n  # epochs: 3\n")
    assert load_config(path).pretrain.epochs == 2


@pytest.mark.parametrize("content, message", [
    (None, "is a directory; give a YAML file"),
    (b"\xff\xfe\x00run: 1", "not UTF-8 text (byte 0xff at offset 0); save it as UTF-8"),
])
def test_unreadable_config_files_are_config_errors(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.mkdir() if content is None else path.write_bytes(content)
    assert message in _error(path=path)


# ---- F: strings stay as written ---------------------------------------------------------------------------

def test_string_keys_keep_the_text_as_written(tmp_path):
    cfg = load_config(None, ["data.task=010", "run.name=12:30"])
    assert (cfg.data.task, cfg.run.name) == ("010", "12:30")
    assert load_config(None, ["run.name=2024-06-01"]).run.name == "2024-06-01"
    cfg = load_config(None, ['run.name="a b"', "data.task= 010 ", "run.name='it''s'"])
    assert (cfg.run.name, cfg.data.task) == ("it's", "010")
    assert load_config(None, ['run.name="a b"']).run.name == "a b"
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  name: 2024-06-01\ndata:\n  task: 0755\n")
    cfg = load_config(path)
    assert (cfg.run.name, cfg.data.task) == ("2024-06-01", "0755")


def test_numbers_yaml_would_misread_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  epochs: 010\n")
    assert "'pretrain.epochs' is written 010, which YAML reads as 8" in _error(path=path)


def test_saving_the_config_replaces_the_file_whole(tmp_path):
    """Each stage's rank 0 saves RUN/config.yaml again while its other ranks load it: a reader must see the
    old file or the new one, never a truncated one."""
    from unfused_dist.config import save_config
    path = tmp_path / "config.yaml"
    save_config(load_config(None), path)
    before = path.read_text()
    with open(path, encoding="utf-8") as reader:  # a rank that opened it just before the save
        save_config(load_config(None, ["run.name=other"]), path)
        assert reader.read() == before
    assert load_config(path).run.name == "other"
