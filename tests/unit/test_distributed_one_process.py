"""What tests/launch/test_distributed.py checks with real processes has one case in the pytest process: ddp.*
options given to a one-process run say, in one line, that they do nothing (one process uses no DDP)."""


def test_ddp_options_on_one_process_say_they_do_nothing(tmp_path, capsys, fresh_accelerate_state):
    from distcifar.accelerator import build_accelerator
    from distcifar.config import Config

    cfg = Config(output_dir=str(tmp_path))
    cfg.ddp.comm_hook, cfg.train.mixed_precision = "powersgd", "no"
    accelerator = build_accelerator(cfg)
    assert accelerator.num_processes == 1
    assert "ddp.* options configure DDP, which one process does not use" in capsys.readouterr().out
    cfg.ddp.comm_hook = "none"
    build_accelerator(cfg)
    assert "ddp.*" not in capsys.readouterr().out
