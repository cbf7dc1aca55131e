"""The check every bad-value test of `gradinv attack` makes: exit 2, one line, nothing written."""

from sweep.cli.main import main


def assert_attack_refuses(argv: list[str], line: str, tmp_path, capsys) -> None:
    out = tmp_path / "never"
    try:
        code = main(["attack", "--out", str(out), *argv])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [f"gradinv attack: error: {line}"], err
    assert not out.exists()
