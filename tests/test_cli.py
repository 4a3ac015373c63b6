from ldmcli import __version__, paths


def test_version(cli):
    r = cli("--version")
    assert r.exit_code == 0, r
    assert r.stdout.strip() == f"ldm {__version__}"


def test_help_lists_only_registered_commands(cli):
    from ldmcli import commands

    r = cli("--help")
    assert r.exit_code == 0, r
    for name in commands.COMMANDS:
        assert name.replace("_", "-") in r.stdout


def test_unknown_command_is_one_line_usage_error(cli):
    r = cli("no-such-command")
    assert r.exit_code == 2, r
    assert r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("ldm: error:")


def test_unknown_option_is_one_line_usage_error(cli):
    r = cli("--no-such-option")
    assert r.exit_code == 2, r
    assert len(r.stderr.strip().splitlines()) == 1


def test_data_dir_resolved_on_every_call(monkeypatch, tmp_path):
    monkeypatch.setenv("LDM_HOME", str(tmp_path / "a"))
    assert paths.data_dir() == (tmp_path / "a").resolve()
    monkeypatch.setenv("LDM_HOME", str(tmp_path / "b"))
    assert paths.data_dir() == (tmp_path / "b").resolve()
    paths.set_data_dir(tmp_path / "c")
    try:
        assert paths.data_dir() == (tmp_path / "c").resolve()
    finally:
        paths.set_data_dir(None)
    monkeypatch.delenv("LDM_HOME")
    assert "ldmcli" in str(paths.data_dir())
    assert paths.models_dir() / "first_stage_models" / "kl-f8" == paths.first_stage_dir("kl-f8")
