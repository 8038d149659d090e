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
