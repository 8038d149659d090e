import pytest

from jobs.cli import main
from jobs.config import build
from pipeline.errors import UserError
from trainer.sft import SFTConfig


def test_unknown_key_and_wrong_type_are_one_line_errors():
    with pytest.raises(UserError, match=r"unknown key\(s\) \['lerning_rate'\]"):
        build(SFTConfig, {"model": "m", "data": "d", "out": "o", "lerning_rate": 1}, "c.yaml")
    with pytest.raises(UserError, match="lr must be float"):
        build(SFTConfig, {"model": "m", "data": "d", "out": "o", "lr": "fast"}, "c.yaml")
    with pytest.raises(UserError, match="model is required"):
        build(SFTConfig, {"data": "d", "out": "o"}, "c.yaml")


def test_yaml_then_flags_override(tmp_path, capsys):
    cfg_file = tmp_path / "sft.yaml"
    cfg_file.write_text("model: m\ndata: d\nout: o\nlr: 0.01\nmax_steps: 5\n")
    from jobs.cli import build_parser
    from jobs.config import from_args

    args = build_parser().parse_args(["sft", "--config", str(cfg_file), "--max-steps", "7"])
    cfg = from_args(SFTConfig, args)
    assert (cfg.lr, cfg.max_steps, cfg.batch_size) == (0.01, 7, 128)


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    cfg_file = tmp_path / "sft.yaml"
    cfg_file.write_text("model: m\ndata: d\nout: o\nbatch_size: many\n")
    assert main(["sft", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "batch_size must be int" in err


@pytest.mark.parametrize("cmd", [[], ["toy"], ["toy", "init"], ["toy", "data"], ["sft"], ["eval"]])
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: odpo" in capsys.readouterr().out


def test_renamed_keys_name_the_new_key(tmp_path, capsys):
    """A config still using a key renamed so that "reference" means one thing fails with one line
    naming the new key, not a generic unknown-key error."""
    import dataclasses

    from jobs.byod import BYODConfig
    from jobs.config import RENAMED_KEYS, build_section
    from jobs.iterate import IterateConfig
    from trainer.dpo import DPOConfig
    from trainer.precompute import PrecomputeConfig

    classes = {c.__name__: c for c in (IterateConfig, BYODConfig, DPOConfig, PrecomputeConfig)}
    for name, renamed in RENAMED_KEYS.items():
        fields = {f.name for f in dataclasses.fields(classes[name])}
        for old, new in renamed.items():
            assert old not in fields and new in fields, (name, old, new)
    it = {"run_dir": "r", "scorer": "addition"}
    with pytest.raises(UserError, match=r"^it\.yaml: reference_stage is now precompute$"):
        build(IterateConfig, {**it, "reference_stage": {}}, "it.yaml")
    with pytest.raises(UserError, match=r"^it\.yaml: reference is now ref_model$"):
        build(IterateConfig, {**it, "reference": "initial"}, "it.yaml")
    with pytest.raises(UserError, match=r"^b\.yaml: reference_stage is now precompute$"):
        build(BYODConfig, {"run_dir": "r", "data": "d", "reference_stage": {}}, "b.yaml")
    dpo = {"model": "m", "data": "d", "out": "o", "beta": 0.1}
    with pytest.raises(UserError, match=r"^t\.yaml: reference is now ref_logps$"):
        build(DPOConfig, {**dpo, "reference": "live"}, "t.yaml")
    with pytest.raises(UserError, match=r"^t\.yaml: reference_model is now ref_model$"):
        build(DPOConfig, {**dpo, "reference_model": "m"}, "t.yaml")
    with pytest.raises(UserError, match=r"section 'precompute': reference_cache is now cache$"):
        build_section(PrecomputeConfig, {"reference_cache": "require"},
                      {"pairs": "p", "model": "m", "out": "o"}, "precompute", "iterate")
    # Through the CLI: one line, before any work.
    cfg_file = tmp_path / "iterate.yaml"
    cfg_file.write_text("run_dir: r\nscorer: addition\nreference_stage: {}\n")
    assert main(["iterate", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "reference_stage is now precompute" in err, err
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("model: m\ndata: d\nout: o\nbeta: 0.1\nreference: live\n")
    assert main(["train", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "reference is now ref_logps" in err, err
